"""Perplexity on held-out books at several contexts, for every method setting, with realised density.

Evaluation is *segmented*: each context ``L`` gets ``samples`` non-overlapping windows of ``L``
tokens (:func:`~seerattn.eval.data.segment_windows`, deterministic); every window is one forward
pass from scratch; all methods see the same windows. Two numbers per (setting, context):

- ``ppl``: every token of a window but the first, scored given the tokens before it in the window,
  ``exp(sum NLL / sum tokens)`` over the windows (the usual segmented PPL, as in PG19 tables);
- ``ppl_tail``: only the last ``tail`` tokens of each window. Windows of every context end at the
  same tokens (slots of ``max(contexts)`` tokens, window = the slot's end), so ``ppl_tail`` scores
  the *same targets* at every context: it falls with context iff the model uses the longer context,
  and it isolates the late rows, where a sparse method drops the most blocks.

Every row keeps its per-window NLL sums, so that a method's difference from dense gets a 95 % interval
from a paired bootstrap over the windows (:func:`~seerattn.eval.stats.paired_bootstrap_ppl`,
:func:`compare_with_dense`).

Contexts above the model's training length run with RoPE scaling (:func:`~seerattn.eval.model.scaled_rope`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from tqdm.auto import tqdm

from .data import TokenizedBooks, segment_windows
from .methods import Setting, configure, get_method
from .model import EvalModel, scaled_rope, token_nll
from .stats import BOOTSTRAP_RESAMPLES, CI_LEVEL, paired_bootstrap_ppl

__all__ = ["check_gates", "compare_with_dense", "evaluate_ppl"]

logger = logging.getLogger(__name__)


def check_gates(em: EvalModel, settings: Sequence[Setting], allow_untrained_gates: bool) -> None:
    """Refuse gate methods on a model whose gates were not loaded from an adapter."""
    needing = [s.label for s in settings if get_method(s.method).needs_gates]
    if needing and em.gates is None and not allow_untrained_gates:
        raise ValueError(
            f"settings {needing} use the AttnGates but no trained gates were loaded; pass an adapter folder "
            "(--gates) or allow_untrained_gates=True to measure the untrained prior"
        )


def _layer_densities(em: EvalModel) -> list[float]:
    return [em.state.stats[i].get("density", 1.0) for i in sorted(em.state.stats)]


def evaluate_ppl(
    em: EvalModel,
    books: TokenizedBooks,
    settings: Sequence[Setting],
    contexts: Sequence[int],
    samples: int,
    rope_scaling: str | None = "yarn",
    seed: int = 0,
    add_bos: bool = False,
    tail: int | None = None,
    allow_untrained_gates: bool = False,
    progress: bool = True,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> list[dict]:
    """Perplexity of every setting at every context.

    Args:
        em: the prepared model (:func:`~seerattn.eval.model.load_eval_model`).
        books: held-out tokenised books.
        settings: method settings (:func:`~seerattn.eval.methods.expand_settings`).
        contexts: window lengths in tokens.
        samples: windows per context.
        rope_scaling: RoPE scaling beyond the training length (``"yarn"``, ``"dynamic"``,
            ``"linear"``) or ``None`` (no scaling: positions beyond training are extrapolated).
        seed: seed of the ``random`` method.
        add_bos: start each window with the BOS token.
        tail: tokens at the end of each window scored for ``ppl_tail`` (default ``min(contexts) // 4``).
        resamples: bootstrap resamples of the intervals against dense (seeded with ``seed``).

    Returns:
        one dict per (context, setting): ``method``, ``budget_kind``, ``budget``, ``label``,
        ``context``, ``windows``, ``tokens``, ``nll`` (mean per token), ``ppl``, ``tail``,
        ``nll_tail``, ``ppl_tail``, ``density`` (mean realised block density over layers and
        windows; 1.0 for dense), ``density_per_layer``, ``rope_scaling`` (the parameters used, or
        ``None``), ``window_nll`` / ``window_nll_tail`` / ``window_tokens`` (per window: summed NLL of
        all scored tokens / of the tail, scored tokens), and the comparison with dense of
        :func:`compare_with_dense`.
    """
    check_gates(em, settings, allow_untrained_gates)
    span = max(contexts)
    tail = max(min(contexts) // 4, 1) if tail is None else tail
    if not 1 <= tail < min(contexts):
        raise ValueError(f"tail must be in [1, min(contexts) = {min(contexts)}), got {tail}")
    rows: list[dict] = []
    try:
        for context in contexts:
            windows = segment_windows(books, context, samples, add_bos=add_bos, span=span)
            with scaled_rope(em, context, rope_scaling) as rope:
                bar = tqdm(total=len(settings) * len(windows), desc=f"ppl @{context}", disable=not progress)
                for setting in settings:
                    configure(em.state, setting, seed)
                    w_nll, w_tail, w_tokens, dens = [], [], [], []
                    per_layer: list[list[float]] = []
                    for w in windows:
                        em.state.reset()
                        losses = token_nll(em.model, w)  # [context - 1]
                        w_nll.append(losses.sum().item())
                        w_tail.append(losses[-tail:].sum().item())
                        w_tokens.append(losses.numel())
                        dens.append(em.state.mean_density())
                        per_layer.append(_layer_densities(em))
                        bar.update(1)
                        bar.set_postfix(method=setting.label, ppl=f"{math.exp(sum(w_nll) / sum(w_tokens)):.4g}")
                    nll, tokens, n_tail = sum(w_nll), sum(w_tokens), tail * len(windows)
                    row = {
                        **setting.to_dict(),
                        "context": context,
                        "windows": len(windows),
                        "tokens": tokens,
                        "nll": nll / tokens,
                        "ppl": math.exp(nll / tokens),
                        "tail": tail,
                        "nll_tail": sum(w_tail) / n_tail,
                        "ppl_tail": math.exp(sum(w_tail) / n_tail),
                        "density": sum(dens) / len(dens),
                        "density_per_layer": [sum(c) / len(c) for c in zip(*per_layer, strict=True)],
                        "rope_scaling": rope,
                        "window_nll": w_nll,
                        "window_nll_tail": w_tail,
                        "window_tokens": w_tokens,
                    }
                    logger.info(
                        "ppl %s @%d: %.4f, last %d tokens %.4f (density %.3f)",
                        setting.label,
                        context,
                        row["ppl"],
                        tail,
                        row["ppl_tail"],
                        row["density"],
                    )
                    rows.append(row)
                bar.close()
    finally:
        em.state.set(mode="dense")
        em.state.mask_fn = None
    return compare_with_dense(rows, resamples=resamples, seed=seed)


def compare_with_dense(rows: Sequence[dict], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[dict]:
    """Each row plus its perplexity difference from the dense row of the same context, with 95 % intervals.

    Adds ``ppl_vs_dense`` and ``ppl_tail_vs_dense`` (``PPL / PPL_dense - 1``, e.g. 0.0116 for +1.16 %),
    ``ppl_vs_dense_ci`` and ``ppl_tail_vs_dense_ci`` (``[lo, hi]``, paired bootstrap over the windows:
    :func:`~seerattn.eval.stats.paired_bootstrap_ppl`) and ``interval`` (how they were computed). All are
    ``None`` for the dense rows themselves and where the run has no dense row at that context.

    rows: :func:`evaluate_ppl` rows with ``window_nll``, ``window_nll_tail`` and ``window_tokens``.
    """
    dense = {r["context"]: r for r in rows if r["method"] == "dense"}
    out = []
    for r in rows:
        ref = dense.get(r["context"])
        fields = dict.fromkeys(("ppl_vs_dense", "ppl_vs_dense_ci", "ppl_tail_vs_dense", "ppl_tail_vs_dense_ci"))
        fields["interval"] = None
        if ref is not None and ref is not r:
            if ref["window_tokens"] != r["window_tokens"] or ref["tail"] != r["tail"]:
                raise ValueError(
                    f"{r['label']} @{r['context']} was not scored on the dense row's windows; a paired comparison "
                    "needs the same windows and tail"
                )
            tail_tokens = [r["tail"]] * len(r["window_tokens"])
            whole = paired_bootstrap_ppl(ref["window_nll"], r["window_nll"], r["window_tokens"], resamples, seed)
            tail = paired_bootstrap_ppl(ref["window_nll_tail"], r["window_nll_tail"], tail_tokens, resamples, seed)
            fields.update(
                ppl_vs_dense=whole[0],
                ppl_vs_dense_ci=list(whole[1:]),
                ppl_tail_vs_dense=tail[0],
                ppl_tail_vs_dense_ci=list(tail[1:]),
                interval={
                    "kind": "paired bootstrap over windows, percentile",
                    "level": CI_LEVEL,
                    "resamples": resamples,
                    "seed": seed,
                },
            )
        out.append({**r, **fields})
    return out
