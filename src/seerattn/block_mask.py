"""One block-sparse mask format for every op, kernel and policy, and the sparsity policies.

Shape legend
------------
B   batch (or number of sequences for varlen)
H   mask heads: either Hq (one decision per query head) or Hkv (one per GQA group)
NQ  query blocks  = ceil(T / block_size)
NK  key blocks    = ceil(T / block_size)   (prefill: NQ == NK)

Format
------
``BlockMask`` stores, per (batch, head, query block), the sorted list of kept key blocks, exactly
like FlexAttention's ``(kv_num_blocks, kv_indices, BLOCK_SIZE)``:

- ``kv_num_blocks``: int32 ``[B, H, NQ]`` — how many key blocks row ``I`` keeps;
- ``kv_indices``: int32 ``[B, H, NQ, NK]`` — the kept key-block indices, ascending, in the first
  ``kv_num_blocks[b, h, I]`` slots; the remaining slots hold 0 and are never read.

The transposed lists (for each key block, the query blocks that keep it: FlexAttention's
``q_num_blocks`` / ``q_indices``), which the backward walks, are built on first use and cached on
the mask (:attr:`BlockMask.q_num_blocks`, :attr:`BlockMask.q_indices`).

The causal structure is *not* implied by the format: a mask may keep key blocks above the
diagonal and every op applies causality on top of it (a kept block above the diagonal is simply
fully masked). Policies never produce such blocks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

__all__ = [
    "ALLOCATIONS",
    "BlockMask",
    "SparsityPolicy",
    "causal_block_mask",
    "mask_from_scores",
    "num_blocks",
]


def num_blocks(seq_len: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` tokens covering ``seq_len`` tokens (last one may be partial)."""
    return -(-seq_len // block_size)


def causal_block_mask(nq: int, nk: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``[NQ, NK]``: True on and below the block diagonal (bottom-right aligned when NQ < NK)."""
    nk = nq if nk is None else nk
    rows = torch.arange(nq, device=device).unsqueeze(1) + (nk - nq)
    cols = torch.arange(nk, device=device).unsqueeze(0)
    return cols <= rows


def check_block_size(block_size: int, op: str | None = None) -> None:
    """Raise unless ``block_size`` is a positive power of two; ``op``, when given, starts the message (the op whose
    argument it is)."""
    if (
        not isinstance(block_size, int)
        or isinstance(block_size, bool)
        or block_size < 1
        or block_size & (block_size - 1)
    ):
        where = "" if op is None else f"{op}: "
        raise ValueError(f"{where}block_size must be a positive power of two (e.g. 64 or 128), got {block_size!r}")


@dataclass(frozen=True)
class BlockMask:
    """Kept key blocks per (batch, mask head, query block); see the module docstring.

    Attributes:
        kv_num_blocks: int32 ``[B, H, NQ]``.
        kv_indices: int32 ``[B, H, NQ, NK]``, ascending in the first ``kv_num_blocks`` slots.
        block_size: tokens per block (power of two).
        seq_len: number of tokens the mask covers (``NQ == NK == ceil(seq_len / block_size)``).
        source: what built the mask, known on the host without reading it: ``("policy", kind, value,
            allocation)`` for :func:`mask_from_scores`, None otherwise. The block-sparse kernel's tuner
            keys its tile choice on it (a mask without one is measured on the device, which syncs).
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    seq_len: int
    source: tuple | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_block_size(self.block_size)
        if self.kv_num_blocks.dim() != 3 or self.kv_indices.dim() != 4:
            raise ValueError(
                "BlockMask expects kv_num_blocks [B, H, NQ] and kv_indices [B, H, NQ, NK], got shapes "
                f"{tuple(self.kv_num_blocks.shape)} and {tuple(self.kv_indices.shape)}"
            )
        if self.kv_num_blocks.dtype != torch.int32 or self.kv_indices.dtype != torch.int32:
            raise TypeError(
                f"BlockMask tensors must be int32, got {self.kv_num_blocks.dtype} and {self.kv_indices.dtype}"
            )
        if tuple(self.kv_indices.shape[:3]) != tuple(self.kv_num_blocks.shape):
            raise ValueError(
                f"kv_indices leading dims {tuple(self.kv_indices.shape[:3])} must equal kv_num_blocks shape "
                f"{tuple(self.kv_num_blocks.shape)}"
            )
        nb = num_blocks(self.seq_len, self.block_size)
        if self.seq_len < 1 or self.kv_num_blocks.shape[2] != nb or self.kv_indices.shape[3] != nb:
            raise ValueError(
                f"a mask for seq_len={self.seq_len}, block_size={self.block_size} needs NQ = NK = {nb}, got "
                f"NQ={self.kv_num_blocks.shape[2]}, NK={self.kv_indices.shape[3]}"
            )

    def validate(self) -> BlockMask:
        """Check the values (not only the shapes): counts in [0, NK], valid indices in [0, NK) and
        ascending, both tensors on one device. Costs a device sync on CUDA, so the ops call it only
        for CPU tensors; policies build valid masks by construction. Returns ``self``."""
        if self.kv_num_blocks.device != self.kv_indices.device:
            raise ValueError(
                f"BlockMask tensors are on different devices: {self.kv_num_blocks.device} and {self.kv_indices.device}"
            )
        nk = self.kv_indices.shape[-1]
        counts = self.kv_num_blocks
        if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > nk):
            raise ValueError(f"BlockMask.kv_num_blocks must lie in [0, NK={nk}]")
        slot = torch.arange(nk, device=counts.device)
        valid = slot < counts.unsqueeze(-1)
        idx = self.kv_indices
        if bool((valid & ((idx < 0) | (idx >= nk))).any()):
            raise ValueError(f"BlockMask.kv_indices must lie in [0, NK={nk}) in their valid slots")
        if nk > 1 and bool((valid[..., 1:] & (idx[..., 1:] <= idx[..., :-1])).any()):
            raise ValueError("BlockMask.kv_indices must be strictly ascending in their valid slots")
        return self

    # ----------------------------------------------------------------- construction / conversion
    @classmethod
    def from_dense(cls, dense: torch.Tensor, block_size: int, seq_len: int | None = None) -> BlockMask:
        """Build from a bool ``[B, H, NQ, NK]`` block mask (True = keep).

        ``seq_len`` defaults to ``NQ * block_size`` (all blocks full).
        """
        if dense.dtype != torch.bool or dense.dim() != 4 or dense.shape[2] != dense.shape[3]:
            raise ValueError(
                f"BlockMask.from_dense expects a bool [B, H, NQ, NQ] tensor, got {dense.dtype} {tuple(dense.shape)}"
            )
        check_block_size(block_size)
        nb = dense.shape[-1]
        seq_len = nb * block_size if seq_len is None else seq_len
        counts = dense.sum(-1, dtype=torch.int32)
        # Compaction without a sort: kept column J goes to slot (kept columns before it); the others
        # go to a spare slot NK that is dropped (every write to a real slot is unique, so no races).
        slot = torch.where(dense, dense.cumsum(-1, dtype=torch.int32) - 1, nb).long()
        cols = torch.arange(nb, device=dense.device, dtype=torch.int32).expand_as(slot)
        indices = torch.zeros((*dense.shape[:3], nb + 1), dtype=torch.int32, device=dense.device)
        indices.scatter_(-1, slot, cols)
        return cls(counts.contiguous(), indices[..., :nb].contiguous(), block_size, seq_len)

    @functools.cached_property
    def _transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Built once per mask (the dataclass is frozen; cached_property writes the instance dict, and
        # ``replace``/``to`` make new masks, so the cache never goes stale). No host sync.
        t = BlockMask.from_dense(self.to_dense().transpose(-1, -2), self.block_size, self.seq_len)
        return t.kv_num_blocks, t.kv_indices

    @functools.cached_property
    def memo(self) -> dict:
        """Per-mask store for what other layers derive from the (immutable) lists, e.g. the kernels'
        tuning key (:func:`seerattn.ops._triton.config.mask_key`): computed once per mask instead of
        once per call (a measured key costs a reduction and a host sync)."""
        return {}

    @property
    def q_num_blocks(self) -> torch.Tensor:
        """int32 ``[B, H, NK]``: how many query blocks keep key block ``J`` (built once, cached)."""
        return self._transposed[0]

    @property
    def q_indices(self) -> torch.Tensor:
        """int32 ``[B, H, NK, NQ]``: the query blocks that keep key block ``J``, ascending, in the first
        ``q_num_blocks[b, h, J]`` slots (padding slots hold 0). Built once, cached."""
        return self._transposed[1]

    def to_dense(self) -> torch.Tensor:
        """Bool ``[B, H, NQ, NK]`` (True = kept)."""
        nb = self.kv_indices.shape[-1]
        slot = torch.arange(nb, device=self.kv_indices.device)
        valid = slot < self.kv_num_blocks.unsqueeze(-1)
        # Padding slots are never read: route them to a spare column that is dropped, so that every
        # write is True and duplicate indices cannot race (FlexAttention pads with other indices).
        idx = torch.where(valid, self.kv_indices.long(), nb)
        shape = (*self.kv_indices.shape[:3], nb + 1)
        dense = torch.zeros(shape, dtype=torch.bool, device=self.kv_indices.device)
        dense.scatter_(-1, idx, True)
        return dense[..., :nb].contiguous()

    def to_token_mask(self) -> torch.Tensor:
        """Bool ``[B, H, T, T]``: the block mask expanded to tokens, combined with causality."""
        dense = self.to_dense()
        bs, t = self.block_size, self.seq_len
        tok = dense.repeat_interleave(bs, dim=-2).repeat_interleave(bs, dim=-1)[..., :t, :t]
        causal = torch.ones(t, t, dtype=torch.bool, device=tok.device).tril()
        return tok & causal

    # ----------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, NQ, NK)``."""
        return tuple(self.kv_indices.shape)  # type: ignore[return-value]

    @property
    def num_heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def to(self, device: torch.device | str) -> BlockMask:
        return replace(self, kv_num_blocks=self.kv_num_blocks.to(device), kv_indices=self.kv_indices.to(device))

    def density(self) -> float:
        """Fraction of the causal block triangle that is kept (blocks above the diagonal not counted)."""
        return self.densities()[0].item()

    def token_density(self) -> float:
        """Fraction of the causal *token* map that is computed (accounts for a partial last block)."""
        return self.densities()[1].item()

    def densities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(density, token_density)`` as 0-dim fp64 tensors on the mask's device, without a host
        sync (the sparse forward records them for every layer; reading them later syncs once).

        Token pairs are counted per block pair (a kept block below the diagonal computes rows x cols
        token pairs, a diagonal block its causal triangle), never by materialising the ``[B, H, T, T]``
        token mask: this runs after every sparse forward, also at 128k tokens.

        A policy's mask (``source`` ``("policy", ...)``) never keeps a block above the diagonal, so its rows
        are counted from ``kv_num_blocks`` and each row's last kept index alone (is the diagonal kept?), in
        O(B H NQ): the same numbers as the general path over the dense ``[B, H, NQ, NQ]`` map, which at 128k
        cost ~6 ms a layer on an H200 (session 9 profile). Any other mask takes the general path.
        """
        if self.source is not None and self.source[0] == "policy":
            return self._causal_densities()
        dense = self.to_dense()
        nb, bs, t = dense.shape[-1], self.block_size, self.seq_len
        heads = dense.shape[0] * dense.shape[1]
        # tokens per block, the last one partial; built on the device (a scalar write would sync)
        sizes = (t - bs * torch.arange(nb, device=dense.device, dtype=torch.float64)).clamp(max=bs)
        pairs = sizes.view(nb, 1) * sizes.view(1, nb)  # tokens of block (I, J)
        pairs = pairs.tril(-1) + torch.diag(sizes * (sizes + 1) / 2)  # diagonal: causal triangle only
        causal = causal_block_mask(nb, device=dense.device)
        blocks = (dense & causal).sum(dtype=torch.float64) / (nb * (nb + 1) / 2 * heads)
        tokens = (dense.to(torch.float64) * pairs).sum() / (t * (t + 1) / 2 * heads)
        return blocks, tokens

    def _causal_densities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`densities` of a mask with no kept block above the diagonal: row I keeps ``kv_num_blocks`` blocks,
        its diagonal iff its last kept index (ascending lists) is I, the others lie below it, where every key
        block is whole (only the last block, NQ - 1, can be partial, and it is below no row)."""
        num = self.kv_num_blocks.long()  # [B, H, NQ]
        nb, bs, t = num.shape[-1], self.block_size, self.seq_len
        heads = num.shape[0] * num.shape[1]
        rows = torch.arange(nb, device=num.device)
        last = self.kv_indices.gather(-1, (num - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)  # int64 index
        diag = ((num > 0) & (last == rows)).to(torch.float64)
        below = num.to(torch.float64) - diag
        sizes = (t - bs * rows.to(torch.float64)).clamp(max=bs)  # tokens of query block I, the last one partial
        blocks = num.sum(dtype=torch.float64) / (nb * (nb + 1) / 2 * heads)
        tokens = (below * sizes * bs + diag * sizes * (sizes + 1) / 2).sum() / (t * (t + 1) / 2 * heads)
        return blocks, tokens

    def expand_heads(self, num_q_heads: int) -> BlockMask:
        """A per-query-head mask: repeats each head of an Hkv mask over its GQA group (identity if H == Hq)."""
        h = self.num_heads
        if h == num_q_heads:
            return self
        if num_q_heads % h:
            raise ValueError(f"cannot expand a mask with {h} heads to {num_q_heads} query heads")
        g = num_q_heads // h
        return replace(
            self,
            kv_num_blocks=self.kv_num_blocks.repeat_interleave(g, dim=1),
            kv_indices=self.kv_indices.repeat_interleave(g, dim=1),
        )


# ===================================================================== sparsity policies

PolicyKind = Literal["dense", "threshold", "density", "top_p"]
_POLICY_KINDS = ("dense", "threshold", "density", "top_p")
Allocation = Literal["row", "uniform", "floor", "head"]
ALLOCATIONS = ("row", "uniform", "floor", "head")


@dataclass(frozen=True)
class SparsityPolicy:
    """How gate probabilities become a block mask.

    Args:
        kind: ``"dense"`` (keep every causal block), ``"threshold"`` (keep blocks whose gate
            probability is >= ``value``), ``"density"`` (keep the fraction ``value`` of the causal block
            triangle, spread over rows as ``allocation`` says; forced blocks count against the budget,
            so where the forced sink and diagonal alone exceed it, e.g. on short prompts, the realised
            density is above ``value``), ``"top_p"`` (per row keep the fewest highest blocks whose
            probability mass reaches ``value``).
        value: the threshold, density or mass; ignored for ``"dense"``.
        allocation: how ``"density"`` spreads its budget (only that kind takes another value than
            ``"row"``): ``"row"`` — row ``I`` keeps its top ``max(1, round(value * (I + 1)))`` blocks;
            ``"uniform"`` — every row keeps the same number ``k`` of top blocks (all of them when it
            has fewer), ``k`` the integer that brings the triangle closest to ``value`` (the paper's
            ``nz_ratio``, ``k ~ (1 - sqrt(1 - value)) * NQ``), so early rows are dense; ``"floor"`` —
            as ``"row"`` (row ``I`` keeps ``round(c * (I + 1))``) but never fewer than half the
            uniform ``k`` (all blocks of shorter rows), ``c`` chosen so the triangle is kept at
            ``value``: most of uniform's gain on early rows at a small cost on late ones; ``"head"`` —
            each (batch, head) keeps ``round(value * NQ (NQ + 1) / 2)`` blocks of its triangle, the
            highest scores of any row, so rows with concentrated scores get few blocks and rows with
            spread-out scores many (scores must be on one scale across rows: gate probabilities are,
            each is a row's share of its attention).
        keep_sink: always keep key block 0.
        keep_diagonal: always keep the diagonal block (guarantees that no row is empty; with it
            off, the best block of a row is still kept).
        dense_last_rows: this many last query-block rows keep all their causal blocks.
        layer_overrides: ``{layer_index: SparsityPolicy}`` used instead of this policy for those layers.
    """

    kind: PolicyKind = "density"
    value: float = 0.1
    allocation: Allocation = "row"
    keep_sink: bool = True
    keep_diagonal: bool = True
    dense_last_rows: int = 0
    layer_overrides: dict[int, SparsityPolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _POLICY_KINDS:
            raise ValueError(f"SparsityPolicy.kind must be one of {_POLICY_KINDS}, got {self.kind!r}")
        v = self.value
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"SparsityPolicy.value must be a finite number, got {v!r}")
        if self.kind == "threshold" and not 0.0 <= v <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] (a gate probability), got {v}")
        if self.kind in ("density", "top_p") and not 0.0 < v <= 1.0:
            raise ValueError(f"{self.kind} must be in (0, 1], got {v}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"SparsityPolicy.allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.allocation != "row" and self.kind != "density":
            raise ValueError(
                f"allocation={self.allocation!r} spreads a density budget; kind {self.kind!r} takes only 'row'"
            )
        for name in ("keep_sink", "keep_diagonal"):  # a bool, not anything truthy: "false" must not mean True
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SparsityPolicy.{name} must be True or False, got {getattr(self, name)!r}")
        rows = self.dense_last_rows
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise ValueError(f"dense_last_rows must be an int >= 0, got {rows!r}")
        if not isinstance(self.layer_overrides, dict):
            raise ValueError(
                "SparsityPolicy.layer_overrides must be a dict {layer index: SparsityPolicy}, got "
                f"{type(self.layer_overrides).__name__}"
            )
        for layer, pol in self.layer_overrides.items():
            is_index = isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0
            if not is_index or not isinstance(pol, SparsityPolicy):
                raise ValueError(
                    "layer_overrides must map layer index (int >= 0) to SparsityPolicy, got "
                    f"{layer!r}: {type(pol).__name__}"
                )
            if pol.layer_overrides:  # for_layer() never looks there: it would be ignored
                raise ValueError(
                    f"layer_overrides[{layer}] has layer_overrides of its own; an override applies to one layer, "
                    "so set overrides on the top-level policy only"
                )

    @property
    def ranks_within_rows(self) -> bool:
        """True when a row's kept blocks depend only on the order of that row's scores (``dense``, and ``density``
        with a per-row allocation): then any strictly increasing map of each row, such as the softmax of gate
        logits, keeps the same blocks."""
        return self.kind == "dense" or (self.kind == "density" and self.allocation != "head")

    def check_num_layers(self, num_layers: int) -> None:
        """Raise if an override names a layer the model does not have (it would silently do nothing)."""
        past = sorted(i for i in self.layer_overrides if i >= num_layers)
        if past:
            raise ValueError(
                f"SparsityPolicy.layer_overrides has layer {past[0] if len(past) == 1 else past} but the model has "
                f"{num_layers} layers (0..{num_layers - 1})"
            )

    def for_layer(self, layer_idx: int | None) -> SparsityPolicy:
        """The policy that applies to ``layer_idx`` (an override if one is set)."""
        if layer_idx is not None and layer_idx in self.layer_overrides:
            return self.layer_overrides[layer_idx]
        return self

    def to_dict(self) -> dict:
        fields = ("kind", "value", "allocation", "keep_sink", "keep_diagonal", "dense_last_rows")
        d = {k: getattr(self, k) for k in fields}
        d["layer_overrides"] = {str(i): p.to_dict() for i, p in self.layer_overrides.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SparsityPolicy:
        """The policy of :meth:`to_dict`'s output (e.g. from JSON: override keys are strings)."""
        known = {"kind", "value", "allocation", "keep_sink", "keep_diagonal", "dense_last_rows", "layer_overrides"}
        if not isinstance(d, dict):
            raise ValueError(
                f"a SparsityPolicy is given as an object of fields {sorted(known)}, got {type(d).__name__} {d!r}"
            )
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SparsityPolicy fields {sorted(unknown)}; accepted: {sorted(known)}")
        d = dict(d)
        raw = d.get("layer_overrides", {})
        if not isinstance(raw, dict):
            raise ValueError(
                'SparsityPolicy layer_overrides must be an object {"layer index": {policy fields}}, got '
                f"{type(raw).__name__}"
            )
        overrides: dict[int, SparsityPolicy] = {}
        for key, sub in raw.items():
            try:
                layer = int(key)
            except (TypeError, ValueError):
                raise ValueError(
                    f"SparsityPolicy layer_overrides key {key!r} is not a layer index (a non-negative integer)"
                ) from None
            if layer in overrides:
                raise ValueError(f"SparsityPolicy layer_overrides names layer {layer} twice")
            try:
                overrides[layer] = cls.from_dict(sub)
            except ValueError as e:
                raise ValueError(f"SparsityPolicy layer_overrides[{key!r}]: {e}") from None
        d["layer_overrides"] = overrides
        return cls(**d)


def density_row_budget(nq: int, density: float, device=None, allocation: Allocation = "row") -> torch.Tensor:
    """int64 ``[NQ]``: blocks kept per row under a target density (row I has I + 1 causal blocks).

    ``allocation`` is ``"row"`` (``round(density * (I + 1))``, at least 1), ``"uniform"`` (the
    same ``k`` for every row, capped at ``I + 1``; ``k`` the integer whose triangle total is closest
    to ``density * NQ (NQ + 1) / 2``, the smaller on a tie) or ``"floor"`` (``round(c * (I + 1))``,
    at least ``ceil(k / 2)``, capped at ``I + 1``; ``c`` brings the total closest to the target).
    ``"head"`` has no fixed row budget.
    """
    n = torch.arange(1, nq + 1, device=device, dtype=torch.float64)
    if allocation == "row":
        return torch.clamp(torch.round(n * density), min=1).to(torch.int64)
    if allocation == "uniform":
        return torch.clamp(n, max=_uniform_count(nq, density)).to(torch.int64)
    if allocation == "floor":
        scale, least = _floor_scale(nq, density)
        return torch.minimum(n, torch.clamp(torch.round(n * scale), min=least)).to(torch.int64)
    raise ValueError(f"density_row_budget takes allocation 'row', 'uniform' or 'floor', got {allocation!r}")


@functools.lru_cache(maxsize=256)
def _uniform_count(nq: int, density: float) -> int:
    """The ``uniform`` allocation's ``k``: the count whose triangle total is closest to the target
    (the smaller on a tie). Computed on the CPU, so using it never syncs a device."""
    target = density * nq * (nq + 1) / 2
    ks = torch.arange(1, nq + 1, dtype=torch.float64)
    totals = ks * (ks + 1) / 2 + ks * (nq - ks)  # rows 0..k-1 are whole, the other NQ - k keep k
    return int(ks[(totals - target).abs().argmin()].item())  # argmin returns the first on a tie


@functools.lru_cache(maxsize=256)
def _floor_scale(nq: int, density: float) -> tuple[float, int]:
    """The ``floor`` allocation's ``(c, m)``: rows keep ``min(I + 1, max(m, round(c * (I + 1))))``
    with ``m = ceil(k / 2)`` (``k`` the uniform count) and ``c`` found by bisection so that the total
    is closest to the target (CPU, cached: every layer of a forward asks for the same pair)."""
    n = torch.arange(1, nq + 1, dtype=torch.float64)
    least = -(-_uniform_count(nq, density) // 2)
    target = density * nq * (nq + 1) / 2

    def total(c: float) -> float:
        return torch.minimum(n, torch.clamp(torch.round(n * c), min=least)).sum().item()

    lo, hi = 0.0, 1.0  # c = 1 keeps every block: the total is then the whole triangle >= target
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
    return (lo if abs(total(lo) - target) <= abs(total(hi) - target) else hi), least


def mask_from_scores(
    scores: torch.Tensor, policy: SparsityPolicy, seq_len: int, block_size: int, impl: str | None = None
) -> BlockMask:
    """Turn block scores into a :class:`BlockMask` under ``policy``.

    Args:
        scores: ``[B, H, NQ, NQ]`` gate probabilities (or any score where higher = more important;
            ``threshold`` and ``top_p`` assume rows are probabilities). Entries above the diagonal
            are ignored. NaN raises for CPU scores; CUDA scores are not checked, because the check
            would sync the host once per layer of every sparse forward.
        policy: the sparsity policy (per-layer overrides must already be resolved).
        seq_len: tokens covered (``NQ == ceil(seq_len / block_size)``).
        block_size: tokens per block.
        impl: ``"reference"`` (the PyTorch code below: sorts whole rows), ``"triton"`` (a selection
            kernel writing the lists directly, the same blocks and tie rule:
            :func:`seerattn.ops.select_blocks`) or None: ``"triton"`` for CUDA scores, ``"reference"``
            otherwise.

    Returns:
        A mask with no empty row and nothing above the diagonal.
    """
    if scores.dim() != 4 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores must be [B, H, NQ, NQ], got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    nq = scores.shape[-1]
    if nq != num_blocks(seq_len, block_size):
        raise ValueError(
            f"scores have NQ={nq} blocks but seq_len={seq_len} with block_size={block_size} needs "
            f"{num_blocks(seq_len, block_size)}"
        )
    device = scores.device
    # The NaN check needs a host sync, which would stall the GPU once per layer of every sparse
    # forward; on CUDA it is left out (gate probabilities are NaN only when the model's own q/k are,
    # and then the attention output carries the NaN). Only the causal part is read, so only it is checked (the
    # gate's causal_only logits leave the rest unwritten).
    if scores.device.type == "cpu" and bool((torch.isnan(scores) & causal_block_mask(nq)).any()):
        raise ValueError("scores contain NaN on or below the block diagonal; gate probabilities must be finite or -inf")
    if impl is None:
        impl = "triton" if device.type == "cuda" else "reference"
    if impl not in ("reference", "triton"):
        raise ValueError(f"mask_from_scores: impl must be 'reference', 'triton' or None (automatic), got {impl!r}")
    if impl == "triton":
        from .ops.gate_ops import select_blocks  # the kernel's launcher imports triton on first use

        return select_blocks(scores, policy, seq_len, block_size)

    causal = causal_block_mask(nq, device=device)
    forced = torch.zeros(nq, nq, dtype=torch.bool, device=device)
    if policy.keep_sink:
        forced[:, 0] = True
    if policy.keep_diagonal:
        forced |= torch.eye(nq, dtype=torch.bool, device=device)
    forced &= causal
    # fp64 scores stay fp64 so that threshold/top-p compare exactly; lower precisions go to fp32.
    s = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~causal, float("-inf"))
    if policy.kind == "dense":
        keep = causal.expand_as(s).clone()
    elif policy.kind == "threshold":
        keep = (s >= policy.value) & causal
    elif policy.kind == "density" and policy.allocation == "head":
        # One budget per (batch, head) over its whole triangle; forced blocks rank first and count.
        total = round(policy.value * nq * (nq + 1) / 2)
        ranked = s.masked_fill(forced, float("inf")).flatten(-2)  # [B, H, NQ*NQ]; above diagonal -inf
        order = ranked.argsort(dim=-1, descending=True, stable=True)[..., :total]
        keep = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, order, True).view_as(s) & causal
    elif policy.kind == "density":
        budget = density_row_budget(nq, policy.value, device, policy.allocation)  # [NQ]
        # Forced blocks rank first and count against the budget.
        ranked = s.masked_fill(forced, float("inf"))
        order = ranked.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(nq, device=device).expand_as(order).contiguous())
        keep = (rank < budget.view(nq, 1)) & causal
    else:  # top_p
        p = s.clamp_min(0).nan_to_num(0.0)
        sorted_p, order = p.sort(dim=-1, descending=True, stable=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly better blocks
        keep_sorted = before < policy.value * p.sum(-1, keepdim=True)
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted) & causal
    keep = keep | forced
    if policy.dense_last_rows:
        keep[..., max(nq - policy.dense_last_rows, 0) :, :] = causal[max(nq - policy.dense_last_rows, 0) :]
    # No empty row: keep each row's best causal block when nothing else is kept (computed for every
    # row rather than behind an `if empty.any()`, which would be a host sync).
    empty = ~keep.any(-1, keepdim=True)
    best = s.argmax(-1, keepdim=True)
    keep |= empty & torch.zeros_like(keep).scatter_(-1, best, True)
    return replace(BlockMask.from_dense(keep, block_size, seq_len), source=policy_source(policy))


def policy_source(policy: SparsityPolicy) -> tuple:
    """The :attr:`BlockMask.source` of a mask built under ``policy``."""
    return ("policy", policy.kind, float(policy.value), policy.allocation)
