"""Gates-only adapters: save -> load round trips, strict errors, the official-checkpoint converter."""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hf_models import GATE, HEAD_DIM, HKV, HQ, LAYERS, input_ids, make_config, make_model
from safetensors.torch import load_file, save_file

import seerattn
from seerattn import SparsityPolicy
from seerattn.decode_policy import DecodePolicy
from seerattn.gate import DecodeGateConfig, GateConfig
from seerattn.hf import (
    DecodeConfig,
    SeerConfig,
    apply_seer_attention,
    convert_official_checkpoint,
    decode_gate_modules,
    from_pretrained,
    gate_modules,
    get_seer_state,
    load_gates,
    read_adapter_config,
    save_gates,
    write_adapter,
)
from seerattn.hf.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DECODE_PREFIX

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
    assert meta["format_version"] == 2 and meta["library_version"] == seerattn.__version__
    assert meta["base_model"] == "tiny-llama" and meta["prefill"]["mode"] == "sparse" and "decode" not in meta
    assert meta["model"] == {
        "model_type": "llama",
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HQ,
        "num_key_value_heads": 2,
        "head_dim": HEAD_DIM,
    }
    prefill = meta["prefill"]
    assert GateConfig.from_dict(prefill["gate"]) == GATE and SparsityPolicy.from_dict(prefill["policy"]) == POLICY
    assert prefill["mask_heads"] == "kv"
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
        ('{"format_version": 2, "model": {}}', "neither a 'prefill' nor a 'decode' section"),
        ('{"format_version": 2, "model": {}, "prefill": {"gate": {}}}', "'prefill' must be an object with 'gate' and"),
        ('{"format_version": 2, "model": {}, "decode": {"gate": {}, "policy": {"kind": "x"}}}', "DecodePolicy.kind"),
    ],
    ids=["syntax", "not-an-object", "missing-fields", "no-section", "prefill-fields", "decode-policy"],
)
def test_corrupt_json(saved, text, match):
    _, path, _ = saved
    (path / ADAPTER_CONFIG).write_text(text)
    with pytest.raises(ValueError, match=match):
        read_adapter_config(path)


def test_wrong_format_version(saved):
    base, path, _ = saved
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    meta["format_version"] = 3
    (path / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"format_version 3; this seerattn reads \[1, 2\]"):
        from_pretrained(copy.deepcopy(base), path)


def test_unknown_policy_field(saved):
    base, path, _ = saved
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    meta["prefill"]["policy"]["budget"] = 3
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
    with pytest.raises(ValueError, match=r"adapter gate config .* \(prefill\) differs from the attached prefill gates"):
        load_gates(model, path)


def test_load_into_unprepared_model(saved):
    base, path, _ = saved
    with pytest.raises(ValueError, match="no seer attention attached"):
        load_gates(copy.deepcopy(base), path)


# ------------------------------------------------------------------------------ official converter
BS_OFFICIAL = 16  # the tiny models' prompts span ~10 blocks of 16 tokens


def _official_config(gate_type="Qavg_Kmaxminavg", force_double=False, hidden=HEAD_DIM, **extra) -> dict:
    """The gate fields of an official SeerAttention ``config.json`` (plus the base model's shape, as there)."""
    return {
        "model_type": "llama",
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HQ,
        "num_key_value_heads": HKV,
        "seerattn_gate_type": gate_type,
        "seerattn_gate_block_size": BS_OFFICIAL,
        "seerattn_gate_hidden_size": hidden,
        "seerattn_gate_force_double": force_double,
        "seerattn_sparsity_method": "threshold",
        **extra,
    }


def _pools(gate_type: str) -> tuple[list[str], list[str]]:
    q, k = gate_type[1:].split("_K")
    split = lambda s: [s[i : i + 3] for i in range(0, len(s), 3)]  # noqa: E731
    return split(q), split(k)


def _official_weights(gate_type, force_double=False, seed=0, hkv=HKV) -> dict:
    """Random weights in the official layout: with a q weight (several Q poolings, or force_double) the k
    weight is per KV head, ``[Hkv, Ck*D, Dg]``; without one it is per query head, ``[Hq, Ck*D, Dg]``."""
    qp, kp = _pools(gate_type)
    has_q = len(qp) > 1 or force_double
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(LAYERS):
        sd[OFFICIAL.format(i, "k")] = torch.randn(hkv if has_q else HQ, len(kp) * HEAD_DIM, HEAD_DIM, generator=g) * 0.3
        if has_q:
            sd[OFFICIAL.format(i, "q")] = torch.randn(HQ, len(qp) * HEAD_DIM, HEAD_DIM, generator=g) * 0.3
    return sd


