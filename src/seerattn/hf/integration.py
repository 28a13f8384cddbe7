"""Attach AttnGates to a Hugging Face causal LM and route its attention through seerattn.

How it works (no copied modeling files, nothing in ``transformers.models.*`` is patched):

1. one :class:`~seerattn.gate.AttnGate` is attached to every attention module as the submodule
   ``seer_gate`` (so ``model.to(...)``, ``state_dict`` and optimisers see it);
2. forward hooks on the layer's Q/K producers (``q_proj``/``k_proj``, or ``q_norm``/``k_norm``
   for families with q/k-norm) capture the *pre-RoPE* queries and keys exactly;
3. an attention function named ``"seer"`` is registered with transformers' ``AttentionInterface``
   (and ``sdpa``'s mask builder under the same name) and selected with
   ``model.set_attn_implementation("seer")``; it reads the per-model :class:`SeerState`;
4. with a decode section (:class:`DecodeConfig`), a :class:`~seerattn.gate.DecodeGate` per layer
   (submodule ``seer_decode_gate``) and a forward pre-hook on the attention module that hands the
   layer's KV cache object to the state: a generate step with one new token per sequence then runs
   sparse decode (the decode gate's keys kept in a :class:`~seerattn.gate.GateKeyCache` per layer
   beside transformers' cache, the block selection (:func:`~seerattn.decode_policy.select_decode_blocks`
   or its fused kernel, by :func:`~seerattn.decode_policy.resolve_decode_select`), and
   :func:`~seerattn.ops.sparse_decode_attention` over the cache's K/V tensors). ``docs/design.md``,
   "Sparse decode", describes the wiring.

Shape legend: B batch, Hq/Hkv heads, T tokens, D head dim, NB blocks, K selected blocks per KV head.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
from torch.profiler import record_function
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ..block_mask import BlockMask, SparsityPolicy, mask_from_scores, num_blocks
from ..decode_baselines import quest_block_bounds
from ..decode_policy import (
    DecodePolicy,
    bound_block_picks,
    resolve_decode_select,
    select_decode_blocks,
    select_decode_blocks_fused,
)
from ..gate import (
    AttnGate,
    BlockBounds,
    DecodeGate,
    DecodeGateConfig,
    GateConfig,
    GateKeyCache,
    gate_loss,
    gate_metrics,
)
from ..gate.decode_gate import RotaryTable, length_free_rotary
from ..ops import attention_with_block_scores, block_sparse_attention, sparse_decode_attention
from .graphs import DecodeGraphs

__all__ = [
    "FAMILIES",
    "DecodeConfig",
    "DecodeRequest",
    "DecodeSelection",
    "MaskRequest",
    "SeerConfig",
    "SeerState",
    "apply_seer_attention",
    "checkpoint_context_fn",
    "decode_gate_modules",
    "gate_logits",
    "get_seer_state",
    "group_scores",
    "remove_seer_attention",
]

logger = logging.getLogger(__name__)

ATTN_NAME = "seer"
MODES = ("dense", "sparse", "distill", "finetune", "oracle", "custom", "decode_eval")
Mode = Literal["dense", "sparse", "distill", "finetune", "oracle", "custom", "decode_eval"]
# modes whose forward runs the prefill gate (AttnGate) or builds a block mask of its block size
_PREFILL_GATE_MODES = ("sparse", "distill", "finetune", "oracle", "custom")

# model_type -> names of the submodules whose outputs are the pre-RoPE q and k of a layer.
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("q_proj", "k_proj"),
    "mistral": ("q_proj", "k_proj"),
    "qwen2": ("q_proj", "k_proj"),
    "qwen3": ("q_norm", "k_norm"),
}


DEFAULT_BOUND_SLOTS = 2  # DecodeConfig's default DecodePolicy.bound_slots (see the field's comment)


@dataclass(frozen=True)
class DecodeConfig:
    """The decode section of a :class:`SeerConfig`: decode gates and how a decode step selects blocks.

    Args:
        gate: the decode gate architecture (a :class:`~seerattn.gate.DecodeGate` per layer).
        policy: gate logits -> kept key blocks per (sequence, KV head) (:class:`~seerattn.decode_policy.DecodePolicy`);
            default a 4096-token budget with ``bound_slots=2`` (an adapter's policy as written, fields it lacks at
            ``DecodePolicy``'s defaults: older adapters keep ``bound_slots=0``).
        enabled: run sparse decode in generate steps; False keeps the gates attached and decodes densely
            (``state.set_decode(enabled=False)`` switches decode sparsity off, ``mode="dense"`` prefill sparsity).
    """

    gate: DecodeGateConfig = field(default_factory=DecodeGateConfig)
    # A 4096-token budget with two of its slots to the blocks of highest Quest bound: on the testbed (8k, budget
    # 1/8, four 240-prompt passkey grids) 0.983-1.004 of dense against 0.971-0.987 without, PPL level, +9-27 % on
    # a replayed decode-attention step (docs/experiments/decode/session15). DecodePolicy() alone keeps 0 bound slots.
    policy: DecodePolicy = field(default_factory=lambda: DecodePolicy(bound_slots=DEFAULT_BOUND_SLOTS))
    enabled: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.gate, DecodeGateConfig) or not isinstance(self.policy, DecodePolicy):
            raise TypeError("DecodeConfig.gate must be a DecodeGateConfig and DecodeConfig.policy a DecodePolicy")
        if not isinstance(self.enabled, bool):
            raise TypeError(f"DecodeConfig.enabled must be True or False, got {self.enabled!r}")
        if self.policy.kind == "budget":  # the only kind whose slot count is known before a cache exists
            self.policy.num_slots(self.gate.block_size, 1)

    def to_dict(self) -> dict:
        """The adapter's ``decode`` section (JSON types)."""
        return {"gate": self.gate.to_dict(), "policy": asdict(self.policy), "enabled": self.enabled}

    @classmethod
    def from_dict(cls, d: dict) -> DecodeConfig:
        accepted = {"gate", "policy", "enabled"}
        if not isinstance(d, dict) or not {"gate", "policy"} <= set(d) or set(d) - accepted:
            raise ValueError(
                f"a decode section must be an object with fields 'gate', 'policy' and optionally 'enabled'; got {d!r}"
            )
        policy = d["policy"]
        unknown = set(policy) - set(DecodePolicy.__dataclass_fields__) if isinstance(policy, dict) else {"<not a dict>"}
        if unknown:
            raise ValueError(
                f"unknown DecodePolicy fields {sorted(unknown)}; accepted: {sorted(DecodePolicy.__dataclass_fields__)}"
            )
        return cls(DecodeGateConfig.from_dict(d["gate"]), DecodePolicy(**policy), d.get("enabled", True))


@dataclass
class SeerConfig:
    """What :func:`apply_seer_attention` attaches and how the attention runs.

    Args:
        gate: the prefill gate architecture; None attaches no prefill gate (a decode-only setup: then
            ``mode`` must be ``"dense"`` or ``"decode_eval"``).
        policy: gate probabilities -> block mask (``sparse`` and ``oracle`` modes).
        mode: how a forward over a whole prompt (a prefill: as many keys as queries) runs.
            ``"dense"`` (original attention, prefill gate unused), ``"sparse"`` (gate -> mask ->
            block-sparse attention), ``"distill"`` (dense attention through the ground-truth kernel;
            gate loss and metrics recorded per layer), ``"finetune"`` (as ``sparse``, with gradients:
            the attention output is differentiable in q/k/v through the block-sparse op while the mask
            comes from the gate under ``no_grad``; the gate reads detached q/k and its loss against the
            ground truth is recorded per layer as in ``distill``), ``"oracle"`` (mask from the true ground truth:
            the upper bound), ``"custom"`` (mask from ``SeerState.mask_fn``: baselines), ``"decode_eval"``
            (teacher-forced decode: rows before ``decode_start`` dense, each row from ``decode_start`` on
            attends to the blocks a decode step would select for it; needs ``decode``). Decode steps are
            governed by ``decode``, not by ``mode``.
        decode: the decode section (:class:`DecodeConfig`); None attaches no decode gate and decode
            steps run dense (transformers' SDPA).
        decode_start: ``decode_eval`` mode: the first row (token position) that attends like decode.
        impl: op implementation: ``None`` (automatic: reference on CPU; on CUDA Triton, except the block-sparse
            attention, which follows :func:`seerattn.ops.auto_impl`'s measured rule, e.g. FlashAttention-4 at
            128-token blocks where it is installed), ``"reference"``, ``"triton"``, or ``"flex"`` / ``"fa4"``
            (block-sparse attention only: ``distill`` / ``oracle`` modes and sparse decode raise with them).
        gate_impl: how ``sparse`` and ``oracle`` modes compute the gate and the policy: ``"triton"``
            (fused gate kernels and the selection kernel), ``"eager"`` (the PyTorch gate and policies:
            the reference, and the "before" of benchmarks/prefill.py) or None (Triton on CUDA, eager
            on the CPU). Training modes (``distill``,
            ``finetune``) always run the eager gate, which has a backward and gives the recompute of a
            checkpointed layer the same mask.
        decode_select: how sparse decode steps and ``decode_eval`` rows compute the gate logits and the block
            selection: ``"fused"`` (one Triton kernel for the logits and the top-K; ``"budget"`` policies only),
            ``"unfused"`` (:meth:`DecodeGate.scores` and :func:`~seerattn.decode_policy.select_decode_blocks`)
            or None: :func:`~seerattn.decode_policy.resolve_decode_select`'s rule (fused for a budget policy on
            CUDA, where it was measured faster; unfused otherwise). A runtime choice, not saved in adapters.
        mask_heads: ``"q"`` one decision per query head; ``"kv"`` one per GQA group (gate
            probabilities averaged over the group), which lets the kernel load K/V once per group.
        skip_first_rows: fraction of leading query-block rows left out of the distillation loss.
        metric_density: density at which ``distill`` mode reports block and mass recall.
        base_model: id or path of the base model (recorded in saved adapters).
    """

    gate: GateConfig | None = field(default_factory=GateConfig)
    policy: SparsityPolicy = field(default_factory=SparsityPolicy)
    mode: Mode = "sparse"
    decode: DecodeConfig | None = None
    decode_start: int | None = None
    impl: str | None = None
    gate_impl: Literal["eager", "triton"] | None = None
    decode_select: Literal["fused", "unfused"] | None = None
    mask_heads: Literal["q", "kv"] = "q"
    skip_first_rows: float = 0.25
    metric_density: float = 0.1
    base_model: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SeerConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.gate_impl not in (None, "eager", "triton"):
            raise ValueError(f"SeerConfig.gate_impl must be 'eager', 'triton' or None, got {self.gate_impl!r}")
        if self.mask_heads not in ("q", "kv"):
            raise ValueError(f"SeerConfig.mask_heads must be 'q' or 'kv', got {self.mask_heads!r}")
        if not 0.0 <= self.skip_first_rows < 1.0:
            raise ValueError(f"SeerConfig.skip_first_rows must be in [0, 1), got {self.skip_first_rows}")
        if not 0.0 < self.metric_density <= 1.0:
            raise ValueError(f"SeerConfig.metric_density must be in (0, 1], got {self.metric_density}")
        if not isinstance(self.gate, (GateConfig, type(None))) or not isinstance(self.policy, SparsityPolicy):
            raise TypeError("SeerConfig.gate must be a GateConfig (or None) and SeerConfig.policy a SparsityPolicy")
        if not isinstance(self.decode, (DecodeConfig, type(None))):
            raise TypeError(f"SeerConfig.decode must be a DecodeConfig or None, got {type(self.decode).__name__}")
        if self.gate is None and self.decode is None:
            raise ValueError("SeerConfig needs a prefill gate (gate), a decode section (decode) or both; got neither")
        if self.gate is None and self.mode in _PREFILL_GATE_MODES:
            raise ValueError(
                f"SeerConfig.mode={self.mode!r} needs the prefill gate (gate=GateConfig(...)); without one the "
                "accepted modes are 'dense' and 'decode_eval'"
            )
        if self.decode is not None:  # the rule's checks (values, fused with a budget policy), device aside
            resolve_decode_select(self.decode_select, self.decode.policy, "cpu")
        elif self.decode_select is not None:
            raise ValueError(f"SeerConfig.decode_select={self.decode_select!r} needs a decode section (decode)")
        start = self.decode_start
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            raise ValueError(f"SeerConfig.decode_start must be an int >= 0 or None, got {start!r}")
        if self.mode == "decode_eval" and (self.decode is None or start is None):
            raise ValueError(
                "SeerConfig.mode='decode_eval' needs decode=DecodeConfig(...) (the decode gates and policy) and "
                "decode_start (the first row that attends like decode)"
            )


@dataclass
class MaskRequest:
    """What a ``custom``-mode mask function sees for one layer's prefill.

    q: [B, Hq, T, D] and k: [B, Hkv, T, D] post-RoPE (what attention uses); ``scale`` the softmax
    scale; the returned :class:`BlockMask` must have batch B and cover ``seq_len`` tokens in blocks of
    ``block_size``. A padded or packed batch asks once per sequence length: B is the number of its sequences
    of that length, T = ``seq_len`` their length (padding removed).
    """

    layer_idx: int
    q: torch.Tensor
    k: torch.Tensor
    scale: float
    block_size: int
    seq_len: int


@dataclass
class DecodeRequest:
    """What ``SeerState.decode_select_fn`` sees for one layer: N query rows per sequence to select key blocks for.

    A generate decode step has N = 1 (the new token); ``decode_eval`` mode passes a chunk of a window's rows.

    Attributes:
        layer_idx: the layer.
        q: [B, Hq, N, D] post-RoPE queries (what attention uses).
        k: [B, Hkv, Tcap, D] post-RoPE keys: the KV cache tensor (StaticCache: its capacity; DynamicCache
            and ``decode_eval``: the tokens so far). Keys at or past a row's ``cache_seqlens`` are not its own.
        cache_seqlens: int32 [B, N], keys visible to each row (its position + 1; the row's own key included).
        scale: the softmax scale.
        block_size: tokens per key block (the decode gate's).
        num_slots: K of the configured decode policy for this cache (a selection may use another K).

    The function returns int32 [B, Hkv, N, K] block indices per (sequence, KV head, row), -1 padded,
    without repeats; the first and the row's current block must be in it for the decode semantics
    (the kernel attends to exactly the listed blocks, up to ``cache_seqlens``).
    """

    layer_idx: int
    q: torch.Tensor
    k: torch.Tensor
    cache_seqlens: torch.Tensor
    scale: float
    block_size: int
    num_slots: int


@dataclass
class DecodeSelection:
    """What ``SeerState.decode_observer`` receives from one layer's sparse decode step: the blocks it attends to.

    Attributes:
        layer_idx: the layer.
        blocks: int32 [B, Hkv, K] key-block indices per (sequence, KV head), -1 padded (the gate and policy's
            or ``decode_select_fn``'s selection, exactly what the kernel reads: by priority from the unfused
            selection, ascending from the fused one, ``SeerConfig.decode_select``). A device tensor, fresh each
            step.
        cache_seqlens: int32 [B] keys visible to the step (the new token's position + 1), a device tensor.
        block_size: tokens per key block.
        cache_starts: int32 [B] where each sequence's first token sits in its KV cache row (a left-padded batch),
            a device tensor; None for an unpadded batch (every sequence starts at token 0). Blocks and
            ``cache_seqlens`` count from each sequence's first token: block J of sequence b covers cache tokens
            ``cache_starts[b] + [J * block_size, (J + 1) * block_size)``.
    """

    layer_idx: int
    blocks: torch.Tensor
    cache_seqlens: torch.Tensor
    block_size: int
    cache_starts: torch.Tensor | None = None


@dataclass
class SeerState:
    """Per-model side channel between the attention function and the caller.

    Attributes:
        config: the active :class:`SeerConfig` (change ``mode``/``policy`` with :meth:`set`).
        stats: per layer, after each forward: ``path`` and, for masked paths when
            ``record_densities`` is on, ``density`` (kept fraction of the causal block triangle) and
            ``token_density``. The forward records the densities as device tensors (no host sync per
            layer); reading ``stats`` turns them into floats.
        record_densities: compute the masked paths' densities in every forward (on by default: the
            evaluations report them). Off, a sparse forward spends nothing on statistics (the
            densities scan every mask: a few percent of a prefill at 128k). A sparse decode step keeps only
            the density's inputs (its selection and lengths) and computes it when ``stats`` is read.
        losses: per layer, in ``distill`` and ``finetune`` modes: the gate loss (a tensor with grad; detached
            when ``gate_grad_scale`` is set).
        gate_grad_scale: None (default): the losses keep their graphs and the caller backpropagates them. A
            float (set by the trainer: gate loss weight / accumulation steps): each layer backpropagates
            ``gate_grad_scale * loss`` into its gate's ``.grad`` right where the loss is computed (the gate
            reads detached inputs, so nothing else is reached) and records the detached loss: no gate graph
            (window scores, logits, target: [B, Hq, NB, NB] and more per layer) outlives its layer. This
            happens whatever the caller's grad mode, so the trainer may run a gate-only forward under
            ``no_grad``.
        metrics: per layer, in ``distill`` and ``finetune`` modes: block and mass recall at ``metric_density``.
        mask_fn: the mask source of ``custom`` mode.
        decode_select_fn: when set, decode steps and ``decode_eval`` rows take their key blocks from it
            (a :class:`DecodeRequest` -> int32 [B, Hkv, N, K] function: baselines such as Quest or
            StreamingLLM through the same kernel) instead of the decode gate and policy. Generate steps of a
            left-padded batch refuse it (the request hands the raw cache rows, where a sequence may not start at 0).
        decode_observer: when set, called with a :class:`DecodeSelection` by every sparse decode step of every
            layer (generate steps of one token; not ``decode_eval`` rows) once its blocks are selected: to
            record selections (e.g. whether a far block was kept). It runs inside the step: anything it reads
            to the host syncs there. None (default): the step does nothing more.
        capture: when True, ``captures[layer]`` keeps (q_pre, k_pre, q, k) of the last forward
            (for tests and debugging).
        cuda_graphs: replay ``generate``'s decode steps from a CUDA graph (:mod:`seerattn.hf.graphs`), sparse or
            dense decode, for a model with a decode section: each batch shape's first step eager, the second
            captured, the rest replayed. None (default): every step that can be captured is (on CUDA, with a
            ``StaticCache``: ``generate(..., cache_implementation="static")``; not with a ``DynamicCache``, a
            dynamic-NTK or LongRoPE model, or ``decode_observer`` / ``decode_select_fn`` / ``capture`` set),
            the others run eagerly. True: a step that cannot be captured raises (it says why). False: never.
            Prompts run as always.
    """

    config: SeerConfig
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    metrics: dict[int, dict] = field(default_factory=dict)
    mask_fn: Callable[[MaskRequest], BlockMask] | None = None
    decode_select_fn: Callable[[DecodeRequest], torch.Tensor] | None = None
    decode_observer: Callable[[DecodeSelection], None] | None = None
    capture: bool = False
    captures: dict[int, tuple] = field(default_factory=dict)
    record_densities: bool = True
    gate_grad_scale: float | None = None
    cuda_graphs: bool | None = None
    # private: pre-RoPE tensors handed from the hooks to the attention function
    _pending: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _rotary: torch.nn.Module | None = field(default=None, repr=False)
    _hooks: list = field(default_factory=list, repr=False)
    _original_impl: str | None = field(default=None, repr=False)
    # (generation_config.disable_compile,) before apply_seer_attention set it (a decode section; restored by remove)
    _original_disable_compile: tuple | None = field(default=None, repr=False)
    # (the model's own instance attribute ``forward`` or None,) before apply_seer_attention installed DecodeGraphs
    # (a decode section; restored by remove)
    _original_forward: tuple | None = field(default=None, repr=False)
    _attn_modules: list = field(default_factory=list, repr=False)
    _stats: dict[int, dict] = field(default_factory=dict, repr=False)
    # ("record", list) or ("replay", iterator over it): the masks of one checkpointed call while it runs, see
    # checkpoint_context_fn
    _masks: tuple[str, list | Iterator] | None = field(default=None, repr=False)
    # per layer: the decode-gate key cache kept beside one transformers cache object (see _DecodeCache)
    _decode: dict[int, _DecodeCache] = field(default_factory=dict, repr=False)
    # (weak reference to the attention mask or cu_seq_lens_q tensor of the forward, (B, T, its version), its _Layout
    # or None): every layer of a forward gets the same tensor, so its padding / packing is read and checked once
    _layout: tuple[weakref.ref, tuple[int, int, int | None], _Layout | None] | None = field(default=None, repr=False)
    # the last chunk mask of a chunked prefill found free of padding (_check_chunk_unpadded): one read per forward
    _chunk_mask: tuple[weakref.ref, int] | None = field(default=None, repr=False)
    # (weak reference to the forward's position_ids, (window, T, dtype, device, its version, rotary), (cos, sin)): the
    # prefill gate's RoPE table at window starts, the same in every layer of a forward, computed once (it was ~8
    # small launches a layer)
    _window_table: tuple[weakref.ref, tuple, tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def stats(self) -> dict[int, dict]:
        """Per-layer statistics of the last forward (see the class docstring), as Python numbers."""
        for entry in self._stats.values():
            for key, value in entry.items():
                if isinstance(value, functools.partial):  # recorded as its inputs, computed when first read
                    value = value()
                if isinstance(value, torch.Tensor):
                    entry[key] = value.item()
        return self._stats

    def set(self, **changes) -> None:
        """Replace config fields (e.g. ``state.set(mode="dense")`` or ``policy=...``), validated.

        The gates are attached once: ``gate`` and the decode section's ``gate`` (and whether there is a
        decode section) cannot change here; ``decode`` may change its policy and ``enabled``
        (:meth:`set_decode`)."""
        config = replace(self.config, **changes)
        config.policy.check_num_layers(len(self._attn_modules))
        if config.gate != self.config.gate:
            raise ValueError(
                f"SeerState.set cannot change the attached prefill gates ({self.config.gate} -> {config.gate}); "
                "remove_seer_attention and apply_seer_attention with the new config"
            )
        old, new = self.config.decode, config.decode
        if (old is None) != (new is None) or (old is not None and old.gate != new.gate):
            raise ValueError(
                "SeerState.set cannot attach, remove or change the decode gates (decode section "
                f"{None if old is None else old.gate} -> {None if new is None else new.gate}); switch decode "
                "sparsity with set_decode(enabled=...), or re-apply seer attention"
            )
        self.config = config

    def set_decode(self, **changes) -> None:
        """Replace fields of the decode section (``enabled=False`` switches decode sparsity off,
        ``policy=DecodePolicy(...)``), validated."""
        if self.config.decode is None:
            raise ValueError("this model has no decode section (SeerConfig.decode is None): no decode gates attached")
        self.set(decode=replace(self.config.decode, **changes))

    def reset(self) -> None:
        """Forget the statistics, losses and metrics of earlier forwards, and the decode-gate key caches."""
        self._stats.clear()
        self.losses.clear()
        self.metrics.clear()
        self.captures.clear()
        self._pending.clear()
        self._decode.clear()
        self._layout = None
        self._chunk_mask = None
        self._window_table = None

    def total_gate_loss(self) -> torch.Tensor:
        """Sum over layers of the distillation losses of the last forward."""
        if not self.losses:
            raise RuntimeError("no gate loss recorded: run a forward in mode='distill' or 'finetune' first")
        return torch.stack(list(self.losses.values())).sum()

    def mean_density(self) -> float:
        """Mean over layers of the realised block density of the last forward (1.0 for dense paths; for
        ``sparse-decode`` and ``decode_eval``: the kept fraction of the keys the decode rows could see)."""
        if not self.stats:
            raise RuntimeError("no statistics recorded: run a forward first")
        masked = ("sparse", "finetune", "oracle", "custom", "sparse-decode", "decode_eval")
        if any(s["path"] in masked and "density" not in s for s in self.stats.values()):
            raise RuntimeError("densities were not recorded (SeerState.record_densities is off)")
        return sum(s.get("density", 1.0) for s in self.stats.values()) / len(self.stats)

    @property
    def decoding(self) -> bool:
        """Whether decode steps run sparse (a decode section, enabled)."""
        return self.config.decode is not None and self.config.decode.enabled

    def needs_pre_rope(self, which: str, tokens: int) -> bool:
        """Whether a forward of ``tokens`` tokens per sequence hands its pre-RoPE ``which`` ("q" or "k") to the
        attention function. The prefill gate (sparse, distill, finetune) and ``decode_eval`` read both; sparse
        decode fills its gate keys from the pre-RoPE k of the prompt and of each step, and reads the pre-RoPE q
        of its one-token steps only: a capture keeps the tensor alive until the layer's attention returns
        ([B, T, Hq * D]: 4 GiB at batch 16 x 32k, Llama-3.1-8B shape), so a dense prefill takes no q."""
        if self.capture or self.config.mode in ("sparse", "distill", "finetune", "decode_eval"):
            return True
        return self.decoding and (which == "k" or tokens == 1)


@dataclass
class _DecodeCache:
    """One layer's decode-gate keys beside one transformers cache object.

    ``owner`` is a weak reference to that cache object (``DynamicCache``, ``StaticCache``): a forward
    with another cache object (a new ``generate()`` call) starts a fresh key cache. ``length`` counts
    the tokens of every KV cache row on the host (pad tokens of a left-padded prompt included: transformers
    appends each step's token at the same position in every row), so a decode step reads nothing from the
    device. ``starts``: int32 [B] (device) where each sequence's first real token sits in its row, for a
    left-padded prompt (each sequence's own length is ``keys.lengths``, ``length - starts``); None when the
    prompt was unpadded. ``rotary``: what the steps rotate the gate's vectors with, a :class:`RotaryTable` over a
    static cache's positions (shared by the layers) where the model's rotary allows it, else None (the model's).
    ``bounds``: the min / max of each block's keys (``DecodePolicy.bound_slots > 0``), else None.
    """

    owner: weakref.ref
    keys: GateKeyCache
    length: int
    capacity: int | None  # a static cache's size in tokens (the keys it hands over each step); None: it grows
    starts: torch.Tensor | None = None
    rotary: RotaryTable | None = None
    bounds: BlockBounds | None = None

    def check_handover(self, layer: int, tk: int, new: int) -> None:
        """The KV cache hands this forward of ``new`` tokens ``tk`` keys: a DynamicCache exactly the tokens so
        far, a StaticCache its capacity (with room for them). Anything else means the cache changed behind our
        back (cropped, or tokens added by a forward without the decode path)."""
        want = self.length + new if self.capacity is None else self.capacity
        if tk != want or self.length + new > tk:
            raise RuntimeError(
                f"layer {layer}: the KV cache hands over {tk} keys but the decode-gate key cache expects {want} "
                f"({self.length} tokens so far + {new} new); the cache was changed outside seer's decode path "
                "(cropped, extended, or full): start a new generate() or call state.reset()"
            )


def get_seer_state(model: torch.nn.Module) -> SeerState:
    """The :class:`SeerState` of a model prepared by :func:`apply_seer_attention`."""
    state = getattr(model, "_seer_state", None)
    if not isinstance(state, SeerState):
        raise ValueError("this model has no seer attention attached; call seerattn.hf.apply_seer_attention first")
    return state


# ---------------------------------------------------------------------------------------- helpers
def _decoder_layers(model: torch.nn.Module):
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} has no `.model.layers`; seerattn supports decoder-only causal LMs of the "
            f"families {sorted(FAMILIES)}"
        )
    return base, layers


