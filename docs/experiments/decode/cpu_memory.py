"""Where the extra peak memory of sparse decode / sparse prefill in ``generate`` goes: a CPU analysis (section 5).

    PYTHONPATH=. python docs/experiments/decode/cpu_memory.py      # from the repository root, ~20 s on 2 cores

Two parts, both on the CPU (no GPU measurement):

1. Leaked KV caches: ``benchmarks.generate --smoke`` (dense, decode, both; an untimed then a timed ``generate``
   each, as on the H200) with the ``StaticCache`` objects still alive at the start of every ``generate`` counted
   (the garbage collector running as usual).
2. The seer path of one prefill forward (a StaticCache, as ``generate``'s): a 2-layer Llama with the 8B's head
   layout scaled down (Hq 8, Hkv 2, D 128, hidden 1024, MLP 3584), bf16, batch 4, 2048 tokens, under
   ``torch.profiler`` with ``profile_memory``. The attention kernels are stubbed (they allocate their output
   only): on the CPU they are the reference ops, whose [B, H, T, T] softmax the GPU's kernels never make. Per
   named range, for layer 0: the bytes live at its entry (above the forward's start) and its transient peak.
"""

from __future__ import annotations

import functools
import gc
import weakref

import torch
import transformers
from torch._C._profiler import _EventType
from torch.profiler import record_function
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, StaticCache

import benchmarks.generate as bench
import seerattn.hf.integration as integration
from seerattn.block_mask import BlockMask, SparsityPolicy
from seerattn.decode_policy import DecodePolicy
from seerattn.gate import DecodeGateConfig, GateConfig
from seerattn.hf import DecodeConfig, SeerConfig, apply_seer_attention

MIB = 2**20
B, T = 4, 2048
RANGES = ("m.seer_attention", "m.gate_key_prefill", "m.prefill_gate", "m.kernel", "m.sdpa", "m.stats")


def leaked_caches() -> None:
    caches = []
    init, generate = transformers.StaticCache.__init__, bench._generate

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        caches.append(weakref.ref(self))

    def counting_generate(model, ids, new, cache, device):
        print(f"  generate of {new} tokens starts with {sum(c() is not None for c in caches)} earlier KV caches alive")
        return generate(model, ids, new, cache, device)

    transformers.StaticCache.__init__, bench._generate = counting_init, counting_generate
    try:
        bench.main(["--smoke"])
    finally:
        transformers.StaticCache.__init__, bench._generate = init, generate


def _ranged(name, fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return run


def _allocations(prof) -> list[tuple[int, int, int, tuple[str, ...]]]:
    """(time, bytes, allocator total after, enclosing op names) of every allocation and free, in time order."""
    out = []

    def walk(nodes, stack):
        for n in nodes:
            if n.tag == _EventType.Allocation:
                f = n.extra_fields
                out.append((n.start_time_ns, f.alloc_size, f.total_allocated, stack))
            walk(n.children, (*stack, n.name))

    walk(prof.profiler.kineto_results.experimental_event_tree(), ())
    return sorted(out)


def seer_path() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=T + 64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    decode = DecodeConfig(DecodeGateConfig(block_size=64), DecodePolicy("budget", 512))
    config = SeerConfig(GateConfig(block_size=64), SparsityPolicy("density", 0.1), decode=decode, mask_heads="kv")
    state = apply_seer_attention(model, config)
    model.to(torch.bfloat16)
    ids = torch.randint(1, 256, (B, T))
    # stubs and named ranges, as module globals of the integration (restored at the end)
    saved = {n: getattr(integration, n) for n in ("block_sparse_attention", "sdpa_attention_forward")}
    saved |= {n: getattr(integration, n) for n in ("_start_decode_cache", "_gate_logits")}
    out_only = lambda q, *a, **k: torch.zeros_like(q)  # noqa: E731
    integration.block_sparse_attention = _ranged("m.kernel", out_only)
    integration.sdpa_attention_forward = _ranged("m.sdpa", lambda m, q, *a, **k: (out_only(q).transpose(1, 2), None))
    integration._start_decode_cache = _ranged("m.gate_key_prefill", saved["_start_decode_cache"])
    integration._gate_logits = _ranged("m.prefill_gate", saved["_gate_logits"])
    densities = BlockMask.densities
    BlockMask.densities = _ranged("m.stats", densities)
    AttentionInterface.register(integration.ATTN_NAME, _ranged("m.seer_attention", integration.seer_attention_forward))
    try:
        for name in ("dense", "decode", "both"):
            bench.configure(state, name)
            state.reset()
            gc.collect()
            kv = StaticCache(config=model.config, max_cache_len=T + 64)
            with (
                torch.no_grad(),
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
            ):
                model(ids, cache=kv, logits_to_keep=1)
            ev = _allocations(prof)
            base = ev[0][2] - ev[0][1]
            peak, kept = max(e[2] for e in ev) - base, ev[-1][2] - base
            print(f"{name}: forward peak {peak / MIB:.1f} MiB above its start, {kept / MIB:.1f} MiB kept after it")
            for r in RANGES:
                inside = [i for i, e in enumerate(ev) if r in e[3]]
                if not inside:
                    continue
                first = [inside[0]]  # layer 0's call: the first run of consecutive events
                for i in inside[1:]:
                    if i != first[-1] + 1:
                        break
                    first.append(i)
                entry = ev[first[0]][2] - ev[first[0]][1]
                top = max(ev[i][2] for i in first) - entry
                print(f"  {r:<20} live at entry {(entry - base) / MIB:6.1f} MiB, transient peak +{top / MIB:5.1f} MiB")
            biggest = sorted((e for e in ev if e[1] > 0 and any(s.startswith("m.") for s in e[3])), key=lambda e: -e[1])
            for _, size, _, stack in biggest[:4]:
                print(f"    {size / MIB:6.2f} MiB  {' > '.join(stack)[-110:]}")
    finally:
        for n, fn in saved.items():
            setattr(integration, n, fn)
        BlockMask.densities = densities
        AttentionInterface.register(integration.ATTN_NAME, integration.seer_attention_forward)


if __name__ == "__main__":
    print("1. KV caches alive at each generate's start (benchmarks.generate --smoke)")
    leaked_caches()
    print(f"2. one prefill forward, batch {B} x {T} tokens, bf16 (attention kernels stubbed)")
    seer_path()
