"""The decode page's tables, from the committed records next to this file (no new measurement).

    python docs/experiments/decode/tables.py      # from the repository root, seerattn installed

- Kernel: per (batch, context, budget) the ms of each provider eager and replayed from a CUDA graph, the
  speed-ups over SDPA and FlexAttention in the same run, and the K/V bandwidth of the graph replay
  (bytes each provider must read / ms_graph: SDPA the whole cache, the others the kept blocks);
  ``bench_decode.json`` (4k budget) and ``bench_decode_budgets.json`` (batch 16, 32k, 2k and 8k).
- The whole seer step (gate + selection + kernel) against the kernel alone: the share of the step that is
  not the kernel.
- The same for ``full-recipe/``: the kernel at batch 16 / 32 / 64 (``decode_b64.json``) and the quality of the
  decode gates trained with the recipe's 400 steps (``eval_decode.json``).
- Quality: seer against Quest- and StreamingLLM-style decode on the same windows (PPL of the last 2048
  tokens and of whole windows, ``PPL_seer / PPL_other - 1`` with the eval's paired bootstrap over the windows,
  :func:`seerattn.eval.stats.paired_bootstrap_ppl`, 2000 resamples, seed 0; negative: seer better) and on
  the same pass-key prompts (the prompts one gets right and the other wrong, exact two-sided sign test).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from seerattn.eval.stats import paired_bootstrap_ppl

HERE = Path(__file__).resolve().parent
PROVIDERS = ("sdpa", "ours", "seer", "flex")


def sign_test_p(b: int, c: int) -> float:
    """Two-sided exact p-value of ``b`` against ``c`` discordant prompts (binomial, p = 1/2; McNemar)."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def kernel_table(names=("bench_decode.json", "bench_decode_budgets.json")) -> list[str]:
    rows = []
    for name in names:
        rows += json.loads((HERE / name).read_text())["results"]
    out = [
        "| batch | context | budget | provider | ms eager | ms graph | x SDPA eager | x SDPA graph "
        "| x Flex eager | x Flex graph | GB/s graph | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # A flex row with an error holds no compiled-Flex time (at batch 16 / 128k: Flex's eager fallback after dynamo's
    # recompile limit, then a failed graph capture): the other rows' ratios to it are not comparisons.
    failed = {(r["batch"], r["context"], r["budget"]) for r in rows if r["provider"] == "flex" and "error" in r}
    for r in rows:  # the budgets run measured SDPA at batch 16 / 32k again: its own row, its own ratios
        ms, graph = r.get("ms"), r.get("ms_graph")
        gbs = r["kv_bytes"] / graph / 1e6 if graph else None
        note = r.get("error", "")[:60] if "error" in r else ""
        if (r["batch"], r["context"], r.get("budget")) in failed:
            r = {k: v for k, v in r.items() if k not in ("speedup_vs_flex", "speedup_vs_flex_graph")}
            note = note or "flex failed: no ratio"
        out.append(
            f"| {r['batch']} | {r['context']} | {r.get('budget') or '-'} | {r['provider']} | {_fmt(ms, '.4f')} "
            f"| {_fmt(graph, '.4f')} | {_fmt(r.get('speedup_vs_sdpa'), '.2f')} "
            f"| {_fmt(r.get('speedup_vs_sdpa_graph'), '.2f')} | {_fmt(r.get('speedup_vs_flex'), '.2f')} "
            f"| {_fmt(r.get('speedup_vs_flex_graph'), '.2f')} | {_fmt(gbs, '.0f')} | {note} |"
        )
    return out


def step_share_table(name: str = "bench_decode.json") -> list[str]:
    """Gate + selection = the seer step minus the kernel alone (same selection size, same run)."""
    rows = json.loads((HERE / name).read_text())["results"]
    by = {(r["batch"], r["context"], r["provider"]): r for r in rows}
    out = [
        "| batch | context | kernel ms (graph) | seer step ms (graph) | gate + selection ms (graph) | share of step "
        "| seer step eager ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for (b, ctx, prov), seer in by.items():
        if prov != "seer":
            continue
        ours = by[(b, ctx, "ours")]
        extra = seer["ms_graph"] - ours["ms_graph"]
        out.append(
            f"| {b} | {ctx} | {ours['ms_graph']:.4f} | {seer['ms_graph']:.4f} | {extra:.4f} "
            f"| {extra / seer['ms_graph']:.0%} | {seer['ms']:.3f} |"
        )
    return out


def quality_tables(name: str = "eval_decode.json") -> list[str]:
    res = json.loads((HERE / name).read_text())["results"]
    ppl = {r["method"]: r for r in res["ppl"]}
    out = [
        "| seer vs | PPL last 2048: ratio - 1 [95 %] | whole window [95 %] |",
        "|---|---|---|",
    ]
    s = ppl["seer"]
    for other in ("quest", "streaming"):
        o = ppl[other]
        tail = paired_bootstrap_ppl(o["window_nll_tail"], s["window_nll_tail"], [s["tail"]] * s["windows"])
        whole = paired_bootstrap_ppl(o["window_nll"], s["window_nll"], s["window_tokens"])
        cells = [f"{100 * d:+.2f} % [{100 * lo:+.2f}, {100 * hi:+.2f}]" for d, lo, hi in (tail, whole)]
        out.append(f"| {other} | {cells[0]} | {cells[1]} |")
    pk = {r["method"]: r for r in res["passkey"]}
    keys = pk["dense"]["keys"]

    def right(method: str) -> list[bool]:
        return [a == k for depth in pk[method]["answers"] for a, k in zip(depth, keys, strict=True)]

    out += ["", "| seer vs | prompts seer only / other only | sign test p |", "|---|---|---|"]
    for other in ("dense", "quest", "streaming"):
        a, o = right("seer"), right(other)
        b = sum(x and not y for x, y in zip(a, o, strict=True))
        c = sum(y and not x for x, y in zip(a, o, strict=True))
        out.append(f"| {other} | {b} / {c} | {sign_test_p(b, c):.2g} |")
    depths = pk["dense"]["depths"]
    out += ["", f"| method | prompts right per depth {depths} (of {pk['dense']['samples']}) |", "|---|---|"]
    out += [f"| {m} | {' '.join(map(str, r['correct']))} |" for m, r in pk.items()]
    return out


if __name__ == "__main__":
    first = kernel_table() + [""] + step_share_table() + [""] + quality_tables()
    full = ["# full-recipe/ (tree of 12b6520)", ""] + kernel_table(("full-recipe/decode_b64.json",)) + [""]
    full += step_share_table("full-recipe/decode_b64.json") + [""] + quality_tables("full-recipe/eval_decode.json")
    print("\n".join(first + ["", *full]))
