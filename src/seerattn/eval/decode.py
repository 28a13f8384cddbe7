"""Sparse-decode quality at one token budget: dense decode vs the decode gate vs StreamingLLM-style vs Quest-style.

Two measurements (issue 17), every method at the same budget (``budget // block_size`` key blocks per
(sequence, KV head), the first and the current block included):

- :func:`evaluate_decode_ppl`: the teacher-forced perplexity of the last ``tail`` tokens of windows of
  ``context`` tokens, those rows attending as decode steps at their positions would (``decode_eval``
  mode of :mod:`seerattn.hf`: ``decode_start = context - tail``; earlier rows dense). The dense row is
  the same windows with dense attention; differences from it get paired-bootstrap intervals over the
  windows (:func:`~seerattn.eval.ppl.compare_with_dense`).
- :func:`evaluate_decode_passkey`: a pass key answered by greedy generation (not forced scoring). The
  prompt's tokens but the last are prefilled densely; the last prompt token and every generated token
  are decode steps through the method, so every answer token is predicted by sparse decode (with a
  prefill of the whole prompt the first answer token would come from the dense prefill).

Methods (:data:`DECODE_METHODS`): ``dense`` (decode steps dense, transformers' SDPA), ``seer`` (the
decode gate and a :class:`~seerattn.decode_policy.DecodePolicy` ``"budget"``), ``streaming`` and
``quest`` (:mod:`seerattn.decode_baselines` through ``SeerState.decode_select_fn``, the same kernel
and budget). Quest here recomputes its block bounds from the whole cache at every step (an
evaluation, not a speed measurement; a serving path would cache them per block as the gate keys are).

Shape legend: T tokens of a window, N rows selected at once, K blocks kept per KV head.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..decode_baselines import quest_decode_blocks, streaming_decode_blocks
from ..decode_policy import DecodePolicy
from ..gate import DecodeGateConfig
from ..hf import DecodeConfig, SeerConfig, apply_seer_attention, from_pretrained, get_seer_state, read_adapter_config
from ..hf.integration import DecodeRequest
from .data import TokenizedBooks, segment_windows
from .model import EvalModel, eval_model, scaled_rope, token_nll
from .passkey import PasskeyTemplate, _first_digits, _prompts
from .ppl import compare_with_dense
from .stats import BOOTSTRAP_RESAMPLES, CI_LEVEL, wilson_interval

__all__ = [
    "DECODE_METHODS",
    "configure_decode",
    "decode_answer",
    "evaluate_decode_passkey",
    "evaluate_decode_ppl",
    "prepare_decode_model",
]

logger = logging.getLogger(__name__)

DECODE_METHODS = ("dense", "seer", "streaming", "quest")


def _streaming(budget: int, request: DecodeRequest) -> torch.Tensor:
    return streaming_decode_blocks(request.q, request.k, request.cache_seqlens, budget, request.block_size)


def _quest(budget: int, request: DecodeRequest) -> torch.Tensor:
    return quest_decode_blocks(request.q, request.k, request.cache_seqlens, budget, request.block_size)


_SELECT = {"streaming": _streaming, "quest": _quest}


def prepare_decode_model(
    model: torch.nn.Module,
    gates: str | Path | None = None,
    block_size: int = 64,
    impl: str | None = None,
    train_length: int | None = None,
    name: str = "model",
) -> EvalModel:
    """Attach seer attention with a decode section to a loaded model (prefill dense, decode off to start).

    Args:
        gates: an adapter folder with a ``decode`` section (trained decode gates; its prefill gates, if any,
            are attached too and stay unused: prefill runs dense); None: untrained decode gates of
            ``block_size`` (enough for ``dense``, ``streaming`` and ``quest``, which do not read them).
    """
    model.eval()
    if gates is not None:
        # checked before anything is attached: a refused adapter leaves the model as it was
        if read_adapter_config(gates).get("decode") is None:
            raise ValueError(f"adapter {gates} has no decode section: no decode gates to evaluate")
        from_pretrained(model, gates, mode="dense", impl=impl)
        state = get_seer_state(model)
    else:
        decode = DecodeConfig(DecodeGateConfig(block_size=block_size))
        state = apply_seer_attention(model, SeerConfig(gate=None, mode="dense", decode=decode, impl=impl))
    state.set_decode(enabled=False)
    return eval_model(model, state, gates, train_length, name)


def configure_decode(em: EvalModel, method: str, budget: int, decode_start: int | None = None) -> None:
    """Put ``em`` in ``method``'s decode configuration at ``budget`` tokens.

    ``decode_start`` set: teacher-forced forwards run ``decode_eval`` from that row on (dense for
    ``dense``); None: prefills dense, one-token steps on a cache through the method.
    """
    if method not in DECODE_METHODS:
        raise ValueError(f"decode method must be one of {DECODE_METHODS}, got {method!r}")
    state = em.state
    state.decode_select_fn = None
    if method == "dense":
        state.set(mode="dense", decode_start=None)
        state.set_decode(enabled=False)
        return
    state.set_decode(enabled=True, policy=DecodePolicy("budget", budget))
    if method in _SELECT:
        state.decode_select_fn = functools.partial(_SELECT[method], budget)
    if decode_start is None:
        state.set(mode="dense", decode_start=None)
    else:
        state.set(mode="decode_eval", decode_start=decode_start)


def _check(em: EvalModel, methods: Sequence[str], allow_untrained_gates: bool) -> None:
    unknown = [m for m in methods if m not in DECODE_METHODS]
    if unknown:
        raise ValueError(f"unknown decode methods {unknown}; accepted: {DECODE_METHODS}")
    if "seer" in methods and em.gates is None and not allow_untrained_gates:
        raise ValueError(
            "method 'seer' uses the decode gates but none were loaded; pass an adapter with a decode section "
            "(--gates) or allow_untrained_gates=True to measure the untrained prior"
        )


def _reset(em: EvalModel) -> None:
    em.state.set(mode="dense", decode_start=None)
    em.state.set_decode(enabled=False)
    em.state.decode_select_fn = None


def evaluate_decode_ppl(
    em: EvalModel,
    books: TokenizedBooks,
    methods: Sequence[str],
    context: int,
    samples: int,
    budget: int,
    tail: int,
    add_bos: bool = False,
    rope_scaling: str | None = "yarn",
    seed: int = 0,
    allow_untrained_gates: bool = False,
    progress: bool = True,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> list[dict]:
    """Teacher-forced PPL of the last ``tail`` tokens of ``samples`` windows of ``context`` tokens, per method.

    Returns:
        one dict per method: ``method``, ``label``, ``budget`` (tokens), ``budget_fraction`` (of the context),
        ``context``, ``tail``, ``windows``, ``nll_tail``, ``ppl_tail``, ``ppl`` (whole window), ``density``
        (kept fraction of the keys the decode rows could see, mean over layers and windows; 1.0 for
        dense), ``window_nll`` / ``window_nll_tail`` / ``window_tokens``, and the comparison with dense
        (``ppl_tail_vs_dense`` with its 95 % interval ``ppl_tail_vs_dense_ci``, ...).
    """
    _check(em, methods, allow_untrained_gates)
    if not 1 <= tail < context:
        raise ValueError(f"tail must be in [1, context = {context}), got {tail}")
    windows = segment_windows(books, context, samples, add_bos=add_bos)
    rows = []
    try:
        with scaled_rope(em, context, rope_scaling) as rope:
            bar = tqdm(total=len(methods) * len(windows), desc=f"decode ppl @{context}", disable=not progress)
            for method in methods:
                configure_decode(em, method, budget, decode_start=context - tail)
                w_nll, w_tail, w_tokens, dens = [], [], [], []
                for w in windows:
                    em.state.reset()
                    losses = token_nll(em.model, w)  # [context - 1]; entry t predicts token t + 1 from rows <= t
                    w_nll.append(losses.sum().item())
                    w_tail.append(losses[-tail:].sum().item())
                    w_tokens.append(losses.numel())
                    dens.append(em.state.mean_density())
                    bar.update(1)
                n_tail = tail * len(windows)
                rows.append(
                    {
                        "method": method,
                        "label": method,
                        "budget": budget,
                        "budget_fraction": budget / context,
                        "context": context,
                        "tail": tail,
                        "windows": len(windows),
                        "nll_tail": sum(w_tail) / n_tail,
                        "ppl_tail": math.exp(sum(w_tail) / n_tail),
                        "ppl": math.exp(sum(w_nll) / sum(w_tokens)),
                        "density": sum(dens) / len(dens),
                        "rope_scaling": rope,
                        "window_nll": w_nll,
                        "window_nll_tail": w_tail,
                        "window_tokens": w_tokens,
                    }
                )
                logger.info("decode ppl %s @%d, last %d: %.4f", method, context, tail, rows[-1]["ppl_tail"])
            bar.close()
    finally:
        _reset(em)
    return compare_with_dense(rows, resamples=resamples, seed=seed)


@torch.no_grad()
def decode_answer(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int) -> tuple[list[int], float | None]:
    """Prefill ``ids[:-1]`` (int64 [T]), then greedy decode steps from ``ids[-1]``: ``max_new_tokens`` new tokens,
    each predicted by a one-token step on the KV cache (sparse when the model's decode section is on).

    Returns the new tokens and the mean realised density of the decode steps (``None`` without seer attention).
    """
    ids = ids.view(1, -1).to(next(model.parameters()).device)
    if ids.shape[1] < 2:
        raise ValueError(f"a prompt needs at least 2 tokens (a prefill and a first decode step), got {ids.shape[1]}")
    state = getattr(model, "_seer_state", None)
    # transformers 5 renamed the KV-cache argument and output ``past_key_values`` -> ``cache``
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1)[cache_kw]
    nxt = ids[:, -1:]
    new: list[int] = []
    dens: list[float] = []
    for _ in range(max_new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{cache_kw: cache})
        cache = out[cache_kw]
        nxt = out.logits[:, -1:].argmax(-1)
        new.append(int(nxt))
        if state is not None:
            dens.append(state.mean_density())
    return new, (sum(dens) / len(dens) if dens else None)


def evaluate_decode_passkey(
    em: EvalModel,
    tokenizer,
    books: TokenizedBooks,
    methods: Sequence[str],
    context: int,
    depths: Sequence[float],
    samples: int,
    budget: int,
    template: PasskeyTemplate | None = None,
    add_bos: bool = True,
    rope_scaling: str | None = "yarn",
    seed: int = 0,
    allow_untrained_gates: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Pass keys answered by generation through each method's decode (:func:`decode_answer`).

    A sample is correct when the first run of digits generated (answer tokens + 1 steps) equals the key.
    ``template``: the prompt texts (default :class:`~seerattn.eval.passkey.PasskeyTemplate`).

    Returns:
        one dict per method: ``method``, ``label``, ``budget``, ``budget_fraction``, ``context``, ``depths``,
        ``samples``, ``accuracy`` (per depth), ``correct`` (per depth), ``mean_accuracy`` with 95 % Wilson
        intervals (``accuracy_ci`` per depth, ``mean_accuracy_ci`` pooled), ``answers`` (per depth, the
        digit strings), ``keys``, ``density`` (mean realised density of the decode steps), ``accuracy_vs_dense``
        (``mean_accuracy / dense's``, None without a dense row or at dense accuracy 0).
    """
    _check(em, methods, allow_untrained_gates)
    template = PasskeyTemplate() if template is None else template
    grid = _prompts(books, tokenizer, context, depths, samples, seed, template, add_bos)
    rows = []
    try:
        with scaled_rope(em, context, rope_scaling) as rope:
            bar = tqdm(total=len(methods) * len(depths) * samples, desc="decode passkey", disable=not progress)
            for method in methods:
                configure_decode(em, method, budget)
                correct, answers, dens = [], [], []
                for prompts in grid:
                    hits, got_depth = 0, []
                    for p in prompts:
                        em.state.reset()
                        toks, density = decode_answer(em.model, p.ids, p.answer.numel() + 1)
                        got = _first_digits(tokenizer.decode(toks, skip_special_tokens=True))
                        hits += got == p.key
                        got_depth.append(got)
                        dens.append(density)
                        bar.update(1)
                    correct.append(hits)
                    answers.append(got_depth)
                total = sum(correct)
                rows.append(
                    {
                        "method": method,
                        "label": method,
                        "budget": budget,
                        "budget_fraction": budget / context,
                        "context": context,
                        "depths": list(depths),
                        "samples": samples,
                        "accuracy": [c / samples for c in correct],
                        "correct": correct,
                        "accuracy_ci": [list(wilson_interval(c, samples)) for c in correct],
                        "mean_accuracy": total / (samples * len(depths)),
                        "mean_accuracy_ci": list(wilson_interval(total, samples * len(depths))),
                        "interval": {"kind": "Wilson score, prompts pooled per depth / overall", "level": CI_LEVEL},
                        "answers": answers,
                        "keys": [p.key for p in grid[0]],
                        "density": sum(dens) / len(dens),
                        "rope_scaling": rope,
                    }
                )
                logger.info("decode passkey %s: %.3f", method, rows[-1]["mean_accuracy"])
            bar.close()
    finally:
        _reset(em)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for r in rows:
        ok = dense is not None and r is not dense and dense["mean_accuracy"] > 0
        r["accuracy_vs_dense"] = r["mean_accuracy"] / dense["mean_accuracy"] if ok else None
    return rows
