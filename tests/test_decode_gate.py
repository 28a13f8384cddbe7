"""Decode gate, K-compression cache, decode policies and the decode distillation target.

Brute-force oracles are written with explicit loops over sequences, heads and blocks, independent of
the vectorised code they check.
"""

from __future__ import annotations

import math

import pytest
import torch

from seerattn.decode_policy import DecodePolicy, select_decode_blocks
from seerattn.gate import DecodeGate, DecodeGateConfig, GateKeyCache
from seerattn.ops import sparse_decode_attention
from seerattn.ops.reference import decode_block_scores

BS = 16


def rotary(x, position_ids, base=100.0):
    """HF-style rotary callable: (cos, sin) [B, N, Dg] at position_ids [B, N]."""
    dg = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, dg, 2, dtype=torch.float64) / dg)
    f = position_ids.double().unsqueeze(-1) * inv
    emb = torch.cat((f, f), -1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def make_gate(hq=4, hkv=2, d=8, dtype=torch.float64, seed=0, **cfg):
    torch.manual_seed(seed)
    gate = DecodeGate(hq, hkv, d, DecodeGateConfig(block_size=BS, **cfg)).to(dtype)
    with torch.no_grad():  # away from the structured initialisation, so every weight matters
        for p in gate.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return gate


def brute_pool(gate, kb):
    """One block's rows kb [n, D] pooled as the config says, concatenated."""
    parts = {"max": kb.amax(0), "min": kb.amin(0), "avg": kb.mean(0)}
    return torch.cat([parts[p] for p in gate.config.k_pooling])


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean() + eps) * w


def rot(x, pos):
    cos, sin = rotary(x.view(1, 1, -1), torch.tensor([[pos]]))
    x1, x2 = x.chunk(2)
    return x * cos.view(-1) + torch.cat((-x2, x1)) * sin.view(-1)


