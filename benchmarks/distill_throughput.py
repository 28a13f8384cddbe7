"""Distillation throughput of the real trainer on a Llama-3.1-8B-shaped model with random weights.

    python3 -m benchmarks.distill_throughput --seq-len 32768 --steps 4 --data corpus.txt.xz \
        --tokenizer testbed/model --output runs/tput

Builds ``LlamaForCausalLM`` with Llama-3.1-8B's shape (32 layers, hidden 4096, 32/8 heads, D 128,
MLP 14336, vocab 128256, llama3 RoPE) directly on the GPU in bf16 (random weights: speed only), runs
:func:`seerattn.train.distill` for a few steps and prints tokens/s (median over steps after the first)
and the projected GPU-hours of the paper's 0.52 B-token recipe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from benchmarks.shapes import LLAMA_31_8B, build_llama
from seerattn.train import distill, load_recipe

PAPER_TOKENS = 500 * 16 * 65536


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 = the real depth)")
    p.add_argument("--data", required=True, help="a text corpus file for the trainer")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--output", required=True)
    args = p.parse_args()

    model = build_llama({**LLAMA_31_8B, "num_hidden_layers": args.layers}, "cuda", torch.bfloat16)
    recipe = load_recipe(
        "recipes/testbed.yaml",
        [
            f"output_dir={args.output}",
            f"data=[{args.data}]",
            'document_separator="\\x00"',
            f"seq_len={args.seq_len}",
            "batch_size=1",
            "micro_batch_size=1",
            f"steps={args.steps}",
            "warmup_steps=1",
            f"save_every={args.steps + 1}",
            "model=llama-3.1-8b-shaped-random",
        ],
    )
    result = distill(recipe, model=model, tokenizer=AutoTokenizer.from_pretrained(args.tokenizer))
    summary = json.loads((Path(args.output) / "summary.json").read_text())["results"]  # the run record
    tps = summary.get("tokens_per_s_median") or summary.get("tokens_per_s")
    out = {
        "seq_len": args.seq_len,
        "layers": args.layers,
        "steps": result.steps_done,
        "gpu": torch.cuda.get_device_name(),
        "tokens_per_s": tps,
        "projected_gpu_hours_0.52B_tokens": PAPER_TOKENS / tps / 3600 * 32 / args.layers if tps else None,
        "summary": summary,
    }
    print(json.dumps(out, indent=2))
    (Path(args.output) / "throughput.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
