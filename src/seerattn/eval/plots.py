"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed).

- :func:`plot_ppl_vs_density`: one panel per context, perplexity against realised density, one line
  per method, dense as a dashed reference, 95 % paired-bootstrap error bars where the rows have them;
- :func:`plot_passkey_heatmaps`: one accuracy heatmap (depth x context) per method setting;
- :func:`plot_passkey_accuracy`: accuracy against context, one line per setting, 95 % Wilson error bars;
- :func:`plot_block_maps`: per (layer, head): ground truth, gate prediction and the masks;
- :func:`plot_distill_curves`: KL and attention-mass recall against step for distillation runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "DISTILL_CURVE_FIELDS",
    "plot_block_maps",
    "plot_distill_curves",
    "plot_passkey_accuracy",
    "plot_passkey_heatmaps",
    "plot_ppl_vs_density",
]


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _curve(row: dict) -> str:
    """One line per method and density allocation."""
    alloc = row["allocation"]
    return row["method"] if alloc == "row" else f"{row['method']}/{alloc}"


def _ppl_error(row: dict, dense_ppl: float) -> tuple[float, float]:
    """Distances below / above the row's PPL of its 95 % interval: ``PPL_dense * (1 + ci)`` (the interval is on
    the ratio to dense over the same windows); zero where the row has none."""
    if row.get("ppl_vs_dense_ci") is None:
        return 0.0, 0.0
    lo, hi = (dense_ppl * (1.0 + c) for c in row["ppl_vs_dense_ci"])
    return max(row["ppl"] - lo, 0.0), max(hi - row["ppl"], 0.0)


