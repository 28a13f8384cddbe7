"""Block maps of one window: ground truth, gate prediction and every method's mask, with recalls.

One dense forward with :attr:`SeerState.capture` records each layer's pre- and post-RoPE q/k; from
them, per requested layer:

- ``gt``: the SeerAttention ground truth (block max-pooled causal softmax, rows summing to 1), from
  :func:`~seerattn.ops.attention_with_block_scores`;
- ``gate``: the AttnGate's predicted block distribution (softmax of its logits);
- each setting's block mask, built exactly as the sparse forward would build it.

``mass_recall`` of a mask is the mean over (head, query-block row) of the ground-truth mass inside
the kept blocks (1.0 = nothing of the max-pooled attention map is dropped).

Shape legend: B batch (1 here), Hq query heads, T tokens, D head dim, NB blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..block_mask import BlockMask, mask_from_scores
from ..gate import gate_metrics
from ..hf import MaskRequest, gate_logits, gate_modules, group_scores
from ..ops import attention_with_block_scores
from .methods import Setting, build_mask, get_method
from .model import EvalModel, scaled_rope
from .ppl import check_gates

__all__ = ["block_maps", "mass_recall"]


def mass_recall(gt: torch.Tensor, mask: BlockMask) -> float:
    """Mean over (batch, head, row) of the ground-truth mass in the kept blocks; gt [B, H, NB, NB]."""
    kept = mask.expand_heads(gt.shape[1]).to_dense()
    return (gt.float() * kept).sum(-1).mean().item()


def _attn_module(em: EvalModel, layer: int):
    return getattr(em.model, "model", em.model).layers[layer].self_attn


@torch.no_grad()
def _window_maps(
    em: EvalModel, ids: torch.Tensor, settings: Sequence[Setting], layers: Sequence[int], seed: int
) -> tuple[list[dict], dict[int, dict]]:
    """Rows and maps of one window ids [1, T] (RoPE scaling already applied by the caller)."""
    state = em.state
    t = ids.shape[1]
    bs = em.block_size
    state.set(mode="dense")
    state.mask_fn = None
    state.reset()
    state.capture = True
    try:
        em.model(input_ids=ids, use_cache=False)
        captures = dict(state.captures)
    finally:
        state.capture = False
        state.reset()
    rows: list[dict] = []
    maps: dict[int, dict] = {}
    for layer in layers:
        q_pre, k_pre, q, k = captures[layer]
        b, hq, _, d = q.shape
        hkv = k.shape[1]
        q_pre = q_pre.reshape(b, t, hq, d).transpose(1, 2)
        k_pre = k_pre.reshape(b, t, hkv, d).transpose(1, 2)
        scale = getattr(_attn_module(em, layer), "scaling", d**-0.5)
        # block scores depend on q and k only; k stands in for v
        _, _, gt = attention_with_block_scores(q, k, k, block_size=bs, scale=scale, impl=state.config.impl)
        gate = gate_logits(em.model, layer, q_pre, k_pre).softmax(-1)
        oracle: dict[tuple[float, str], torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        for s in settings:
            m = get_method(s.method)
            if m.mode == "dense":
                continue
            if s.budget is None:
                raise ValueError(f"setting {s.label} has no {m.budget} value")
            if m.mode == "custom":
                mask = build_mask(s.method, MaskRequest(layer, q, k, scale, bs, t), s.budget, seed, s.allocation)
            else:  # as the sparse / oracle forward ranks: per query head, or per GQA group
                source = gt if m.mode == "oracle" else gate
                if state.config.mask_heads == "kv":
                    source = group_scores(source, hkv)
                mask = mask_from_scores(source, s.policy, t, bs)
            kept = mask.expand_heads(hq).to_dense()
            row = {"layer": layer, **s.to_dict(), "density": mask.density(), "mass_recall": mass_recall(gt, mask)}
            if m.budget == "density":  # against the oracle at the same density and allocation
                key = (s.budget, s.allocation)
                if key not in oracle:
                    oracle[key] = mask_from_scores(gt, s.policy, t, bs).to_dense()
                ref = oracle[key]
                row["block_recall"] = (ref & kept).sum().item() / max(ref.sum().item(), 1)
            rows.append(row)
            masks[s.label] = kept[0].cpu()
        for density in sorted({s.budget for s in settings if get_method(s.method).budget == "density"}):
            rows.append({"layer": layer, "label": f"gate_topk@{density:g}", **gate_metrics(gate, gt, density, t, bs)})
        maps[layer] = {"gt": gt[0].float().cpu(), "gate": gate[0].float().cpu(), "masks": masks}
    return rows, maps


_METRICS = ("density", "mass_recall", "block_recall")


def block_maps(
    em: EvalModel,
    windows: torch.Tensor | Sequence[torch.Tensor],
    settings: Sequence[Setting],
    layers: Sequence[int] | None = None,
    rope_scaling: str | None = "yarn",
    seed: int = 0,
    allow_untrained_gates: bool = False,
    progress: bool = False,
) -> dict:
    """Ground truth, gate and every setting's mask on one or more windows (int64 [T] each, equal T).

    Args:
        windows: one window or a list of them; metrics are averaged over windows, maps are the first's.
        layers: layers to analyse (default: all).

    Returns:
        ``{"context": T, "windows": n, "rows": [...], "maps": {layer: {"gt", "gate", "masks"}}}``.
        ``rows`` hold per (layer, setting) ``layer``, ``label``, ``method``, ``budget``, ``density``
        (realised), ``mass_recall`` and, for density settings, ``block_recall`` (share of the oracle's
        top blocks kept); per layer a ``gate_topk@d`` row (:func:`~seerattn.gate.gate_metrics`: the
        gate's own top-k, no forced blocks); and per setting a ``layer = "mean"`` row over layers.
        Maps are CPU tensors ``[Hq, NB, NB]`` (masks bool, expanded to query heads).
    """
    check_gates(em, settings, allow_untrained_gates)
    windows = [windows] if isinstance(windows, torch.Tensor) else list(windows)
    if not windows or len({w.numel() for w in windows}) != 1:
        raise ValueError("block_maps needs one or more windows of one length")
    n_layers = len(gate_modules(em.model))
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n_layers} layers")
    t = windows[0].numel()
    per_window: list[list[dict]] = []
    maps: dict[int, dict] = {}
    with scaled_rope(em, t, rope_scaling):
        for i, w in enumerate(tqdm(windows, desc=f"masks @{t}", disable=not progress)):
            rows, window_maps = _window_maps(em, w.view(1, -1).to(em.device), settings, layers, seed)
            per_window.append(rows)
            if i == 0:
                maps = window_maps
    rows = []
    for cells in zip(*per_window, strict=True):  # same (layer, label) order in every window
        row = dict(cells[0])
        for key in _METRICS:
            if key in row:
                row[key] = sum(c[key] for c in cells) / len(cells)
        rows.append(row)
    for label in dict.fromkeys(r["label"] for r in rows):
        same = [r for r in rows if r["label"] == label]
        mean = {k: v for k, v in same[0].items() if k not in _METRICS}
        mean["layer"] = "mean"
        for key in _METRICS:
            if key in same[0]:
                mean[key] = sum(r[key] for r in same) / len(same)
        rows.append(mean)
    return {"context": t, "windows": len(windows), "rows": rows, "maps": maps, "gates": em.gates}
