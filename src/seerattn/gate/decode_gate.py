"""The decode gate (SeerAttention-R): scores the completed key blocks of the cache for one new token.

Per KV group: the group's query heads (pre-RoPE, after q-norm where the family has one) are
concatenated and projected to one gate query; K is pooled per block (max/min/avg concatenated) and
projected to one gate key per block; both go through RMSNorm and then RoPE, the key at its block's
first position and the query at its own position; logits are ``qg . kg / sqrt(Dg)`` over the blocks
completed before the query's block. The current (partial) block is not scored: the policies always
keep it (:mod:`seerattn.decode_policy`).

Gate keys depend on K only, so they are computed once per completed block and cached
(:class:`~seerattn.gate.kcache.GateKeyCache`).

Rotary convention: ``rotary(x, position_ids) -> (cos, sin)`` with ``position_ids`` [B, N] and cos, sin
[B, N, Dg], the signature of transformers' shared ``model.model.rotary_emb`` (the model's own theta
and scaling), applied rotate-half style (:func:`~seerattn.gate.attn_gate.apply_rotary`), as the prefill
gate does. Positions are the sequence's own token positions (0 for its first token).

Shape legend: B sequences, Hq / Hkv query / key-value heads, G = Hq / Hkv, D head dim, T tokens,
NB = ceil(T / block_size) key blocks, Dg gate dim, Ck number of K poolings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..block_mask import check_block_size
from .attn_gate import POOLINGS, apply_rotary, pool_blocks

__all__ = [
    "QUERY_IMPLS",
    "DecodeGate",
    "DecodeGateConfig",
    "Rotary",
    "RotaryTable",
    "length_free_rotary",
    "straddle_logits",
]

Rotary = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

QUERY_IMPLS = (None, "eager", "triton")  # DecodeGate.query_impl: None = automatic (DecodeGate.decode_query_impl)


def length_free_rotary(rotary) -> bool:
    """Whether ``rotary``'s cos, sin at a position do not depend on the sequence's length: not dynamic NTK or
    LongRoPE (transformers' ``rope_type``), whose frequencies change with the longest position seen."""
    rope = str(getattr(rotary, "rope_type", "default"))
    return "dynamic" not in rope and rope != "longrope"


class RotaryTable:
    """A :data:`Rotary` answered from tables: ``rotary``'s cos, sin at positions 0 .. capacity - 1, computed once.

    A decode step then gathers its rows (two index launches) instead of running the model's rotary (~8 launches:
    frequency product, concatenation, cos, sin, scaling, casts) twice a layer (gate query and key-cache append).
    The values are the rotary's own: it computes every position independently (one product of the frequency and
    the position, then elementwise ops), so a table row equals what a call at that position returns. Only for a
    ``length_free_rotary`` and a cache of known capacity (a static one); positions must lie in [0, capacity).

    Args:
        rotary: the model's rotary callable. capacity: positions covered. dim: the rotary's width (Dg).
        dtype, device: of the gate vectors it will rotate (the tables are made for them, as the rotary would).
    """

    def __init__(self, rotary: Rotary, capacity: int, dim: int, dtype: torch.dtype, device: torch.device):
        if not length_free_rotary(rotary):
            raise ValueError(
                f"RotaryTable needs a rotary whose frequencies do not depend on the length; {rotary.rope_type!r} does"
            )
        like = torch.empty(1, 1, capacity, dim, dtype=dtype, device=device)
        cos, sin = rotary(like, torch.arange(capacity, device=device).view(1, -1))
        self.cos, self.sin = cos[0], sin[0]  # [capacity, Dg]

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, Hkv, N, Dg] (dtype and device only), positions int [B, N] -> cos, sin [B, N, Dg]."""
        if x.dtype != self.cos.dtype or x.device != self.cos.device:
            raise ValueError(
                f"RotaryTable made for {self.cos.dtype} on {self.cos.device}, asked for {x.dtype} on {x.device}"
            )
        return self.cos[positions], self.sin[positions]


@dataclass(frozen=True)
class DecodeGateConfig:
    """Configuration of a :class:`DecodeGate`.

    Args:
        block_size: tokens per key block (power of two; 64 in SeerAttention-R).
        k_pooling: pooling functions for K, concatenated on channels (subset of ``POOLINGS``).
        gate_dim: width Dg of the gate vectors; None means the head dim.
        use_rope: rotate gate vectors with the model's RoPE (keys at block starts, the query at its position).
        norm_eps: epsilon of the RMSNorms on gate q and k.
    """

    block_size: int = 64
    k_pooling: tuple[str, ...] = ("max", "min", "avg")
    gate_dim: int | None = None
    use_rope: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        try:
            check_block_size(self.block_size)
        except ValueError as e:
            raise ValueError(f"DecodeGateConfig.{e}") from None
        pools = self.k_pooling
        if isinstance(pools, list):  # lists from JSON/YAML; store a tuple (frozen, hashable)
            pools = tuple(pools)
            object.__setattr__(self, "k_pooling", pools)
        if (
            not isinstance(pools, tuple)
            or not pools
            or any(p not in POOLINGS for p in pools)
            or len(set(pools)) != len(pools)
        ):
            raise ValueError(f"DecodeGateConfig.k_pooling must be distinct entries of {POOLINGS}, got {pools!r}")
        if self.gate_dim is not None and (not isinstance(self.gate_dim, int) or self.gate_dim < 2 or self.gate_dim % 2):
            raise ValueError(
                f"DecodeGateConfig.gate_dim must be an even int >= 2 (RoPE pairs) or None, got {self.gate_dim!r}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"DecodeGateConfig.norm_eps must be > 0, got {self.norm_eps!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["k_pooling"] = list(self.k_pooling)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DecodeGateConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown DecodeGateConfig fields {sorted(unknown)}; accepted: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**d)


def straddle_logits(blocks: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Block logits [..., NB] that also see the half-block-shifted windows [..., NB] (window J straddles blocks J
    and J + 1; -inf where it does not exist): a window counts only where it exceeds both blocks it straddles
    (something centred on their boundary, not half of one strong block), and then lends its logit to both (to the
    one of the two with the lower own logit the next float below it: no tie); block J's logit becomes the
    largest of its own and those lent by the counted windows J - 1 and J. -inf blocks stay -inf."""
    if not isinstance(blocks, torch.Tensor) or not isinstance(windows, torch.Tensor) or blocks.dim() == 0:
        raise TypeError("straddle_logits takes two tensors [..., NB] of block and window logits")
    if blocks.shape != windows.shape or not blocks.is_floating_point() or windows.dtype != blocks.dtype:
        raise ValueError(
            f"straddle_logits needs block and window logits of one shape [..., NB] and one floating dtype, got "
            f"{tuple(blocks.shape)} {blocks.dtype} and {tuple(windows.shape)} {windows.dtype}"
        )
    ninf = torch.full_like(blocks[..., :1], float("-inf"))
    nxt = torch.cat((blocks[..., 1:], ninf), -1)  # block J + 1
    counted = windows.masked_fill(windows <= torch.maximum(blocks, nxt), float("-inf"))
    # The two blocks of a window would tie on its logit, and a top-K would then choose between them in no defined
    # order; the one with the lower own logit gets the next float below, so a budget with room for one keeps the
    # other, the same in every path (steps, decode_eval rows).
    below = torch.nextafter(counted, torch.full_like(counted, float("-inf")))
    to_left = torch.where(blocks >= nxt, counted, below)  # window J's value for block J
    to_right = torch.where(nxt > blocks, counted, below)  # ... and for block J + 1
    from_left = torch.cat((ninf, to_right[..., :-1]), -1)  # window J - 1's value for block J
    out = torch.maximum(blocks, torch.maximum(to_left, from_left))
    return out.masked_fill(torch.isneginf(blocks), float("-inf"))


