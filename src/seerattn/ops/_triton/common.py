"""Pieces of the block-sparse kernels that the forward and the backward share.

- ``LOG2E`` / ``LN2``: the kernels run the softmax in the log2 domain (``exp2``), lse is stored in
  natural log.
- :func:`count_below_from_end`: how many leading entries of an ascending kept-block list lie
  strictly below a bound, found from the end of the list (the forward and the dQ pass: a query
  row keeps few blocks at or right of its diagonal, and they trail its list).
- :func:`count_below_from_start`: the same count found from the start (the dK/dV pass: a key
  block is kept by few query blocks at or above the diagonal, and they lead its transposed list).

The split lets the loops run the bulk of a list without causal masks and only the few
remaining entries with them.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["LN2", "LOG2E", "count_below_from_end", "count_below_from_start"]

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def count_below_from_end(list_ptr, cnt, bound, SHIFT: tl.constexpr, TAIL: tl.constexpr):
    """Number of leading entries ``e`` of the ascending list ``list_ptr[:cnt]`` with
    ``e >> SHIFT < bound``. One vector load of the last ``TAIL`` entries decides it when fewer than
    ``TAIL`` entries reach ``bound``; a longer run is walked one entry at a time."""
    offs_t = tl.arange(0, TAIL)
    tail_slot = cnt - 1 - offs_t
    tail = tl.load(list_ptr + tl.maximum(tail_slot, 0), mask=tail_slot >= 0, other=-1)
    tail = tail >> SHIFT  # arithmetic shift keeps -1 for the padding
    n_high = tl.sum((tail >= bound).to(tl.int32), 0)
    n_low = cnt - n_high
    if n_high == TAIL:
        last = tl.load(list_ptr + tl.maximum(n_low - 1, 0)) >> SHIFT
        while (n_low > 0) & (last >= bound):
            n_low -= 1
            last = tl.load(list_ptr + tl.maximum(n_low - 1, 0)) >> SHIFT
    return n_low


@triton.jit
def count_below_from_start(list_ptr, cnt, bound, TAIL: tl.constexpr):
    """Number of leading entries of the ascending list ``list_ptr[:cnt]`` that are ``< bound``, found
    from the start (one vector load of ``TAIL`` entries, then one entry at a time)."""
    offs_t = tl.arange(0, TAIL)
    head = tl.load(list_ptr + offs_t, mask=offs_t < cnt, other=bound)
    n_low = tl.sum((head < bound).to(tl.int32), 0)
    if n_low == TAIL:
        nxt = tl.load(list_ptr + n_low, mask=n_low < cnt, other=bound)
        while nxt < bound:
            n_low += 1
            nxt = tl.load(list_ptr + n_low, mask=n_low < cnt, other=bound)
    return n_low