def _family(model: torch.nn.Module) -> tuple[str, tuple[str, str]]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model family {model_type!r} is not supported; supported: {sorted(FAMILIES)}. Adding one is an entry "
            "in seerattn.hf.integration.FAMILIES naming the modules whose outputs are the pre-RoPE q and k"
        )
    return model_type, FAMILIES[model_type]


def _heads(module) -> tuple[int, int, int]:
    cfg = module.config
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    return hq, hkv, module.head_dim


def _tensor_version(x: torch.Tensor) -> int | None:
    """What, beside its identity, keys a value computed once per forward from a tensor the model hands every layer
    (the padding mask, position_ids): its version counter, so that an in-place change of a tensor a caller hands in
    again is read again. An inference tensor has none: there, identity alone (transformers builds new ones every
    forward)."""
    return None if x.is_inference() else x._version


def _window_rotary(state: SeerState, like: torch.Tensor, position_ids: torch.Tensor | None, step: int, t: int):
    """cos, sin [B, ceil(T / step), D] of the model's own RoPE at the first position of each ``step``-token window.

    transformers hands every layer of a forward the same ``position_ids`` tensor, so the table is computed for the
    first layer and reused by the others (keyed on that tensor, its version, the window, T, dtype, device and the
    rotary module); without ``position_ids`` it is computed each time."""
    if position_ids is None:
        positions = torch.arange(t, device=like.device).unsqueeze(0).expand(like.shape[0], t)
        return state._rotary(like, positions[:, ::step])
    key = (step, t, like.dtype, like.device, _tensor_version(position_ids), id(state._rotary))
    cached = state._window_table
    if cached is not None and cached[0]() is position_ids and cached[1] == key:
        return cached[2]
    table = state._rotary(like, position_ids[:, ::step])
    state._window_table = (weakref.ref(position_ids), key, table)
    return table


