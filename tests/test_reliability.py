"""Failures leave nothing half-done (issue 14): damaged checkpoints and metric logs, deep copies of
patched models, and one-line CLI errors. Each case names the file or field that is wrong."""

from __future__ import annotations

import copy
import json
import logging
import pickle

import pytest
import torch

from seerattn.record import read_jsonl
from seerattn.train.checkpoint import STATE_FILE, latest_valid_checkpoint, load_checkpoint, save_checkpoint

KEYS = ("step", "gates", "optimizer", "scheduler", "rng", "config", "data")


def _state(step: int) -> dict:
    return {
        "step": step,
        "gates": {"w": torch.full((2, 3), float(step))},
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"last_epoch": step},
        "rng": {"torch": torch.get_rng_state()},
        "config": {"lr": 1e-3},
        "data": {"digest": "abc"},
    }


# ------------------------------------------------------------------------------ checkpoints
def _damage(path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "not-zip":
        path.write_bytes(b"this is not a checkpoint" * 10)
    elif how == "plain-pickle":
        path.write_bytes(pickle.dumps({"step": 1}))
    elif how == "code-pickle":
        torch.save({"step": 1, "fn": logging.Logger}, path)  # a class: refused by weights_only
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "empty", "not-zip", "plain-pickle", "code-pickle"])
def test_damaged_state_file_names_the_file_without_a_weights_only_hint(tmp_path, how):
    folder = save_checkpoint(tmp_path, 3, _state(3), keep=2)
    _damage(folder / STATE_FILE, how)
    with pytest.raises(ValueError, match="checkpoint") as exc:
        load_checkpoint(folder)
    msg = str(exc.value)
    assert str(folder / STATE_FILE) in msg
    assert "weights_only" not in msg
    # No chained torch error either (its text suggests weights_only=False).
    assert exc.value.__cause__ is None and (exc.value.__context__ is None or exc.value.__suppress_context__)


def test_missing_key_is_named(tmp_path):
    state = _state(2)
    del state["optimizer"]
    folder = save_checkpoint(tmp_path, 2, state, keep=2)
    with pytest.raises(ValueError, match=r"lacks \['optimizer'\]") as exc:
        load_checkpoint(folder, required=KEYS)
    assert str(folder / STATE_FILE) in str(exc.value)


@pytest.mark.parametrize(
    "payload,match",
    [([1, 2], "holds a list, expected a dict"), ({"step": -1}, "step -1"), ({"step": "2"}, "step '2'")],
    ids=["not-a-dict", "negative-step", "str-step"],
)
def test_malformed_state_is_named(tmp_path, payload, match):
    folder = save_checkpoint(tmp_path, 2, payload, keep=2)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(folder, required=("step",))


def test_step_must_match_the_folder(tmp_path):
    folder = save_checkpoint(tmp_path, 4, _state(3), keep=2)  # e.g. a state.pt copied by hand
    with pytest.raises(ValueError, match="holds step 3 but its folder is step_0000004"):
        load_checkpoint(folder, required=KEYS)


def test_newest_valid_checkpoint_skips_damaged_newer_ones_with_a_warning(tmp_path, caplog):
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, _state(step), keep=10)
    _damage(tmp_path / "step_0000008" / STATE_FILE, "truncated")
    state = _state(6)
    del state["rng"]
    save_checkpoint(tmp_path, 6, state, keep=10)
    (tmp_path / "step_0000010").mkdir()  # a folder without state.pt (deleted by hand)
    with caplog.at_level(logging.WARNING, logger="seerattn.train.checkpoint"):
        folder, loaded = latest_valid_checkpoint(tmp_path, required=KEYS)
    assert folder == tmp_path / "step_0000004" and loaded["step"] == 4
    assert torch.equal(loaded["gates"]["w"], torch.full((2, 3), 4.0))
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for skipped in ("step_0000010", "step_0000008", "step_0000006"):
        assert skipped in warned
    assert "lacks ['rng']" in warned and "no state.pt" in warned