class DecodeGate(nn.Module):
    """Scores completed key blocks for decode queries, one decision per KV group.

    Parameters (no bias):
        q_proj: [Hkv, G * D, Dg], the group's concatenated query heads -> one gate query.
        k_proj: [Hkv, Ck * D, Dg], the pooled block -> one gate key.
        q_norm, k_norm: RMSNorm over Dg (weights shared by the heads).

    Initialisation: the gate query is the mean of the group's queries and the gate key the avg-pooled
    block (when Dg == D), so an untrained gate scores a block by mean-query . mean-key after the norms.

    ``query_impl`` (an attribute, settable after construction; not part of the state dict) chooses how
    :meth:`decode_query` runs: ``"triton"`` (:func:`seerattn.ops.gate_decode_query`, one launch besides the rotary;
    CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``, no gradients: it raises otherwise, never falls back),
    ``"eager"`` (the torch reference, any device and dtype, differentiable) or None: :meth:`decode_query_impl`'s
    rule. The bulk :meth:`gate_query` (training, :meth:`forward`) is always torch.
    """

    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        config: DecodeGateConfig | None = None,
        query_impl: str | None = None,
    ):
        super().__init__()
        config = DecodeGateConfig() if config is None else config
        if num_kv_heads < 1 or num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.config = config
        self.query_impl = query_impl
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.group = num_q_heads // num_kv_heads
        self.gate_dim = head_dim if config.gate_dim is None else config.gate_dim
        self.q_proj = nn.Parameter(torch.empty(num_kv_heads, self.group * head_dim, self.gate_dim))
        self.k_proj = nn.Parameter(torch.empty(num_kv_heads, len(config.k_pooling) * head_dim, self.gate_dim))
        self.q_norm = nn.RMSNorm(self.gate_dim, eps=config.norm_eps)
        self.k_norm = nn.RMSNorm(self.gate_dim, eps=config.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d, dg = self.head_dim, self.gate_dim
        with torch.no_grad():
            if dg == d:
                eye = torch.eye(d)
                self.q_proj.copy_((eye / self.group).repeat(self.group, 1).expand_as(self.q_proj))
                self.k_proj.zero_()
                if "avg" in self.config.k_pooling:
                    i = self.config.k_pooling.index("avg") * d
                    self.k_proj[:, i : i + d] = eye
                else:
                    nn.init.normal_(self.k_proj, std=1.0 / math.sqrt(self.k_proj.shape[1]))
            else:
                nn.init.normal_(self.q_proj, std=1.0 / math.sqrt(self.q_proj.shape[1]))
                nn.init.normal_(self.k_proj, std=1.0 / math.sqrt(self.k_proj.shape[1]))
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()

    @property
    def query_impl(self) -> str | None:
        """How :meth:`decode_query` runs: ``"eager"``, ``"triton"`` or None (automatic, see the class docstring)."""
        return self._query_impl

    @query_impl.setter
    def query_impl(self, impl: str | None) -> None:
        if impl not in QUERY_IMPLS:
            raise ValueError(
                f"DecodeGate: query_impl must be one of {QUERY_IMPLS[1:]} or None (automatic), got {impl!r}"
            )
        self._query_impl = impl

    def decode_query_impl(self, device: torch.device, dtype: torch.dtype, requires_grad: bool = False) -> str:
        """What :meth:`decode_query` runs for queries on ``device`` in ``dtype`` (``requires_grad``: theirs):
        :attr:`query_impl` when given, else ``"triton"`` on CUDA where the kernel takes the dtypes (queries and
        gate in fp16, bf16 or fp32) and no gradient is needed, ``"eager"`` otherwise (the CPU, fp64 gates or
        queries, training: the kernel has no backward)."""
        if self.query_impl is not None:
            return self.query_impl
        kernel_dtypes = (torch.float16, torch.bfloat16, torch.float32)
        cuda = torch.device(device).type == "cuda"
        if not cuda or dtype not in kernel_dtypes or self.q_proj.dtype not in kernel_dtypes:
            return "eager"
        weights = (self.q_proj, self.q_norm.weight)
        needs_grad = torch.is_grad_enabled() and (requires_grad or any(w.requires_grad for w in weights))
        return "eager" if needs_grad else "triton"

    # ------------------------------------------------------------------ pieces
    def rope_tables(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's cos, sin [B, N, Dg] for gate vectors x: [B, Hkv, N, Dg] at positions [B, N] (``use_rope``
        gates only; x gives the dtype and device, as to transformers' rotary), checked for shape."""
        if rotary is None:
            raise ValueError("DecodeGate with use_rope=True needs rotary(x, position_ids) -> (cos, sin)")
        cos, sin = rotary(x, positions)
        want = (x.shape[0], x.shape[2], self.gate_dim)
        if tuple(cos.shape) != want or tuple(sin.shape) != want:
            raise ValueError(f"rotary must return cos, sin of shape [B, N, Dg] = {list(want)}, got {tuple(cos.shape)}")
        return cos, sin

    def _rope(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary | None) -> torch.Tensor:
        """x: [B, Hkv, N, Dg] rotated at positions [B, N] (identity without ``use_rope``)."""
        if not self.config.use_rope:
            return x
        cos, sin = self.rope_tables(x, positions, rotary)
        return apply_rotary(x, cos.to(x.dtype), sin.to(x.dtype))

    def gate_query(self, q: torch.Tensor, positions: torch.Tensor, rotary: Rotary | None = None) -> torch.Tensor:
        """q: [B, Hq, N, D] pre-RoPE queries at positions [B, N] -> gate queries [B, Hkv, N, Dg] (rotated)."""
        b, hq, n, d = q.shape
        if hq != self.num_q_heads or d != self.head_dim:
            raise ValueError(f"DecodeGate built for Hq={self.num_q_heads}, D={self.head_dim}; got q {tuple(q.shape)}")
        qc = q.to(self.q_proj.dtype).view(b, self.num_kv_heads, self.group, n, d).permute(0, 1, 3, 2, 4)
        qg = torch.einsum("bhnc,hcg->bhng", qc.reshape(b, self.num_kv_heads, n, self.group * d), self.q_proj)
        return self._rope(self.q_norm(qg), positions, rotary)

    def gate_keys(
        self, pooled: torch.Tensor, first_positions: torch.Tensor, rotary: Rotary | None = None
    ) -> torch.Tensor:
        """pooled: [B, Hkv, N, Ck * D] pooled blocks (``pool_blocks`` layout) whose first tokens sit at
        first_positions [B, N] -> gate keys [B, Hkv, N, Dg] (projected, normed, rotated)."""
        kg = torch.einsum("bhnc,hcg->bhng", pooled.to(self.k_proj.dtype), self.k_proj)
        return self._rope(self.k_norm(kg), first_positions, rotary)

    def block_keys(
        self,
        k: torch.Tensor,
        rotary: Rotary | None = None,
        first_positions: torch.Tensor | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """Gate keys of every *completed* block of k: [B, Hkv, T, D] pre-RoPE keys -> [B, Hkv, (T - offset) // bs,
        Dg]; block J covers tokens ``[offset + J * bs, offset + (J + 1) * bs)`` (``offset`` > 0: the
        half-block-shifted windows of ``DecodePolicy.half_shift``). ``first_positions`` [B, N]: the blocks'
        first-token positions (default ``offset + J * block_size``)."""
        b, hkv, t, d = k.shape
        if hkv != self.num_kv_heads or d != self.head_dim:
            raise ValueError(f"DecodeGate built for Hkv={self.num_kv_heads}, D={self.head_dim}; got k {tuple(k.shape)}")
        bs = self.config.block_size
        if not 0 <= offset < bs:
            raise ValueError(f"DecodeGate.block_keys: offset must be in [0, block_size = {bs}), got {offset}")
        n = max(0, t - offset) // bs
        if n == 0:  # no completed block yet (pool_blocks needs at least one token)
            return k.new_zeros(b, hkv, 0, self.gate_dim, dtype=self.k_proj.dtype)
        pooled = pool_blocks(k[:, :, offset : offset + n * bs], bs, self.config.k_pooling, self.k_proj.dtype)
        if first_positions is None:
            first_positions = (torch.arange(n, device=k.device) * bs + offset).expand(b, n)
        return self.gate_keys(pooled, first_positions, rotary)

    @staticmethod
    def _logits(qg: torch.Tensor, kg: torch.Tensor, completed: torch.Tensor) -> torch.Tensor:
        """qg [B, Hkv, N, Dg] . kg [B, Hkv, NB, Dg] / sqrt(Dg) in fp32 (fp64 for an fp64 gate), -inf where
        ``completed`` ([B, 1, N, NB]) is False."""
        dt = torch.promote_types(qg.dtype, torch.float32)
        logits = torch.matmul(qg.to(dt), kg.to(dt).transpose(-1, -2)) / math.sqrt(qg.shape[-1])
        return logits.masked_fill(~completed, float("-inf"))

    # ------------------------------------------------------------------ use
    def scores(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary | None = None,
        shifted: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode logits of one new token per sequence.

        Args:
            q: [B, Hq, D] pre-RoPE queries of the new tokens.
            keys: [B, Hkv, NB, Dg] cached gate keys (:attr:`GateKeyCache.keys`); entries of blocks that
                are not completed before the query's block are ignored.
            positions: int [B], each new token's position (``cache_seqlens - 1``).
            shifted: [B, Hkv, NB', Dg] the gate keys of the half-block-shifted windows (:attr:`GateKeyCache.shifted`;
                window J covers the second half of block J and the first of block J + 1; windows reaching into
                the query's block are ignored), or None. Given: block J's logit is the largest of its own and
                those of the windows J - 1 and J that exceed both blocks they straddle (``DecodePolicy.half_shift``).

        Returns:
            logits [B, Hkv, NB] fp32 (fp64 for an fp64 gate); ``-inf`` for blocks
            ``J >= positions // block_size`` (the current block and later ones).
        """
        if q.dim() != 3 or keys.dim() != 4 or positions.shape != (q.shape[0],):
            raise ValueError(
                f"DecodeGate.scores needs q [B, Hq, D], keys [B, Hkv, NB, Dg], positions [B]; got {tuple(q.shape)}, "
                f"{tuple(keys.shape)}, {tuple(positions.shape)}"
            )
        if shifted is not None and (shifted.dim() != 4 or shifted.shape[:2] != keys.shape[:2]):
            raise ValueError(
                f"DecodeGate.scores: shifted keys must be [B, Hkv, NB', Dg] like keys {tuple(keys.shape)}, got "
                f"{tuple(shifted.shape)}"
            )
        qg = self.decode_query(q, positions, rotary).unsqueeze(2)  # [B, Hkv, 1, Dg]
        nb = keys.shape[2]
        cur = positions.long().view(-1, 1, 1, 1) // self.config.block_size
        j = torch.arange(nb, device=q.device).view(1, 1, 1, -1)
        with torch.autocast(device_type=q.device.type, enabled=False):
            logits = self._logits(qg, keys, j < cur)
            if shifted is not None:
                ns = min(shifted.shape[2], nb)
                windows = self._logits(qg, shifted[:, :, :ns], j[..., :ns] + 1 < cur)
                windows = torch.nn.functional.pad(windows, (0, nb - ns), value=float("-inf"))
                logits = straddle_logits(logits, windows)
            return logits.squeeze(2)

    def decode_query(self, q: torch.Tensor, positions: torch.Tensor, rotary: Rotary | None = None) -> torch.Tensor:
        """Gate queries of one new token per sequence, in the gate's dtype whatever the autocast state: what
        :meth:`scores` multiplies with the keys, and the input of the fused selection
        (:func:`seerattn.decode_policy.select_decode_blocks_fused`).

        q: [B, Hq, D] pre-RoPE queries at positions int [B] -> [B, Hkv, Dg] (rotated). Runs
        :meth:`decode_query_impl`'s choice: the eager :meth:`gate_query` (the reference) or
        :func:`seerattn.ops.gate_decode_query` (one Triton launch after the rotary's cos / sin rows)."""
        positions = positions.view(-1, 1).long()
        with torch.autocast(device_type=q.device.type, enabled=False):
            if self.decode_query_impl(q.device, q.dtype, q.requires_grad) == "eager":
                return self.gate_query(q.unsqueeze(2), positions, rotary).squeeze(2)
            return self._decode_query_triton(q, positions, rotary)

    def _decode_query_triton(self, q: torch.Tensor, positions: torch.Tensor, rotary: Rotary | None) -> torch.Tensor:
        """:meth:`decode_query` as :func:`seerattn.ops.gate_decode_query` (under autocast disabled, positions
        int64 [B, 1]): the rotary's cos / sin rows at the positions, then the kernel."""
        from ..ops.gate_query import gate_decode_query

        b, hq, d = q.shape
        if hq != self.num_q_heads or d != self.head_dim:
            raise ValueError(f"DecodeGate built for Hq={self.num_q_heads}, D={self.head_dim}; got q {tuple(q.shape)}")
        cos = sin = None
        if self.config.use_rope:
            # an uninitialised [B, Hkv, 1, Dg] in the gate's dtype (no launch): what _rope hands the rotary
            like = q.new_empty(b, self.num_kv_heads, 1, self.gate_dim, dtype=self.q_proj.dtype)
            cos, sin = self.rope_tables(like, positions, rotary)
        return gate_decode_query(q, self.q_proj, self.q_norm.weight, self.q_norm.eps, cos, sin)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, rotary: Rotary | None = None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced decode logits: every token of the sequences taken as a decode query (distillation).

        Args:
            q: [B, Hq, T, D] pre-RoPE queries; k: [B, Hkv, T, D] pre-RoPE keys.
            position_ids: [B, T] or None (0..T-1); a gate key sits at its block's first position.

        Returns:
            logits [B, Hkv, T, NB] fp32 or fp64 as in :meth:`scores` (NB = ceil(T / block_size)), ``-inf``
            for ``J >= t // block_size``; the layout of :func:`seerattn.ops.reference.decode_block_scores`
            (the target).
        """
        b, _, t, _ = q.shape
        bs = self.config.block_size
        with torch.autocast(device_type=q.device.type, enabled=False):
            if position_ids is None:
                position_ids = torch.arange(t, device=q.device).expand(b, t)
            qg = self.gate_query(q, position_ids, rotary)
            starts = position_ids[:, ::bs][:, : t // bs]
            kg = self.block_keys(k, rotary, starts)  # completed blocks only: [B, Hkv, T // bs, Dg]
            nb = -(-t // bs)
            kg = nn.functional.pad(kg, (0, 0, 0, nb - kg.shape[2]))  # the partial last block is never scored
            rows = torch.arange(t, device=q.device).view(-1, 1) // bs
            completed = (torch.arange(nb, device=q.device).view(1, -1) < rows).view(1, 1, t, nb)
            return self._logits(qg, kg, completed)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"Hq={self.num_q_heads}, Hkv={self.num_kv_heads}, D={self.head_dim}, Dg={self.gate_dim}, "
            f"block={c.block_size}, k={c.k_pooling}, rope={c.use_rope}"
        )
