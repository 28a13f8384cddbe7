"""The prefill AttnGate: block-pooled Q and K -> per-head projection -> RoPE -> block attention map.

Shape legend: B batch, Hq query heads, Hkv key/value heads, T tokens, D head dim, NB blocks
(``ceil(T / block_size)``), Dg gate dim, Cq/Ck number of Q/K pooling functions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..block_mask import check_block_size

__all__ = ["POOLINGS", "AttnGate", "GateConfig", "apply_rotary", "pool_blocks"]

POOLINGS = ("avg", "max", "min")


@dataclass(frozen=True)
class GateConfig:
    """Configuration of an :class:`AttnGate` (the paper's defaults).

    Args:
        block_size: tokens per block (power of two; 64 or 128 in practice).
        q_pooling: pooling functions for Q, concatenated on channels (subset of ``POOLINGS``).
        k_pooling: pooling functions for K, concatenated on channels.
        gate_dim: width Dg of the projected gate vectors; None means the head dim.
        q_projection: project pooled Q; None means "only when needed" (Q pooled by more than avg
            alone, or Dg != head dim), as in the paper. False uses the pooled Q as is, which needs a
            single Q pooling and Dg == head dim (the official ``Qmax_K*`` / ``Qmin_K*`` gates).
        use_rope: rotate gate vectors with the model's RoPE at each block's first-token position.
        q_subblock: tokens per *query* pooling window; None means the block size (the paper: one pooled
            query per block). With a smaller power of two each block's queries are pooled in
            ``block_size // q_subblock`` windows, each window is scored against the key blocks, and a
            block's logit is the log-sum-exp over its windows. That mirrors the target, which max-pools
            the attention of all the block's queries: a few query tokens that look far back (the question
            at the end of a prompt) keep their own window instead of being averaged with 60 others.
    """

    block_size: int = 64
    q_pooling: tuple[str, ...] = ("avg",)
    k_pooling: tuple[str, ...] = ("max", "min", "avg")
    gate_dim: int | None = None
    q_projection: bool | None = None
    use_rope: bool = True
    q_subblock: int | None = None

    def __post_init__(self) -> None:
        try:
            check_block_size(self.block_size)
        except ValueError as e:
            raise ValueError(f"GateConfig.{e}") from None
        sub = self.q_subblock
        if sub is not None and (
            not isinstance(sub, int) or isinstance(sub, bool) or sub < 1 or sub & (sub - 1) or sub > self.block_size
        ):
            raise ValueError(
                "GateConfig.q_subblock must be None or a power of two in "
                f"[1, block_size={self.block_size}], got {sub!r}"
            )
        for name in ("q_pooling", "k_pooling"):
            pools = getattr(self, name)
            if isinstance(pools, list):  # accept lists from JSON/YAML, store a tuple (frozen, hashable)
                object.__setattr__(self, name, tuple(pools))
                pools = tuple(pools)
            if not isinstance(pools, tuple) or not pools or any(p not in POOLINGS for p in pools):
                raise ValueError(f"GateConfig.{name} must be a non-empty tuple drawn from {POOLINGS}, got {pools!r}")
            if len(set(pools)) != len(pools):
                raise ValueError(f"GateConfig.{name} has a repeated pooling: {pools!r}")
        if self.gate_dim is not None and (not isinstance(self.gate_dim, int) or self.gate_dim < 2 or self.gate_dim % 2):
            raise ValueError(
                f"GateConfig.gate_dim must be an even int >= 2 (RoPE pairs) or None, got {self.gate_dim!r}"
            )

    @property
    def q_step(self) -> int:
        """Tokens per pooled query (``q_subblock``, or the block size)."""
        return self.block_size if self.q_subblock is None else self.q_subblock

    def to_dict(self) -> dict:
        d = asdict(self)
        d["q_pooling"], d["k_pooling"] = list(self.q_pooling), list(self.k_pooling)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GateConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GateConfig fields {sorted(unknown)}; accepted: {sorted(known)}")
        return cls(**d)


def pool_blocks(
    x: torch.Tensor, block_size: int, poolings: tuple[str, ...], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Pool ``x`` over non-overlapping blocks of tokens; a last partial block uses the tokens it has.

    x: [B, H, T, D] -> [B, H, NB, len(poolings) * D] (poolings concatenated in order on channels), in
    ``dtype`` (default: ``x.dtype``). Reads ``x`` in place (no padded or upcast copy of the whole
    sequence: on a 32k prompt that copy cost more than the pooling); averages accumulate in at
    least fp32, max and min are exact in any dtype.
    """
    b, h, t, d = x.shape
    dtype = x.dtype if dtype is None else dtype
    acc = torch.promote_types(x.dtype, torch.float32)
    full = t // block_size
    # [B, H, n, len, D] views: the whole blocks, then the partial last block if there is one
    pieces = [x[:, :, : full * block_size].unflatten(2, (full, block_size))] if full else []
    if t > full * block_size:
        pieces.append(x[:, :, full * block_size :].unsqueeze(2))
    out = []
    for p in poolings:
        if p == "avg":
            pooled = [v.sum(3, dtype=acc) / v.shape[3] for v in pieces]
        elif p == "max":
            pooled = [v.amax(3) for v in pieces]
        else:
            pooled = [v.amin(3) for v in pieces]
        out.append(torch.cat(pooled, dim=2).to(dtype))
    return torch.cat(out, dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the Hugging Face convention (rotate-half): ``x * cos + rotate_half(x) * sin``.

    x: [B, H, N, Dg]; cos, sin: [B or 1, N, Dg] (broadcast over heads).
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class AttnGate(nn.Module):
    """Predicts the block-level attention map of one attention layer (prefill).

    Parameters (no bias):
        k_proj: [Hq, Ck * D, Dg]: K is pooled per KV head, repeated over each GQA group and
            projected once per *query* head (the official ``mask_linear_k`` of gates without a q
            weight; gates with one hold it per KV head, which the converter repeats over the group).
        q_proj: [Hq, Cq * D, Dg], present only when needed (see :class:`GateConfig`).

    Initialisation: the avg-pooled channels of K map to the gate space as the identity (other
    channels zero), so an untrained gate scores blocks by pooled-Q . pooled-K — a useful prior
    that distillation refines.
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, config: GateConfig | None = None):
        super().__init__()
        config = GateConfig() if config is None else config
        if num_kv_heads < 1 or num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.config = config
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.gate_dim = head_dim if config.gate_dim is None else config.gate_dim
        need_q = config.q_pooling != ("avg",) or self.gate_dim != head_dim
        self.has_q_proj = need_q if config.q_projection is None else config.q_projection
        if not self.has_q_proj and (len(config.q_pooling) > 1 or self.gate_dim != head_dim):
            raise ValueError(
                "q_projection=False needs a single Q pooling and gate_dim == head_dim (the pooled Q must "
                f"already have the gate width); got q_pooling={config.q_pooling}, gate_dim={self.gate_dim}, "
                f"head_dim={head_dim}"
            )
        ck = len(config.k_pooling) * head_dim
        self.k_proj = nn.Parameter(torch.empty(num_q_heads, ck, self.gate_dim))
        self.q_proj = (
            nn.Parameter(torch.empty(num_q_heads, len(config.q_pooling) * head_dim, self.gate_dim))
            if self.has_q_proj
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for w, pools in ((self.k_proj, self.config.k_pooling), (self.q_proj, self.config.q_pooling)):
                if w is None:
                    continue
                if "avg" in pools and self.gate_dim == self.head_dim:
                    w.zero_()
                    i = pools.index("avg") * self.head_dim
                    w[:, i : i + self.head_dim] = torch.eye(self.head_dim)
                else:
                    nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[1]))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        impl: str | None = None,
        causal_only: bool = False,
    ) -> torch.Tensor:
        """Gate logits over key blocks.

        Args:
            q: [B, Hq, T, D] pre-RoPE queries (after q-norm where the family has one).
            k: [B, Hkv, T, D] pre-RoPE keys.
            cos, sin: [B or 1, NS, Dg] rotary tables at the first-token position of each query pooling
                window (NS = ``ceil(T / config.q_step)``; NS = NB without ``q_subblock``); keys use every
                ``block_size // q_step``-th entry, their blocks' starts. Required when ``config.use_rope``.
            impl: ``"eager"`` (this module's PyTorch code: differentiable, any device), ``"triton"`` (the
                kernels of :func:`seerattn.ops.gate_block_logits`: inference only, fp32 whatever the
                weights' dtype, no fp32 copy of the sequence and no window-by-block logits) or None:
                ``"triton"`` on CUDA when no gradient is needed (under ``no_grad`` or with frozen weights and
                inputs), else ``"eager"``.
            causal_only: the caller reads only the causal part (on and below the block diagonal): the entries
                above it may be left unwritten, their values unspecified (the Triton gate skips them; the eager one
                writes ``-inf`` there anyway).

        Returns:
            logits [B, Hq, NB, NB] in fp32, ``-inf`` above the block diagonal (diagonal kept; unspecified there with
            ``causal_only``);
            ``logits.softmax(-1)`` is the predicted block attention map.
        """
        b, hq, t, d = q.shape
        if hq != self.num_q_heads or d != self.head_dim or k.shape[1] != self.num_kv_heads or k.shape[-1] != d:
            raise ValueError(
                f"AttnGate built for Hq={self.num_q_heads}, Hkv={self.num_kv_heads}, D={self.head_dim} got q "
                f"{tuple(q.shape)} and k {tuple(k.shape)}"
            )
        if not isinstance(causal_only, bool):
            raise TypeError(f"AttnGate: causal_only must be True or False, got {causal_only!r}")
        if self._resolve_impl(impl, q, k) == "triton":
            from ..ops import gate_block_logits

            c = self.config
            if c.use_rope and (cos is None or sin is None):
                raise ValueError("AttnGate with use_rope=True needs cos and sin [B, NS, Dg]")
            rope = (cos, sin) if c.use_rope else (None, None)
            return gate_block_logits(
                q, k, self.k_proj, self.q_proj, *rope,
                block_size=c.block_size, q_step=c.q_step, q_pooling=c.q_pooling, k_pooling=c.k_pooling,
                causal_only=causal_only,
            )  # fmt: skip
        # The gate runs in its own dtype (fp32 by default) even under an enclosing autocast (bf16
        # distillation): its logits feed a KL whose useful differences are below bf16 resolution.
        with torch.autocast(device_type=q.device.type, enabled=False):
            bs, step = self.config.block_size, self.config.q_step
            r = bs // step  # query windows per block
            dtype = self.k_proj.dtype
            qp = pool_blocks(q, step, self.config.q_pooling, dtype)  # [B, Hq, NS, Cq*D]
            kp = pool_blocks(k, bs, self.config.k_pooling, dtype)  # [B, Hkv, NB, Ck*D]
            kp = kp.repeat_interleave(hq // self.num_kv_heads, dim=1)
            kg = torch.einsum("bhnc,hcg->bhng", kp, self.k_proj)
            qg = torch.einsum("bhnc,hcg->bhng", qp, self.q_proj) if self.q_proj is not None else qp
            ns, nb = qg.shape[2], kg.shape[2]
            if self.config.use_rope:
                if cos is None or sin is None:
                    raise ValueError("AttnGate with use_rope=True needs cos and sin [B, NS, Dg]")
                if cos.shape[1:] != (ns, self.gate_dim) or cos.shape[0] not in (1, b) or sin.shape != cos.shape:
                    raise ValueError(
                        f"cos/sin must be [B={b} or 1, NS={ns}, Dg={self.gate_dim}] (one entry per {step}-token query "
                        f"window), got {tuple(cos.shape)}, {tuple(sin.shape)}"
                    )
                cos, sin = cos.to(dtype), sin.to(dtype)
                qg, kg = apply_rotary(qg, cos, sin), apply_rotary(kg, cos[:, ::r], sin[:, ::r])
            # [B, Hq, NS, NB]: every query window against every key block
            logits = torch.matmul(qg.float(), kg.float().transpose(-1, -2)) / math.sqrt(self.gate_dim)
            if r > 1:
                # All windows of block I see the same key blocks (J <= I), so the future needs no
                # mask before the log-sum-exp: the block mask below sets those entries to -inf (and
                # their gradient to 0). A partial last block has fewer windows: pad them with a
                # finite floor (not -inf, which would make the log-sum-exp's gradient NaN).
                if nb * r != ns:
                    logits = nn.functional.pad(logits, (0, 0, 0, nb * r - ns), value=torch.finfo(logits.dtype).min)
                logits = logits.view(b, hq, nb, r, nb).logsumexp(3)  # [B, Hq, NB, NB]
            causal = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
            return logits.masked_fill(~causal, float("-inf"))

    def _resolve_impl(self, impl: str | None, q: torch.Tensor, k: torch.Tensor) -> str:
        """``"eager"`` or ``"triton"`` for this call (see :meth:`forward`)."""
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, *self.parameters()))
        if impl is None:
            return "triton" if q.device.type == "cuda" and not needs_grad else "eager"
        if impl not in ("eager", "triton"):
            raise ValueError(f"AttnGate impl must be 'eager', 'triton' or None (automatic), got {impl!r}")
        if impl == "triton" and needs_grad:
            raise ValueError(
                "AttnGate impl='triton' has no backward: call it under torch.no_grad() (inference) or use "
                "impl='eager' for training"
            )
        return impl

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"Hq={self.num_q_heads}, Hkv={self.num_kv_heads}, D={self.head_dim}, Dg={self.gate_dim}, "
            f"block={c.block_size}, q_window={c.q_step}, q={c.q_pooling}, k={c.k_pooling}, "
            f"q_proj={self.has_q_proj}, rope={c.use_rope}"
        )