def _official_gate_logits(q, k, sd, layer, gate_type, force_double, theta, dtype):
    """The official prefill gate, computed independently from its description (not from its code).

    q: [B, T, Hq, D], k: [B, T, Hkv, D] pre-RoPE. Each block of ``BS_OFFICIAL`` tokens (the last one over the
    tokens it has) is pooled with every pooling the gate type names, concatenated on channels in the
    name's order. Q: projected per query head by ``mask_linear_q`` when the gate has it, else used as is.
    K: with a q weight, projected per KV head and then repeated over each GQA group's query heads;
    without, repeated to the query heads first and projected per query head. Both are rotated
    (rotate-half RoPE, base ``theta``) at each block's first-token position; scores are
    ``q . k / sqrt(Dg)`` over key blocks up to and including the diagonal. Returns [B, Hq, NB, NB]
    with -inf above the diagonal.
    """
    qp, kp = _pools(gate_type)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    nb = -(-t // BS_OFFICIAL)
    reduce = {"max": lambda x: x.amax(1), "min": lambda x: x.amin(1), "avg": lambda x: x.mean(1)}

    def pool(x, names):  # [B, T, H, D] -> [B, NB, H, C*D]
        blocks = [x[:, j * BS_OFFICIAL : (j + 1) * BS_OFFICIAL] for j in range(nb)]
        return torch.stack([torch.cat([reduce[n](blk) for n in names], -1) for blk in blocks], 1)

    q, k = q.to(dtype), k.to(dtype)
    kw = sd[OFFICIAL.format(layer, "k")].to(dtype)
    qw = sd.get(OFFICIAL.format(layer, "q"))
    qg = pool(q, qp)
    if qw is not None:
        qg = torch.einsum("bnhc,hcg->bnhg", qg, qw.to(dtype))
        kg = torch.einsum("bnhc,hcg->bnhg", pool(k, kp), kw).repeat_interleave(hq // hkv, dim=2)
    else:
        kg = torch.einsum("bnhc,hcg->bnhg", pool(k, kp).repeat_interleave(hq // hkv, dim=2), kw)
    dg = kg.shape[-1]
    pos = torch.arange(nb, dtype=dtype) * BS_OFFICIAL
    angle = pos[:, None] * (1.0 / theta ** (torch.arange(0, dg, 2, dtype=dtype) / dg))[None]
    cos, sin = torch.cat([angle.cos()] * 2, -1)[None, :, None], torch.cat([angle.sin()] * 2, -1)[None, :, None]

    def rope(x):
        x1, x2 = x[..., : dg // 2], x[..., dg // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    scores = torch.einsum("bihg,bjhg->bhij", rope(qg), rope(kg)) / math.sqrt(dg)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf"))


OFFICIAL_LAYOUTS = [
    # (gate type, force_double): every prefill layout with hidden size == head dim
    ("Qavg_Kmaxminavg", False),  # the default: no q weight, k per query head
    ("Qavg_Kmaxmin", False),  # two K poolings (failed from the CLI before)
    ("Qmax_Kmaxminavg", False),  # max-pooled Q used as is (became a Qavg gate before)
    ("Qmin_Kavg", False),
    ("Qavg_Kmaxminavg", True),  # force_double: q weight, k per KV head (refused before)
    ("Qmaxavg_Kmaxminavg", False),  # two Q poolings: q weight, k per KV head
    ("Qmaxminavg_Kmin", False),
]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "gate_type,force_double", OFFICIAL_LAYOUTS, ids=[f"{g}{'-fd' if f else ''}" for g, f in OFFICIAL_LAYOUTS]
)
def test_convert_every_official_layout_exactly(tmp_path, family, gate_type, force_double):
    """Converted gates give the official gate's logits (error vs an fp64 computation of the official gate
    within 2x that of the same computation in fp32) and the same block masks."""
    sd = _official_weights(gate_type, force_double, seed=3)
    torch.save(sd, tmp_path / "attn_gate_weights.pth")
    (tmp_path / "config.json").write_text(json.dumps(_official_config(gate_type, force_double, model_type=family)))
    base = make_model(family)
    out = convert_official_checkpoint(
        tmp_path / "attn_gate_weights.pth", tmp_path / "adapter", base.config, base_model="official/x"
    )
    assert base.config._attn_implementation == "sdpa"  # the caller's config (a live model's) is left as it was
    model = from_pretrained(copy.deepcopy(base), out, policy=SparsityPolicy("density", 0.3))
    state = get_seer_state(model)
    assert state.config.base_model == "official/x"
    assert state.config.gate.block_size == BS_OFFICIAL and list(state.config.gate.k_pooling) == _pools(gate_type)[1]
    state.capture = True
    ids = input_ids(T)
    _logits(model, ids)
    theta = base.config.rope_parameters["rope_theta"]
    for layer in range(LAYERS):
        q_pre, k_pre = state.captures[layer][:2]
        q4, k4 = q_pre.view(1, T, HQ, HEAD_DIM), k_pre.view(1, T, HKV, HEAD_DIM)
        from seerattn.hf import gate_logits

        ours = gate_logits(model, layer, q4.transpose(1, 2), k4.transpose(1, 2))
        want = _official_gate_logits(q4, k4, sd, layer, gate_type, force_double, theta, torch.float64)
        fp32 = _official_gate_logits(q4, k4, sd, layer, gate_type, force_double, theta, torch.float32)
        causal = torch.isfinite(want)
        assert torch.equal(torch.isfinite(ours), causal)
        err, ref_err = (ours.double() - want)[causal].abs().max(), (fp32.double() - want)[causal].abs().max()
        assert err <= 2 * ref_err + 1e-5, (err, ref_err)
        policy = SparsityPolicy("density", 0.3)
        m_ours = seerattn.mask_from_scores(ours.softmax(-1), policy, T, BS_OFFICIAL).to_dense()
        m_want = seerattn.mask_from_scores(want.softmax(-1).float(), policy, T, BS_OFFICIAL).to_dense()
        assert torch.equal(m_ours, m_want)


def test_convert_cli_reads_the_official_config_next_to_the_checkpoint(tmp_path, capsys):
    from seerattn.cli import main

    make_config("qwen2").save_pretrained(tmp_path / "base")
    src = tmp_path / "official"
    src.mkdir()
    sd = _official_weights("Qmax_Kmaxmin")
    torch.save(sd, src / "attn_gate_weights.pth")
    (src / "config.json").write_text(json.dumps(_official_config("Qmax_Kmaxmin", model_type="qwen2")))
    argv = ["convert", str(src / "attn_gate_weights.pth"), "--base-model", str(tmp_path / "base")]
    assert main([*argv, "-o", str(tmp_path / "adapter")]) == 0
    gate = GateConfig.from_dict(read_adapter_config(tmp_path / "adapter")["prefill"]["gate"])
    assert gate.q_pooling == ("max",) and gate.k_pooling == ("max", "min") and gate.q_projection is False
    (src / "config.json").unlink()
    assert main([*argv, "-o", str(tmp_path / "adapter2")]) == 2
    assert "official config" in capsys.readouterr().err and not (tmp_path / "adapter2").exists()


OFFICIAL_FAULTS = [
    ("decode-gate-type", {"seerattn_gate_type": "Kmaxminavg"}, None, "seerattn_gate_type 'Kmaxminavg'"),
    ("unknown-pooling", {"seerattn_gate_type": "Qavg_Kmaxmed"}, None, "seerattn_gate_type 'Qavg_Kmaxmed'"),
    ("non-official-order", {"seerattn_gate_type": "Qavgmax_Kmaxminavg"}, None, "seerattn_gate_type 'Qavgmax"),
    ("hidden-not-head-dim", {"seerattn_gate_hidden_size": 32}, None, "seerattn_gate_hidden_size 32"),
    ("block-size", {"seerattn_gate_block_size": 48}, None, "block_size"),
    ("force-double-str", {"seerattn_gate_force_double": "false"}, None, "seerattn_gate_force_double"),
    ("not-official", {"seerattn_gate_type": None}, None, "not an official SeerAttention gate config"),
    ("other-model", {"num_key_value_heads": 4}, None, "num_key_value_heads"),
    # the weights disagree with the config
    ("q-weight-unexpected", {}, lambda sd: sd.update(_official_weights("Qavg_Kmaxminavg", True)), "unexpected"),
    ("q-weight-missing", {"seerattn_gate_force_double": True}, lambda sd: None, "missing"),
    ("k-per-query-head-with-q", {"seerattn_gate_force_double": True}, "k-hq", r"expected \(2, 48, 16\)"),
    ("wrong-k-width", {"seerattn_gate_type": "Qavg_Kmaxmin"}, lambda sd: None, r"expected \(4, 32, 16\)"),
]


@pytest.mark.parametrize("fields,weights,match", [f[1:] for f in OFFICIAL_FAULTS], ids=[f[0] for f in OFFICIAL_FAULTS])
def test_convert_refuses_what_it_cannot_convert_exactly(tmp_path, fields, weights, match):
    cfg = {k: v for k, v in {**_official_config(), **fields}.items() if v is not None}
    sd = _official_weights("Qavg_Kmaxminavg")
    if weights == "k-hq":
        sd = _official_weights("Qavg_Kmaxminavg", True, hkv=HQ)
    elif weights is not None:
        weights(sd)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=match):
        convert_official_checkpoint(tmp_path / "w.pth", tmp_path / "adapter", make_config("llama"), official_config=cfg)
    assert not (tmp_path / "adapter").exists()


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
            "unexpected",
        ),
        (lambda sd: sd.update({OFFICIAL.format(0, "k"): sd[OFFICIAL.format(0, "k")].long()}), "floating-point"),
    ],
    ids=["unexpected-name", "layer-out-of-range", "wrong-shape", "missing-layer", "q-on-one-layer-only", "int-dtype"],
)
def test_convert_errors(tmp_path, edit, match):
    sd = _official_weights("Qavg_Kmaxminavg")
    edit(sd)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=match):
        convert_official_checkpoint(
            tmp_path / "w.pth", tmp_path / "adapter", make_config("llama"), official_config=_official_config()
        )
    assert not (tmp_path / "adapter").exists()


