"""The K-compression cache of one decoder layer: the decode gate's keys of every completed block.

What is stored: the final gate keys (pooled, projected, RMS-normed and rotated at the block's first
position), ``Dg`` values per block and KV head in the gate's dtype, against 2 x 64 x D values of K/V: at
64-token blocks and Dg = D, 1/128 of the KV cache's bytes when the keys share its dtype, 1/64 with fp32
gates (as :func:`seerattn.hf.apply_seer_attention` attaches them) against a bf16 or fp16 cache.
They depend on K alone, so caching them keeps the gate exact: a decode step only computes its gate
query and one matmul. (Storing pooled K instead would be 3x larger and redo the projection, norm and
RoPE of every block at every step.) The weights are frozen at inference; training uses the bulk path
(:meth:`DecodeGate.forward`), not this cache.

Each sequence keeps its own block phase: beside the keys, the running max / min / sum of the K rows
of its current, partial block, and how many rows that block has. :meth:`GateKeyCache.append` takes one
new K row per sequence and, for the sequences whose block it completes, turns the running pools into
a gate key; the others only update their pools. Nothing reads the device on the host (no sync): the
capacity grows from a host-side upper bound on the lengths, so a decode step keeps static shapes as
long as the capacity suffices (allocate ``max_tokens`` up front for CUDA graphs). The object is plain
torch state beside any KV cache (transformers' ``DynamicCache`` or ``StaticCache``, or a paged one).

Half-block-shifted windows (``DecodePolicy.half_shift``): a cache built with ``shifted=True`` also keeps, in
:attr:`GateKeyCache.shifted` (a second cache with ``offset = block_size // 2``), the gate keys of the windows
``[J * bs + bs/2, (J + 1) * bs + bs/2)``, pooled, projected and rotated at their first position by the same gate.
A needle that a block boundary splits lies whole in one of them (:meth:`DecodeGate.scores` with ``shifted``).

:class:`BlockBounds` keeps beside them the element-wise min / max of each block's post-RoPE keys
(``DecodePolicy.bound_slots``): what the attention reads, not what the gate pools, so it is filled from the KV cache.

Shape legend: B sequences, Hkv key/value heads, D head dim, Dg gate dim, NB capacity in blocks,
Ck number of K poolings.
"""

from __future__ import annotations

import torch

from ..block_mask import check_block_size
from .attn_gate import pool_blocks
from .decode_gate import DecodeGate, Rotary

__all__ = ["APPEND_IMPLS", "BlockBounds", "GateKeyCache"]

APPEND_IMPLS = (None, "eager", "triton")


