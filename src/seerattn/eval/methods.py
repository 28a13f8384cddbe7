"""One registry of attention-sparsity methods, all run on the same block-sparse path at one budget.

A *method* is either a change of the model's :class:`~seerattn.hf.SeerConfig` (``dense``, the
seer gate, the oracle) or one small function turning a :class:`~seerattn.hf.MaskRequest` into a
:class:`~seerattn.BlockMask` (the baselines, run in ``custom`` mode). Every masked method goes
through :func:`~seerattn.block_mask.mask_from_scores` with the same policy (:attr:`Setting.policy`):
the density spread over rows by one ``allocation`` (by default per query-block row ``I`` keep
``round((I + 1) * density)`` of its ``I + 1`` causal blocks, at least one), the sink block and the
diagonal block forced and counted against the budget. So at one density and allocation every
method computes the same number of blocks (per row, or per head for ``"head"``) and only *which*
blocks differs.

Methods with a budget of their own (XAttention's threshold, FlexPrefill's gamma) also run in that
*native* mode, registered as ``<name>_top_p`` with the ``"top_p"`` budget: the setting's value is the
method's cumulative-mass threshold (like ``seer_top_p``'s), and the density is whatever it gives, as
reported per setting. The peers' estimators live in :mod:`.peers`.

Adding a method = one function ``(request, policy, seed) -> BlockMask`` plus one
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

from ..block_mask import (
    ALLOCATIONS,
    BlockMask,
    SparsityPolicy,
    causal_block_mask,
    mask_from_scores,
    num_blocks,
)
from ..hf import MaskRequest, SeerState
from .peers import (
    FLEX_MIN_BUDGET,
    FLEX_TAU,
    XATTN_STRIDE,
    flexprefill_estimate,
    flexprefill_native_mask,
    vertical_slash_scores,
    xattention_scores,
)

__all__ = [
    "METHODS",
    "Method",
    "Setting",
    "attention_mass_scores",
    "build_mask",
    "configure",
    "flexprefill_mask",
    "expand_settings",
    "get_method",
    "mass_oracle_mask",
    "random_mask",
    "realised_row_counts",
    "register_method",
    "streaming_mask",
    "vertical_slash_mask",
    "vertical_slash_scores",
    "xattention_mask",
]

Budget = Literal["none", "density", "threshold", "top_p"]
MaskBuilder = Callable[[MaskRequest, SparsityPolicy, int], BlockMask]


@dataclass(frozen=True)
class Method:
    """One entry of the registry.

    Attributes:
        name: registry key (used on the command line).
        mode: the :class:`~seerattn.hf.SeerConfig` mode it runs in (``dense``, ``sparse``, ``oracle``,
            ``custom``).
        budget: what the per-setting number means: ``"density"`` (kept fraction of the causal block
            triangle), ``"threshold"`` / ``"top_p"`` (gate-probability policies, or for a custom
            method its own cumulative-mass threshold; density is realised, not set) or ``"none"`` (dense).
        mask_fn: for ``custom`` mode, ``(request, policy, seed) -> BlockMask``; ``policy`` is the
            setting's :class:`~seerattn.SparsityPolicy`: kind ``"density"`` (the budget and allocation)
            or, for a native-mode method, ``"top_p"`` (its value the method's own threshold).
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
        if self.mode == "custom" and self.budget not in ("density", "top_p"):
            raise ValueError(f"method {self.name!r}: custom methods take a 'density' or 'top_p' budget")


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
    """One method at one budget value (``None`` for dense) and, for density budgets, one allocation
    (:class:`~seerattn.SparsityPolicy` ``allocation``: one of :data:`~seerattn.block_mask.ALLOCATIONS`)."""

    method: str
    budget: float | None = None
    allocation: str = "row"

    def __post_init__(self) -> None:
        m = get_method(self.method)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.allocation != "row" and m.budget != "density":
            raise ValueError(f"method {self.method!r} has a {m.budget} budget; only density budgets take an allocation")

    @property
    def label(self) -> str:
        if self.budget is None:
            return self.method
        alloc = "" if self.allocation == "row" else f"/{self.allocation}"
        return f"{self.method}@{self.budget:g}{alloc}"

    @property
    def policy(self) -> SparsityPolicy:
        """The policy every masked method of this setting uses: a fresh one (sink and diagonal
        forced, no overrides) of the method's budget kind, so that an adapter's own policy does not
        give the gate a different budget from the baselines."""
        m = get_method(self.method)
        if self.budget is None:
            raise ValueError(f"method {m.name!r} needs a {m.budget} value")
        return SparsityPolicy(kind=m.budget, value=self.budget, allocation=self.allocation)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        m = get_method(self.method)
        return {
            "method": self.method,
            "budget_kind": m.budget,
            "budget": self.budget,
            "allocation": self.allocation,
            "label": self.label,
        }


def expand_settings(
    methods: Iterable[str],
    densities: Sequence[float] = (),
    thresholds: Sequence[float] = (),
    top_ps: Sequence[float] = (),
    allocations: Sequence[str] = ("row",),
) -> list[Setting]:
    """Every requested method at each value of its budget kind (dense once), in the given order;
    density methods at each of ``allocations`` (value-major: all allocations of one density together)."""
    if not allocations:
        raise ValueError("allocations must name at least one of " + str(ALLOCATIONS))
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
            for alloc in allocations if m.budget == "density" else ("row",):
                setting = Setting(name, float(v), alloc)
                setting.policy  # noqa: B018 -- validates the range with a clear message
                out.append(setting)
    return out


def configure(state: SeerState, setting: Setting, seed: int = 0) -> None:
    """Point a prepared model's :class:`~seerattn.hf.SeerState` at ``setting``."""
    m = get_method(setting.method)
    if m.mode == "dense":
        state.set(mode="dense")
        state.mask_fn = None
        return
    policy = setting.policy
    state.set(mode=m.mode, policy=policy)
    state.mask_fn = functools.partial(_call_builder, m.mask_fn, policy, seed) if m.mode == "custom" else None


def _call_builder(fn: MaskBuilder, policy: SparsityPolicy, seed: int, request: MaskRequest) -> BlockMask:
    return fn(request, policy, seed)


def build_mask(name: str, request: MaskRequest, budget: float, seed: int = 0, allocation: str = "row") -> BlockMask:
    """The mask a ``custom`` method builds for ``request`` at ``budget`` (its density, or its threshold
    for a native-mode method), for tests and the mask plots."""
    m = get_method(name)
    if m.mask_fn is None:
        raise ValueError(f"method {name!r} runs in mode {m.mode!r} and has no mask function")
    return m.mask_fn(request, Setting(name, budget, allocation).policy, seed)


def _density_mask(scores: torch.Tensor, request: MaskRequest, policy: SparsityPolicy) -> BlockMask:
    """scores [B, Hq, NB, NB] (higher = keep first) -> the setting's density policy's mask."""
    if policy.kind != "density":
        raise ValueError(f"custom mask functions take a 'density' policy, got {policy.kind!r}")
    return mask_from_scores(scores, policy, request.seq_len, request.block_size)


def _shape(request: MaskRequest) -> tuple[int, int, int]:
    b, hq = request.q.shape[:2]
    return b, hq, num_blocks(request.seq_len, request.block_size)


# ------------------------------------------------------------------------------------ baselines
def streaming_mask(request: MaskRequest, policy: SparsityPolicy, seed: int = 0) -> BlockMask:
    """StreamingLLM at block level: the sink block plus the nearest blocks before the diagonal.

    Each row keeps its budget of blocks: block 0 (forced) and then the most recent ones (with the
    ``"row"`` allocation the local window of row ``I`` is ``round((I + 1) * density) - 1`` blocks,
    diagonal included; with ``"uniform"`` or ``"head"`` it is one width for all rows).
    """
    b, hq, nb = _shape(request)
    idx = torch.arange(nb, device=request.q.device, dtype=torch.float32)
    scores = -(idx.view(nb, 1) - idx.view(1, nb))  # closer to the diagonal ranks higher
    return _density_mask(scores.expand(b, hq, nb, nb), request, policy)


def random_mask(request: MaskRequest, policy: SparsityPolicy, seed: int = 0) -> BlockMask:
    """Random blocks at the budget (sink and diagonal forced); deterministic in (seed, layer)."""
    b, hq, nb = _shape(request)
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + request.layer_idx)
    scores = torch.rand(b, hq, nb, nb, generator=gen).to(request.q.device)
    return _density_mask(scores, request, policy)


