"""Gates-only adapters: save -> load round trips, strict errors, the official-checkpoint converter."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from hf_models import GATE, HEAD_DIM, HQ, LAYERS, input_ids, make_config, make_model
from safetensors.torch import load_file, save_file

import seerattn
from seerattn import SparsityPolicy
from seerattn.gate import GateConfig
from seerattn.hf import (
    SeerConfig,
    apply_seer_attention,
    convert_official_checkpoint,
    from_pretrained,
    gate_modules,
    get_seer_state,
    load_gates,
    read_adapter_config,
    save_gates,
)
from seerattn.hf.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS

T = 150
POLICY = SparsityPolicy("density", 0.3, layer_overrides={1: SparsityPolicy("top_p", 0.9)})
OFFICIAL = "model.layers.{}.self_attn.attn_gate.mask_linear_{}.weight"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _randomise_gates(model, seed=0):
    """Stand-in for trained gates: weights unlike the identity init, so a failed load shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gate_modules(model).values():
            for p in gate.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture
def saved(tmp_path):
    """(untouched base model, adapter folder, logits of the model the adapter was saved from)."""
    base = make_model("llama")
    model = copy.deepcopy(base)
    apply_seer_attention(model, SeerConfig(gate=GATE, policy=POLICY, mask_heads="kv", base_model="tiny-llama"))
    _randomise_gates(model)
    path = save_gates(model, tmp_path / "adapter")
    return base, path, _logits(model, input_ids(T))


def _fresh(base, gate=GATE):
    model = copy.deepcopy(base)
    apply_seer_attention(model, SeerConfig(gate=gate, policy=POLICY))
    return model


# ------------------------------------------------------------------------------ round trips
def test_save_then_from_pretrained_gives_identical_logits(saved):
    base, path, want = saved
    model = from_pretrained(copy.deepcopy(base), path)
    assert torch.equal(_logits(model, input_ids(T)), want)
    cfg = get_seer_state(model).config
    assert cfg.policy == POLICY and cfg.mask_heads == "kv" and cfg.gate == GATE and cfg.base_model == "tiny-llama"
    # Overrides replace config fields: dense mode is the base model again.
    dense = from_pretrained(copy.deepcopy(base), path, mode="dense")
    assert torch.equal(_logits(dense, input_ids(T)), _logits(base, input_ids(T)))


def test_adapter_files_content(saved):
    _, path, _ = saved
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    assert meta["format_version"] == 1 and meta["library_version"] == seerattn.__version__
    assert meta["base_model"] == "tiny-llama" and meta["mode"] == "sparse"
    assert meta["model"] == {
        "model_type": "llama",
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HQ,
        "num_key_value_heads": 2,
        "head_dim": HEAD_DIM,
    }
    assert GateConfig.from_dict(meta["gate"]) == GATE and SparsityPolicy.from_dict(meta["policy"]) == POLICY
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    assert sorted(tensors) == [f"layers.{i}.k_proj" for i in range(LAYERS)]  # no q projection by default
    assert all(tuple(t.shape) == (HQ, 3 * HEAD_DIM, HEAD_DIM) for t in tensors.values())


def test_round_trip_with_q_projection_query_windows_and_path_base(tmp_path):
    gate = GateConfig(block_size=16, q_pooling=("avg", "max"), q_subblock=4)
    base = make_model("qwen3")
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    apply_seer_attention(model, SeerConfig(gate=gate, policy=SparsityPolicy("density", 0.3)))
    _randomise_gates(model, seed=1)
    save_gates(model, tmp_path / "adapter")
    assert sorted(load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))) == sorted(
        f"layers.{i}.{w}_proj" for i in range(LAYERS) for w in ("k", "q")
    )
    loaded = from_pretrained(str(tmp_path / "base"), tmp_path / "adapter")  # base loaded from a local folder
    loaded.eval()
    assert get_seer_state(loaded).config.gate == gate
    ids = input_ids(T)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


