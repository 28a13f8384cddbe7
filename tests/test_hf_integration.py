"""seerattn.hf on tiny Llama / Qwen2 / Qwen3 / Mistral models built in code (CPU, fp32, no downloads).

References: transformers' own ``sdpa`` attention (dense paths) and a deep copy of the model whose
attention applies the *recorded* per-layer token masks densely with materialised softmax
(``hf_models.masked_reference``), i.e. an implementation that shares no code with seerattn's
block-sparse path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import (
    FAMILY_NAMES,
    GATE,
    HEAD_DIM,
    HKV,
    HQ,
    LAYERS,
    family_module,
    input_ids,
    make_model,
    masked_reference,
)

import seerattn.hf.integration as integration
from seerattn import BlockMask, SparsityPolicy, attention_with_block_scores, mask_from_scores
from seerattn.block_mask import density_row_budget
from seerattn.gate import GateConfig
from seerattn.hf import (
    MaskRequest,
    SeerConfig,
    apply_seer_attention,
    gate_logits,
    gate_modules,
    get_seer_state,
    remove_seer_attention,
)

T = 150  # 9 full blocks of 16 + a partial block of 6 tokens
ATOL = 1e-5


@pytest.fixture
def recorded_masks(monkeypatch):
    """Records every BlockMask the seer attention function hands to block_sparse_attention (layer order)."""
    masks: list[BlockMask] = []
    real = integration.block_sparse_attention

    def spy(q, k, v, block_mask, **kwargs):
        masks.append(block_mask)
        return real(q, k, v, block_mask, **kwargs)

    monkeypatch.setattr(integration, "block_sparse_attention", spy)
    return masks


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def _seer(family, **cfg):
    """(model with seer attached, untouched sdpa copy, state)."""
    model = make_model(family)
    base = copy.deepcopy(model)
    state = apply_seer_attention(model, SeerConfig(gate=GATE, **cfg))
    return model, base, state


def _pre_rope(capture, b, t, hq, hkv):
    """Captured hook outputs ([B, T, H*D] or [B, T, H, D]) -> q_pre [B, Hq, T, D], k_pre [B, Hkv, T, D]."""
    q_pre, k_pre = capture[0], capture[1]
    return (
        q_pre.reshape(b, t, hq, HEAD_DIM).transpose(1, 2),
        k_pre.reshape(b, t, hkv, HEAD_DIM).transpose(1, 2),
    )


# ------------------------------------------------------------------------------ dense equivalence
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_all_kept_policy_matches_sdpa(family, recorded_masks):
    model, base, state = _seer(family, policy=SparsityPolicy("dense"), mode="sparse")
    ids = input_ids(T, b=2)
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), atol=ATOL, rtol=0)
    # The block-sparse path really ran, with every causal block kept.
    assert len(recorded_masks) == LAYERS
    assert all(s == {"path": "sparse", "density": 1.0, "token_density": 1.0} for s in state.stats.values())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_dense_mode_is_transformers_sdpa(family, recorded_masks):
    model, base, state = _seer(family, mode="dense")
    ids = input_ids(T)
    assert torch.equal(_logits(model, ids), _logits(base, ids))
    assert not recorded_masks and {s["path"] for s in state.stats.values()} == {"dense"}


# ------------------------------------------------------------------------------ sparse vs masked reference
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_density_policy_matches_masked_dense_reference(family, recorded_masks):
    policy = SparsityPolicy("density", 0.3)
    model, base, state = _seer(family, policy=policy, mode="sparse")
    state.capture = True
    ids = input_ids(T, b=2)
    got = _logits(model, ids)
    # the forward keeps the densities as tensors (no host sync per layer); reading stats makes floats
    assert all(isinstance(e["density"], torch.Tensor) for e in state._stats.values())
    assert len(recorded_masks) == LAYERS and sorted(state.stats) == list(range(LAYERS))
    assert all(type(e["density"]) is float and type(e["token_density"]) is float for e in state.stats.values())

    # The masks are the gate's: recompute them from the captured pre-RoPE q/k, the gate and the model's
    # rotary at each block's first token.
    nb = -(-T // GATE.block_size)
    starts = torch.arange(0, T, GATE.block_size).unsqueeze(0)
    forced_only = torch.eye(nb, dtype=torch.bool)
    forced_only[:, 0] = True
    for layer, gate in gate_modules(model).items():
        q_pre, k_pre = _pre_rope(state.captures[layer], 2, T, HQ, HKV)
        cos, sin = model.model.rotary_emb(q_pre, starts)
        probs = gate(q_pre, k_pre, cos, sin).softmax(-1)
        # The public helper computes the same gate scores.
        torch.testing.assert_close(gate_logits(model, layer, q_pre, k_pre).softmax(-1), probs, atol=0, rtol=0)
        want = mask_from_scores(probs, policy, T, GATE.block_size)
        mask = recorded_masks[layer]
        assert mask.num_heads == HQ and mask.seq_len == T
        assert torch.equal(mask.to_dense(), want.to_dense())
        # Non-trivial: the gate chose blocks beyond the forced sink + diagonal, differently per head.
        dense = mask.to_dense()
        assert (dense & ~forced_only).any()
        assert not all(torch.equal(dense[:, 0], dense[:, h]) for h in range(1, HQ))
        assert state.stats[layer]["path"] == "sparse"
        assert state.stats[layer]["density"] == pytest.approx(mask.density())
        assert 0.2 < state.stats[layer]["density"] < 0.5

    ref = masked_reference(base, {i: m.to_token_mask() for i, m in enumerate(recorded_masks)})
    torch.testing.assert_close(got, _logits(ref, ids), atol=ATOL, rtol=0)
    # ... and the masks matter: the sparse model is far from the dense one.
    assert (got - _logits(base, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_kv_mask_heads_share_one_mask_per_group(family, recorded_masks):
    policy = SparsityPolicy("density", 0.3)
    model, base, state = _seer(family, policy=policy, mask_heads="kv")
    state.capture = True
    ids = input_ids(T)
    got = _logits(model, ids)
    starts = torch.arange(0, T, GATE.block_size).unsqueeze(0)
    for layer, gate in gate_modules(model).items():
        mask = recorded_masks[layer]
        assert mask.num_heads == HKV
        q_pre, k_pre = _pre_rope(state.captures[layer], 1, T, HQ, HKV)
        probs = gate(q_pre, k_pre, *model.model.rotary_emb(q_pre, starts)).softmax(-1)
        group_mean = probs.view(1, HKV, HQ // HKV, *probs.shape[-2:]).mean(2)
        assert torch.equal(mask.to_dense(), mask_from_scores(group_mean, policy, T, GATE.block_size).to_dense())
    ref = masked_reference(base, {i: m.to_token_mask() for i, m in enumerate(recorded_masks)})
    torch.testing.assert_close(got, _logits(ref, ids), atol=ATOL, rtol=0)


def test_custom_mask_fn_matches_masked_reference(recorded_masks):
    """mode='custom': the caller's mask (here: sink + local window of 2 blocks) is what attention uses."""
    seen: list[MaskRequest] = []

    def local(req: MaskRequest) -> BlockMask:
        seen.append(req)
        nb = -(-req.seq_len // req.block_size)
        i = torch.arange(nb)
        keep = ((i[:, None] - i[None, :]).abs() <= 1) | (i[None, :] == 0)
        keep = keep & torch.ones(nb, nb, dtype=torch.bool).tril()
        return BlockMask.from_dense(keep.expand(req.q.shape[0], HQ, nb, nb).contiguous(), req.block_size, req.seq_len)

    model, base, state = _seer("mistral", mode="custom")
    state.mask_fn = local
    ids = input_ids(T)
    got = _logits(model, ids)
    assert [r.layer_idx for r in seen] == list(range(LAYERS))
    assert seen[0].block_size == GATE.block_size and seen[0].seq_len == T
    assert seen[0].scale == pytest.approx(HEAD_DIM**-0.5) and tuple(seen[0].k.shape) == (1, HKV, T, HEAD_DIM)
    ref = masked_reference(base, {i: m.to_token_mask() for i, m in enumerate(recorded_masks)})
    torch.testing.assert_close(got, _logits(ref, ids), atol=ATOL, rtol=0)
    assert {s["path"] for s in state.stats.values()} == {"custom"}


def test_layer_overrides_apply_per_layer(recorded_masks):
    policy = SparsityPolicy("density", 0.3, layer_overrides={1: SparsityPolicy("dense")})
    model, _, state = _seer("llama", policy=policy)
    _logits(model, input_ids(T))
    nb = -(-T // GATE.block_size)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert state.stats[0]["density"] < 0.5
    assert state.stats[1]["density"] == 1.0
    assert torch.equal(recorded_masks[1].to_dense(), causal.expand(1, HQ, nb, nb))
    assert state.mean_density() == pytest.approx((state.stats[0]["density"] + 1.0) / 2)


# ------------------------------------------------------------------------------ oracle / distill
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_oracle_mask_comes_from_ground_truth_at_policy_density(family, recorded_masks):
    policy = SparsityPolicy("density", 0.3)
    model, _, state = _seer(family, policy=policy, mode="oracle")
    state.capture = True
    _logits(model, input_ids(T))
    nb = -(-T // GATE.block_size)
    # Per row: max(budget, forced blocks) kept; forced = sink + diagonal (1 block on row 0).
    budget = density_row_budget(nb, 0.3)
    forced = torch.tensor([1] + [2] * (nb - 1))
    expected = torch.maximum(budget, forced).sum().item() / (nb * (nb + 1) / 2)
    for layer in range(LAYERS):
        assert state.stats[layer]["path"] == "oracle"
        assert state.stats[layer]["density"] == pytest.approx(expected, abs=1e-12)
        q, k = state.captures[layer][2], state.captures[layer][3]
        v = torch.zeros_like(k)
        _, _, gt = attention_with_block_scores(q, k, v, block_size=GATE.block_size, scale=HEAD_DIM**-0.5)
        want = mask_from_scores(gt, policy, T, GATE.block_size)
        assert torch.equal(recorded_masks[layer].to_dense(), want.to_dense())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_distill_keeps_outputs_and_trains_only_gates(family):
    model, base, state = _seer(family, mode="distill")
    ids = input_ids(T)
    out = model(ids).logits
    torch.testing.assert_close(out.detach(), _logits(base, ids), atol=ATOL, rtol=0)
    assert sorted(state.losses) == list(range(LAYERS)) and sorted(state.metrics) == list(range(LAYERS))
    for layer in range(LAYERS):
        loss = state.losses[layer]
        assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss) and loss.item() > 0
        m = state.metrics[layer]
        assert 0.0 <= m["block_recall"] <= 1.0 and 0.0 < m["mass_recall"] <= 1.0
        assert state.stats[layer]["path"] == "distill"
    total = state.total_gate_loss()
    assert total.item() == pytest.approx(sum(v.item() for v in state.losses.values()), rel=1e-6)
    total.backward()
    gate_params = {id(p) for g in gate_modules(model).values() for p in g.parameters()}
    for name, p in model.named_parameters():
        if id(p) in gate_params:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"base parameter {name} received a gradient"


# ------------------------------------------------------------------------------ pre-RoPE round trip
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 500000.0,
}


@pytest.mark.parametrize(
    "family,rope",
    [(f, None) for f in FAMILY_NAMES] + [("llama", YARN), ("llama", LLAMA3)],
    ids=[*FAMILY_NAMES, "llama-yarn", "llama-llama3"],
)
def test_pre_rope_round_trip(family, rope):
    model = make_model(family, rope=rope)
    rotary = model.model.rotary_emb
    if rope is not None:
        assert rotary.rope_type == rope["rope_type"]
        if rope["rope_type"] == "yarn":
            assert abs(rotary.attention_scaling - 1.0) > 0.05  # YaRN's attention factor is in play
    state = apply_seer_attention(model, SeerConfig(gate=GATE, mode="dense"))
    state.capture = True
    b, t = 2, 70
    _logits(model, input_ids(t, b=b))
    apply_rotary_pos_emb = family_module(family).apply_rotary_pos_emb
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(t).unsqueeze(0))
    assert sorted(state.captures) == list(range(LAYERS))
    for layer in range(LAYERS):
        q_pre, k_pre = _pre_rope(state.captures[layer], b, t, HQ, HKV)
        q_post, k_post = state.captures[layer][2], state.captures[layer][3]
        q_rot, k_rot = apply_rotary_pos_emb(q_pre, k_pre, cos, sin)
        torch.testing.assert_close(q_rot, q_post, atol=1e-6, rtol=0)
        torch.testing.assert_close(k_rot, k_post, atol=1e-6, rtol=0)
    if family == "qwen3":  # q/k-norm families: the capture is after the norm, not the projection
        attn = model.model.layers[0].self_attn
        x = torch.randn(1, 3, 64)
        raw = attn.q_proj(x).view(1, 3, HQ, HEAD_DIM)
        assert not torch.allclose(attn.q_norm(raw), raw)


