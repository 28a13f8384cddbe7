"""Session 27: why the gate and the density selection take longer inside the model's forward than replayed alone.

    PYTHONPATH=src:. python3 docs/experiments/prefill-gate-policy/session27/inmodel.py --layers 8 --json r.json

Builds the Llama-3.1-8B-shaped model of ``benchmarks.prefill`` (random bf16 weights, ``--layers`` layers, fresh
windowed gates, ``sparse`` at density 0.1, per-query-head masks) and, at 32k tokens:

1. one profiled forward: each gate / policy kernel's device durations (CUPTI, torch.profiler), mean over layers;
2. one forward with ``SeerState.capture``: each layer's pre-RoPE q / k; then, on layers 0, mid and last, the same
   kernels launched eagerly under the profiler (10 calls each, durations the same way): the gate on the captured q / k,
   the selection on the logits it gave, the selection on N(0, 3^2) logits (session 26's replay input), and the gate
   and selection in sequence (the selection reading logits just written, as in the model);
3. the threshold search's passes a row, simulated in PyTorch on both logits (the kernel's 2-bit search with its stop);
4. the replayed CUDA-graph medians (``do_bench_cudagraph``) of the gate and the selection on both inputs.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics

import torch
import triton
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.prefill import GATES, prompt_inputs
from benchmarks.shapes import LLAMA_31_8B, build_llama
from seerattn import SparsityPolicy
from seerattn.block_mask import density_row_budget
from seerattn.hf import SeerConfig, apply_seer_attention, get_seer_state
from seerattn.hf.integration import _gate_forward
from seerattn.ops._triton.select import select_fwd


def kernel_us(run) -> dict[str, list[float]]:
    """Device kernel durations (us) by kernel name of one call of ``run()`` under torch.profiler."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    out = collections.defaultdict(list)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation:
            out[e.name].append(e.time_range.end - e.time_range.start)
    return out


def summary(times: dict[str, list[float]], keep=("pool", "project", "scores", "density", "select", "split")) -> dict:
    return {
        name[:60]: {"n": len(v), "mean_us": statistics.fmean(v), "min_us": min(v), "max_us": max(v)}
        for name, v in times.items()
        if any(k in name for k in keep)
    }


