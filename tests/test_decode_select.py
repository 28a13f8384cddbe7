"""Fused decode-gate logits + budget selection (``select_decode_blocks_fused``, one Triton kernel) against the
eager path it replaces: ``DecodeGate.scores`` then ``select_decode_blocks`` (interpreter on CPU, compiled on GPU).

The fused kernel lists the kept blocks in ascending order and the eager path by priority, so rows are compared
as sets; equal logits go to the lower block index in the kernel (tested on its own: the eager top-K leaves
their order unspecified).
"""

from __future__ import annotations

import os

import pytest
import torch

from seerattn.decode_baselines import quest_block_bounds, quest_block_scores
from seerattn.decode_policy import (
    DecodePolicy,
    bound_block_picks,
    resolve_decode_select,
    select_decode_blocks,
    select_decode_blocks_fused,
)
from seerattn.gate import DecodeGate, DecodeGateConfig, GateKeyCache
from seerattn.ops import budget_decode_blocks, quest_bound_scores, top_block_indices

pytest.importorskip("triton")


def rotary(x, pos):
    dg = x.shape[-1]
    f = pos.float().unsqueeze(-1) / 10000 ** (torch.arange(0, dg, 2, device=x.device) / dg)
    emb = torch.cat((f, f), -1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def gate_case(lens, hq, hkv, d, nb, bs, seed=0, device="cpu"):
    """A random decode gate, its gate keys of a random cache of ``nb`` blocks, and the gate queries of a new
    token per sequence: (gate, q [B, Hq, D], keys [B, Hkv, NB, Dg], qg [B, Hkv, Dg], lens int32 [B])."""
    g = torch.Generator().manual_seed(seed)
    gate = DecodeGate(hq, hkv, d, DecodeGateConfig(block_size=bs))
    with torch.no_grad():  # away from the identity init: query heads and pools mixed
        gate.q_proj.normal_(0, 0.3, generator=g)
        gate.k_proj.normal_(0, 0.3, generator=g)
    gate = gate.to(device)
    b = len(lens)
    k = torch.randn(b, hkv, nb * bs, d, generator=g).to(device)
    q = torch.randn(b, hq, d, generator=g).to(device)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    cache = GateKeyCache(gate, b, max_tokens=nb * bs)
    with torch.no_grad():
        cache.prefill(k, lens_t, rotary)
    assert cache.keys.shape[2] == nb
    return gate, q, cache.keys, gate_query(gate, q, lens_t), lens_t


def gate_query(gate, q, lens):
    """qg [B, Hkv, Dg]: the gate query of each new token, as ``DecodeGate.scores`` computes it."""
    with torch.no_grad():
        return gate.gate_query(q.unsqueeze(2), (lens - 1).long().view(-1, 1), rotary).squeeze(2)


def eager(gate, q, keys, lens, policy, bs):
    with torch.no_grad():
        logits = gate.scores(q, keys, (lens - 1).long(), rotary)
    return select_decode_blocks(logits, lens, policy, bs, keys.shape[2]), logits


def values_at(values, idx, fill=0.0):
    """values [..., NB] at the block indices idx [..., K] (-1 padding: ``fill``)."""
    return values.gather(-1, idx.long().clamp(min=0)).masked_fill(idx < 0, fill)


def assert_same_sets(got, want):
    """Row by row the same kept blocks; got ascending, then -1 padding."""
    assert got.dtype == torch.int32 and got.shape == want.shape
    for row_g, row_w in zip(got.flatten(0, 1).tolist(), want.flatten(0, 1).tolist(), strict=True):
        kept = sorted(j for j in row_w if j >= 0)
        assert row_g == kept + [-1] * (len(row_g) - len(kept)), (row_g, row_w)


# lengths: empty cache, one token, exactly at block boundaries, partial blocks, the full capacity
LENS = [0, 1, 16, 17, 64, 65, 100, 13 * 16]


@pytest.mark.parametrize("budget_blocks", [2, 5, 16])  # 16 > the 12 completed blocks of a full cache: padding
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3)])
def test_fused_matches_eager_gate_scores_and_budget_policy(budget_blocks, hq, hkv):
    """GQA and MHA, NB = 13 blocks (not a power of two), varlen batch, K from 2 (only first + current) to
    more than the completed blocks: the fused kernel keeps each row's eager set."""
    bs = 16
    gate, q, keys, qg, lens = gate_case(LENS, hq, hkv, 16, 13, bs, seed=budget_blocks)
    policy = DecodePolicy("budget", budget_blocks * bs)
    want, _ = eager(gate, q, keys, lens, policy, bs)
    got = select_decode_blocks_fused(qg, keys, lens, policy, bs)
    assert_same_sets(got, want)
    # the rows the lengths pin down: empty cache keeps nothing, one token (or a 16-token cache) only block 0,
    # a cache of 17 tokens blocks 0 and 1 (the current one; block 0 is completed but forced anyway)
    assert (got[0] == -1).all() and (got[1, :, 0] == 0).all() and (got[1, :, 1:] == -1).all()
    assert (got[2, :, 0] == 0).all() and (got[2, :, 1:] == -1).all()
    assert (got[3, :, :2] == torch.tensor([0, 1], dtype=torch.int32)).all()
    full = got[-1]
    assert ((full == 0).sum(-1) == 1).all() and ((full == 12).sum(-1) == 1).all()  # first and current block
    assert ((full >= 0).sum(-1) == min(budget_blocks, 13)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_fused_in_the_gate_dtypes(dtype):
    """fp16 gate queries / keys (fp32 products, as ``DecodeGate._logits`` promotes) and an fp64 gate (fp64
    products and an fp64 search key), against the eager path on the same tensors."""
    bs = 16
    gate, q, keys, _, lens = gate_case([200, 77, 33], 4, 2, 16, 13, bs, seed=3)
    gate, q, keys = gate.to(dtype), q.to(dtype), keys.to(dtype)
    qg = gate_query(gate, q, lens)
    assert qg.dtype == dtype
    policy = DecodePolicy("budget", 6 * bs)
    want, _ = eager(gate, q, keys, lens, policy, bs)
    assert_same_sets(select_decode_blocks_fused(qg, keys, lens, policy, bs), want)


def test_gate_dim_not_a_power_of_two_and_strided_inputs():
    """Dg = 24 (masked lanes of the gate-dim loop), keys a strided view of a wider cache, int64 lengths."""
    bs, nb = 16, 9
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(2, 3, nb + 4, 24, generator=g)
    keys = wide[:, :, 2 : nb + 2]
    qg = torch.randn(3, 2, 24, generator=g).transpose(0, 1)  # [B=2, Hkv=3, 24], not contiguous
    lens = torch.tensor([nb * bs, 5 * bs + 3])
    cur = (lens - 1).div(bs, rounding_mode="floor").view(-1, 1, 1, 1)
    completed = torch.arange(nb).view(1, 1, 1, -1) < cur
    logits = DecodeGate._logits(qg.unsqueeze(2), keys, completed).squeeze(2)
    policy = DecodePolicy("budget", 4 * bs)
    want = select_decode_blocks(logits, lens, policy, bs)
    assert_same_sets(select_decode_blocks_fused(qg, keys, lens, policy, bs), want)


def test_expanded_lengths_and_keys_as_decode_eval_passes_them():
    """The call ``_decode_selection`` makes for N rows of one sequence in decode_eval mode: the sequence's gate
    keys expanded over the rows (stride 0) and lengths expanded from one row (stride 0, read per row)."""
    bs, nb = 16, 9
    gate, q, keys, _, _ = gate_case([nb * bs], 4, 2, 16, nb, bs, seed=11)
    n = 4
    lens = torch.arange(5 * bs + 3, 5 * bs + 3 + n, dtype=torch.int32)  # rows crossing no boundary
    q = q.expand(n, -1, -1)
    kf = keys.expand(n, -1, -1, -1)
    policy = DecodePolicy("budget", 4 * bs)
    want, _ = eager(gate, q, kf, lens, policy, bs)
    assert_same_sets(select_decode_blocks_fused(gate_query(gate, q, lens), kf, lens, policy, bs), want)
    # one length for every row of a batch (n = 1 rows of B sequences), an expanded view
    same = torch.tensor([7 * bs + 1], dtype=torch.int32).expand(n)
    assert same.stride() == (0,)
    want, _ = eager(gate, q, kf, same.contiguous(), policy, bs)
    assert_same_sets(select_decode_blocks_fused(gate_query(gate, q, same), kf, same, policy, bs), want)


def test_the_rule_picking_fused_or_unfused():
    """resolve_decode_select: None is fused exactly for a budget policy on CUDA; explicit choices are kept;
    fused with a policy that needs the probabilities, or an unknown value, raises."""
    budget = DecodePolicy("budget", 4096)
    assert resolve_decode_select(None, budget, "cuda") == "fused"
    assert resolve_decode_select(None, budget, torch.device("cuda", 1)) == "fused"
    assert resolve_decode_select(None, budget, "cpu") == "unfused"
    for kind, value in (("threshold", 0.1), ("top_p", 0.9), ("dense", 0)):
        policy = DecodePolicy(kind, value)
        assert resolve_decode_select(None, policy, "cuda") == "unfused"
        assert resolve_decode_select("unfused", policy, "cuda") == "unfused"
        with pytest.raises(ValueError, match="'budget' policy kind without half_shift only"):
            resolve_decode_select("fused", policy, "cuda")
    assert resolve_decode_select("fused", budget, "cpu") == "fused"  # taken as given (the interpreter runs it)
    assert resolve_decode_select("unfused", budget, "cuda") == "unfused"
    with pytest.raises(ValueError, match="must be one of"):
        resolve_decode_select("triton", budget, "cuda")


def test_ties_go_to_the_lower_block_index():
    """Equal logits (identical gate keys) are kept from the lowest block index up, after the strictly better
    ones: a row of 10 completed blocks where blocks 7 and 8 score highest and every other block ties."""
    bs, nb = 16, 12
    keys = torch.zeros(1, 2, nb, 4)
    keys[..., 0] = 1.0  # every block: logit 0.5 (qg . kg / sqrt(4) with qg = [1, 0, 0, 0])
    keys[0, :, 7, 0] = keys[0, :, 8, 0] = 3.0
    keys[0, 1, 8, 0] = 2.0  # head 1: block 7 above block 8
    qg = torch.zeros(1, 2, 4)
    qg[..., 0] = 1.0
    lens = torch.tensor([11 * bs + 5])  # current block 11, completed 0..10
    got = select_decode_blocks_fused(qg, keys, lens, DecodePolicy("budget", 6 * bs), bs)
    # first (0) + current (11) + 7, 8 + the two lowest tied blocks after block 0: 1, 2
    assert got.tolist() == [[[0, 1, 2, 7, 8, 11], [0, 1, 2, 7, 8, 11]]]
    # all completed blocks tied: the lowest ones
    got = select_decode_blocks_fused(qg, torch.ones_like(keys), lens, DecodePolicy("budget", 5 * bs), bs)
    assert got.tolist() == [[[0, 1, 2, 3, 11]] * 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_keeps_the_bound_picks_as_eager_does(dtype):
    """DecodePolicy.bound_slots through the fused kernel: the listed blocks (random: completed ones, -1, repeats,
    the first or current block, blocks past the current) are kept where completed, the rest by logit, the same
    sets as the eager selection; varlen, GQA, NB = 13."""
    bs, m = 16, 3
    gate, q, keys, qg, lens = gate_case(LENS, 4, 2, 16, 13, bs, seed=3)
    gate, q, keys, qg = gate.to(dtype), q.to(dtype), keys.to(dtype), qg.to(dtype)
    g = torch.Generator().manual_seed(5)
    for budget_blocks in (5, 16):
        policy = DecodePolicy("budget", budget_blocks * bs, bound_slots=m)
        picks = torch.randint(-1, 14, (len(LENS), 2, m), generator=g, dtype=torch.int32)
        picks[-1, 0] = torch.tensor([3, 3, -1])  # a repeat and a missing pick in a full cache
        with torch.no_grad():
            logits = gate.scores(q, keys, (lens - 1).long(), rotary)
        want = select_decode_blocks(logits, lens, policy, bs, keys.shape[2], bound_blocks=picks)
        got = select_decode_blocks_fused(qg, keys, lens, policy, bs, bound_blocks=picks)
        assert_same_sets(got, want)
        plain = select_decode_blocks_fused(qg, keys, lens, DecodePolicy("budget", budget_blocks * bs), bs)
        if budget_blocks == 5:  # the picks moved blocks into the budget
            assert not torch.equal(got, plain)
        for i, n in enumerate(LENS):  # every completed pick is kept
            cur = max(0, (n - 1) // bs) if n else -1
            for h in range(2):
                done = {p for p in picks[i, h].tolist() if 0 <= p < cur}
                assert done <= set(got[i, h].tolist()), (n, h)
    with pytest.raises(ValueError, match=r"forced must be an int32 / int64 \[B, Hkv, M\]"):
        budget_decode_blocks(qg, keys, lens, 4, bs, forced=picks.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 4)])
def test_bound_scores_kernel_matches_the_reference(dtype, hq, hkv):
    """quest_bound_scores (Triton) against quest_block_scores (two fp32 matmuls): the same bounds up to fp32
    rounding on each row's ranked blocks (completed, not the first), -inf elsewhere; N rows per sequence at their
    own lengths (empty, one token, block edges), D not a power of two, NB 13, strided rows; the same picks."""
    bs, d, nb = 8, 24, 13
    g = torch.Generator().manual_seed(hq)
    lens = torch.tensor([[0, 1, 9], [16, 17, 50], [104, 100, 97]])
    q = torch.randn(3, 3, hq, d, generator=g).to(dtype).transpose(1, 2)  # [B, Hq, N, D], rows not contiguous
    kmin, kmax = quest_block_bounds(torch.randn(3, hkv, nb * bs, d, generator=g).to(dtype), bs)
    got = quest_bound_scores(q, kmin, kmax, lens, bs)
    want = quest_block_scores(q, kmin, kmax)
    j = torch.arange(nb)
    ranked = (j >= 1) & (j < ((lens - 1) // bs).view(3, 1, 3, 1))
    assert got.dtype == torch.float32 and got.shape == (3, hkv, 3, nb)
    assert torch.equal(torch.isfinite(got), ranked.expand_as(got))
    torch.testing.assert_close(got[ranked.expand_as(got)], want[ranked.expand_as(want)], rtol=1e-5, atol=1e-4)
    torch_picks = bound_block_picks(q, kmin, kmax, lens, 3, bs, "torch")
    assert torch.equal(bound_block_picks(q, kmin, kmax, lens, 3, bs, "triton"), torch_picks)
    with pytest.raises(ValueError, match=r"cache_seqlens must be an int32 / int64 \[B, N\]"):
        quest_bound_scores(q, kmin, kmax, lens[:, 0], bs)
    with pytest.raises(ValueError, match="kmax must match kmin"):
        quest_bound_scores(q, kmin, kmax.contiguous().to(torch.float64), lens, bs)
    with pytest.raises(ValueError, match="impl must be one of"):
        bound_block_picks(q, kmin, kmax, lens, 3, bs, "cuda")


def test_top_block_indices_are_topk_with_ties_to_the_lower_index():
    """top_block_indices (Triton) against torch.topk: the same values in the same order, -1 for -inf slots, equal
    values by ascending index; NB not a power of two, rows of -inf only, +inf entries."""
    g = torch.Generator().manual_seed(0)
    s = torch.randint(-3, 4, (5, 2, 37), generator=g).float()  # many ties
    s[0] = float("-inf")
    s[1, 0, 5:] = float("-inf")  # 5 finite entries
    s[2, 1, 30] = float("inf")
    for m in (1, 4, 16):
        got = top_block_indices(s, m)
        top = s.topk(m, dim=-1)
        assert got.dtype == torch.int32 and got.shape == (5, 2, m)
        vals = values_at(s, got, float("-inf"))
        assert torch.equal(vals, top.values)
        assert ((got < 0) == torch.isneginf(top.values)).all()
        for row, v in zip(got.view(-1, m).tolist(), vals.view(-1, m).tolist(), strict=True):  # ties ascending
            pairs = [(x, i) for x, i in zip(v, row, strict=True) if i >= 0]
            assert pairs == sorted(pairs, key=lambda p: (-p[0], p[1]))
    with pytest.raises(ValueError, match=r"slots must be an int in \[1, 16\]"):
        top_block_indices(s, 17)
    with pytest.raises(ValueError, match="non-empty fp32"):
        top_block_indices(s.double(), 2)


def test_non_budget_policies_and_bad_inputs_are_refused():
    bs = 16
    qg, keys, lens = torch.randn(2, 2, 8), torch.randn(2, 2, 4, 8), torch.tensor([40, 64], dtype=torch.int32)
    for kind, value in (("threshold", 0.1), ("top_p", 0.9), ("dense", 0)):
        with pytest.raises(ValueError, match="'budget' policy kind without half_shift only"):
            select_decode_blocks_fused(qg, keys, lens, DecodePolicy(kind, value), bs)
    with pytest.raises(ValueError, match=r"qg must be \[B, Hkv, Dg\]"):
        budget_decode_blocks(qg[:, :1], keys, lens, 2, bs)
    with pytest.raises(ValueError, match="keys must be a non-empty 4-D"):
        budget_decode_blocks(qg, keys[0], lens, 2, bs)
    with pytest.raises(TypeError, match="cache_seqlens must be an int32 or int64"):
        budget_decode_blocks(qg, keys, lens.float(), 2, bs)
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, NB \* block_size = 64\]"):
        budget_decode_blocks(qg, keys, torch.tensor([40, 65]), 2, bs)
    with pytest.raises(ValueError, match="num_slots must be an int >= 1"):
        budget_decode_blocks(qg, keys, lens, 0, bs)
    with pytest.raises(ValueError, match="power of two"):
        budget_decode_blocks(qg, keys, lens, 2, 24)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        with pytest.raises(TypeError, match="bf16 is silently wrong"):
            budget_decode_blocks(qg.bfloat16(), keys.bfloat16(), lens, 2, bs)


# ---------------------------------------------------------------------- GPU (compiled kernel, bf16)
def _on_gpu():
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@pytest.mark.gpu
@pytest.mark.skipif(not _on_gpu(), reason="needs a CUDA GPU and the compiled kernel (no TRITON_INTERPRET)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_32k_batch_16_matches_eager_and_captures_in_a_graph(dtype):
    """Llama-3.1-8B gate shapes (Hq 32, Hkv 8, D = Dg 128), a 32k cache (512 blocks of 64), batch 16 of
    varied lengths, budgets 2k and 4k. Summation order differs from the eager matmul, so a near tie at the
    budget's edge may swap two blocks: rows are compared by the eager logits of their kept blocks (sorted),
    which agree to a fraction of a logit's rounding (fp32) or to a few bf16 steps (bf16). No host sync; a CUDA
    graph of the call replays."""
    bs, nb = 64, 512
    lens = [32768, 32767, 32705, 32704, 20001, 8192, 4097, 4096, 1000, 200, 129, 128, 65, 64, 1, 0]
    gate, q, keys, _, lens_t = gate_case(lens, 32, 8, 128, nb, bs, seed=7, device="cuda")
    gate, q, keys = gate.to(dtype), q.to(dtype), keys.to(dtype)
    qg = gate_query(gate, q, lens_t)
    for budget in (2048, 4096):
        policy = DecodePolicy("budget", budget)
        want, logits = eager(gate, q, keys, lens_t, policy, bs)
        got = select_decode_blocks_fused(qg, keys, lens_t, policy, bs)
        torch.cuda.synchronize()
        assert ((got >= 0).sum(-1) == (want >= 0).sum(-1)).all()
        forced = torch.where(torch.isinf(logits), float("inf"), logits)  # first / current blocks: kept by both
        gl, wl = values_at(forced, got).sort(-1).values, values_at(forced, want).sort(-1).values
        # fp32: a fraction of a logit's rounding. bf16: the eager gate rounds its intermediates and logits to bf16
        # (8-bit significand) and the kernel's fp32 sums do not, so a near tie at the edge may swap blocks a few
        # bf16 steps of the logits' scale apart (H200, session 14: 4 of 4096 kept logits, up to 1.8e-3 apart at
        # logits of magnitude ~0.1-1); 2^-7 of the largest logit is ~4 such steps
        scale = logits[torch.isfinite(logits)].abs().max().item()
        atol = 1e-5 if dtype == torch.float32 else 2.0**-7 * scale
        torch.testing.assert_close(gl, wl, rtol=0.0, atol=atol)
        sorted_got = got.masked_fill(got < 0, nb).sort(-1).values
        assert torch.equal(sorted_got, got.masked_fill(got < 0, nb)), "kept blocks must be ascending, then -1"
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = select_decode_blocks_fused(qg, keys, lens_t, policy, bs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = select_decode_blocks_fused(qg, keys, lens_t, policy, bs)
    qg.copy_(torch.randn_like(qg))
    graph.replay()
    assert torch.equal(static, select_decode_blocks_fused(qg, keys, lens_t, policy, bs))


@pytest.mark.gpu
@pytest.mark.skipif(not _on_gpu(), reason="needs a CUDA GPU and the compiled kernel (no TRITON_INTERPRET)")
def test_gpu_bound_picks_at_32k_match_eager_and_replay_in_a_graph():
    """The compiled kernel with DecodePolicy.bound_slots (M = 2, fp32, Llama-3.1-8B gate shapes, a 32k cache of
    64-token blocks, batch 16 of varied lengths): the eager sets, in a CUDA graph too."""
    bs, nb = 64, 512
    lens = [32768, 32705, 20001, 8192, 4097, 4096, 1000, 200, 129, 128, 65, 64, 1, 0, 30000, 12345]
    gate, q, keys, qg, lens_t = gate_case(lens, 32, 8, 128, nb, bs, seed=9, device="cuda")
    policy = DecodePolicy("budget", 4096, bound_slots=2)
    picks = torch.randint(-1, nb, (len(lens), 8, 2), device="cuda", dtype=torch.int32)
    with torch.no_grad():
        logits = gate.scores(q, keys, (lens_t - 1).long(), rotary)
    want = select_decode_blocks(logits, lens_t, policy, bs, nb, bound_blocks=picks)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = select_decode_blocks_fused(qg, keys, lens_t, policy, bs, bound_blocks=picks)
    graph.replay()
    torch.cuda.synchronize()
    assert ((static >= 0).sum(-1) == (want >= 0).sum(-1)).all()
    # by the eager logits of the kept blocks, the picks and the first / current block as +inf (kept by both); a near
    # tie at the budget's edge may swap two blocks a fraction of a logit's rounding apart
    j = torch.arange(nb, device="cuda")
    done = j < ((lens_t.long() - 1) // bs).view(-1, 1, 1)
    picked = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, picks.long().clamp(min=0), picks >= 0) & done
    prio = torch.where(torch.isinf(logits) | picked, float("inf"), logits)
    gl, wl = values_at(prio, static).sort(-1).values, values_at(prio, want).sort(-1).values
    torch.testing.assert_close(gl, wl, rtol=0.0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not _on_gpu(), reason="needs a CUDA GPU and the compiled kernel (no TRITON_INTERPRET)")
def test_gpu_bound_scores_at_128k_batch_16_bf16_without_sync():
    """The bound kernel at Llama-3.1-8B shapes (Hq 32, Hkv 8, D 128), bf16 bounds of a 128k cache (2048 blocks of
    64), batch 16 of varied lengths: the reference's values to fp32 rounding, the same picks' bounds, no host sync,
    replayed from a CUDA graph."""
    bs, nb = 64, 2048
    g = torch.Generator(device="cuda").manual_seed(3)
    lens = torch.tensor([131072, 131071, 65537, 65536, 32768, 8192, 4097, 129, 128, 65, 64, 1, 0, 100000, 7, 70000])
    lens = lens.cuda().view(-1, 1)
    q = torch.randn(16, 32, 1, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    kmin = torch.randn(16, 8, nb, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    kmax = kmin + torch.rand(16, 8, nb, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    want = quest_block_scores(q, kmin, kmax)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = quest_bound_scores(q, kmin, kmax, lens, bs)
        picks = bound_block_picks(q, kmin, kmax, lens, 2, bs, "triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ranked = torch.isfinite(got)
    j = torch.arange(nb, device="cuda")
    assert torch.equal(ranked, ((j >= 1) & (j < ((lens - 1) // bs).view(16, 1, 1, 1))).expand_as(got))
    torch.testing.assert_close(got[ranked], want[ranked], rtol=1e-4, atol=1e-3)
    ref = bound_block_picks(q, kmin, kmax, lens, 2, bs, "torch")
    assert torch.equal(picks >= 0, ref >= 0)
    # near ties may swap
    torch.testing.assert_close(values_at(want, picks), values_at(want, ref), rtol=1e-4, atol=1e-3)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = quest_bound_scores(q, kmin, kmax, lens, bs)
    q.copy_(torch.randn_like(q))
    graph.replay()
    assert torch.equal(static, quest_bound_scores(q, kmin, kmax, lens, bs))
