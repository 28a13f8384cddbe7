"""Which KV heads keep the pass key's blocks, seer's decode gate against the attention oracle, on the prompts where
they disagree (session 11: seer misses three keys that the oracle answers).

For the chosen (depth, sample) prompts of `seerattn eval decode --measure passkey` (same prompts: the 22 test books,
context 8192, 24 samples per depth, seed 0), each method answers by greedy generation at a budget of 1/8, and a
decode observer records, per step, layer and KV head, whether the selection holds a block with a digit of the key.
Prints the answer and, per layer, the heads holding the key at the first answer step (step 0: the last prompt token)
and the share over the answer steps. CPU, fp32, ~1 minute:

    python docs/experiments/decode/session11/needle_heads.py --data ../shared/data/books
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from seerattn.eval.data import TokenizedBooks
from seerattn.eval.decode import _NeedleRecorder, configure_decode, decode_answer, prepare_decode_model
from seerattn.eval.model import scaled_rope
from seerattn.eval.passkey import PasskeyTemplate, _first_digits, _prompts, key_token_positions

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="testbed/model")
    p.add_argument("--gates", default="testbed/gates-decode")
    p.add_argument("--prompts", default="0.5:16,0.5:17,0.75:18,0.5:15,0.75:17", help="depth:sample,...")
    p.add_argument("--methods", default="seer,oracle")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(args.model)
    books = TokenizedBooks(args.data, tok, split="test")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    em = prepare_decode_model(model, args.gates, name=args.model)
    template = PasskeyTemplate()
    grid = _prompts(books, tok, 8192, DEPTHS, 24, 0, template, True)
    bs = em.state.config.decode.gate.block_size
    rows = []
    with scaled_rope(em, 8192, "yarn"):
        for spec in args.prompts.split(","):
            depth, sample = float(spec.split(":")[0]), int(spec.split(":")[1])
            prompt = grid[DEPTHS.index(depth)][sample]
            needle = (key_token_positions(tok, prompt, template) // bs).unique()
            for method in args.methods.split(","):
                configure_decode(em, method, 1024)
                em.state.reset()
                rec = _NeedleRecorder(needle)
                em.state.decode_observer = rec
                steps = prompt.answer.numel() + 1
                out, _ = decode_answer(em.model, prompt.ids, steps)
                hits = rec.hits(steps)  # [S, L, Hkv]
                got = _first_digits(tok.decode(out, skip_special_tokens=True))
                row = {
                    "depth": depth, "sample": sample, "key": prompt.key, "method": method, "answer": got,
                    "needle_blocks": needle.tolist(), "step0": hits[0].int().tolist(),
                    "share_by_layer": hits.float().mean((0, 2)).tolist(),
                }  # fmt: skip
                rows.append(row)
                heads = " ".join("".join("x" if h else "." for h in layer) for layer in row["step0"])
                share = " ".join(f"{x:.2f}" for x in row["share_by_layer"])
                print(
                    f"depth {depth} sample {sample:2d} key {prompt.key} blocks {needle.tolist()} {method:7s} "
                    f"answer {got:7s} step-0 heads by layer [{heads}]  share by layer {share}",
                    flush=True,
                )
    em.state.decode_observer = None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
