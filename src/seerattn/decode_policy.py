"""Decode sparsity policies: decode-gate logits -> the key blocks each (sequence, KV head) attends to.

The output is the ``block_indices`` input of :func:`seerattn.ops.sparse_decode_attention`: int32
``[B, Hkv, K]``, -1 padded, no repeats, with a static K per policy (a token budget / block size), so a
decode step has fixed shapes. The first block (attention sink) and the current, partial block (the
query's own block, which the gate does not score) are always kept when the sequence has them; the
decision is per KV group (one list per KV head, shared by its query heads).

Kinds (``DecodePolicy.kind``):

- ``"budget"``: ``value`` tokens, i.e. ``K = value // block_size`` blocks: first + current + the
  highest-scoring completed blocks.
- ``"threshold"``: the completed blocks whose gate probability (softmax over the completed blocks)
  is ``>= value``, plus first + current.
- ``"top_p"``: the fewest highest-probability completed blocks whose mass reaches ``value``, plus
  first + current.
- ``"dense"``: every block of the cache (baselines, tests).

``threshold`` and ``top_p`` keep a data-dependent number of blocks: their K is ``max_blocks`` (a cap;
default every block of the cache), and when more blocks pass, the highest-scoring ones are kept.
Nothing is read on the host (no sync).

``half_shift=True`` ranks blocks by logits that also see the windows shifted by half a block (the same gate
over ``[J * bs + bs/2, (J + 1) * bs + bs/2)``, :meth:`seerattn.gate.DecodeGate.scores` with ``shifted``): a
window that outscores both blocks it straddles lends its logit to both, so a needle that a block boundary splits
(a pass key across two blocks) ranks as it would whole. The gate is not retrained; the key cache keeps the
windows' keys too (:class:`seerattn.gate.GateKeyCache` ``shifted``), and the selection runs unfused.

``bound_slots=M`` (``"budget"`` only) gives M of the budget's slots to the completed blocks (first block aside) of
highest Quest bound on ``q . k`` (per block the element-wise min / max of its post-RoPE keys, ``max_h sum_d max(q_hd
kmin_d, q_hd kmax_d)`` over the group's query heads: :func:`bound_block_picks`); they are kept like the first and the
current block, and the gate ranks the rest. The bound keeps a block that holds one strongly matching key (a pass key),
which the gate's pooled block keys can miss (docs/design.md, "A few budget slots to Quest's bound"). The caller keeps
the bounds (:class:`seerattn.gate.BlockBounds`, 2 x D values per block and KV head beside the KV cache's 2 x 64 x D).

:func:`select_decode_blocks_fused` computes the gate logits and the ``"budget"`` selection in one
Triton launch (:func:`seerattn.ops.budget_decode_blocks`), the same blocks in ascending order.
:func:`resolve_decode_select` is the rule that picks one or the other for a sparse decode step.

Shape legend: B sequences, Hkv KV heads, NB key blocks covering the cache capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_mask import check_block_size

__all__ = [
    "DECODE_POLICY_KINDS",
    "DECODE_SELECTS",
    "BOUND_IMPLS",
    "DecodePolicy",
    "bound_block_picks",
    "resolve_decode_select",
    "select_decode_blocks",
    "select_decode_blocks_fused",
]

DECODE_POLICY_KINDS = ("budget", "threshold", "top_p", "dense")
DECODE_SELECTS = ("fused", "unfused")


@dataclass(frozen=True)
class DecodePolicy:
    """How many key blocks a decode step keeps (see the module docstring).

    Args:
        kind: one of ``DECODE_POLICY_KINDS``.
        value: tokens (budget), probability (threshold, in (0, 1]) or mass (top_p, in (0, 1]); unused by dense.
        max_blocks: K for threshold / top_p (None: every block of the cache).
        half_shift: rank by the gate logits of the blocks and of the half-block-shifted windows (module
            docstring); not with ``dense``.
        bound_slots: slots kept by the Quest bound before the gate ranks the rest (module docstring); ``"budget"``
            only, and at most K - 2 (the first and the current block take two).
    """

    kind: str = "budget"
    value: float = 4096
    max_blocks: int | None = None
    half_shift: bool = False
    bound_slots: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DECODE_POLICY_KINDS:
            raise ValueError(f"DecodePolicy.kind must be one of {DECODE_POLICY_KINDS}, got {self.kind!r}")
        if self.kind == "budget" and not (isinstance(self.value, int) or float(self.value).is_integer()):
            raise ValueError(f"DecodePolicy budget must be a whole number of tokens, got {self.value!r}")
        if self.kind in ("threshold", "top_p") and not 0 < self.value <= 1:
            raise ValueError(f"DecodePolicy {self.kind} value must be in (0, 1], got {self.value!r}")
        if self.max_blocks is not None and (self.kind not in ("threshold", "top_p") or self.max_blocks < 2):
            raise ValueError("DecodePolicy.max_blocks is the cap of threshold / top_p policies and must be >= 2")
        if not isinstance(self.half_shift, bool) or (self.half_shift and self.kind == "dense"):
            raise ValueError(
                f"DecodePolicy.half_shift must be True or False, and False for the 'dense' kind (it ranks nothing); "
                f"got {self.half_shift!r} with {self.kind!r}"
            )
        slots = self.bound_slots
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0 or (slots and self.kind != "budget"):
            raise ValueError(
                f"DecodePolicy.bound_slots must be an int >= 0, and 0 for kinds other than 'budget'; got {slots!r} "
                f"with {self.kind!r}"
            )

    def num_slots(self, block_size: int, kv_blocks: int) -> int:
        """K: list length for ``block_size``-token blocks over a cache of ``kv_blocks`` blocks."""
        if self.kind == "budget":
            k = int(self.value) // block_size
            if k < 2:
                raise ValueError(
                    f"a {int(self.value)}-token budget holds {k} block(s) of {block_size}; the first and the current "
                    f"block are always kept, so it needs >= {2 * block_size} tokens"
                )
            if k < 2 + self.bound_slots:
                raise ValueError(
                    f"a {int(self.value)}-token budget holds {k} blocks of {block_size}: the first and the current "
                    f"block and bound_slots={self.bound_slots} need >= {(2 + self.bound_slots) * block_size} tokens"
                )
            return k
        if self.kind == "dense" or self.max_blocks is None:
            return kv_blocks
        return self.max_blocks


def select_decode_blocks(
    logits: torch.Tensor,
    cache_seqlens: torch.Tensor,
    policy: DecodePolicy,
    block_size: int,
    kv_blocks: int | None = None,
    bound_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The key blocks each (sequence, KV head) attends to for its new token.

    Args:
        logits: [B, Hkv, NB] decode-gate logits (:meth:`seerattn.gate.DecodeGate.scores`); only the
            completed blocks ``J < (cache_seqlens[b] - 1) // block_size`` are read.
        cache_seqlens: int [B] tokens in each cache, the new token included.
        policy: a :class:`DecodePolicy`.
        block_size: tokens per key block.
        kv_blocks: blocks covering the KV cache capacity (static); default NB. Must cover every
            sequence's current block.
        bound_blocks: int [B, Hkv, ``policy.bound_slots``] the Quest bound's picks (:func:`bound_block_picks`,
            -1: none), kept like the first and the current block; given exactly when ``policy.bound_slots > 0``.

    Returns:
        int32 [B, Hkv, K] block indices, highest priority first (first and current block and the bound's picks,
        then by logit), -1 padded; K = ``policy.num_slots(block_size, kv_blocks)``.
    """
    if logits.dim() != 3 or cache_seqlens.shape != (logits.shape[0],):
        raise ValueError(
            f"select_decode_blocks needs logits [B, Hkv, NB] and cache_seqlens [B]; got {tuple(logits.shape)} and "
            f"{tuple(cache_seqlens.shape)}"
        )
    b, hkv, nb = logits.shape
    _check_bound_blocks("select_decode_blocks", bound_blocks, policy, (b, hkv))
    kv_blocks = nb if kv_blocks is None else kv_blocks
    if kv_blocks < nb:
        raise ValueError(f"kv_blocks ({kv_blocks}) must be >= the logits' {nb} blocks")
    if cache_seqlens.device.type == "cpu" and bool((cache_seqlens > kv_blocks * block_size).any()):
        raise ValueError(f"a sequence is longer than kv_blocks * block_size = {kv_blocks * block_size} tokens")
    k = policy.num_slots(block_size, kv_blocks)
    width = max(kv_blocks, k)
    x = torch.nn.functional.pad(logits.float(), (0, width - nb), value=float("-inf"))
    lens = cache_seqlens.to(logits.device).long().view(b, 1, 1)
    cur = (lens - 1) // block_size  # the current block (-1 for an empty cache)
    j = torch.arange(width, device=logits.device).view(1, 1, -1)
    completed = j < cur
    forced = ((j == 0) | (j == cur)) & (lens > 0)
    if bound_blocks is not None:  # the bound's picks (-1: none) -> a spare column, dropped
        picks = bound_blocks.to(logits.device).long()
        picks = torch.where((picks >= 0) & (picks < width), picks, width)
        chosen = torch.zeros(b, hkv, width + 1, dtype=torch.bool, device=logits.device).scatter_(-1, picks, True)
        forced = forced | (chosen[..., :width] & completed)
    if policy.kind == "dense":
        x = -j.float().expand_as(x)  # every block, ascending
        keep = completed
    elif policy.kind == "budget":
        keep = completed
    else:
        x = x.masked_fill(~completed, float("-inf"))
        # Softmax over completed blocks only; a row without any (first block) stays all zero, not NaN.
        probs = torch.softmax(x, -1).nan_to_num(0.0)
        if policy.kind == "threshold":
            keep = probs >= policy.value
        else:
            p_sorted, order = probs.sort(-1, descending=True)
            before = p_sorted.cumsum(-1) - p_sorted  # mass of the strictly better blocks
            keep = torch.zeros_like(completed).scatter(-1, order, before < policy.value)
        keep = keep & completed
    priority = torch.where(keep, x, float("-inf")).masked_fill(forced, float("inf"))
    return _top_indices(priority, k)