def _from_starts(k: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """k [B, Hkv, T, D] with row b moved to begin at ``starts[b]`` (a left-padded batch's first real tokens); the
    positions past a row's end repeat its last token (never read as a block's rows)."""
    b, hkv, t, d = k.shape
    rows = (starts.to(k.device).long().view(b, 1) + torch.arange(t, device=k.device)).clamp(max=t - 1)
    return k.gather(2, rows.view(b, 1, t, 1).expand(b, hkv, t, d))


def _grown(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """x [B, Hkv, NB, C] with room for ``blocks`` blocks on dim 2: itself when it has it, else padded to the larger
    of ``blocks`` and twice NB (growth by doubling: few reallocations while a cache grows step by step)."""
    nb = x.shape[2]
    return x if blocks <= nb else torch.nn.functional.pad(x, (0, 0, 0, max(blocks, 2 * nb) - nb))


class GateKeyCache:
    """Gate keys of completed blocks for B sequences of one layer.

    Attributes:
        keys: [B, Hkv, NB, Dg] gate keys; entry J of sequence b is valid for J < ``num_blocks[b]``.
        num_blocks: int64 [B] completed blocks per sequence.
        lengths: int64 [B] tokens seen per sequence (``offset + num_blocks * block_size`` + rows of the partial
            block, once past the offset).
        offset: the first ``offset`` tokens of each sequence belong to no block: block J covers tokens
            ``[offset + J * bs, offset + (J + 1) * bs)`` and its key is rotated at ``offset + J * bs``.
        shifted: the cache of the half-block-shifted windows (``offset = block_size // 2``), or None; it takes
            every row this one takes (:meth:`prefill`, :meth:`extend`, :meth:`append`, :meth:`select`).
    """

    def __init__(
        self,
        gate: DecodeGate,
        batch: int,
        max_tokens: int = 0,
        device=None,
        impl: str | None = None,
        offset: int = 0,
        shifted: bool = False,
    ):
        """An empty cache for ``gate`` (a :class:`DecodeGate`), ``batch`` sequences and room for
        ``max_tokens`` tokens per sequence (it grows when needed); ``offset`` tokens before the first block
        (``0 <= offset < block_size``); ``shifted``: also keep the half-block-shifted windows' keys.

        ``impl`` chooses how :meth:`append` runs: ``"triton"`` (:func:`seerattn.ops.gate_key_append`, two
        launches besides the model's rotary; CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``: it raises
        elsewhere, never falls back), ``"eager"`` (the torch reference, any device and dtype, ~38 ops a step besides
        the rotary) or None: :meth:`append_impl`'s rule. :meth:`prefill`, :meth:`extend` and :meth:`select` are
        torch.
        """
        if impl not in APPEND_IMPLS:
            raise ValueError(f"GateKeyCache: impl must be one of {APPEND_IMPLS[1:]} or None (automatic), got {impl!r}")
        self.block_size = gate.config.block_size
        if not 0 <= offset < self.block_size:
            raise ValueError(f"GateKeyCache: offset must be in [0, block_size = {self.block_size}), got {offset}")
        if offset and impl == "triton":
            raise ValueError("GateKeyCache: the Triton append takes block-aligned caches only (offset 0); use 'eager'")
        self.gate = gate
        self.impl = impl
        self.offset = offset
        p = gate.k_proj
        device = p.device if device is None else torch.device(device)
        self.shifted = (
            GateKeyCache(gate, batch, max_tokens, device, "eager" if impl == "triton" else impl, self.block_size // 2)
            if shifted
            else None
        )
        self.poolings = gate.config.k_pooling
        cap = max(1, -(-max_tokens // self.block_size))
        hkv, d = gate.num_kv_heads, gate.head_dim
        self.keys = torch.zeros(batch, hkv, cap, gate.gate_dim, dtype=p.dtype, device=device)
        self.num_blocks = torch.zeros(batch, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        # Running pools of the partial block, in fp32 at least (sums), one slot per pooling.
        self._pools = torch.zeros(
            batch, hkv, len(self.poolings), d, dtype=torch.promote_types(p.dtype, torch.float32), device=device
        )
        self._max_len = 0  # host-side upper bound on ``lengths`` (decides growth without a sync)
        # [Ck, 1] start values of the running pools (-inf for max, +inf for min, 0 for sums), made once:
        # a host-to-device copy per step would be a synchronisation.
        start = {"max": float("-inf"), "min": float("inf"), "avg": 0.0}
        self._start = torch.tensor([start[p] for p in self.poolings], dtype=self._pools.dtype).view(-1, 1).to(device)

    @property
    def capacity(self) -> int:
        """Blocks that fit per sequence."""
        return self.keys.shape[2]

    def _reserve(self, max_len: int) -> None:
        self.keys = _grown(self.keys, -(-max_len // self.block_size))
        self._max_len = max_len

    def _combine(self, pools: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Fold into pools [..., Ck, D] either one row [..., D] (into every pooling) or other pools [..., Ck, D]."""
        out = []
        for i, p in enumerate(self.poolings):
            cur = pools[..., i, :]
            new = (rows[..., i, :] if rows.dim() == pools.dim() else rows).to(pools.dtype)
            out.append(torch.maximum(cur, new) if p == "max" else torch.minimum(cur, new) if p == "min" else cur + new)
        return torch.stack(out, dim=-2)

    def _finish(self, pools: torch.Tensor, count: int) -> torch.Tensor:
        """Pooled vectors [..., Ck * D] (the ``pool_blocks`` layout) from running pools of ``count`` rows."""
        parts = [pools[..., i, :] / count if p == "avg" else pools[..., i, :] for i, p in enumerate(self.poolings)]
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def prefill(
        self,
        k: torch.Tensor,
        cache_seqlens: torch.Tensor | None = None,
        rotary: Rotary | None = None,
        starts: torch.Tensor | None = None,
    ) -> None:
        """Rebuild the cache from the prompts' keys in bulk.

        Args:
            k: [B, Hkv, T, D] pre-RoPE keys; sequence b's tokens are ``k[b, :, starts[b] : starts[b] +
                cache_seqlens[b]]``.
            cache_seqlens: int [B] prompt lengths (default: from the start to T for every sequence).
            rotary: the model's rotary callable (see :mod:`seerattn.gate.decode_gate`).
            starts: int [B] each prompt's first token in its row (a left-padded batch: the pad keys before it are
                not read), default 0. Blocks, lengths and gate-key positions count from there, as for the prompt
                alone; only the prompts' rows are kept, so later :meth:`append` / :meth:`extend` calls continue
                each sequence at its own length (the cache holds no record of the starts).
        """
        b, hkv, t, d = k.shape
        if b != self.keys.shape[0] or hkv != self.gate.num_kv_heads or d != self.gate.head_dim:
            raise ValueError(
                f"GateKeyCache for B={self.keys.shape[0]}, Hkv={self.gate.num_kv_heads}, D={self.gate.head_dim} got k "
                f"{tuple(k.shape)}"
            )
        if t == 0:
            raise ValueError("GateKeyCache.prefill needs at least one token (T >= 1)")
        if self.shifted is not None:
            self.shifted.prefill(k, cache_seqlens, rotary, starts)
        bs, o = self.block_size, self.offset
        first = torch.zeros(b, dtype=torch.long, device=k.device) if starts is None else starts.to(k.device).long()
        lens = t - first if cache_seqlens is None else cache_seqlens.to(k.device).long()
        if starts is not None:  # each row moved to begin at its prompt
            k = _from_starts(k, first)
        self._reserve(t)
        kw = k[:, :, o:] if t > o else k[:, :, :1]  # the rows from the offset on (one unread row if there are none)
        lens_w = (lens - o).clamp(min=0)  # rows of each sequence in blocks
        with torch.autocast(device_type=k.device.type, enabled=False):  # the gate runs in its own dtype
            full = self.gate.block_keys(k, rotary, offset=o)  # [B, Hkv, n, Dg]
        n = full.shape[2]
        done = lens_w // bs
        valid = (torch.arange(n, device=k.device).view(1, -1) < done.view(-1, 1)).view(b, 1, n, 1)
        self.keys.zero_()
        self.keys[:, :, :n] = torch.where(valid, full.to(self.keys.dtype), 0.0)
        # The partial block of each sequence: rows [done * bs, lens_w), read in place of a loop over b.
        offs = torch.arange(bs, device=k.device)
        pos = done.view(-1, 1) * bs + offs  # [B, bs]
        rows_ok = pos < lens_w.view(-1, 1)
        gathered = kw.gather(2, pos.clamp(max=kw.shape[2] - 1).view(b, 1, bs, 1).expand(b, hkv, bs, d))
        pools = []
        for p in self.poolings:
            x = gathered.to(self._pools.dtype)
            m = rows_ok.view(b, 1, bs, 1)
            if p == "max":
                pools.append(x.masked_fill(~m, float("-inf")).amax(2))
            elif p == "min":
                pools.append(x.masked_fill(~m, float("inf")).amin(2))
            else:
                pools.append(x.masked_fill(~m, 0.0).sum(2))
        # In place: the tensors keep their addresses from step to step (CUDA graphs).
        self._pools.copy_(torch.stack(pools, dim=2))
        self.num_blocks.copy_(done)
        self.lengths.copy_(lens)

    @torch.no_grad()
    def extend(self, k: torch.Tensor, rotary: Rotary | None = None) -> None:
        """Add T new pre-RoPE K rows to every sequence at once, k: [B, Hkv, T, D] (a prefill chunk that
        continues the cache): the same keys, pools and lengths as T calls of :meth:`append`.

        The rows of sequence b fill its partial block first, then whole blocks, then a new partial block;
        each sequence keeps its own phase. Every row is pooled into its block by one scatter-reduce per
        pooling, the first block also with the running pools of the rows it already had.
        """
        b, hkv, t, d = k.shape
        if (b, hkv, d) != (self.keys.shape[0], self.gate.num_kv_heads, self.gate.head_dim) or t == 0:
            raise ValueError(
                f"GateKeyCache.extend needs k [B={self.keys.shape[0]}, Hkv={self.gate.num_kv_heads}, T >= 1, "
                f"D={self.gate.head_dim}], got {tuple(k.shape)}"
            )
        if self.shifted is not None:
            self.shifted.extend(k, rotary)
        bs = self.block_size
        self._reserve(self._max_len + t)
        eff = self.lengths - self.offset  # [B] rows past the offset so far (negative: rows still to skip)
        count = torch.where(eff >= 0, eff % bs, eff)  # rows already in the partial block (negative: to skip)
        nblk = (bs - 1 + t) // bs + 1  # blocks a chunk of t rows can touch, from the partial one on
        rel = torch.div(count.view(b, 1) + torch.arange(t, device=k.device), bs, rounding_mode="floor")
        rel = torch.where(rel >= 0, rel, nblk).view(b, 1, t, 1)  # [B, 1, T, 1]; rows before the offset: a spare slot
        index = rel.expand(b, hkv, t, d)
        x = k.to(self._pools.dtype)
        pools = []
        for i, p in enumerate(self.poolings):
            init = self._start[i].expand(b, hkv, nblk + 1, d).clone()  # empty blocks keep the start value
            reduce = {"max": "amax", "min": "amin", "avg": "sum"}[p]
            pools.append(init.scatter_reduce(2, index, x, reduce=reduce, include_self=True)[:, :, :nblk])
        pools = torch.stack(pools, dim=3)  # [B, Hkv, nblk, Ck, D]
        old = torch.where((count > 0).view(b, 1, 1, 1), self._pools, self._start)  # [B, Hkv, Ck, D]
        pools = torch.cat([self._combine(old, pools[:, :, 0]).unsqueeze(2), pools[:, :, 1:]], dim=2)
        total = count + t  # rows from the partial block's start
        done = torch.div(total, bs, rounding_mode="floor").clamp(min=0)  # [B] blocks completed by this chunk
        j = torch.arange(nblk, device=k.device)
        start = (self.num_blocks.view(b, 1) + j) * bs + self.offset  # [B, nblk] first positions
        with torch.autocast(device_type=k.device.type, enabled=False):
            keys = self.gate.gate_keys(self._finish(pools, bs), start, rotary)  # [B, Hkv, nblk, Dg]
        # cache slot s of sequence b takes block s - num_blocks[b] of this chunk where that block is complete
        # (a where over the slots rather than a scatter: slots past the capacity never collide with real ones)
        rel_slot = torch.arange(self.capacity, device=k.device).view(1, -1) - self.num_blocks.view(b, 1)  # [B, NB]
        take = ((rel_slot >= 0) & (rel_slot < done.view(b, 1))).view(b, 1, -1, 1)
        src = rel_slot.clamp(0, nblk - 1).view(b, 1, -1, 1).expand(b, hkv, self.capacity, self.keys.shape[-1])
        self.keys.copy_(torch.where(take, keys.to(self.keys.dtype).gather(2, src), self.keys))
        # the new partial block's pools (block ``done``; unused when it is empty: the next row starts afresh)
        tail = done.clamp(max=nblk - 1).view(b, 1, 1, 1, 1).expand(b, hkv, 1, *pools.shape[3:])
        self._pools.copy_(pools.gather(2, tail).squeeze(2))
        self.num_blocks.add_(done)
        self.lengths.add_(t)

    @torch.no_grad()
    def select(self, index: torch.Tensor) -> None:
        """Keep, reorder or repeat sequences: sequence i becomes the old sequence ``index[i]`` (int [B']).

        What transformers' caches do to their K/V for beam search (``reorder_cache``), contrastive search
        (``batch_repeat_interleave``, ``batch_select_indices``). New tensors (new addresses): not for a
        captured CUDA graph.
        """
        if self.shifted is not None:
            self.shifted.select(index)
        index = index.to(self.keys.device).long()
        self.keys = self.keys.index_select(0, index)
        self.num_blocks = self.num_blocks.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        self._pools = self._pools.index_select(0, index)

    def count_replayed_append(self) -> None:
        """The host side of :meth:`append` for a step whose kernels ran from a CUDA graph (the device tensors the
        replay updated): the host bound on the lengths. The capacity must already hold the step (no growth in a
        replay: a static KV cache's capacity is reserved when the prompt fills the cache)."""
        if self._max_len + 1 > self.capacity * self.block_size:
            raise RuntimeError(
                f"GateKeyCache: a replayed append past the capacity ({self.capacity} blocks of {self.block_size})"
            )
        self._max_len += 1
        if self.shifted is not None:
            self.shifted.count_replayed_append()

    def append_impl(self, device: torch.device, dtype: torch.dtype) -> str:
        """What :meth:`append` runs for K rows on ``device`` in ``dtype``: ``impl`` when given, else ``"triton"``
        on CUDA where the kernel takes the dtypes (rows and gate in fp16, bf16 or fp32) and ``"eager"`` otherwise
        (the CPU, fp64 gates or rows, a cache with an offset)."""
        if self.impl is not None:
            return self.impl
        if self.offset:  # the kernel pools block-aligned caches only
            return "eager"
        kernel_dtypes = (torch.float16, torch.bfloat16, torch.float32)
        cuda = torch.device(device).type == "cuda"
        return "triton" if cuda and dtype in kernel_dtypes and self.keys.dtype in kernel_dtypes else "eager"

    @torch.no_grad()
    def append(self, k_new: torch.Tensor, rotary: Rotary | None = None) -> None:
        """Add one new pre-RoPE K row per sequence, k_new: [B, Hkv, D]; sequences whose block it
        completes get the block's gate key at index ``num_blocks[b]`` (then ``num_blocks[b] += 1``).
        Runs :meth:`append_impl`'s choice; both keep the tensors' addresses (CUDA graphs)."""
        b, hkv, d = self.keys.shape[0], self.gate.num_kv_heads, self.gate.head_dim
        if tuple(k_new.shape) != (b, hkv, d):
            raise ValueError(f"GateKeyCache.append needs k_new [B={b}, Hkv={hkv}, D={d}], got {tuple(k_new.shape)}")
        if self.shifted is not None:
            self.shifted.append(k_new, rotary)
        self._reserve(self._max_len + 1)
        if self.append_impl(k_new.device, k_new.dtype) == "triton":
            self._append_triton(k_new, rotary)
        else:
            self._append_eager(k_new, rotary)

    def _append_eager(self, k_new: torch.Tensor, rotary: Rotary | None) -> None:
        """:meth:`append` in torch (the reference; the capacity already reserved): every sequence's gate key is
        computed, and kept where the row completes its block."""
        b, hkv, bs = k_new.shape[0], k_new.shape[1], self.block_size
        eff = self.lengths - self.offset  # rows past the offset so far; this row is pooled where it is >= 0
        pooled = (eff >= 0).view(b, 1, 1, 1)
        count = eff.clamp(min=0) % bs  # rows already in the partial block
        fresh = (count == 0).view(b, 1, 1, 1)
        pools = torch.where(fresh, self._start, self._pools)
        self._pools.copy_(torch.where(pooled, self._combine(pools, k_new), self._pools))
        done = (count + 1 == bs) & (eff >= 0)  # [B]
        start = (self.num_blocks * bs + self.offset).view(b, 1)
        with torch.autocast(device_type=k_new.device.type, enabled=False):
            key = self.gate.gate_keys(self._finish(self._pools, bs).unsqueeze(2), start, rotary)  # [B, Hkv, 1, Dg]
        slot = self.num_blocks.clamp(max=self.capacity - 1).view(b, 1, 1, 1).expand(b, hkv, 1, self.keys.shape[-1])
        old = self.keys.gather(2, slot)
        self.keys.scatter_(2, slot, torch.where(done.view(b, 1, 1, 1), key.to(self.keys.dtype), old))
        self.num_blocks.add_(done)
        self.lengths.add_(1)

    def _append_triton(self, k_new: torch.Tensor, rotary: Rotary | None) -> None:
        """:meth:`append` as :func:`seerattn.ops.gate_key_append` (the capacity already reserved): the model's
        rotary for every sequence's partial-block start, then the two kernels."""
        from ..ops.kcache import gate_key_append

        gate = self.gate
        cos = sin = None
        if gate.config.use_rope:
            start = (self.num_blocks * self.block_size).view(-1, 1)  # [B, 1]
            with torch.autocast(device_type=k_new.device.type, enabled=False):
                # a [B, Hkv, 1, Dg] view in the gate's dtype: what DecodeGate._rope hands the rotary
                cos, sin = gate.rope_tables(self.keys[:, :, :1], start, rotary)
        gate_key_append(
            k_new, self._pools, self.keys, self.lengths, self.num_blocks, gate.k_proj, gate.k_norm.weight,
            gate.k_norm.eps, cos, sin, block_size=self.block_size, poolings=self.poolings,
        )  # fmt: skip


class BlockBounds:
    """Element-wise min and max of each key block's post-RoPE keys, for B sequences of one layer: the bounds that
    :func:`seerattn.decode_policy.bound_block_picks` ranks blocks by (``DecodePolicy.bound_slots``).

    2 x D values per block and KV head in the KV cache's dtype, beside its 2 x ``block_size`` x D: 1/64 of its bytes at
    64-token blocks. Exact (min and max of the cached values). Block J of sequence b covers its KV cache rows
    ``[starts[b] + J * bs, starts[b] + (J + 1) * bs)`` (``starts``: a left-padded batch's first real tokens, else 0),
    as the decode kernel reads them. A block's bounds are valid once it is completed: :meth:`refresh` writes every
    block from the cache's rows (a prompt, a prefill chunk), :meth:`update` after each decode step the last completed
    block of each sequence (static shapes, no host synchronisation: capturable in a CUDA graph).

    Attributes:
        kmin, kmax: [B, Hkv, NB, D] the bounds; NB grows with :meth:`reserve`.
    """

    def __init__(self, key: torch.Tensor, block_size: int, max_tokens: int, impl: str | None = None):
        """Room for ``max_tokens`` tokens of B sequences shaped like ``key`` [B, Hkv, T, D] (its dtype and device).

        ``impl`` chooses how :meth:`update` runs: ``"triton"`` (:func:`seerattn.ops.block_bounds_update`, one launch;
        CUDA, or CPU under ``TRITON_INTERPRET=1``: it raises elsewhere), ``"eager"`` (torch, ~15 ops) or None:
        ``"triton"`` for CUDA tensors in fp16 / bf16 / fp32, ``"eager"`` otherwise."""
        if impl not in APPEND_IMPLS:
            raise ValueError(f"BlockBounds: impl must be one of {APPEND_IMPLS[1:]} or None (automatic), got {impl!r}")
        check_block_size(block_size, "BlockBounds")
        if key.dim() != 4:
            raise ValueError(
                f"BlockBounds needs key [B, Hkv, T, D] (its shape, dtype and device), got {tuple(key.shape)}"
            )
        b, hkv, _, d = key.shape
        kernel_dtype = key.dtype in (torch.float16, torch.bfloat16, torch.float32)
        self.impl = impl or ("triton" if key.device.type == "cuda" and kernel_dtype else "eager")
        self.block_size = block_size
        cap = max(1, -(-max_tokens // block_size))
        self.kmin = key.new_zeros(b, hkv, cap, d)
        self.kmax = key.new_zeros(b, hkv, cap, d)

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` per sequence (host-side: the caller knows the cache's size); grows by doubling."""
        need = -(-tokens // self.block_size)
        self.kmin, self.kmax = _grown(self.kmin, need), _grown(self.kmax, need)

    @torch.no_grad()
    def refresh(self, key: torch.Tensor, starts: torch.Tensor | None = None) -> None:
        """Every block's bounds from the cache's rows so far, key: [B, Hkv, T, D] post-RoPE; ``starts``: int [B]
        each sequence's first row (default 0). Blocks past a sequence's rows are bounded over what the rows hold."""
        b, hkv, t, d = key.shape
        if (b, hkv, d) != (self.kmin.shape[0], self.kmin.shape[1], self.kmin.shape[3]) or t == 0:
            raise ValueError(
                f"BlockBounds.refresh needs key [B={self.kmin.shape[0]}, Hkv={self.kmin.shape[1]}, T >= 1, "
                f"D={self.kmin.shape[3]}], got {tuple(key.shape)}"
            )
        if starts is not None:  # each row moved to begin at its sequence's first token
            key = _from_starts(key, starts)
        self.reserve(t)
        lo, hi = pool_blocks(key, self.block_size, ("min", "max")).chunk(2, dim=-1)
        n = lo.shape[2]
        self.kmin[:, :, :n].copy_(lo)  # in place: the tensors keep their addresses (CUDA graphs)
        self.kmax[:, :, :n].copy_(hi)

    @torch.no_grad()
    def update(self, key: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor | None = None) -> None:
        """After a decode step: the bounds of each sequence's last completed block, read from the cache.

        key: [B, Hkv, Tcap, D] the KV cache's post-RoPE keys (the step's token written); lengths: int [B] tokens of
        each sequence, the step's included; starts: int [B] each sequence's first row (default 0). A block completed
        by an earlier step is rewritten with the same values: one 64-row read per sequence and step, no branch.
        Runs ``impl`` (the constructor's).
        """
        if self.impl == "triton":  # the op validates its inputs
            from ..ops.kcache import block_bounds_update

            block_bounds_update(key, self.kmin, self.kmax, lengths, starts, self.block_size)
            return
        b, hkv, _, d = self.kmin.shape
        if key.dim() != 4 or (key.shape[0], key.shape[1], key.shape[3]) != (b, hkv, d) or key.shape[2] == 0:
            raise ValueError(f"BlockBounds.update needs key [B={b}, Hkv={hkv}, T >= 1, D={d}], got {tuple(key.shape)}")
        tcap = key.shape[2]
        for name, x in (("lengths", lengths), ("starts", starts)):
            if x is not None and tuple(x.shape) != (b,):
                raise ValueError(f"BlockBounds.update needs {name} [B={b}], got {tuple(x.shape)}")
        bs = self.block_size
        last = (lengths.to(key.device).long() - 1) // bs - 1  # [B] the last completed block (-1: none)
        first = last.clamp(min=0) * bs + (0 if starts is None else starts.to(key.device).long())
        rows = (first.view(b, 1) + torch.arange(bs, device=key.device)).clamp(max=tcap - 1)  # [B, bs]
        block = key.gather(2, rows.view(b, 1, bs, 1).expand(b, hkv, bs, d))  # [B, Hkv, bs, D]
        slot = last.clamp(0, self.kmin.shape[2] - 1).view(b, 1, 1, 1).expand(b, hkv, 1, d)
        done = (last >= 0).view(b, 1, 1, 1)
        for bound, new in ((self.kmin, block.amin(2, keepdim=True)), (self.kmax, block.amax(2, keepdim=True))):
            bound.scatter_(2, slot, torch.where(done, new.to(bound.dtype), bound.gather(2, slot)))

    def select(self, index: torch.Tensor) -> None:
        """Keep, reorder or repeat sequences as :meth:`GateKeyCache.select` (new tensors: not in a captured graph)."""
        index = index.to(self.kmin.device).long()
        self.kmin = self.kmin.index_select(0, index)
        self.kmax = self.kmax.index_select(0, index)
