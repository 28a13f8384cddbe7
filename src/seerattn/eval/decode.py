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

With the passkey, each sparse method also records its *needle recall*: at every decode step (step 0
the last prompt token, step ``s`` the ``s``-th generated token) and layer, the share of KV heads whose
selected blocks include a block holding a digit of the key (:func:`~seerattn.eval.passkey.key_token_positions`,
both mentions; ``SeerState.decode_observer`` sees each step's selection). It tells a dropped needle
from a kept one that the model did not use.

Methods (:data:`DECODE_METHODS`): ``dense`` (decode steps dense, transformers' SDPA), ``seer`` (the
decode gate and a :class:`~seerattn.decode_policy.DecodePolicy` ``"budget"``), ``seer_shift`` (the same gate
and budget, ranking with the half-block-shifted windows too: ``DecodePolicy.half_shift``), ``seer_bound`` (the same
gate and budget with ``DecodeConfig``'s default ``DecodePolicy.bound_slots``, ``DEFAULT_BOUND_SLOTS`` of the slots to
the blocks of highest Quest bound on ``q . k``, bounds cached per block as a serving path keeps them), ``streaming`` and
``quest`` (:mod:`seerattn.decode_baselines` through ``SeerState.decode_select_fn``, the same kernel
and budget). Quest here recomputes its block bounds from the whole cache at every step (an
evaluation, not a speed measurement; a serving path would cache them per block as the gate keys are).
``oracle`` keeps the blocks of highest true attention (the decode gate's distillation target at each
row's position; it computes the dense attention it would save: an upper bound of what any gate keeps at
the budget, which tells the gate's misses from the budget's).

Shape legend: T tokens of a window, N rows selected at once, K blocks kept per KV head, S decode steps of a
prompt, L layers, Hkv KV heads.
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

from ..decode_baselines import oracle_decode_blocks, quest_decode_blocks, streaming_decode_blocks
from ..decode_policy import DecodePolicy
from ..gate import DecodeGateConfig
from ..hf import DecodeConfig, SeerConfig, apply_seer_attention, from_pretrained, get_seer_state, read_adapter_config
from ..hf.integration import DEFAULT_BOUND_SLOTS, DecodeRequest, DecodeSelection
from .data import TokenizedBooks, segment_windows
from .model import EvalModel, eval_model, scaled_rope, token_nll
from .passkey import PasskeyTemplate, _first_digits, _prompts, key_token_positions
from .ppl import compare_with_dense
from .stats import BOOTSTRAP_RESAMPLES, CI_LEVEL, wilson_interval

__all__ = [
    "DECODE_METHODS",
    "NEEDLE_FIELDS",
    "configure_decode",
    "decode_answer",
    "evaluate_decode_passkey",
    "evaluate_decode_ppl",
    "needle_summary",
    "prepare_decode_model",
]

logger = logging.getLogger(__name__)

DECODE_METHODS = ("dense", "seer", "seer_shift", "seer_bound", "streaming", "quest", "oracle")
_GATED = ("seer", "seer_shift", "seer_bound")  # the methods that read the decode gates
# the needle-recall fields of a passkey row (needle_summary; None where nothing was recorded)
NEEDLE_FIELDS = (
    "needle_blocks",
    "needle_recall",
    "needle_recall_by_step",
    "needle_recall_by_step_right",
    "needle_recall_by_step_wrong",
    "needle_recall_by_layer",
    "needle_recall_by_layer_head",
    "needle_recall_by_depth",
)


def _streaming(budget: int, request: DecodeRequest) -> torch.Tensor:
    return streaming_decode_blocks(request.q, request.k, request.cache_seqlens, budget, request.block_size)


def _quest(budget: int, request: DecodeRequest) -> torch.Tensor:
    return quest_decode_blocks(request.q, request.k, request.cache_seqlens, budget, request.block_size)


def _oracle(budget: int, request: DecodeRequest) -> torch.Tensor:
    return oracle_decode_blocks(request.q, request.k, request.cache_seqlens, budget, request.block_size, request.scale)


_SELECT = {"streaming": _streaming, "quest": _quest, "oracle": _oracle}


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
    bound = DEFAULT_BOUND_SLOTS if method == "seer_bound" else 0
    state.set_decode(
        enabled=True, policy=DecodePolicy("budget", budget, half_shift=method == "seer_shift", bound_slots=bound)
    )
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
    gated = [m for m in methods if m in _GATED]
    if gated and em.gates is None and not allow_untrained_gates:
        raise ValueError(
            f"methods {gated} use the decode gates but none were loaded; pass an adapter with a decode section "
            "(--gates) or allow_untrained_gates=True to measure the untrained prior"
        )


def _reset(em: EvalModel) -> None:
    em.state.set(mode="dense", decode_start=None)
    em.state.set_decode(enabled=False)
    em.state.decode_select_fn = None
    em.state.decode_observer = None


class _NeedleRecorder:
    """``SeerState.decode_observer`` for one prompt (batch 1): per decode step and layer, which KV heads kept a
    needle block.

    needle_blocks: int64 [M] the blocks holding the key's digits, on the model's device. Each call keeps a
    device tensor (no host read in the step); :meth:`hits` reads them once, after the answer.
    """

    def __init__(self, needle_blocks: torch.Tensor):
        self.needle_blocks = needle_blocks
        self.layers: list[int] = []
        self.kept: list[torch.Tensor] = []  # per call: bool [Hkv]

    def __call__(self, sel: DecodeSelection) -> None:
        if sel.blocks.shape[0] != 1:
            raise ValueError(f"the needle recorder reads one prompt at a time, got a batch of {sel.blocks.shape[0]}")
        self.layers.append(sel.layer_idx)
        self.kept.append((sel.blocks[0].unsqueeze(-1) == self.needle_blocks).any(-1).any(-1))

    def hits(self, steps: int) -> torch.Tensor:
        """bool [S, L, Hkv] on the host: whether each KV head's selection held a needle block at each step and layer."""
        n_layers = max(self.layers, default=-1) + 1
        if n_layers == 0 or self.layers != list(range(n_layers)) * steps:
            raise RuntimeError(
                f"expected {steps} decode steps through every layer in order, the decode observer saw layers "
                f"{self.layers[: 3 * max(n_layers, 1)]}... ({len(self.layers)} calls)"
            )
        return torch.stack(self.kept).view(steps, n_layers, -1).cpu()


def needle_summary(
    needle_blocks: Sequence[Sequence[torch.Tensor]],
    hits: Sequence[Sequence[torch.Tensor]],
    right: Sequence[Sequence[bool]],
) -> dict:
    """The needle-recall fields of a passkey row (:data:`NEEDLE_FIELDS`) from each prompt's hits.

    Args:
        needle_blocks: [depth][sample] int64 [M] the blocks holding the key's digits.
        hits: [depth][sample] bool [S, L, Hkv] (:class:`_NeedleRecorder`); S may differ between prompts
            (answers of different token lengths).
        right: [depth][sample] whether the prompt was answered right.

    Returns:
        ``needle_blocks`` (as lists), ``needle_recall`` ([depth][sample][step][layer]: share of KV heads keeping
        a needle block),
        ``needle_recall_by_step`` (per step, mean over the prompts that have it and the layers),
        ``needle_recall_by_step_right`` / ``_wrong`` (the same over the prompts answered right / wrong;
        None where there is none), ``needle_recall_by_layer`` (per layer, mean over prompts and steps),
        ``needle_recall_by_layer_head`` ([layer][KV head], mean over prompts and steps) and
        ``needle_recall_by_depth`` (per depth, mean over prompts, steps and layers).
    """
    flat = [(h.float(), r) for hd, rd in zip(hits, right, strict=True) for h, r in zip(hd, rd, strict=True)]
    steps = max(h.shape[0] for h, _ in flat)

    def by_step(group: list[torch.Tensor]) -> list[float | None] | None:
        if not group:
            return None
        out = []
        for s in range(steps):
            at = [h[s].mean() for h in group if h.shape[0] > s]
            out.append(float(torch.stack(at).mean()) if at else None)
        return out

    all_steps = torch.cat([h for h, _ in flat])  # [sum of S, L, Hkv]
    return {
        "needle_blocks": [[b.tolist() for b in bd] for bd in needle_blocks],
        "needle_recall": [[h.float().mean(-1).tolist() for h in hd] for hd in hits],
        "needle_recall_by_step": by_step([h for h, _ in flat]),
        "needle_recall_by_step_right": by_step([h for h, r in flat if r]),
        "needle_recall_by_step_wrong": by_step([h for h, r in flat if not r]),
        "needle_recall_by_layer": all_steps.mean((0, 2)).tolist(),
        "needle_recall_by_layer_head": all_steps.mean(0).tolist(),
        "needle_recall_by_depth": [float(torch.cat([h.float() for h in hd]).mean()) for hd in hits],
    }


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
    needle_recall: bool = True,
) -> list[dict]:
    """Pass keys answered by generation through each method's decode (:func:`decode_answer`).

    A sample is correct when the first run of digits generated (answer tokens + 1 steps) equals the key.
    ``template``: the prompt texts (default :class:`~seerattn.eval.passkey.PasskeyTemplate`).
    ``needle_recall``: record which decode steps kept the needle's blocks (sparse methods; needs a fast
    tokenizer for :func:`~seerattn.eval.passkey.key_token_positions`).

    Returns:
        one dict per method: ``method``, ``label``, ``budget``, ``budget_fraction``, ``context``, ``depths``,
        ``samples``, ``accuracy`` (per depth), ``correct`` (per depth), ``mean_accuracy`` with 95 % Wilson
        intervals (``accuracy_ci`` per depth, ``mean_accuracy_ci`` pooled), ``answers`` (per depth, the
        digit strings), ``keys``, ``prompt_right`` ([depth][sample] the answer equals the key), ``density``
        (mean realised density of the decode steps), ``accuracy_vs_dense`` (``mean_accuracy / dense's``, None
        without a dense row or at dense accuracy 0) and the needle fields of :func:`needle_summary`
        (:data:`NEEDLE_FIELDS`; None for ``dense``, which selects nothing, and with ``needle_recall`` off).
    """
    _check(em, methods, allow_untrained_gates)
    template = PasskeyTemplate() if template is None else template
    grid = _prompts(books, tokenizer, context, depths, samples, seed, template, add_bos)
    needles = None
    if needle_recall:
        bs = em.state.config.decode.gate.block_size
        needles = [[(key_token_positions(tokenizer, p, template) // bs).unique() for p in ps] for ps in grid]
    device = next(em.model.parameters()).device
    rows = []
    try:
        with scaled_rope(em, context, rope_scaling) as rope:
            bar = tqdm(total=len(methods) * len(depths) * samples, desc="decode passkey", disable=not progress)
            for method in methods:
                configure_decode(em, method, budget)
                record = needles is not None and method != "dense"
                correct, answers, right, hits, dens = [], [], [], [], []
                for di, prompts in enumerate(grid):
                    got_depth, right_depth, hits_depth = [], [], []
                    for si, p in enumerate(prompts):
                        em.state.reset()
                        recorder = _NeedleRecorder(needles[di][si].to(device)) if record else None
                        em.state.decode_observer = recorder
                        steps = p.answer.numel() + 1
                        toks, density = decode_answer(em.model, p.ids, steps)
                        got = _first_digits(tokenizer.decode(toks, skip_special_tokens=True))
                        got_depth.append(got)
                        right_depth.append(got == p.key)
                        if record:
                            hits_depth.append(recorder.hits(steps))
                        dens.append(density)
                        bar.update(1)
                    correct.append(sum(right_depth))
                    answers.append(got_depth)
                    right.append(right_depth)
                    hits.append(hits_depth)
                total = sum(correct)
                needle = needle_summary(needles, hits, right) if record else dict.fromkeys(NEEDLE_FIELDS)
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
                        "prompt_right": right,
                        "density": sum(dens) / len(dens),
                        "rope_scaling": rope,
                        **needle,
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