def _top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [..., k]: the indices of the k highest entries of scores [..., NB] by descending score, -1 for
    entries at -inf and for the slots past NB."""
    if scores.shape[-1] < k:
        scores = torch.nn.functional.pad(scores, (0, k - scores.shape[-1]), value=float("-inf"))
    top, idx = scores.topk(k, dim=-1)
    return torch.where(torch.isinf(top) & (top < 0), -1, idx).to(torch.int32)


def _check_bound_blocks(op: str, bound_blocks: torch.Tensor | None, policy: DecodePolicy, lead: tuple) -> None:
    """bound_blocks must be int [*lead, policy.bound_slots] when the policy has bound slots, and None otherwise."""
    if policy.bound_slots == 0:
        if bound_blocks is not None:
            raise ValueError(f"{op}: bound_blocks given but the policy has bound_slots=0 (nothing would read them)")
        return
    want = (*lead, policy.bound_slots)
    ok = isinstance(bound_blocks, torch.Tensor) and bound_blocks.dtype in (torch.int32, torch.int64)
    if not ok or tuple(bound_blocks.shape) != want:
        got = "None" if bound_blocks is None else f"{bound_blocks.dtype} {tuple(bound_blocks.shape)}"
        raise ValueError(
            f"{op}: a policy with bound_slots={policy.bound_slots} needs bound_blocks, int32 / int64 {list(want)} "
            f"(bound_block_picks), got {got}"
        )


BOUND_IMPLS = ("torch", "triton")


def bound_block_picks(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    cache_seqlens: torch.Tensor,
    slots: int,
    block_size: int,
    impl: str = "torch",
) -> torch.Tensor:
    """The ``slots`` completed blocks of highest Quest bound per (sequence, KV head, row), first block aside.

    Args:
        q: [B, Hq, N, D] query rows (post-RoPE).
        kmin, kmax: [B, Hkv, NB, D] element-wise min / max of each block's post-RoPE keys
            (:func:`seerattn.decode_baselines.quest_block_bounds`, :class:`seerattn.gate.BlockBounds`); only the
            blocks ``1 <= J < (cache_seqlens - 1) // block_size`` are read (completed, not the first, which is kept
            anyway).
        cache_seqlens: int [B, N] keys visible to each row (its position + 1).
        slots: M >= 1 picks per row (at most 16 with ``impl="triton"``).
        block_size: tokens per key block.
        impl: how the bounds are scored and ranked: ``"torch"`` (:func:`seerattn.decode_baselines.quest_block_scores`,
            two fp32 matmuls, then ``topk``: the reference) or ``"triton"`` (:func:`seerattn.ops.quest_bound_scores`
            reading the bounds in their dtype, then :func:`seerattn.ops.top_block_indices`: two launches; CUDA, or CPU
            under ``TRITON_INTERPRET=1``). The same values up to fp32 rounding; equal bounds go to the lower block
            there.

    Returns:
        int32 [B, Hkv, N, M]: the picks by descending bound (fp32), -1 where a row has fewer than M such blocks.
    """
    from .decode_baselines import quest_block_scores  # that module builds on this one
    from .ops import quest_bound_scores, top_block_indices

    if q.dim() != 4 or tuple(cache_seqlens.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(
            f"bound_block_picks needs q [B, Hq, N, D] and cache_seqlens [B, N], got {tuple(q.shape)} and "
            f"{tuple(cache_seqlens.shape)}"
        )
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"bound_block_picks: slots must be an int >= 1, got {slots!r}")
    if impl not in BOUND_IMPLS:
        raise ValueError(f"bound_block_picks: impl must be one of {BOUND_IMPLS}, got {impl!r}")
    check_block_size(block_size, "bound_block_picks")
    if impl == "triton":  # two launches: the bounds (-inf where not ranked), then the M best of each row
        return top_block_indices(quest_bound_scores(q, kmin, kmax, cache_seqlens.to(kmin.device), block_size), slots)
    s = quest_block_scores(q, kmin, kmax)  # [B, Hkv, N, NB]
    b, n, nb = s.shape[0], s.shape[2], s.shape[3]
    cur = (cache_seqlens.to(s.device).long().view(b, 1, n, 1) - 1) // block_size
    j = torch.arange(nb, device=s.device)
    return _top_indices(s.masked_fill(~((j >= 1) & (j < cur)), float("-inf")), slots)


def select_decode_blocks_fused(
    qg: torch.Tensor,
    keys: torch.Tensor,
    cache_seqlens: torch.Tensor,
    policy: DecodePolicy,
    block_size: int,
    bound_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`select_decode_blocks` on :meth:`seerattn.gate.DecodeGate.scores`' logits, fused into one
    Triton kernel with the logits (``"budget"`` policies only).

    Args:
        qg: [B, Hkv, Dg] gate queries (:meth:`DecodeGate.gate_query` at ``cache_seqlens - 1``, N squeezed).
        keys: [B, Hkv, NB, Dg] cached gate keys (:attr:`GateKeyCache.keys`); NB covers the cache capacity.
        cache_seqlens: int [B] tokens in each cache, the new token included.
        policy: a ``"budget"`` :class:`DecodePolicy`.
        block_size: tokens per key block.
        bound_blocks: int [B, Hkv, ``policy.bound_slots``] as :func:`select_decode_blocks` takes them.

    Returns:
        int32 [B, Hkv, K] (K = ``policy.num_slots(block_size, NB)``): the blocks :func:`select_decode_blocks`
        keeps, in ascending block order (not by priority), -1 padded; equal logits go to the lower block
        index (the eager top-K leaves their order unspecified).
    """
    if policy.kind != "budget" or policy.half_shift:
        raise ValueError(
            f"select_decode_blocks_fused supports the 'budget' policy kind without half_shift only, got "
            f"{policy.kind!r} (half_shift={policy.half_shift}); use select_decode_blocks for the others"
        )
    from .ops import budget_decode_blocks

    _check_bound_blocks("select_decode_blocks_fused", bound_blocks, policy, tuple(qg.shape[:2]))
    k = policy.num_slots(block_size, kv_blocks=0)  # a budget's K does not depend on the cache capacity
    return budget_decode_blocks(qg, keys, cache_seqlens, k, block_size, forced=bound_blocks)


