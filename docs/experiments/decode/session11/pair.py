"""Paired comparisons of this folder's decode-PPL records (per-window tail NLL, the windows are the same in every
run: seed 0, the same books): PPL ratio of a method to seer with its own-logit ranking and the committed gates, with
a 95 % bootstrap interval over windows (10 000 resamples). `python docs/experiments/decode/session11/pair.py`"""

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def rows(path):
    return {r["method"]: r for r in json.loads((HERE / path).read_text())["results"]["ppl"]}


def tail_nll(r):  # per-window summed NLL of the tail tokens, and the tail tokens per window (the same in every window)
    nll = np.asarray(r["window_nll_tail"], dtype=np.float64)
    tokens = nll.sum() / r["nll_tail"] / len(nll)
    return nll, np.full(len(nll), round(tokens), dtype=np.float64)


def ratio(a, b, rng):
    (na, ta), (nb, tb) = tail_nll(a), tail_nll(b)
    assert np.array_equal(ta, tb)
    point = np.exp(na.sum() / ta.sum() - nb.sum() / tb.sum()) - 1
    idx = rng.integers(0, len(na), size=(10_000, len(na)))
    boot = np.exp(na[idx].sum(1) / ta[idx].sum(1) - nb[idx].sum(1) / tb[idx].sum(1)) - 1
    return point, np.quantile(boot, [0.025, 0.975])


base = rows("neighbors/none/decode.json")
others = {
    "seer, neighbors='next'": rows("neighbors/next/decode.json")["seer"],
    "seer, neighbors='both'": rows("neighbors/both/decode.json")["seer"],
    "seer, gates distilled on 50 books": rows("retrain50/decode.json")["seer"],
    "seer, gates distilled on the target at temperature 0.5 (session 12)": rows("../session12/sharpen/decode.json")[
        "seer"
    ],
    "Quest-style": base["quest"],
    "StreamingLLM-style": base["streaming"],
}
rng = np.random.default_rng(0)
print("| method | PPL last 2048 | vs seer (own logit, committed gates), paired [95 %] |")
print("|---|---|---|")
print(f"| seer (own logit, committed gates) | {base['seer']['ppl_tail']:.3f} | |")
for name, r in others.items():
    p, (lo, hi) = ratio(r, base["seer"], rng)
    print(f"| {name} | {r['ppl_tail']:.3f} | {100 * p:+.2f} % [{100 * lo:+.2f}, {100 * hi:+.2f}] |")
