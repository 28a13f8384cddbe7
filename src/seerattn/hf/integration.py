"""Attach AttnGates to a Hugging Face causal LM and route its attention through seerattn.

How it works (no copied modeling files, nothing in ``transformers.models.*`` is patched):

1. one :class:`~seerattn.gate.AttnGate` is attached to every attention module as the submodule
   ``seer_gate`` (so ``model.to(...)``, ``state_dict`` and optimisers see it);
2. forward hooks on the layer's Q/K producers (``q_proj``/``k_proj``, or ``q_norm``/``k_norm``
   for families with q/k-norm) capture the *pre-RoPE* queries and keys exactly;
3. an attention function named ``"seer"`` is registered with transformers' ``AttentionInterface``
   (and ``sdpa``'s mask builder under the same name) and selected with
   ``model.set_attn_implementation("seer")``; it reads the per-model :class:`SeerState`.

Shape legend: B batch, Hq/Hkv heads, T tokens, D head dim, NB blocks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch.profiler import record_function
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ..block_mask import BlockMask, SparsityPolicy, mask_from_scores
from ..gate import AttnGate, GateConfig, gate_loss, gate_metrics
from ..ops import attention_with_block_scores, block_sparse_attention

__all__ = [
    "FAMILIES",
    "MaskRequest",
    "SeerConfig",
    "SeerState",
    "apply_seer_attention",
    "checkpoint_context_fn",
    "gate_logits",
    "get_seer_state",
    "group_scores",
    "remove_seer_attention",
]

logger = logging.getLogger(__name__)

ATTN_NAME = "seer"
MODES = ("dense", "sparse", "distill", "finetune", "oracle", "custom")
Mode = Literal["dense", "sparse", "distill", "finetune", "oracle", "custom"]

# model_type -> names of the submodules whose outputs are the pre-RoPE q and k of a layer.
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("q_proj", "k_proj"),
    "mistral": ("q_proj", "k_proj"),
    "qwen2": ("q_proj", "k_proj"),
    "qwen3": ("q_norm", "k_norm"),
}


@dataclass
class SeerConfig:
    """What :func:`apply_seer_attention` attaches and how the attention runs.

    Args:
        gate: the gate architecture.
        policy: gate probabilities -> block mask (``sparse`` and ``oracle`` modes).
        mode: ``"dense"`` (original attention, gate unused), ``"sparse"`` (gate -> mask ->
            block-sparse attention), ``"distill"`` (dense attention through the ground-truth kernel;
            gate loss and metrics recorded per layer), ``"finetune"`` (as ``sparse``, with gradients:
            the attention output is differentiable in q/k/v through the block-sparse op while the mask
            comes from the gate under ``no_grad``; the gate reads detached q/k and its loss against the
            ground truth is recorded per layer as in ``distill``), ``"oracle"`` (mask from the true ground truth:
            the upper bound), ``"custom"`` (mask from ``SeerState.mask_fn``: baselines).
        impl: op implementation (``None`` = Triton on CUDA, reference on CPU).
        gate_impl: how ``sparse`` and ``oracle`` modes compute the gate and the policy: ``"triton"``
            (fused gate kernels and the selection kernel), ``"eager"`` (the PyTorch gate and policies:
            the reference, and the "before" of benchmarks/prefill.py) or None (Triton on CUDA, eager
            on the CPU). Training modes (``distill``,
            ``finetune``) always run the eager gate, which has a backward and gives the recompute of a
            checkpointed layer the same mask.
        mask_heads: ``"q"`` one decision per query head; ``"kv"`` one per GQA group (gate
            probabilities averaged over the group), which lets the kernel load K/V once per group.
        skip_first_rows: fraction of leading query-block rows left out of the distillation loss.
        metric_density: density at which ``distill`` mode reports block and mass recall.
        base_model: id or path of the base model (recorded in saved adapters).
    """

    gate: GateConfig = field(default_factory=GateConfig)
    policy: SparsityPolicy = field(default_factory=SparsityPolicy)
    mode: Mode = "sparse"
    impl: str | None = None
    gate_impl: Literal["eager", "triton"] | None = None
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
        if not isinstance(self.gate, GateConfig) or not isinstance(self.policy, SparsityPolicy):
            raise TypeError("SeerConfig.gate must be a GateConfig and SeerConfig.policy a SparsityPolicy")


@dataclass
class MaskRequest:
    """What a ``custom``-mode mask function sees for one layer's prefill.

    q: [B, Hq, T, D] and k: [B, Hkv, T, D] post-RoPE (what attention uses); ``scale`` the softmax
    scale; the returned :class:`BlockMask` must cover ``seq_len`` tokens in blocks of ``block_size``.
    """

    layer_idx: int
    q: torch.Tensor
    k: torch.Tensor
    scale: float
    block_size: int
    seq_len: int


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
            densities scan every mask: a few percent of a prefill at 128k).
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
        capture: when True, ``captures[layer]`` keeps (q_pre, k_pre, q, k) of the last forward
            (for tests and debugging).
    """

    config: SeerConfig
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    metrics: dict[int, dict] = field(default_factory=dict)
    mask_fn: Callable[[MaskRequest], BlockMask] | None = None
    capture: bool = False
    captures: dict[int, tuple] = field(default_factory=dict)
    record_densities: bool = True
    gate_grad_scale: float | None = None
    # private: pre-RoPE tensors handed from the hooks to the attention function
    _pending: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _rotary: torch.nn.Module | None = field(default=None, repr=False)
    _hooks: list = field(default_factory=list, repr=False)
    _original_impl: str | None = field(default=None, repr=False)
    _attn_modules: list = field(default_factory=list, repr=False)
    _stats: dict[int, dict] = field(default_factory=dict, repr=False)
    # ("record" | "replay", masks of one checkpointed call) while one runs: see checkpoint_context_fn
    _masks: tuple[str, list] | None = field(default=None, repr=False)

    @property
    def stats(self) -> dict[int, dict]:
        """Per-layer statistics of the last forward (see the class docstring), as Python numbers."""
        for entry in self._stats.values():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    entry[key] = value.item()
        return self._stats

    def set(self, **changes) -> None:
        """Replace config fields (e.g. ``state.set(mode="dense")`` or ``policy=...``), validated."""
        config = replace(self.config, **changes)
        config.policy.check_num_layers(len(self._attn_modules))
        self.config = config

    def reset(self) -> None:
        """Forget the statistics, losses and metrics of earlier forwards."""
        self._stats.clear()
        self.losses.clear()
        self.metrics.clear()
        self.captures.clear()
        self._pending.clear()

    def total_gate_loss(self) -> torch.Tensor:
        """Sum over layers of the distillation losses of the last forward."""
        if not self.losses:
            raise RuntimeError("no gate loss recorded: run a forward in mode='distill' or 'finetune' first")
        return torch.stack(list(self.losses.values())).sum()

    def mean_density(self) -> float:
        """Mean over layers of the realised block density of the last forward (1.0 for dense paths)."""
        if not self.stats:
            raise RuntimeError("no statistics recorded: run a forward first")
        masked = ("sparse", "finetune", "oracle", "custom")
        if any(s["path"] in masked and "density" not in s for s in self.stats.values()):
            raise RuntimeError("densities were not recorded (SeerState.record_densities is off)")
        return sum(s.get("density", 1.0) for s in self.stats.values()) / len(self.stats)

    @property
    def needs_pre_rope(self) -> bool:
        return self.capture or self.config.mode in ("sparse", "distill", "finetune")


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


