"""Failures leave nothing half-done (issue 14): damaged checkpoints and metric logs, deep copies of
patched models, and one-line CLI errors. Each case names the file or field that is wrong."""

from __future__ import annotations

import copy
import importlib
import json
import logging
import pickle
import re
import sys

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


# ------------------------------------------------------------------------------ NaN in, NaN out (every impl)
def _nan_warnings(fn):
    """The interpreter evaluates NaN through numpy (and both branches of tl.where): its warnings are expected."""
    fn = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")(fn)
    return pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")(fn)


def _kernel_device() -> str:
    """Where the Triton impl runs: CPU under the interpreter (set by conftest without CUDA), else CUDA."""
    pytest.importorskip("triton")
    from seerattn.ops._triton.config import interpreting

    if interpreting():
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("the Triton impl needs CUDA or TRITON_INTERPRET=1")
    return "cuda"


def _poison(x: torch.Tensor, g: torch.Generator, n: int = 2) -> torch.Tensor:
    """A copy of ``x`` with NaN at ``n`` random elements."""
    x = x.clone()
    flat = x.view(-1)
    flat[torch.randint(0, flat.numel(), (n,), generator=g)] = float("nan")
    return x


def _nan_rows(x: torch.Tensor) -> torch.Tensor:
    return x.isnan().any(-1) if x.dim() == 4 else x.isnan()


def _required_nan_rows(q, k, v, keep) -> torch.Tensor:
    """[B, Hq, T]: rows whose computation reads a NaN (their own q row, or k/v of a key they attend to).
    keep: bool [B, Hq, T, T] of attended (query, key) pairs."""
    g = q.shape[1] // k.shape[1]
    kv_nan = (k.isnan().any(-1) | v.isnan().any(-1)).repeat_interleave(g, 1)  # [B, Hq, T]
    return q.isnan().any(-1) | (keep & kv_nan.unsqueeze(-2)).any(-1)


def _assert_nan_out(name: str, got: torch.Tensor, required: torch.Tensor) -> None:
    """NaN is never dropped: every row that reads a NaN is NaN."""
    missing = required & ~_nan_rows(got)
    assert not missing.any(), f"{name}: {int(missing.sum())} rows read a NaN but are finite"