def plot_ppl_vs_density(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """rows: :func:`~seerattn.eval.ppl.evaluate_ppl` output. Writes one PNG with a panel per context; error
    bars are the 95 % intervals of the difference from dense (``ppl_vs_dense_ci``) where the rows have them."""
    contexts = sorted({r["context"] for r in rows})
    nr, nc = _grid(len(contexts), 3)
    fig, axes = plt.subplots(nr, nc, figsize=(5 * nc, 4 * nr), squeeze=False)
    methods = list(dict.fromkeys(_curve(r) for r in rows))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for ax, ctx in zip(axes.flat[: len(contexts)], contexts, strict=True):  # the grid may have spare panels
        at = [r for r in rows if r["context"] == ctx]
        dense_ppl = next((r["ppl"] for r in at if r["method"] == "dense"), None)
        for m in methods:
            pts = sorted(((r["density"], r["ppl"], r) for r in at if _curve(r) == m), key=lambda p: p[:2])
            if not pts:
                continue
            if m == "dense":
                ax.axhline(pts[0][1], color=colors[m], ls="--", lw=1)
                ax.plot([1.0], [pts[0][1]], "*", ms=10, color=colors[m], label=f"dense ({pts[0][1]:.4g})")
                continue
            x, y, rs = zip(*pts, strict=True)
            err = None if dense_ppl is None else np.array([_ppl_error(r, dense_ppl) for r in rs]).T  # [2, n]
            ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, color=colors[m], label=m)
        ax.set_xscale("log")
        lo = min([r["density"] for r in at] + [1.0])
        ticks = [v for v in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0) if lo * 0.8 <= v <= 1.0]
        ax.set_xlim(lo * 0.8, 1.15)
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("realised block density")
        ax.set_ylabel("perplexity")
        ax.set_title(f"context {ctx}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    for ax in axes.flat[len(contexts) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_passkey_heatmaps(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """rows: :func:`~seerattn.eval.passkey.evaluate_passkey` output. One heatmap per setting."""
    nr, nc = _grid(len(rows), 4)
    fig, axes = plt.subplots(nr, nc, figsize=(3.4 * nc + 1.2, 3.2 * nr), squeeze=False, layout="constrained")
    im = None
    for ax, r in zip(axes.flat[: len(rows)], rows, strict=True):
        acc = np.array(r["accuracy"], dtype=float).T  # [depth, context]
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(r["contexts"])), [str(c) for c in r["contexts"]], fontsize=7, rotation=45)
        ax.set_yticks(range(len(r["depths"])), [f"{d:g}" for d in r["depths"]], fontsize=7)
        ax.set_xlabel("context")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{r['label']} (density {r['density']:.2f})", fontsize=9)
        for (i, j), v in np.ndenumerate(acc):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    for ax in axes.flat[len(rows) :]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_passkey_accuracy(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """rows: :func:`~seerattn.eval.passkey.evaluate_passkey` output. Accuracy (pooled over depths) against
    context, one line per setting, with the 95 % Wilson interval (``accuracy_by_context_ci``) as error bars."""
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for i, r in enumerate(rows):
        acc = np.array(r["accuracy_by_context"])
        ci = np.array(r["accuracy_by_context_ci"]).T  # [2, contexts]
        err = np.clip(np.stack([acc - ci[0], ci[1] - acc]), 0.0, None)
        label = f"{r['label']} ({r['mean_accuracy']:.3f})"
        ax.errorbar(r["contexts"], acc, yerr=err, fmt="o-", capsize=3, color=plt.get_cmap("tab10")(i % 10), label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("passkey accuracy (95 % Wilson)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_block_maps(maps: dict, heads: Sequence[tuple[int, int]], path: str | Path, gate_label: str = "gate") -> Path:
    """Per (layer, head) row: ground truth and gate (log10 probability), then each setting's mask.

    maps: ``block_maps(...)["maps"]``; heads: (layer, query head) pairs to draw.
    """
    labels = list(next(iter(maps.values()))["masks"]) if maps else []
    ncols = 2 + len(labels)
    fig, axes = plt.subplots(len(heads), ncols, figsize=(2.4 * ncols, 2.4 * len(heads)), squeeze=False)
    for row, (layer, head) in enumerate(heads):
        m = maps[layer]
        causal = np.tril(np.ones(m["gt"].shape[-2:], dtype=bool))
        panels = [("ground truth", m["gt"][head].numpy()), (gate_label, m["gate"][head].numpy())]
        for i, (name, p) in enumerate(panels):
            logp = np.where(causal, np.log10(np.clip(p, 1e-6, None)), np.nan)
            axes[row, i].imshow(logp, cmap="viridis", vmin=-4, vmax=0, interpolation="nearest")
            axes[row, i].set_title(f"L{layer} H{head} {name}", fontsize=7)
        for j, label in enumerate(labels):
            kept = m["masks"][label][head].numpy().astype(float)
            axes[row, 2 + j].imshow(
                np.where(causal, kept, np.nan), cmap="Greys", vmin=0, vmax=1, interpolation="nearest"
            )
            axes[row, 2 + j].set_title(f"{label}\nkept {kept[causal].mean():.2f}", fontsize=7)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)


DISTILL_CURVE_FIELDS = ("step", "kl", "mass_recall")  # what a metrics.jsonl row needs for the curves


def plot_distill_curves(runs: dict[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """Two panels: KL (sum over layers, log scale) and mass recall at the metric density, per step.

    runs: ``{label: rows}``, rows being a run's ``metrics.jsonl`` entries (``step``, ``kl``, ``mass_recall``).
    """
    if not runs:
        raise ValueError("plot_distill_curves needs at least one run")
    for label, rows in runs.items():
        if not rows:
            raise ValueError(f"run {label!r} has no metrics rows")
        missing = sorted({k for r in rows for k in DISTILL_CURVE_FIELDS if k not in r})
        if missing:
            raise ValueError(f"run {label!r}: rows lack {missing}; each row needs {list(DISTILL_CURVE_FIELDS)}")
    fig, (ax_kl, ax_rec) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for label, rows in runs.items():
        steps = [r["step"] for r in rows]
        ax_kl.plot(steps, [r["kl"] for r in rows], label=label, lw=1)
        ax_rec.plot(steps, [r["mass_recall"] for r in rows], label=label, lw=1)
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("KL (sum over layers)")
    ax_rec.set_ylabel("mass recall (gate top blocks)")
    for ax in (ax_kl, ax_rec):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_rec.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
