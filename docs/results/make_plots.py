"""The headline plots and the quality table of ``docs/results.md``, from committed JSON only (no measurement).

    python docs/results/make_plots.py [--out docs/results]

Writes ``speedup_vs_density.png`` (the block-sparse kernel against SDPA-FA2, cuDNN and FlexAttention, from
``benchmarks/results/h200_run2_a.json``) and ``ppl_vs_density.png`` (testbed perplexity relative to dense, from
``docs/experiments/testbed-methods/gates-windows/ppl.json`` and ``docs/experiments/block-32/ppl.json``), and
prints the quality table at 10 % with 95 % Wilson intervals computed from the recorded passkey counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from seerattn.eval.report import format_accuracy, markdown_table  # noqa: E402
from seerattn.eval.stats import wilson_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXP = ROOT / "docs" / "experiments"
KERNEL_JSON = ROOT / "benchmarks" / "results" / "h200_run2_a.json"
PPL_B64 = EXP / "testbed-methods" / "gates-windows" / "ppl.json"
PPL_B32 = EXP / "block-32" / "ppl.json"
PASSKEY_B64_4KEYS = EXP / "testbed-methods" / "gates-windows" / "passkey.json"
PASSKEY_B64_12KEYS = EXP / "reaching-10-percent" / "passkey-12" / "committed_gates.json"
PASSKEY_B32 = EXP / "block-32" / "passkey.json"
NAMES = {"seer": "seer gate", "oracle": "oracle", "streaming": "StreamingLLM", "vertical_slash": "vertical-slash"}


def _results(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data["results"] if "results" in data else data["rows"]


def plot_speedup(out: Path) -> Path:
    """Speed-up over SDPA-FA2 against the kept share of causal pairs (Llama-3.1-8B shape, 32k, block 64)."""
    rows = [r for r in _results(KERNEL_JSON) if r["t"] == 32768]
    fa2 = next(r["ms"] for r in rows if r["provider"] == "sdpa-fa2")
    cudnn = next(r["ms"] for r in rows if r["provider"] == "sdpa-cudnn")
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    curves = [
        ("ours, structured masks", "ours", "structured", "o-"),
        ("ours, random masks", "ours", "random", "s--"),
        ("FlexAttention, structured masks", "flex", "structured", "^-"),
    ]
    dense_ours = None
    for label, provider, mask, style in curves:
        pts = sorted(
            (r["pair_fraction"], fa2 / r["ms"])
            for r in rows
            if r["op"] == "sparse" and r.get("mask_heads") == "hkv" and r["provider"] == provider and r["mask"] == mask
        )
        ax.plot(*zip(*pts, strict=True), style, label=label)
        if provider == "ours" and mask == "structured":
            dense_ours = pts[-1]
    ax.axhline(fa2 / cudnn, color="grey", ls=":", label=f"SDPA-cuDNN dense ({fa2 / cudnn:.2f}x FA2)")
    xs = [0.045, 1.0]
    ax.plot(xs, [dense_ours[1] / x for x in xs], color="black", lw=0.8, ls="--", label="ours dense / kept share")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([0.05, 0.1, 0.3, 0.5, 1.0], ["0.05", "0.1", "0.3", "0.5", "1"])
    ax.set_yticks([1, 2, 5, 10, 20], ["1", "2", "5", "10", "20"])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("kept share of causal (query, key) pairs")
    ax.set_ylabel("speed-up over SDPA-FA2 (dense causal)")
    ax.set_title("Forward, Llama-3.1-8B shape, T = 32768, block 64, H200")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    path = out / "speedup_vs_density.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _row_allocation(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("allocation", "row") == "row"]


def plot_ppl(out: Path) -> Path:
    """PPL relative to dense against realised density, whole windows and the last 2048 tokens (testbed, 8k)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(NAMES)}
    for path, block, style in ((PPL_B64, 64, "o-"), (PPL_B32, 32, "s--")):
        rows = _row_allocation(_results(path))
        dense = next(r for r in rows if r["method"] == "dense")
        for method, name in NAMES.items():
            pts = sorted((r["density"], r["ppl"], r["ppl_tail"]) for r in rows if r["method"] == method)
            if not pts:
                continue
            x = [p[0] for p in pts]
            for ax, i, key in ((axes[0], 1, "ppl"), (axes[1], 2, "ppl_tail")):
                y = [100 * (p[i] / dense[key] - 1) for p in pts]
                ax.plot(x, y, style, color=colors[method], label=f"{name}, block {block}")
    for ax, what in zip(axes, ("whole 8k window", "last 2048 tokens of each window"), strict=True):
        ax.set_xscale("log")
        ax.set_xticks([0.1, 0.2, 0.5], ["0.1", "0.2", "0.5"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("realised block density")
        ax.set_ylabel("PPL vs dense (%)")
        ax.set_title(f"Testbed, {what}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3, which="both")
    axes[1].axhline(1.5, color="grey", ls=":", lw=0.8, label="1.5 % goal")
    axes[1].legend(fontsize=7)
    path = out / "ppl_vs_density.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _passkey(row: dict) -> str:
    """Mean accuracy over the grid with its Wilson interval from the recorded counts (accuracy x samples)."""
    correct = sum(round(a * row["samples"]) for cells in row["accuracy"] for a in cells)
    n = row["samples"] * len(row["depths"]) * len(row["contexts"])
    return f"{format_accuracy(correct / n, wilson_interval(correct, n))} ({n})"


def quality_table() -> str:
    """Markdown: every method at 10 % (row allocation) on the testbed, block 64 and block 32."""
    body = []
    for block, ppl_path, passkeys in (
        (64, PPL_B64, [PASSKEY_B64_12KEYS, PASSKEY_B64_4KEYS]),
        (32, PPL_B32, [PASSKEY_B32, PASSKEY_B64_4KEYS]),
    ):
        rows = _row_allocation(_results(ppl_path))
        dense = next(r for r in rows if r["method"] == "dense")
        pk: dict[str, dict] = {}
        for path in passkeys:  # the larger grid first; dense only ran on the 4-key grid
            for r in _row_allocation(_results(path)):
                if r["budget"] in (None, 0.1):
                    pk.setdefault(r["method"], r)
        for method in ("dense", *NAMES) if block == 64 else NAMES:  # dense does not depend on the block size
            r = next(r for r in rows if r["method"] == method and r["budget"] in (None, 0.1))
            whole = f"{r['ppl']:.3f}" + (
                "" if method == "dense" else f" ({100 * (r['ppl'] / dense['ppl'] - 1):+.1f} %)"
            )
            tail = f"{r['ppl_tail']:.3f}" + (
                "" if method == "dense" else f" ({100 * (r['ppl_tail'] / dense['ppl_tail'] - 1):+.2f} %)"
            )
            name = "dense" if method == "dense" else f"{NAMES[method]}, block {block}"
            body.append([name, f"{r['density']:.3f}", whole, tail, _passkey(pk[method])])
    header = ["method", "density", "PPL whole (vs dense)", "PPL last 2048 (vs dense)", "passkey [95 %] (prompts)"]
    return markdown_table(header, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="folder for the PNGs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (plot_speedup(args.out), plot_ppl(args.out)):
        print(f"wrote {path}")
    print(quality_table())


if __name__ == "__main__":
    main()
