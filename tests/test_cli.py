"""The ``seerattn`` command line: help, ``env`` (text and JSON), ``convert``, usage errors."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch

import seerattn
from seerattn.cli import main

ENV_KEYS = {
    "seerattn",
    "python",
    "platform",
    "torch",
    "triton",
    "transformers",
    "flash_attn_4",
    "cuda",
    "gpus",
    "triton_interpret",
    "impls",
}


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "seerattn", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_help_lists_subcommands():
    res = _run("--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: seerattn")
    for cmd in ("env", "convert"):
        assert cmd in res.stdout


def test_console_script_entry_point():
    # Checked through the installed metadata rather than a third subprocess (each one imports torch).
    eps = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "seerattn"]
    if not eps:
        pytest.skip("seerattn is not installed (pip install -e . registers the console script)")
    assert eps[0].value == "seerattn.cli:main" and eps[0].load() is main


def test_env_json_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = _run("env", "--json", env=env)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert set(info) == ENV_KEYS
    assert info["seerattn"] == seerattn.__version__ and info["torch"] == torch.__version__
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["triton_interpret"] is True
    assert info["impls"]["reference"] is True and set(info["impls"]) == {"reference", "triton", "flex", "fa4"}
    if info["triton"] is not None:
        assert "interpreter" in info["impls"]["triton"]
    if not torch.cuda.is_available():
        assert info["gpus"] == [] and info["impls"]["flex"] is False


def test_env_text(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split(None, 1)[1] for line in out.strip().splitlines()}
    assert set(lines) == ENV_KEYS
    assert lines["seerattn"] == seerattn.__version__ and "reference=True" in lines["impls"]


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"seerattn {seerattn.__version__}"


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["convert", "x.pth"]], ids=["none", "unknown", "missing-opts"])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "usage: seerattn" in capsys.readouterr().err


def test_convert_command(tmp_path, capsys):
    from hf_models import HEAD_DIM, HQ, LAYERS, make_config
    from safetensors.torch import load_file

    make_config("qwen2").save_pretrained(tmp_path / "base")  # a local base model folder (config only)
    sd = {
        f"model.layers.{i}.self_attn.attn_gate.mask_linear_k.weight": torch.randn(HQ, 3 * HEAD_DIM, HEAD_DIM)
        for i in range(LAYERS)
    }
    torch.save(sd, tmp_path / "attn_gate_weights.pth")
    official = {
        "seerattn_gate_type": "Qavg_Kmaxminavg",
        "seerattn_gate_block_size": 64,
        "seerattn_gate_hidden_size": 16,
    }
    (tmp_path / "config.json").write_text(json.dumps(official))  # the official config, next to the weights
    argv = ["convert", str(tmp_path / "attn_gate_weights.pth"), "--base-model", str(tmp_path / "base")]
    assert main([*argv, "-o", str(tmp_path / "adapter")]) == 0
    assert "wrote adapter" in capsys.readouterr().out
    meta = json.loads((tmp_path / "adapter" / "seer_config.json").read_text())
    assert meta["base_model"] == str(tmp_path / "base") and meta["model"]["model_type"] == "qwen2"
    tensors = load_file(str(tmp_path / "adapter" / "seer_gates.safetensors"))
    for i in range(LAYERS):
        assert torch.equal(
            tensors[f"layers.{i}.k_proj"], sd[f"model.layers.{i}.self_attn.attn_gate.mask_linear_k.weight"]
        )


@pytest.mark.parametrize("extra", [[], ["--gates", "testbed/gates-b32", "--mask-heads", "kv"]])
def test_quickstart_main_job_on_the_testbed(tmp_path, capsys, monkeypatch, extra):
    """The README's main job, at a small setting: committed testbed + gates on held-out books (and the
    block-32 gates with per-group masks)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the defaults (testbed/model, data/books-sample) are relative to the repository
    out = tmp_path / "qs"
    argv = ["quickstart", "--context", "512", "--samples", "1", "--density", "0.5", "--allocation", "uniform"]
    assert main([*argv, *extra, "-o", str(out)]) == 0
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["allocation"] == "uniform"
    assert summary["mask_heads"] == ("kv" if extra else "q")
    assert summary["gates"] == ("testbed/gates-b32" if extra else "testbed/gates")
    assert summary["passkey_dense"] == 1.0
    assert 20.0 < summary["ppl_dense"] < 60.0  # the testbed's held-out PPL at 512 tokens is ~34
    assert summary["ppl_sparse"] > summary["ppl_dense"]  # dropping blocks costs something
    assert 0.4 < summary["density_realised"] < 0.7
    assert len(summary["density_per_layer"]) == 6
    assert 0.0 < summary["mass_recall"] <= 1.0
    assert (out / "gate_vs_truth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "seer gate" in printed
    blocks = 512 // (32 if extra else 64)  # sink + diagonal of the causal blocks: 15 of 36 at 64-token blocks
    assert f"hold {blocks} blocks" in printed and f"{(2 * blocks - 1) / (blocks * (blocks + 1) / 2):.0%}" in printed
    assert "smoke check" in printed


def test_quickstart_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--model .* does not exist"):
        main(["quickstart", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])


def _fake_run(folder, kl0, n=20):
    folder.mkdir(parents=True)
    rows = [{"step": s, "kl": kl0 / s, "mass_recall": 0.5 + 0.01 * s, "lr": 1e-3} for s in range(1, n + 1)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_eval_curves_plots_runs_and_summarises(tmp_path, capsys):
    import matplotlib.image

    _fake_run(tmp_path / "a", 8.0)
    _fake_run(tmp_path / "b", 4.0, n=10)
    assert main(["eval", "curves", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "avg,windows"]) == 0
    out = capsys.readouterr().out
    assert "avg: 20 steps, KL 8.000 -> 0.400, mass recall 0.700" in out
    assert "windows: 10 steps, KL 4.000 -> 0.400" in out
    png = tmp_path / "a" / "loss_curve.png"  # default: beside the first run's metrics
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 600 and img[..., :3].std() > 0.05  # drawn, not blank


def test_eval_curves_errors(tmp_path):
    # --debug: the exceptions themselves (without it: one line, exit 2; tests/test_reliability.py)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        main(["--debug", "eval", "curves", str(tmp_path / "nothing")])
    _fake_run(tmp_path / "a", 8.0)
    with pytest.raises(ValueError, match="2 names for 1 runs"):
        main(["--debug", "eval", "curves", str(tmp_path / "a"), "--labels", "x,y"])
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 1, "kl": 1.0}\n')
    with pytest.raises(ValueError, match=r"line 1 lacks \['mass_recall'\]"):
        main(["--debug", "eval", "curves", str(tmp_path / "a")])


def test_plot_distill_curves_rejects_bad_runs(tmp_path):
    from seerattn.eval.plots import plot_distill_curves

    with pytest.raises(ValueError, match="at least one run"):
        plot_distill_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="run 'a' has no metrics rows"):
        plot_distill_curves({"a": []}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"run 'a': rows lack \['kl'\]"):
        plot_distill_curves({"a": [{"step": 1, "mass_recall": 0.5}]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
