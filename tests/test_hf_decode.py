"""Sparse decode through seerattn.hf on tiny models (CPU, fp32, reference ops, no downloads).

References: transformers' own ``sdpa`` generate (a budget that covers the cache must give the same tokens
and logits), a token-masked dense attention written here from the recorded block selections (a small
budget), and step-by-step generate for the teacher-forced ``decode_eval`` mode.
"""

from __future__ import annotations

import copy
import gc
import os
import weakref

import pytest
import torch
from hf_models import GATE, HEAD_DIM, HKV, HQ, LAYERS, input_ids, make_model

import seerattn.hf.integration as integration
from seerattn import SparsityPolicy
from seerattn.decode_policy import DecodePolicy
from seerattn.gate import DecodeGateConfig
from seerattn.hf import (
    DecodeConfig,
    DecodeRequest,
    SeerConfig,
    apply_seer_attention,
    decode_gate_modules,
    get_seer_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")

BS = 16  # decode block size: a 40-token prompt + 30 new tokens span 5 blocks
DECODE = DecodeConfig(DecodeGateConfig(block_size=BS), DecodePolicy("budget", 48))  # K = 3 blocks
WHOLE = DecodePolicy("budget", 512)  # more blocks than any cache here: dense
PROMPT, NEW = 40, 30


@pytest.fixture
def decode_calls(monkeypatch):
    """Every call of the decode kernel: (q, k_cache, v_cache, cache_seqlens, block_indices, block_size, out)."""
    calls = []
    real = integration.sparse_decode_attention

    def spy(q, k, v, seqlens, idx, block_size, **kwargs):
        out = real(q, k, v, seqlens, idx, block_size, **kwargs)
        calls.append((q, k.clone(), v.clone(), seqlens.clone(), idx.clone(), block_size, out))
        return out

    monkeypatch.setattr(integration, "sparse_decode_attention", spy)
    return calls


@pytest.fixture
def prefill_calls(monkeypatch):
    calls = []
    real = integration.block_sparse_attention

    def spy(q, k, v, block_mask, **kwargs):
        calls.append(q.shape[2])
        return real(q, k, v, block_mask, **kwargs)

    monkeypatch.setattr(integration, "block_sparse_attention", spy)
    return calls


def _randomise_decode_gates(model, seed=0):
    """Trained-looking decode gates: selections that differ from the identity init's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in decode_gate_modules(model).values():
            gate.q_proj.add_(torch.randn(gate.q_proj.shape, generator=g) * 0.3)
            gate.k_proj.add_(torch.randn(gate.k_proj.shape, generator=g) * 0.3)


def _prepared(family="llama", mode="dense", decode=DECODE, **cfg):
    model = make_model(family)
    base = copy.deepcopy(model)
    state = apply_seer_attention(model, SeerConfig(gate=GATE, mode=mode, decode=decode, **cfg))
    _randomise_decode_gates(model)
    return model, base, state


def _generate(model, ids, cache=None, new=NEW):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if cache is not None:
        kw["cache_implementation"] = cache
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), output_logits=True, return_dict_in_generate=True, **kw
        )
    return out.sequences, torch.stack(out.logits, 1)  # [B, T + new], [B, new, V]


def _masked_decode_reference(q, k, v, seqlens, idx, block_size):
    """Token-masked dense attention of one query per sequence: q [B, Hq, D], k/v [B, Hkv, T, D], idx [B, Hkv, K]."""
    b, hq, d = q.shape
    t = k.shape[2]
    g = hq // k.shape[1]
    keep = torch.zeros(b, k.shape[1], t, dtype=torch.bool)
    for bi in range(b):
        for h in range(k.shape[1]):
            for j in idx[bi, h].tolist():
                if j >= 0:
                    keep[bi, h, j * block_size : (j + 1) * block_size] = True
    keep &= torch.arange(t) < seqlens.view(b, 1, 1)
    s = torch.einsum("bhd,bhtd->bht", q.double(), k.repeat_interleave(g, 1).double()) / d**0.5
    p = s.masked_fill(~keep.repeat_interleave(g, 1), float("-inf")).softmax(-1)
    return torch.einsum("bht,bhtd->bhd", p, v.repeat_interleave(g, 1).double()).float()


# ------------------------------------------------------------------------------ (a) whole-cache budget == dense
@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_budget_covering_the_cache_equals_dense_decode(family, cache, decode_calls):
    model, base, state = _prepared(family, decode=DecodeConfig(DECODE.gate, WHOLE))
    ids = input_ids(PROMPT, b=2)
    seq, logits = _generate(model, ids, cache)
    want_seq, want_logits = _generate(base, ids, cache)
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(logits, want_logits, atol=2e-5, rtol=1e-5)
    assert len(decode_calls) == LAYERS * (NEW - 1)  # every step after the prefill, every layer
    assert {s["path"] for s in state.stats.values()} == {"sparse-decode"}
    assert all(s["density"] == pytest.approx(1.0) for s in state.stats.values())
    # the cache tensors the kernel reads: a StaticCache's capacity, a DynamicCache's current length
    assert decode_calls[0][1].shape[2] == (PROMPT + NEW - 1 if cache else PROMPT + 1)


# ------------------------------------------------------------------------------ (b) small budget == masked reference
@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_small_budget_step_equals_token_masked_reference(cache, decode_calls):
    model, base, state = _prepared("qwen2")
    seq, logits = _generate(model, input_ids(PROMPT, b=2, seed=5), cache)
    assert len(decode_calls) == LAYERS * (NEW - 1)
    sparse_steps = 0
    for step, (q, k, v, seqlens, idx, bs, out) in enumerate(decode_calls):
        length = PROMPT + 1 + step // LAYERS
        assert bs == BS and seqlens.tolist() == [length, length] and idx.shape == (2, HKV, 3)
        cur = (length - 1) // BS
        for row in idx.reshape(-1, 3).tolist():  # first and current block always kept, no repeats
            kept = [j for j in row if j >= 0]
            assert 0 in kept and cur in kept and len(set(kept)) == len(kept) == min(3, cur + 1)
        sparse_steps += cur + 1 > 3
        torch.testing.assert_close(out, _masked_decode_reference(q, k, v, seqlens, idx, bs), atol=1e-5, rtol=1e-5)
    assert sparse_steps > 0
    # the densities the state reports: kept / visible keys
    last = decode_calls[-1]
    kept = sum(min(BS, int(last[3][0]) - j * BS) for j in last[4][0, 0].tolist() if j >= 0)
    assert state.stats[LAYERS - 1]["density"] == pytest.approx(kept / int(last[3][0]))
    assert 0 < state.mean_density() < 1.0
    # a small budget changes the logits (the test can fail)
    _, dense_logits = _generate(base, input_ids(PROMPT, b=2, seed=5), cache)
    assert not torch.allclose(logits, dense_logits, atol=1e-3)


def test_static_and_dynamic_caches_select_the_same_blocks(decode_calls):
    model, _, _ = _prepared("mistral")
    ids = input_ids(PROMPT)
    dyn = _generate(model, ids)
    dyn_idx = [c[4] for c in decode_calls]
    decode_calls.clear()
    sta = _generate(model, ids, "static")
    assert torch.equal(dyn[0], sta[0]) and len(dyn_idx) == len(decode_calls)
    # the same blocks (in any order: the first and the current block tie, and the static list is wider)
    assert all(torch.equal(a.sort(-1).values, c[4].sort(-1).values) for a, c in zip(dyn_idx, decode_calls, strict=True))
    torch.testing.assert_close(dyn[1], sta[1], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ (d) switches
@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_prefill_and_decode_switch_independently(cache, decode_calls, prefill_calls, monkeypatch):
    model, base, state = _prepared("llama", mode="sparse", policy=SparsityPolicy("density", 0.5))
    ids = input_ids(PROMPT)
    starts = []  # "is this the cache's first forward?" (a device read for a StaticCache): at prefills only
    real_start = integration._cache_start
    monkeypatch.setattr(integration, "_cache_start", lambda *a: starts.append(a[2]) or real_start(*a))
    runs = {}
    for name, mode, enabled in (("both", "sparse", True), ("prefill", "sparse", False), ("decode", "dense", True)):
        state.set(mode=mode)
        state.set_decode(enabled=enabled)
        decode_calls.clear()
        prefill_calls.clear()
        starts.clear()
        runs[name] = _generate(model, ids, cache)
        assert prefill_calls == ([PROMPT] * LAYERS if mode == "sparse" else [])  # StaticCache too: sparse prefill
        assert starts == ([PROMPT] * LAYERS if cache else [])  # DynamicCache: Tk == Tq tells, no question
        assert len(decode_calls) == (LAYERS * (NEW - 1) if enabled else 0)
        paths = {s["path"] for s in state.stats.values()}
        assert paths == ({"sparse-decode"} if enabled else {"dense-decode"})
    # prefill sparse only: the first token differs from dense in general, decode-only keeps the dense first token
    dense = _generate(base, ids, cache)
    torch.testing.assert_close(runs["decode"][1][:, 0], dense[1][:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runs["prefill"][1][:, 0], runs["both"][1][:, 0], atol=0, rtol=0)
    # switching both off gives transformers' generate
    state.set(mode="dense")
    state.set_decode(enabled=False)
    off = _generate(model, ids, cache)
    assert torch.equal(off[0], dense[0])
    torch.testing.assert_close(off[1], dense[1], atol=1e-5, rtol=1e-5)


def test_set_refuses_to_change_attached_gates():
    _, _, state = _prepared()
    with pytest.raises(ValueError, match="cannot attach, remove or change the decode gates"):
        state.set(decode=None)
    with pytest.raises(ValueError, match="cannot attach, remove or change the decode gates"):
        state.set(decode=DecodeConfig(DecodeGateConfig(block_size=32)))
    with pytest.raises(ValueError, match="cannot change the attached prefill gates"):
        state.set(gate=None)
    state.set_decode(policy=DecodePolicy("top_p", 0.9))
    assert state.config.decode.policy.kind == "top_p"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gate=None, mode="sparse", decode=DECODE), "needs the prefill gate"),
        (dict(gate=None, decode=None, mode="dense"), "neither"),
        (dict(mode="decode_eval"), "needs decode=DecodeConfig"),
        (dict(mode="decode_eval", decode=DECODE), "decode_start"),
        (dict(decode_start=-1, decode=DECODE), "decode_start must be an int >= 0"),
        (dict(decode="budget"), "must be a DecodeConfig"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SeerConfig(**kwargs)


def test_decode_config_validation():
    with pytest.raises(ValueError, match="needs >= 32 tokens"):
        DecodeConfig(DecodeGateConfig(block_size=16), DecodePolicy("budget", 16))
    with pytest.raises(ValueError, match="unknown DecodePolicy fields"):
        DecodeConfig.from_dict({"gate": {}, "policy": {"kind": "budget", "tokens": 3}})
    with pytest.raises(TypeError, match="enabled must be True or False"):
        DecodeConfig(enabled=1)


# ------------------------------------------------------------------------------ what sparse decode refuses
def _left_padded(lens, t, seed=5):
    """input_ids [B, T] and attention_mask [B, T]: row r's lens[r] real tokens at its end (left padding)."""
    ids = input_ids(t, b=len(lens), seed=seed)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lens):
        mask[r, t - n :] = 1
    return ids, mask