# ------------------------------------------------------------------------------ strict errors
def _expect_load_error(base, path, exc, match):
    model = _fresh(base)
    before = [g.k_proj.detach().clone() for g in gate_modules(model).values()]
    with pytest.raises(exc, match=match):
        load_gates(model, path)
    # Nothing was loaded partially.
    assert all(torch.equal(b, g.k_proj) for b, g in zip(before, gate_modules(model).values(), strict=True))


def test_missing_folder(saved, tmp_path):
    base, _, _ = saved
    with pytest.raises(FileNotFoundError, match="no seer_config.json"):
        from_pretrained(copy.deepcopy(base), tmp_path / "does-not-exist")


def test_missing_weights_file(saved):
    base, path, _ = saved
    (path / ADAPTER_WEIGHTS).unlink()
    _expect_load_error(base, path, FileNotFoundError, "no seer_gates.safetensors")


def test_corrupt_safetensors(saved):
    base, path, _ = saved
    (path / ADAPTER_WEIGHTS).write_bytes(b"\x00\x01garbage" * 50)
    _expect_load_error(base, path, ValueError, "not a readable safetensors file")


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", "not valid JSON"),
        ("42", "holds a JSON int"),
        ('{"format_version": 1, "model": {}}', r"lacks required fields \['gate', 'policy'\]"),
    ],
    ids=["syntax", "not-an-object", "missing-fields"],
)
def test_corrupt_json(saved, text, match):
    _, path, _ = saved
    (path / ADAPTER_CONFIG).write_text(text)
    with pytest.raises(ValueError, match=match):
        read_adapter_config(path)