# ---------------------------------------------------------------------------------------- padded and packed prefill
# Elements of the largest bool temporary while a padding / packing mask is checked ([B, rows, T]): 2^26 = 64 MiB.
_LAYOUT_CHECK_ELEMENTS = 1 << 26
_LAYOUT_MODES = ("sparse", "oracle", "custom")  # the prefill modes that take padded and packed batches


@dataclass(frozen=True)
class _Group:
    """The sequences of one length of a :class:`_Layout`: their gate and policy run as one batch of G.

    length: L tokens; seqs: int64 [G] their numbers in the layout (device); tokens: int64 [G, L] the flat index
    ``b * T + t`` of each one's tokens in the forward's [B, T] (device)."""

    length: int
    seqs: torch.Tensor
    tokens: torch.Tensor


@dataclass(frozen=True)
class _Layout:
    """The real tokens of a padded or packed prefill of B x T tokens as N sequences, packed back to back (varlen).

    A sequence is the real span of a padded row or a document of a packed row, in row-major order. ``lengths``
    (host) and ``cu_seqlens`` (int32 [N + 1], device) delimit them; ``starts`` (host) is the flat index
    ``b * T + t`` of each one's first token; ``index`` (int64 [Ttot], device) is the flat index of the packed
    tokens; ``groups`` gather the sequences by length; ``identity``: B == 1 and the packed tokens are all T tokens
    in order (documents without padding: nothing to gather or scatter).
    """

    batch: int
    seq_len: int
    lengths: tuple[int, ...]
    starts: tuple[int, ...]
    index: torch.Tensor
    cu_seqlens: torch.Tensor
    groups: tuple[_Group, ...]
    identity: bool


def _prefill_layout(state: SeerState, mask_in, attention_mask, kwargs, b: int, t: int) -> _Layout | None:
    """The padding / packing of a prefill of B x T tokens, from what transformers hands the attention function.

    - ``attention_mask``: transformers 5 builds it with ``sdpa_mask`` (registered for "seer"): None for a
      plain causal batch (``is_causal`` skip), else bool [B, 1, T, T] = causal & the 2-D padding mask
      (pad queries of a left-padded row attend nothing, those of a right-padded row every earlier real
      key), or, for packed documents (position_ids restarting at 0, only when the forward has no cache:
      ``use_cache=False``, as in training), causal & same-document. Each row's real tokens must be one
      contiguous span; any other pattern is refused.
    - ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``):
      the documents of a packed row (B == 1); with a mask as well, both must agree.

    Returns None for a plain causal batch (B rows of T real tokens, one sequence each). Computed once per
    forward (cached on the state by the identity of ``mask_in``, the mask as the model handed it, or of
    ``cu_seq_lens_q``): a few host reads and one O(B T^2) pass over the mask per forward, none per layer.
    """
    cu = kwargs.get("cu_seq_lens_q")
    key = mask_in if mask_in is not None else cu
    if key is None:
        return None
    version = _tensor_version(key)
    cached = state._layout
    if cached is not None and cached[0]() is key and cached[1] == (b, t, version):
        return cached[2]
    spans = None if attention_mask is None else _mask_spans(attention_mask, b, t)
    if cu is not None:
        cu_spans = _cu_spans(cu, kwargs.get("cu_seq_lens_k"), b, t)
        if spans is not None and spans != cu_spans:
            raise ValueError(
                f"cu_seq_lens_q gives the documents {cu_spans} (start, length) but the attention mask {spans}; "
                "pass one packing (the collator's position_ids and cu_seq_lens come from the same documents)"
            )
        spans = cu_spans
    layout = _make_layout(spans, b, t, key.device)
    state._layout = (weakref.ref(key), (b, t, version), layout)
    return layout


def _attends(mask: torch.Tensor) -> torch.Tensor:
    """Where a transformers attention mask (bool, or additive float: 0 = attend) lets a query attend, as bool."""
    return mask if mask.dtype == torch.bool else mask == 0


def _mask_spans(attention_mask: torch.Tensor, b: int, t: int) -> list[tuple[int, int]]:
    """(flat start ``b * T + t``, length) of each sequence of a padding / packing mask [B, 1, T, T] (bool, or
    additive float with 0 = attend), in row-major order; raises for any other pattern (see :func:`_prefill_layout`).

    A token is real iff it attends to itself; a real token starts a sequence unless it attends to the token
    before it. The mask must then be exactly causal within each sequence for real queries, and for pad queries
    either nothing or causal over the real keys (transformers' right padding); checked on the device in
    chunks of query rows, read by the host at the end."""
    am = _attends(attention_mask)
    if am.dim() != 4 or am.shape[0] != b or am.shape[1] != 1 or tuple(am.shape[-2:]) != (t, t):
        raise ValueError(
            f"seer attention takes an attention mask of shape [B, 1, T, T] = [{b}, 1, {t}, {t}] (transformers' "
            f"causal mask with padding or packed documents), got {tuple(am.shape)}"
        )
    m = am[:, 0]
    real = m.diagonal(dim1=-2, dim2=-1)  # [B, T]
    link = torch.zeros_like(real)
    link[:, 1:] = m.diagonal(offset=-1, dim1=-2, dim2=-1) & real[:, :-1]
    start = real & ~link
    seg = torch.where(real, start.flatten().cumsum(0).view(b, t) - 1, -1)  # sequence number per token, -1 pad
    runs = (real & ~torch.nn.functional.pad(real, (1, 0))[:, :-1]).sum(-1)  # [B] spans of real tokens per row
    cols = torch.arange(t, device=m.device)
    bad = torch.zeros((), dtype=torch.bool, device=m.device)
    rows = max(1, _LAYOUT_CHECK_ELEMENTS // (b * t))
    for r0 in range(0, t, rows):
        r1 = min(t, r0 + rows)
        got = m[:, r0:r1]  # [B, R, T]
        causal = cols.view(1, 1, t) <= torch.arange(r0, r1, device=m.device).view(1, -1, 1)
        qseg = seg[:, r0:r1].unsqueeze(-1)
        real_ok = (got == (causal & (qseg == seg.unsqueeze(1)))).all(-1)
        pad_ok = ~got.any(-1) | (got == (causal & real.unsqueeze(1))).all(-1)
        bad |= ~torch.where(qseg.squeeze(-1) >= 0, real_ok, pad_ok).all()
    flat_starts = start.flatten().nonzero().squeeze(1)
    lengths = torch.bincount(seg[real], minlength=flat_starts.numel())
    # the host reads of the forward's layout (nonzero and the boolean index above read sizes too)
    head = torch.stack([bad.long(), runs.max()]).tolist()
    if head[1] > 1:
        row = int(runs.argmax())
        raise ValueError(
            f"seer attention takes padded batches whose real tokens are one contiguous span per row (padding on "
            f"the left or the right); row {row} of the attention mask has {head[1]} separate spans. (generate() "
            "without an attention_mask infers padding wherever the prompt contains pad_token_id; pass "
            "attention_mask=torch.ones_like(input_ids) for an unpadded prompt)"
        )
    if head[0]:
        raise ValueError(
            "seer sparse/oracle/custom attention takes a causal attention mask with padding (left or right) or "
            "with packed documents (causal within each); got another pattern (a sliding window, bidirectional "
            "or custom mask). Use mode='dense' for it"
        )
    return list(zip(flat_starts.tolist(), lengths.tolist(), strict=True))


def _cu_spans(cu_q: torch.Tensor, cu_k, b: int, t: int) -> list[tuple[int, int]]:
    """(start, length) of the packed documents of ``cu_seq_lens_q`` (int [N + 1], from 0 to T, non-decreasing;
    empty documents dropped); ``cu_seq_lens_k`` must be the same boundaries (a prefill attends to itself)."""
    if b != 1:
        raise ValueError(f"cu_seq_lens_q describes documents packed in one row (batch 1), got batch {b}")
    if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k.to(cu_q.device), cu_q):
        raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q in a prefill (each document attends to itself)")
    bounds = cu_q.tolist()
    if cu_q.dim() != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != t or bounds != sorted(bounds):
        raise ValueError(f"cu_seq_lens_q must be 1-D [N + 1] boundaries from 0 to T={t}, non-decreasing; got {bounds}")
    return [(s0, s1 - s0) for s0, s1 in itertools.pairwise(bounds) if s1 > s0]