def _generate_padded(model, ids, mask, cache=None, new=NEW, **kw):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)
    if cache is not None:
        kw["cache_implementation"] = cache
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def _observed(state):
    """Set a decode observer; returns the list it fills with (layer, blocks sorted per list, cache_seqlens, starts)."""
    seen = []

    def observe(sel):
        blocks = torch.where(sel.blocks < 0, 1 << 30, sel.blocks).sort(-1).values  # kept blocks ascending, pad last
        starts = None if sel.cache_starts is None else sel.cache_starts.clone()
        seen.append((sel.layer_idx, blocks, sel.cache_seqlens.clone(), starts))

    state.decode_observer = observe
    return seen


def _check_each_prompt_alone(model, state, ids, mask, lens, seq, logits, seen, cache=None):
    """Each left-padded row of a padded generate against its prompt generated alone: the same tokens, close
    logits, and at every decode step and layer the same blocks (counted from its first token) and length."""
    t = ids.shape[1]
    steps = len(seen)
    assert steps == LAYERS * (logits.shape[1] - 1)
    assert all(torch.equal(s[3], torch.tensor([t - n for n in lens], dtype=torch.int32)) for s in seen)
    for r, n in enumerate(lens):
        seen_alone = _observed(state)
        prompt = ids[r : r + 1, t - n :]
        want_seq, want_logits = _generate_padded(model, prompt, torch.ones_like(prompt), cache, new=logits.shape[1])
        assert torch.equal(seq[r : r + 1, t - n :], want_seq), f"row {r}"
        torch.testing.assert_close(logits[r : r + 1], want_logits, atol=2e-5, rtol=1e-5)
        assert len(seen_alone) == steps
        for (layer, blocks, lens_, _), (layer_a, blocks_a, lens_a, starts_a) in zip(seen, seen_alone, strict=True):
            assert layer == layer_a and starts_a is None
            assert torch.equal(lens_[r : r + 1], lens_a)
            assert torch.equal(blocks[r : r + 1], blocks_a), f"row {r} layer {layer}"


