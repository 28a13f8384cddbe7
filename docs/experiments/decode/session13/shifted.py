"""Half-block-shifted gate windows for sparse decode (issue 17's passkey gap): an inference-side experiment.

Seer's three retrieval misses on the 22 test books are keys split over two blocks (session 11). Here the committed
decode gate also scores windows shifted by half a block (tokens [j * bs + bs/2, (j + 1) * bs + bs/2), pooled and
projected by the same gate, RoPE at the window's first position) and an aligned block's ranking score becomes:

- ``aligned``: its own logit (the committed selection, recomputed here: a check of this script);
- ``max``: the max of its own logit and the two shifted windows overlapping it;
- ``win``: as ``max``, but a shifted window counts only where it beats both aligned blocks it overlaps (something
  centred on the boundary, not half of a strong block);
- ``win2``: the library's rule (``gate.straddle_logits``, ``DecodePolicy.half_shift``, whose tie-break ``win``
  lacks) with the window's logit less ln 2 (its mass per budget slot: a pair takes two).

The budget, the first and current block and the selection (``select_decode_blocks``) are the library's; the hook is a
``SeerState.decode_select_fn``, so the same decode kernel attends to the chosen blocks. Queries and keys reach the hook
after RoPE; the gate's inputs are recovered by the inverse rotation.

CPU, fp32 (the testbed model):

    python docs/experiments/decode/session13/shifted.py --data ../shared/data/books --modes aligned,win \\
        --prompts 0.5:16,0.5:17,0.75:18,0.5:15,0.75:17           # seer's three misses and two hits (session 11)
    python docs/experiments/decode/session13/shifted.py --data ../shared/data/books --modes win --prompts all
    python docs/experiments/decode/session13/shifted.py --data ../shared/data/books --measure ppl --modes seer,win

The PPL measure is session 10's (32 windows of 8192 tokens, the last 2048 in decode mode): dense, then each mode
(``seer``: the library's own selection, no hook), with paired bootstrap intervals against dense and against seer.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from seerattn.decode_policy import DecodePolicy, select_decode_blocks
from seerattn.eval.data import TokenizedBooks, segment_windows
from seerattn.eval.decode import configure_decode, decode_answer, prepare_decode_model
from seerattn.eval.model import scaled_rope, token_nll
from seerattn.eval.passkey import PasskeyTemplate, _first_digits, _prompts
from seerattn.eval.stats import paired_bootstrap_ppl
from seerattn.gate import straddle_logits

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def unrope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of HF's rotate-half RoPE (cos / sin may carry an attention factor): y [B, H, T, D], cos / sin
    [B, T, D]."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    y1, y2 = y.chunk(2, dim=-1)
    rotated = torch.cat((-y2, y1), dim=-1)
    return (y * c - rotated * s) / (c * c + s * s)


def shifted_logits(gate, rotary, q: torch.Tensor, k: torch.Tensor, lens: torch.Tensor, mode: str) -> torch.Tensor:
    """Ranking logits [B, Hkv, N, NB] for N rows: q [B, Hq, N, D] and k [B, Hkv, T, D] post-RoPE, lens [B, N]."""
    bs = gate.config.block_size
    half = bs // 2
    b, _, n, _ = q.shape
    t = k.shape[2]
    dev = k.device
    pos_k = torch.arange(t, device=dev).expand(b, t)
    ck, sk = rotary(k, pos_k)
    k_pre = unrope(k.float(), ck.float(), sk.float())
    pos_q = (lens - 1).long()
    cq, sq = rotary(q, pos_q)
    q_pre = unrope(q.float(), cq.float(), sq.float())
    nb = math.ceil(t / bs)
    aligned = gate.block_keys(k_pre[:, :, : (t // bs) * bs], rotary)  # [B, Hkv, t // bs, Dg]
    qg = gate.gate_query(q_pre, pos_q, rotary)  # [B, Hkv, N, Dg]
    scale = 1.0 / math.sqrt(qg.shape[-1])
    s_al = torch.full((b, gate.num_kv_heads, n, nb), float("-inf"), device=dev)
    s_al[..., : aligned.shape[2]] = torch.matmul(qg.float(), aligned.float().transpose(-1, -2)) * scale
    cur = (pos_q // bs).view(b, 1, n, 1)  # the row's current block; completed blocks J < cur
    idx = torch.arange(nb, device=dev).view(1, 1, 1, -1)
    s_al = s_al.masked_fill(idx >= cur, float("-inf"))
    if mode == "aligned" or t < bs + half:
        return s_al
    m = (t - half) // bs  # shifted windows with all their tokens in the cache
    first = (torch.arange(m, device=dev) * bs + half).expand(b, m)
    sh = gate.block_keys(k_pre[:, :, half : half + m * bs], rotary, first_positions=first)  # [B, Hkv, m, Dg]
    s_sh = torch.full((b, gate.num_kv_heads, n, nb), float("-inf"), device=dev)
    s_sh[..., :m] = torch.matmul(qg.float(), sh.float().transpose(-1, -2)) * scale
    # window j covers blocks j and j + 1; it must be completed before the row's current block: j + 1 < cur
    s_sh = s_sh.masked_fill(idx + 1 >= cur, float("-inf"))
    if mode == "win2":  # the library's rule (straddle_logits, its tie-break included) at the window's mass per slot
        return straddle_logits(s_al, s_sh - math.log(2.0)).masked_fill(idx >= cur, float("-inf"))
    if mode == "win":
        nxt = torch.cat((s_al[..., 1:], torch.full_like(s_al[..., :1], float("-inf"))), -1)
        s_sh = s_sh.masked_fill(s_sh <= torch.maximum(s_al, nxt), float("-inf"))
    elif mode != "max":
        raise ValueError(f"mode must be aligned, max, win or win2, got {mode!r}")
    prev = torch.cat((torch.full_like(s_sh[..., :1], float("-inf")), s_sh[..., :-1]), -1)  # window j - 1
    return torch.maximum(s_al, torch.maximum(s_sh, prev)).masked_fill(idx >= cur, float("-inf"))


def select_with(model, state, budget: int, logits_fn):
    """A ``SeerState.decode_select_fn``: ``logits_fn(gate, rotary, q, k, lens)`` ranks each row's blocks, the
    library's ``select_decode_blocks`` keeps the budget (first and current block forced)."""
    layers = model.model.layers

    def select(request) -> torch.Tensor:
        gate = layers[request.layer_idx].self_attn.seer_decode_gate
        logits = logits_fn(gate, state._rotary, request.q, request.k, request.cache_seqlens)
        b, hkv, n, nb = logits.shape
        flat = logits.permute(0, 2, 1, 3).reshape(b * n, hkv, nb)
        idx = select_decode_blocks(
            flat, request.cache_seqlens.reshape(b * n), DecodePolicy("budget", budget), request.block_size, nb
        )
        return idx.view(b, n, hkv, -1).permute(0, 2, 1, 3).contiguous()

    return select