def test_query_window_gate_gets_the_models_rope_at_window_starts():
    # A q_subblock gate's queries are rotated at their own windows' first positions, keys at block
    # starts, both with the model's rotary embedding (YaRN here): gate_logits equals the gate called
    # with tables built by hand from model.model.rotary_emb; the sparse forward runs on its mask.
    model = make_model("llama", rope=YARN)
    gate_cfg = GateConfig(block_size=16, q_subblock=4, q_pooling=("avg", "max"))
    state = apply_seer_attention(model, SeerConfig(gate=gate_cfg, mode="dense"))
    state.capture = True
    b, t = 1, 70
    _logits(model, input_ids(t, b=b))
    q_pre, k_pre = _pre_rope(state.captures[1], b, t, HQ, HKV)
    cos, sin = model.model.rotary_emb(q_pre, torch.arange(0, t, 4).unsqueeze(0))
    want = gate_modules(model)[1](q_pre, k_pre, cos, sin)
    assert want.shape == (b, HQ, 5, 5)
    torch.testing.assert_close(gate_logits(model, 1, q_pre, k_pre), want, atol=0, rtol=0)
    state.capture = False
    state.set(mode="sparse", policy=SparsityPolicy("density", 0.5))
    out = _logits(model, input_ids(t, b=b))
    assert torch.isfinite(out).all() and all(s["path"] == "sparse" for s in state.stats.values())