def test_newest_valid_checkpoint_none_and_all_damaged(tmp_path):
    assert latest_valid_checkpoint(tmp_path / "missing") is None
    assert latest_valid_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 1, _state(1), keep=3)
    _damage(tmp_path / "step_0000001" / STATE_FILE, "not-zip")
    with pytest.raises(ValueError, match="no readable checkpoint under .*step_0000001"):
        latest_valid_checkpoint(tmp_path, required=KEYS)


def test_valid_checkpoint_round_trip(tmp_path):
    folder = save_checkpoint(tmp_path, 5, _state(5), keep=1)
    loaded = load_checkpoint(folder, required=KEYS)
    assert loaded["step"] == 5 and torch.equal(loaded["gates"]["w"], _state(5)["gates"]["w"])


# ------------------------------------------------------------------------------ metrics.jsonl
ROWS = [{"step": i, "kl": 1.0 / i, "mass_recall": 0.5, "block_recall": 0.4, "lr": 1e-3} for i in (1, 2, 3)]


def _jsonl(path, rows, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_read_jsonl_round_trip_and_blank_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert read_jsonl(path) == ROWS[:2]


def test_torn_final_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    _jsonl(path, ROWS, tail='{"step": 4, "kl": 0.2')  # killed while writing step 4
    with caplog.at_level(logging.WARNING, logger="seerattn.record"):
        assert read_jsonl(path) == ROWS
    assert any(str(path) in r.getMessage() and "line 4" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "text,match",
    [
        ('{"step": 1}\n{"step": 2, "kl\n{"step": 3}\n', "line 2 is not valid JSON"),
        ('{"step": 1}\n[1, 2]\n{"step": 3}\n', "line 2 holds a JSON list, expected an object"),
    ],
    ids=["torn-middle-line", "not-an-object"],
)
def test_bad_line_elsewhere_is_an_error_naming_file_and_line(tmp_path, text, match):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as exc:
        read_jsonl(path)
    assert str(path) in str(exc.value)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_jsonl(tmp_path / "metrics.jsonl")


def test_eval_curves_reads_a_run_with_a_torn_last_line(tmp_path, caplog):
    from seerattn.cli.eval import _read_metrics

    _jsonl(tmp_path / "metrics.jsonl", ROWS, tail='{"step": 4, "kl"')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in _read_metrics(tmp_path)] == [1, 2, 3]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kl\n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        _read_metrics(tmp_path)


# ------------------------------------------------------------------------------ deep copy of a patched model
def test_deepcopy_of_a_patched_model_is_independent():
    pytest.importorskip("transformers")
    from hf_models import GATE, input_ids, make_model

    from seerattn.hf import SeerConfig, apply_seer_attention, gate_modules, get_seer_state, remove_seer_attention

    model = make_model("llama")
    apply_seer_attention(model, SeerConfig(gate=GATE, mode="sparse"))
    ids = input_ids(100)
    with torch.no_grad():
        want = model(ids).logits
    clone = copy.deepcopy(model)
    state, cstate = get_seer_state(model), get_seer_state(clone)
    assert cstate is not state and cstate._attn_modules[0] is not state._attn_modules[0]
    state.reset()
    with torch.no_grad():
        got = clone(ids).logits
    assert torch.equal(got, want)
    # The copy's forward wrote into its own state only.
    assert set(cstate.stats) == {0, 1} and state.stats == {} and not state._pending
    # Changing one leaves the other as it was.
    cstate.set(mode="dense")
    with torch.no_grad():
        gate_modules(clone)[0].k_proj.zero_()
        assert torch.equal(model(ids).logits, want)
    assert state.config.mode == "sparse"
    # Removing seer attention from the copy leaves the original patched.
    remove_seer_attention(clone)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    assert set(state.stats) == {0, 1} and state.stats[0]["path"] == "sparse"


