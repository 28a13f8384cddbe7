"""Mask-estimation time per layer: the seer gate + policy beside the training-free peers.

Everything a method runs between the layer's q/k and the block-sparse kernel, the kernel excluded:

- ``seer@d`` (``/kv``): the AttnGate on pre-RoPE q/k exactly as the sparse path calls it
  (:func:`seerattn.hf.gate_logits`, fresh gates: the cost does not depend on training), the softmax,
  the per-group average for ``/kv``, and :func:`seerattn.mask_from_scores` at density ``d``;
- every other method of ``--methods`` (:mod:`seerattn.eval.methods`) at density ``d`` or, for the
  native ``*_top_p`` methods, at each ``--top-p`` value: its mask function on the layer's q/k
  (the peers' estimators are in :mod:`seerattn.eval.peers`). Estimator-only times are recorded as
  ``score`` rows for XAttention and FlexPrefill (the rest of their row time is the selection).

Shapes are Llama-3.1-8B's (``benchmarks.shapes.ATTENTION["llama3.1-8b"]``: Hq 32, Hkv 8, D 128), bf16,
batch 1, random q/k. GPU times are ``triton.testing.do_bench`` medians; ``--smoke`` runs a tiny shape
on the CPU (perf_counter medians) to check that everything runs.

    python -m benchmarks.mask_cost --seqlens 8192,32768,131072 --json runs/mask_cost.json
    python -m benchmarks.mask_cost --smoke --json /tmp/mask_cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import statistics
import time

import torch

from benchmarks.shapes import ATTENTION, LLAMA_31_8B
from seerattn import SparsityPolicy, mask_from_scores
from seerattn.eval.methods import Setting, get_method
from seerattn.eval.peers import XATTN_STRIDE, flexprefill_estimate, xattention_scores
from seerattn.hf import MaskRequest, SeerConfig, apply_seer_attention, gate_logits, group_scores
from seerattn.record import write_record

logger = logging.getLogger("benchmarks.mask_cost")

DEFAULT_METHODS = "seer,xattention,xattention_top_p,flexprefill,flexprefill_top_p,vertical_slash"
# the estimator alone, for the methods whose selection is a separate step worth seeing
SCORERS = {
    "xattention": lambda req: xattention_scores(req, XATTN_STRIDE),
    "flexprefill": flexprefill_estimate,
}


def bench(fn, device: str, reps: int) -> float:
    """Median ms of ``fn()``: ``do_bench`` on CUDA, perf_counter on the CPU (smoke runs)."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=50)
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gate_model(hq: int, hkv: int, d: int, block_size: int, gate, device: str, dtype) -> torch.nn.Module:
    """A one-layer Llama with the attention shape and seer gates attached (only the gate runs here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**LLAMA_31_8B, "num_hidden_layers": 1, "num_attention_heads": hq, "num_key_value_heads": hkv}
    shape |= {"head_dim": d, "hidden_size": hq * d, "vocab_size": 256}  # the embedding is never used here
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).eval()
    cfg = SeerConfig(gate=dataclasses.replace(gate, block_size=block_size), mode="sparse")
    apply_seer_attention(model, cfg)
    return model


def seer_mask(model, q_pre, k_pre, policy: SparsityPolicy, heads: str):
    """Gate logits -> probabilities -> (group average) -> mask, as the sparse forward builds it."""
    scores = gate_logits(model, 0, q_pre, k_pre).softmax(-1)
    if heads == "kv":
        scores = group_scores(scores, k_pre.shape[1])
    return mask_from_scores(scores, policy, q_pre.shape[2], model.model.layers[0].self_attn.seer_gate.config.block_size)


def main(argv=None) -> int:
    from benchmarks.prefill import GATES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", help="comma list of prompt lengths (8192,32768,131072; smoke: 200,331)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma list of registry methods (%(default)s)")
    p.add_argument("--density", type=float, default=0.1, help="density of the density-budget methods")
    p.add_argument("--top-p", default="0.9", help="comma list of thresholds for the *_top_p methods")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--gate", default="windows", choices=sorted(GATES), help="seer gate architecture")
    p.add_argument("--shape", default="llama3.1-8b", choices=sorted(ATTENTION))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks that it runs)")
    p.add_argument("--reps", type=int, default=3, help="CPU repetitions (smoke)")
    p.add_argument("--json", help="write the run record here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        get_method(m)  # unknown names fail before any work
    if args.smoke:
        device, dtype, (hq, hkv, d) = "cpu", torch.float32, (4, 2, 16)
        seqlens = [int(x) for x in (args.seqlens or "200,331").split(",")]
        block_size = min(args.block_size, 32)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks.mask_cost times CUDA work; use --smoke on a machine without a GPU")
        device, dtype, (hq, hkv, d) = "cuda", torch.bfloat16, ATTENTION[args.shape]
        seqlens = [int(x) for x in (args.seqlens or "8192,32768,131072").split(",")]
        block_size = args.block_size
    top_ps = [float(x) for x in args.top_p.split(",") if x]
    model = gate_model(hq, hkv, d, block_size, GATES[args.gate], device, dtype) if "seer" in methods else None

    rows = []

    def record(t: int, label: str, ms: float, **extra) -> None:
        rows.append({"seq_len": t, "method": label, "ms": ms, **extra})
        logger.info("T=%7d %-24s %9.3f ms%s", t, label, ms, "".join(f"  {k} {v}" for k, v in extra.items()))

    for t in seqlens:
        gen = torch.Generator(device=device).manual_seed(t)
        q = torch.randn(1, hq, t, d, device=device, dtype=dtype, generator=gen)
        k = torch.randn(1, hkv, t, d, device=device, dtype=dtype, generator=gen)
        req = MaskRequest(0, q, k, d**-0.5, block_size, t)
        with torch.no_grad():
            for name in methods:
                m = get_method(name)
                if name == "seer":
                    for heads in ("q", "kv"):
                        policy = SparsityPolicy("density", args.density)
                        call = functools.partial(seer_mask, model, q, k, policy, heads)
                        label = f"seer@{args.density:g}" + ("" if heads == "q" else "/kv")
                        record(t, label, bench(call, device, args.reps), density=call().density())
                    continue
                if m.mask_fn is None:
                    raise ValueError(f"method {name!r} has no mask function to time (mode {m.mode!r})")
                values = top_ps if m.budget == "top_p" else [args.density]
                for v in values:
                    setting = Setting(name, v)
                    call = functools.partial(m.mask_fn, req, setting.policy, 0)
                    record(t, setting.label, bench(call, device, args.reps), density=call().density())
                if name in SCORERS:
                    record(t, f"{name} (score)", bench(functools.partial(SCORERS[name], req), device, args.reps))
        del q, k, req
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        config = {**vars(args), "device": device, "dtype": str(dtype), "heads": [hq, hkv, d], "block": block_size}
        extra = {"gpu": torch.cuda.get_device_name()} if device == "cuda" else {}
        write_record(args.json, "bench-mask-cost", rows, config, environment_extra=extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