def test_window_rope_table_is_computed_once_per_forward_and_follows_the_positions():
    """The prefill gate's RoPE table at window starts is the same in every layer of a forward: computed for the
    first and reused (one rotary call a forward, not one a layer); new position_ids, or the same tensor changed
    in place, compute it again, and the logits equal those of a forward that starts from an empty cache."""
    model = make_model("llama", rope=YARN)
    gate_cfg = GateConfig(block_size=16, q_subblock=4)
    state = apply_seer_attention(model, SeerConfig(gate=gate_cfg, mode="sparse", policy=SparsityPolicy("density", 0.5)))
    assert model.config.num_hidden_layers >= 2
    calls = []
    rotary = state._rotary

    def counting(x, positions):
        calls.append(positions.shape)
        return rotary(x, positions)

    state._rotary = counting
    t = 70
    ids = input_ids(t, b=2)
    _logits(model, ids)
    assert calls == [(1, 18)]  # one table of the 18 window starts ([1, T] positions), for every layer
    _logits(model, ids)
    assert len(calls) == 2  # a new forward hands new position_ids
    pos = torch.arange(3, 3 + t).unsqueeze(0).expand(2, t).clone()
    first = _logits(model, ids, position_ids=pos)
    pos.add_(5)  # the same tensor, other positions: its version changed
    moved = _logits(model, ids, position_ids=pos)
    assert len(calls) == 4 and not torch.equal(first, moved)
    state._window_table = None
    torch.testing.assert_close(_logits(model, ids, position_ids=pos.clone()), moved, atol=0, rtol=0)
    assert len(calls) == 5


