"""One launch of ``seerattn.train.finetune`` for the several-GPU runs of issue 18, with its peak memory per rank.

    torchrun --standalone --nproc_per_node 2 -m benchmarks.finetune_multigpu recipes/testbed-yarn-32k.yaml \
        --set output_dir=runs/t2 parallel=fsdp
    torchrun --standalone --nproc_per_node 2 -m benchmarks.finetune_multigpu recipes/testbed-yarn-32k.yaml \
        --shape llama-3-8b --layers 8 --set output_dir=runs/e2 parallel=fsdp init_gates=null distill_steps=1

The run is :func:`seerattn.train.finetune` exactly as ``seerattn finetune RECIPE --set ...`` runs it (same recipe
loading, ``--resume``, ``--stop-after``). What this adds:

- ``--shape llama-3-8b``: the model is built in code with Llama-3-8B's shape (``benchmarks.shapes.LLAMA_31_8B``
  with plain RoPE, theta 500000 and 8192 positions, as Llama-3-8B, the paper's model; ``--layers`` decoder layers)
  and random fp32 weights on the CPU, which is how ``from_pretrained`` hands a model to the trainer (FSDP2 then moves
  each rank's shard to its GPU); the same seed on every rank gives every rank the same weights. The recipe's
  tokenizer is kept (the testbed's ids fit the 128k vocabulary). ``--shape smoke``: the same with tiny widths
  (``DRY=1`` of the shell script, on the CPU);
- each rank writes ``OUTPUT_DIR/peak-rank<r>.json`` (``torch.cuda.max_memory_allocated``/``_reserved`` in GiB over
  the whole launch; ``null`` on the CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from benchmarks.shapes import LLAMA_31_8B

SMOKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def build_model(shape: str, layers: int):
    """Llama-3-8B-shaped (or ``smoke``) ``LlamaForCausalLM`` with random fp32 weights on the CPU (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in LLAMA_31_8B.items() if k != "rope_scaling"}
    fields.update(num_hidden_layers=layers, max_position_embeddings=8192)  # Llama-3-8B: 8k, plain RoPE
    if shape == "smoke":
        fields.update(SMOKE)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--shape", choices=["llama-3-8b", "smoke"], help="build this model in code (random weights)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of --shape")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    from seerattn.train import FinetuneConfig, finetune, load_recipe

    config = load_recipe(args.recipe, [x for group in args.set for x in group], kind=FinetuneConfig)
    model = build_model(args.shape, args.layers) if args.shape else None
    finetune(config, model=model, resume=args.resume, stop_after=args.stop_after)
    cuda = torch.cuda.is_available() and config.device != "cpu"
    peak = {
        "rank": int(os.environ.get("RANK", "0")),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "shape": args.shape,
        "layers": args.layers if args.shape else None,
    }
    (Path(config.output_dir) / f"peak-rank{peak['rank']}.json").write_text(json.dumps(peak) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
