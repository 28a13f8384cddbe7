"""One registry of attention-sparsity methods, all run on the same block-sparse path at one budget.

A *method* is either a change of the model's :class:`~seerattn.hf.SeerConfig` (``dense``, the
seer gate, the oracle) or one small function turning a :class:`~seerattn.hf.MaskRequest` into a
:class:`~seerattn.BlockMask` (the baselines, run in ``custom`` mode). Every masked method goes
through :func:`~seerattn.block_mask.mask_from_scores` with the same policy: per query-block row
``I`` keep ``round((I + 1) * density)`` of its ``I + 1`` causal blocks (at least one), the sink
block and the diagonal block forced and counted against the budget. So at one density every
method computes the same number of blocks per row and only *which* blocks differs.

Adding a method = one function ``(request, budget, seed) -> BlockMask`` plus one
:func:`register_method` call (or a :class:`Method` with another ``mode``).

Shape legend: B batch, Hq/Hkv query/key-value heads, T tokens, D head dim, NB = ceil(T / block).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..block_mask import BlockMask, SparsityPolicy, causal_block_mask, mask_from_scores, num_blocks
from ..hf import MaskRequest, SeerState

__all__ = [
    "METHODS",
    "Method",
    "Setting",
    "build_mask",
    "configure",
    "expand_settings",
    "get_method",
    "random_mask",
    "realised_row_counts",
    "register_method",
    "streaming_mask",
    "vertical_slash_mask",
    "vertical_slash_scores",
]

Budget = Literal["none", "density", "threshold", "top_p"]
MaskBuilder = Callable[[MaskRequest, float, int], BlockMask]


@dataclass(frozen=True)
class Method:
    """One entry of the registry.

    Attributes:
        name: registry key (used on the command line).
        mode: the :class:`~seerattn.hf.SeerConfig` mode it runs in (``dense``, ``sparse``, ``oracle``,
            ``custom``).
        budget: what the per-setting number means: ``"density"`` (kept fraction of the causal block
            triangle), ``"threshold"`` / ``"top_p"`` (gate-probability policies; density is realised,
            not set) or ``"none"`` (dense).
        mask_fn: for ``custom`` mode, ``(request, budget, seed) -> BlockMask``.
        needs_gates: the method reads the AttnGates (trained gates must be loaded).
        description: one line for ``--help`` and reports.
    """

    name: str
    mode: Literal["dense", "sparse", "oracle", "custom"]
    budget: Budget
    mask_fn: MaskBuilder | None = None
    needs_gates: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if (self.mode == "custom") != (self.mask_fn is not None):
            raise ValueError(f"method {self.name!r}: mode 'custom' needs a mask_fn and other modes take none")
        if (self.mode == "dense") != (self.budget == "none"):
            raise ValueError(f"method {self.name!r}: only mode 'dense' has budget 'none'")


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (a name may be registered once)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; a clear error lists the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class Setting:
    """One method at one budget value (``None`` for dense)."""

    method: str
    budget: float | None = None

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}@{self.budget:g}"

    def to_dict(self) -> dict:
        m = get_method(self.method)
        return {"method": self.method, "budget_kind": m.budget, "budget": self.budget, "label": self.label}


def expand_settings(
    methods: Iterable[str],
    densities: Sequence[float] = (),
    thresholds: Sequence[float] = (),
    top_ps: Sequence[float] = (),
) -> list[Setting]:
    """Every requested method at each value of its budget kind (dense once), in the given order."""
    values = {"density": densities, "threshold": thresholds, "top_p": top_ps}
    out: list[Setting] = []
    for name in methods:
        m = get_method(name)
        if m.budget == "none":
            out.append(Setting(name))
            continue
        if not values[m.budget]:
            raise ValueError(f"method {name!r} needs at least one {m.budget} value (none were given)")
        for v in values[m.budget]:
            SparsityPolicy(kind=m.budget, value=v)  # validates the range with a clear message
            out.append(Setting(name, float(v)))
    return out


def _policy(kind: str, value: float) -> SparsityPolicy:
    # One fresh policy for every method (sink and diagonal forced, no overrides), so that an
    # adapter's own policy does not give the gate a different budget from the baselines.
    return SparsityPolicy(kind=kind, value=value)  # type: ignore[arg-type]


def configure(state: SeerState, setting: Setting, seed: int = 0) -> None:
    """Point a prepared model's :class:`~seerattn.hf.SeerState` at ``setting``."""
    m = get_method(setting.method)
    if m.mode == "dense":
        state.set(mode="dense")
        state.mask_fn = None
        return
    if setting.budget is None:
        raise ValueError(f"method {m.name!r} needs a {m.budget} value")
    if m.mode == "custom":
        state.set(mode="custom", policy=_policy("density", setting.budget))
        state.mask_fn = functools.partial(_call_builder, m.mask_fn, setting.budget, seed)
    else:
        state.set(mode=m.mode, policy=_policy(m.budget, setting.budget))
        state.mask_fn = None