def test_convert_unreadable_inputs(tmp_path):
    cfg, official = make_config("llama"), _official_config()
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_official_checkpoint(tmp_path / "none.pth", tmp_path / "a", cfg, official_config=official)
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="could not be read as a weights-only torch checkpoint"):
        convert_official_checkpoint(tmp_path / "junk.pth", tmp_path / "a", cfg, official_config=official)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="holds a Tensor, expected a state dict"):
        convert_official_checkpoint(tmp_path / "tensor.pth", tmp_path / "a", cfg, official_config=official)
    torch.save(_official_weights("Qavg_Kmaxminavg"), tmp_path / "w.pth")
    with pytest.raises(FileNotFoundError, match=r"official config .*config.json not found"):
        convert_official_checkpoint(tmp_path / "w.pth", tmp_path / "a", cfg)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        convert_official_checkpoint(tmp_path / "w.pth", tmp_path / "a", cfg)


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
        lambda p: _edit_meta(p, lambda m: m["prefill"]["policy"]["layer_overrides"].update({"5": {"kind": "dense"}})),
        r"layer_overrides has layer 5 but the model has 2 layers \(0..1\)",
    ),
    ("policy-null", lambda p: _edit_meta(p, lambda m: m["prefill"].update(policy=None)), "'policy' must be an object"),
    ("gate-invalid", lambda p: _edit_meta(p, lambda m: m["prefill"]["gate"].update(block_size=48)), "power of two"),
    ("mask-heads-invalid", lambda p: _edit_meta(p, lambda m: m["prefill"].update(mask_heads="all")), "mask_heads"),
    ("unknown-field", lambda p: _edit_meta(p, lambda m: m.update(mask_heads="q")), r"unknown fields \['mask_heads'\]"),
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


