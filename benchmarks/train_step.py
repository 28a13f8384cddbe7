"""One training step of a Llama-3.1-8B-shaped model: dense SDPA vs seer's fine-tuning mode (issue 13, section 4).

    python3 -m benchmarks.train_step --seqlens 32768,65536 --density 0.1 --json runs/train_step.json
    python3 -m benchmarks.train_step --smoke    # a tiny model on the CPU: checks that it runs

Builds ``LlamaForCausalLM`` with Llama-3.1-8B's shape (``benchmarks.shapes.LLAMA_31_8B``, ``--layers``
decoder layers, random bf16 weights: speed only) and times one training step of a batch-1 sequence:
forward + backward with gradient checkpointing per decoder layer (transformers' non-reentrant
checkpointing, as ``seerattn finetune`` runs it), bf16 weights and gradients, no optimizer. Median over
``--reps`` after ``--warmup`` (CUDA events), tokens/s and peak memory:

- ``sdpa``: the unmodified model (PyTorch SDPA: FlashAttention-2 forward and backward on the H200);
- ``seer@d``: the same weights with fresh AttnGates in mode ``finetune`` at density ``d`` (``--density``;
  0.1 = 90 % sparsity): gate (with its gradient), policy, block-sparse attention forward and backward
  through the Triton kernels, and the ground-truth pass (``attention_with_block_scores`` under
  ``no_grad``, the gate's target) with the gate loss added to the loss, i.e. everything a joint step
  runs. Untrained gates pick arbitrary blocks; the time depends on how many are kept, which the policy fixes;
- with ``--target-every N`` (> 1, the recipe's ``gate_target_every``) also ``seer@d no-target``: a joint step
  without the gate's target (mode ``sparse``: the gate for the mask only, no ground truth, no gate loss), and
  ``seer@d every-N``: the mean step of a run with a target every N-th step, ``(target + (N - 1) x no-target) / N``
  (peak memory: the larger of the two).

With ``--profile`` each seer row also gets the GPU milliseconds of one profiled step per part
(``benchmarks.prefill.attribute_parts`` over the ranges the integration and the ops name: ``gate_ms``,
``policy_ms``, ``ground_truth_ms``, ``gate_loss_ms`` (the gate's loss, metrics and in-layer backward),
``kernel_ms`` (block-sparse forward, twice with checkpointing), ``transpose_ms`` (the mask's transposed
lists), ``attention_bwd_ms``; ``rest_ms`` = everything else: projections, MLPs, norms and their backward).

What the loss is: the decoder stack's output (after the final norm) through a fixed random projection to
64 values, squared and averaged (plus 10 x the gate loss for seer, whose gradient each layer takes in its
forward, as the trainer does: ``SeerState.gate_grad_scale``). The LM head and its cross-entropy are
left out of both: they cost the same for both (the fine-tuning trainer's chunked loss, ``loss_chunk_tokens``, is
timed on its own by ``benchmarks.lm_loss``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.prefill import PARTS, BreakdownError, profile_parts
from benchmarks.shapes import LLAMA_31_8B, SMOKE_SHAPE, build_llama
from seerattn import SparsityPolicy
from seerattn.gate import GateConfig
from seerattn.hf import SeerConfig, apply_seer_attention, get_seer_state, remove_seer_attention
from seerattn.record import write_record
from seerattn.train.finetune import enable_gradient_checkpointing

GATE = GateConfig(q_pooling=("avg", "max", "min"), q_subblock=16)  # the testbed's gate (block 64)
GATE_LOSS_WEIGHT = 10.0
TRAIN_PARTS = {
    **PARTS,
    "seer.ground_truth": "ground_truth_ms",
    "seer.gate_loss": "gate_loss_ms",
    "seer.mask_transpose": "transpose_ms",
    "seer.attention_backward": "attention_bwd_ms",
}


def train_step(model, ids: torch.Tensor, probe: torch.Tensor) -> None:
    """Forward + backward of the decoder stack (module docstring: what the loss is); gradients accumulate."""
    state = getattr(model, "_seer_state", None)
    if state is not None:  # as the trainer: each layer backpropagates 10 x its gate loss in its forward
        state.gate_grad_scale = GATE_LOSS_WEIGHT
    try:
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # [1, T, H]
    finally:
        if state is not None:
            state.gate_grad_scale = None
    loss = (hidden.float() @ probe).square().mean()
    loss.backward()


def time_step(model, ids: torch.Tensor, probe: torch.Tensor, warmup: int, reps: int) -> tuple[float, float]:
    """Median ms of :func:`train_step` and the peak memory (GiB, CUDA) of the timed steps."""
    cuda = ids.device.type == "cuda"
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + reps):
        model.zero_grad(set_to_none=True)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        train_step(model, ids, probe)
        if cuda:
            end.record()
            torch.cuda.synchronize()
        ms = start.elapsed_time(end) if cuda else (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    model.zero_grad(set_to_none=True)
    return statistics.median(times), peak


def profile_step(model, ids: torch.Tensor, probe: torch.Tensor) -> dict:
    """GPU ms per part of one profiled :func:`train_step` (module docstring), or ``breakdown_error``."""
    model.zero_grad(set_to_none=True)
    try:
        return profile_parts(lambda: train_step(model, ids, probe), ids.device.type == "cuda", TRAIN_PARTS)
    except BreakdownError as e:
        return {"breakdown_error": str(e)}
    finally:
        model.zero_grad(set_to_none=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", help="comma list of sequence lengths (32768,65536; smoke: 256)")
    p.add_argument("--density", type=float, default=0.1, help="seer's block density (0.1 = 90 %% sparsity)")
    p.add_argument("--mask-heads", default="q", choices=["q", "kv"], help="one mask per query head or per group")
    p.add_argument(
        "--target-every",
        type=int,
        default=1,
        help="also time a step without the gate's target and report the mean step of gate_target_every=N",
    )
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 = the real depth, if it fits)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="per-part GPU time of one more step of each seer row")
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, one rep (checks that it runs)")
    p.add_argument("--json", help="write the run record here")
    args = p.parse_args(argv)
    if args.target_every < 1:
        p.error(f"--target-every must be an int >= 1, got {args.target_every}")
    if args.smoke:
        device, shape = "cpu", {**LLAMA_31_8B, **SMOKE_SHAPE, "num_hidden_layers": min(args.layers, 2)}
        seqlens, dtype, impl, args.warmup, args.reps = args.seqlens or "256", torch.float32, "reference", 0, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks.train_step needs a CUDA GPU (or --smoke)")
        device, shape = "cuda", {**LLAMA_31_8B, "num_hidden_layers": args.layers}
        seqlens, dtype, impl = args.seqlens or "32768,65536", torch.bfloat16, None
    cuda = device == "cuda"
    model = build_llama(shape, device, dtype)
    config = model.config
    with torch.device(device):  # drawn right after the weights, as before: same probe for the same seed
        probe = torch.randn(config.hidden_size, 64) / config.hidden_size**0.5
    model.train()  # transformers checkpoints only in training mode (attention dropout is 0)
    enable_gradient_checkpointing(model)
    rows = []
    for t in (int(x) for x in seqlens.split(",")):
        ids = torch.randint(0, config.vocab_size, (1, t), device=device)
        dense_ms, dense_gib = time_step(model, ids, probe, args.warmup, args.reps)
        dense = {"seq_len": t, "method": "sdpa", "ms": dense_ms, "tokens_per_s": t / dense_ms * 1e3}
        rows.append({**dense, "peak_gib": dense_gib, "speedup": 1.0, "density": 1.0})
        print(
            f"T={t:>6} {'sdpa':<18} {dense_ms:9.1f} ms  {t / dense_ms * 1e3:9.0f} tok/s  {dense_gib:6.1f} GiB",
            flush=True,
        )
        policy = SparsityPolicy("density", args.density)
        cfg = SeerConfig(gate=GATE, policy=policy, mode="finetune", impl=impl, mask_heads=args.mask_heads)
        apply_seer_attention(model, cfg)
        label = f"seer@{args.density:g}"
        state = get_seer_state(model)
        timed = {label: time_step(model, ids, probe, args.warmup, args.reps) + (state.mean_density(),)}
        parts = {label: profile_step(model, ids, probe) if args.profile else {}}
        if args.target_every > 1:
            state.set(mode="sparse")  # what FinetuneTask runs on a joint step without the gate's target
            timed[f"{label} no-target"] = time_step(model, ids, probe, args.warmup, args.reps) + (state.mean_density(),)
            parts[f"{label} no-target"] = profile_step(model, ids, probe) if args.profile else {}
            (ms1, gib1, d1), (ms0, gib0, _) = timed.values()
            n = args.target_every
            timed[f"{label} every-{n}"] = ((ms1 + (n - 1) * ms0) / n, max(gib1, gib0), d1)
        remove_seer_attention(model)
        for method, (ms, gib, realised) in timed.items():
            rows.append(
                {
                    "seq_len": t,
                    "method": method,
                    "ms": ms,
                    "tokens_per_s": t / ms * 1e3,
                    "peak_gib": gib,
                    "speedup": dense_ms / ms,
                    "density": realised,
                    **parts.get(method, {}),
                }
            )
            if parts.get(method):
                print(
                    f"T={t:>6} {method:<18} parts: "
                    + ", ".join(
                        f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in parts[method].items()
                    ),
                    flush=True,
                )
            speed = f"{t / ms * 1e3:9.0f} tok/s  {gib:6.1f} GiB  {dense_ms / ms:5.2f}x  density {realised:.3f}"
            print(f"T={t:>6} {method:<18} {ms:9.1f} ms  {speed}", flush=True)
        del ids
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        extra = {"gpu": torch.cuda.get_device_name()} if cuda else {}
        model_info = {"shape": {k: v for k, v in shape.items() if k != "rope_scaling"}, "dtype": str(dtype)}
        write_record(args.json, "bench-train-step", rows, {**vars(args), "device": device}, model_info, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
