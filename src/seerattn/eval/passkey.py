"""Passkey retrieval: a random number hidden in book text at a given depth, asked for at the end.

Prompt (token ids, exactly ``context`` long)::

    [BOS] INTRO filler[:a] NEEDLE filler[a:] QUESTION

with ``NEEDLE = "The pass key is 12345. Remember it. 12345 is the pass key."`` and ``QUESTION = "What
is the pass key? The pass key is"`` (:class:`PasskeyTemplate`). The filler is held-out book text from
a deterministic per-sample book and offset; the needle goes at the sentence end nearest to
``depth * len(filler)`` (0 = start, 1 = end). A sample is correct when the first run of digits the
model produces after the prompt equals the key exactly; by default (``scoring="forced"``) the answer
``" " + key`` is appended and predicted, position by position, in the same forward through the method
under test (see :func:`evaluate_passkey` for ``"generate"``: sparse prefill, dense decode).
"""

from __future__ import annotations

import logging
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import TokenizedBooks
from .methods import Setting, configure
from .model import EvalModel, greedy_continue, scaled_rope
from .ppl import check_gates
from .stats import CI_LEVEL, wilson_interval

__all__ = [
    "SCORINGS",
    "PasskeyPrompt",
    "PasskeyTemplate",
    "evaluate_passkey",
    "forced_answer",
    "key_token_positions",
    "make_passkey_prompt",
    "sentence_ends",
]

logger = logging.getLogger(__name__)

SCORINGS = ("forced", "generate")


@dataclass(frozen=True)
class PasskeyTemplate:
    """The texts around the key: the classic pass-key prompt of the long-context literature.

    Match them to what the model was trained on, if anything (the testbed's data uses these). Texts
    are tokenised on their own and concatenated as token ids, so keep their leading spaces.
    """

    intro: str = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there."
    )
    needle: str = " The pass key is {key}. Remember it. {key} is the pass key."
    question: str = " What is the pass key? The pass key is"
    digits: int = 5


@dataclass(frozen=True)
class PasskeyPrompt:
    """ids: int64 [context - len(answer)] the prompt; answer: int64 [A] the tokens of ``" " + key``;
    ``needle_start`` token index of the needle; ``key`` the digits."""

    ids: torch.Tensor
    answer: torch.Tensor
    key: str
    needle_start: int
    depth: float


def sentence_ends(tokenizer, filler: torch.Tensor) -> torch.Tensor:
    """int64 [M]: positions ``i`` of ``filler`` (int64 [N]) right after a token ending a sentence or line."""
    texts = tokenizer.batch_decode([[t] for t in filler.tolist()])
    ends = [i + 1 for i, s in enumerate(texts) if s.rstrip(" \"'”’)").endswith((".", "!", "?")) or "\n" in s]
    return torch.tensor([0, *ends], dtype=torch.long)


