"""StreamingLLM-style, Quest-style and attention-oracle decode selections against brute-force loops over
sequences, heads, blocks and channels (independent of the vectorised code)."""

from __future__ import annotations

import pytest
import torch

from seerattn.decode_baselines import (
    oracle_block_scores,
    oracle_decode_blocks,
    quest_block_bounds,
    quest_block_scores,
    quest_decode_blocks,
    streaming_decode_blocks,
)
from seerattn.decode_policy import DecodePolicy, bound_block_picks, select_decode_blocks
from seerattn.ops.reference import decode_block_max, decode_block_scores

LENS = [1, 16, 17, 40, 100, 161]  # empty past the first block, exact block ends, partial blocks, more blocks than slots


def _lists(idx: torch.Tensor) -> list[list[list[int]]]:
    """Valid entries of each (sequence, KV head) list, checked to be -1 padded at the end, without repeats."""
    out = []
    for seq in idx.tolist():
        rows = []
        for row in seq:
            valid = [x for x in row if x >= 0]
            assert row == valid + [-1] * (len(row) - len(valid)) and len(set(valid)) == len(valid)
            rows.append(sorted(valid))
        out.append(rows)
    return out


def _brute_select(scores: list[float], length: int, bs: int, slots: int) -> list[int]:
    """First + current block, then the completed blocks 1.. of highest score (ties: lower index first)."""
    cur = (length - 1) // bs
    keep = {0, cur}
    ranked = sorted(range(1, cur), key=lambda j: (-scores[j], j))
    return sorted(keep | set(ranked[: max(slots - len(keep), 0)]))