def _call_builder(fn: MaskBuilder, budget: float, seed: int, request: MaskRequest) -> BlockMask:
    return fn(request, budget, seed)


def build_mask(name: str, request: MaskRequest, budget: float, seed: int = 0) -> BlockMask:
    """The mask a ``custom`` method builds for ``request`` (for tests and the mask plots)."""
    m = get_method(name)
    if m.mask_fn is None:
        raise ValueError(f"method {name!r} runs in mode {m.mode!r} and has no mask function")
    return m.mask_fn(request, budget, seed)


def _density_mask(scores: torch.Tensor, request: MaskRequest, density: float) -> BlockMask:
    """scores [B, Hq, NB, NB] (higher = keep first) -> the shared density policy's mask."""
    return mask_from_scores(scores, _policy("density", density), request.seq_len, request.block_size)


def _shape(request: MaskRequest) -> tuple[int, int, int]:
    b, hq = request.q.shape[:2]
    return b, hq, num_blocks(request.seq_len, request.block_size)


# ------------------------------------------------------------------------------------ baselines
def streaming_mask(request: MaskRequest, density: float, seed: int = 0) -> BlockMask:
    """StreamingLLM at block level: the sink block plus the nearest blocks before the diagonal.

    Each row keeps its budget of blocks: block 0 (forced) and then the most recent ones, so the
    local window of row ``I`` is ``round((I + 1) * density) - 1`` blocks (diagonal included).
    """
    b, hq, nb = _shape(request)
    idx = torch.arange(nb, device=request.q.device, dtype=torch.float32)
    scores = -(idx.view(nb, 1) - idx.view(1, nb))  # closer to the diagonal ranks higher
    return _density_mask(scores.expand(b, hq, nb, nb), request, density)


def random_mask(request: MaskRequest, density: float, seed: int = 0) -> BlockMask:
    """Random blocks at the budget (sink and diagonal forced); deterministic in (seed, layer)."""
    b, hq, nb = _shape(request)
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + request.layer_idx)
    scores = torch.rand(b, hq, nb, nb, generator=gen).to(request.q.device)
    return _density_mask(scores, request, density)