def make_select(model, state, budget: int, mode: str):
    return select_with(model, state, budget, functools.partial(shifted_logits, mode=mode))


def ppl_runs(em, books, modes: list[str], hook, budget: int, windows: int, tail: int, refs: tuple[str, ...]) -> dict:
    """Teacher-forced decode-mode NLL of each window's last ``tail`` tokens: dense, then each mode (``hook(mode)``:
    its ``decode_select_fn``, None for the library's own selection), with paired bootstrap intervals against each
    of ``refs`` that ran."""
    segments = segment_windows(books, 8192, windows)
    tails = {}
    with scaled_rope(em, 8192, "yarn"):
        for mode in ["dense", *modes]:
            configure_decode(em, "dense" if mode == "dense" else "seer", budget, decode_start=8192 - tail)
            if mode != "dense":
                em.state.decode_select_fn = hook(mode)
            t0, tails[mode] = time.time(), []
            for w in segments:
                em.state.reset()
                tails[mode].append(token_nll(em.model, w)[-tail:].sum().item())
            n = tail * len(segments)
            print(f"{mode}: PPL last {tail} {math.exp(sum(tails[mode]) / n):.3f} ({time.time() - t0:.0f} s)")
    em.state.decode_select_fn = None
    tokens = [tail] * len(segments)
    for mode in tails:
        for ref in refs:
            if mode not in ("dense", ref) and ref in tails:
                d, lo, hi = paired_bootstrap_ppl(tails[ref], tails[mode], tokens)
                print(f"{mode} vs {ref}: {100 * d:+.2f} % [{100 * lo:+.2f}, {100 * hi:+.2f}]")
    return {"windows": len(segments), "tail": tail, "window_nll_tail": tails}