# ------------------------------------------------------------------------------ prefill + decode sections
DECODE = DecodeConfig(DecodeGateConfig(block_size=16), DecodePolicy("budget", 48))


def _decode_keys():
    names = ("q_proj", "k_proj", "q_norm.weight", "k_norm.weight")
    return sorted(f"{DECODE_PREFIX}layers.{i}.{n}" for i in range(LAYERS) for n in names)


def _randomise_decode_gates(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in decode_gate_modules(model).values():
            for p in gate.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _params(gates: dict) -> list[torch.Tensor]:
    return [p.detach().clone() for _, g in sorted(gates.items()) for p in g.parameters()]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_format_1_adapters_keep_loading(saved, tmp_path):
    """A format-1 seer_config.json (top-level prefill fields) reads as a prefill section and loads the same gates."""
    base, path, want = saved
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    old = {k: meta[k] for k in ("library_version", "base_model", "model")}
    old.update(format_version=1, **meta["prefill"])
    (path / ADAPTER_CONFIG).write_text(json.dumps(old))
    read = read_adapter_config(path)
    assert read["prefill"] == meta["prefill"] and read["decode"] is None and read["format_version"] == 1
    model = from_pretrained(copy.deepcopy(base), path)
    assert torch.equal(_logits(model, input_ids(T)), want)
    # the committed testbed adapter (format 1) reads the same way
    testbed = read_adapter_config(Path(__file__).parents[1] / "testbed" / "gates")
    assert testbed["format_version"] == 1 and testbed["decode"] is None
    assert GateConfig.from_dict(testbed["prefill"]["gate"]).block_size == 64 and testbed["prefill"]["mode"] == "sparse"


@pytest.mark.parametrize("prefill", [False, True], ids=["decode-only", "prefill+decode"])
def test_decode_sections_round_trip(tmp_path, prefill):
    base = make_model("qwen2")
    model = copy.deepcopy(base)
    cfg = SeerConfig(gate=GATE if prefill else None, mode="sparse" if prefill else "dense", decode=DECODE)
    apply_seer_attention(model, replace(cfg, policy=POLICY) if prefill else cfg)
    _randomise_decode_gates(model)
    if prefill:
        _randomise_gates(model)
    save_gates(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert ("prefill" in meta) == prefill and meta["decode"] == DECODE.to_dict()
    assert meta["decode"] == {
        "gate": {
            "block_size": 16,
            "k_pooling": ["max", "min", "avg"],
            "gate_dim": None,
            "use_rope": True,
            "norm_eps": 1e-6,
        },
        "policy": {"kind": "budget", "value": 48, "max_blocks": None, "half_shift": False, "bound_slots": 0},
        "enabled": True,
    }
    # an adapter written before DecodePolicy.half_shift / bound_slots existed reads as False / 0; others round-trip
    older = {**meta["decode"], "policy": {"kind": "budget", "value": 48, "max_blocks": None}}
    assert DecodeConfig.from_dict(older) == DECODE
    for change in ({"half_shift": True}, {"bound_slots": 1}):
        other = replace(DECODE, policy=replace(DECODE.policy, **change))
        assert DecodeConfig.from_dict(json.loads(json.dumps(other.to_dict()))) == other
    keys = sorted(load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS)))
    want_keys = _decode_keys() + ([f"layers.{i}.k_proj" for i in range(LAYERS)] if prefill else [])
    assert keys == sorted(want_keys)

    loaded = from_pretrained(copy.deepcopy(base), tmp_path / "a")
    state = get_seer_state(loaded)
    assert state.config.decode == DECODE and (state.config.gate is not None) == prefill
    assert state.config.mode == ("sparse" if prefill else "dense")
    assert _same(_params(decode_gate_modules(loaded)), _params(decode_gate_modules(model)))
    assert _same(_params(gate_modules(loaded)), _params(gate_modules(model)))
    ids = input_ids(40)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        assert torch.equal(loaded.generate(ids, **kw), model.generate(ids, **kw))
    assert {s["path"] for s in state.stats.values()} == {"sparse-decode"}

    # decode=None leaves the decode gates off; an adapter without prefill gates cannot give them
    if prefill:
        only = get_seer_state(from_pretrained(copy.deepcopy(base), tmp_path / "a", decode=None))
        assert only.config.decode is None and not any(hasattr(a, "seer_decode_gate") for a in only._attn_modules)
    else:
        with pytest.raises(ValueError, match="has no prefill gates"):
            from_pretrained(copy.deepcopy(base), tmp_path / "a", gate=GATE, mode="sparse")

    # load_gates loads what the model has attached: here the decode gates of a decode-only model
    other = copy.deepcopy(base)
    apply_seer_attention(other, SeerConfig(gate=None, mode="dense", decode=DECODE))
    load_gates(other, tmp_path / "a")
    assert _same(_params(decode_gate_modules(other)), _params(decode_gate_modules(model)))