def vertical_slash_mask(request: MaskRequest, policy: SparsityPolicy, seed: int = 0) -> BlockMask:
    """Vertical-slash (MInference) at the density budget; see :func:`vertical_slash_scores`."""
    return _density_mask(vertical_slash_scores(request), request, policy)


def attention_mass_scores(request: MaskRequest, chunk: int = 1024) -> torch.Tensor:
    """The true block attention mass, from the exact causal softmax (eager, O(T^2) work).

    Block ``(I, J)`` scores ``sum_{i in I, j in J} softmax_j(q_i . k_j * scale) / |I|``: the share
    of query block ``I``'s attention that falls in key block ``J`` (each row sums to 1). This is the
    quantity whose kept share a block mask's output error depends on, where the ``oracle`` method
    ranks by the max-pooled map the gates are distilled on (one strong token makes a block rank high
    there). Queries go in chunks of ``chunk`` tokens, so memory is ``chunk * T`` per head.

    Returns:
        scores [B, Hq, NB, NB] fp32, zero above the diagonal.
    """
    q, k = request.q, request.k
    b, hq, t, d = q.shape
    g = hq // k.shape[1]
    bs = request.block_size
    nb = num_blocks(t, bs)
    if chunk % bs:
        raise ValueError(f"chunk must be a multiple of block_size={bs}, got {chunk}")
    kf = k.float().repeat_interleave(g, dim=1)  # [B, Hq, T, D]
    cols = torch.arange(t, device=q.device)
    out = torch.zeros(b, hq, nb, nb, device=q.device, dtype=torch.float32)
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        logits = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * request.scale  # [B, Hq, C, T]
        future = cols.view(1, -1) > torch.arange(start, stop, device=q.device).view(-1, 1)
        probs = logits.masked_fill(future, float("-inf")).softmax(-1)
        per_key_block = F.pad(probs, (0, nb * bs - t)).view(b, hq, stop - start, nb, bs).sum(-1)  # [B, Hq, C, NB]
        rows = F.pad(per_key_block, (0, 0, 0, -(stop - start) % bs)).view(b, hq, -1, bs, nb).sum(-2)
        out[:, :, start // bs : start // bs + rows.shape[2]] = rows
    # every query's softmax sums to 1, so row I sums to |I| (fewer for a partial last block)
    return out / out.sum(-1, keepdim=True)


def xattention_mask(request: MaskRequest, policy: SparsityPolicy, seed: int = 0) -> BlockMask:
    """XAttention (stride ``S = 8``; :func:`~seerattn.eval.peers.xattention_scores`) at the density
    budget, or natively (``"top_p"`` policy): per row the fewest blocks whose antidiagonal score reaches
    the threshold (the paper's 0.9) of the row's total, sink and diagonal kept on top."""
    if policy.kind not in ("density", "top_p"):
        raise ValueError(f"xattention takes a 'density' or 'top_p' policy, got {policy.kind!r}")
    return mask_from_scores(xattention_scores(request, XATTN_STRIDE), policy, request.seq_len, request.block_size)


def flexprefill_mask(request: MaskRequest, policy: SparsityPolicy, seed: int = 0) -> BlockMask:
    """FlexPrefill (tau = 0.1; :func:`~seerattn.eval.peers.flexprefill_estimate`): each head's pattern
    (query-aware or vertical-slash) scores its blocks, ranked at the density budget; natively (``"top_p"``
    policy, value gamma) :func:`~seerattn.eval.peers.flexprefill_native_mask` with the minimum budget of
    1024 tokens."""
    est = flexprefill_estimate(request, FLEX_TAU)
    if policy.kind == "density":
        return _density_mask(est.scores, request, policy)
    if policy.kind == "top_p":
        return flexprefill_native_mask(est, request, policy.value, FLEX_MIN_BUDGET)
    raise ValueError(f"flexprefill takes a 'density' or 'top_p' policy, got {policy.kind!r}")


def mass_oracle_mask(request: MaskRequest, policy: SparsityPolicy, seed: int = 0) -> BlockMask:
    """The blocks holding the most true attention mass at the budget; see :func:`attention_mass_scores`."""
    return _density_mask(attention_mass_scores(request), request, policy)


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
    Method(
        "mass_oracle",
        "custom",
        "density",
        mass_oracle_mask,
        description="true top-k blocks of the attention mass (sum-pooled softmax; eager, O(T^2))",
    )
)
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
register_method(
    Method(
        "xattention",
        "custom",
        "density",
        xattention_mask,
        description="XAttention: strided antidiagonal block scores (stride 8), top blocks at the density",
    )
)
register_method(
    Method(
        "xattention_top_p",
        "custom",
        "top_p",
        xattention_mask,
        description="XAttention native: per row the fewest blocks holding the threshold (paper: 0.9) of the score",
    )
)
register_method(
    Method(
        "flexprefill",
        "custom",
        "density",
        flexprefill_mask,
        description="FlexPrefill: per-head query-aware or vertical-slash block scores (tau 0.1), top blocks",
    )
)
register_method(
    Method(
        "flexprefill_top_p",
        "custom",
        "top_p",
        flexprefill_mask,
        description="FlexPrefill native: cumulative attention gamma (paper: 0.9-0.95), min budget 1024 tokens",
    )
)
register_method(Method("random", "custom", "density", random_mask, description="random blocks (seeded)"))


def realised_row_counts(mask: BlockMask) -> torch.Tensor:
    """int64 [B, H, NQ]: kept causal blocks per row (for checks against the budget)."""
    dense = mask.to_dense()
    nq = dense.shape[-1]
    return (dense & causal_block_mask(nq, device=dense.device)).sum(-1)