@_nan_warnings
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nan_in_gives_nan_out_attention_with_block_scores(where, seed):
    from kernel_helpers import rand_qkv

    from seerattn.ops import attention_with_block_scores

    dev = _kernel_device()
    bs, t = 16, 45  # a partial last block
    q, k, v = rand_qkv(1, 4, 2, t, 16, torch.float32, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (_poison(x, gen) if name == where else x for name, x in zip("qkv", (q, k, v), strict=True))
    keep = torch.ones(t, t, dtype=torch.bool).tril().expand(1, 4, t, t)
    required = _required_nan_rows(q, k, v, keep)
    assert required.any()
    res = {}
    for impl in ("reference", "triton"):
        out, lse, scores = attention_with_block_scores(*(x.to(dev) for x in (q, k, v)), block_size=bs, impl=impl)
        out, lse, scores = out.cpu(), lse.cpu(), scores.cpu()
        _assert_nan_out(f"{impl} out", out, required)
        res[impl] = (lse.isnan(), scores.isnan())
        # A query block with a NaN row has an all-NaN score row (its normalisation reads the NaN);
        # the other rows stay finite and sum to 1.
        nb = scores.shape[-1]
        lse_nan = torch.nn.functional.pad(lse.isnan(), (0, nb * bs - t)).view(1, 4, nb, bs).any(-1)
        assert torch.equal(scores.isnan().all(-1), lse_nan) and torch.equal(scores.isnan().any(-1), lse_nan), impl
        fin = ~lse_nan
        torch.testing.assert_close(scores.sum(-1)[fin], torch.ones(int(fin.sum())), atol=1e-5, rtol=0)
        if where != "v":
            _assert_nan_out(f"{impl} lse", lse, required)
    # Both implementations put NaN in the same lse rows and block-score entries.
    assert torch.equal(res["reference"][0], res["triton"][0])
    assert torch.equal(res["reference"][1], res["triton"][1])


@_nan_warnings
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("mask_heads", [4, 2], ids=["per-head-union-tiles", "per-group-packed"])
def test_nan_in_gives_nan_out_block_sparse_forward_and_backward(where, mask_heads):
    from kernel_helpers import rand_mask, rand_qkv, token_keep

    from seerattn.ops import block_sparse_attention

    dev = _kernel_device()
    bs, t = 16, 75
    q, k, v = rand_qkv(1, 4, 2, t, 16, torch.float32, seed=3)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (_poison(x, gen) if name == where else x for name, x in zip("qkv", (q, k, v), strict=True))
    mask = rand_mask(1, mask_heads, t, bs, density=0.4, seed=3)
    required = _required_nan_rows(q, k, v, token_keep(mask, 4))
    assert required.any() and not required.all()
    dout = torch.randn(1, 4, t, 16, generator=gen)
    any_nan = {}
    for impl in ("reference", "triton"):
        qq, kk, vv = (x.to(dev).requires_grad_() for x in (q, k, v))
        out, lse = block_sparse_attention(qq, kk, vv, mask.to(dev), return_lse=True, impl=impl)
        out.backward(dout.to(dev))
        out, lse = out.detach().cpu(), lse.cpu()
        _assert_nan_out(f"{impl} out", out, required)
        if where != "v":
            _assert_nan_out(f"{impl} lse", lse, required)
        _assert_nan_out(f"{impl} dq", qq.grad.cpu(), required)  # dq_i reads out_i (through delta_i)
        # dk reads dp = dout . v and ds * q; dv = p^T dout reads q and k only (through p).
        assert kk.grad.isnan().any(), f"{impl}: a NaN vanished from dk"
        assert vv.grad.isnan().any() == (where != "v"), f"{impl}: dv NaN-ness"
        any_nan[impl] = [bool(x.isnan().any()) for x in (out, lse, qq.grad, kk.grad, vv.grad)]
    assert any_nan["reference"] == any_nan["triton"]


@_nan_warnings
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_nan_in_gives_nan_out_sparse_decode(where, num_splits):
    from seerattn.ops import reference
    from seerattn.ops._triton.decode_fwd import sparse_decode_fwd
    from seerattn.ops.reference import _kept_tokens

    dev = _kernel_device()
    bs, tmax, lens = 16, 96, [90, 37, 64]
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(3, 4, 16, generator=gen)
    k, v = torch.randn(3, 2, tmax, 16, generator=gen), torch.randn(3, 2, tmax, 16, generator=gen)
    idx = torch.tensor([[[0, 3, 5, -1], [1, 2, -1, 4]], [[0, 1, 2, -1], [2, -1, -1, -1]], [[3, 1, -1, 0], [-1] * 4]])
    idx, seqlens = idx.to(torch.int32), torch.tensor(lens, dtype=torch.int32)
    if where == "q":
        q[0, 1, 3] = q[2, 3, 0] = float("nan")
    else:
        x = k if where == "k" else v
        x[0, 0, 50, 2] = x[1, 1, 40, 0] = x[2, 0, 70, 1] = float("nan")  # selected / selected / past the end
    keep = _kept_tokens(idx, seqlens, bs, tmax).repeat_interleave(2, 1)  # [B, Hq, T]
    kv_nan = (k.isnan().any(-1) | v.isnan().any(-1)).repeat_interleave(2, 1)
    # A NaN query that selects nothing attends to nothing: its row is zeros (the documented empty row).
    required = (q.isnan().any(-1) & keep.any(-1)) | (keep & kv_nan).any(-1)  # [B, Hq]
    assert required.any() and not required.all()
    ref_out, ref_lse = reference.sparse_decode_attention(q, k, v, seqlens, idx, bs, return_lse=True)
    args = (x.to(dev) for x in (q, k, v, seqlens, idx))
    out, lse = sparse_decode_fwd(*args, bs, 0.25, return_lse=True, num_splits=num_splits)
    for name, o in (("reference", ref_out), ("triton", out.cpu())):
        assert torch.equal(o.isnan().any(-1), required), name
    for name, lse_ in (("reference", ref_lse), ("triton", lse.cpu())):
        if where != "v":
            assert torch.equal(lse_.isnan(), required), name


# ------------------------------------------------------------------------------ empty axes, missing paths and extras
def _z(*shape):
    return torch.zeros(*shape)


def _full_mask(b, h, t, bs=16):
    from seerattn import BlockMask

    nb = -(-t // bs)
    return BlockMask.from_dense(torch.ones(b, h, nb, nb, dtype=torch.bool), bs, t)


def _decode(q, kc, lens, idx):
    from seerattn.ops import sparse_decode_attention

    return sparse_decode_attention(q, kc, kc.clone(), torch.tensor(lens, dtype=torch.int32), idx, 16)


EMPTY_AXES = [
    ("awbs-B0", lambda: _awbs(_z(0, 2, 32, 8), _z(0, 2, 32, 8)), "q has batch B = 0"),
    ("awbs-D0", lambda: _awbs(_z(1, 2, 32, 0), _z(1, 2, 32, 0)), "q has head dim D = 0"),
    ("awbs-Hq0", lambda: _awbs(_z(1, 0, 32, 8), _z(1, 2, 32, 8)), "q has heads H = 0"),
    ("awbs-Hkv0", lambda: _awbs(_z(1, 2, 32, 8), _z(1, 0, 32, 8)), "k has heads H = 0"),
    ("bsa-B0", lambda: _bsa(_z(0, 2, 32, 8), _z(0, 2, 32, 8), _full_mask(1, 2, 32)), "q has batch B = 0"),
    ("bsa-D0", lambda: _bsa(_z(1, 2, 32, 0), _z(1, 2, 32, 0), _full_mask(1, 2, 32)), "q has head dim D = 0"),
    (
        "decode-B0",
        lambda: _decode(_z(0, 2, 8), _z(0, 2, 32, 8), [], torch.zeros(0, 2, 1, dtype=torch.int32)),
        "q has batch B = 0",
    ),
    (
        "decode-D0",
        lambda: _decode(_z(1, 2, 0), _z(1, 2, 32, 0), [1], torch.zeros(1, 2, 1, dtype=torch.int32)),
        "q has head dim D = 0",
    ),
    (
        "decode-Hq0",
        lambda: _decode(_z(1, 0, 8), _z(1, 2, 32, 8), [1], torch.zeros(1, 2, 1, dtype=torch.int32)),
        "q has heads Hq = 0",
    ),
    (
        "decode-paged-Hkv0",
        lambda: __import__("seerattn.ops", fromlist=["x"]).sparse_decode_attention(
            _z(1, 2, 8),
            _z(2, 16, 0, 8),
            _z(2, 16, 0, 8),
            torch.ones(1, dtype=torch.int32),
            torch.zeros(1, 0, 1, dtype=torch.int32),
            16,
            block_table=torch.zeros(1, 2, dtype=torch.int32),
        ),  # fmt: skip
        "k_cache has heads Hkv = 0",
    ),
]


def _awbs(q, kv):
    from seerattn import attention_with_block_scores

    return attention_with_block_scores(q, kv, kv.clone(), block_size=16)


def _bsa(q, kv, mask):
    from seerattn import block_sparse_attention

    return block_sparse_attention(q, kv, kv.clone(), mask)


@pytest.mark.parametrize("call,phrase", [c[1:] for c in EMPTY_AXES], ids=[c[0] for c in EMPTY_AXES])
def test_empty_batch_head_or_head_dim_is_a_clear_error(call, phrase):
    with pytest.raises(ValueError, match=re.escape(phrase) + r".*must be >= 1"):
        call()


def _recipe(tmp_path, model, data_name="d.txt", data_text="some text " * 50, **extra):
    import yaml

    data = tmp_path / data_name
    data.write_text(data_text)
    recipe = tmp_path / "r.yaml"
    fields = {"model": str(model), "data": [str(data)], "output_dir": str(tmp_path / "out"), **extra}
    recipe.write_text(yaml.safe_dump(fields))
    return recipe


def _no_tokenising(monkeypatch):
    from seerattn.train import trainer

    def fail(*args, **kwargs):
        raise AssertionError("the data was tokenised (or the tokenizer loaded) before the model path was checked")

    monkeypatch.setattr(trainer, "prepare_tokens", fail)
    monkeypatch.setattr(trainer, "_load_tokenizer", fail)


@pytest.mark.parametrize("command,extra", [("distill", {}), ("finetune", {"distill_steps": 2})])
@pytest.mark.parametrize("model", ["missing-folder", "folder-without-config", "bad/hub/id"])
def test_missing_model_fails_before_tokenising_in_one_line(tmp_path, capsys, monkeypatch, command, extra, model):
    from seerattn.cli import main

    monkeypatch.delenv("SEERATTN_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id must not reach the network in tests
    _no_tokenising(monkeypatch)
    path = {"missing-folder": tmp_path / "no-such-model", "folder-without-config": tmp_path, "bad/hub/id": model}[model]
    assert main([command, str(_recipe(tmp_path, path, **extra))]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seerattn {command}: error: recipe field 'model': cannot load a model config from ")
    assert str(path) in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing written either


def test_missing_datasets_extra_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    from hf_models import make_config

    from seerattn.cli import main
    from seerattn.train import trainer

    monkeypatch.delenv("SEERATTN_DEBUG", raising=False)
    make_config("llama").save_pretrained(tmp_path / "m")
    # a stand-in with a vocabulary (the cache key) that never tokenises: reading the data fails first
    attrs = {"get_vocab": lambda s: {"a": 0}, "__len__": lambda s: 1, "bos_token_id": 0, "eos_token_id": None}
    tok = type("Tok", (), attrs)()
    monkeypatch.setattr(trainer, "_load_tokenizer", lambda config: tok)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    recipe = _recipe(tmp_path, tmp_path / "m", data_name="d.jsonl", data_text='{"text": "hello"}\n')
    assert main(["distill", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seerattn distill: error: ") and "pip install 'seerattn[data]'" in err
    assert "d.jsonl" in err and err.count("\n") == 1
    with pytest.raises(ModuleNotFoundError):  # --debug: the traceback
        main(["--debug", "distill", str(recipe)])


@pytest.mark.parametrize(
    "module,extra", [("peft", "lora"), ("matplotlib", "eval"), ("peft.tuners", "lora"), ("not_a_seerattn_extra", None)]
)
def test_missing_optional_package_in_any_command_names_its_extra(capsys, monkeypatch, module, extra):
    from seerattn import train
    from seerattn.cli import main

    monkeypatch.delenv("SEERATTN_DEBUG", raising=False)
    monkeypatch.setitem(sys.modules, module, None)

    def finetune(config, **kwargs):  # the import the fine-tuning trainer makes for a recipe with lora
        importlib.import_module(module)

    monkeypatch.setattr(train, "finetune", finetune)
    monkeypatch.setattr(train, "load_recipe", lambda *args, **kwargs: None)
    if extra is None:  # any other missing module is a bug: its traceback is shown
        with pytest.raises(ModuleNotFoundError):
            main(["finetune", "r.yaml"])
        return
    assert main(["finetune", "r.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seerattn finetune: error: ") and err.count("\n") == 1
    assert f"the optional package {module.split('.')[0]!r} is not installed (pip install 'seerattn[{extra}]')" in err