def _window_rotary(state: SeerState, like: torch.Tensor, position_ids: torch.Tensor | None, step: int, t: int):
    """cos, sin [B, ceil(T / step), D] of the model's own RoPE at the first position of each ``step``-token window."""
    if position_ids is None:
        position_ids = torch.arange(t, device=like.device).unsqueeze(0).expand(like.shape[0], t)
    starts = position_ids[:, ::step]
    return state._rotary(like, starts)


def _check_causal_only(attention_mask, b: int, t: int) -> None:
    """The masked paths compute causal attention; refuse padding or other custom masks."""
    if attention_mask is None:
        return
    am = attention_mask
    if am.dtype != torch.bool:
        am = am == 0  # additive float mask: 0 = attend
    causal = torch.ones(t, t, dtype=torch.bool, device=am.device).tril()
    if am.dim() != 4 or am.shape[-2:] != (t, t) or not torch.equal(am, causal.expand_as(am)):
        raise ValueError(
            "seer sparse/distill/oracle attention supports causal prefill without padding only; got an "
            "attention mask with padding or a custom pattern. Pass unpadded sequences (batch of equal "
            "lengths) or use mode='dense'. (generate() without an attention_mask infers padding wherever the "
            "prompt contains pad_token_id; pass attention_mask=torch.ones_like(input_ids) for an unpadded prompt)"
        )