def resolve_decode_select(select: str | None, policy: DecodePolicy, device: torch.device | str) -> str:
    """Which selection a sparse decode step runs on ``device``: ``"fused"`` (:func:`select_decode_blocks_fused`:
    gate query eager, then the gate logits and the budget top-K in one Triton launch) or ``"unfused"``
    (:meth:`seerattn.gate.DecodeGate.scores`, then :func:`select_decode_blocks`). Both keep the same blocks
    (fused lists them ascending, unfused by priority; equal logits may go to another block).

    Args:
        select: ``"fused"``, ``"unfused"`` (taken as given; ``"fused"`` with a policy other than ``"budget"``
            raises, and on a CPU tensor without ``TRITON_INTERPRET=1`` the kernel raises: never a fallback),
            or None: the automatic rule, fused for a ``"budget"`` policy on CUDA, unfused otherwise.
        policy: the decode policy (``threshold`` / ``top_p`` need the softmax over the whole row: unfused;
            ``dense`` lists every block: unfused; ``half_shift`` combines two logit rows: unfused).
        device: where the step runs (on the CPU the unfused path is the reference; Triton runs there only
            under the interpreter).

    The automatic rule, measured on an H200 (tree fa6dfe5, Llama-3.1-8B layer shape, bf16, 4096-token budget,
    64-token blocks; ``python3 -m benchmarks.decode --providers sdpa,ours,seer,seer-fused --batches 16,64
    --contexts 32768,131072 --budgets 4096 --cuda-graph``; docs/experiments/decode/README.md, session 8): one
    layer's decode step (gate query + selection + kernel), ms, eager / CUDA-graph replay, unfused -> fused:
    B 16 x 32k 1.174 -> 1.161 / 0.210 -> 0.165; B 64 x 32k 1.195 -> 0.630 / 0.436 -> 0.375; B 16 x 128k
    1.101 -> 1.006 / 0.261 -> 0.216; B 64 x 128k 1.632 -> 1.105 / 0.717 -> 1.084. Fused is faster eagerly
    everywhere, and the HF decode step runs eagerly (:func:`seerattn.hf.integration._decode_step`); under CUDA
    graphs it loses at B 64 x 128k (2048 blocks a row: one long program per sequence and KV head), a case
    for ``select="unfused"`` when replaying graphs.
    """
    if select not in (None, *DECODE_SELECTS):
        raise ValueError(f"decode select must be one of {DECODE_SELECTS} or None (automatic), got {select!r}")
    if select == "fused" and (policy.kind != "budget" or policy.half_shift):
        raise ValueError(
            f"the fused decode selection supports the 'budget' policy kind without half_shift only, got "
            f"{policy.kind!r} (half_shift={policy.half_shift}); use select='unfused' or None (automatic) for it"
        )
    if select is not None:
        return select
    fused = policy.kind == "budget" and not policy.half_shift and torch.device(device).type == "cuda"
    return "fused" if fused else "unfused"