@pytest.mark.parametrize("bs", [16, 64])
def test_streaming_keeps_sink_current_and_most_recent(bs):
    lens = torch.tensor([n * bs // 16 for n in LENS], dtype=torch.int32)
    kv_blocks = -(-int(lens.max()) // bs)
    budget = 4 * bs
    k = torch.zeros(len(LENS), 2, kv_blocks * bs, 8)
    idx = streaming_decode_blocks(torch.zeros(len(LENS), 4, 8), k, lens, budget, bs)
    assert idx.shape == (len(LENS), 2, 4) and idx.dtype == torch.int32
    for i, rows in enumerate(_lists(idx)):
        cur = (int(lens[i]) - 1) // bs
        want = sorted({0, cur} | set(range(max(cur - 2, 1), cur)))  # two recent completed blocks fill the budget
        assert rows == [want, want], (int(lens[i]), rows)


def _brute_quest_scores(q, k, bs):
    b, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    nb = -(-k.shape[2] // bs)
    out = torch.full((b, hkv, nb), float("-inf"), dtype=torch.float64)
    for i in range(b):
        for h in range(hkv):
            for j in range(nb):
                rows = k[i, h, j * bs : (j + 1) * bs]
                lo, hi = rows.min(0).values, rows.max(0).values
                for head in range(h * g, (h + 1) * g):
                    s = sum(max(float(q[i, head, c] * lo[c]), float(q[i, head, c] * hi[c])) for c in range(d))
                    out[i, h, j] = max(out[i, h, j], s)
    return out


@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2), (8, 2)])
def test_quest_scores_and_selection_equal_brute_force(hq, hkv):
    bs, d = 16, 8
    g = torch.Generator().manual_seed(hq)
    lens = torch.tensor(LENS, dtype=torch.int32)
    t = 176  # capacity: 11 blocks; keys past each length are garbage that must not matter
    q = torch.randn(len(LENS), hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(len(LENS), hkv, t, d, generator=g, dtype=torch.float64)
    kmin, kmax = quest_block_bounds(k, bs)
    scores = quest_block_scores(q.unsqueeze(2), kmin, kmax).squeeze(2)
    want = _brute_quest_scores(q, k, bs)
    torch.testing.assert_close(scores, want, rtol=1e-10, atol=1e-10)
    # an upper bound of every key's q . k in the block, for every head of the group
    qk = torch.einsum("bhd,bhtd->bht", q, k.repeat_interleave(hq // hkv, 1)).view(len(LENS), hkv, -1, 11, bs)
    assert (qk.amax((2, 4)) <= scores + 1e-12).all()
    garbage = k.clone()
    for i, n in enumerate(LENS):
        garbage[i, :, ((n - 1) // bs) * bs :] = 1e3  # the current block and everything after it
    idx = quest_decode_blocks(q, k, lens, 5 * bs, bs)
    assert idx.shape == (len(LENS), hkv, 5) and idx.dtype == torch.int32
    assert torch.equal(idx, quest_decode_blocks(q, garbage, lens, 5 * bs, bs))
    for i, rows in enumerate(_lists(idx)):
        for h in range(hkv):
            assert rows[h] == _brute_select(want[i, h].tolist(), LENS[i], bs, 5), (LENS[i], h)
    # the same lists as the decode policy on these scores (one selection code for every method)
    assert torch.equal(idx, select_decode_blocks(scores, lens, DecodePolicy("budget", 5 * bs), bs))


def test_quest_errors():
    with pytest.raises(ValueError, match=r"kmin, kmax \[B, Hkv, NB, D\]"):
        quest_block_scores(torch.zeros(1, 4, 1, 8), torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="multiple of Hkv"):
        quest_block_scores(torch.zeros(1, 3, 1, 8), torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match=r"or q \[B, Hq, N, D\] with cache_seqlens \[B, N\]"):
        quest_decode_blocks(torch.zeros(1, 4, 8), torch.zeros(1, 2, 32, 8), torch.tensor([[20]]), 32, 16)
    with pytest.raises(ValueError, match="first and the current"):
        quest_decode_blocks(torch.zeros(1, 4, 8), torch.zeros(1, 2, 32, 8), torch.tensor([20]), 16, 16)


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (4, 2), (6, 2)])
def test_oracle_scores_and_selection_equal_brute_force(hq, hkv):
    """Per row: softmax over the visible keys, max over each block's keys and the group's heads (brute force
    per sequence, head and key); keys past a row's length change nothing; the lists are the decode policy's on
    these scores; on a full sequence the scores of completed blocks rank as the decode gate's distillation
    target (decode_block_scores: the same values before its renormalisation)."""
    bs, d, t, scale = 16, 8, 176, 0.7
    g = torch.Generator().manual_seed(20 + hq)
    lens = torch.tensor(LENS, dtype=torch.int32)
    q = torch.randn(len(LENS), hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(len(LENS), hkv, t, d, generator=g, dtype=torch.float64)
    scores = oracle_block_scores(q.unsqueeze(2), k, lens.view(-1, 1), bs, scale).squeeze(2)
    want = torch.zeros(len(LENS), hkv, 11, dtype=torch.float64)
    for i, n in enumerate(LENS):
        for h in range(hq):
            p = torch.softmax(k[i, h // (hq // hkv), :n] @ q[i, h] * scale, -1)
            for j in range(-(-n // bs)):
                want[i, h // (hq // hkv), j] = max(want[i, h // (hq // hkv), j], p[j * bs : (j + 1) * bs].max())
    torch.testing.assert_close(scores, want, rtol=1e-12, atol=1e-12)
    garbage = k.clone()
    for i, n in enumerate(LENS):
        garbage[i, :, n:] = 1e3
    idx = oracle_decode_blocks(q, k, lens, 5 * bs, bs, scale)
    assert torch.equal(idx, oracle_decode_blocks(q, garbage, lens, 5 * bs, bs, scale))
    assert torch.equal(idx, select_decode_blocks(scores, lens, DecodePolicy("budget", 5 * bs), bs))
    for i, rows in enumerate(_lists(idx)):
        for h in range(hkv):
            assert rows[h] == _brute_select(want[i, h].tolist(), LENS[i], bs, 5), (LENS[i], h)
    # every row of one sequence against decode_block_scores (completed blocks, renormalised: the same order)
    qs = torch.randn(1, hq, t, d, generator=g, dtype=torch.float64)
    rows_all = oracle_block_scores(qs, k[:1], torch.arange(1, t + 1).view(1, -1), bs, scale)
    target = decode_block_scores(qs, k[:1], bs, scale=scale)
    for r in range(bs, t, 7):
        done = r // bs  # blocks completed before row r's own
        got = rows_all[0, :, r, :done]
        torch.testing.assert_close(got / got.sum(-1, keepdim=True), target[0, :, r, :done], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"cache_seqlens must be \[B, N\]"):
        oracle_block_scores(q.unsqueeze(2), k, lens, bs, scale)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        oracle_block_scores(torch.zeros(1, 3, 1, 8), torch.zeros(1, 2, 32, 8), torch.tensor([[20]]), bs, scale)
    with pytest.raises(ValueError, match=r"visible must be \[B or 1, R\]"):
        decode_block_max(q.unsqueeze(2), k, lens, bs, scale)
    with pytest.raises(ValueError, match=r"needs q \[B, Hq, R, D\]"):
        decode_block_max(q, k, lens.view(-1, 1), bs, scale)


@pytest.mark.parametrize(
    "select",
    [quest_decode_blocks, streaming_decode_blocks, lambda *a: oracle_decode_blocks(*a, scale=0.4)],
    ids=["quest", "streaming", "oracle"],
)
def test_teacher_forced_rows_equal_decode_steps(select):
    """N rows of a window at once (cache_seqlens [B, N]) == one decode-step call per row."""
    bs, t = 16, 150
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, t, 8, generator=g)
    k = torch.randn(2, 2, t, 8, generator=g)
    rows = torch.arange(90, t)
    lens = (rows + 1).expand(2, -1).to(torch.int32)
    idx = select(q[:, :, rows], k, lens, 4 * bs, bs)
    assert idx.shape == (2, 2, len(rows), 4) and idx.dtype == torch.int32
    for n, r in enumerate(rows.tolist()):
        step = select(q[:, :, r], k, torch.full((2,), r + 1, dtype=torch.int32), 4 * bs, bs)
        assert torch.equal(idx[:, :, n], step), r


@pytest.mark.parametrize("hq, hkv", [(4, 2), (3, 3)])
def test_bound_block_picks_are_the_best_completed_blocks_by_brute_force(hq, hkv):
    """DecodePolicy.bound_slots' picks: per row the M completed blocks of highest brute-force Quest bound, the first
    block never (it is kept anyway), -1 where a row has fewer; keys at and past the current block do not matter."""
    bs, d, m = 16, 8, 3
    g = torch.Generator().manual_seed(hq + 10 * hkv)
    lens = torch.tensor(LENS, dtype=torch.int32)
    q = torch.randn(len(LENS), hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(len(LENS), hkv, 176, d, generator=g, dtype=torch.float64)
    want = _brute_quest_scores(q, k, bs)
    picks = bound_block_picks(q.unsqueeze(2), *quest_block_bounds(k, bs), lens.view(-1, 1), m, bs)
    assert picks.shape == (len(LENS), hkv, 1, m) and picks.dtype == torch.int32
    garbage = k.clone()
    for i, n in enumerate(LENS):
        garbage[i, :, ((n - 1) // bs) * bs :] = 1e3
    assert torch.equal(
        picks, bound_block_picks(q.unsqueeze(2), *quest_block_bounds(garbage, bs), lens.view(-1, 1), m, bs)
    )
    for i, n in enumerate(LENS):
        eligible = list(range(1, max(0, (n - 1) // bs)))
        for h in range(hkv):
            best = sorted(eligible, key=lambda j: -want[i, h, j].item())[:m]
            assert picks[i, h, 0].tolist() == best + [-1] * (m - len(best)), (n, h)
    with pytest.raises(ValueError, match="slots must be an int >= 1"):
        bound_block_picks(q.unsqueeze(2), *quest_block_bounds(k, bs), lens.view(-1, 1), 0, bs)
    with pytest.raises(ValueError, match=r"cache_seqlens \[B, N\]"):
        bound_block_picks(q.unsqueeze(2), *quest_block_bounds(k, bs), lens, m, bs)
    with pytest.raises(ValueError, match="bound_block_picks: block_size must be a positive power of two"):
        bound_block_picks(q.unsqueeze(2), *quest_block_bounds(k, bs), lens.view(-1, 1), m, 24)


def test_bound_blocks_are_kept_before_the_logits_rank_the_rest():
    """select_decode_blocks with bound_blocks: the picks that are completed blocks are kept like the first and the
    current block (a pick outside them, -1 or a repeat costs no slot), the rest of the budget goes by logit."""
    bs, k = 16, 5
    policy = DecodePolicy("budget", k * bs, bound_slots=2)
    logits = torch.arange(12, dtype=torch.float32).expand(1, 1, 12).clone()  # later blocks score higher
    lens = torch.tensor([10 * bs + 3])  # completed 0..9, current 10
    cases = {
        (2, 4): {0, 10, 2, 4, 9},  # two picks, then the best logit left (9)
        (4, -1): {0, 10, 4, 9, 8},  # one pick
        (3, 3): {0, 10, 3, 9, 8},  # a repeat
        (0, 10): {0, 10, 9, 8, 7},  # first and current are kept anyway
        (11, -1): {0, 10, 9, 8, 7},  # past the current block: not a completed block, ignored
    }
    for picks, want in cases.items():
        bound = torch.tensor(picks, dtype=torch.int32).view(1, 1, 2)
        got = select_decode_blocks(logits, lens, policy, bs, bound_blocks=bound)
        assert set(got[0, 0].tolist()) == want, picks
        assert set(got[0, 0, :4].tolist()) >= {0, 10} | {p for p in picks if 0 <= p < 10}  # forced first
    with pytest.raises(ValueError, match="needs bound_blocks"):
        select_decode_blocks(logits, lens, policy, bs)
    with pytest.raises(ValueError, match="bound_slots=0"):
        select_decode_blocks(logits, lens, DecodePolicy("budget", k * bs), bs, bound_blocks=bound)
    with pytest.raises(ValueError, match=r"needs bound_blocks, int32 / int64 \[1, 1, 2\]"):
        select_decode_blocks(logits, lens, policy, bs, bound_blocks=bound[..., :1])


def test_bound_slots_policy_validation():
    assert DecodePolicy("budget", 64, bound_slots=2).num_slots(16, 100) == 4
    with pytest.raises(ValueError, match="need >= 80 tokens"):
        DecodePolicy("budget", 64, bound_slots=3).num_slots(16, 100)
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="bound_slots must be an int >= 0"):
            DecodePolicy("budget", 64, bound_slots=bad)
    with pytest.raises(ValueError, match="0 for kinds other than 'budget'"):
        DecodePolicy("top_p", 0.9, bound_slots=1)