# ------------------------------------------------------------------------------ generate
def test_generate_sparse_greedy_and_decode_path():
    model, base, state = _seer("qwen2", policy=SparsityPolicy("dense"))
    prompt = input_ids(40)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
        want = base.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    assert out.shape == (1, 44) and torch.equal(out, want)  # all-kept sparse prefill + dense decode == sdpa
    assert {s["path"] for s in state.stats.values()} == {"dense-decode"}

    state.set(policy=SparsityPolicy("density", 0.3))
    state.reset()
    with torch.no_grad():
        # an explicit all-ones mask: generate would otherwise read token 0 (= pad_token_id) as padding
        out = model.generate(input_ids(70), attention_mask=torch.ones(1, 70, dtype=torch.long), **kw)
    assert out.shape == (1, 74) and torch.equal(out[:, :70], input_ids(70))
    assert sorted(state.stats) == list(range(LAYERS))
    assert {s["path"] for s in state.stats.values()} == {"dense-decode"}
    # Without it, a prompt containing the pad token gets an inferred padding mask: a clear error that
    # says what to pass.
    prompt = input_ids(70)
    prompt[0, 10] = 0
    with pytest.raises(ValueError, match=r"pass attention_mask=torch.ones_like\(input_ids\)"), torch.no_grad():
        model.generate(prompt, **kw)