def graph_ms(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def order_key(x: torch.Tensor) -> torch.Tensor:
    """The selection kernel's unsigned fp32 order key, as int64."""
    x = torch.where(x == 0, torch.zeros_like(x), x)
    b = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(b >= 0x80000000, b ^ 0xFFFFFFFF, b | 0x80000000)


def search_passes(logits: torch.Tensor, density: float) -> dict:
    """Passes a row of the density kernel's 2-bit threshold search (sink and diagonal forced, its early stop)."""
    _, h, nq, _ = logits.shape
    dev = logits.device
    causal = torch.ones(nq, nq, dtype=torch.bool, device=dev).tril()
    forced = torch.zeros(nq, nq, dtype=torch.bool, device=dev)
    forced[:, 0] = True
    forced |= torch.eye(nq, dtype=torch.bool, device=dev)
    s = torch.where(forced & causal, float("inf"), logits[0].float())
    key = torch.where(causal, order_key(s), torch.zeros((), dtype=torch.int64, device=dev))  # [H, NQ, NQ]
    i = torch.arange(nq, device=dev)
    k = torch.minimum(density_row_budget(nq, density, dev, "row").to(torch.int64), i + 1).expand(h, nq)[..., None]
    theta = torch.zeros(h, nq, 1, dtype=torch.int64, device=dev)
    n_ge = (i + 1).expand(h, nq)[..., None].clone()
    passes = torch.zeros(h, nq, dtype=torch.int64, device=dev)
    done = n_ge == k
    for bit in range(30, -1, -2):
        live = ~done
        passes += live[..., 0]
        c1, c2 = theta | (1 << bit), theta | (1 << (bit + 1))
        c3 = c1 | c2
        n1, n2, n3 = ((key >= c).sum(-1, keepdim=True) for c in (c1, c2, c3))
        new_t = torch.where(n3 >= k, c3, torch.where(n2 >= k, c2, torch.where(n1 >= k, c1, theta)))
        new_n = torch.where(n3 >= k, n3, torch.where(n2 >= k, n2, torch.where(n1 >= k, n1, n_ge)))
        theta, n_ge = torch.where(live, new_t, theta), torch.where(live, new_n, n_ge)
        done = n_ge == k
    p = passes.float()
    return {"mean": p.mean().item(), "max": p.max().item(), "ties_left": int((~done).sum().item())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=32768)
    p.add_argument("--json")
    args = p.parse_args()
    dev = torch.device("cuda")
    rec: dict = {"layers": args.layers, "seqlen": args.seqlen}
    model = build_llama({**LLAMA_31_8B, "num_hidden_layers": args.layers}, "cuda", torch.bfloat16).eval()
    inputs, _, _ = prompt_inputs(args.seqlen, 1, "none", 0, model.config.vocab_size, dev)
    cfg = SeerConfig(gate=GATES["windows"], policy=SparsityPolicy("density", 0.1), mode="sparse", mask_heads="q")
    apply_seer_attention(model, cfg)
    state = get_seer_state(model)
    state.record_densities = False

    def forward() -> None:
        with torch.no_grad():
            model(**inputs, use_cache=False, logits_to_keep=1)

    for _ in range(2):
        forward()
    torch.cuda.synchronize()
    rec["in_model"] = summary(kernel_us(forward))
    state.capture = True
    forward()
    state.capture = False
    caps = dict(state.captures)
    state.captures.clear()
    t, hq, hkv, d = args.seqlen, 32, 8, 128
    nq = t // 64
    budget = density_row_budget(nq, 0.1, dev, "row")
    g = torch.Generator(device="cpu").manual_seed(0)
    synth = (
        (3.0 * torch.randn(1, hq, nq, nq, generator=g))
        .masked_fill(torch.ones(nq, nq, dtype=torch.bool).triu(1), float("-inf"))
        .to(dev)
    )
    rec["per_layer"] = {}
    for layer in sorted({0, args.layers // 2, args.layers - 1}):
        q_pre = caps[layer][0].reshape(1, t, hq, d).transpose(1, 2)
        k_pre = caps[layer][1].reshape(1, t, hkv, d).transpose(1, 2)
        gate = state._attn_modules[layer].seer_gate

        def run_gate(q_pre=q_pre, k_pre=k_pre, gate=gate):
            with torch.no_grad():
                return _gate_forward(gate, state, q_pre, k_pre, None, None, causal_only=True)

        logits = run_gate()
        causal = torch.ones(nq, nq, dtype=torch.bool, device=dev).tril()
        clean = logits.masked_fill(~causal, float("-inf"))

        def sel(x):
            return select_fwd(x, "density", 0.1, budget, True, True, 0)

        def loop(fn, n=10):
            def run():
                for _ in range(n):
                    fn()

            return run

        def gate_then_select():
            sel(run_gate())

        r = {
            "gate_eager": summary(kernel_us(loop(run_gate))),
            "select_on_model_logits": summary(kernel_us(loop(lambda x=logits: sel(x)))),
            "select_on_synthetic": summary(kernel_us(loop(lambda: sel(synth)))),
            "gate_then_select": summary(kernel_us(loop(gate_then_select))),
            "passes_model": search_passes(clean, 0.1),
            "passes_synthetic": search_passes(synth, 0.1),
            "logit_stats": {"mean": clean[..., causal].mean().item(), "std": clean[..., causal].std().item()},
            "graph_ms": {
                "gate": graph_ms(run_gate),
                "select_model": graph_ms(lambda x=logits: sel(x)),
                "select_synth": graph_ms(lambda: sel(synth)),
                "gate_then_select": graph_ms(gate_then_select),
            },
        }
        rec["per_layer"][layer] = r
        print(json.dumps({"layer": layer, **r}), flush=True)
    rec["in_model_again"] = summary(kernel_us(forward))
    print(json.dumps({"in_model": rec["in_model"], "in_model_again": rec["in_model_again"]}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