def passkey_runs(em, tok, grid, specs, modes: list[str], hook, budget: int, show_all: bool) -> list[dict]:
    """Each mode's greedy answers to the prompts ``specs`` ((depth, sample) of ``grid``) with ``hook(mode)`` as the
    ``decode_select_fn``; prints the wrong answers (every answer with ``show_all``) and each mode's count."""
    rows = []
    with scaled_rope(em, 8192, "yarn"):
        for mode in modes:
            configure_decode(em, "seer", budget)
            em.state.decode_select_fn = hook(mode)
            right, t0 = 0, time.time()
            for depth, sample in specs:
                prompt = grid[DEPTHS.index(depth)][sample]
                em.state.reset()
                out, _ = decode_answer(em.model, prompt.ids, prompt.answer.numel() + 1)
                got = _first_digits(tok.decode(out, skip_special_tokens=True))
                right += got == prompt.key
                rows.append(dict(mode=mode, depth=depth, sample=sample, key=prompt.key, answer=got))
                if got != prompt.key or show_all:
                    print(f"{mode:7s} depth {depth} sample {sample:2d} key {prompt.key} answer {got}", flush=True)
            print(f"{mode}: {right} / {len(specs)} right ({time.time() - t0:.0f} s)", flush=True)
    em.state.decode_select_fn = None
    return rows


def prompt_specs(prompts: str, samples: int) -> list[tuple[float, int]]:
    """``all`` (every depth, ``samples`` each) or ``depth:sample,...``."""
    if prompts == "all":
        return [(d, s) for d in DEPTHS for s in range(samples)]
    return [(float(x.split(":")[0]), int(x.split(":")[1])) for x in prompts.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="testbed/model")
    p.add_argument("--gates", default="testbed/gates-decode")
    p.add_argument("--prompts", default="0.5:16,0.5:17,0.75:18,0.5:15,0.75:17", help="depth:sample,... or all")
    p.add_argument("--modes", default="aligned,win")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--measure", choices=("passkey", "ppl"), default="passkey")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--tail", type=int, default=2048)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    books = TokenizedBooks(args.data, tok, split="test")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    em = prepare_decode_model(model, args.gates, name=args.model)
    if args.measure == "ppl":

        def hook(mode: str):  # "seer": the library's own selection, no hook
            return None if mode == "seer" else make_select(em.model, em.state, args.budget, mode)

        modes = args.modes.split(",")
        result = ppl_runs(em, books, modes, hook, args.budget, args.windows, args.tail, ("dense", "seer"))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return
    grid = _prompts(books, tok, 8192, DEPTHS, args.samples, 0, PasskeyTemplate(), True)
    rows = passkey_runs(
        em, tok, grid, prompt_specs(args.prompts, args.samples), args.modes.split(","),
        lambda mode: make_select(em.model, em.state, args.budget, mode), args.budget, args.prompts != "all",
    )  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
