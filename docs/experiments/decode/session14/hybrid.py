"""Seer's decode ranking with a few budget slots given to Quest's bound (issue 17's passkey gap): an experiment hook.

On books-sample (240 prompts, H200 bf16, session 14 call 1) seer answers 234, Quest-style 238, the oracle 239: four of
seer's six misses are non-stops at depth 0, where the key's block 0 is always kept, so what seer leaves out is not the
key's first block. Here ``hybN`` gives N of the budget's slots to Quest's N highest-bound completed blocks and fills
the rest by the decode gate's logits (first and current block forced as always); ``hyb0`` is seer's own ranking
recomputed by the hook (a check). The selection (``select_decode_blocks``) and the kernel are the library's.

    python docs/experiments/decode/session14/hybrid.py --data data/books-sample --samples 48 \\
        --prompts 0:9,0:17,0:19,0:34,0.5:11 --modes hyb0,hyb2,hyb4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "session13"))
from shifted import DEPTHS, unrope  # noqa: E402  (session 13's hook)

from seerattn.decode_baselines import quest_block_bounds, quest_block_scores  # noqa: E402
from seerattn.decode_policy import DecodePolicy, select_decode_blocks  # noqa: E402
from seerattn.eval.data import TokenizedBooks, segment_windows  # noqa: E402
from seerattn.eval.decode import configure_decode, decode_answer, prepare_decode_model  # noqa: E402
from seerattn.eval.model import scaled_rope, token_nll  # noqa: E402
from seerattn.eval.passkey import PasskeyTemplate, _first_digits, _prompts  # noqa: E402
from seerattn.eval.stats import paired_bootstrap_ppl  # noqa: E402


def gate_logits(gate, rotary, q: torch.Tensor, k: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """The decode gate's logits [B, Hkv, N, NB] of the completed blocks before each row's current block (-inf
    elsewhere), from post-RoPE q [B, Hq, N, D] and k [B, Hkv, T, D] (session 13's ``aligned`` mode, on any device)."""
    bs = gate.config.block_size
    b, _, n, _ = q.shape
    t = k.shape[2]
    dev = k.device
    ck, sk = rotary(k, torch.arange(t, device=dev).expand(b, t))
    k_pre = unrope(k.float(), ck.float(), sk.float())
    pos_q = (lens - 1).long()
    cq, sq = rotary(q, pos_q)
    q_pre = unrope(q.float(), cq.float(), sq.float())
    nb = math.ceil(t / bs)
    keys = gate.block_keys(k_pre[:, :, : (t // bs) * bs], rotary)  # [B, Hkv, t // bs, Dg]
    qg = gate.gate_query(q_pre, pos_q, rotary)  # [B, Hkv, N, Dg]
    s = torch.full((b, gate.num_kv_heads, n, nb), float("-inf"), device=dev)
    s[..., : keys.shape[2]] = torch.matmul(qg.float(), keys.float().transpose(-1, -2)) / math.sqrt(qg.shape[-1])
    cur = (pos_q // bs).view(b, 1, n, 1)
    return s.masked_fill(torch.arange(nb, device=dev).view(1, 1, 1, -1) >= cur, float("-inf"))


def hybrid_logits(gate, rotary, q, k, lens, quest_slots: int) -> torch.Tensor:
    """[B, Hkv, N, NB]: the gate's logits, with Quest's ``quest_slots`` best completed blocks lifted above all."""
    s = gate_logits(gate, rotary, q, k, lens)
    if quest_slots == 0:
        return s
    kmin, kmax = quest_block_bounds(k, gate.config.block_size)
    qs = quest_block_scores(q, kmin, kmax)[..., : s.shape[-1]].float()
    qs = qs.masked_fill(torch.isinf(s), float("-inf"))  # only the completed blocks the gate may rank
    top = qs.topk(min(quest_slots, qs.shape[-1]), dim=-1)
    lift = torch.zeros_like(s).scatter(-1, top.indices, torch.where(torch.isinf(top.values), 0.0, 1e6))
    return s + lift


def make_select(model, state, budget: int, quest_slots: int):
    layers = model.model.layers

    def select(request) -> torch.Tensor:
        gate = layers[request.layer_idx].self_attn.seer_decode_gate
        logits = hybrid_logits(gate, state._rotary, request.q, request.k, request.cache_seqlens, quest_slots)
        b, hkv, n, nb = logits.shape
        flat = logits.permute(0, 2, 1, 3).reshape(b * n, hkv, nb)
        idx = select_decode_blocks(
            flat, request.cache_seqlens.reshape(b * n), DecodePolicy("budget", budget), request.block_size, nb
        )
        return idx.view(b, n, hkv, -1).permute(0, 2, 1, 3).contiguous()

    return select


def ppl(em, books, args) -> dict:
    """Teacher-forced decode-mode NLL of each window's last ``tail`` tokens (session 10's measure): dense, then
    each mode, with paired bootstrap intervals against dense and against ``hyb0``."""
    windows = segment_windows(books, 8192, args.windows)
    tails = {}
    with scaled_rope(em, 8192, "yarn"):
        for mode in ["dense", *args.modes.split(",")]:
            configure_decode(em, "dense" if mode == "dense" else "seer", args.budget, decode_start=8192 - args.tail)
            if mode != "dense":
                em.state.decode_select_fn = make_select(em.model, em.state, args.budget, int(mode.removeprefix("hyb")))
            t0, tails[mode] = time.time(), []
            for w in windows:
                em.state.reset()
                tails[mode].append(token_nll(em.model, w.to(args.device))[-args.tail :].sum().item())
            n = args.tail * len(windows)
            print(f"{mode}: PPL last {args.tail} {math.exp(sum(tails[mode]) / n):.3f} ({time.time() - t0:.0f} s)")
    em.state.decode_select_fn = None
    tokens = [args.tail] * len(windows)
    for mode in tails:
        for ref in ("dense", "hyb0"):
            if mode not in ("dense", ref) and ref in tails:
                d, lo, hi = paired_bootstrap_ppl(tails[ref], tails[mode], tokens)
                print(f"{mode} vs {ref}: {100 * d:+.2f} % [{100 * lo:+.2f}, {100 * hi:+.2f}]")
    return {"windows": len(windows), "tail": args.tail, "window_nll_tail": tails}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="testbed/model")
    p.add_argument("--gates", default="testbed/gates-decode")
    p.add_argument("--prompts", default="all", help="depth:sample,... or all")
    p.add_argument("--modes", default="hyb0,hyb2")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--measure", choices=("passkey", "ppl"), default="passkey")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--tail", type=int, default=2048)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    tok = AutoTokenizer.from_pretrained(args.model)
    books = TokenizedBooks(args.data, tok, split="test")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(args.device)
    em = prepare_decode_model(model, args.gates, name=args.model)
    grid = _prompts(books, tok, 8192, DEPTHS, args.samples, args.seed, PasskeyTemplate(), True)
    if args.prompts == "all":
        specs = [(d, s) for d in DEPTHS for s in range(args.samples)]
    else:
        specs = [(float(x.split(":")[0]), int(x.split(":")[1])) for x in args.prompts.split(",")]
    if args.measure == "ppl":
        result = ppl(em, books, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return
    rows = []
    with scaled_rope(em, 8192, "yarn"):
        for mode in args.modes.split(","):
            configure_decode(em, "seer", args.budget)
            em.state.decode_select_fn = make_select(em.model, em.state, args.budget, int(mode.removeprefix("hyb")))
            right, t0 = 0, time.time()
            for depth, sample in specs:
                prompt = grid[DEPTHS.index(depth)][sample]
                em.state.reset()
                out, _ = decode_answer(em.model, prompt.ids.to(args.device), prompt.answer.numel() + 1)
                got = _first_digits(tok.decode(out, skip_special_tokens=True))
                right += got == prompt.key
                rows.append(dict(mode=mode, depth=depth, sample=sample, key=prompt.key, answer=got))
                if got != prompt.key or args.prompts != "all":
                    print(f"{mode:5s} depth {depth} sample {sample:2d} key {prompt.key} answer {got}", flush=True)
            print(f"{mode}: {right} / {len(specs)} right ({time.time() - t0:.0f} s)", flush=True)
    em.state.decode_select_fn = None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