@pytest.mark.parametrize("policy", [None, "half_shift", "bound"], ids=["blocks", "half-shift", "bound"])
@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_left_padded_generate_equals_each_prompt_alone(cache, policy, decode_calls):
    """generate() on left-padded prompts of 70, 45 and 12 tokens (starts 0, 25 and 58: on a block boundary's
    other side, mid-block) with a 3-block budget: every sequence gets the tokens, logits and per-step block
    selections it gets alone; the kernel is handed each sequence's start. With ``half_shift`` the windows' cache
    counts from each sequence's start too, with ``bound_slots`` the blocks' key bounds."""
    model, _, state = _prepared("qwen2")
    if policy == "half_shift":
        state.set_decode(policy=DecodePolicy("budget", 48, half_shift=True))
    if policy == "bound":
        state.set_decode(policy=DecodePolicy("budget", 48, bound_slots=1))
    lens, t = (70, 45, 12), 70
    ids, mask = _left_padded(lens, t)
    seen = _observed(state)
    seq, logits = _generate_padded(model, ids, mask, cache)
    assert {s["path"] for s in state.stats.values()} == {"sparse-decode"}
    assert all(c[3].tolist() == [70 + i // LAYERS + 1 - (t - n) for n in lens] for i, c in enumerate(decode_calls))
    assert all((((s[2].long() - 1) // BS + 1)[:2] > 3).all() for s in seen[-LAYERS:])  # more blocks than K = 3
    _check_each_prompt_alone(model, state, ids, mask, lens, seq, logits, seen, cache)


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_left_padded_sparse_prefill_then_sparse_decode_equals_each_prompt_alone(cache, prefill_calls):
    """Both sections on: the sparse prefill runs the padded batch as varlen, the decode-gate key caches are filled
    from each prompt's real tokens, and each sequence decodes as it does alone (which prefills sparsely too)."""
    model, _, state = _prepared("llama", mode="sparse", policy=SparsityPolicy("density", 0.5))
    lens, t = (64, 37, 50), 64
    ids, mask = _left_padded(lens, t, seed=9)
    seen = _observed(state)
    seq, logits = _generate_padded(model, ids, mask, cache)
    assert prefill_calls == [sum(lens)] * LAYERS  # the real tokens packed back to back
    _check_each_prompt_alone(model, state, ids, mask, lens, seq, logits, seen, cache)


def test_a_row_of_padding_only_starts_at_the_rows_end():
    """A prompt row without a real token (start T, length 0): generate runs, and with a budget covering the cache
    it gives transformers' tokens for both rows."""
    model, base, state = _prepared("llama", decode=DecodeConfig(DECODE.gate, WHOLE))
    ids, mask = _left_padded((PROMPT, 0), PROMPT)
    seq, logits = _generate_padded(model, ids, mask, new=5)
    assert state._decode[0].starts.tolist() == [0, PROMPT] and torch.isfinite(logits).all()
    assert torch.equal(seq, _generate_padded(base, ids, mask, new=5)[0])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's discarded branches
def test_left_padded_generate_through_the_triton_kernel_and_fused_selection(decode_calls):
    """impl='triton' with the fused selection (the interpreter here) gives the reference kernel's and the unfused
    selection's steps on a left-padded batch: the kernel's starts and the selection's per-sequence lengths."""
    model, _, state = _prepared("llama")
    ids, mask = _left_padded((40, 23), 40, seed=3)
    seen = _observed(state)
    ref = _generate_padded(model, ids, mask, "static", new=12)
    ref_seen = list(seen)
    seen.clear()
    state.set(impl="triton", decode_select="fused")
    tri = _generate_padded(model, ids, mask, "static", new=12)
    assert torch.equal(tri[0], ref[0]) and len(seen) == len(ref_seen) == LAYERS * 11
    assert all(torch.equal(a[1], b[1]) for a, b in zip(seen, ref_seen, strict=True))
    torch.testing.assert_close(tri[1], ref[1], atol=1e-4, rtol=1e-4)


def test_left_padded_beam_search_with_a_budget_covering_the_cache_equals_dense():
    """Beam search reorders and repeats the sequences: the starts follow the key caches (a row reading another
    row's start would attend to pad keys or miss prompt tokens)."""
    model, base, _ = _prepared("qwen2", decode=DecodeConfig(DECODE.gate, WHOLE))
    ids, mask = _left_padded((40, 19), 40, seed=4)
    kw = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **kw)
        want = base.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(out, want)


def test_right_padding_and_packed_documents_are_refused_in_sparse_decode():
    from transformers import DynamicCache

    model, _, _ = _prepared("llama")
    ids = input_ids(PROMPT, b=2)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    with pytest.raises(ValueError, match=r"left-padded prompts .* row 0 ends 5 pad token\(s\) before the row's end"):
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    cu = torch.tensor([0, 15, PROMPT], dtype=torch.int32)
    pos = torch.cat([torch.arange(15), torch.arange(PROMPT - 15)]).unsqueeze(0)
    with pytest.raises(ValueError, match="one sequence per row; row 0 of the prefill holds 2"):
        with torch.no_grad():
            model(input_ids(PROMPT), position_ids=pos, cache=DynamicCache(config=model.config), cu_seq_lens_q=cu,
                  cu_seq_lens_k=cu, max_length_q=25, max_length_k=25)  # fmt: skip
    # sparse decode off: the same packed forward runs (dense)
    get_seer_state(model).set_decode(enabled=False)
    with torch.no_grad():
        model(input_ids(PROMPT), position_ids=pos, cache=DynamicCache(config=model.config), cu_seq_lens_q=cu,
              cu_seq_lens_k=cu, max_length_q=25, max_length_k=25)  # fmt: skip


def test_left_padding_refuses_a_chunked_prefill_and_a_custom_selection():
    model, _, state = _prepared("llama")
    ids, mask = _left_padded((PROMPT, 30), PROMPT)
    model.generation_config.prefill_chunk_size = 16
    try:
        with pytest.raises(ValueError, match="a chunked prefill .* of a left-padded batch is not supported"):
            _generate_padded(model, ids, mask, new=3)
    finally:
        model.generation_config.prefill_chunk_size = None
    state.decode_select_fn = lambda req: pytest.fail("never called")
    with pytest.raises(ValueError, match="decode_select_fn takes unpadded batches only"):
        _generate_padded(model, ids, mask, new=3)
    state.decode_select_fn = None
    _generate_padded(model, ids, mask, new=3)


def test_padding_in_a_later_chunk_of_a_chunked_prefill_is_refused():
    """Right padding with prefill_chunk_size: the first chunk is unpadded (no layout, no starts), the last holds the
    pads; sparse decode would take their keys as real, so the chunk is refused. Unpadded chunks still run."""
    model, _, _ = _prepared("llama")
    ids = input_ids(PROMPT, b=2)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0  # pads at positions 35..39: in the third chunk of 16
    model.generation_config.prefill_chunk_size = 16
    try:
        with pytest.raises(ValueError, match=r"a chunk of a chunked prefill .* holds padding .* cache position 32"):
            _generate_padded(model, ids, mask, new=3)
        _generate_padded(model, ids, torch.ones_like(ids), new=3)
    finally:
        model.generation_config.prefill_chunk_size = None


def test_chunk_padding_check_reads_the_diagonal_and_refuses_other_shapes():
    """_check_chunk_unpadded: a chunk's query i at cache position past + i must attend to itself (bool or additive
    masks); a mask of another layout is refused by name."""
    from seerattn.hf.integration import SeerState, _check_chunk_unpadded

    state = SeerState(SeerConfig(gate=GATE))
    past, tq, tk = 8, 4, 12
    ok = torch.ones(tk, tk, dtype=torch.bool).tril()[past:].expand(2, 1, tq, tk).clone()
    _check_chunk_unpadded(state, ok, past, tq, layer=0)
    additive = torch.where(ok, 0.0, float("-inf"))
    additive[1, 0, 2, past + 2] = float("-inf")  # a pad query: not attending to itself
    with pytest.raises(ValueError, match="holds padding"):
        _check_chunk_unpadded(state, additive, past, tq, layer=0)
    with pytest.raises(ValueError, match=r"takes an attention mask \[B, 1, 4, >= 12\]"):
        _check_chunk_unpadded(state, ok[:, 0, 0], past, tq, layer=0)


def test_a_multi_token_step_on_a_filled_cache_is_refused_with_a_sparse_prefill():
    from transformers import DynamicCache

    model, _, _ = _prepared("llama", mode="sparse")
    cache = DynamicCache(config=model.config)
    ids = input_ids(PROMPT + 4)
    with torch.no_grad():
        model(ids[:, :PROMPT], cache=cache)
        with pytest.raises(ValueError, match="a forward of 4 tokens continues a KV cache"):
            model(ids[:, PROMPT:], cache=cache)


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_chunked_dense_prefill_then_sparse_decode_equals_one_prefill(cache, decode_calls):
    """transformers' prefill_chunk_size (prompt forwards of 16, 16, 8 tokens into one cache): the decode-gate
    key cache grows chunk by chunk (GateKeyCache.extend), so decode selects the same blocks and generates the
    same tokens as after a one-forward prefill."""
    model, _, state = _prepared("llama")
    ids = input_ids(PROMPT)
    whole = _generate(model, ids, cache)
    whole_idx = [c[4] for c in decode_calls]
    keys = {layer: e.keys.keys[:, :, : int(e.keys.num_blocks.max())].clone() for layer, e in state._decode.items()}
    decode_calls.clear()
    model.generation_config.prefill_chunk_size = 16
    try:
        chunked = _generate(model, ids, cache)
    finally:
        model.generation_config.prefill_chunk_size = None
    assert torch.equal(whole[0], chunked[0]) and len(whole_idx) == len(decode_calls) == len(state._decode) * (NEW - 1)
    assert all(torch.equal(a, c[4]) for a, c in zip(whole_idx, decode_calls, strict=True))
    torch.testing.assert_close(whole[1], chunked[1], atol=1e-5, rtol=1e-5)
    for layer, e in state._decode.items():  # the completed blocks' gate keys (capacities may differ: they grow)
        torch.testing.assert_close(e.keys.keys[:, :, : keys[layer].shape[2]], keys[layer], atol=1e-6, rtol=1e-6)


def test_a_cache_changed_outside_the_decode_path_is_refused():
    from transformers import DynamicCache

    model, _, state = _prepared("llama")
    cache = DynamicCache(config=model.config)
    ids = input_ids(PROMPT + 2)
    with torch.no_grad():
        model(ids[:, :PROMPT], cache=cache)
        model(ids[:, PROMPT : PROMPT + 1], cache=cache)
        cache.crop(-4)  # remove 4 tokens
        with pytest.raises(RuntimeError, match="the cache was changed outside seer's decode path"):
            model(ids[:, PROMPT + 1 :], cache=cache)
        # a new cache object starts afresh
        state.reset()
        model(ids[:, :PROMPT], cache=DynamicCache(config=model.config))


# ------------------------------------------------------------------------------ beam search and batch operations
@pytest.mark.parametrize("bound", [0, 1], ids=["plain", "bound"])
@pytest.mark.parametrize("op", ["reorder_cache", "batch_select_indices", "batch_repeat_interleave"])
def test_key_caches_follow_the_caches_batch_operations(op, bound, decode_calls):
    """After transformers reorders / selects / repeats a cache's sequences (beam and contrastive search), a
    decode step gives what a prefill of the sequences in the new order gives: same selections, same logits (with
    ``bound_slots``, the key bounds follow too)."""
    from transformers import DynamicCache

    model, _, state = _prepared("llama")
    if bound:
        state.set_decode(policy=DecodePolicy("budget", 64, bound_slots=bound))
    p = torch.cat([input_ids(150, seed=11), input_ids(150, seed=12)])  # [2, 150]: 9 full blocks
    arg, order = {
        "reorder_cache": (torch.tensor([1, 0]), [1, 0]),
        "batch_select_indices": (torch.tensor([1]), [1]),
        "batch_repeat_interleave": (2, [0, 0, 1, 1]),
    }[op]
    nxt = input_ids(1, seed=13).expand(len(order), 1)  # one token: selections differ by the gate keys only
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(p, cache=cache)
        getattr(cache, op)(arg)
        got = model(nxt, cache=cache).logits
        got_idx = [c[4] for c in decode_calls]
        decode_calls.clear()
        want = model(nxt, cache=model(p[order], cache=DynamicCache(config=model.config)).cache).logits
    want_idx = [c[4] for c in decode_calls]
    assert all(torch.equal(a.sort(-1).values, c.sort(-1).values) for a, c in zip(got_idx, want_idx, strict=True))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if op == "reorder_cache":  # the two sequences select differently: an unfollowed reorder would show
        assert any(not torch.equal(i[0].sort(-1).values, i[1].sort(-1).values) for i in want_idx)


@pytest.mark.parametrize("bound", [0, 1], ids=["plain", "bound"])
def test_starts_follow_a_reorder_of_a_left_padded_cache(bound, decode_calls):
    """A left-padded cache (prompts of 150 and 100 tokens) reordered: the step after it gives what a prefill of
    the reordered padded batch gives (each row's start moved with its K/V, gate keys and key bounds)."""
    from transformers import DynamicCache

    model, _, state = _prepared("llama")
    if bound:
        state.set_decode(policy=DecodePolicy("budget", 64, bound_slots=bound))
    ids, mask = _left_padded((150, 100), 150, seed=11)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    order = [1, 0]
    nxt = input_ids(1, seed=13).expand(2, 1)
    step = dict(attention_mask=torch.cat([mask[order], torch.ones(2, 1, dtype=mask.dtype)], 1))
    step["position_ids"] = pos[order, -1:] + 1
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids, attention_mask=mask, position_ids=pos, cache=cache)
        cache.reorder_cache(torch.tensor(order))
        assert state._decode[0].starts.tolist() == [50, 0]
        got = model(nxt, cache=cache, **step).logits
        got_idx = [c[4] for c in decode_calls]
        decode_calls.clear()
        fresh = model(
            ids[order], attention_mask=mask[order], position_ids=pos[order], cache=DynamicCache(config=model.config)
        )
        want = model(nxt, cache=fresh.cache, **step).logits
    assert all(torch.equal(a.sort(-1).values, c[4].sort(-1).values) for a, c in zip(got_idx, decode_calls, strict=True))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_beam_search_with_a_budget_covering_the_cache_equals_dense():
    model, base, _ = _prepared("qwen2", decode=DecodeConfig(DECODE.gate, WHOLE))
    ids = input_ids(PROMPT, b=2)
    kw = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        want = base.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(out, want)


@pytest.fixture
def no_gc():
    """The cyclic garbage collector off: what is still referenced stays, as between two of its full passes."""
    was = gc.isenabled()
    gc.disable()
    yield
    if was:
        gc.enable()


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_a_generates_kv_cache_dies_with_its_last_reference(cache, mode, no_gc):
    """Nothing seer puts on a KV cache (the wrapped batch operations) refers back to it: the cache, the largest
    tensors of a generate, is freed when its last reference goes, not at the garbage collector's next full pass.
    Before, each sparse-decode generate left its whole cache alive (the +16 / +48 GiB peaks of the H200 run)."""
    from transformers import DynamicCache, StaticCache

    model, _, state = _prepared("llama", mode=mode)
    ids = input_ids(PROMPT, b=2)
    kv = (
        StaticCache(config=model.config, max_cache_len=PROMPT + 8)
        if cache == "static"
        else DynamicCache(config=model.config)
    )
    with torch.no_grad():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0, cache=kv
        )
    assert isinstance(kv.__dict__["reorder_cache"], integration._FollowedBatchOp)  # followed: the case that leaked
    assert all(entry.owner() is kv for entry in state._decode.values()) and len(state._decode) == LAYERS
    alive = weakref.ref(kv)
    del kv
    assert alive() is None
    assert all(entry.owner() is None for entry in state._decode.values())


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_prefill_captures_only_what_it_reads_and_frees_them_before_the_kernel(mode, monkeypatch):
    """A dense prefill with sparse decode on captures the pre-RoPE k (the gate keys) but no q (4 GiB a layer at
    batch 16 x 32k, 8B shape); a sparse one q and k; decode steps both. No capture is alive when the attention
    kernel runs (weak references to the captured tensors are dead there)."""
    model, _, state = _prepared("llama", mode=mode)
    prefill_pre, step_pre, alive_in_kernel = [], [], []
    real_start, real_step = integration._start_decode_cache, integration._decode_step

    def start(module, state, hf_cache, pre, *args):
        prefill_pre.append({k: weakref.ref(v) for k, v in pre.items()})
        return real_start(module, state, hf_cache, pre, *args)

    def step(module, state, entry, query, key, value, pre, *args):
        step_pre.append(sorted(pre))
        return real_step(module, state, entry, query, key, value, pre, *args)

    def kernel(real):
        def run(*args, **kwargs):
            if prefill_pre and len(step_pre) == 0:  # the prefill's kernel of the layer just started
                alive_in_kernel.append([k for k, ref in prefill_pre[-1].items() if ref() is not None])
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(integration, "_start_decode_cache", start)
    monkeypatch.setattr(integration, "_decode_step", step)
    monkeypatch.setattr(integration, "sdpa_attention_forward", kernel(integration.sdpa_attention_forward))
    monkeypatch.setattr(integration, "block_sparse_attention", kernel(integration.block_sparse_attention))
    ids = input_ids(PROMPT, b=2)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    want = ["k"] if mode == "dense" else ["k", "q"]
    assert [sorted(p) for p in prefill_pre] == [want] * LAYERS
    assert alive_in_kernel == [[]] * LAYERS
    assert step_pre == [["k", "q"]] * (LAYERS * 2)
    assert state._pending == {}


def test_a_deep_copy_of_a_followed_cache_reorders_itself_and_shares_the_state():
    """copy.deepcopy of a cache (transformers' prompt-reuse recipe) gives wrappers of the copy: its reorder moves
    the copy's K/V, not the original's, and the model behind the state is not copied."""
    from transformers import DynamicCache

    model, _, state = _prepared("llama")
    p = torch.cat([input_ids(PROMPT, seed=11), input_ids(PROMPT, seed=12)])
    kv = DynamicCache(config=model.config)
    with torch.no_grad():
        model(p, cache=kv)
    before = kv.layers[0].keys.clone()
    dup = copy.deepcopy(kv)
    dup.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(kv.layers[0].keys, before) and torch.equal(dup.layers[0].keys, before.flip(0))
    assert dup.__dict__["reorder_cache"].owner() is dup and dup.__dict__["reorder_cache"].state is state
    assert dup._seer_follows() is state


# ------------------------------------------------------------------------------ custom selections (baselines)
def test_decode_select_fn_runs_through_the_same_kernel(decode_calls):
    """A StreamingLLM-style selection (first block + the last two) replaces the gate and the policy."""
    model, _, state = _prepared("qwen2")
    requests = []

    def sink_and_recent(req: DecodeRequest) -> torch.Tensor:
        requests.append(req)
        b, _, n, _ = req.q.shape
        cur = (req.cache_seqlens.long() - 1) // req.block_size  # [B, N]
        cols = torch.stack([torch.zeros_like(cur), cur - 1, cur], -1)  # [B, N, 3]
        cols = torch.where((cols < 0) | ((cols == 0) & (torch.arange(3) > 0)), -1, cols)
        return cols.unsqueeze(1).expand(b, HKV, n, 3).to(torch.int32).contiguous()

    state.decode_select_fn = sink_and_recent
    _generate(model, input_ids(PROMPT, b=2))
    assert len(requests) == len(decode_calls) == LAYERS * (NEW - 1)
    r = requests[-1]
    assert r.q.shape == (2, HQ, 1, HEAD_DIM) and r.cache_seqlens.tolist() == [[PROMPT + NEW - 1]] * 2
    assert r.num_slots == 3 and r.block_size == BS and r.k.shape == (2, HKV, PROMPT + NEW - 1, HEAD_DIM)
    for q, k, v, seqlens, idx, bs, out in decode_calls:
        cur = (int(seqlens[0]) - 1) // BS
        assert sorted(j for j in idx[0, 0].tolist() if j >= 0) == sorted({0, max(cur - 1, 0), cur})
        torch.testing.assert_close(out, _masked_decode_reference(q, k, v, seqlens, idx, bs), atol=1e-5, rtol=1e-5)

    state.decode_select_fn = lambda req: torch.zeros(2, HKV, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"decode_select_fn must return int32 \[B, Hkv, N, K\]"):
        _generate(model, input_ids(PROMPT, b=2), new=2)


def test_decode_observer_sees_every_steps_selection_and_nothing_when_off(decode_calls):
    """The observer gets each layer's selection of each sparse step (the blocks the kernel read, its seqlens);
    unset, or with decode sparsity off, it is not called."""
    model, _, state = _prepared("llama")
    seen = []
    state.decode_observer = seen.append
    ids = input_ids(PROMPT, b=2)
    _generate(model, ids, new=6)  # the prefill gives the first token, then 5 decode steps
    assert len(seen) == len(decode_calls) == LAYERS * 5
    assert [s.layer_idx for s in seen] == list(range(LAYERS)) * 5 and {s.block_size for s in seen} == {BS}
    for s, (_, _, _, seqlens, idx, _, _) in zip(seen, decode_calls, strict=True):
        assert s.blocks.dtype == torch.int32 and s.blocks.shape == (2, HKV, 3) and torch.equal(s.blocks, idx)
        assert torch.equal(s.cache_seqlens, seqlens)
    assert [s.cache_seqlens.tolist() for s in seen[::LAYERS]] == [[PROMPT + i] * 2 for i in range(1, 6)]
    state.set_decode(enabled=False)  # dense decode steps: no selection
    _generate(model, ids, new=4)
    state.set_decode(enabled=True)
    state.decode_observer = None
    _generate(model, ids, new=4)
    assert len(seen) == LAYERS * 5 and len(decode_calls) == LAYERS * 8


# ------------------------------------------------------------------------------ teacher-forced decode mode
@pytest.mark.parametrize("custom", ["gate", "select_fn", "half_shift", "bound"])
def test_decode_eval_equals_step_by_step_generate(custom, decode_calls, monkeypatch):
    """One forward in decode_eval mode over prompt + generated tokens gives the logits generate gave at each
    step: same selections, rows before the start dense (generate's prefill ran dense). ``half_shift``: the
    shifted windows' keys from the step cache and from decode_eval's bulk pooling rank alike; ``bound``: the key
    bounds the steps keep and those decode_eval computes from the window pick alike."""
    model, _, state = _prepared("qwen3")
    if custom == "half_shift":
        state.set_decode(policy=DecodePolicy("budget", 48, half_shift=True))
    if custom == "bound":
        state.set_decode(policy=DecodePolicy("budget", 64, bound_slots=1))
    if custom == "select_fn":
        # a selection that depends on the query (top blocks by q . mean key): the rows must be the right ones
        def by_mean_key(req: DecodeRequest) -> torch.Tensor:
            b, hq, n, d = req.q.shape
            t = req.k.shape[2]
            nb = -(-t // req.block_size)
            kb = torch.nn.functional.pad(req.k, (0, 0, 0, nb * req.block_size - t))
            kb = kb.view(b, HKV, nb, req.block_size, d).mean(3)  # [B, Hkv, NB, D]
            s = torch.einsum("bhgnd,bhjd->bhnj", req.q.view(b, HKV, hq // HKV, n, d), kb)
            cur = ((req.cache_seqlens.long() - 1) // req.block_size).view(b, 1, n, 1)
            j = torch.arange(nb).view(1, 1, 1, -1)
            s = s.masked_fill(j > cur, float("-inf")).masked_fill((j == 0) | (j == cur), float("inf"))
            top, idx = s.topk(min(3, nb), -1)
            return torch.where(torch.isinf(top) & (top < 0), -1, idx).to(torch.int32)

        state.decode_select_fn = by_mean_key
    ids = input_ids(PROMPT, b=2, seed=7)
    seq, logits = _generate(model, ids)
    step_idx = [c[4] for c in decode_calls]
    state.set(mode="decode_eval", decode_start=PROMPT)
    forced = seq[:, :-1]  # the last generated token is never fed back
    with torch.no_grad():
        out = model(forced, use_cache=False).logits  # [B, PROMPT + NEW - 1, V]
    assert {s["path"] for s in state.stats.values()} == {"decode_eval"}
    torch.testing.assert_close(out[:, PROMPT - 1 :], logits, atol=2e-5, rtol=1e-5)
    assert all(0 < s["density"] < 1 for s in state.stats.values())
    # the selections of decode_eval's rows are the steps' (recorded through the shared selection function)
    rows = []
    real = integration._decode_selection

    def spy(module, st, query, *args):
        idx = real(module, st, query, *args)
        rows.append((module.layer_idx, idx))
        return idx

    monkeypatch.setattr(integration, "_decode_selection", spy)
    monkeypatch.setattr(integration, "_DECODE_EVAL_ELEMENTS", 2 * HQ * (PROMPT + NEW))  # 1-row chunks
    with torch.no_grad():
        chunked = model(forced, use_cache=False).logits
    torch.testing.assert_close(chunked, out, atol=1e-5, rtol=1e-5)
    for layer in range(LAYERS):
        mine = [idx for li, idx in rows if li == layer]  # one row each, positions PROMPT ..
        theirs = step_idx[layer::LAYERS]
        assert len(mine) == NEW - 1 == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            k = b.shape[-1]
            assert torch.equal(a[:, :, 0, :k].sort(-1).values, b.sort(-1).values)


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_half_shift_changes_the_selection_and_matches_across_caches(cache, decode_calls):
    """DecodePolicy.half_shift: some steps keep other blocks than the plain policy (first and current block still
    kept, no repeats, the same budget), the step's output is attention over the kept blocks; the shifted windows'
    keys the step cache holds are block_keys on the sequence's rows after the offset."""
    model, _, state = _prepared("llama")
    ids = input_ids(PROMPT, b=2, seed=11)
    _generate(model, ids, cache)
    plain = [c[4].sort(-1).values for c in decode_calls]
    decode_calls.clear()
    state.set_decode(policy=DecodePolicy("budget", 48, half_shift=True))
    _generate(model, ids, cache)
    assert len(decode_calls) == len(plain) == LAYERS * (NEW - 1)
    assert sum(not torch.equal(a, c[4].sort(-1).values) for a, c in zip(plain, decode_calls, strict=True)) > 0
    for step, (q, k, v, seqlens, idx, bs, out) in enumerate(decode_calls):
        cur = (PROMPT + step // LAYERS) // BS
        for row in idx.reshape(-1, idx.shape[-1]).tolist():
            kept = [j for j in row if j >= 0]
            assert 0 in kept and cur in kept and len(set(kept)) == len(kept) == min(3, cur + 1)
        torch.testing.assert_close(out, _masked_decode_reference(q, k, v, seqlens, idx, bs), atol=1e-5, rtol=1e-5)
    for entry in state._decode.values():  # the last generate's key caches: the windows' keys
        sh = entry.keys.shifted
        assert sh is not None and sh.offset == BS // 2
        assert sh.num_blocks.tolist() == [(PROMPT + NEW - 1 - BS // 2) // BS] * 2


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_bound_slots_keep_the_blocks_of_highest_key_bound(cache, decode_calls):
    """DecodePolicy.bound_slots = 1 with a 4-block budget: every step keeps the first and the current block, the
    completed block of highest Quest bound over the keys the kernel reads (recomputed here from them), and one block
    by the gate; some steps differ from the plain policy; the output is attention over the kept blocks; the fused
    selection (the interpreter) keeps the same sets."""
    from seerattn.decode_baselines import quest_block_bounds
    from seerattn.decode_policy import bound_block_picks

    model, _, state = _prepared("llama")
    ids = input_ids(PROMPT, b=2, seed=11)
    state.set_decode(policy=DecodePolicy("budget", 64))
    seq_plain, _ = _generate(model, ids, cache)
    plain = [c[4].sort(-1).values for c in decode_calls]
    decode_calls.clear()
    state.set_decode(policy=DecodePolicy("budget", 64, bound_slots=1))
    seq, logits = _generate(model, ids, cache)
    assert len(decode_calls) == len(plain) == LAYERS * (NEW - 1)
    assert sum(not torch.equal(a, c[4].sort(-1).values) for a, c in zip(plain, decode_calls, strict=True)) > 0
    for step, (q, k, v, seqlens, idx, bs, out) in enumerate(decode_calls):
        length = PROMPT + 1 + step // LAYERS
        cur = (length - 1) // BS
        want = bound_block_picks(q.unsqueeze(2), *quest_block_bounds(k[:, :, :length], BS), seqlens.view(-1, 1), 1, BS)
        for row, pick in zip(idx.reshape(-1, idx.shape[-1]).tolist(), want.reshape(-1).tolist(), strict=True):
            kept = [j for j in row if j >= 0]
            assert 0 in kept and cur in kept and len(set(kept)) == len(kept) == min(4, cur + 1)
            assert pick < 0 or pick in kept, (step, row, pick)
        torch.testing.assert_close(out, _masked_decode_reference(q, k, v, seqlens, idx, bs), atol=1e-5, rtol=1e-5)
    unfused = [c[4].sort(-1).values for c in decode_calls]
    decode_calls.clear()
    state.set(decode_select="fused")
    seq_f, logits_f = _generate(model, ids, cache)
    assert torch.equal(seq_f, seq)
    torch.testing.assert_close(logits_f, logits, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(_ascending(u), _ascending(c[4])) for u, c in zip(unfused, decode_calls, strict=True))


@pytest.mark.parametrize(
    "change, match",
    [({"half_shift": True}, "without the shifted windows"), ({"bound_slots": 1}, "keeps no key bounds")],
    ids=["half_shift", "bound_slots"],
)
def test_a_policy_needing_more_cache_switched_on_during_a_generate_is_refused(change, match):
    from transformers import DynamicCache

    model, _, state = _prepared("llama")
    ids = input_ids(PROMPT + 1, seed=2)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :PROMPT], cache=cache)
        state.set_decode(policy=DecodePolicy("budget", 48, **change))
        with pytest.raises(RuntimeError, match=match):
            model(ids[:, PROMPT:], cache=cache)


def test_decode_eval_start_past_the_window_is_dense():
    model, base, state = _prepared("llama")
    state.set(mode="decode_eval", decode_start=10_000)
    ids = input_ids(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-5)
    assert state.mean_density() == 1.0 and {s["path"] for s in state.stats.values()} == {"decode_eval"}


# ------------------------------------------------------------------------------ the Triton kernel through generate
def test_generate_through_the_triton_decode_kernel_equals_the_reference(decode_calls):
    """impl="triton" (the interpreter here, the compiled kernel on a GPU) gives the reference's steps."""
    model, _, state = _prepared("llama")
    ids = input_ids(PROMPT, b=2)
    ref = _generate(model, ids, "static", new=8)
    ref_idx = [c[4] for c in decode_calls]
    decode_calls.clear()
    state.set(impl="triton")
    tri = _generate(model, ids, "static", new=8)
    assert torch.equal(tri[0], ref[0]) and all(torch.equal(a, c[4]) for a, c in zip(ref_idx, decode_calls, strict=True))
    torch.testing.assert_close(tri[1], ref[1], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ fused / unfused selection
@pytest.fixture
def fused_calls(monkeypatch):
    """Every call of the fused selection from the HF path: (qg, keys, lengths, policy, block_size, bound_blocks)."""
    calls = []
    real = integration.select_decode_blocks_fused

    def spy(qg, keys, lens, policy, block_size, bound_blocks=None):
        calls.append((qg, keys, lens, policy, block_size, bound_blocks))
        return real(qg, keys, lens, policy, block_size, bound_blocks)

    monkeypatch.setattr(integration, "select_decode_blocks_fused", spy)
    return calls


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_fused_selection_gives_the_unfused_steps(cache, decode_calls, fused_calls):
    """decode_select="fused" (the Triton kernel, the interpreter here) against "unfused" through generate: the
    same blocks at every step and layer (fused ascending), tokens, logits, densities and observed selections.
    On the CPU the automatic choice is unfused."""
    model, _, state = _prepared("qwen2")
    ids = input_ids(PROMPT, b=2, seed=5)
    seen = []
    state.decode_observer = seen.append
    runs = {}
    for select in ("unfused", "fused", None):
        decode_calls.clear()
        fused_calls.clear()
        state.set(decode_select=select)
        seq, logits = _generate(model, ids, cache, new=8)
        runs[select] = (seq, logits, [c[4] for c in decode_calls], state.mean_density())
        assert len(fused_calls) == (LAYERS * 7 if select == "fused" else 0), select
    (seq_u, log_u, idx_u, dens_u), (seq_f, log_f, idx_f, dens_f) = runs["unfused"], runs["fused"]
    assert torch.equal(seq_f, seq_u) and torch.equal(runs[None][0], seq_u)
    torch.testing.assert_close(log_f, log_u, atol=1e-5, rtol=1e-5)
    assert dens_f == pytest.approx(dens_u) and all(torch.equal(a, b) for a, b in zip(runs[None][2], idx_u, strict=True))
    assert len(idx_f) == len(idx_u) == LAYERS * 7
    reordered = 0
    for f, u in zip(idx_f, idx_u, strict=True):
        assert torch.equal(f, _ascending(u)), (f, u)
        reordered += not torch.equal(f, u)
    assert reordered > 0  # steps where the unfused order is not ascending: the two paths did run
    # the observer saw what the kernel read, in each run
    assert all(torch.equal(s.blocks, i) for s, i in zip(seen[LAYERS * 7 : 2 * LAYERS * 7], idx_f, strict=True))


def _ascending(idx: torch.Tensor) -> torch.Tensor:
    """Kept blocks ascending, then the -1 padding (the fused layout of an unfused selection)."""
    big = torch.iinfo(torch.int32).max
    s = torch.where(idx < 0, big, idx).sort(-1).values
    return torch.where(s == big, -1, s)


def test_decode_eval_with_the_fused_selection_equals_unfused(fused_calls):
    """decode_eval rows through the fused kernel (gate keys of the completed blocks padded to the window's
    blocks: 69 tokens, a partial last block; rows 60..68 cross a block boundary) give the unfused logits and
    density."""
    model, _, state = _prepared("llama")
    ids = input_ids(PROMPT + NEW - 1, b=1, seed=3)
    state.set(mode="decode_eval", decode_start=PROMPT + 20)
    out = {}
    for select in ("unfused", "fused"):
        state.set(decode_select=select)
        with torch.no_grad():
            out[select] = (model(ids, use_cache=False).logits, state.mean_density())
    assert len(fused_calls) == LAYERS  # one chunk of rows per layer
    torch.testing.assert_close(out["fused"][0], out["unfused"][0], atol=1e-5, rtol=1e-5)
    assert out["fused"][1] == pytest.approx(out["unfused"][1]) and 0 < out["fused"][1] < 1


def test_decode_select_validation():
    _, _, state = _prepared()
    state.set(decode_select="fused")
    with pytest.raises(ValueError, match="'budget' policy kind without half_shift only"):
        state.set_decode(policy=DecodePolicy("top_p", 0.9))
    assert state.config.decode.policy.kind == "budget"  # the refused change left the config as it was
    with pytest.raises(ValueError, match="must be one of"):
        SeerConfig(gate=GATE, decode=DECODE, decode_select="triton")
    with pytest.raises(ValueError, match="needs a decode section"):
        SeerConfig(gate=GATE, decode_select="fused")
    state.set(decode_select=None)
    state.set_decode(policy=DecodePolicy("top_p", 0.9))  # the automatic choice takes any policy


def _on_gpu():
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@pytest.mark.gpu
@pytest.mark.skipif(not _on_gpu(), reason="needs a CUDA GPU and the compiled kernels (no TRITON_INTERPRET)")
@pytest.mark.parametrize("bound", [0, 1], ids=["plain", "bound"])
@pytest.mark.parametrize("padded", [False, True], ids=["equal", "left-padded"])
@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_gpu_generate_decode_steps_have_no_host_sync(cache, padded, bound, fused_calls, monkeypatch):
    """fp16 on the GPU: every decode step of every layer (key-cache append, gate query, the fused gate logits
    and budget selection chosen automatically on CUDA, Triton kernel with the starts of a left-padded batch,
    stats; with ``bound_slots`` the key bounds' update and picks) runs under torch.cuda.set_sync_debug_mode("error");
    the tokens' logits match the reference kernel's after the unfused selection."""
    model, _, state = _prepared("llama")
    if bound:
        state.set_decode(policy=DecodePolicy("budget", 64, bound_slots=bound))
    model.to("cuda", torch.float16)
    state.cuda_graphs = False  # the eager step (tests/test_hf_graphs.py replays it from a CUDA graph)
    ids = input_ids(PROMPT, b=2).cuda()
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :13] = 0
    ref = _generate_padded(model, ids, mask, cache, new=12)  # impl None -> Triton on CUDA; first call tunes the kernel
    real = integration._decode_step
    steps = []

    def checked(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = real(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        steps.append(1)
        return out

    monkeypatch.setattr(integration, "_decode_step", checked)
    tri = _generate_padded(model, ids, mask, cache, new=12)
    assert len(steps) == LAYERS * 11 and torch.equal(tri[0], ref[0])
    assert len(fused_calls) == 2 * LAYERS * 11  # both runs took the fused selection (decode_select None)
    state.set(impl="reference", decode_select="unfused")
    monkeypatch.setattr(integration, "_decode_step", real)
    eager = _generate_padded(model, ids, mask, cache, new=12)
    torch.testing.assert_close(tri[1].float(), eager[1].float(), atol=2e-2, rtol=2e-2)


def test_generate_benchmark_runs_in_its_cpu_smoke_configuration(tmp_path):
    from benchmarks import generate
    from seerattn.record import read_record

    configs = "dense,decode,both,decode-unfused"
    assert generate.main(["--smoke", "--configs", configs, "--json", str(tmp_path / "g.json")]) == 0
    record = read_record(tmp_path / "g.json")
    rows = {r["config"]: r for r in record["results"]}
    assert record["kind"] == "bench-generate" and set(rows) == {"dense", "decode", "both", "decode-unfused"}
    # the selection that ran: automatic on the CPU is unfused, as decode-unfused forces it
    assert [rows[c]["decode_select"] for c in ("dense", "decode", "decode-unfused")] == [None, "unfused", "unfused"]
    assert rows["decode-unfused"]["decode_density"] == rows["decode"]["decode_density"]
    assert all(r["total_s"] > r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows.values())
    assert rows["dense"]["decode_density"] == 1.0 and 0 < rows["decode"]["decode_density"] < 1
    assert rows["decode"]["decode_density"] == rows["both"]["decode_density"]  # same gates, budget, tokens


def test_generate_benchmark_rounds_alternate_the_order(tmp_path, caplog):
    """--rounds 3: every configuration timed three times, the rounds in alternating order (positions 0 1 0 and
    1 0 1), warmed up once; a row's times are the medians of its rounds; --rounds 0 is refused."""
    from benchmarks import generate
    from seerattn.record import read_record

    caplog.set_level("INFO", logger="benchmarks.generate")
    out = tmp_path / "g.json"
    assert generate.main(["--smoke", "--configs", "dense,decode", "--rounds", "3", "--json", str(out)]) == 0
    rows = {r["config"]: r for r in read_record(out)["results"]}
    assert caplog.text.count("warm-up generate") == 2  # once per configuration
    assert [m["position"] for m in rows["dense"]["rounds"]] == [0, 1, 0]
    assert [m["position"] for m in rows["decode"]["rounds"]] == [1, 0, 1]
    for row in rows.values():
        rates = sorted(m["decode_tokens_per_s"] for m in row["rounds"])
        assert [m["round"] for m in row["rounds"]] == [0, 1, 2] and row["decode_tokens_per_s"] == rates[1]
        assert row["decode_tokens_per_s_range"] == [rates[0], rates[-1]]
    assert rows["decode"]["decode_speedup_vs_dense"] == pytest.approx(
        rows["decode"]["decode_tokens_per_s"] / rows["dense"]["decode_tokens_per_s"]
    )
    with pytest.raises(SystemExit):
        generate.main(["--smoke", "--rounds", "0"])


def test_generate_benchmark_chunked_prefill(tmp_path, capsys):
    """--prefill-chunk: dense prefills in chunks (the smoke prompt of 96 tokens in forwards of 32), the same
    decode density as one forward; refused with the sparse prefill of 'both'."""
    from benchmarks import generate
    from seerattn.record import read_record

    out = tmp_path / "g.json"
    assert generate.main(["--smoke", "--configs", "dense,decode", "--prefill-chunk", "32", "--json", str(out)]) == 0
    rows = {r["config"]: r for r in read_record(out)["results"]}
    assert rows["decode"]["prefill_chunk"] == 32 and 0 < rows["decode"]["decode_density"] < 1
    with pytest.raises(SystemExit):
        generate.main(["--smoke", "--configs", "decode,both", "--prefill-chunk", "32"])
    assert "needs a dense prefill" in capsys.readouterr().err


def test_generate_benchmark_short_warmup(tmp_path, capsys, caplog, monkeypatch):
    """--warmup-prompt: the untimed warm-up reads only the first N prompt tokens (recorded per row); the timed
    run is the same (its decode density equals a full warm-up's); 'both' adds one untimed forward of the whole
    prompt (its sparse prefill is tuned per length); out-of-range values are refused."""
    from benchmarks import generate
    from seerattn.record import read_record

    caplog.set_level("INFO", logger="benchmarks.generate")
    rows = {}
    for extra in ([], ["--warmup-prompt", "64"]):
        out = tmp_path / f"g{len(extra)}.json"
        assert generate.main(["--smoke", "--configs", "decode", *extra, "--json", str(out)]) == 0
        rows[len(extra)] = read_record(out)["results"][0]
    assert rows[0]["warmup_prompt"] == 96 and rows[2]["warmup_prompt"] == 64
    assert rows[0]["decode_density"] == rows[2]["decode_density"]
    assert "decode: warm-up generate (64-token prompt, 4 new)" in caplog.text
    # 'both' also runs the whole prompt once without a cache (untimed), so that its sparse prefill is tuned for
    # that length; 'decode' (dense prefill) does not
    calls = {}
    build = generate.build_llama

    def spied(*a, **k):
        model = build(*a, **k)

        def record(_module, args, kwargs):
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            calls.setdefault(config, []).append((ids.shape[1], kwargs.get("use_cache")))

        model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    monkeypatch.setattr(generate, "build_llama", spied)
    for config in ("decode", "both"):
        assert generate.main(["--smoke", "--configs", config, "--warmup-prompt", "64"]) == 0
    assert (96, False) in calls["both"] and (96, False) not in calls["decode"]
    with pytest.raises(SystemExit):
        generate.main(["--smoke", "--warmup-prompt", "0"])
    assert "--warmup-prompt must be in [1" in capsys.readouterr().err


def test_a_decode_section_turns_generates_auto_compile_off_until_removed():
    from seerattn.hf import remove_seer_attention

    model = make_model("llama")
    before = model.generation_config.disable_compile  # None: transformers' default
    assert not before
    apply_seer_attention(model, SeerConfig(gate=GATE, mode="dense"))  # prefill only: compile as before
    assert model.generation_config.disable_compile is before
    remove_seer_attention(model)
    apply_seer_attention(model, SeerConfig(gate=GATE, mode="dense", decode=DECODE))
    assert model.generation_config.disable_compile is True
    remove_seer_attention(model)
    assert model.generation_config.disable_compile is before
