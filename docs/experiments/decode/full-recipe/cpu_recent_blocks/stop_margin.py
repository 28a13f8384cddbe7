"""Log-probabilities of the step after the pass key's last digit, dense vs seer vs Quest (CPU, fp32, testbed).

    PYTHONPATH=src python docs/experiments/decode/full-recipe/cpu_recent_blocks/stop_margin.py --gates DECODE_ADAPTER

The decode adapter is the 400-step run of section 5 (not committed: its command remakes it). Prompts: the
evaluation's passkey prompts at 8k, depth 0, samples 9 and 19 (the non-stops) and 0, 1 (answered right), budget
1024 tokens; each answer is a prefill of the prompt but its last token, then greedy one-token decode steps.
"""

from __future__ import annotations

import argparse
import inspect

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from seerattn.eval.data import TokenizedBooks
from seerattn.eval.decode import configure_decode, prepare_decode_model
from seerattn.eval.passkey import PasskeyTemplate, _prompts


def steps(em, ids: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """n greedy decode steps after a prefill of ids[:-1]: the tokens and each step's log-probabilities."""
    m = em.model
    ids = ids.view(1, -1)
    kw = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
    with torch.no_grad():
        cache = m(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1)[kw]
        nxt, toks, logps = ids[:, -1:], [], []
        for _ in range(n):
            out = m(input_ids=nxt, use_cache=True, **{kw: cache})
            cache = out[kw]
            lp = out.logits[0, -1].log_softmax(-1)
            nxt = lp.argmax().view(1, 1)
            toks.append(int(nxt))
            logps.append(lp)
    return toks, logps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gates", required=True)
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained("testbed/model")
    books = TokenizedBooks("data/books-sample", tok, split="test")
    model = AutoModelForCausalLM.from_pretrained("testbed/model", dtype=torch.float32, attn_implementation="sdpa")
    em = prepare_decode_model(model, args.gates, 64, None, None, name="testbed")
    grid = _prompts(books, tok, 8192, [0.0], 24, 0, PasskeyTemplate(), True)
    for si in (9, 19, 0, 1):
        prompt = grid[0][si]
        for method in ("dense", "seer", "quest"):
            em.state.reset()
            configure_decode(em, method, 1024)
            toks, lps = steps(em, prompt.ids, 7)
            top = lps[6].topk(3)  # the step after the space and the 5 digits: '.' stops, a digit does not
            cells = [(tok.decode([int(i)]), round(float(v), 3)) for v, i in zip(top.values, top.indices, strict=True)]
            print(si, prompt.key, method, repr(tok.decode(toks)), cells)


if __name__ == "__main__":
    main()