def make_passkey_prompt(
    tokenizer,
    filler: torch.Tensor,
    context: int,
    depth: float,
    key: str,
    template: PasskeyTemplate = PasskeyTemplate(),
    add_bos: bool = True,
    boundaries: torch.Tensor | None = None,
) -> PasskeyPrompt:
    """Build one prompt; prompt plus answer are exactly ``context`` tokens.

    Args:
        filler: int64 [N] book tokens, N >= what is needed.
        depth: needle position as a fraction of the filler (0 = start, 1 = end).
        boundaries: allowed needle positions in the filler (e.g. :func:`sentence_ends`); the one
            nearest to ``depth`` is used. ``None``: exactly ``round(depth * n_fill)``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    intro, needle, question = enc(template.intro), enc(template.needle.format(key=key)), enc(template.question)
    answer = enc(" " + key)
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    fixed = len(bos) + len(intro) + len(needle) + len(question) + len(answer)
    n_fill = context - fixed
    if n_fill < 0:
        raise ValueError(f"context {context} is shorter than the intro, needle, question and answer ({fixed} tokens)")
    if filler.numel() < n_fill:
        raise ValueError(f"need {n_fill} filler tokens, got {filler.numel()}")
    a = round(depth * n_fill)
    if boundaries is not None:
        ok = boundaries[boundaries <= n_fill]
        if ok.numel():
            a = int(ok[(ok - a).abs().argmin()])
    fill = filler[:n_fill].tolist()
    ids = bos + intro + fill[:a] + needle + fill[a:] + question
    return PasskeyPrompt(
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(answer, dtype=torch.long),
        key,
        len(bos) + len(intro) + a,
        depth,
    )


def key_token_positions(
    tokenizer, prompt: PasskeyPrompt, template: PasskeyTemplate = PasskeyTemplate()
) -> torch.Tensor:
    """int64 [M]: the positions in ``prompt.ids`` of the tokens holding the key's digits (both mentions in the needle).

    :func:`make_passkey_prompt` tokenises the needle on its own and puts its tokens at ``prompt.needle_start``;
    a needle token counts when its character span (the tokenizer's offsets, so a fast tokenizer) overlaps a
    character of an inserted key. A digit run merged with neighbouring text into one token counts that token.
    ``template`` must be the one the prompt was built with (checked: the needle's tokens must match the prompt's).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"key_token_positions needs a fast tokenizer (character offsets), got {type(tokenizer).__name__}; "
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    spans, pos = [], 0  # character spans of the key in the formatted needle
    for literal, field, spec, conversion in string.Formatter().parse(template.needle):
        pos += len(literal)
        if field is None:
            continue
        if field != "key" or spec or conversion:
            raise ValueError(f"the needle template may hold only plain {{key}} fields, got {template.needle!r}")
        spans.append((pos, pos + len(prompt.key)))
        pos += len(prompt.key)
    enc = tokenizer(template.needle.format(key=prompt.key), add_special_tokens=False, return_offsets_mapping=True)
    ids, start = enc["input_ids"], prompt.needle_start
    if prompt.ids[start : start + len(ids)].tolist() != ids:
        raise ValueError(
            f"the prompt's tokens at needle_start={start} are not this template's needle with key {prompt.key}: "
            "pass the template and tokenizer the prompt was built with"
        )
    found = [start + i for i, (a, b) in enumerate(enc["offset_mapping"]) if any(a < e and s < b for s, e in spans)]
    if not found:
        raise ValueError(f"no token of the needle {template.needle!r} overlaps the key {prompt.key}")
    return torch.tensor(found, dtype=torch.long)


@torch.no_grad()
def forced_answer(model: torch.nn.Module, prompt: torch.Tensor, answer: torch.Tensor) -> tuple[list[int], float | None]:
    """Greedy predictions at the answer positions of one forward over ``prompt + answer`` (teacher forcing).

    prompt: int64 [P], answer: int64 [A]. Returns the argmax tokens predicted for the A answer positions
    (equal to ``answer`` iff greedy decoding through the same attention would produce it) and the mean
    realised block density of the forward.
    """
    ids = torch.cat([prompt, answer]).view(1, -1).to(next(model.parameters()).device)
    a = answer.numel()
    state = getattr(model, "_seer_state", None)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=a + 1).logits  # [1, A + 1, V]
    density = state.mean_density() if state is not None else None
    return logits[0, :a].argmax(-1).tolist(), density


