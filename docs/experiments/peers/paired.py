"""Seer against each peer on the same windows and prompts, from the committed ppl.json and passkey.json.

    python docs/experiments/peers/paired.py

PPL: ``PPL_seer / PPL_peer - 1`` (negative: seer better) with the eval's paired bootstrap over the windows
(:func:`seerattn.eval.stats.paired_bootstrap_ppl`, 2000 resamples, seed 0), whole window and last 2048 tokens,
at each equal density budget (0.2, 0.1) and for the native modes (``seer_top_p`` against the peers' threshold
modes: their realised densities differ, so the table prints them).
Passkey: per prompt (context x depth x sample: the same prompts for every method), right or wrong; the
prompts one method gets right and the other wrong, and the two-sided exact sign test (McNemar) on them; then
the prompts right per depth (of 12) at each context, the data behind the page's reading of where a method fails.
No new measurement: everything is read from the records next to this file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from seerattn.eval.stats import paired_bootstrap_ppl

HERE = Path(__file__).resolve().parent
DENSITIES = (0.2, 0.1)
PEERS = ("oracle", "streaming", "vertical_slash", "xattention", "flexprefill")
NATIVE = ("seer_top_p@0.9", ("xattention_top_p@0.9", "flexprefill_top_p@0.9"))


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact p-value of ``b`` against ``c`` discordant pairs (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


def ppl_table() -> list[str]:
    rows = {r["label"]: r for r in json.loads((HERE / "ppl.json").read_text())["results"]}
    pairs = [(f"seer@{d}", f"{p}@{d}") for d in DENSITIES for p in PEERS]
    pairs += [(NATIVE[0], peer) for peer in NATIVE[1]]
    out = [
        "| seer | vs | densities | whole window: PPL ratio - 1 [95 %] | last 2048 tokens [95 %] |",
        "|---|---|---|---|---|",
    ]
    for ours, peer in pairs:
        s, p = rows[ours], rows[peer]
        whole = paired_bootstrap_ppl(p["window_nll"], s["window_nll"], s["window_tokens"])
        tail = paired_bootstrap_ppl(p["window_nll_tail"], s["window_nll_tail"], [s["tail"]] * s["windows"])
        cells = [f"{100 * d:+.2f} % [{100 * lo:+.2f}, {100 * hi:+.2f}]" for d, lo, hi in (whole, tail)]
        out.append(f"| {ours} | {peer} | {s['density']:.3f} / {p['density']:.3f} | {cells[0]} | {cells[1]} |")
    return out


def _passkey_rows() -> dict:
    return {r["label"]: r for r in json.loads((HERE / "passkey.json").read_text())["results"]}


def _right(row: dict, ctx: int) -> list[bool]:
    """[depths x samples] of context index ``ctx``: the answer is the key (keys: [context][sample])."""
    keys = row["keys"][ctx]
    return [a == k for depth in row["answers"][ctx] for a, k in zip(depth, keys, strict=True)]


def passkey_table() -> list[str]:
    rows = _passkey_rows()
    contexts = rows["dense"]["contexts"]
    out = [
        "| seer vs | " + " | ".join(f"ctx {c}: seer only / peer only, p" for c in contexts) + " | all prompts |",
        "|---|" + "---|" * (len(contexts) + 1),
    ]
    for d in DENSITIES:
        for peer in (f"{p}@{d}" for p in PEERS):
            cells, pooled = [], [0, 0]
            for i in range(len(contexts)):
                s, p = _right(rows[f"seer@{d}"], i), _right(rows[peer], i)
                b = sum(x and not y for x, y in zip(s, p, strict=True))
                c = sum(y and not x for x, y in zip(s, p, strict=True))
                cells.append(f"{b} / {c}, {mcnemar_p(b, c):.2g}")
                pooled = [pooled[0] + b, pooled[1] + c]
            cells.append(f"{pooled[0]} / {pooled[1]}, {mcnemar_p(*pooled):.2g}")
            out.append(f"| {peer} | " + " | ".join(cells) + " |")
    return out


def passkey_depth_table() -> list[str]:
    """Prompts right (of ``samples``) per depth, one cell per context: ``d0 d.25 d.5 d.75 d1``."""
    rows = _passkey_rows()
    contexts, depths = rows["dense"]["contexts"], rows["dense"]["depths"]
    out = [
        "| method | " + " | ".join(f"ctx {c}: right per depth {depths}" for c in contexts) + " |",
        "|---|" + "---|" * len(contexts),
    ]
    for label, row in rows.items():
        cells = (" ".join(map(str, per_depth)) for per_depth in row["correct"])  # one [depths] list per context
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    print("\n".join(ppl_table() + [""] + passkey_table() + [""] + passkey_depth_table()))