def _make_layout(spans: list[tuple[int, int]], b: int, t: int, device) -> _Layout | None:
    """The :class:`_Layout` of ``spans`` (flat start, length); None when they are B whole rows (a plain batch)."""
    if len(spans) == b and all(n == t for _, n in spans):
        return None
    if not spans:
        raise ValueError("the attention mask leaves no real token in the batch (every row is padding)")
    lengths = tuple(n for _, n in spans)
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    groups = tuple(
        _Group(
            n,
            torch.tensor(seqs, device=device),
            torch.stack([torch.arange(spans[i][0], spans[i][0] + n) for i in seqs]).to(device),
        )
        for n, seqs in by_length.items()
    )
    index = torch.cat([torch.arange(s, s + n) for s, n in spans]).to(device)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    starts = tuple(s for s, _ in spans)
    return _Layout(b, t, lengths, starts, index, cu, groups, identity=b == 1 and sum(lengths) == t)


def _pack(layout: _Layout, x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [1, H, Ttot, D]: the layout's real tokens packed back to back."""
    if layout.identity:
        return x
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])[layout.index].transpose(0, 1).unsqueeze(0)


def _unpack(layout: _Layout, out: torch.Tensor) -> torch.Tensor:
    """[1, Hq, Ttot, D] -> [B, T, Hq, D] (transformers' output layout), zeros at pad positions."""
    tokens = out[0].transpose(0, 1)  # [Ttot, Hq, D]
    if layout.identity:
        return tokens.unsqueeze(0).contiguous()
    full = tokens.new_zeros(layout.batch * layout.seq_len, *tokens.shape[1:])
    return full.index_copy(0, layout.index, tokens).view(layout.batch, layout.seq_len, *tokens.shape[1:])


def _gather_group(group: _Group, x: torch.Tensor, heads: int) -> torch.Tensor:
    """x: [B, T, H, D] or [B, T, H * D] (a hook's pre-RoPE capture, or post-RoPE q/k/v transposed) -> the
    group's sequences [G, H, L, D]."""
    return x.reshape(x.shape[0] * x.shape[1], heads, -1)[group.tokens].transpose(1, 2)


def _combine_masks(layout: _Layout, masks: list[BlockMask]) -> BlockMask:
    """The per-group masks ([G, H, NB_L, NB_L]) of ``layout`` as one varlen mask [N, H, NB, NB] (NB of the
    longest sequence; each sequence in the top-left corner of its entry, rows past its blocks empty)."""
    if len(masks) == 1:  # one length: the group is every sequence, in order
        return masks[0]
    heads = {m.num_heads for m in masks}
    if len(heads) != 1:
        raise ValueError(f"the masks of one layer's sequences have different head counts {sorted(heads)}")
    h, bs, longest = heads.pop(), masks[0].block_size, max(layout.lengths)
    nb = num_blocks(longest, bs)
    device = masks[0].device
    counts = torch.zeros(len(layout.lengths), h, nb, dtype=torch.int32, device=device)
    indices = torch.zeros(len(layout.lengths), h, nb, nb, dtype=torch.int32, device=device)
    for group, m in zip(layout.groups, masks, strict=True):
        n = m.shape[2]
        counts[group.seqs, :, :n] = m.kv_num_blocks
        indices[group.seqs, :, :n, :n] = m.kv_indices
    sources = {m.source for m in masks}
    return BlockMask(counts, indices, bs, longest, source=sources.pop() if len(sources) == 1 else None)


def _layout_densities(layout: _Layout, mask: BlockMask) -> tuple[torch.Tensor, torch.Tensor]:
    """(density, token_density) of a varlen mask over its sequences' own causal triangles (device scalars)."""
    bs = mask.block_size
    blocks = tokens = block_total = token_total = 0.0
    for group in layout.groups:
        n, g = num_blocks(group.length, bs), group.seqs.numel()
        sub = BlockMask(
            mask.kv_num_blocks[group.seqs, :, :n], mask.kv_indices[group.seqs, :, :n, :n], bs, group.length,
            source=mask.source,  # a policy's: counted from the lists (BlockMask.densities)
        )  # fmt: skip
        d, td = sub.densities()
        wb, wt = g * n * (n + 1) / 2, g * group.length * (group.length + 1) / 2
        blocks, tokens = blocks + d * wb, tokens + td * wt
        block_total, token_total = block_total + wb, token_total + wt
    return blocks / block_total, tokens / token_total


def _gate_forward(
    gate: AttnGate, state: SeerState, q_pre, k_pre, position_ids, impl=None, causal_only: bool = False
) -> torch.Tensor:
    """Gate logits from pre-RoPE q [B, Hq, T, D], k [B, Hkv, T, D] (the gate's RoPE at window starts);
    ``causal_only``: the entries above the block diagonal may be left unspecified (see :meth:`AttnGate.forward`)."""
    t = q_pre.shape[2]
    cos = sin = None
    if gate.config.use_rope:
        cos, sin = _window_rotary(state, q_pre, position_ids, gate.config.q_step, t)
    return gate(q_pre.detach(), k_pre.detach(), cos, sin, impl=impl, causal_only=causal_only)


def _gate_logits(module, state: SeerState, pre: dict, kwargs, b: int, t: int, impl=None) -> torch.Tensor:
    hq, hkv, d = _heads(module)
    q_pre = pre["q"].reshape(b, t, hq, d).transpose(1, 2)
    k_pre = pre["k"].reshape(b, t, hkv, d).transpose(1, 2)
    return _gate_forward(module.seer_gate, state, q_pre, k_pre, kwargs.get("position_ids"), impl)