# ------------------------------------------------------------------------------ remove / apply
def test_remove_restores_bit_for_bit():
    model = make_model("qwen3")
    ids = input_ids(T)
    before = _logits(model, ids)
    keys = list(model.state_dict())
    state = apply_seer_attention(model, SeerConfig(gate=GATE, policy=SparsityPolicy("density", 0.3)))
    assert any(k.endswith("seer_gate.k_proj") for k in model.state_dict())
    assert not torch.equal(_logits(model, ids), before)
    with pytest.raises(ValueError, match="already attached"):
        apply_seer_attention(model, SeerConfig(gate=GATE))
    remove_seer_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert list(model.state_dict()) == keys
    assert all(not layer.self_attn.q_norm._forward_hooks for layer in model.model.layers)
    assert torch.equal(_logits(model, ids), before)
    with pytest.raises(ValueError, match="no seer attention attached"):
        get_seer_state(model)
    with pytest.raises(ValueError, match="no seer attention attached"):
        remove_seer_attention(model)
    del state


# ------------------------------------------------------------------------------ bad inputs
def test_unknown_family_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: \['llama', 'mistral'"):
        apply_seer_attention(model, SeerConfig(gate=GATE))


@pytest.mark.parametrize("mode", ["distill", "finetune"])
def test_padded_attention_mask_is_refused_in_training_modes(mode):
    # The sparse prefill modes take padded batches (tests/test_hf_padding.py); the training modes do not.
    model, _, _ = _seer("llama", mode=mode)
    ids = input_ids(40, b=2)
    am = torch.ones(2, 40, dtype=torch.long)
    am[1, :5] = 0  # left padding
    with pytest.raises(ValueError, match=f"mode '{mode}' supports causal prefill without padding or packing only"):
        _logits(model, ids, attention_mask=am)
    # An all-ones mask is plain causal prefill and is accepted.
    _logits(model, ids, attention_mask=torch.ones(2, 40, dtype=torch.long))


def test_sliding_window_shorter_than_prompt_is_refused():
    model = make_model("mistral", sliding_window=32)
    apply_seer_attention(model, SeerConfig(gate=GATE))
    with pytest.raises(ValueError, match="layer 0 uses a sliding window of 32 tokens but the prompt has 100"):
        _logits(model, input_ids(100))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_sliding_window_is_checked_per_layer_type(family):
    # Qwen: layers below max_window_layers are full attention; only the sliding ones are refused.
    model = make_model(family, sliding_window=32, use_sliding_window=True, max_window_layers=1)
    assert model.config.layer_types == ["full_attention"] + ["sliding_attention"] * (LAYERS - 1)
    apply_seer_attention(model, SeerConfig(gate=GATE))
    with pytest.raises(ValueError, match="layer 1 uses a sliding window of 32 tokens"):
        _logits(model, input_ids(100))
    # Every layer full attention (window configured but not used): the sparse path runs.
    model = make_model(family, sliding_window=32, use_sliding_window=False)
    state = apply_seer_attention(model, SeerConfig(gate=GATE))
    out = _logits(model, input_ids(100))
    assert torch.isfinite(out).all() and all(s["path"] == "sparse" for s in state.stats.values())


def test_state_and_config_errors():
    model, _, state = _seer("llama", mode="custom")
    with pytest.raises(RuntimeError, match="no statistics"):
        state.mean_density()
    with pytest.raises(RuntimeError, match="no gate loss"):
        state.total_gate_loss()
    with pytest.raises(RuntimeError, match="needs SeerState.mask_fn"):
        _logits(model, input_ids(40))
    state.set(mode="sparse")
    model.train()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids(40))
    with pytest.raises(ValueError, match="mode must be one of"):
        state.set(mode="fast")
    for kwargs, match in (
        ({"mask_heads": "group"}, "mask_heads"),
        ({"skip_first_rows": 1.0}, "skip_first_rows"),
        ({"metric_density": 0.0}, "metric_density"),
    ):
        with pytest.raises(ValueError, match=match):
            SeerConfig(**kwargs)
    with pytest.raises(TypeError, match="GateConfig"):
        SeerConfig(gate={"block_size": 16})
    with pytest.raises(ValueError, match="must equal the head dim"):
        apply_seer_attention(make_model("llama"), SeerConfig(gate=GateConfig(block_size=16, gate_dim=8)))