def brute_scores(gate, q, k, lens):
    """[B, Hkv, NBmax] logits: q [B, Hq, D] at positions lens - 1, k [B, Hkv, T, D]; -inf elsewhere."""
    b, hq, d = q.shape
    hkv, g = gate.num_kv_heads, gate.group
    eps = gate.config.norm_eps
    nbmax = k.shape[2] // BS + 1
    out = torch.full((b, hkv, nbmax), float("-inf"), dtype=torch.float64)
    for i in range(b):
        pos = int(lens[i]) - 1
        for h in range(hkv):
            qc = torch.cat([q[i, h * g + j] for j in range(g)])
            qg = rot(rms(qc @ gate.q_proj[h], gate.q_norm.weight, eps), pos)
            for blk in range(pos // BS):
                pooled = brute_pool(gate, k[i, h, blk * BS : (blk + 1) * BS])
                kg = rot(rms(pooled @ gate.k_proj[h], gate.k_norm.weight, eps), blk * BS)
                out[i, h, blk] = (qg @ kg) / math.sqrt(gate.gate_dim)
    return out


def test_cache_incremental_equals_bulk_per_sequence_phase():
    """Three sequences with different prompt lengths (different block phases), then token-by-token appends;
    also a cache grown from empty one token at a time. All equal the bulk build of the final lengths."""
    gate = make_gate()
    g = torch.Generator().manual_seed(1)
    prompt, steps = [5, 16, 37], 29
    t = max(prompt) + steps
    k = torch.randn(3, 2, t, 8, generator=g, dtype=torch.float64)
    inc = GateKeyCache(gate, 3, max_tokens=16)  # too small on purpose: it grows
    inc.prefill(k[:, :, : max(prompt)], torch.tensor(prompt), rotary)
    scratch = GateKeyCache(gate, 3)
    for s in range(steps):
        rows = torch.stack([k[i, :, prompt[i] + s] for i in range(3)])
        inc.append(rows, rotary)
    for s in range(prompt[0] + steps):
        scratch.append(k[:, :, s], rotary)
    final = [n + steps for n in prompt]
    bulk = GateKeyCache(gate, 3, max_tokens=t)
    bulk.prefill(k, torch.tensor(final), rotary)
    assert bulk.num_blocks.tolist() == [n // BS for n in final] and bulk.lengths.tolist() == final
    assert torch.equal(inc.num_blocks, bulk.num_blocks) and torch.equal(inc.lengths, bulk.lengths)
    n = int(bulk.num_blocks.max())
    valid = (torch.arange(n) < bulk.num_blocks.view(-1, 1)).view(3, 1, n, 1)
    torch.testing.assert_close(inc.keys[:, :, :n] * valid, bulk.keys[:, :, :n], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inc._pools, bulk._pools, rtol=1e-12, atol=1e-12)
    # the cache grown from empty (each row holds its first final[0] tokens)
    same = GateKeyCache(gate, 3, max_tokens=t)
    same.prefill(k, torch.full((3,), final[0]), rotary)
    assert scratch.num_blocks.tolist() == [final[0] // BS] * 3
    torch.testing.assert_close(scratch.keys[:, :, :2], same.keys[:, :, :2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scratch._pools, same._pools, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k_pooling", [("max", "min", "avg"), ("avg",)])
def test_cache_prefill_from_starts_equals_each_sequence_alone(k_pooling):
    """A left-padded batch (prompts of 5, 16, 37, 40 and 0 tokens ending at the row's end, NaN pad keys before
    them; starts mid-block, on a block boundary, at 0 and at T): each sequence's gate keys, pools, lengths and
    blocks are those of the prompt prefilled alone, and stay so through appends at their own phases."""
    gate = make_gate(k_pooling=k_pooling)
    g = torch.Generator().manual_seed(3)
    prompt, t, steps = [5, 16, 37, 40, 0], 40, 20
    k = torch.randn(5, 2, t + steps, 8, generator=g, dtype=torch.float64)
    padded = k[:, :, :t].clone()
    for i, n in enumerate(prompt):
        padded[i, :, : t - n] = float("nan")
    cache = GateKeyCache(gate, 5, max_tokens=16)
    cache.prefill(padded, rotary=rotary, starts=torch.tensor([t - n for n in prompt]))  # lengths: to the end
    alone = []
    for i, n in enumerate(prompt):
        c = GateKeyCache(gate, 1, max_tokens=16)
        if n:
            c.prefill(k[i : i + 1, :, t - n : t], rotary=rotary)
        alone.append(c)

    def same(step):
        assert cache.lengths.tolist() == [n + step for n in prompt]
        for i, c in enumerate(alone):
            nb = int(c.num_blocks)
            assert int(cache.num_blocks[i]) == nb and int(cache.lengths[i]) == int(c.lengths)
            assert not cache.keys[i, :, :nb].isnan().any()
            torch.testing.assert_close(cache.keys[i, :, :nb], c.keys[0, :, :nb], rtol=1e-12, atol=1e-12)
            if int(c.lengths) % BS:  # an empty partial block's pools are never read
                torch.testing.assert_close(cache._pools[i], c._pools[0], rtol=1e-12, atol=1e-12)

    same(0)
    for s in range(steps):
        cache.append(k[:, :, t + s], rotary)
        for i, c in enumerate(alone):
            c.append(k[i : i + 1, :, t + s], rotary)
    same(steps)
    assert cache.num_blocks.tolist() == [(n + steps) // BS for n in prompt] and cache.num_blocks.tolist() != [3] * 5


@pytest.mark.parametrize("k_pooling", [("max", "min", "avg"), ("avg",), ("max",)])
@pytest.mark.parametrize("chunks", [[1], [3, 40], [13, 16, 2], [16, 16], [70]])
def test_cache_extend_equals_row_by_row_appends(chunks, k_pooling):
    """extend(k chunk) = one append per row: sequences at different block phases (prompts 5, 16, 37), chunks
    inside the partial block, across several blocks, ending on a block boundary; a cache that must grow."""
    gate = make_gate(k_pooling=k_pooling)
    g = torch.Generator().manual_seed(2)
    prompt = [5, 16, 37]
    t = max(prompt) + sum(chunks)
    k = torch.randn(3, 2, t, 8, generator=g, dtype=torch.float64)
    bulk, rows = GateKeyCache(gate, 3, max_tokens=16), GateKeyCache(gate, 3, max_tokens=16)
    for c in (bulk, rows):
        c.prefill(k[:, :, : max(prompt)], torch.tensor(prompt), rotary)
    done = 0
    for n in chunks:
        chunk = torch.stack([k[i, :, prompt[i] + done : prompt[i] + done + n] for i in range(3)])  # [B, Hkv, n, D]
        bulk.extend(chunk, rotary)
        for s in range(n):
            rows.append(chunk[:, :, s], rotary)
        done += n
    assert torch.equal(bulk.num_blocks, rows.num_blocks) and torch.equal(bulk.lengths, rows.lengths)
    assert bulk.lengths.tolist() == [p + done for p in prompt]
    n = int(rows.num_blocks.max())
    valid = (torch.arange(n) < rows.num_blocks.view(-1, 1)).view(3, 1, n, 1)
    torch.testing.assert_close(bulk.keys[:, :, :n] * valid, rows.keys[:, :, :n] * valid, rtol=1e-12, atol=1e-12)
    partial = rows.lengths % BS > 0  # an empty partial block's pools are never read (the next row starts afresh)
    torch.testing.assert_close(bulk._pools[partial], rows._pools[partial], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="T >= 1"):
        bulk.extend(k[:, :, :0], rotary)


def _shifted_want(gate, k: torch.Tensor, lens: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The half-shifted windows' gate keys of each sequence's first lens[i] tokens, from block_keys on the rows
    after the offset (first positions offset + J * BS), and how many windows each has."""
    o = BS // 2
    n = (k.shape[2] - o) // BS
    first = (torch.arange(n) * BS + o).expand(k.shape[0], n)
    return gate.block_keys(k[:, :, o : o + n * BS], rotary, first), [max(0, (x - o) // BS) for x in lens]


def test_block_keys_with_an_offset_are_the_blocks_of_the_rows_after_it():
    gate = make_gate(seed=10)
    k = torch.randn(2, 2, 45, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    for o in (0, 3, BS // 2):
        n = (45 - o) // BS
        want = gate.block_keys(k[:, :, o : o + n * BS], rotary, (torch.arange(n) * BS + o).expand(2, n))
        got = gate.block_keys(k, rotary, offset=o)
        assert got.shape[2] == n and torch.equal(got, want)
    assert gate.block_keys(k[:, :, :BS], rotary, offset=1).shape[2] == 0  # the rows after the offset hold no block
    with pytest.raises(ValueError, match="offset must be in"):
        gate.block_keys(k, rotary, offset=BS)


@pytest.mark.parametrize("chunks", [[], [1, 2, 3], [7, 30], [70]])
def test_shifted_cache_holds_the_half_shifted_windows(chunks):
    """GateKeyCache(shifted=True): its ``shifted`` cache holds the gate keys of the windows [o + J * bs, o + (J + 1)
    * bs), o = bs / 2, rotated at their first position, for prompts shorter than the offset (3), inside the first
    window (12), on and past block boundaries (16, 37), through prefill, extend (chunked prefill) and appends; the
    aligned keys are those of a cache without it."""
    gate = make_gate(seed=6)
    g = torch.Generator().manual_seed(7)
    prompt, steps = [3, 12, 16, 37], 21
    t = max(prompt) + sum(chunks) + steps
    k = torch.randn(4, 2, t, 8, generator=g, dtype=torch.float64)
    cache, plain = GateKeyCache(gate, 4, max_tokens=16, shifted=True), GateKeyCache(gate, 4, max_tokens=16)
    assert cache.shifted.offset == BS // 2 and cache.shifted.shifted is None and plain.shifted is None
    for c in (cache, plain):
        c.prefill(k[:, :, : max(prompt)], torch.tensor(prompt), rotary)
    done = 0
    for n in chunks:
        chunk = torch.stack([k[i, :, prompt[i] + done : prompt[i] + done + n] for i in range(4)])
        for c in (cache, plain):
            c.extend(chunk, rotary)
        done += n
    for s in range(steps):
        rows = torch.stack([k[i, :, prompt[i] + done + s] for i in range(4)])
        for c in (cache, plain):
            c.append(rows, rotary)
    final = [x + done + steps for x in prompt]
    sh = cache.shifted
    assert sh.lengths.tolist() == final == cache.lengths.tolist()
    for i, x in enumerate(final):
        seq = torch.stack(
            [k[i, :, j] for j in list(range(prompt[i])) + [prompt[i] + r for r in range(done + steps)]], 1
        )
        want, nwin = _shifted_want(gate, seq.unsqueeze(0), [x])
        assert int(sh.num_blocks[i]) == nwin[0] and nwin[0] >= 1
        torch.testing.assert_close(sh.keys[i, :, : nwin[0]], want[0, :, : nwin[0]], rtol=1e-12, atol=1e-12)
        nb = int(plain.num_blocks[i])
        assert torch.equal(cache.keys[i, :, :nb], plain.keys[i, :, :nb])
    assert torch.equal(cache.num_blocks, plain.num_blocks)
    # reordering the batch reorders both
    cache.select(torch.tensor([2, 0]))
    assert cache.shifted.lengths.tolist() == [final[2], final[0]]


def test_shifted_cache_refuses_the_triton_append_with_an_offset():
    gate = make_gate()
    with pytest.raises(ValueError, match="offset 0"):
        GateKeyCache(gate, 1, impl="triton", offset=4)
    with pytest.raises(ValueError, match="offset must be in"):
        GateKeyCache(gate, 1, offset=BS)
    forced = GateKeyCache(gate, 1, impl="triton", shifted=True)  # the aligned cache's kernel; the windows eager
    assert forced.shifted.impl == "eager" and forced.shifted.append_impl(torch.device("cuda"), torch.float32) == "eager"
    assert GateKeyCache(gate, 1, offset=4).append_impl(torch.device("cuda"), torch.float32) == "eager"


def test_straddle_logits_lends_a_window_to_both_blocks_only_where_it_beats_them():
    from seerattn.gate import straddle_logits

    inf = float("inf")
    blocks = torch.tensor([0.0, 1.0, 2.0, 0.0, -inf])
    windows = torch.tensor([0.5, 3.0, 1.5, -inf, -inf])  # window 1 beats blocks 1 and 2; 0 and 2 do not
    out = straddle_logits(blocks, windows)
    below = torch.nextafter(torch.tensor(3.0), torch.tensor(-inf))
    # block 2 (own 2.0) gets the window's 3.0, block 1 (own 1.0) the float below it: no tie for a top-K
    assert out.tolist() == [0.0, below.item(), 3.0, 0.0, -inf]
    assert torch.equal(straddle_logits(blocks, torch.full_like(blocks, -inf)), blocks)
    # a window that beats one of its two blocks only does not count; -inf blocks stay -inf
    assert torch.equal(straddle_logits(torch.tensor([1.0, 5.0]), torch.tensor([3.0, -inf])), torch.tensor([1.0, 5.0]))
    assert straddle_logits(torch.tensor([-inf, 0.0]), torch.tensor([9.0, -inf])).tolist() == [-inf, 9.0]
    with pytest.raises(ValueError, match="one shape"):
        straddle_logits(blocks, windows[:-1])
    with pytest.raises(ValueError, match="one floating dtype"):
        straddle_logits(blocks, windows.double())


def test_gate_scores_with_the_shifted_windows_equal_brute_force():
    """scores(..., shifted=cache.shifted.keys) == straddle_logits of the brute-force block logits and of the
    windows' logits (pooled by hand), windows reaching into the query's block left out."""
    from seerattn.gate import straddle_logits

    gate = make_gate(seed=8)
    g = torch.Generator().manual_seed(9)
    lens = torch.tensor([1, 20, 33, 64])
    k = torch.randn(4, 2, 64, 8, generator=g, dtype=torch.float64)
    q = torch.randn(4, 4, 8, generator=g, dtype=torch.float64)
    cache = GateKeyCache(gate, 4, max_tokens=64, shifted=True)
    cache.prefill(k, lens, rotary)
    with torch.no_grad():
        got = gate.scores(q, cache.keys, lens - 1, rotary, shifted=cache.shifted.keys)
        blocks = gate.scores(q, cache.keys, lens - 1, rotary)
        o = BS // 2
        windows = torch.full_like(blocks, float("-inf"))
        for i, n in enumerate(lens.tolist()):
            pos, cur = n - 1, (n - 1) // BS
            qg = gate.gate_query(q[i : i + 1].unsqueeze(2), torch.tensor([[pos]]), rotary)[0, :, 0]  # [Hkv, Dg]
            for j in range(max(0, cur - 1)):  # window j straddles blocks j and j + 1 < cur
                kw = gate.block_keys(
                    k[i : i + 1, :, o + j * BS : o + (j + 1) * BS], rotary, torch.tensor([[o + j * BS]])
                )
                windows[i, :, j] = (qg * kw[0, :, 0]).sum(-1) / math.sqrt(gate.gate_dim)
    want = straddle_logits(blocks.unsqueeze(2), windows.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.equal(got, blocks)  # some window counted (the test can fail)


def test_half_shift_policy_validation_and_selection_rule():
    from seerattn.decode_policy import resolve_decode_select, select_decode_blocks_fused

    shift = DecodePolicy("budget", 64, half_shift=True)
    with pytest.raises(ValueError, match="False for the 'dense' kind"):
        DecodePolicy("dense", half_shift=True)
    with pytest.raises(ValueError, match="True or False"):
        DecodePolicy("budget", 64, half_shift=1)
    assert resolve_decode_select(None, shift, "cuda") == "unfused"
    assert resolve_decode_select(None, DecodePolicy("budget", 64), "cuda") == "fused"
    with pytest.raises(ValueError, match="without half_shift"):
        resolve_decode_select("fused", shift, "cuda")
    with pytest.raises(ValueError, match="without half_shift"):
        select_decode_blocks_fused(torch.zeros(1, 1, 4), torch.zeros(1, 1, 2, 4), torch.tensor([40]), shift, BS)
    assert DecodePolicy("top_p", 0.9, half_shift=True).half_shift


@pytest.mark.parametrize("k_pooling", [("max", "min", "avg"), ("avg",)])
def test_gate_scores_equal_brute_force(k_pooling):
    gate = make_gate(k_pooling=k_pooling, seed=2)
    g = torch.Generator().manual_seed(3)
    lens = torch.tensor([1, 17, 48, 61])  # no completed block, one, 2 (+ a full current block), 3
    k = torch.randn(4, 2, 64, 8, generator=g, dtype=torch.float64)
    q = torch.randn(4, 4, 8, generator=g, dtype=torch.float64)
    cache = GateKeyCache(gate, 4, max_tokens=64)
    cache.prefill(k, lens, rotary)
    with torch.no_grad():
        got = gate.scores(q, cache.keys, lens - 1, rotary)
    want = brute_scores(gate, q, k, lens)[..., : got.shape[-1]]
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)].double(), want[~torch.isinf(want)], rtol=1e-5, atol=1e-5)


def test_teacher_forced_forward_equals_decode_steps():
    """Row t of the bulk forward (distillation) == the decode-time scores of the token at position t."""
    gate = make_gate(seed=4)
    g = torch.Generator().manual_seed(5)
    t = 53
    q = torch.randn(2, 4, t, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        bulk = gate(q, k, rotary)  # [B, Hkv, T, NB]
        for pos in (0, 15, 16, 33, 52):
            cache = GateKeyCache(gate, 2, max_tokens=t)
            cache.prefill(k[:, :, : pos + 1], None, rotary)
            step = gate.scores(q[:, :, pos], cache.keys, torch.full((2,), pos), rotary)
            nb = step.shape[-1]
            torch.testing.assert_close(bulk[:, :, pos, :nb], step.double(), rtol=1e-10, atol=1e-10)
            assert torch.isinf(bulk[:, :, pos, nb:]).all()
    # the training path is differentiable
    q.requires_grad_(True)
    out = gate(q, k, rotary)
    out[torch.isfinite(out)].sum().backward()
    assert gate.q_proj.grad is not None and torch.isfinite(q.grad).all()


def _valid(idx):
    return [sorted(x for x in row if x >= 0) for row in idx.reshape(-1, idx.shape[-1]).tolist()]


def test_budget_policy_keeps_first_current_and_best():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 2, 10, generator=g)
    lens = torch.tensor([160, 40, 0])  # current block 9, 2; an empty cache
    idx = select_decode_blocks(logits, lens, DecodePolicy("budget", 4 * BS), BS)
    assert idx.shape == (3, 2, 4) and idx.dtype == torch.int32
    for h in range(2):
        rows = _valid(idx[0, h : h + 1])[0]
        best = logits[0, h, 1:9].topk(2).indices + 1
        assert rows == sorted([0, 9, *best.tolist()])
        assert _valid(idx[1, h : h + 1])[0] == [0, 1, 2]  # only 3 blocks exist
    assert (idx[2] == -1).all()
    with pytest.raises(ValueError, match="first and the current"):
        DecodePolicy("budget", BS).num_slots(BS, 10)


def test_threshold_and_top_p_policies():
    logits = torch.log(torch.tensor([[[0.5, 0.1, 0.3, 0.05, 0.05, 9.0, 9.0]]]))  # completed: blocks 0..4
    lens = torch.tensor([5 * BS + 3])  # current block 5
    thr = select_decode_blocks(logits, lens, DecodePolicy("threshold", 0.2), BS, kv_blocks=8)
    assert thr.shape == (1, 1, 8) and _valid(thr)[0] == [0, 2, 5]
    top = select_decode_blocks(logits, lens, DecodePolicy("top_p", 0.85), BS)
    assert _valid(top)[0] == [0, 1, 2, 5]  # 0.5 + 0.3 < 0.85 <= 0.5 + 0.3 + 0.1
    capped = select_decode_blocks(logits, lens, DecodePolicy("top_p", 1.0, max_blocks=3), BS)
    assert _valid(capped)[0] == [0, 2, 5]  # forced first/current, then the best
    dense = select_decode_blocks(logits, lens, DecodePolicy("dense"), BS)
    assert _valid(dense)[0] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="kind must be one of"):
        DecodePolicy("topk", 3)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        DecodePolicy("top_p", 1.5)


@pytest.mark.parametrize(
    ("hq", "hkv", "bs", "t", "row_chunk"),
    [(2, 2, 16, 45, 1024), (4, 2, 16, 45, 7), (8, 2, 16, 53, 16), (4, 1, 64, 151, 50), (4, 4, 64, 129, 1)],
)
def test_decode_block_scores_equals_brute_force(hq, hkv, bs, t, row_chunk):
    """GQA 1/2/4, odd T with a partial last block, blocks of 16 and 64, query chunks that do and do not
    align with the blocks (row_chunk 1 .. > T), a non-default scale."""
    g = torch.Generator().manual_seed(7 + hq + t)
    d, scale = 8, 0.6
    q = torch.randn(2, hq, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(2, hkv, t, d, generator=g, dtype=torch.float64)
    got = decode_block_scores(q, k, bs, scale=scale, row_chunk=row_chunk)
    nb = -(-t // bs)
    assert got.shape == (2, hkv, t, nb) and got.dtype == torch.float64
    group = hq // hkv
    for b in range(2):
        for hk in range(hkv):
            for i in range(t):
                want = torch.zeros(nb, dtype=torch.float64)
                for h in range(hk * group, (hk + 1) * group):  # the group's heads, each its causal softmax row
                    w = torch.softmax(q[b, h, i] @ k[b, hk, : i + 1].T * scale, -1)
                    for j in range(i // bs):  # completed blocks only
                        want[j] = max(want[j], w[j * bs : (j + 1) * bs].max())
                if i >= bs:
                    want /= want.sum()
                torch.testing.assert_close(got[b, hk, i], want, rtol=1e-12, atol=1e-12)
    assert (got[:, :, :bs] == 0).all()  # no completed block yet
    torch.testing.assert_close(got[:, :, bs:].sum(-1), torch.ones(2, hkv, t - bs, dtype=torch.float64))
    with pytest.raises(ValueError, match="row_chunk"):
        decode_block_scores(q, k, bs, row_chunk=0)


def test_gate_policy_kernel_pipeline_runs():
    """gate scores -> budget policy -> sparse decode attention, one decode step of two sequences."""
    gate = make_gate(dtype=torch.float32, seed=8)
    g = torch.Generator().manual_seed(9)
    k = torch.randn(2, 2, 96, 8, generator=g)
    v = torch.randn(2, 2, 96, 8, generator=g)
    q = torch.randn(2, 4, 8, generator=g)
    lens = torch.tensor([96, 50], dtype=torch.int32)
    cache = GateKeyCache(gate, 2, max_tokens=96)
    cache.prefill(k, lens, rotary)
    with torch.no_grad():
        logits = gate.scores(q, cache.keys, lens - 1, rotary)
    idx = select_decode_blocks(logits, lens, DecodePolicy("budget", 3 * BS), BS, kv_blocks=6)
    out = sparse_decode_attention(q, k, v, lens, idx, BS, impl="reference")
    assert out.shape == (2, 4, 8) and torch.isfinite(out).all()
    # a step within capacity keeps every tensor in place (static addresses for CUDA graphs)
    small = GateKeyCache(gate, 2, max_tokens=128)
    small.prefill(k, lens, rotary)
    ptrs = [x.data_ptr() for x in (small.keys, small.num_blocks, small.lengths, small._pools)]
    small.append(torch.randn(2, 2, 8, generator=g), rotary)
    assert ptrs == [x.data_ptr() for x in (small.keys, small.num_blocks, small.lengths, small._pools)]
    assert small.lengths.tolist() == [97, 51]


def test_config_validation_and_round_trip():
    c = DecodeGateConfig(block_size=32, k_pooling=["max", "avg"], gate_dim=16)
    assert DecodeGateConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown DecodeGateConfig fields"):
        DecodeGateConfig.from_dict({"blocksize": 64})
    with pytest.raises(ValueError, match="k_pooling"):
        DecodeGateConfig(k_pooling=("max", "max"))
    with pytest.raises(ValueError, match="power of two"):
        DecodeGateConfig(block_size=48)
    with pytest.raises(ValueError, match="needs rotary"):
        make_gate(dtype=torch.float32).scores(torch.zeros(1, 4, 8), torch.zeros(1, 2, 3, 8), torch.tensor([40]))


@pytest.mark.parametrize(
    "dtype,impl",
    [(torch.float32, "eager"), (torch.bfloat16, "eager"), (torch.float32, "triton"), (torch.float16, "triton")],
)
def test_block_bounds_follow_the_cache_step_by_step(dtype, impl):
    """BlockBounds: a prompt's refresh, then one update per decode step (sequences of other lengths and starts, a
    left-padded batch), gives every completed block the exact min / max of its rows, as quest_block_bounds over
    each sequence alone, in torch and in the Triton kernel (the interpreter here); the capacity grows; select
    reorders."""
    from seerattn.decode_baselines import quest_block_bounds
    from seerattn.gate import BlockBounds

    if impl == "triton":
        pytest.importorskip("triton")

    bs, hkv, d, t, steps = 8, 2, 4, 21, 30
    g = torch.Generator().manual_seed(4)
    key = torch.randn(3, hkv, t + steps, d, generator=g).to(dtype)  # the KV cache rows the steps fill
    starts = torch.tensor([0, 5, 20])  # prompts of 21, 16 and 1 tokens
    bounds = BlockBounds(key[:, :, :t], bs, t, impl=impl)
    bounds.refresh(key[:, :, :t], starts)
    assert bounds.kmin.dtype == dtype and bounds.kmin.shape == (3, hkv, 3, d) and bounds.impl == impl
    for step in range(steps + 1):
        lens = t + step - starts
        for i in range(3):
            alone = key[i : i + 1, :, starts[i] : t + step]
            lo, hi = quest_block_bounds(alone, bs)
            done = (int(lens[i]) - 1) // bs  # completed blocks, as a decode step at this length sees them
            assert torch.equal(bounds.kmin[i, :, :done], lo[0, :, :done]), (step, i)
            assert torch.equal(bounds.kmax[i, :, :done], hi[0, :, :done]), (step, i)
        if step < steps:
            bounds.reserve(t + step + 1)
            bounds.update(key[:, :, : t + step + 1], lens + 1, starts)
    assert bounds.kmin.shape[2] >= -(-(t + steps) // bs)
    before = bounds.kmax.clone()
    bounds.select(torch.tensor([2, 2, 0]))
    assert torch.equal(bounds.kmax, before[[2, 2, 0]])
    with pytest.raises(ValueError, match="BlockBounds.refresh needs key"):
        bounds.refresh(key[:, :1])
    with pytest.raises(ValueError, match="impl must be one of"):
        BlockBounds(key, bs, t, impl="cuda")
    with pytest.raises(ValueError, match="BlockBounds: block_size must be a positive power of two"):
        BlockBounds(key, 12, t)
    if impl == "eager":  # the kernel's op checks its own inputs (below)
        before = (bounds.kmin.clone(), bounds.kmax.clone())
        with pytest.raises(ValueError, match=r"BlockBounds.update needs key \[B=3, Hkv=2, T >= 1, D=4\]"):
            bounds.update(key[:, :1], torch.tensor([9, 9, 9]))
        with pytest.raises(ValueError, match=r"BlockBounds.update needs lengths \[B=3\]"):
            bounds.update(key, torch.tensor([9, 9]))
        assert torch.equal(bounds.kmin, before[0]) and torch.equal(bounds.kmax, before[1])  # nothing written
    if impl == "triton":
        from seerattn.ops import block_bounds_update

        with pytest.raises(ValueError, match="share shape, strides and key's dtype"):
            block_bounds_update(key, bounds.kmin, bounds.kmax.double(), torch.tensor([9, 9, 9]), None, bs)
        with pytest.raises(ValueError, match=r"lengths must be an int32 / int64 tensor \[B=3\]"):
            block_bounds_update(key, bounds.kmin, bounds.kmax, torch.tensor([9, 9]), None, bs)