def gate_logits(
    model: torch.nn.Module,
    layer: int,
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gate logits [B, Hq, NB, NB] of ``layer``, exactly as the sparse path computes them.

    q_pre: [B, Hq, T, D], k_pre: [B, Hkv, T, D] pre-RoPE (e.g. from ``state.captures``);
    position_ids: [B or 1, T], default ``0..T-1``.
    """
    state = get_seer_state(model)
    if not 0 <= layer < len(state._attn_modules):
        raise ValueError(f"layer must be in [0, {len(state._attn_modules)}), got {layer}")
    return _gate_forward(state._attn_modules[layer].seer_gate, state, q_pre, k_pre, position_ids)


def group_scores(probs: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, NB, NB] -> [B, Hkv, NB, NB], averaging over each GQA group (``mask_heads="kv"``)."""
    b, hq, n, _ = probs.shape
    return probs.view(b, hkv, hq // hkv, n, n).mean(2)


def _autocast_inputs(query, key, value):
    """q, k, v in one dtype. Under autocast with fp32 master weights, transformers hands us fp32 q/k (RoPE
    applied in the residual stream's dtype) beside a bf16 v (autocast linear); SDPA casts them itself, our ops
    require one dtype, so cast to the autocast dtype like SDPA would. Outside autocast a mismatch is the op's
    error to report."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return query.to(dtype), key.to(dtype), value.to(dtype)
    return query, key, value


def seer_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The ``"seer"`` attention function (transformers' AttentionInterface signature).

    query: [B, Hq, Tq, D], key/value: [B, Hkv, Tk, D] post-RoPE -> ([B, Tq, Hq, D], None).

    - A prefill (Tq == Tk, or a StaticCache's first forward: Tk its capacity) runs ``config.mode``;
      with sparse decode on, it also fills the layer's decode-gate key cache.
    - A padded batch or packed documents (``attention_mask`` causal & padding or causal & same document, or
      ``cu_seq_lens_q``; :func:`_prefill_layout`) run in ``sparse``, ``oracle`` and ``custom`` modes as N
      sequences packed back to back: their gate and policy per sequence length, one varlen mask and kernel
      call, zeros at pad positions; each real token gets what its sequence alone would. The other masked
      modes refuse them. Sparse decode takes left-padded prompts (what ``generate()`` gets from a tokenizer
      with ``padding_side="left"``): each sequence keeps its start in the KV cache row
      (:func:`_decode_starts`) and decodes as it would alone; right padding and packed documents are refused.
    - A decode step (Tq == 1 on a cache this state filled) runs sparse decode when the decode section
      is enabled, else transformers' SDPA (path ``dense-decode``), as do chunked-prefill steps
      (Tq > 1 continuing a cache: dense in every mode, since a sparse prefill runs only on a whole prompt;
      the stats say ``dense-decode``). With sparse decode on, such a chunk is taken only after a dense
      prefill (``mode="dense"``: its K rows extend the decode-gate key cache) and refused otherwise.
    """
    state: SeerState | None = getattr(module, "_seer_state", None)
    if state is None:
        raise RuntimeError(
            "the 'seer' attention implementation was called on a module without a seer gate; use "
            "seerattn.hf.apply_seer_attention(model, config) rather than setting attn_implementation by hand"
        )
    layer = module.layer_idx
    pending = state._pending.pop(layer, {})
    hf_cache = pending.pop("cache", None)  # the layer's transformers cache object (_cache_hook)
    pre = pending or None
    mask_in = attention_mask  # as the model hands it to every layer: the key of the forward's cached _Layout
    cfg = state.config
    b, hq, tq, d = query.shape
    tk = key.shape[2]
    if state.capture and pre is not None:
        state.captures[layer] = (pre["q"], pre["k"], query, key)
    scale = scaling if scaling is not None else d**-0.5
    capacity = None  # a static cache's size, when this forward starts one
    if hf_cache is not None and tq < tk:
        entry = state._decode.get(layer)
        if tq == 1 and state.decoding and entry is not None and entry.owner() is hf_cache:
            if dropout:
                raise ValueError("seer attention does not implement attention dropout; set model.eval() or dropout=0")
            query, key, value = _autocast_inputs(query, key, value)
            return _decode_step(module, state, entry, query, key, value, pre, scale, kwargs.get("sliding_window")), None
        # Is this a cache's first forward? Asked (one device read for a StaticCache) only where the answer
        # matters: a sparse prefill, or sparse decode meeting a cache it does not know; never in a dense step.
        if ((tq > 1 and cfg.mode != "dense") or state.decoding) and _cache_start(hf_cache, layer, tq):
            # A StaticCache's first forward: the cache hands over its whole capacity; the prompt is its first tq keys.
            key, value = key[:, :, :tq], value[:, :, :tq]
            if attention_mask is not None:
                attention_mask = attention_mask[..., :tq]
            capacity, tk = tk, tq
        elif state.decoding:
            entry = state._decode.get(layer)
            if cfg.mode != "dense" or entry is None or entry.owner() is not hf_cache:
                raise ValueError(
                    f"layer {layer}: a forward of {tq} tokens continues a KV cache (chunked prefill, several tokens "
                    "per step, or a cache filled without seer's decode section); sparse decode supports a prefill "
                    "from an empty cache, in chunks only with a dense prefill (mode='dense'), followed by one new "
                    "token per step. Switch it off with state.set_decode(enabled=False) for this use"
                )
            _check_chunk_unpadded(state, attention_mask, entry.length, tq, layer)
            _extend_decode_cache(module, state, entry, pre, key, tq)
    if state.decoding and hf_cache is not None and tq == tk:
        starts = _decode_starts(_prefill_layout(state, mask_in, attention_mask, kwargs, b, tq), query.device)
        _start_decode_cache(module, state, hf_cache, pre, key, capacity, starts)
    if cfg.mode == "dense" or tq != tk:
        pre = pending = None  # the captures' last references (with state.capture off): freed before the kernel
        state._stats[layer] = {"path": "dense" if tq == tk else "dense-decode", "density": 1.0}
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ValueError("seer attention does not implement attention dropout; set model.eval() or dropout=0")
    query, key, value = _autocast_inputs(query, key, value)
    # Before the mask check: a sliding-window mask is not padding, and the error should say which it is.
    # The window is what the model hands this layer's attention function (Qwen2/3: per layer type,
    # None on full-attention layers; Mistral: the config's), not the config's value for all layers.
    sliding = kwargs.get("sliding_window")
    if sliding is not None and tq > sliding:
        raise ValueError(
            f"layer {layer} uses a sliding window of {sliding} tokens but the prompt has {tq}; seer attention "
            "implements full causal attention only. Set config.sliding_window=None or shorten the prompt"
        )
    layout = _prefill_layout(state, mask_in, attention_mask, kwargs, b, tq)  # None: an unpadded batch
    if layout is not None and cfg.mode not in _LAYOUT_MODES:
        raise ValueError(
            f"seer attention mode {cfg.mode!r} supports causal prefill without padding or packing only; modes "
            f"{_LAYOUT_MODES} take padded and packed batches. Pass unpadded sequences of equal length or use "
            "mode='dense'"
        )
    if cfg.mode == "decode_eval":
        if pre is None:
            raise RuntimeError(f"layer {layer}: pre-RoPE q/k were not captured (hooks missing?)")
        return _decode_eval_attention(module, state, query, key, value, pre, scale), None
    bs = cfg.gate.block_size
    if cfg.mode == "distill":
        if pre is None:
            raise RuntimeError(f"layer {layer}: pre-RoPE q/k were not captured (hooks missing?)")
        with torch.no_grad():
            out, _, target = attention_with_block_scores(
                query.detach(), key.detach(), value.detach(), block_size=bs, scale=scale, impl=cfg.impl
            )
        if not _in_backward():  # a checkpoint recompute needs the output only
            with _gate_graph(state):
                logits = _gate_logits(module, state, pre, kwargs, b, tq, impl="eager")
                _record_gate_loss(module, state, logits, target, tq)
            state._stats[layer] = {"path": "distill", "density": 1.0}
        return out.transpose(1, 2).contiguous(), None

    policy = cfg.policy.for_layer(layer)
    if cfg.mode == "finetune":
        if pre is None:
            raise RuntimeError(f"layer {layer}: pre-RoPE q/k were not captured (hooks missing?)")
        return _finetune_attention(module, state, query, key, value, pre, kwargs, policy, scale), None
    # a checkpoint recompute replays the mask of its forward (checkpoint_context_fn), else it is built
    mask = _replayed_mask(state) if _in_backward() else None
    if mask is None:
        if cfg.mode == "custom" and state.mask_fn is None:
            raise RuntimeError("mode='custom' needs SeerState.mask_fn (a MaskRequest -> BlockMask function)")
        if cfg.mode == "sparse" and pre is None:
            raise RuntimeError(f"layer {layer}: pre-RoPE q/k were not captured (hooks missing?)")
        mask = _layer_mask(module, state, layout, query, key, value, pre, kwargs.get("position_ids"), policy, scale)
        _record_mask(state, mask)
    pre = pending = None  # the captures' last references (with state.capture off): freed before the kernel
    # named ranges for torch.profiler (benchmarks/prefill.py --profile); free when no profiler runs
    with record_function("seer.attention"):
        if layout is None:
            out = block_sparse_attention(query, key, value, mask, scale=scale, impl=cfg.impl)
        else:  # the real tokens packed back to back, one varlen call, scattered back (pad positions: zeros).
            # The layout's one cu_seqlens tensor serves every layer: the op reads and checks it on the first only.
            packed = [_pack(layout, x) for x in (query, key, value)]
            out = block_sparse_attention(*packed, mask, scale=scale, cu_seqlens=layout.cu_seqlens, impl=cfg.impl)
            del packed
    state._stats[layer] = {"path": cfg.mode}
    if state.record_densities:
        with record_function("seer.stats"):
            density, token_density = mask.densities() if layout is None else _layout_densities(layout, mask)
        state._stats[layer].update(density=density, token_density=token_density)
    return (out.transpose(1, 2).contiguous() if layout is None else _unpack(layout, out)), None


def _layer_mask(module, state: SeerState, layout: _Layout | None, query, key, value, pre, position_ids, policy, scale):
    """The block mask of one layer's ``sparse`` / ``oracle`` / ``custom`` prefill: over the batch
    (``layout`` None), else one :func:`_prefill_mask` per sequence length of the layout, combined into one varlen
    mask. query: [B, Hq, T, D], key/value: [B, Hkv, T, D] post-RoPE; pre: the hooks' pre-RoPE captures or None.
    A function of its own so that its views and gathered copies of the captures die before the kernel runs."""
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    if layout is None:
        q_pre = k_pre = None
        if pre is not None:
            q_pre = pre["q"].reshape(b, t, hq, d).transpose(1, 2)
            k_pre = pre["k"].reshape(b, t, hkv, d).transpose(1, 2)
        return _prefill_mask(module, state, query, key, value, q_pre, k_pre, position_ids, policy, scale)
    # one gate and policy call per sequence length (a packed row of equal documents: one call)
    masks = []
    flat_pos = None if position_ids is None else position_ids.expand(b, t).reshape(-1)
    for group in layout.groups:
        # only what the mode reads: oracle q, k, v; custom q, k; sparse the pre-RoPE q, k
        post = {"oracle": (query, key, value), "custom": (query, key)}.get(state.config.mode, ())
        qkv = [_gather_group(group, x.transpose(1, 2), x.shape[1]) for x in post] + [None] * (3 - len(post))
        pre_g = [None, None]
        if pre is not None:
            pre_g = [_gather_group(group, pre["q"], hq), _gather_group(group, pre["k"], hkv)]
        pos = None if flat_pos is None else flat_pos[group.tokens]
        masks.append(_prefill_mask(module, state, *qkv, *pre_g, pos, policy, scale))
    return _combine_masks(layout, masks)


def _prefill_mask(module, state: SeerState, query, key, value, q_pre, k_pre, position_ids, policy, scale) -> BlockMask:
    """The block mask of a ``sparse`` / ``oracle`` / ``custom`` prefill of B sequences of T tokens each: an
    unpadded batch, or the sequences of one length of a padded or packed batch (:class:`_Layout`).

    query: [B, Hq, T, D], key/value: [B, Hkv, T, D] post-RoPE (None where the mode does not read them: ``sparse``
    reads none, ``custom`` q and k); q_pre [B, Hq, T, D], k_pre [B, Hkv, T, D] pre-RoPE (``sparse`` mode; else
    None); position_ids: [B or 1, T] (the gate's RoPE at window starts) or None (0..T-1).
    """
    cfg = state.config
    b, _, t, _ = (query if query is not None else q_pre).shape
    bs = cfg.gate.block_size
    if cfg.mode == "custom":
        mask = state.mask_fn(MaskRequest(module.layer_idx, query, key, scale, bs, t))
        if not isinstance(mask, BlockMask) or mask.shape[0] != b or mask.seq_len != t or mask.block_size != bs:
            got = f"{mask.shape}, {mask.seq_len}, {mask.block_size}" if isinstance(mask, BlockMask) else mask
            raise ValueError(
                f"SeerState.mask_fn must return a BlockMask of batch {b}, seq_len {t} and block_size {bs} (the "
                f"MaskRequest's sequences); got {got!r:.200} (shape, seq_len, block_size)"
            )
        return mask
    if cfg.mode == "oracle":
        with torch.no_grad():
            _, _, scores = attention_with_block_scores(query, key, value, block_size=bs, scale=scale, impl=cfg.impl)
    else:
        # The softmax is strictly increasing along a row, so a policy that ranks within rows keeps the same
        # blocks from the logits, without a pass over the [B, Hq, NB, NB] map (0.34 ms a layer at 128k on the
        # H200). Only ties differ: two distinct logits that the fp32 softmax would round to one probability
        # are ranked by their exact order instead of by column. Per-group masks average probabilities.
        direct = policy.ranks_within_rows and cfg.mask_heads == "q"
        with torch.no_grad(), record_function("seer.gate"):
            # the policy reads only the causal part of the logits (both selections mask the rest), so the gate
            # need not write the -inf above the diagonal when they go to it directly
            scores = _gate_forward(
                module.seer_gate, state, q_pre, k_pre, position_ids, cfg.gate_impl, causal_only=direct
            )
            if not direct:
                scores = scores.softmax(-1)
    with record_function("seer.policy"):
        if cfg.mask_heads == "kv":
            scores = group_scores(scores, (key if key is not None else k_pre).shape[1])
        policy_impl = {None: None, "eager": "reference", "triton": "triton"}[cfg.gate_impl]
        return mask_from_scores(scores, policy, t, bs, impl=policy_impl)


# ---------------------------------------------------------------------------------------- sparse decode
# Elements of the largest fp32 temporary of a decode_eval chunk ([B, Hq, rows, T] scores): 2^26 = 256 MiB.
_DECODE_EVAL_ELEMENTS = 1 << 26


def _cache_start(hf_cache, layer: int, tq: int) -> bool:
    """Whether the ``tq`` tokens of this forward are the first in ``hf_cache`` (whose length counts them already).

    ``get_seq_length`` is a host int for ``DynamicCache`` and a device tensor for ``StaticCache``: one
    read (a synchronisation) per layer at a prefill, never in a decode step.
    """
    return int(hf_cache.get_seq_length(layer)) == tq


def _decode_starts(layout: _Layout | None, device) -> torch.Tensor | None:
    """Where each prompt of a prefill starts in its KV cache row, for sparse decode: int32 [B] on ``device``, or
    None for an unpadded batch (``layout`` None).

    Sparse decode takes left padding: each row holds at most one sequence, ending at the row's end (the pad tokens
    before it; a row of padding only starts at T and has no token yet). Its decode steps append each new token at
    the same position in every row, right after its prompt. Right padding would leave the pad tokens between the
    prompt and its generated tokens, and packed documents several sequences in one row: both are refused.
    """
    if layout is None:
        return None
    b, t = layout.batch, layout.seq_len
    rows = [flat // t for flat in layout.starts]
    if len(set(rows)) != len(rows):
        row = next(r for r in rows if rows.count(r) > 1)
        raise ValueError(
            f"seer sparse decode takes one sequence per row; row {row} of the prefill holds {rows.count(row)} (packed "
            "documents). Decode them as separate rows, or switch decode sparsity off with "
            "state.set_decode(enabled=False)"
        )
    starts = [t] * b
    for row, flat, n in zip(rows, layout.starts, layout.lengths, strict=True):
        start = flat % t
        if start + n != t:
            raise ValueError(
                f"seer sparse decode takes left-padded prompts (a tokenizer with padding_side='left', as generate() "
                f"expects); row {row} ends {t - start - n} pad token(s) before the row's end (right padding), so its "
                "generated tokens would not follow its prompt in the KV cache. Pad on the left, or switch decode "
                "sparsity off with state.set_decode(enabled=False)"
            )
        starts[row] = start
    return torch.tensor(starts, dtype=torch.int32, device=device)


def _start_decode_cache(
    module, state: SeerState, hf_cache, pre: dict | None, key: torch.Tensor, capacity: int | None, starts
):
    """A prefill of a prompt (``key``: its post-RoPE keys [B, Hkv, T, D]) into an empty ``hf_cache``: the layer's
    decode-gate key cache, filled in bulk from the prompt's pre-RoPE K (completed blocks -> gate keys, the partial
    block -> running pools), and the blocks' key bounds for a policy with ``bound_slots``.
    ``capacity``: the tokens a static cache holds (it hands over that many keys in every step), None for a
    cache that grows. ``starts``: int32 [B] each prompt's first real token in a left-padded batch
    (:func:`_decode_starts`; each prompt pooled from there), None for an unpadded one. The KV cache rows keep one
    length (a host counter, so that a step reads nothing from the device); each sequence's own length is kept on
    the device by the key cache."""
    layer = module.layer_idx
    if pre is None:
        raise RuntimeError(f"layer {layer}: pre-RoPE q/k were not captured (hooks missing?)")
    gate: DecodeGate = module.seer_decode_gate
    b, t = key.shape[0], key.shape[2]
    k_pre = pre["k"].reshape(b, t, gate.num_kv_heads, gate.head_dim).transpose(1, 2)
    # room for the whole cache: a static cache's capacity (static shapes in every step), else the prompt (it grows)
    policy = state.config.decode.policy
    keys = GateKeyCache(gate, b, max_tokens=capacity or t, device=k_pre.device, shifted=policy.half_shift)
    keys.prefill(k_pre, rotary=state._rotary, starts=starts)
    bounds = None
    if policy.bound_slots:  # updated by its kernel where the selection is fused (CUDA by default), else as chosen
        fused = resolve_decode_select(state.config.decode_select, policy, key.device) == "fused"
        bounds = BlockBounds(key, gate.config.block_size, capacity or t, impl="triton" if fused else None)
        bounds.refresh(key, starts)
    rotary = _step_rotary(state, gate, hf_cache, capacity, k_pre.device)
    state._decode[layer] = _DecodeCache(weakref.ref(hf_cache), keys, t, capacity, starts, rotary, bounds)
    _follow_batch_ops(state, hf_cache)


def _step_rotary(state: SeerState, gate: DecodeGate, hf_cache, capacity: int | None, device) -> RotaryTable | None:
    """The rotary of a static cache's decode steps: one :class:`RotaryTable` over its positions, shared by the
    layers (the first layer's prompt forward makes it); None (the model's rotary) for a cache that grows, a gate
    without RoPE or a rotary whose frequencies depend on the length."""
    if capacity is None or not gate.config.use_rope or state._rotary is None or not length_free_rotary(state._rotary):
        return None
    dtype = gate.k_proj.dtype
    for entry in state._decode.values():
        table = entry.rotary
        if entry.owner() is hf_cache and table is not None and (table.cos.dtype, table.cos.device) == (dtype, device):
            return table
    return RotaryTable(state._rotary, capacity, gate.gate_dim, dtype, device)


def _check_chunk_unpadded(state: SeerState, attention_mask, past: int, tq: int, layer: int) -> None:
    """Refuse a chunk of a chunked prefill that holds padding: sparse decode's key cache takes the chunk's K rows as
    real tokens. attention_mask: what transformers hands the layer ([B, 1 or H, tq, Tk], bool or additive float;
    None: nothing masked beyond causality); query i of the chunk sits at cache position ``past + i`` and a real token
    attends to itself, a pad token does not. Read once per forward (the mask is the same object in every layer; the
    cache keys on it and on ``past``)."""
    if attention_mask is None:
        return
    seen = state._chunk_mask
    if seen is not None and seen[0]() is attention_mask and seen[1] == past:
        return
    if attention_mask.dim() != 4 or attention_mask.shape[-2] != tq or attention_mask.shape[-1] < past + tq:
        raise ValueError(
            f"layer {layer}: a prefill chunk of {tq} tokens after {past} takes an attention mask [B, 1, {tq}, >= "
            f"{past + tq}] (transformers' causal mask), got {tuple(attention_mask.shape)}"
        )
    # entries (i, past + i): converted alone, not the whole [B, 1, tq, Tk] mask
    if not bool(_attends(attention_mask.diagonal(offset=past, dim1=-2, dim2=-1)).all()):  # one host read a forward
        raise ValueError(
            f"layer {layer}: a chunk of a chunked prefill (prefill_chunk_size) holds padding (a pad token at or after "
            f"cache position {past}); sparse decode would read its keys as real tokens. Prefill padded prompts in one "
            "forward (prefill_chunk_size=None) with left padding, or switch decode sparsity off with "
            "state.set_decode(enabled=False)"
        )
    state._chunk_mask = (weakref.ref(attention_mask), past)


def _extend_decode_cache(module, state: SeerState, entry: _DecodeCache, pre: dict | None, key: torch.Tensor, tq: int):
    """A dense prefill chunk of ``tq`` tokens continuing ``entry``'s cache (transformers' ``prefill_chunk_size``;
    ``key``: the KV cache's post-RoPE keys [B, Hkv, Tk, D], the chunk's included): its pre-RoPE K rows go into the
    decode-gate key cache in bulk (:meth:`GateKeyCache.extend`), the blocks' key bounds are refreshed from ``key``;
    the chunk's attention itself is the model's dense one."""
    layer = module.layer_idx
    if pre is None:
        raise RuntimeError(f"layer {layer}: pre-RoPE q/k were not captured (hooks missing?)")
    if entry.starts is not None:
        raise ValueError(
            f"layer {layer}: a chunked prefill (prefill_chunk_size) of a left-padded batch is not supported with "
            "sparse decode: the padding of the later chunks is not read. Prefill the padded prompts in one forward "
            "(prefill_chunk_size=None), or switch decode sparsity off with state.set_decode(enabled=False)"
        )
    b, tk = key.shape[0], key.shape[2]
    entry.check_handover(layer, tk, tq)
    gate: DecodeGate = module.seer_decode_gate
    k_pre = pre["k"].reshape(b, tq, gate.num_kv_heads, gate.head_dim).transpose(1, 2)
    entry.keys.extend(k_pre, rotary=state._rotary)
    entry.length += tq
    if entry.bounds is not None:
        entry.bounds.refresh(key[:, :, : entry.length])


# transformers' cache methods that reorder, select or repeat the sequences of the batch (beam search,
# contrastive search) -> the old sequence each new one is, given the method's argument and the old batch size
_BATCH_OPS: dict[str, Callable[[object, int], torch.Tensor]] = {
    "reorder_cache": lambda beam_idx, _: beam_idx,
    "batch_select_indices": lambda indices, _: indices,
    "batch_repeat_interleave": lambda repeats, b: torch.arange(b).repeat_interleave(repeats),
}


def _follow_batch_ops(state: SeerState, hf_cache) -> None:
    """Make the decode-gate key caches follow the batch operations of ``hf_cache`` (once per cache object).

    transformers reorders a cache's K/V for beam search by calling its ``reorder_cache``; the key caches,
    kept beside it, must be reordered the same way, or each sequence would select blocks with another
    sequence's gate keys. The cache object's own methods are wrapped (on the instance: the class and
    other caches are untouched) by :class:`_FollowedBatchOp`: each runs, then the layers' key caches owned
    by this cache take the same sequences.

    Nothing put on the cache refers to it strongly: the wrappers hold it through a weak reference, and
    ``_seer_follows`` is a weak reference to the state. A wrapper holding the bound method
    (``hf_cache.reorder_cache``) would make a reference cycle cache -> wrapper -> cache, and the whole KV
    cache (16 GiB at 8 layers, batch 16, 32k, Llama-3.1-8B shape) would outlive its ``generate()`` until
    the garbage collector's next full pass: the +16 / +48 GiB peaks of the end-to-end benchmark
    (docs/experiments/decode/README.md, section 5).
    """
    follows = hf_cache.__dict__.get("_seer_follows")
    if follows is not None and follows() is state:
        return
    for name in _BATCH_OPS:
        if getattr(hf_cache, name, None) is not None:
            setattr(hf_cache, name, _FollowedBatchOp(state, hf_cache, name, hf_cache.__dict__.get(name)))
    hf_cache._seer_follows = weakref.ref(state)


class _FollowedBatchOp:
    """A batch operation ``name`` of a transformers cache wrapped by :func:`_follow_batch_ops`: the class's
    method on the cache (or ``inner``, an earlier wrapper: another state following the same cache), then the
    same sequences in ``state``'s key caches owned by that cache. Holds the cache weakly (no reference cycle);
    a deep copy of the cache (transformers' prompt-reuse recipe) gets wrappers of the copy, following the
    same state (whose key caches belong to the original: the copy's operations select none of them)."""

    def __init__(self, state: SeerState, cache, name: str, inner: _FollowedBatchOp | None):
        self.state, self.owner, self.name, self.inner = state, weakref.ref(cache), name, inner

    def __call__(self, arg) -> None:
        cache = self.owner()
        if self.inner is None:
            getattr(type(cache), self.name)(cache, arg)
        else:
            self.inner(arg)
        for entry in self.state._decode.values():
            if entry.owner() is cache:
                index = _BATCH_OPS[self.name](arg, entry.keys.lengths.shape[0])
                entry.keys.select(index)
                if entry.bounds is not None:
                    entry.bounds.select(index)
                if entry.starts is not None:
                    entry.starts = entry.starts.index_select(0, index.to(entry.starts.device).long())

    def __deepcopy__(self, memo: dict) -> _FollowedBatchOp:
        cache = memo.get(id(self.owner()))  # the copy of the cache, made before its attributes are copied
        if cache is None:
            raise TypeError(
                "a wrapped batch operation of a KV cache is copied with its cache only (copy.deepcopy(cache))"
            )
        return _FollowedBatchOp(self.state, cache, self.name, copy.deepcopy(self.inner, memo))


@torch.compiler.disable
def _decode_step(module, state: SeerState, entry: _DecodeCache, query, key, value, pre, scale: float, sliding):
    """One sparse decode step of one layer.

    query: [B, Hq, 1, D] post-RoPE, key/value: [B, Hkv, Tcap, D] the layer's KV cache (the new token's K/V
    at position ``entry.length``) -> [B, 1, Hq, D]. No host synchronisation: lengths come from the host
    counter (``entry.length``) and the device tensor ``GateKeyCache.lengths``. A left-padded batch: each
    sequence's length, blocks and selection count from its first real token (``entry.starts``, handed to the
    kernel as ``cache_starts``), so it decodes as it would alone.

    Never traced by ``torch.compile`` (transformers' ``generate`` compiles the decode steps of a
    StaticCache on CUDA): the host counters would be guards that change every step (a recompile per
    step). The step runs eagerly between the compiled parts of the layer.
    """
    layer, dec = module.layer_idx, state.config.decode
    b, hq, _, d = query.shape
    hkv, tcap = key.shape[1], key.shape[2]
    if pre is None:
        raise RuntimeError(f"layer {layer}: pre-RoPE q/k were not captured (hooks missing?)")
    entry.check_handover(layer, tcap, 1)
    if sliding is not None and entry.length + 1 > sliding:
        raise ValueError(
            f"layer {layer} uses a sliding window of {sliding} tokens; seer sparse decode implements full causal "
            "attention only. Set config.sliding_window=None or switch decode sparsity off"
        )
    if entry.starts is not None and state.decode_select_fn is not None:
        raise ValueError(
            f"layer {layer}: SeerState.decode_select_fn takes unpadded batches only (its DecodeRequest hands the KV "
            "cache rows, where a left-padded sequence does not start at token 0); pass prompts of equal length "
            "without padding, or unset decode_select_fn"
        )
    bs = dec.gate.block_size
    with torch.no_grad():
        rotary = state._rotary if entry.rotary is None else entry.rotary
        entry.keys.append(pre["k"].reshape(b, hkv, d), rotary)  # the same rotary for the gate query below
        entry.length += 1
        seqlens = entry.keys.lengths.to(torch.int32)  # [B], the new token included (from each sequence's start)
        bounds = None
        if entry.bounds is not None:
            entry.bounds.reserve(tcap)
            entry.bounds.update(key, entry.keys.lengths, entry.starts)
            bounds = (entry.bounds.kmin, entry.bounds.kmax)
        q_pre = pre["q"].reshape(b, hq, 1, d)
        shifted = None if entry.keys.shifted is None else entry.keys.shifted.keys
        idx = _decode_selection(
            module, state, query, q_pre, key, seqlens.view(b, 1), entry.keys.keys, scale, rotary, shifted, bounds
        )
        idx = idx[:, :, 0]  # [B, Hkv, K]
        if state.decode_observer is not None:
            state.decode_observer(DecodeSelection(layer, idx, seqlens, bs, entry.starts))
        out = sparse_decode_attention(
            query[:, :, 0], key, value, seqlens, idx, bs, scale=scale, impl=state.config.impl, cache_starts=entry.starts
        )
    state._stats[layer] = {"path": "sparse-decode"}
    if state.record_densities:
        # its inputs only (small): the ~8 reductions run when stats are read, not in each of generate's steps; a
        # step replayed from a CUDA graph rewrites these tensors, so a read computes the last step's density
        state._stats[layer]["density"] = functools.partial(_decode_density, idx.unsqueeze(2), seqlens.view(b, 1), bs)
    return out.unsqueeze(1)


def _decode_selection(
    module,
    state: SeerState,
    query,
    q_pre,
    key,
    seqlens,
    gate_keys,
    scale: float,
    rotary=None,
    shifted=None,
    bounds=None,
) -> torch.Tensor:
    """The key blocks of N query rows per sequence, as a decode step selects them (``rotary``: the gate query's,
    default the model's).

    query: [B, Hq, N, D] post-RoPE; q_pre: [B, Hq, N, D] pre-RoPE; key: [B, Hkv, Tcap, D] post-RoPE;
    seqlens: int32 [B, N] keys visible to each row; gate_keys: [B, Hkv, NBc, Dg] the decode gate's keys
    (valid for each row's completed blocks; None with ``decode_select_fn``); shifted: [B, Hkv, NBs, Dg] the
    half-block-shifted windows' keys (``DecodePolicy.half_shift``; None otherwise); bounds: (kmin, kmax), each
    [B, Hkv, NBb, D], the blocks' key bounds (``DecodePolicy.bound_slots``; None otherwise) -> int32 [B, Hkv, N, K].
    Fused or unfused selection by :func:`~seerattn.decode_policy.resolve_decode_select` (``SeerConfig.decode_select``).
    """
    dec = state.config.decode
    rotary = state._rotary if rotary is None else rotary
    b, hq, n, d = query.shape
    hkv, tcap = key.shape[1], key.shape[2]
    bs = dec.gate.block_size
    kv_blocks = num_blocks(tcap, bs)
    if state.decode_select_fn is not None:
        request = DecodeRequest(module.layer_idx, query, key, seqlens, scale, bs, dec.policy.num_slots(bs, kv_blocks))
        idx = state.decode_select_fn(request)
        ok = isinstance(idx, torch.Tensor) and idx.dtype == torch.int32 and idx.dim() == 4
        if not ok or idx.shape[:3] != (b, hkv, n):
            raise ValueError(
                f"decode_select_fn must return int32 [B, Hkv, N, K] = [{b}, {hkv}, {n}, K] block indices, got "
                f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}"
            )
        return idx
    gate: DecodeGate = module.seer_decode_gate
    if dec.policy.half_shift and shifted is None:
        raise RuntimeError(
            f"layer {module.layer_idx}: DecodePolicy.half_shift is on but the decode-gate key cache was built without "
            "the shifted windows (the policy changed during a generate?): start a new generate() or call state.reset()"
        )
    if not dec.policy.half_shift:
        shifted = None
    picks = None
    if dec.policy.bound_slots and bounds is None:
        raise RuntimeError(
            f"layer {module.layer_idx}: DecodePolicy.bound_slots is set but the decode cache keeps no key bounds "
            "(the policy changed during a generate?): start a new generate() or call state.reset()"
        )
    gate_keys = gate_keys[:, :, :kv_blocks]
    fused = resolve_decode_select(state.config.decode_select, dec.policy, query.device) == "fused"
    if dec.policy.bound_slots:  # the bound's kernel beside the fused selection, its reference beside the unfused
        impl = "triton" if fused else "torch"
        picks = bound_block_picks(query, *bounds, seqlens, dec.policy.bound_slots, bs, impl)  # [B, Hkv, N, M]
    if fused and gate_keys.shape[2] < kv_blocks:
        # decode_eval's keys cover the completed blocks only; the kernel keeps a current block only where the
        # keys cover it (the unfused policy pads its logits to kv_blocks instead). Never in a generate step.
        gate_keys = torch.nn.functional.pad(gate_keys, (0, 0, 0, kv_blocks - gate_keys.shape[2]))
    parts = []
    # rows folded into the batch; per sequence, so the gate keys are an expanded view, never copied
    for i in range(b) if n > 1 else (None,):
        sl = slice(None) if i is None else slice(i, i + 1)
        bb = b if i is None else 1
        qf = q_pre[sl].permute(0, 2, 1, 3).reshape(bb * n, hq, d)
        kf = gate_keys[sl].unsqueeze(1).expand(bb, n, *gate_keys.shape[1:]).reshape(bb * n, *gate_keys.shape[1:])
        lens = seqlens[sl].reshape(bb * n)
        pf = None if picks is None else picks[sl].permute(0, 2, 1, 3).reshape(bb * n, hkv, -1)
        if fused:  # the gate query (DecodeGate.decode_query_impl), then the logits and the budget top-K in one launch
            qg = gate.decode_query(qf, lens - 1, rotary)  # [bb * N, Hkv, Dg]
            sel = select_decode_blocks_fused(qg, kf, lens, dec.policy, bs, pf)  # [bb * N, Hkv, K], ascending
        else:
            sf = None
            if shifted is not None:
                sf = shifted[sl].unsqueeze(1).expand(bb, n, *shifted.shape[1:]).reshape(bb * n, *shifted.shape[1:])
            logits = gate.scores(qf, kf, lens - 1, rotary, sf)  # [bb * N, Hkv, NB]
            sel = select_decode_blocks(logits, lens, dec.policy, bs, kv_blocks, pf)  # [bb * N, Hkv, K]
        parts.append(sel.view(bb, n, hkv, -1).permute(0, 2, 1, 3))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def _kept_token_mask(idx: torch.Tensor, seqlens: torch.Tensor, block_size: int, t: int) -> torch.Tensor:
    """idx: int32 [B, Hkv, N, K] selected blocks, seqlens: [B, N] -> bool [B, Hkv, N, T]: the keys each row attends."""
    b, hkv, n, _ = idx.shape
    nb = num_blocks(t, block_size)
    i = idx.long()
    i = torch.where((i >= 0) & (i < nb), i, nb)  # padding -> a spare column, dropped
    blk = torch.zeros(b, hkv, n, nb + 1, dtype=torch.bool, device=idx.device).scatter_(-1, i, True)[..., :nb]
    tok = blk.repeat_interleave(block_size, dim=-1)[..., :t]
    return tok & (torch.arange(t, device=idx.device) < seqlens.to(idx.device).view(b, 1, n, 1))


def _decode_density(idx: torch.Tensor, seqlens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Kept fraction of the visible keys (a device scalar): idx int32 [B, Hkv, N, K], seqlens [B, N]."""
    lens = seqlens.long().unsqueeze(1).unsqueeze(-1)  # [B, 1, N, 1]
    kept = (lens - idx.long() * block_size).clamp(0, block_size) * (idx >= 0)
    return kept.sum() / (lens.sum() * idx.shape[1]).clamp(min=1)


def _decode_eval_attention(module, state: SeerState, query, key, value, pre: dict, scale: float) -> torch.Tensor:
    """``decode_eval`` mode: a teacher-forced window in which rows from ``decode_start`` on attend as decode would.

    query: [B, Hq, T, D], key/value: [B, Hkv, T, D] post-RoPE -> [B, T, Hq, D]. Rows before the start:
    dense causal (SDPA). Row t from the start on: the blocks :func:`_decode_selection` picks for a decode
    step at position t (the decode gate over the completed blocks J < t // block_size at the policy's
    budget, plus first and current block; or ``decode_select_fn``), exact causal inside its block:
    token-masked attention with a materialised softmax, rows in chunks (largest temporary
    ``_DECODE_EVAL_ELEMENTS`` fp32 values).
    """
    cfg = state.config
    bs = cfg.decode.gate.block_size
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    start = min(cfg.decode_start, t)
    out = query.new_empty(b, hq, t, d)
    if start:
        out[:, :, :start] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, :start], key[:, :, :start], value[:, :, :start], is_causal=True, scale=scale, enable_gqa=True
        )
    kept = visible = query.new_zeros((), dtype=torch.float32)
    if start < t:
        q_pre = pre["q"].reshape(b, t, hq, d).transpose(1, 2)
        gate_keys = shifted = None
        if state.decode_select_fn is None:
            k_pre = pre["k"].reshape(b, t, hkv, d).transpose(1, 2)
            gate = module.seer_decode_gate
            with torch.no_grad():
                gate_keys = gate.block_keys(k_pre, state._rotary)  # completed blocks
                if cfg.decode.policy.half_shift:  # the completed half-block-shifted windows
                    shifted = gate.block_keys(k_pre, state._rotary, offset=bs // 2)
        bounds = quest_block_bounds(key, bs) if cfg.decode.policy.bound_slots else None
        cdt = torch.promote_types(query.dtype, torch.float32)
        kf, vf = key.to(cdt).unsqueeze(2), value.to(cdt).unsqueeze(2)  # [B, Hkv, 1, T, D]
        rows = max(1, _DECODE_EVAL_ELEMENTS // (b * hq * t))
        sel = functools.partial(_decode_selection, module, state)
        for r0 in range(start, t, rows):
            r1 = min(t, r0 + rows)
            n = r1 - r0
            seqlens = torch.arange(r0 + 1, r1 + 1, device=query.device, dtype=torch.int32).expand(b, n)
            with torch.no_grad():
                rows_q, rows_q_pre = query[:, :, r0:r1], q_pre[:, :, r0:r1]
                idx = sel(rows_q, rows_q_pre, key, seqlens, gate_keys, scale, None, shifted, bounds)
                keep = _kept_token_mask(idx, seqlens, bs, t).unsqueeze(2)  # [B, Hkv, 1, N, T]
            qc = query[:, :, r0:r1].to(cdt).view(b, hkv, g, n, d)
            p = (torch.matmul(qc, kf.transpose(-1, -2)) * scale).masked_fill(~keep, float("-inf")).softmax(-1)
            out[:, :, r0:r1] = torch.matmul(p, vf).view(b, hq, n, d).to(out.dtype)
            if state.record_densities:
                kept = kept + keep.sum()
                visible = visible + hkv * b * (r0 + 1 + r1) * n / 2
    state._stats[module.layer_idx] = {"path": "decode_eval"}
    if state.record_densities:  # a window without decode rows is all dense
        state._stats[module.layer_idx]["density"] = kept / visible if start < t else 1.0
    return out.transpose(1, 2).contiguous()


def _in_backward() -> bool:
    """True while autograd's engine runs a backward pass on this thread.

    A forward that runs then is a gradient-checkpointing recompute (transformers' non-reentrant
    ``torch.utils.checkpoint``): it must rebuild the layer's activations, not record a new gate loss.
    """
    return torch._C._current_graph_task_id() != -1


def checkpoint_context_fn(model: torch.nn.Module) -> Callable[[], tuple]:
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: a recompute reuses its forward's mask.

    Without it, the recompute of a checkpointed decoder layer runs the gate and the policy again to
    rebuild the same mask (in ``finetune`` mode the eager gate: a few ms a layer at 32k). With it, each
    checkpointed call gets a list shared by its two contexts: the forward records the masks its
    attention builds, the recompute replays them in order. The pairing is per call, so it holds for any
    order of forwards and backwards (gradient accumulation, several losses). The masks stay alive
    from the forward to the backward: for per-query-head masks ``B * Hq * NB^2`` int32 a layer
    (32 MiB at 32k, 128 MiB at 64k with 32 heads). The state is looked up at each call, so gates may be
    attached before or after checkpointing is enabled; without a state the contexts do nothing.

    Pass it as ``gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context_fn(model)}``
    (``seerattn.train.finetune.enable_gradient_checkpointing`` does).
    """

    def context_fn() -> tuple:
        state = getattr(model, "_seer_state", None)
        if not isinstance(state, SeerState):
            return nullcontext(), nullcontext()
        masks: list[BlockMask] = []
        return _MaskContext(state, "record", masks), _MaskContext(state, "replay", masks)

    return context_fn


class _MaskContext:
    """One of the two contexts of a checkpointed call (:func:`checkpoint_context_fn`). A class, not a
    ``@contextmanager``: a second backward through a retained graph enters the recompute context again,
    which a generator context cannot do; each entry replays the recorded masks from the start."""

    def __init__(self, state: SeerState, how: str, masks: list):
        self.state, self.how, self.masks, self.previous = state, how, masks, []

    def __enter__(self) -> None:
        self.previous.append(self.state._masks)
        self.state._masks = (self.how, self.masks if self.how == "record" else iter(self.masks))

    def __exit__(self, *exc) -> None:
        self.state._masks = self.previous.pop()


def _record_mask(state: SeerState, mask: BlockMask) -> None:
    """In the forward of a checkpointed call (:func:`checkpoint_context_fn`): keep ``mask`` for its recompute."""
    if state._masks is not None and state._masks[0] == "record":
        state._masks[1].append(mask)


def _replayed_mask(state: SeerState) -> BlockMask | None:
    """In a recompute under :func:`checkpoint_context_fn`: the next mask its forward recorded; else None
    (checkpointing enabled without it: the caller rebuilds the mask from the same inputs)."""
    if state._masks is None or state._masks[0] != "replay":
        return None
    mask = next(state._masks[1], None)
    if mask is None:
        raise RuntimeError(
            "a checkpoint recompute asked for more block masks than its forward recorded; the layer's "
            "forward must build the same masks in its recompute (same mode and inputs)"
        )
    return mask


def _keep_saved(x: torch.Tensor) -> torch.Tensor:
    """Pack and unpack hook of :func:`_gate_graph`: the tensor itself."""
    return x


def _gate_graph(state: SeerState):
    """The context in which a layer builds its gate's graph (logits, loss).

    - Pass-through saved-tensor hooks: under gradient checkpointing the gate's graph keeps its own saved
      tensors instead of joining the layer's checkpoint, so a recompute does not have to reproduce them
      (it rebuilds the mask only, see :func:`_finetune_attention`).
    - Grad enabled when ``state.gate_grad_scale`` is set: :func:`_record_gate_loss` then backpropagates
      the loss in the layer, also when the caller runs the forward under ``no_grad``.
    """
    hooks = torch.autograd.graph.saved_tensors_hooks(_keep_saved, _keep_saved)
    if state.gate_grad_scale is None:
        return hooks
    stack = ExitStack()
    stack.enter_context(hooks)
    stack.enter_context(torch.enable_grad())
    return stack


def _record_gate_loss(module, state: SeerState, logits: torch.Tensor, target: torch.Tensor, t: int) -> None:
    """Gate loss and metrics of one layer into ``state`` (inside :func:`_gate_graph`).

    logits, target: [B, Hq, NB, NB]; t the sequence length. With ``state.gate_grad_scale`` set, the gradient
    of ``gate_grad_scale * loss`` goes into the gate's ``.grad`` now (accumulating, as ``loss.backward()``
    would) and the detached loss is recorded, so the gate's graph is freed when the layer returns. The
    backward runs with autocast off, as a backward called after the autocast region would.
    """
    cfg, layer = state.config, module.layer_idx
    nb = logits.shape[-1]
    skip = min(int(cfg.skip_first_rows * nb), nb - 1)
    loss = gate_loss(logits, target, skip_first_rows=skip)
    if state.gate_grad_scale is not None and loss.requires_grad:
        params = [p for p in module.seer_gate.parameters() if p.requires_grad]
        with torch.autocast(loss.device.type, enabled=False):
            torch.autograd.backward(state.gate_grad_scale * loss, inputs=params)
        loss = loss.detach()
    state.losses[layer] = loss
    state.metrics[layer] = gate_metrics(logits.detach().softmax(-1), target, cfg.metric_density, t, cfg.gate.block_size)


def _finetune_attention(module, state: SeerState, query, key, value, pre: dict, kwargs, policy, scale):
    """``finetune`` mode: block-sparse attention with gradients to q/k/v, gate loss recorded per layer.

    query: [B, Hq, T, D], key/value: [B, Hkv, T, D] post-RoPE -> out [B, T, Hq, D].

    - The gate reads detached pre-RoPE q/k, so its loss trains the gate only; the mask is built from
      the gate's probabilities under ``no_grad``, so the LM loss does not reach the gate.
    - The gate's graph and the loss are built in :func:`_gate_graph` (their own saved tensors, outside
      the layer's checkpoint); a gradient-checkpointing recompute (detected by :func:`_in_backward`)
      reuses its forward's mask (:func:`checkpoint_context_fn`) or rebuilds it (same inputs, same mask)
      and skips the ground-truth pass and the loss: the
      loss of the original forward stays in ``state.losses``, and its gradient, when taken in the layer
      (``state.gate_grad_scale``), was taken once.
    """
    cfg = state.config
    b, hq, t, _ = query.shape
    bs = cfg.gate.block_size
    recompute = _in_backward()
    mask = _replayed_mask(state) if recompute else None
    with _gate_graph(state):
        if mask is None:
            with torch.no_grad() if recompute else nullcontext(), record_function("seer.gate"):
                # eager also in the recompute (no grad there): the same logits, so the same mask
                logits = _gate_logits(module, state, pre, kwargs, b, t, impl="eager")
            with torch.no_grad(), record_function("seer.policy"):
                scores = logits.detach().softmax(-1)
                if cfg.mask_heads == "kv":
                    scores = group_scores(scores, key.shape[1])
                mask = mask_from_scores(scores, policy, t, bs)
        _record_mask(state, mask)
        if not recompute:
            with torch.no_grad(), record_function("seer.ground_truth"):
                _, _, target = attention_with_block_scores(
                    query.detach(), key.detach(), value.detach(), block_size=bs, scale=scale, impl=cfg.impl
                )
            with record_function("seer.gate_loss"):
                _record_gate_loss(module, state, logits, target, t)
            del logits  # with gate_grad_scale set, the last reference to the gate's graph
    with record_function("seer.attention"):
        out = block_sparse_attention(query, key, value, mask, scale=scale, impl=cfg.impl)
    if not recompute:
        state._stats[module.layer_idx] = {"path": "finetune"}
        if state.record_densities:
            density, token_density = mask.densities()
            state._stats[module.layer_idx].update(density=density, token_density=token_density)
    return out.transpose(1, 2).contiguous()


AttentionInterface.register(ATTN_NAME, seer_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def _capture_hook(state: SeerState, layer: int, which: str, _module, _inputs, output) -> None:
    """Forward hook (bound with ``functools.partial``) that hands a layer's pre-RoPE q or k to the state.

    A partial rather than a closure: ``copy.deepcopy`` of a prepared model copies a partial's
    arguments, so the copy's hooks feed the copy's state (a closure would keep feeding the original's).
    """
    if state.needs_pre_rope(which, output.shape[1]):  # output [B, T, ...]
        state._pending.setdefault(layer, {})[which] = output


def _cache_hook(state: SeerState, layer: int, _module, _args, kwargs) -> None:
    """Forward pre-hook of an attention module (``with_kwargs``): hands the layer's KV cache object to the state.

    transformers passes the cache to the attention module (``cache``; ``past_key_values`` or
    ``past_key_value`` in older versions), not to the attention function; the decode-gate key cache is
    kept per cache object (a new ``generate()`` starts fresh) and a StaticCache's first forward is
    told from a later chunk by its length.
    """
    for name in ("cache", "past_key_values", "past_key_value"):
        cache = kwargs.get(name)
        if cache is not None:
            state._pending.setdefault(layer, {})["cache"] = cache
            return


def apply_seer_attention(model: torch.nn.Module, config: SeerConfig | None = None) -> SeerState:
    """Attach gates to every attention layer of ``model`` and route attention through seerattn.

    Args:
        model: a transformers causal LM of a supported family (see ``FAMILIES``).
        config: gate, policy and mode; default :class:`SeerConfig`. ``config.gate`` attaches an
            :class:`~seerattn.gate.AttnGate` per layer (submodule ``seer_gate``), ``config.decode`` a
            :class:`~seerattn.gate.DecodeGate` per layer (submodule ``seer_decode_gate``).

    Returns:
        The model's :class:`SeerState` (also reachable with :func:`get_seer_state`).
    """
    config = SeerConfig() if config is None else config
    if getattr(model, "_seer_state", None) is not None:
        raise ValueError("seer attention is already attached to this model; call remove_seer_attention first")
    _, (q_name, k_name) = _family(model)
    base, layers = _decoder_layers(model)
    rotary = getattr(base, "rotary_emb", None)
    uses_rope = (config.gate is not None and config.gate.use_rope) or (
        config.decode is not None and config.decode.gate.use_rope
    )
    if rotary is None and uses_rope:
        raise ValueError(f"{type(model).__name__} has no shared rotary embedding (`.model.rotary_emb`)")
    config.policy.check_num_layers(len(layers))
    state = SeerState(config=config, _rotary=rotary, _original_impl=model.config._attn_implementation)
    param = next(model.parameters())
    # Every check and every gate first, the model changed last: an error leaves it as it was.
    gates, decode_gates = [], []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if getattr(attn, "layer_idx", i) != i:
            raise ValueError(f"layer {i} reports layer_idx={attn.layer_idx}; expected {i}")
        hq, hkv, d = _heads(attn)
        if config.gate is not None:
            gate_dim = config.gate.gate_dim or d
            if config.gate.use_rope and rotary is not None and gate_dim != d:
                raise ValueError(
                    f"gate_dim ({gate_dim}) must equal the head dim ({d}) when the gate uses the model's RoPE"
                )
            gates.append(AttnGate(hq, hkv, d, config.gate).to(device=param.device))
        if config.decode is not None:
            dgate = config.decode.gate
            if dgate.use_rope and (dgate.gate_dim or d) != d:
                raise ValueError(
                    f"decode gate_dim ({dgate.gate_dim}) must equal the head dim ({d}) when it uses the model's RoPE"
                )
            decode_gates.append(DecodeGate(hq, hkv, d, dgate).to(device=param.device))
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if gates:
            attn.seer_gate = gates[i]
        if decode_gates:
            attn.seer_decode_gate = decode_gates[i]
        attn._seer_state = state
        state._attn_modules.append(attn)
        hook = functools.partial(_capture_hook, state, i, "q")
        state._hooks.append(getattr(attn, q_name).register_forward_hook(hook))
        hook = functools.partial(_capture_hook, state, i, "k")
        state._hooks.append(getattr(attn, k_name).register_forward_hook(hook))
        hook = functools.partial(_cache_hook, state, i)
        state._hooks.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    model._seer_state = state
    model.set_attn_implementation(ATTN_NAME)
    gen = getattr(model, "generation_config", None)
    if config.decode is not None and gen is not None:
        # generate() compiles the decode steps of a StaticCache on CUDA; seer's step keeps host counters that
        # torch.compile would guard on (a recompile per step and per layer), so it runs eagerly and generate
        # is told not to compile (generate(..., disable_compile=False) still can: _decode_step stays eager)
        state._original_disable_compile = (gen.disable_compile,)
        gen.disable_compile = True
    if config.decode is not None:
        # an instance attribute (accelerate's device-map hooks set one too): what remove_seer_attention puts back
        state._original_forward = (model.__dict__.get("forward"),)
        model.forward = DecodeGraphs(model.forward, state)
    return state


def remove_seer_attention(model: torch.nn.Module) -> None:
    """Undo :func:`apply_seer_attention`: gates, hooks and state removed, attention restored."""
    state = get_seer_state(model)
    for h in state._hooks:
        h.remove()
    for attn in state._attn_modules:
        for name in ("seer_gate", "seer_decode_gate"):
            if hasattr(attn, name):
                delattr(attn, name)
        del attn._seer_state
    state._decode.clear()
    model.set_attn_implementation(state._original_impl)
    if state._original_disable_compile is not None:
        model.generation_config.disable_compile = state._original_disable_compile[0]
    if state._original_forward is not None:
        if state._original_forward[0] is None:
            del model.forward
        else:
            model.forward = state._original_forward[0]
    del model._seer_state


def gate_modules(model: torch.nn.Module) -> dict[int, AttnGate]:
    """``{layer_index: AttnGate}`` of a prepared model (empty without prefill gates)."""
    state = get_seer_state(model)
    if state.config.gate is None:
        return {}
    return {i: attn.seer_gate for i, attn in enumerate(state._attn_modules)}


def decode_gate_modules(model: torch.nn.Module) -> dict[int, DecodeGate]:
    """``{layer_index: DecodeGate}`` of a prepared model (empty without a decode section)."""
    state = get_seer_state(model)
    if state.config.decode is None:
        return {}
    return {i: attn.seer_decode_gate for i, attn in enumerate(state._attn_modules)}
