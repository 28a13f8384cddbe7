"""Seer against each peer on the same windows and prompts, from the committed ppl.json and passkey.json.

    python docs/experiments/peers/paired.py

PPL: ``PPL_seer / PPL_peer - 1`` (negative: seer better) with the eval's paired bootstrap over the 8 windows
(:func:`seerattn.eval.stats.paired_bootstrap_ppl`, 2000 resamples, seed 0), whole window and last 2048 tokens.
Passkey: per prompt (context x depth x sample: the same prompts for every method), right or wrong; the
prompts one method gets right and the other wrong, and the two-sided exact sign test (McNemar) on them.
No new measurement: everything is read from the records next to this file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from seerattn.eval.stats import paired_bootstrap_ppl

HERE = Path(__file__).resolve().parent
PEERS = ("oracle@0.1", "streaming@0.1", "vertical_slash@0.1", "xattention@0.1", "flexprefill@0.1")


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact p-value of ``b`` against ``c`` discordant pairs (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


def ppl_table() -> list[str]:
    rows = {r["label"]: r for r in json.loads((HERE / "ppl.json").read_text())["results"]}
    seer = rows["seer@0.1"]
    out = ["| seer vs | whole window: PPL ratio - 1 [95 %] | last 2048 tokens [95 %] |", "|---|---|---|"]
    for peer in PEERS:
        p = rows[peer]
        whole = paired_bootstrap_ppl(p["window_nll"], seer["window_nll"], seer["window_tokens"])
        tail = paired_bootstrap_ppl(p["window_nll_tail"], seer["window_nll_tail"], [seer["tail"]] * seer["windows"])
        cells = [f"{100 * d:+.2f} % [{100 * lo:+.2f}, {100 * hi:+.2f}]" for d, lo, hi in (whole, tail)]
        out.append(f"| {peer} | {cells[0]} | {cells[1]} |")
    return out


def passkey_table() -> list[str]:
    rows = {r["label"]: r for r in json.loads((HERE / "passkey.json").read_text())["results"]}

    def right(label: str, ctx: int) -> list[bool]:
        """[depths x samples] of context ``ctx``: the answer is the key (keys: [context][sample])."""
        keys = rows[label]["keys"][ctx]
        return [a == k for depth in rows[label]["answers"][ctx] for a, k in zip(depth, keys, strict=True)]

    contexts = rows["dense"]["contexts"]
    out = [
        "| seer vs | " + " | ".join(f"ctx {c}: seer only / peer only, p" for c in contexts) + " | all prompts |",
        "|---|" + "---|" * (len(contexts) + 1),
    ]
    for peer in PEERS:
        cells, pooled = [], [0, 0]
        for i in range(len(contexts)):
            s, p = right("seer@0.1", i), right(peer, i)
            b = sum(x and not y for x, y in zip(s, p, strict=True))
            c = sum(y and not x for x, y in zip(s, p, strict=True))
            cells.append(f"{b} / {c}, {mcnemar_p(b, c):.2g}")
            pooled = [pooled[0] + b, pooled[1] + c]
        cells.append(f"{pooled[0]} / {pooled[1]}, {mcnemar_p(*pooled):.2g}")
        out.append(f"| {peer} | " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    print("\n".join(ppl_table() + [""] + passkey_table()))