def test_wrong_format_version(saved):
    base, path, _ = saved
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    meta["format_version"] = 2
    (path / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 2; this seerattn reads 1"):
        from_pretrained(copy.deepcopy(base), path)


def test_unknown_policy_field(saved):
    base, path, _ = saved
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    meta["policy"]["budget"] = 3
    (path / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown SparsityPolicy fields"):
        from_pretrained(copy.deepcopy(base), path)


def _rewrite_weights(path, edit):
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    edit(tensors)
    save_file(tensors, str(path / ADAPTER_WEIGHTS))


def test_missing_key(saved):
    base, path, _ = saved
    _rewrite_weights(path, lambda t: t.pop("layers.1.k_proj"))
    _expect_load_error(base, path, ValueError, r"missing keys \['layers.1.k_proj'\], unexpected keys \[\]")


def test_extra_key(saved):
    base, path, _ = saved
    _rewrite_weights(path, lambda t: t.update({"layers.2.k_proj": torch.zeros(1)}))
    _expect_load_error(base, path, ValueError, r"unexpected keys \['layers.2.k_proj'\]")


def test_wrong_shape(saved):
    base, path, _ = saved
    _rewrite_weights(path, lambda t: t.update({"layers.1.k_proj": torch.zeros(HQ, 2 * HEAD_DIM, HEAD_DIM)}))
    _expect_load_error(base, path, ValueError, r"layers.1.k_proj has shape \(4, 32, 16\), expected \(4, 48, 16\)")


def test_adapter_for_another_model_shape(saved):
    _, path, _ = saved
    other = make_model("llama", num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"another model shape.*num_key_value_heads': \(2, 4\)"):
        from_pretrained(other, path)
    with pytest.raises(ValueError, match=r"model_type': \('llama', 'qwen2'\)"):
        from_pretrained(make_model("qwen2"), path)


def test_gate_config_mismatch(saved):
    base, path, _ = saved
    model = _fresh(base, gate=GateConfig(block_size=32))
    with pytest.raises(ValueError, match="differs from the attached gates"):
        load_gates(model, path)


def test_load_into_unprepared_model(saved):
    base, path, _ = saved
    with pytest.raises(ValueError, match="no seer attention attached"):
        load_gates(copy.deepcopy(base), path)


# ------------------------------------------------------------------------------ official converter
def _official(with_q=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {OFFICIAL.format(i, "k"): torch.randn(HQ, 3 * HEAD_DIM, HEAD_DIM, generator=g) for i in range(LAYERS)}
    if with_q:
        sd.update({OFFICIAL.format(i, "q"): torch.randn(HQ, HEAD_DIM, HEAD_DIM, generator=g) for i in range(LAYERS)})
    return sd


@pytest.mark.parametrize("with_q", [False, True], ids=["k-only", "k-and-q"])
def test_convert_official_checkpoint_round_trip(tmp_path, with_q):
    sd = _official(with_q)
    torch.save(sd, tmp_path / "attn_gate_weights.pth")
    base = make_model("llama")
    out = convert_official_checkpoint(
        tmp_path / "attn_gate_weights.pth",
        tmp_path / "adapter",
        base.config,
        base_model="official/x",
        gate=GATE,
    )
    # The caller's config (here a live model's) is left as it was.
    assert base.config._attn_implementation == "sdpa"
    model = from_pretrained(copy.deepcopy(base), out)
    assert get_seer_state(model).config.base_model == "official/x"
    for i, g in gate_modules(model).items():
        assert torch.equal(g.k_proj.detach(), sd[OFFICIAL.format(i, "k")])
        if with_q:
            assert torch.equal(g.q_proj.detach(), sd[OFFICIAL.format(i, "q")])
        else:
            assert g.q_proj is None
    # Same logits as setting those weights by hand.
    manual = copy.deepcopy(base)
    apply_seer_attention(manual, SeerConfig(gate=GateConfig(block_size=16, q_projection=with_q or None)))
    with torch.no_grad():
        for i, g in gate_modules(manual).items():
            g.k_proj.copy_(sd[OFFICIAL.format(i, "k")])
            if with_q:
                g.q_proj.copy_(sd[OFFICIAL.format(i, "q")])
    assert torch.equal(_logits(model, input_ids(T)), _logits(manual, input_ids(T)))


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda sd: sd.update({"model.layers.0.self_attn.attn_gate.bias": torch.zeros(1)}),
            "keys not in the official",
        ),
        (lambda sd: sd.update({OFFICIAL.format(LAYERS, "k"): torch.zeros(1)}), "keys not in the official"),
        (
            lambda sd: sd.update({OFFICIAL.format(1, "k"): torch.zeros(HQ, HEAD_DIM, HEAD_DIM)}),
            r"has shape \(4, 16, 16\)",
        ),
        (lambda sd: sd.pop(OFFICIAL.format(1, "k")), "missing model.layers.1"),
        (
            lambda sd: sd.update({OFFICIAL.format(1, "q"): torch.zeros(HQ, HEAD_DIM, HEAD_DIM)}),
            "missing model.layers.0",
        ),
    ],
    ids=["unexpected-name", "layer-out-of-range", "wrong-shape", "missing-layer", "q-on-one-layer-only"],
)
def test_convert_errors(tmp_path, edit, match):
    sd = _official()
    edit(sd)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=match):
        convert_official_checkpoint(tmp_path / "w.pth", tmp_path / "adapter", make_config("llama"), gate=GATE)
    assert not (tmp_path / "adapter").exists()


def test_convert_unreadable_inputs(tmp_path):
    cfg = make_config("llama")
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_official_checkpoint(tmp_path / "none.pth", tmp_path / "a", cfg)
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="could not be read as a weights-only torch checkpoint"):
        convert_official_checkpoint(tmp_path / "junk.pth", tmp_path / "a", cfg)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="holds a Tensor, expected a state dict"):
        convert_official_checkpoint(tmp_path / "tensor.pth", tmp_path / "a", cfg)


