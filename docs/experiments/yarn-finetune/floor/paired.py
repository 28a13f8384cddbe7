"""Paired-bootstrap intervals of the floor-allocation runs (README table) from records.json.

python3 docs/experiments/yarn-finetune/floor/paired.py      # from the repository root, seerattn installed
"""

import json
from pathlib import Path

from seerattn.eval.stats import paired_bootstrap_ppl

runs = json.loads((Path(__file__).parent / "records.json").read_text())["runs"]


def ppl_row(run: str, label: str, context: int) -> dict:
    return next(r for r in runs[run]["ppl"] if r["label"] == label and r["context"] == context)


def diff(base: dict, other: dict) -> str:
    whole = paired_bootstrap_ppl(base["window_nll"], other["window_nll"], base["window_tokens"])
    tail = paired_bootstrap_ppl(
        base["window_nll_tail"], other["window_nll_tail"], [base["tail"]] * len(base["window_tokens"])
    )
    return "whole {:+.2f} % [{:+.2f}, {:+.2f}], tail {:+.2f} % [{:+.2f}, {:+.2f}]".format(
        *(100 * v for v in whole + tail)
    )


for context in (32768, 8192):
    dense = ppl_row("a", "dense", context)
    print(f"--- context {context}: against (a) dense, PPL {dense['ppl']:.3f} / tail {dense['ppl_tail']:.3f}")
    for run, rec in runs.items():
        pk = {r["label"]: r for r in rec["passkey"]}
        for r in rec["ppl"]:
            if r["context"] != context or (run == "a" and r["label"] == "dense"):
                continue
            p = pk.get(r["label"])
            acc = (
                f"; passkey {p['mean_accuracy']:.3f} [{p['mean_accuracy_ci'][0]:.2f}, {p['mean_accuracy_ci'][1]:.2f}]"
                if p
                else ""
            )
            print(
                f"{run:9s} {r['label']:26s} PPL {r['ppl']:.3f} tail {r['ppl_tail']:.3f} density {r['density']:.3f}: "
                f"{diff(dense, r)}{acc}"
            )
    c = ppl_row("c", "seer@0.1/floor", context)
    for run in ("b90floor", "b90", "te4"):
        print(f"{run} vs (c), both seer@0.1/floor: {diff(c, ppl_row(run, 'seer@0.1/floor', context))}")