# ------------------------------------------------------------------------------ CLI user errors
def _metrics_run(tmp_path, text: str):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(text)
    return run


@pytest.mark.parametrize(
    "argv,phrase",
    [
        (lambda run: ["eval", "curves", str(run), "--labels", "a,b"], "--labels gives"),
        (lambda run: ["eval", "curves", str(run.parent / "none")], "metrics.jsonl not found"),
        (lambda run: ["eval", "curves", str(run)], "line 1 is not valid JSON"),
    ],
    ids=["labels-count", "missing-run", "damaged-metrics"],
)
def test_eval_user_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, phrase):
    from seerattn.cli import main

    monkeypatch.delenv("SEERATTN_DEBUG", raising=False)
    run = _metrics_run(tmp_path, '{"step": 1, "kl\n{"step": 2}\n')
    assert main(argv(run)) == 2
    err = capsys.readouterr().err
    assert err.startswith("seerattn eval: error: ") and phrase in err
    assert err.count("\n") == 1 and "Traceback" not in err
    # --debug or SEERATTN_DEBUG=1: the exception propagates with its traceback.
    with pytest.raises((ValueError, FileNotFoundError)):
        main(["--debug", *argv(run)])
    monkeypatch.setenv("SEERATTN_DEBUG", "1")
    with pytest.raises((ValueError, FileNotFoundError)):
        main(argv(run))


def test_distill_damaged_checkpoint_on_resume_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import yaml

    from seerattn.cli import main

    monkeypatch.delenv("SEERATTN_DEBUG", raising=False)
    out = tmp_path / "out"
    folder = save_checkpoint(out / "checkpoints", 2, _state(2), keep=1)
    _damage(folder / STATE_FILE, "truncated")
    from hf_models import make_config

    make_config("llama").save_pretrained(tmp_path / "m")  # a model folder and data that exist
    (tmp_path / "d.txt").write_text("some text " * 50)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({"model": str(tmp_path / "m"), "data": [str(tmp_path / "d.txt")], "output_dir": str(out)})
    )
    assert main(["distill", str(recipe), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seerattn distill: error: ") and "state.pt" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------ policy overrides vs model depth
def test_override_past_the_model_depth_is_refused_at_apply_and_set():
    from hf_models import GATE, make_model

    from seerattn import SparsityPolicy
    from seerattn.hf import SeerConfig, apply_seer_attention, get_seer_state

    model = make_model("llama")  # 2 layers
    bad = SparsityPolicy("density", 0.3, layer_overrides={2: SparsityPolicy("dense")})
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"layer_overrides has layer 2 but the model has 2 layers \(0..1\)"):
        apply_seer_attention(model, SeerConfig(gate=GATE, policy=bad))
    assert getattr(model, "_seer_state", None) is None and model.config._attn_implementation == impl
    assert not any(hasattr(layer.self_attn, "seer_gate") for layer in model.model.layers)
    state = apply_seer_attention(model, SeerConfig(gate=GATE))
    with pytest.raises(ValueError, match="layer_overrides has layer 2"):
        state.set(policy=bad)
    assert get_seer_state(model).config.policy == SparsityPolicy()
    state.set(policy=SparsityPolicy("density", 0.3, layer_overrides={1: SparsityPolicy("dense")}))


def test_apply_that_fails_on_a_later_layer_leaves_no_gate_or_hook():
    from hf_models import GATE, make_model

    from seerattn.hf import SeerConfig, apply_seer_attention

    model = make_model("llama")
    model.model.layers[1].self_attn.layer_idx = 7  # a model whose second layer is numbered wrongly
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(ValueError, match="layer 1 reports layer_idx=7"):
        apply_seer_attention(model, SeerConfig(gate=GATE))
    assert not hasattr(model.model.layers[0].self_attn, "seer_gate")
    assert not hasattr(model.model.layers[0].self_attn, "_seer_state")
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
