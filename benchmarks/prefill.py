"""End-to-end prefill time of a Llama-3.1-8B-shaped model: dense SDPA vs seer sparse attention.

    python3 -m benchmarks.prefill --seqlens 8192,32768 --densities 0.1 --json runs/prefill.json

Builds ``LlamaForCausalLM`` with Llama-3.1-8B's shape (random bf16 weights: speed only; the shape is
``benchmarks.shapes.LLAMA_31_8B``) and times one forward of a batch-1 prompt
(``logits_to_keep=1``: only the last position's logits, as a generation's prefill), with CUDA events,
median over ``--reps`` after ``--warmup``:

- ``sdpa``: the unmodified model (PyTorch SDPA, its default backend choice);
- ``seer@d``: the same weights with fresh AttnGates (fp32, as adapters load) (:func:`seerattn.hf.apply_seer_attention`),
  mode ``sparse`` at density ``d`` — gate, policy, block-sparse kernel and the per-layer statistics,
  everything a user's prefill runs. Untrained gates pick arbitrary blocks; the time depends on how
  many blocks are kept, which the policy fixes.

The whole model is timed, so the ratio is what the paper calls time-to-first-token speedup (it
reports 1.3x at 32k / 70 % sparsity up to 2.7x at 128k / 95 %): MLPs and projections stay dense.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import statistics
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.shapes import LLAMA_31_8B
from seerattn import SparsityPolicy
from seerattn.block_mask import ALLOCATIONS
from seerattn.gate import GateConfig
from seerattn.hf import SeerConfig, apply_seer_attention, get_seer_state, remove_seer_attention

GATES = {
    "paper": GateConfig(),
    "windows": GateConfig(q_pooling=("avg", "max", "min"), q_subblock=16),
}


def time_forward(model, ids: torch.Tensor, warmup: int, reps: int) -> float:
    """Median ms of ``model(ids)`` (no grad, no cache, last logits only)."""
    times = []
    with torch.no_grad():
        for i in range(warmup + reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return statistics.median(times)


def sync_report(model, ids: torch.Tensor) -> dict[str, int]:
    """Where one forward synchronises the host with the GPU: ``{"file:line": count}`` from
    ``torch.cuda.set_sync_debug_mode("warn")`` (a sync per layer stalls the GPU once per layer)."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return dict(collections.Counter(where).most_common())


def profile_table(model, ids: torch.Tensor, rows: int) -> str:
    """The ``rows`` ops of one forward with the most GPU time (torch.profiler), to see what the
    sparse path spends beside the attention kernel (its parts are the ranges ``seer.gate``,
    ``seer.policy``, ``seer.attention`` and ``seer.stats``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", default="8192,32768", help="comma list of prompt lengths")
    p.add_argument("--densities", default="0.1", help="comma list of seer densities")
    p.add_argument("--allocation", default="row", choices=ALLOCATIONS)
    p.add_argument(
        "--mask-heads",
        default="q",
        help="comma list from q (one mask per query head), kv (one per GQA group: 4x fewer rows to rank on Llama-8B)",
    )
    p.add_argument("--gate", default="windows", choices=sorted(GATES), help="gate architecture (%(default)s)")
    p.add_argument("--block-sizes", default="64", help="comma list of gate/mask block sizes (%(default)s)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 = the real depth)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sync-report", action="store_true", help="list where a seer forward syncs with the host")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N GPU ops of sdpa and seer")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.prefill needs a CUDA GPU")

    config = LlamaConfig(**{**LLAMA_31_8B, "num_hidden_layers": args.layers}, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    rows = []
    for t in (int(x) for x in args.seqlens.split(",")):
        ids = torch.randint(0, config.vocab_size, (1, t), device="cuda")
        dense_ms = time_forward(model, ids, args.warmup, args.reps)
        rows.append({"seq_len": t, "method": "sdpa", "ms": dense_ms, "speedup": 1.0, "density": 1.0})
        print(f"T={t:>6} sdpa        {dense_ms:9.2f} ms", flush=True)
        if args.profile:
            print(profile_table(model, ids, args.profile))
        for d, heads, bs in itertools.product(
            (float(x) for x in args.densities.split(",")),
            args.mask_heads.split(","),
            (int(x) for x in args.block_sizes.split(",")),
        ):
            policy = SparsityPolicy("density", d, allocation=args.allocation)
            gate = dataclasses.replace(GATES[args.gate], block_size=bs)
            cfg = SeerConfig(gate=gate, policy=policy, mode="sparse", mask_heads=heads)  # type: ignore[arg-type]
            apply_seer_attention(model, cfg)
            ms = time_forward(model, ids, args.warmup, args.reps)
            realised = get_seer_state(model).mean_density()
            if args.profile:
                print(profile_table(model, ids, args.profile))
            if args.sync_report:
                for where, n in sync_report(model, ids).items():
                    print(f"  host sync x{n}: {where}")
            remove_seer_attention(model)
            label = f"seer@{d:g}" + ("" if heads == "q" else f"/{heads}") + ("" if bs == 64 else f"/b{bs}")
            row = {"seq_len": t, "method": label, "block_size": bs, "ms": ms, "density": realised}
            rows.append({**row, "speedup": dense_ms / ms})
            print(f"T={t:>6} {label:<11} {ms:9.2f} ms  {dense_ms / ms:5.2f}x  density {realised:.3f}", flush=True)
    if args.json:
        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