def vertical_slash_scores(request: MaskRequest, last_q: int | None = None) -> torch.Tensor:
    """MInference-style block scores estimated from the last queries' attention.

    The causal softmax of the last ``last_q`` queries (default: one block) over all keys gives, per
    key token ``j``, a *vertical* mass ``v[j]`` (column sum) and, per token offset ``o = i - j``, a
    *slash* mass ``s[o]`` (diagonal sum), as shares of the total. Both are carried to blocks:
    ``V[J] = sum_{j in J} v[j]`` and ``S[d] = sum_o s[o] * max(0, 1 - |o - d * bs| / bs)`` (the
    share of a token diagonal that falls in block diagonal ``d``; both sum to 1). Block ``(I, J)``
    scores ``max(V[J], S[I - J])``: kept if its column or its diagonal carries much of the attention.
    From the last queries alone each line also casts a ghost of the other kind (a slash reads as a
    vertical on the key blocks it hits there, and a vertical as slash mass), as in MInference.

    Returns:
        scores [B, Hq, NB, NB] fp32, zero above the diagonal.
    """
    q, k = request.q, request.k
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    bs = request.block_size
    nb = num_blocks(t, bs)
    n_last = min(bs if last_q is None else last_q, t)
    ql = q[:, :, t - n_last :].float()  # [B, Hq, L, D]
    kf = k.float().repeat_interleave(hq // hkv, dim=1)  # [B, Hq, T, D]
    logits = torch.matmul(ql, kf.transpose(-1, -2)) * request.scale  # [B, Hq, L, T]
    rows = torch.arange(t - n_last, t, device=q.device)
    cols = torch.arange(t, device=q.device)
    offsets = rows.view(-1, 1) - cols.view(1, -1)  # [L, T]: i - j
    causal = offsets >= 0
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)  # [B, Hq, L, T]

    probs = probs / n_last  # shares of the last queries' total attention: V and S below each sum to 1
    vertical = probs.sum(-2)  # [B, Hq, T]
    vb = F.pad(vertical, (0, nb * bs - t)).view(b, hq, nb, bs).sum(-1)  # [B, Hq, NB]

    flat = probs.reshape(b * hq, n_last * t)
    slash = torch.zeros(b * hq, t, device=q.device, dtype=probs.dtype)
    slash.scatter_add_(1, offsets.clamp_min(0).reshape(1, -1).expand(b * hq, -1), flat)  # [BH, T]
    # Triangular kernel of width 2*bs - 1 centred on each block diagonal d (token offset d * bs).
    r = torch.arange(-(bs - 1), bs, device=q.device, dtype=probs.dtype)
    kernel = (1 - r.abs() / bs).view(1, 1, -1)
    padded = F.pad(slash.unsqueeze(1), (bs - 1, nb * bs - t + bs - 1))
    sb = F.conv1d(padded, kernel, stride=bs).view(b, hq, nb)  # [B, Hq, NB]

    diag = torch.arange(nb, device=q.device).view(nb, 1) - torch.arange(nb, device=q.device).view(1, nb)
    causal_b = causal_block_mask(nb, device=q.device)
    slash_bb = sb[..., diag.clamp_min(0)]  # [B, Hq, NB, NB]: S[I - J]
    scores = torch.maximum(vb.unsqueeze(-2).expand(b, hq, nb, nb), slash_bb)
    return scores.masked_fill(~causal_b, 0.0)


def vertical_slash_mask(request: MaskRequest, density: float, seed: int = 0) -> BlockMask:
    """Vertical-slash (MInference) at the density budget; see :func:`vertical_slash_scores`."""
    return _density_mask(vertical_slash_scores(request), request, density)


register_method(Method("dense", "dense", "none", description="full causal attention (SDPA)"))
register_method(Method("seer", "sparse", "density", needs_gates=True, description="AttnGate top-k blocks at a density"))
register_method(
    Method(
        "seer_threshold",
        "sparse",
        "threshold",
        needs_gates=True,
        description="AttnGate blocks with probability >= threshold",
    )
)
register_method(
    Method(
        "seer_top_p",
        "sparse",
        "top_p",
        needs_gates=True,
        description="fewest AttnGate blocks holding probability mass p",
    )
)
register_method(Method("oracle", "oracle", "density", description="true top-k blocks of the max-pooled attention map"))
register_method(
    Method("streaming", "custom", "density", streaming_mask, description="StreamingLLM: sink + local blocks")
)
register_method(
    Method(
        "vertical_slash",
        "custom",
        "density",
        vertical_slash_mask,
        description="MInference vertical + slash lines estimated from the last query block",
    )
)
register_method(Method("random", "custom", "density", random_mask, description="random blocks (seeded)"))


def realised_row_counts(mask: BlockMask) -> torch.Tensor:
    """int64 [B, H, NQ]: kept causal blocks per row (for checks against the budget)."""
    dense = mask.to_dense()
    nq = dense.shape[-1]
    return (dense & causal_block_mask(nq, device=dense.device)).sum(-1)
