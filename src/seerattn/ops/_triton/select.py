"""Sparsity-policy selection in one Triton kernel: scores -> ``BlockMask`` lists, no sort.

Algorithm
---------
A program holds ``BLOCK_R`` rows (batch, mask head, query-block row ``I``) of causal scores in
registers and writes the row's kept-block list (ascending) and count directly:

- ``dense``: every causal block; ``threshold``: ``score >= value``;
- ``density`` (row budgets ``k_I`` from :func:`seerattn.block_mask.density_row_budget`): the ``k_I``
  best blocks, forced blocks (sink, diagonal) ranking first. Instead of sorting, the ``k``-th
  largest score is found exactly by a search on an order-preserving integer key of the float:
  ``theta`` is the largest key with at least ``k`` keys ``>= theta``, built two bits a pass (the
  counts at the three candidates packed into one reduction) from the highest bit where the row's
  possible thresholds differ, stopping early once exactly ``k`` keys are ``>= theta``. Blocks above
  ``theta`` are kept, and of the blocks equal to ``theta`` the lowest columns, as many as the
  budget has left: exactly what a stable descending sort keeps
  (equal scores by lower column; ``-0.0`` counts as ``0.0``, as in the sort). This kind has its own
  kernel (:func:`_density_kernel`), with a branch per width class of rows (``W/2 <= I < W``), so a
  row is read and ranked over its causal part (at most twice it), not the full ``NQ``;
- ``top_p``: a bitwise search (32 or 64 passes of a masked sum over the row) on the mass: ``theta``
  is the largest key whose blocks at or above it hold at least ``value`` times the row's mass.
  Blocks above it are kept, and blocks equal to it by lower column while the mass before them is
  below the target: the minimal prefix of the stable descending sort.

Then the forced blocks, ``dense_last_rows``, and a row's best block when nothing else was kept
(first column on a tie, like ``argmax``), as :func:`seerattn.block_mask.mask_from_scores` does.

- ``density`` with the ``head`` allocation (one budget over a head's whole map, ranked in row-major
  order like the sort of the flattened map): the head's budget-th key comes from a radix select
  (8 bits a pass: a histogram kernel over the head's rows, atomically summed, then a one-program
  digit kernel), one more pass counts each row's entries equal to it, and the selection kernel
  keeps the keys above it and, in row-major order, as many equal ones as the budget has left.

Layouts: scores ``[B, H, NQ, NQ]`` (any strides with a unit last stride; fp16/bf16/fp32 are ranked
in fp32, fp64 in fp64); outputs int32 ``kv_num_blocks [B, H, NQ]``, ``kv_indices [B, H, NQ, NQ]``
(padding slots 0). NaN scores are not detected (the caller checks CPU scores).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .config import interpreting

__all__ = ["KINDS", "select_fwd"]

KINDS = {"dense": 0, "threshold": 1, "density": 2, "top_p": 3, "head": 4}
# _density_kernel's launch: up to DENSITY_TILE scores and DENSITY_ROWS rows a program, DENSITY_PER_THREAD scores a
# thread (1 to 4 warps), width classes down to MIN_WIDTH. From the H200 sweep of select_bench.py --sweep (session 10,
# docs/experiments/prefill-gate-policy/session10): (1, 16, 64) was the fastest of 11 launches on all four NQ 2048
# cases (gate-like scores 0.87 / 0.85 ms against 1.14 / 1.11 for the offline choice (4, 8, 64)); at NQ 512 the
# launches are within 0.1 ms of each other. Offline sm_90 build at 16 scores a thread: 80-151 registers, no spills.
DENSITY_TILE = 2048
DENSITY_ROWS = 1
DENSITY_PER_THREAD = 16
MIN_WIDTH = 64
# Registers a thread of _density_kernel may take (Triton's ``maxnreg``). The search is bound by the integer pipe (Nsight
# Compute, session 27: 86-88 % of its peak) and more resident programs keep it fed: with the digit counts the kernel
# took 95 registers (21 one-warp programs an SM); capped at 72 (28), density 0.1 selects in 0.0418 ms at NQ 512 and
# 0.735 at 2048 against 0.0436 / 0.779 uncapped and 0.0471 / 0.868 for the compares before (H200, session 27, call 8;
# 64: 0.0415 / 0.738). The same lists in every case.
DENSITY_MAXNREG = 72
# Consecutive classes whose launch is the same (rows a program, warps) share one launch: at NQ 512 the four classes,
# 0.0714 ms replayed from a CUDA graph against 0.0818 as four launches; at NQ 2048 three launches instead of six,
# 0.874 vs 0.870 ms (H200, session 17, docs/experiments/prefill-gate-policy/session17, call 3).


@triton.jit
def _order_key(x, KEY64: tl.constexpr):
    """Unsigned integer key with the order of the float ``x`` (-0.0 mapped to +0.0 first)."""
    x = tl.where(x == 0.0, 0.0, x)
    if KEY64:
        bits = x.to(tl.uint64, bitcast=True)
        sign = (bits >> 63) != 0
        return tl.where(sign, bits ^ 0xFFFFFFFFFFFFFFFF, bits | 0x8000000000000000)
    else:
        bits = x.to(tl.uint32, bitcast=True)
        sign = (bits >> 31) != 0
        return tl.where(sign, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _unit(KEY64: tl.constexpr):
    """1 in the key's unsigned type."""
    if KEY64:
        return tl.full([], 1, tl.uint64)
    else:
        return tl.full([], 1, tl.uint32)


