"""Padded batches and packed documents in the sparse prefill (tiny models built in code, CPU, fp32).

Reference: each sequence run alone, unpadded (same positions). A padded or packed forward must give every real
token the logits of its sequence alone, through the same gate logits and the same block mask (the varlen
mask's entry of each sequence, in its top-left corner), and finite logits at pad positions.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import GATE, HKV, HQ, LAYERS, input_ids, make_model

import seerattn.hf.integration as integration
from seerattn import BlockMask, SparsityPolicy
from seerattn.hf import MaskRequest, SeerConfig, apply_seer_attention

ATOL = 1e-5
POLICY = SparsityPolicy("density", 0.3)


class Recorder:
    """What the seer attention function hands to the gate and the kernel, in call order."""

    def __init__(self):
        self.gate: list[torch.Tensor] = []  # gate logits [G, Hq, NB, NB] per call
        self.masks: list[BlockMask] = []
        self.cu: list[torch.Tensor | None] = []

    def clear(self):
        self.gate.clear(), self.masks.clear(), self.cu.clear()


@pytest.fixture
def rec(monkeypatch):
    r = Recorder()
    real_gate, real_kernel = integration._gate_forward, integration.block_sparse_attention

    def gate(*args, **kwargs):
        out = real_gate(*args, **kwargs)
        r.gate.append(out)
        return out

    def kernel(q, k, v, block_mask, **kwargs):
        r.masks.append(block_mask)
        r.cu.append(kwargs.get("cu_seqlens"))
        return real_kernel(q, k, v, block_mask, **kwargs)

    monkeypatch.setattr(integration, "_gate_forward", gate)
    monkeypatch.setattr(integration, "block_sparse_attention", kernel)
    return r


def _seer(family="llama", **cfg):
    model = make_model(family)
    state = apply_seer_attention(model, SeerConfig(gate=GATE, **{"policy": POLICY, **cfg}))
    return model, state


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def _padding(lens, t, side):
    """attention_mask [B, T]: row r has lens[r] real tokens on the right (side 'left': left padding) or the left."""
    am = torch.zeros(len(lens), t, dtype=torch.long)
    for r, n in enumerate(lens):
        if n:
            (am[r, t - n :] if side == "left" else am[r, :n]).fill_(1)
    return am


def _alone(model, rec, ids, **kwargs):
    """(logits [T, V], the layers' masks, the layers' gate logits) of one unpadded sequence ids [1, T]."""
    rec.clear()
    logits = _logits(model, ids, **kwargs)[0]
    return logits, list(rec.masks), list(rec.gate)


def _entry(mask: BlockMask, n: int, length: int) -> torch.Tensor:
    """Dense [H, NB, NB] of sequence n of a varlen mask, cut to its NB blocks; the rows past them must be empty."""
    nb = -(-length // mask.block_size)
    assert (mask.kv_num_blocks[n, :, nb:] == 0).all()
    return mask.to_dense()[n, :, :nb, :nb]


def _check_sequences(model, rec, logits, ids, spans, gate_calls, **alone_kwargs):
    """Each sequence (row, start, length) of a padded/packed forward against itself alone: logits of its tokens,
    its entry of every layer's varlen mask, its gate logits (``gate_calls[layer][n]``: (call, index in it))."""
    masks = list(rec.masks)
    for n, (row, start, length) in enumerate(spans):
        want, want_masks, want_gate = _alone(model, rec, ids[row : row + 1, start : start + length], **alone_kwargs)
        torch.testing.assert_close(logits[row, start : start + length], want, atol=ATOL, rtol=0)
        for layer in range(LAYERS):
            assert torch.equal(_entry(masks[layer], n, length), want_masks[layer].to_dense()[0])
            if gate_calls is not None:
                call, i = gate_calls[layer][n]
                torch.testing.assert_close(call[i : i + 1], want_gate[layer], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ padded batches
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_padded_batch_equals_each_sequence_alone(family, side, rec):
    """Rows of 150 (no padding), 97, 33 and 9 tokens (less than one 16-token block): odd lengths, partial blocks."""
    model, state = _seer(family)
    lens, t = (150, 97, 33, 9), 150
    ids = input_ids(t, b=len(lens))
    am = _padding(lens, t, side)
    pos = (am.cumsum(-1) - 1).clamp(min=0)  # the positions generate() derives from the mask
    logits = _logits(model, ids, attention_mask=am, position_ids=pos)
    assert torch.isfinite(logits).all()  # pad positions too
    assert len(rec.masks) == LAYERS and all(m.shape[:3] == (4, HQ, 10) for m in rec.masks)
    assert all(torch.equal(cu, torch.tensor([0, 150, 247, 280, 289], dtype=torch.int32)) for cu in rec.cu)
    # every length differs: one gate call per sequence and layer, in sequence order
    assert [g.shape[0] for g in rec.gate] == [1] * 4 * LAYERS
    gate_calls = [[(rec.gate[layer * 4 + n], 0) for n in range(4)] for layer in range(LAYERS)]
    densities = [state.stats[layer]["density"] for layer in range(LAYERS)]
    spans = [(r, t - n if side == "left" else 0, n) for r, n in enumerate(lens)]
    masks = list(rec.masks)
    _check_sequences(model, rec, logits, ids, spans, gate_calls)
    # the masks are the gate's choice (not all blocks), and the density counts each sequence's own triangle
    for layer in range(LAYERS):
        kept = sum(int(_entry(masks[layer], n, n_tok).tril().sum()) for n, (_, _, n_tok) in enumerate(spans))
        total = sum(HQ * nb * (nb + 1) // 2 for nb in (-(-n // GATE.block_size) for n in lens))
        assert densities[layer] == pytest.approx(kept / total) and densities[layer] < 0.7


def test_left_padding_keeps_the_models_positions_in_the_gate(rec):
    """Without position_ids a forward numbers every row 0..T-1, pad included: the real tokens of a left-padded
    row sit at positions T - n.. in the model's RoPE and in the gate's (gathered with them), as when that
    sequence runs alone at those positions (RoPE is relative, so only the rounding shows it: compared exactly)."""
    model, _ = _seer()
    lens, t = (90, 61), 90
    ids = input_ids(t, b=2)
    logits = _logits(model, ids, attention_mask=_padding(lens, t, "left"))
    masks, gates = list(rec.masks), list(rec.gate)
    for n, length in enumerate(lens):
        pos = torch.arange(t - length, t).unsqueeze(0)
        want, want_masks, want_gate = _alone(model, rec, ids[n : n + 1, t - length :], position_ids=pos)
        torch.testing.assert_close(logits[n, t - length :], want, atol=ATOL, rtol=0)
        for layer in range(LAYERS):
            assert torch.equal(_entry(masks[layer], n, length), want_masks[layer].to_dense()[0])
            assert torch.equal(gates[layer * 2 + n], want_gate[layer])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_with_left_padding_equals_each_prompt_alone(cache, rec):
    """generate() left-pads and derives position_ids from the mask: the sparse prefill of the padded batch
    and the dense decode steps give each prompt the tokens it gets alone (a StaticCache hands the first forward
    a mask over its whole capacity)."""
    model, state = _seer("qwen2")
    lens, t = (70, 45, 12), 70
    ids = input_ids(t, b=3, seed=5)
    am = _padding(lens, t, "left")
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=am, **kw, **({"cache_implementation": "static"} if cache == "static" else {})
        )
        # the prefill ran the varlen path: the three prompts packed
        assert [c.tolist() for c in rec.cu] == [[0, 70, 115, 127]] * LAYERS
        for r, n in enumerate(lens):
            prompt = ids[r : r + 1, t - n :]
            alone = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
            assert torch.equal(out[r : r + 1, t - n :], alone)
    assert {s["path"] for s in state.stats.values()} == {"dense-decode"}


def test_an_all_padding_row_gives_finite_logits_and_the_others_are_unchanged(rec):
    model, _ = _seer()
    ids = input_ids(40, b=2)
    logits = _logits(model, ids, attention_mask=_padding((40, 0), 40, "right"))
    assert torch.isfinite(logits).all() and rec.masks[0].shape[0] == 1  # one sequence
    torch.testing.assert_close(logits[0], _logits(model, ids[:1])[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["oracle", "custom"])
def test_oracle_and_custom_modes_take_padded_batches(mode, rec):
    requests: list[MaskRequest] = []

    def local(req: MaskRequest) -> BlockMask:  # sink + the diagonal block and the one before it
        requests.append(req)
        nb = -(-req.seq_len // req.block_size)
        i = torch.arange(nb)
        keep = ((i[:, None] - i[None, :] <= 1) | (i[None, :] == 0)) & torch.ones(nb, nb, dtype=torch.bool).tril()
        return BlockMask.from_dense(keep.expand(req.q.shape[0], HQ, nb, nb).contiguous(), req.block_size, req.seq_len)

    model, state = _seer(mode=mode)
    state.mask_fn = local
    lens, t = (100, 64, 64), 100
    ids = input_ids(t, b=3)
    logits = _logits(model, ids, attention_mask=_padding(lens, t, "right"))
    if mode == "custom":  # one request per layer and length: the two 64-token rows together
        assert [(r.q.shape[0], r.seq_len, tuple(r.k.shape[1:3])) for r in requests] == [
            (1, 100, (HKV, 100)),
            (2, 64, (HKV, 64)),
        ] * LAYERS
    assert {s["path"] for s in state.stats.values()} == {mode}
    _check_sequences(model, rec, logits, ids, [(r, 0, n) for r, n in enumerate(lens)], None)


# The interpreter evaluates both branches of tl.where, so inf - inf in a discarded branch warns.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_padded_batch_through_the_triton_gate_selection_and_varlen_kernel(rec):
    """gate_impl='triton', impl='triton' (the interpreter on the CPU, fp32): the eager gate and reference kernel's
    masks and logits."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("runs the Triton kernels on CPU tensors (the interpreter)")
    model, state = _seer()
    lens, t = (70, 37), 70
    ids = input_ids(t, b=2)
    am = _padding(lens, t, "left")
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    got = {}
    for impl, gate_impl in (("reference", "eager"), ("triton", "triton")):
        state.set(impl=impl, gate_impl=gate_impl)
        rec.clear()
        got[impl] = (_logits(model, ids, attention_mask=am, position_ids=pos), [m.to_dense() for m in rec.masks])
    torch.testing.assert_close(got["triton"][0], got["reference"][0], atol=1e-4, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(got["triton"][1], got["reference"][1], strict=True))


# ------------------------------------------------------------------------------ packed documents
@pytest.mark.parametrize("docs", [(70, 41, 9), (48, 48, 48)], ids=["unequal", "equal"])
@pytest.mark.parametrize("how", ["mask", "cu_seq_lens"])
def test_packed_documents_equal_each_document_alone(docs, how, rec):
    """One row of documents with position_ids restarting at 0. transformers builds the block-diagonal mask
    without a cache (use_cache=False); with a cache it hands no mask, and the collator's cu_seq_lens say where
    the documents are."""
    model, _ = _seer()
    t = sum(docs)
    ids = input_ids(t, b=1, seed=7)
    pos = torch.cat([torch.arange(n) for n in docs]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
    if how == "mask":
        kwargs = dict(position_ids=pos, use_cache=False)
    else:
        m = max(docs)
        kwargs = dict(position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
    logits = _logits(model, ids, **kwargs)
    assert all(torch.equal(c, cu) for c in rec.cu)
    equal = len(set(docs)) == 1
    # equal documents: one gate call of 3 sequences per layer; else one per document
    assert [g.shape[0] for g in rec.gate] == ([3] * LAYERS if equal else [1] * 3 * LAYERS)
    per_layer = 1 if equal else 3
    gate_calls = [
        [(rec.gate[layer * per_layer + (0 if equal else n)], n if equal else 0) for n in range(3)]
        for layer in range(LAYERS)
    ]
    starts = torch.tensor((0, *docs[:-1])).cumsum(0).tolist()
    _check_sequences(model, rec, logits, ids, [(0, s, n) for s, n in zip(starts, docs, strict=True)], gate_calls)


def test_packed_documents_cross_without_a_mask_or_cu_seq_lens(rec):
    """With a cache and no cu_seq_lens, transformers hands no mask for packed position_ids (its SDPA attends
    across documents too): one causal sequence, no varlen."""
    model, _ = _seer()
    pos = torch.cat([torch.arange(40), torch.arange(40)]).unsqueeze(0)
    _logits(model, input_ids(80), position_ids=pos)
    assert rec.cu == [None] * LAYERS


# ------------------------------------------------------------------------------ once per forward
def test_the_layout_is_read_once_per_forward(monkeypatch):
    model, _ = _seer()
    calls = []
    real = integration._mask_spans

    def spans(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(integration, "_mask_spans", spans)
    ids = input_ids(50, b=2)
    _logits(model, ids, attention_mask=_padding((50, 20), 50, "left"))
    assert len(calls) == 1  # not once per layer
    _logits(model, ids, attention_mask=_padding((30, 50), 50, "right"))
    assert len(calls) == 2 and calls[0] is not calls[1]  # a new forward's mask is read again


# ------------------------------------------------------------------------------ what is refused
def test_real_tokens_in_several_spans_are_refused():
    model, _ = _seer()
    ids = input_ids(40, b=2)
    am = torch.ones(2, 40, dtype=torch.long)
    am[1, 10] = 0  # a hole: generate() infers this from a pad token inside the prompt
    with pytest.raises(ValueError, match=r"one contiguous span per row .* row 1 of the attention mask has 2"):
        _logits(model, ids, attention_mask=am)


def test_other_mask_patterns_and_inconsistent_packing_are_refused():
    model, _ = _seer()
    t = 40
    i = torch.arange(t)
    window = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 8)  # a sliding window handed as a 4-D mask
    with pytest.raises(ValueError, match="got another pattern"):
        _logits(model, input_ids(t), attention_mask=window.view(1, 1, t, t))
    strictly_causal = i[None, :] < i[:, None]  # no token attends to itself: not padding
    with pytest.raises(ValueError, match="got another pattern"):
        _logits(model, input_ids(t), attention_mask=strictly_causal.view(1, 1, t, t))
    pos = torch.cat([torch.arange(20), torch.arange(20)]).unsqueeze(0)
    cu = torch.tensor([0, 10, 40], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seq_lens_q gives the documents \[\(0, 10\), \(10, 30\)\]"):
        _logits(model, input_ids(t), position_ids=pos, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(ValueError, match="cu_seq_lens_k must equal cu_seq_lens_q"):
        _logits(model, input_ids(t), position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu.flip(0))
    with pytest.raises(ValueError, match="documents packed in one row"):
        _logits(model, input_ids(t, b=2), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(ValueError, match="every row is padding"):
        _logits(model, input_ids(t, b=2), attention_mask=torch.zeros(2, t, dtype=torch.long))


def test_a_custom_mask_of_the_wrong_batch_is_refused():
    """A padded batch asks mask_fn once per sequence length; a mask for the whole batch is an error that says so."""
    model, state = _seer(mode="custom")
    state.mask_fn = lambda req: BlockMask.from_dense(torch.ones(3, HQ, 3, 3, dtype=torch.bool).tril(), 16, 40)
    with pytest.raises(ValueError, match=r"mask_fn must return a BlockMask of batch 1, seq_len 40 and block_size 16"):
        _logits(model, input_ids(40, b=3), attention_mask=_padding((40, 30, 20), 40, "right"))


def test_padded_and_packed_prefill_under_inference_mode():
    """torch.inference_mode (inference tensors: no version counters) gives what no_grad gives, padded and packed."""
    model, _ = _seer()
    t = 150
    ids = input_ids(t, b=2)
    am = _padding([150, 97], t, "left")
    kw = dict(attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0))
    cu = torch.tensor([0, 60, 150], dtype=torch.int32)
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=90, max_length_k=90)
    for ids_, kwargs in ((ids, kw), (ids[:1], packed)):
        want = _logits(model, ids_, **kwargs)
        with torch.inference_mode():
            got = model(ids_, **kwargs).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_mask_object_changed_in_place_between_forwards_is_read_again():
    """A caller's 4-D mask reaches the attention function as the same object every forward; the layout cached for
    it is keyed on its version, so an in-place change (more padding) is read again, not served stale."""
    model, _ = _seer()
    t = 150
    ids = input_ids(t, b=2)
    am = torch.ones(2, t, dtype=torch.bool)
    am[1, :50] = False
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    m4 = causal & am[:, None, None, :]
    first = _logits(model, ids, attention_mask=m4)
    am[1, :90] = False
    m4 &= am[:, None, None, :]  # in place: same object, new padding; the next forward meets the cached layout
    got = _logits(model, ids, attention_mask=m4)
    want = _logits(model, ids, attention_mask=(causal & am[:, None, None, :]).clone())
    torch.testing.assert_close(got[1, 90:], want[1, 90:], rtol=0, atol=0)
    assert not torch.equal(got[1, 90:], first[1, 90:])