def test_write_adapter_from_gate_modules_and_section_errors(saved, tmp_path):
    """write_adapter (gates held outside a model, e.g. by the decode distillation) writes what save_gates writes."""
    base, path, _ = saved
    model = copy.deepcopy(base)
    apply_seer_attention(model, SeerConfig(gate=None, mode="dense", decode=DECODE, base_model="tiny"))
    _randomise_decode_gates(model)
    save_gates(model, tmp_path / "saved")
    gates = torch.nn.ModuleList(copy.deepcopy(g) for _, g in sorted(decode_gate_modules(model).items()))
    cfg = SeerConfig(gate=None, mode="dense", decode=DECODE, base_model="tiny")
    write_adapter(tmp_path / "written", base, cfg, decode_gates=gates)
    assert (tmp_path / "written" / ADAPTER_CONFIG).read_text() == (tmp_path / "saved" / ADAPTER_CONFIG).read_text()
    a, b = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("saved", "written"))
    assert sorted(a) == sorted(b) == _decode_keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="decode_gates missing"):
        write_adapter(tmp_path / "x", base, cfg)
    with pytest.raises(ValueError, match="must be 2 DecodeGate modules"):
        write_adapter(tmp_path / "x", base, cfg, decode_gates=gates[:1])
    # a prefill-only adapter has no decode gates to attach, and a prefill-only model takes its prefill gates only
    with pytest.raises(ValueError, match="has no decode gates"):
        from_pretrained(copy.deepcopy(base), path, decode=DECODE)
    with pytest.raises(ValueError, match="adapter .* has no decode gates, but the model has decode gates attached"):
        load_gates(model, path)