@triton.jit
def _all_ones(KEY64: tl.constexpr):
    """The key's unsigned type's largest value (``~`` on unsigned tensors fails under the interpreter)."""
    if KEY64:
        return tl.full([], 0xFFFFFFFFFFFFFFFF, tl.uint64)
    else:
        return tl.full([], 0xFFFFFFFF, tl.uint32)


@triton.jit
def _load_rows(S, b, h, i, r_ok, stride_sb, stride_sh, stride_si, NQ, SINK: tl.constexpr, DIAG: tl.constexpr,
               NKP: tl.constexpr, KEY64: tl.constexpr):  # fmt: skip
    """Rows ``i`` (with batch ``b``, head ``h``, per row) of the scores ``[.., NQ]``: (cols, causal, s, forced);
    ``s`` is ``-inf`` off the causal part (and on rows past the end)."""
    cols = tl.arange(0, NKP)
    causal = (cols[None, :] <= i[:, None]) & r_ok[:, None]
    s_ptr = S + b * stride_sb + h * stride_sh + i.to(tl.int64) * stride_si
    # loaded up to the causal part's end rounded up to 4 columns (within the row): a mask constant over aligned
    # groups of 4, so the loads are 16-byte vectors where NQ and the row stride allow (a per-column mask made every
    # load a 4-byte one); the columns past the diagonal are then set to -inf
    ld = (cols[None, :] < tl.minimum((i + 4) // 4 * 4, NQ)[:, None]) & r_ok[:, None]
    if KEY64:
        s = tl.load(s_ptr[:, None] + cols[None, :], mask=ld, other=float("-inf")).to(tl.float64)
    else:
        s = tl.load(s_ptr[:, None] + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32)
    s = tl.where(causal, s, float("-inf"))
    forced = causal & (cols[None, :] < 0)
    if SINK:
        forced = forced | (causal & (cols[None, :] == 0))
    if DIAG:
        forced = forced | (causal & (cols[None, :] == i[:, None]))
    return cols, causal, s, forced


@triton.jit
def _store_list(i_ptr, keep, cols, r_ok, NQ):
    """Writes each row's kept columns ``cols[keep]`` (ascending) to the first slots of its list at ``i_ptr`` and
    zeros to the slots after them up to column ``NQ`` (or the tile's width, whichever is first); returns the counts.
    The zeros are written first, from the count rounded down to 4 on, under a mask constant over aligned groups of 4:
    16-byte vector stores where NQ and the row stride allow (a per-slot mask made every padding store a 4-byte one);
    after a barrier the kept columns overwrite the up to 3 slots of that group below the count."""
    cnt = tl.sum(keep.to(tl.int32), 1)
    pos = tl.cumsum(keep.to(tl.int32), 1) - 1
    pad = (cols[None, :] >= (cnt // 4 * 4)[:, None]) & (cols[None, :] < NQ) & r_ok[:, None]
    tl.store(i_ptr[:, None] + cols[None, :], tl.zeros_like(pos), mask=pad)
    tl.debug_barrier()  # the zeros before the kept columns: another thread's store may hit the same slot
    tl.store(i_ptr[:, None] + pos, tl.zeros_like(pos) + cols[None, :], mask=keep)
    return cnt


@triton.jit
def _head_hist_kernel(
    S, Prefix, Hist, stride_sb, stride_sh, stride_si, NQ, H,
    SHIFT: tl.constexpr, SINK: tl.constexpr, DIAG: tl.constexpr, NKP: tl.constexpr, BLOCK_R: tl.constexpr,
    KEY64: tl.constexpr,
):  # fmt: skip
    """``head`` allocation, one radix pass: histogram (256 bins, atomically added per head) of the
    key digit at ``SHIFT`` of the head's entries whose higher digits equal the prefix found so far.
    Every entry of the head's [NQ, NQ] map counts (above the diagonal as -inf), as in the sort."""
    bh = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = i < NQ
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols, causal, s, forced = _load_rows(S, b, h, i, r_ok, stride_sb, stride_sh, stride_si, NQ, SINK, DIAG, NKP, KEY64)
    key = _order_key(tl.where(forced, float("inf"), s), KEY64)
    inb = r_ok[:, None] & (cols[None, :] < NQ)
    prefix = tl.load(Prefix + bh)
    high = (key >> (SHIFT + 8)) << (SHIFT + 8) if SHIFT + 8 < (64 if KEY64 else 32) else key * 0
    phigh = (prefix >> (SHIFT + 8)) << (SHIFT + 8) if SHIFT + 8 < (64 if KEY64 else 32) else prefix * 0
    match = inb & (high == phigh)
    digit = ((key >> SHIFT) & 255).to(tl.int32)
    hist = tl.histogram(tl.reshape(digit, [BLOCK_R * NKP]), 256, mask=tl.reshape(match, [BLOCK_R * NKP]))
    tl.atomic_add(Hist + bh * 256 + tl.arange(0, 256), hist, sem="relaxed")


@triton.jit
def _head_digit_kernel(Hist, Prefix, Rem, SHIFT: tl.constexpr):
    """Per head: the digit at ``SHIFT`` of the ``Rem``-th largest key among those matching the prefix;
    appends it to the prefix and leaves in ``Rem`` how many keys equal to the final prefix to keep."""
    bh = tl.program_id(0)
    d = tl.arange(0, 256)
    hist = tl.load(Hist + bh * 256 + d)
    rem = tl.load(Rem + bh)
    at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # keys with digit >= d
    best = tl.max(tl.where(at_least >= rem, d, -1), 0)
    above = tl.sum(tl.where(d > best, hist, 0), 0)
    prefix = tl.load(Prefix + bh)
    tl.store(Prefix + bh, prefix | (best.to(prefix.dtype) << SHIFT))
    tl.store(Rem + bh, rem - above)


@triton.jit
def _head_ties_kernel(
    S, Prefix, Ties, stride_sb, stride_sh, stride_si, NQ, H,
    SINK: tl.constexpr, DIAG: tl.constexpr, NKP: tl.constexpr, BLOCK_R: tl.constexpr, KEY64: tl.constexpr,
):  # fmt: skip
    """``head`` allocation: per row, how many entries equal the head's threshold key."""
    bh = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = i < NQ
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols, causal, s, forced = _load_rows(S, b, h, i, r_ok, stride_sb, stride_sh, stride_si, NQ, SINK, DIAG, NKP, KEY64)
    key = _order_key(tl.where(forced, float("inf"), s), KEY64)
    inb = r_ok[:, None] & (cols[None, :] < NQ)
    tied = inb & (key == tl.load(Prefix + bh))
    tl.store(Ties + bh * NQ + i, tl.sum(tied.to(tl.int32), 1), mask=r_ok)


@triton.jit
def _select_kernel(
    S, Value, Num, Idx, Theta, Need, TiesBefore,
    stride_sb, stride_sh, stride_si,
    stride_nb, stride_nh,
    stride_ib, stride_ih, stride_ii,
    NQ, H, N_ROWS, DENSE_FROM,
    KIND: tl.constexpr, SINK: tl.constexpr, DIAG: tl.constexpr, NKP: tl.constexpr, BLOCK_R: tl.constexpr,
    KEY64: tl.constexpr, BITS: tl.constexpr,
):  # fmt: skip
    # Rows are numbered longest first: r -> (query-block row i = NQ - 1 - r // (B*H), b*H + h = r % (B*H)),
    # so the first programs take the longest rows and short rows fill the tail.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < N_ROWS
    bhs = N_ROWS // NQ
    i = NQ - 1 - r // bhs
    bh = r % bhs
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    i = tl.where(r_ok, i, 0)
    cols, causal, s, forced = _load_rows(S, b, h, i, r_ok, stride_sb, stride_sh, stride_si, NQ, SINK, DIAG, NKP, KEY64)

    if KIND == 0:
        keep = causal
    elif KIND == 1:
        value = tl.load(Value)
        keep = (s >= value) & causal
    elif KIND == 4:
        # head allocation: the head's threshold key and quota of ties were found by the radix passes;
        # ties are kept in row-major order, so a row's quota starts after the earlier rows' ties
        key = _order_key(tl.where(forced, float("inf"), s), KEY64)
        theta = tl.load(Theta + bh)[:, None]
        inb = r_ok[:, None] & (cols[None, :] < NQ)
        tied = inb & (key == theta)
        rank = tl.load(TiesBefore + bh * NQ + i, mask=r_ok, other=0)[:, None] + tl.cumsum(tied.to(tl.int32), 1)
        keep = causal & ((key > theta) | (tied & (rank <= tl.load(Need + bh, mask=r_ok, other=0)[:, None])))
    else:
        value = tl.load(Value)
        p = tl.where(causal, tl.maximum(s, 0.0), 0.0)
        p = tl.where(p != p, 0.0, p)  # nan_to_num: NaN -> 0, +inf -> the largest finite value
        if KEY64:
            p = tl.where(p == float("inf"), tl.full([], 1.7976931348623157e308, tl.float64), p)
        else:
            p = tl.where(p == float("inf"), 3.4028234663852886e38, p)
        target = value * tl.sum(p, 1, keep_dims=True)
        key = _order_key(p, KEY64)
        theta = tl.zeros([BLOCK_R, 1], dtype=tl.int32).to(key.dtype)
        for bit in tl.static_range(BITS - 1, -1, -1):
            cand = theta | (_unit(KEY64) << bit)
            mass = tl.sum(tl.where(causal & (key >= cand), p, 0.0), 1, keep_dims=True)
            theta = tl.where(mass >= target, cand, theta)
        above = causal & (key > theta)
        tied = causal & (key == theta)
        before = tl.sum(tl.where(above, p, 0.0), 1, keep_dims=True) + tl.cumsum(tl.where(tied, p, 0.0), 1) - p
        keep = above | (tied & (before < target))
    keep = keep | forced
    keep = tl.where((i >= DENSE_FROM)[:, None], causal, keep)
    # no empty row: the best causal block (first on a tie, like argmax)
    best = tl.argmax(s, 1, tie_break_left=True)
    empty = tl.sum(keep.to(tl.int32), 1) == 0
    keep = keep | (causal & empty[:, None] & (cols[None, :] == best[:, None]))

    i_ptr = Idx + b * stride_ib + h * stride_ih + i.to(tl.int64) * stride_ii
    cnt = _store_list(i_ptr, keep, cols, r_ok, NQ)
    tl.store(Num + b * stride_nb + h * stride_nh + i, cnt, mask=r_ok)


@triton.jit
def _density_rows(
    S, Budget, Num, Idx,
    stride_sb, stride_sh, stride_si,
    stride_nb, stride_nh,
    stride_ib, stride_ih, stride_ii,
    NQ, H, BH, ROW_LO, ROW_HI, DENSE_FROM, prog,
    SINK: tl.constexpr, DIAG: tl.constexpr, W: tl.constexpr, BLOCK_R: tl.constexpr, KEY64: tl.constexpr,
):  # fmt: skip
    """``density`` with row budgets (every budget >= 1), program ``prog`` of the query-block rows ``ROW_LO <= I <
    ROW_HI`` of all ``BH`` (batch, head) pairs, every one of them shorter than ``W``: rows are loaded and ranked
    ``W`` columns wide (their causal part), not ``NQ``.

    The budget-th key is searched two bits a pass: the counts of keys at or above the three candidates
    for the next two bits are packed into one integer's lanes and summed by one reduction (at most 16
    reductions for fp32 keys, not 32), from the highest bit where the row's possible thresholds differ (the bits
    above it are the smallest and largest candidate's common ones), and the search stops once every row of the
    program has a threshold with exactly its budget at or above it (no tie across the budget; rows whose budget is
    their whole length stop at once). Ties at the threshold are ranked by column (a scan) only when
    some row of the program keeps part of them."""
    # rows longest first, as in _select_kernel: r -> (I = ROW_HI - 1 - r // BH, b*H + h = r % BH)
    r = prog * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < (ROW_HI - ROW_LO) * BH
    i = tl.where(r_ok, ROW_HI - 1 - r // BH, 0)
    bh = r % BH
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols, causal, s, forced = _load_rows(S, b, h, i, r_ok, stride_sb, stride_sh, stride_si, NQ, SINK, DIAG, W, KEY64)
    k = tl.minimum(tl.load(Budget + i, mask=r_ok, other=1), i + 1).to(tl.int64)[:, None]
    # key 0 off the causal part: every causal key is larger (-inf maps to 0x007F...), so the counts
    # below need no causal mask (the search's candidates are never 0)
    key = tl.where(causal, _order_key(tl.where(forced, float("inf"), s), KEY64), 0)
    # The search starts at the highest bit where the row's possible thresholds differ, not at the key's top bit:
    # theta lies between the row's smallest causal key and its largest unforced one when the budget exceeds the
    # forced blocks (some unforced key is among the k largest), else between the forced blocks' key (+inf's) and the
    # row's largest key. The bits above the highest one where those two bounds differ are theta's already. Gate
    # logits of a row span a few binades, so their keys share sign, exponent and top mantissa bits: on the testbed's
    # trained gates 4.3 passes a row against 6.8 from the top (density 0.1, 8k tokens), on fresh gates' narrow rows
    # 4.6 against 9.7; iid N(0, 3^2) rows, which mix signs, 6.8 against 7.3 (session 28, a simulation in PyTorch).
    # Timed (H200, session 28, call 1, density 0.1, two alternating rounds, the same lists): at NQ 512 narrow rows
    # 0.0357 ms against 0.0471, a fresh gate's logits 0.0412 against 0.0430, N(0, 3^2) 0.0401 against 0.0418; at
    # NQ 2048 narrow rows 0.651 against 0.850, but the gate's and N(0, 3^2) rows 0.764 / 0.741 against 0.758 / 0.735
    # (the bounds' two reductions cost more than the passes they save on those wide rows).
    inf_key = _order_key(tl.full([], float("inf"), tl.float64 if KEY64 else tl.float32), KEY64)
    free = causal & ~forced
    top = tl.max(tl.where(free, key, 0), 1)[:, None]  # 0 when no block is free
    low = tl.min(tl.where(free, key, _all_ones(KEY64)), 1)[:, None]  # all ones when none is
    if SINK and DIAG:  # the row's forced blocks: the sink and the diagonal, one block in row 0
        n_forced = tl.where(i > 0, 2, 1)[:, None]
    elif SINK or DIAG:
        n_forced = tl.full([BLOCK_R, 1], 1, tl.int32)
    else:
        n_forced = tl.full([BLOCK_R, 1], 0, tl.int32)
    some_free = k > n_forced
    lo = tl.where(some_free, tl.where(n_forced > 0, tl.minimum(low, inf_key), low), inf_key)
    hi = tl.where(some_free, top, tl.maximum(top, inf_key))
    diff = lo ^ hi
    # the highest set bit of diff from a float's exponent: diff & ~(diff >> 1) has the same top bit and no two
    # adjacent ones, so the conversion's rounding cannot carry it into the next binade
    one_bits = diff & ((diff >> 1) ^ _all_ones(KEY64))
    if KEY64:
        high_bit = ((one_bits.to(tl.float64).to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023
    else:
        high_bit = ((one_bits.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    # a pass settles bits (bit + 1, bit) with bit even; rows past the end and rows with one possible threshold (lo
    # == hi) need none. One start for the program's rows: the highest, where every row's bits above it are settled.
    bit = tl.max(tl.where((diff != 0) & r_ok[:, None], high_bit & ~1, -1)).to(tl.int32)
    theta = tl.where(bit >= 0, (lo >> (bit + 1).to(key.dtype) >> 1) << 1 << (bit + 1).to(key.dtype), lo)
    # keys >= theta: every causal key when some block is free (all are >= lo); else at most that (the count is only
    # read to stop the search early and to spot ties, so an upper bound at the start just runs the passes out); rows
    # past the end count as done (their budget 1 is "met")
    n_ge = tl.where(r_ok, i + 1, 1).to(tl.int64)[:, None]
    # a row's counts are at most W: up to W = 512 three 10-bit lanes fit an int32 (summed by one REDUX; a third fewer
    # instructions a pass than 64-bit lanes), wider rows take 21-bit lanes of an int64
    LANE: tl.constexpr = 10 if W <= 512 else 21
    # a key's three counts (>= c1, >= c2, >= c3) in its lanes: ones in the lowest m lanes, m its digit below
    ONES = tl.full([], 1 + (1 << LANE) + (1 << 2 * LANE), tl.int32 if LANE == 10 else tl.int64)
    while bit >= 0:
        c1 = theta | (_unit(KEY64) << bit.to(key.dtype))
        c2 = theta | (_unit(KEY64) << (bit + 1).to(key.dtype))
        c3 = c1 | c2
        # theta's bits from bit + 2 up are settled and the candidates are theta + d * 2^bit (d = 1, 2, 3), so a key is
        # >= candidate d exactly when its digit m = min(max(key, theta) - theta, 3 * 2^bit) >> bit is >= d: a key's
        # three counts are ONES shifted right by (3 - m) lanes. Four integer-pipe instructions a key (a max, a fused
        # subtract-and-min, two shifts; the shift's multiply-add on the FMA pipe) against six for three compares and
        # selects, in a kernel bound by the integer pipe (DENSITY_MAXNREG).
        cap = c3 - theta
        m = (tl.minimum(tl.maximum(key, theta) - theta, cap) >> bit.to(key.dtype)).to(ONES.dtype)
        packed = ONES >> (3 * LANE - m * LANE)
        tot = tl.sum(packed, 1, keep_dims=True).to(tl.int64)
        n1 = tot & ((1 << LANE) - 1)
        n2 = (tot >> LANE) & ((1 << LANE) - 1)
        n3 = tot >> 2 * LANE
        theta = tl.where(n3 >= k, c3, tl.where(n2 >= k, c2, tl.where(n1 >= k, c1, theta)))
        n_ge = tl.where(n3 >= k, n3, tl.where(n2 >= k, n2, tl.where(n1 >= k, n1, n_ge)))
        bit = tl.where(tl.max(n_ge - k) == 0, -1, bit - 2)
    above = key > theta
    tied = causal & (key == theta)
    need = k - tl.sum(above.to(tl.int64), 1, keep_dims=True)
    keep = above | tied
    if tl.max(n_ge - k) > 0:  # a tie across some row's budget: its lowest columns first
        keep = above | (tied & (tl.cumsum(tied.to(tl.int32), 1) <= need))
    keep = keep | forced
    keep = tl.where((i >= DENSE_FROM)[:, None], causal, keep)

    i_ptr = Idx + b * stride_ib + h * stride_ih + i.to(tl.int64) * stride_ii
    cnt = _store_list(i_ptr, keep, cols, r_ok, NQ)
    for c in range(W, NQ, W):  # the slots past the width: padding
        pad = (c + cols[None, :] < NQ) & r_ok[:, None]
        tl.store(i_ptr[:, None] + c + cols[None, :], tl.zeros([BLOCK_R, W], dtype=tl.int32), mask=pad)
    tl.store(Num + b * stride_nb + h * stride_nh + i, cnt, mask=r_ok)


@triton.jit
def _density_kernel(
    S, Budget, Num, Idx,
    stride_sb, stride_sh, stride_si,
    stride_nb, stride_nh,
    stride_ib, stride_ih, stride_ii,
    NQ, H, BH, ROW_HI, LAST_LO, DENSE_FROM,
    SINK: tl.constexpr, DIAG: tl.constexpr, W0: tl.constexpr, CLASSES: tl.constexpr, BLOCK_R: tl.constexpr,
    KEY64: tl.constexpr,
):  # fmt: skip
    """``CLASSES`` consecutive width classes in one launch: class ``c`` ranks rows ``W/2 <= I < W`` at width ``W =
    W0 >> c`` (the first class's rows end at ``ROW_HI``, the last's start at ``LAST_LO``), its programs after the
    wider classes' (longest rows first). Each class is its own branch, compiled at its width."""
    pid = tl.program_id(0)
    start = 0
    for c in tl.static_range(CLASSES):  # the class's width W0 >> c (a constexpr cannot be reassigned in the loop)
        if c == 0:
            hi = ROW_HI
        else:
            hi = W0 >> c
        if c == CLASSES - 1:
            lo = LAST_LO
        else:
            lo = W0 >> (c + 1)
        progs = tl.cdiv((hi - lo) * BH, BLOCK_R)
        if (pid >= start) & (pid < start + progs):
            _density_rows(
                S, Budget, Num, Idx, stride_sb, stride_sh, stride_si, stride_nb, stride_nh,
                stride_ib, stride_ih, stride_ii, NQ, H, BH, lo, hi, DENSE_FROM, pid - start,
                SINK, DIAG, W0 >> c, BLOCK_R, KEY64,
            )  # fmt: skip
        start += progs


def _head_threshold(scores, total, keep_sink, keep_diagonal, key64, nkp):
    """``head`` allocation: per (batch, head) the ``total``-th largest key of the head's map (radix
    select, 8 bits a pass), the number of entries equal to it that the budget keeps, and per row the
    number of such entries in earlier rows. Returns (theta [B*H], need [B*H], ties_before [B*H, NQ])."""
    b, h, nq, _ = scores.shape
    dev = scores.device
    bits = 64 if key64 else 32
    prefix = torch.zeros(b * h, dtype=torch.int64 if key64 else torch.int32, device=dev)
    prefix = prefix.view(torch.uint64 if key64 else torch.uint32)
    rem = torch.full((b * h,), min(total, nq * nq), dtype=torch.int32, device=dev)
    hist = torch.zeros(bits // 8, b * h, 256, dtype=torch.int32, device=dev)
    block_r = max(1, min(triton.next_power_of_2(nq), (1 << 16 if interpreting() else 4096) // nkp))
    grid = (b * h, triton.cdiv(nq, block_r))
    strides = (scores.stride(0), scores.stride(1), scores.stride(2))
    for n, shift in enumerate(range(bits - 8, -1, -8)):
        _head_hist_kernel[grid](
            scores, prefix, hist[n], *strides, nq, h,
            SHIFT=shift, SINK=keep_sink, DIAG=keep_diagonal, NKP=nkp, BLOCK_R=block_r, KEY64=key64,
        )  # fmt: skip
        _head_digit_kernel[(b * h,)](hist[n], prefix, rem, SHIFT=shift)
    ties = torch.empty(b * h, nq, dtype=torch.int32, device=dev)
    _head_ties_kernel[grid](
        scores, prefix, ties, *strides, nq, h,
        SINK=keep_sink, DIAG=keep_diagonal, NKP=nkp, BLOCK_R=block_r, KEY64=key64,
    )  # fmt: skip
    ties_before = (ties.cumsum(-1, dtype=torch.int32) - ties).contiguous()
    return prefix, rem, ties_before


def _density_launch(scores, budget, num, idx, keep_sink, keep_diagonal, dense_last_rows, key64):
    """``density`` with row budgets: width classes, the rows ``W/2 <= I < W`` for ``W`` = next power of two of NQ,
    halved down to ``MIN_WIDTH`` (whose class also takes the shorter rows), so a row is ranked at most twice its
    causal length wide. Consecutive classes with the same launch (rows a program, warps) share one
    :func:`_density_kernel` launch: at NQ 512 all four classes run one-warp programs, one launch."""
    b, h, nq, _ = scores.shape
    # rows per program: a tile of about TILE scores on the GPU; under the interpreter every row of a
    # class at once (its cost is per program and per op, not per element)
    tile, rows = (1 << 16, 1 << 16) if interpreting() else (DENSITY_TILE, DENSITY_ROWS)
    classes = []  # (launch, W, lo, hi), widest first
    width, hi = triton.next_power_of_2(nq), nq
    while hi > 0:
        lo = width // 2 if width > MIN_WIDTH else 0
        block_r = max(1, min(triton.next_power_of_2((hi - lo) * b * h), tile // width, rows))
        warps = max(1, min(8, block_r * width // (32 * DENSITY_PER_THREAD)))
        classes.append(((block_r, warps), width, lo, hi))
        width, hi = width // 2, lo
    for (block_r, warps), group in itertools.groupby(classes, key=lambda c: c[0]):
        group = list(group)
        progs = sum(triton.cdiv((c_hi - c_lo) * b * h, block_r) for _, _, c_lo, c_hi in group)
        _density_kernel[(progs,)](
            scores, budget, num, idx,
            scores.stride(0), scores.stride(1), scores.stride(2),
            num.stride(0), num.stride(1),
            idx.stride(0), idx.stride(1), idx.stride(2),
            nq, h, b * h, group[0][3], group[-1][2], nq - dense_last_rows if dense_last_rows else nq,
            SINK=keep_sink, DIAG=keep_diagonal, W0=group[0][1], CLASSES=len(group), BLOCK_R=block_r, KEY64=key64,
            num_warps=warps, maxnreg=DENSITY_MAXNREG,
        )  # fmt: skip


def select_fwd(
    scores: torch.Tensor,
    kind: str,
    value: float,
    budget: torch.Tensor | None,
    keep_sink: bool,
    keep_diagonal: bool,
    dense_last_rows: int,
    head_total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the selection kernel (inputs already validated by the caller).

    scores: [B, H, NQ, NQ] with a unit last stride; budget: int64/int32 [NQ] row budgets
    (``density`` with a row allocation), else None; ``head_total``: blocks per (batch, head) of the
    ``head`` allocation (``kind="density"``, ``budget=None``). Returns (kv_num_blocks int32 [B, H, NQ],
    kv_indices int32 [B, H, NQ, NQ]).
    """
    b, h, nq, _ = scores.shape
    key64 = scores.dtype == torch.float64
    num = torch.empty(b, h, nq, dtype=torch.int32, device=scores.device)
    idx = torch.empty(b, h, nq, nq, dtype=torch.int32, device=scores.device)
    if kind == "density" and head_total is None:
        _density_launch(scores, budget, num, idx, keep_sink, keep_diagonal, dense_last_rows, key64)
        return num, idx
    # the value as a one-element tensor: a Python float argument would reach the kernel as fp32
    value_t = torch.full((1,), float(value), dtype=torch.float64 if key64 else torch.float32, device=scores.device)
    nkp = triton.next_power_of_2(nq)
    theta = need = ties_before = num  # dummy pointers unless the head allocation runs
    if head_total is not None:
        kind = "head"
        theta, need, ties_before = _head_threshold(scores, head_total, keep_sink, keep_diagonal, key64, nkp)
    n_rows = b * h * nq
    # rows per program: a tile of about 4096 scores on the GPU (several short rows share a program);
    # under the interpreter every row at once (its cost is per program and per op, not per element)
    cap = 1 << 16 if interpreting() else 4096
    block_r = max(1, min(triton.next_power_of_2(n_rows), cap // nkp))
    warps = 4 if block_r * nkp <= 2048 else 8
    _select_kernel[(triton.cdiv(n_rows, block_r),)](
        scores, value_t, num, idx, theta, need, ties_before,
        scores.stride(0), scores.stride(1), scores.stride(2),
        num.stride(0), num.stride(1),
        idx.stride(0), idx.stride(1), idx.stride(2),
        nq, h, n_rows, nq - dense_last_rows if dense_last_rows else nq,
        KIND=KINDS[kind], SINK=keep_sink, DIAG=keep_diagonal, NKP=nkp, BLOCK_R=block_r,
        KEY64=key64, BITS=64 if key64 else 32,
        num_warps=warps,
    )  # fmt: skip
    return num, idx