# ------------------------------------------------------------------------------ all-or-nothing loading
def _snapshot(model) -> dict:
    """Everything a failed load must leave as it was: parameters and buffers bitwise, submodules, hooks,
    the attention implementation."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [name for name, _ in model.named_modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "impl": model.config._attn_implementation,
    }


def _assert_untouched(model, before: dict) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"]
    assert after["impl"] == before["impl"] and getattr(model, "_seer_state", None) is None
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())


def _pickle_as_safetensors(path):
    torch.save({"layers.0.k_proj": torch.zeros(1)}, path / ADAPTER_WEIGHTS)


def _edit_meta(path, edit):
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    edit(meta)
    (path / ADAPTER_CONFIG).write_text(json.dumps(meta))


LOAD_FAULTS = [
    (
        "wrong-shape",
        lambda p: _rewrite_weights(p, lambda t: t.update({"layers.1.k_proj": torch.zeros(HQ, 2 * HEAD_DIM, HEAD_DIM)})),
        r"layers.1.k_proj has shape \(4, 32, 16\), expected \(4, 48, 16\)",
    ),
    ("missing-key", lambda p: _rewrite_weights(p, lambda t: t.pop("layers.1.k_proj")), "missing keys"),
    ("extra-key", lambda p: _rewrite_weights(p, lambda t: t.update({"layers.9.k_proj": torch.zeros(1)})), "unexpected"),
    ("missing-file", lambda p: (p / ADAPTER_WEIGHTS).unlink(), "no seer_gates.safetensors"),
    (
        "corrupt-file",
        lambda p: (p / ADAPTER_WEIGHTS).write_bytes(b"\x00\x01garbage" * 50),
        "not a readable safetensors",
    ),
    ("pickle-renamed", _pickle_as_safetensors, "not a readable safetensors"),
    (
        "truncated-file",
        lambda p: (p / ADAPTER_WEIGHTS).write_bytes((p / ADAPTER_WEIGHTS).read_bytes()[:-7]),
        "safetensors",
    ),
    (
        "override-past-depth",
        lambda p: _edit_meta(p, lambda m: m["policy"]["layer_overrides"].update({"5": {"kind": "dense"}})),
        r"layer_overrides has layer 5 but the model has 2 layers \(0..1\)",
    ),
    ("policy-null", lambda p: _edit_meta(p, lambda m: m.update(policy=None)), "'policy' must be an object"),
    ("gate-invalid", lambda p: _edit_meta(p, lambda m: m["gate"].update(block_size=48)), "power of two"),
    ("mask-heads-invalid", lambda p: _edit_meta(p, lambda m: m.update(mask_heads="all")), "mask_heads"),
]


@pytest.mark.parametrize("fault,match", [f[1:] for f in LOAD_FAULTS], ids=[f[0] for f in LOAD_FAULTS])
def test_failed_from_pretrained_leaves_the_model_as_it_was(saved, fault, match):
    """A load that fails leaves the model bitwise as it was (no gates, hooks or mode left behind), the
    caller's logits are the base model's, and a retry with a good adapter works."""
    base, path, want = saved
    good = path.parent / "good"
    shutil.copytree(path, good)
    fault(path)
    model = copy.deepcopy(base)
    before = _snapshot(model)
    with pytest.raises(ValueError if fault is not LOAD_FAULTS[3][1] else FileNotFoundError, match=match):
        from_pretrained(model, path)
    _assert_untouched(model, before)
    assert torch.equal(_logits(model, input_ids(T)), _logits(base, input_ids(T)))
    assert torch.equal(_logits(from_pretrained(model, good), input_ids(T)), want)


def test_failed_load_gates_leaves_the_gates_as_they_were(saved):
    base, path, _ = saved
    model = _fresh(base)
    _randomise_gates(model, seed=5)
    _rewrite_weights(path, lambda t: t.update({"layers.1.k_proj": t["layers.1.k_proj"][:, :-1].contiguous()}))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="layers.1.k_proj has shape"):
        load_gates(model, path)
    after = _snapshot(model)
    assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"]
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())


def test_failed_from_pretrained_on_a_path_base_leaves_nothing(saved, tmp_path):
    base, path, _ = saved
    base.save_pretrained(tmp_path / "base")
    (path / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="no seer_gates.safetensors"):
        from_pretrained(str(tmp_path / "base"), path)


def test_unknown_override_is_named(saved):
    base, path, _ = saved
    model = copy.deepcopy(base)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"unknown SeerConfig field\(s\) \['polcy'\]; accepted: .*'policy'"):
        from_pretrained(model, path, polcy=SparsityPolicy("dense"))
    _assert_untouched(model, before)