def test_merge_adapters_gives_one_adapter_with_both_gate_sets(saved, tmp_path, capsys):
    """A prefill adapter and a decode adapter of one model shape -> one adapter: both sections, both tensor sets
    as they were, and from_pretrained attaches both (sparse prefill then sparse decode in generate). The CLI does
    the same; inputs without the section asked for, other shapes and writing into an input are refused."""
    from seerattn.cli import main as cli
    from seerattn.hf import merge_adapters

    base, pre, _ = saved
    model = copy.deepcopy(base)
    apply_seer_attention(model, SeerConfig(gate=None, mode="dense", decode=DECODE))
    _randomise_decode_gates(model)
    dec = save_gates(model, tmp_path / "dec")
    out = merge_adapters(tmp_path / "both", prefill=pre, decode=dec)
    meta = read_adapter_config(out)
    assert meta["prefill"] == read_adapter_config(pre)["prefill"] and meta["decode"] == DECODE.to_dict()
    assert meta["base_model"] == "tiny-llama"
    got = load_file(str(out / ADAPTER_WEIGHTS))
    want = load_file(str(pre / ADAPTER_WEIGHTS)) | load_file(str(dec / ADAPTER_WEIGHTS))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)

    loaded = from_pretrained(copy.deepcopy(base), out)
    state = get_seer_state(loaded)
    assert state.config.mode == "sparse" and state.config.decode == DECODE
    assert _same(_params(decode_gate_modules(loaded)), _params(decode_gate_modules(model)))
    ids = input_ids(T)
    with torch.no_grad():
        loaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert {s["path"] for s in state.stats.values()} == {"sparse-decode"}

    assert cli(["merge", "--prefill", str(pre), "--decode", str(dec), "-o", str(tmp_path / "cli")]) == 0
    assert "wrote adapter" in capsys.readouterr().out
    assert (tmp_path / "cli" / ADAPTER_CONFIG).read_text() == (out / ADAPTER_CONFIG).read_text()
    with pytest.raises(ValueError, match="has no decode gates"):
        merge_adapters(tmp_path / "x", prefill=pre, decode=pre)
    with pytest.raises(ValueError, match="has no prefill gates"):
        merge_adapters(tmp_path / "x", prefill=dec, decode=dec)
    with pytest.raises(ValueError, match="not into an input"):
        merge_adapters(dec, prefill=pre, decode=dec)
    other = json.loads((dec / ADAPTER_CONFIG).read_text())
    other["model"]["num_hidden_layers"] += 1
    (dec / ADAPTER_CONFIG).write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different model shapes: {'num_hidden_layers'"):
        merge_adapters(tmp_path / "x", prefill=pre, decode=dec)