def _first_digits(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def _prompts(
    books: TokenizedBooks,
    tokenizer,
    context: int,
    depths: Sequence[float],
    samples: int,
    seed: int,
    template: PasskeyTemplate,
    add_bos: bool,
) -> list[list[PasskeyPrompt]]:
    """prompts[depth_index][sample]; keys and filler offsets depend only on (seed, context, sample)."""
    out: list[list[PasskeyPrompt]] = [[] for _ in depths]
    for s in range(samples):
        rng = random.Random(f"{seed}-{context}-{s}")
        key = str(rng.randrange(10 ** (template.digits - 1), 10**template.digits))
        book = s % len(books)
        need = context * 2
        toks = books.tokens(book, need)
        if toks.numel() < context:
            raise ValueError(f"book {books.books[book].title!r} has fewer than {context} tokens for filler")
        start = rng.randrange(0, max(toks.numel() - context, 0) + 1)
        filler = toks[start : start + context]
        ends = sentence_ends(tokenizer, filler)
        for di, depth in enumerate(depths):
            out[di].append(make_passkey_prompt(tokenizer, filler, context, depth, key, template, add_bos, ends))
    return out


def evaluate_passkey(
    em: EvalModel,
    tokenizer,
    books: TokenizedBooks,
    settings: Sequence[Setting],
    contexts: Sequence[int],
    depths: Sequence[float],
    samples: int,
    rope_scaling: str | None = "yarn",
    seed: int = 0,
    template: PasskeyTemplate = PasskeyTemplate(),
    add_bos: bool = True,
    scoring: str = "forced",
    allow_untrained_gates: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Passkey accuracy of every setting on the grid ``contexts x depths`` (``samples`` prompts per cell).

    Args:
        scoring: ``"forced"``: one forward over prompt + answer through the method under test; a
            sample is correct when the argmax at every answer position is the answer token (what
            greedy decoding with that attention everywhere would give). ``"generate"``: the method
            prefills the prompt, then greedy decoding runs dense with the KV cache (SeerAttention's
            prefill-only deployment). Beware: with tokenizers that emit the answer's leading space
            as its own token (digit-split BPEs), ``generate`` predicts only that space from the
            sparse prefill and every digit densely, so it barely tests the method.

    Returns:
        one dict per setting: ``method``, ``budget_kind``, ``budget``, ``label``, ``scoring``, ``contexts``,
        ``depths``, ``accuracy`` (list [len(contexts)][len(depths)] in [0, 1]), ``accuracy_by_context``,
        ``mean_accuracy``, ``density`` (mean realised prefill block density), ``density_by_context``,
        ``samples``, ``rope_scaling`` (per context: parameters used or ``None``), ``answers`` (per
        context, depth: the decoded digit strings, ``None`` where no digit came out), ``keys`` (per
        context: the key of each sample; the same at every depth), ``correct`` (per context, depth: prompts answered
        correctly), and 95 % Wilson intervals (:func:`~seerattn.eval.stats.wilson_interval`) ``accuracy_ci``
        (per cell ``[lo, hi]``), ``accuracy_by_context_ci`` and ``mean_accuracy_ci`` (over the pooled prompts
        of a context / of the grid), with ``interval`` saying so.
    """
    check_gates(em, settings, allow_untrained_gates)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    nc, nd = len(contexts), len(depths)
    results = {
        s.label: {
            **s.to_dict(),
            "scoring": scoring,
            "contexts": list(contexts),
            "depths": list(depths),
            "samples": samples,
            "accuracy": [[0.0] * nd for _ in range(nc)],
            "correct": [[0] * nd for _ in range(nc)],
            "answers": [[[] for _ in range(nd)] for _ in range(nc)],
            "keys": [[] for _ in range(nc)],
            "density_by_context": [0.0] * nc,
            "rope_scaling": [None] * nc,
        }
        for s in settings
    }
    try:
        for ci, context in enumerate(contexts):
            grid = _prompts(books, tokenizer, context, depths, samples, seed, template, add_bos)
            with scaled_rope(em, context, rope_scaling) as rope:
                bar = tqdm(total=len(settings) * nd * samples, desc=f"passkey @{context}", disable=not progress)
                for setting in settings:
                    configure(em.state, setting, seed)
                    res = results[setting.label]
                    res["rope_scaling"][ci] = rope
                    res["keys"][ci] = [p.key for p in grid[0]]
                    dens = []
                    for di in range(nd):
                        correct = 0
                        for p in grid[di]:
                            em.state.reset()
                            if scoring == "forced":
                                toks, density = forced_answer(em.model, p.ids, p.answer)
                            else:  # one more token than the answer: the digit run must end in the output
                                toks, density = greedy_continue(em.model, p.ids, p.answer.numel() + 1)
                            got = _first_digits(tokenizer.decode(toks, skip_special_tokens=True))
                            correct += got == p.key
                            res["answers"][ci][di].append(got)
                            dens.append(density)
                            bar.update(1)
                        res["accuracy"][ci][di] = correct / samples
                        res["correct"][ci][di] = correct
                    res["density_by_context"][ci] = sum(dens) / len(dens)
                    bar.set_postfix(method=setting.label)
                bar.close()
    finally:
        em.state.set(mode="dense")
        em.state.mask_fn = None
    rows = []
    for res in results.values():
        res["accuracy_by_context"] = [sum(r) / nd for r in res["accuracy"]]
        res["mean_accuracy"] = sum(res["accuracy_by_context"]) / nc
        res["accuracy_ci"] = [[list(wilson_interval(k, samples)) for k in row] for row in res["correct"]]
        res["accuracy_by_context_ci"] = [list(wilson_interval(sum(row), samples * nd)) for row in res["correct"]]
        res["mean_accuracy_ci"] = list(wilson_interval(sum(map(sum, res["correct"])), samples * nd * nc))
        res["interval"] = {"kind": "Wilson score, prompts pooled per cell / context / grid", "level": CI_LEVEL}
        res["density"] = sum(res["density_by_context"]) / nc
        logger.info("passkey %s: mean accuracy %.3f (density %.3f)", res["label"], res["mean_accuracy"], res["density"])
        rows.append(res)
    return rows
