"""Markdown writers for evaluation results (the JSON is a run record: :mod:`seerattn.record`).

A record's ``results`` is the list of rows the evaluation function returned (see
:func:`~seerattn.eval.ppl.evaluate_ppl`, :func:`~seerattn.eval.passkey.evaluate_passkey`,
:func:`~seerattn.eval.masks.block_maps`; for ``eval decode`` a mapping ``{"ppl": rows, "passkey": rows}`` of
:mod:`seerattn.eval.decode`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "decode_markdown",
    "format_accuracy",
    "format_rel_diff",
    "markdown_table",
    "masks_markdown",
    "needle_markdown",
    "passkey_markdown",
    "ppl_markdown",
    "write_text",
]


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    align = [":---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(cells[0]) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines) + "\n"


def format_rel_diff(diff: float, ci: Sequence[float]) -> str:
    """A relative difference and its interval in percent: ``+1.16 % [+0.80, +1.52]``."""
    return f"{100 * diff:+.2f} % [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def format_accuracy(acc: float, ci: Sequence[float], digits: int = 3) -> str:
    """An accuracy and its interval: ``0.983 [0.95, 0.99]``."""
    return f"{acc:.{digits}f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _labels(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["label"] for r in rows))


def _vs_dense(r: dict, key: str) -> str:
    """`` +1.16 % [+0.80, +1.52]`` when the row has a comparison with dense, else nothing."""
    return f" {format_rel_diff(r[key], r[key + '_ci'])}" if r.get(key) is not None else ""


def ppl_markdown(rows: Sequence[dict]) -> str:
    """Two tables, rows = method settings, columns = contexts: whole-window PPL (realised density), then
    the PPL of the last ``tail`` tokens of each window (the same targets at every context); each cell
    with the difference from dense and its 95 % interval where the run has dense
    (:func:`~seerattn.eval.ppl.compare_with_dense`)."""
    contexts = sorted({r["context"] for r in rows})
    by = {(r["label"], r["context"]): r for r in rows}
    header = ["method"] + [f"ctx {c}" for c in contexts]

    def table(cell) -> str:
        body = [
            [label] + [cell(by[(label, c)]) if (label, c) in by else "" for c in contexts] for label in _labels(rows)
        ]
        return markdown_table(header, body)

    scaled = [c for c in contexts if any(r["rope_scaling"] for r in rows if r["context"] == c)]
    note = f"\nRoPE scaling applied at contexts {scaled}.\n" if scaled else ""
    tail = rows[0]["tail"] if rows else 0
    compared = next((r["interval"] for r in rows if r.get("interval")), None)
    how = (
        f"\nDifferences from dense: PPL / PPL_dense - 1 with a {100 * compared['level']:g} % interval from a "
        f"paired bootstrap over the windows ({compared['resamples']} resamples, seed {compared['seed']}).\n"
        if compared
        else ""
    )
    return (
        "Perplexity (mean realised block density) on held-out books, segmented windows, all tokens.\n\n"
        + table(lambda r: f"{r['ppl']:.3f} ({r['density']:.3f}){_vs_dense(r, 'ppl_vs_dense')}")
        + f"\nPerplexity of the last {tail} tokens of each window (the same targets at every context).\n\n"
        + table(lambda r: f"{r['ppl_tail']:.3f}{_vs_dense(r, 'ppl_tail_vs_dense')}")
        + how
        + note
    )


def passkey_markdown(rows: Sequence[dict]) -> str:
    """Rows = method settings, columns = contexts (accuracy over depths), then mean and density; each
    accuracy with its 95 % Wilson interval."""
    if not rows:
        return "No passkey results.\n"
    contexts = rows[0]["contexts"]
    body = [
        [
            r["label"],
            *(
                format_accuracy(a, ci, 2)
                for a, ci in zip(r["accuracy_by_context"], r["accuracy_by_context_ci"], strict=True)
            ),
            format_accuracy(r["mean_accuracy"], r["mean_accuracy_ci"]),
            f"{r['density']:.3f}",
        ]
        for r in rows
    ]
    prompts = rows[0]["samples"] * len(rows[0]["depths"])
    return (
        f"Passkey accuracy (mean over depths {rows[0]['depths']}, {rows[0]['samples']} samples per cell, "
        f"scoring {rows[0]['scoring']}) with {100 * rows[0]['interval']['level']:g} % Wilson intervals over the "
        f"prompts pooled ({prompts} per context, {prompts * len(contexts)} for the mean).\n\n"
        + markdown_table(["method", *(f"ctx {c}" for c in contexts), "mean", "density"], body)
    )


def masks_markdown(rows: Sequence[dict]) -> str:
    """Per layer and setting: realised density, attention-mass recall, block recall vs the oracle."""
    body = []
    for r in rows:
        br = f"{r['block_recall']:.3f}" if "block_recall" in r else ""
        body.append([r["layer"], r["label"], f"{r['density']:.3f}", f"{r['mass_recall']:.3f}", br])
    return (
        "Block masks vs the ground truth (mass recall = ground-truth attention mass inside the kept blocks).\n\n"
        + markdown_table(["layer", "setting", "density", "mass recall", "block recall vs oracle"], body)
    )


def decode_markdown(ppl_rows: Sequence[dict], passkey_rows: Sequence[dict]) -> str:
    """Sparse decode at one budget (:mod:`seerattn.eval.decode`): one table, rows = methods, with the decode
    PPL of the windows' last tokens (difference from dense, 95 % interval; realised density of the decode
    rows) and the passkey accuracy by generation (Wilson interval; ratio to dense). Either list may be empty;
    both, when given, hold the same methods."""
    first = (list(ppl_rows) or list(passkey_rows))[0]
    header, columns = ["method"], []
    if ppl_rows:
        header += [f"PPL last {first['tail']}", "vs dense", "density"]
        by = {r["method"]: r for r in ppl_rows}
        columns.append(
            lambda m: [
                f"{by[m]['ppl_tail']:.4f}",
                _vs_dense(by[m], "ppl_tail_vs_dense").strip(),
                f"{by[m]['density']:.3f}",
            ]
        )
    if passkey_rows:
        header += ["passkey", "vs dense"]
        pk = {r["method"]: r for r in passkey_rows}
        columns.append(
            lambda m: [
                format_accuracy(pk[m]["mean_accuracy"], pk[m]["mean_accuracy_ci"]),
                "" if pk[m]["accuracy_vs_dense"] is None else f"{pk[m]['accuracy_vs_dense']:.3f}",
            ]
        )
    methods = list(dict.fromkeys(r["method"] for r in [*ppl_rows, *passkey_rows]))
    rows = [[m] + [cell for col in columns for cell in col(m)] for m in methods]
    budget, context = first["budget"], first["context"]
    title = f"Sparse decode at a budget of {budget} tokens ({budget / context:.3g} of the {context}-token context)\n\n"
    needle = needle_markdown(passkey_rows)
    return title + markdown_table(header, rows) + (f"\n{needle}" if needle else "")


def _share(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def needle_markdown(passkey_rows: Sequence[dict]) -> str:
    """Needle recall of the decode passkey (:func:`~seerattn.eval.decode.evaluate_decode_passkey`): per answer step
    (all prompts, those answered right, those answered wrong), per depth and per layer, for the rows that recorded
    it; empty when none did."""
    rows = [r for r in passkey_rows if r.get("needle_recall_by_step") is not None]
    if not rows:
        return ""
    steps = max(len(r["needle_recall_by_step"]) for r in rows)
    body = []
    for r in rows:
        total, right = sum(map(len, r["prompt_right"])), sum(map(sum, r["prompt_right"]))
        for group, n in (("all", total), ("right", right), ("wrong", total - right)):
            values = r["needle_recall_by_step" + ("" if group == "all" else f"_{group}")] or []
            cells = [_share(values[s] if s < len(values) else None) for s in range(steps)]
            body.append([r["label"], f"{group} ({n})", *cells])
    text = (
        "Needle recall: share of KV heads whose selected blocks hold a digit of the pass key (mean over layers and "
        "prompts). Step 0 is the last prompt token (predicting the first answer token), step s the s-th generated "
        "token.\n\n" + markdown_table(["method", "prompts (n)", *[f"step {s}" for s in range(steps)]], body)
    )
    depths = rows[0]["depths"]
    text += "\nBy depth (mean over prompts, steps and layers).\n\n" + markdown_table(
        ["method", *[f"depth {d:g}" for d in depths]],
        [[r["label"], *map(_share, r["needle_recall_by_depth"])] for r in rows],
    )
    layers = len(rows[0]["needle_recall_by_layer"])
    text += "\nBy layer (mean over prompts and steps).\n\n" + markdown_table(
        ["layer", *[r["label"] for r in rows]],
        [[str(i), *[_share(r["needle_recall_by_layer"][i]) for r in rows]] for i in range(layers)],
    )
    return text
