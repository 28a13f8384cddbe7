"""Seer's decode ranking with a few budget slots given to Quest's bound (issue 17's passkey gap): an experiment hook.

On books-sample (240 prompts, H200 bf16, session 14 call 1) seer answers 234, Quest-style 238, the oracle 239: four of
seer's six misses are non-stops at depth 0, where the key's block 0 is always kept, so what seer leaves out is not the
key's first block. Here ``hybN`` gives N of the budget's slots to Quest's N highest-bound completed blocks and fills
the rest by the decode gate's logits (first and current block forced as always); ``hyb0`` is seer's own ranking
recomputed by the hook (a check). The gate's logits, the selection wrapper and the passkey / PPL loops are session
13's (``shifted.py``); the selection (``select_decode_blocks``) and the kernel are the library's.

    python docs/experiments/decode/session14/hybrid.py --data data/books-sample --samples 48 \\
        --prompts 0:9,0:17,0:19,0:34,0.5:11 --modes hyb0,hyb2,hyb4
    python docs/experiments/decode/session14/hybrid.py --device cuda --data .gpu/books-test --measure ppl \\
        --windows 64 --modes hyb0,hyb2,hyb4
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "session13"))
from shifted import DEPTHS, passkey_runs, ppl_runs, prompt_specs, select_with, shifted_logits  # noqa: E402

from seerattn.decode_baselines import quest_block_bounds, quest_block_scores  # noqa: E402
from seerattn.eval.data import TokenizedBooks  # noqa: E402
from seerattn.eval.decode import prepare_decode_model  # noqa: E402
from seerattn.eval.passkey import PasskeyTemplate, _prompts  # noqa: E402


def hybrid_logits(gate, rotary, q, k, lens, quest_slots: int) -> torch.Tensor:
    """[B, Hkv, N, NB]: the gate's logits, with Quest's ``quest_slots`` best completed blocks lifted above all."""
    s = shifted_logits(gate, rotary, q, k, lens, "aligned")
    if quest_slots == 0:
        return s
    kmin, kmax = quest_block_bounds(k, gate.config.block_size)
    qs = quest_block_scores(q, kmin, kmax)[..., : s.shape[-1]].float()
    qs = qs.masked_fill(torch.isinf(s), float("-inf"))  # only the completed blocks the gate may rank
    top = qs.topk(min(quest_slots, qs.shape[-1]), dim=-1)
    lift = torch.zeros_like(s).scatter(-1, top.indices, torch.where(torch.isinf(top.values), 0.0, 1e6))
    return s + lift


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

    def hook(mode: str):  # hybN: N slots to Quest's bound
        logits = functools.partial(hybrid_logits, quest_slots=int(mode.removeprefix("hyb")))
        return select_with(em.model, em.state, args.budget, logits)

    modes = args.modes.split(",")
    if args.measure == "ppl":
        result = ppl_runs(em, books, modes, hook, args.budget, args.windows, args.tail, ("dense", "hyb0"))
    else:
        grid = _prompts(books, tok, 8192, DEPTHS, args.samples, args.seed, PasskeyTemplate(), True)
        specs = prompt_specs(args.prompts, args.samples)
        result = passkey_runs(em, tok, grid, specs, modes, hook, args.budget, args.prompts != "all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