def _gate_forward(gate: AttnGate, state: SeerState, q_pre, k_pre, position_ids, impl=None) -> torch.Tensor:
    """Gate logits from pre-RoPE q [B, Hq, T, D], k [B, Hkv, T, D] (the gate's RoPE at window starts)."""
    t = q_pre.shape[2]
    cos = sin = None
    if gate.config.use_rope:
        cos, sin = _window_rotary(state, q_pre, position_ids, gate.config.q_step, t)
    return gate(q_pre.detach(), k_pre.detach(), cos, sin, impl=impl)


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
    Decode and chunked-prefill steps (Tq != Tk) and mode ``dense`` run transformers' SDPA path.
    """
    state: SeerState | None = getattr(module, "_seer_state", None)
    if state is None:
        raise RuntimeError(
            "the 'seer' attention implementation was called on a module without a seer gate; use "
            "seerattn.hf.apply_seer_attention(model, config) rather than setting attn_implementation by hand"
        )
    layer = module.layer_idx
    pre = state._pending.pop(layer, None)
    cfg = state.config
    b, hq, tq, d = query.shape
    tk = key.shape[2]
    if state.capture and pre is not None:
        state.captures[layer] = (pre["q"], pre["k"], query, key)
    if cfg.mode == "dense" or tq != tk:
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
    _check_causal_only(attention_mask, b, tq)
    scale = scaling if scaling is not None else d**-0.5
    bs = cfg.gate.block_size
    hkv = key.shape[1]

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
    policy_impl = {None: None, "eager": "reference", "triton": "triton"}[cfg.gate_impl]
    # a checkpoint recompute replays the mask of its forward (checkpoint_context_fn), else it is built
    mask = _replayed_mask(state) if _in_backward() else None
    if mask is None:
        if cfg.mode == "custom":
            if state.mask_fn is None:
                raise RuntimeError("mode='custom' needs SeerState.mask_fn (a MaskRequest -> BlockMask function)")
            mask = state.mask_fn(MaskRequest(layer, query, key, scale, bs, tq))
        else:
            if cfg.mode == "oracle":
                with torch.no_grad():
                    _, _, scores = attention_with_block_scores(
                        query, key, value, block_size=bs, scale=scale, impl=cfg.impl
                    )
            else:
                if pre is None:
                    raise RuntimeError(f"layer {layer}: pre-RoPE q/k were not captured (hooks missing?)")
                with torch.no_grad(), record_function("seer.gate"):
                    scores = _gate_logits(module, state, pre, kwargs, b, tq, cfg.gate_impl).softmax(-1)
            with record_function("seer.policy"):
                if cfg.mask_heads == "kv":
                    scores = group_scores(scores, hkv)
                mask = mask_from_scores(scores, policy, tq, bs, impl=policy_impl)
        _record_mask(state, mask)
    # named ranges for torch.profiler (benchmarks/prefill.py --profile); free when no profiler runs
    with record_function("seer.attention"):
        out = block_sparse_attention(query, key, value, mask, scale=scale, impl=cfg.impl)
    state._stats[layer] = {"path": cfg.mode}
    if state.record_densities:
        with record_function("seer.stats"):
            density, token_density = mask.densities()
        state._stats[layer].update(density=density, token_density=token_density)
    return out.transpose(1, 2).contiguous(), None


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
        return _mask_context(state, "record", masks), _mask_context(state, "replay", masks)

    return context_fn


@contextmanager
def _mask_context(state: SeerState, how: str, masks: list):
    previous = state._masks
    state._masks = (how, masks if how == "record" else list(reversed(masks)))
    try:
        yield
    finally:
        state._masks = previous


def _record_mask(state: SeerState, mask: BlockMask) -> None:
    """In the forward of a checkpointed call (:func:`checkpoint_context_fn`): keep ``mask`` for its recompute."""
    if state._masks is not None and state._masks[0] == "record":
        state._masks[1].append(mask)


def _replayed_mask(state: SeerState) -> BlockMask | None:
    """In a recompute under :func:`checkpoint_context_fn`: the next mask its forward recorded; else None
    (checkpointing enabled without it: the caller rebuilds the mask from the same inputs)."""
    if state._masks is None or state._masks[0] != "replay":
        return None
    if not state._masks[1]:
        raise RuntimeError(
            "a checkpoint recompute asked for more block masks than its forward recorded; the layer's "
            "forward must build the same masks in its recompute (same mode and inputs)"
        )
    return state._masks[1].pop()


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
      reuses its forward's mask (:func:`checkpoint_context_fn`) or rebuilds it (same inputs, same mask) and skips the ground-truth pass and the loss: the
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
    if state.needs_pre_rope:
        state._pending.setdefault(layer, {})[which] = output


def apply_seer_attention(model: torch.nn.Module, config: SeerConfig | None = None) -> SeerState:
    """Attach a gate to every attention layer of ``model`` and route attention through seerattn.

    Args:
        model: a transformers causal LM of a supported family (see ``FAMILIES``).
        config: gate, policy and mode; default :class:`SeerConfig`.

    Returns:
        The model's :class:`SeerState` (also reachable with :func:`get_seer_state`).
    """
    config = SeerConfig() if config is None else config
    if getattr(model, "_seer_state", None) is not None:
        raise ValueError("seer attention is already attached to this model; call remove_seer_attention first")
    _, (q_name, k_name) = _family(model)
    base, layers = _decoder_layers(model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None and config.gate.use_rope:
        raise ValueError(f"{type(model).__name__} has no shared rotary embedding (`.model.rotary_emb`)")
    config.policy.check_num_layers(len(layers))
    state = SeerState(config=config, _rotary=rotary, _original_impl=model.config._attn_implementation)
    param = next(model.parameters())
    # Every check and every gate first, the model changed last: an error leaves it as it was.
    gates = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if getattr(attn, "layer_idx", i) != i:
            raise ValueError(f"layer {i} reports layer_idx={attn.layer_idx}; expected {i}")
        hq, hkv, d = _heads(attn)
        gate_dim = config.gate.gate_dim or d
        if config.gate.use_rope and rotary is not None and gate_dim != d:
            raise ValueError(f"gate_dim ({gate_dim}) must equal the head dim ({d}) when the gate uses the model's RoPE")
        gates.append(AttnGate(hq, hkv, d, config.gate).to(device=param.device))
    for i, (layer, gate) in enumerate(zip(layers, gates, strict=True)):
        attn = layer.self_attn
        attn.seer_gate = gate
        attn._seer_state = state
        state._attn_modules.append(attn)
        hook = functools.partial(_capture_hook, state, i, "q")
        state._hooks.append(getattr(attn, q_name).register_forward_hook(hook))
        hook = functools.partial(_capture_hook, state, i, "k")
        state._hooks.append(getattr(attn, k_name).register_forward_hook(hook))
    model._seer_state = state
    model.set_attn_implementation(ATTN_NAME)
    return state


def remove_seer_attention(model: torch.nn.Module) -> None:
    """Undo :func:`apply_seer_attention`: gates, hooks and state removed, attention restored."""
    state = get_seer_state(model)
    for h in state._hooks:
        h.remove()
    for attn in state._attn_modules:
        del attn.seer_gate
        del attn._seer_state
    model.set_attn_implementation(state._original_impl)
    del model._seer_state


def gate_modules(model: torch.nn.Module) -> dict[int, AttnGate]:
    """``{layer_index: AttnGate}`` of a prepared model."""
    state = get_seer_state(model)
    return {i: attn.seer_gate for i, attn in enumerate(state._attn_modules)}