def test_gate_logits_rejects_a_bad_layer():
    model = make_model("llama")
    apply_seer_attention(model, SeerConfig(gate=GATE))
    q, k = torch.randn(1, HQ, 32, HEAD_DIM), torch.randn(1, HKV, 32, HEAD_DIM)
    with pytest.raises(ValueError, match="layer must be in"):
        gate_logits(model, LAYERS, q, k)


# ------------------------------------------------------------------------------ output layout
# The interpreter evaluates both branches of tl.where, so inf - inf in a discarded branch warns.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("mode", ["sparse", "distill"])
def test_triton_output_reaches_o_proj_without_a_copy(mode, monkeypatch):
    """The Triton kernels write [B, T, Hq, D] memory, so the seer attention function's
    ``out.transpose(1, 2).contiguous()`` and the model's reshape are views: o_proj reads the kernel's
    own output buffer (SDPA's flash backends pay no copy there either)."""
    import os

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the Triton impl runs here under the interpreter only (CPU tensors)")
    pytest.importorskip("triton")
    model, _, _ = _seer("llama", policy=SparsityPolicy("density", 0.3), mode=mode, impl="triton")
    op = "block_sparse_attention" if mode == "sparse" else "attention_with_block_scores"
    kernel_outs, o_proj_ins = [], []
    real = getattr(integration, op)

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        kernel_outs.append(res[0] if isinstance(res, tuple) else res)
        return res

    monkeypatch.setattr(integration, op, spy)
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_pre_hook(lambda _, args: o_proj_ins.append(args[0]))
    _logits(model, input_ids(40))
    assert len(kernel_outs) == len(o_proj_ins) == LAYERS
    for out, o_in in zip(kernel_outs, o_proj_ins, strict=True):
        assert out.transpose(1, 2).is_contiguous()
        assert o_in.data_ptr() == out.data_ptr() and o_in.numel() == out.numel()


# ------------------------------------------------------------------------------ gradients
# The interpreter evaluates both branches of tl.where, so inf - inf in a discarded branch warns.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_sparse_mode_gradients_reach_the_model_for_every_impl():
    """Sparse mode on a trainable model: gradients flow through block_sparse_attention to q_proj,
    equal for the reference and the Triton kernel (interpreter on CPU) on the same gate masks."""
    import os

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the Triton impl runs here under the interpreter only (CPU tensors)")
    pytest.importorskip("triton")
    model, _, state = _seer("llama", policy=SparsityPolicy("density", 0.3), mode="sparse")
    ids = input_ids(70)  # 4 blocks of 16 and a partial one: enough for a sparse mask, quick in the interpreter
    grads = {}
    for impl in ("reference", "triton"):
        state.set(impl=impl)
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        grads[impl] = [layer.self_attn.q_proj.weight.grad for layer in model.model.layers]
    for ref, got in zip(grads["reference"], grads["triton"], strict=True):
        assert ref is not None and got is not None and ref.abs().sum() > 0
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4
