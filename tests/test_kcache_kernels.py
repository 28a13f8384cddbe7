"""The Triton append of the decode-gate key cache (``GateKeyCache(impl="triton")``, ``ops.gate_key_append``)
against the eager append it replaces (``impl="eager"``): interpreter on CPU, compiled on GPU (``-m gpu``).

Sequences start at different block phases (prefill with different lengths and starts), so blocks complete at
different steps; every step's pools, keys and counters are compared.
"""

from __future__ import annotations

import os

import pytest
import torch

from seerattn.gate import DecodeGate, DecodeGateConfig, GateKeyCache
from seerattn.ops import gate_key_append

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("one_thread")


def rotary(x, pos):
    dg = x.shape[-1]
    f = pos.float().unsqueeze(-1) / 10000 ** (torch.arange(0, dg, 2, device=x.device) / dg)
    emb = torch.cat((f, f), -1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def make_gate(poolings, use_rope, hq=4, hkv=2, d=16, bs=16, seed=0, dtype=torch.float32, device="cpu"):
    """A decode gate away from its identity init (pools mixed, a non-trivial norm weight)."""
    g = torch.Generator().manual_seed(seed)
    gate = DecodeGate(hq, hkv, d, DecodeGateConfig(block_size=bs, k_pooling=poolings, use_rope=use_rope))
    with torch.no_grad():
        gate.k_proj.copy_(torch.randn(gate.k_proj.shape, generator=g) * 0.3)
        gate.k_norm.weight.copy_(1 + 0.2 * torch.randn(gate.k_norm.weight.shape, generator=g))
    return gate.to(device=device, dtype=dtype)


def twin_caches(gate, k, lens, starts, max_tokens, device="cpu"):
    """The same prefilled cache twice: one appending eagerly, one with Triton."""
    caches = []
    for impl in ("eager", "triton"):
        c = GateKeyCache(gate, k.shape[0], max_tokens=max_tokens, device=device, impl=impl)
        c.prefill(k, lens, rotary, starts)
        caches.append(c)
    return caches


def assert_same(eager, triton_, atol, rtol=0.0):
    assert torch.equal(triton_.lengths, eager.lengths)
    assert torch.equal(triton_.num_blocks, eager.num_blocks)
    assert torch.equal(triton_._pools, eager._pools)  # max / min / sums: the same fp32 operations
    assert triton_.keys.shape == eager.keys.shape
    torch.testing.assert_close(triton_.keys, eager.keys, atol=atol, rtol=rtol)


@pytest.mark.parametrize("poolings", [("max", "min", "avg"), ("avg",), ("min", "max")])
@pytest.mark.parametrize("use_rope", [True, False])
@pytest.mark.parametrize("k_dtype", [torch.float32, torch.float16])
def test_append_matches_eager(poolings, use_rope, k_dtype):
    """B = 3 sequences in different phases (40 / 7 / 16 prompt tokens, one starting mid-row), 50 steps: every
    sequence completes 3 or 4 blocks, at different steps; all state equal after every step."""
    bs, b, hkv, d, t = 16, 3, 2, 16, 40
    gate = make_gate(poolings, use_rope, hkv=hkv, d=d, bs=bs)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(b, hkv, t, d, generator=g).to(k_dtype)
    lens, starts = torch.tensor([40, 7, 16]), torch.tensor([0, 5, 24])
    eager, triton_ = twin_caches(gate, k, lens, starts, max_tokens=t + 50)
    blocks = eager.num_blocks.clone()
    for _ in range(50):
        k_new = torch.randn(b, hkv, d, generator=g).to(k_dtype)
        eager.append(k_new, rotary)
        triton_.append(k_new, rotary)
        assert_same(eager, triton_, atol=2e-6)
    assert (eager.num_blocks - blocks).tolist() == [3, 3, 3]  # blocks completed, at different steps (phases)
    assert eager.keys.abs().amax(-1).gt(0).sum().item() == hkv * eager.num_blocks.sum().item()  # real keys compared


@pytest.mark.parametrize("use_rope", [True, False])
def test_append_matches_eager_at_a_head_dim_that_is_not_a_power_of_two(use_rope):
    """D = Dg = 24 (the kernel's rows padded to 32, masked; RoPE halves of 12): 3 sequences in different phases,
    20 steps across a block boundary."""
    bs, b, hkv, d, t = 16, 3, 2, 24, 30
    gate = make_gate(("max", "min", "avg"), use_rope, hkv=hkv, d=d, bs=bs)
    g = torch.Generator().manual_seed(2)
    k = torch.randn(b, hkv, t, d, generator=g)
    eager, triton_ = twin_caches(gate, k, torch.tensor([30, 9, 15]), torch.tensor([0, 4, 15]), max_tokens=t + 20)
    for _ in range(20):
        k_new = torch.randn(b, hkv, d, generator=g)
        eager.append(k_new, rotary)
        triton_.append(k_new, rotary)
        assert_same(eager, triton_, atol=2e-6)
    assert eager.num_blocks.tolist() == [3, 1, 2]


def test_append_grows_capacity():
    """A cache allocated for the prompt only: the Triton append writes into the grown keys tensor."""
    gate = make_gate(("max", "min", "avg"), True)
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 2, 16, 16, generator=g)
    eager, triton_ = twin_caches(gate, k, torch.tensor([16, 9]), None, max_tokens=16)
    for _ in range(40):
        k_new = torch.randn(2, 2, 16, generator=g)
        eager.append(k_new, rotary)
        triton_.append(k_new, rotary)
    assert triton_.capacity > 1
    assert_same(eager, triton_, atol=2e-6)


def test_append_clamps_to_capacity():
    """Counters past the capacity (not reachable through the public methods, which reserve room first): the key
    goes to the last slot, as the eager append's clamp."""
    bs = 16
    gate = make_gate(("max", "min", "avg"), True, bs=bs)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 32, 16, generator=g)
    eager, triton_ = twin_caches(gate, k, torch.tensor([32, 20]), None, max_tokens=32)
    for c in (eager, triton_):
        c.lengths.copy_(torch.tensor([9 * bs - 1, 9 * bs - 3]))
        c.num_blocks.copy_(torch.tensor([8, 8]))
    k_new = torch.randn(2, 2, 16, generator=g)
    eager.append(k_new, rotary)
    triton_.append(k_new, rotary)
    cap = triton_.capacity
    assert cap == 4  # grown from 2 for the 33rd token (the host bound), far below the counters
    assert_same(eager, triton_, atol=2e-6)
    assert triton_.keys[0, :, cap - 1].abs().amin() > 0  # sequence 0 completed a block: written to the last slot
    assert not triton_.keys[1, :, 2:].any()  # sequence 1 completed nothing (the grown slots stay zero)
    assert triton_.num_blocks.tolist() == [9, 8]


def test_impl_choice(monkeypatch):
    gate = make_gate(("avg",), False)
    with pytest.raises(ValueError, match="impl must be one of"):
        GateKeyCache(gate, 1, impl="reference")
    auto = GateKeyCache(gate, 1)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto.append_impl(cpu, torch.float32) == "eager"
    assert auto.append_impl(cuda, torch.bfloat16) == "triton"
    assert auto.append_impl(cuda, torch.float64) == "eager"  # rows the kernel does not take
    fp64_gate = make_gate(("avg",), False, dtype=torch.float64)
    assert GateKeyCache(fp64_gate, 1).append_impl(cuda, torch.float32) == "eager"
    assert GateKeyCache(gate, 1, impl="eager").append_impl(cuda, torch.float32) == "eager"
    assert GateKeyCache(gate, 1, impl="triton").append_impl(cpu, torch.float64) == "triton"  # as given: it raises
    forced = GateKeyCache(gate, 1, impl="triton")
    forced.prefill(torch.randn(1, 2, 4, 16))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor outside the interpreter: refused, no fallback
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        forced.append(torch.randn(1, 2, 16))


def _op_args(b=2, hkv=2, d=16, nb=3, dg=16, ck=3, rope=True):
    args = dict(
        k_new=torch.randn(b, hkv, d),
        pools=torch.zeros(b, hkv, ck, d),
        keys=torch.zeros(b, hkv, nb, dg),
        lengths=torch.zeros(b, dtype=torch.long),
        num_blocks=torch.zeros(b, dtype=torch.long),
        k_proj=torch.randn(hkv, ck * d, dg),
        norm_weight=torch.ones(dg),
        eps=1e-6,
        cos=torch.ones(b, 1, dg) if rope else None,
        sin=torch.zeros(b, 1, dg) if rope else None,
    )
    return args, dict(block_size=16, poolings=("max", "min", "avg")[:ck])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(sin=None), "both cos and sin"),
        (dict(k_new=torch.randn(2, 3, 16)), "k_new must be"),
        (dict(pools=torch.zeros(2, 2, 2, 16)), "pools must be"),
        (dict(pools=torch.zeros(2, 2, 3, 16, dtype=torch.float16)), "dtype must be one of"),
        (dict(keys=torch.zeros(2, 2, 3, 15), norm_weight=torch.ones(15), k_proj=torch.randn(2, 48, 15)), "even"),
        (dict(keys=torch.zeros(2, 2, 3, 16, dtype=torch.float16)), "gate's dtype"),
        (dict(lengths=torch.zeros(2, dtype=torch.int32)), "int64"),
        (dict(k_proj=torch.randn(2, 32, 16)), "k_proj must be"),
        (dict(cos=torch.ones(2, 2, 16), sin=torch.ones(2, 2, 16)), "cos must be"),
        (dict(eps=0.0), "eps must be"),
        (dict(pools=torch.zeros(2, 2, 16, 3).transpose(-1, -2)), "unit last stride"),
    ],
)
def test_op_validation(change, match):
    args, kw = _op_args()
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        gate_key_append(**args, **kw)


@pytest.mark.parametrize("kw, match", [(dict(poolings=["avg"]), "tuple"), (dict(poolings=("avg", "avg")), "distinct"),
                                       (dict(block_size=12), "block")])  # fmt: skip
def test_op_validation_options(kw, match):
    args, base = _op_args(ck=1)
    with pytest.raises(ValueError, match=match):
        gate_key_append(**args, **{**base, **kw})


def _on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@pytest.mark.gpu
@pytest.mark.skipif(not _on_gpu(), reason="needs a CUDA GPU and the compiled kernel (no TRITON_INTERPRET)")
@pytest.mark.parametrize(
    "gate_dtype, k_dtype, atol, rtol",
    [(torch.float32, torch.bfloat16, 1e-5, 1e-5), (torch.bfloat16, torch.bfloat16, 0.06, 0.02)],
)
@pytest.mark.parametrize("use_rope", [True, False])
def test_append_matches_eager_gpu(gate_dtype, k_dtype, atol, rtol, use_rope):
    """Llama-3.1-8B's layer shape (Hkv 8, D 128, 64-token blocks), B = 5 in different phases, 200 steps. An fp32
    gate (as the HF integration attaches) matches to summation order; a bf16 gate to its rounding (a bf16
    ulp or two of the unit-RMS keys: the kernel rounds at fewer points than the eager ops)."""
    bs, b, hkv, d, t = 64, 5, 8, 128, 300
    gate = make_gate(("max", "min", "avg"), use_rope, hq=32, hkv=hkv, d=d, bs=bs, dtype=gate_dtype, device="cuda")
    g = torch.Generator().manual_seed(4)
    k = torch.randn(b, hkv, t, d, generator=g).to("cuda", k_dtype)
    lens = torch.tensor([300, 1, 64, 127, 200], device="cuda")
    eager, triton_ = twin_caches(gate, k, lens, None, max_tokens=t + 200, device="cuda")
    for _ in range(200):
        k_new = torch.randn(b, hkv, d, generator=g).to("cuda", k_dtype)
        eager.append(k_new, rotary)
        triton_.append(k_new, rotary)
    assert eager.num_blocks.tolist() == [7, 3, 4, 5, 6]
    assert_same(eager, triton_, atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.skipif(not _on_gpu(), reason="needs a CUDA GPU and the compiled kernel (no TRITON_INTERPRET)")
def test_append_replayed_from_cuda_graph():
    """The Triton append (with the rotary call before it) captured once in a CUDA graph and replayed: the same
    state as eager appends (no host read in the step, the tensors keep their addresses)."""
    bs, b, hkv, d, t, steps = 64, 4, 8, 128, 150, 150
    gate = make_gate(("max", "min", "avg"), True, hq=32, hkv=hkv, d=d, bs=bs, device="cuda")
    g = torch.Generator().manual_seed(5)
    k = torch.randn(b, hkv, t, d, generator=g).to("cuda", torch.bfloat16)
    eager, triton_ = twin_caches(gate, k, torch.tensor([150, 3, 64, 100], device="cuda"), None, t + steps, "cuda")
    rows = torch.randn(steps, b, hkv, d, generator=g).to("cuda", torch.bfloat16)
    static = rows[0].clone()
    for c in (eager, triton_):  # the first step eager (compiles the kernels)
        c.append(rows[0], rotary)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        triton_._append_triton(static, rotary)  # the captured part of append (the host bound is advanced below)
    torch.cuda.current_stream().wait_stream(stream)
    for i in range(1, steps):
        eager.append(rows[i], rotary)
        static.copy_(rows[i])
        triton_.count_replayed_append()
        graph.replay()
    assert triton_.lengths.tolist() == [300, 153, 214, 250]
    assert_same(eager, triton_, atol=1e-5, rtol=1e-5)


def test_hf_generate_with_the_triton_append_equals_the_eager_append(monkeypatch):
    """Sparse decode through seerattn.hf (a tiny Llama, 40-token prompts + 30 tokens over 16-token blocks, a
    StaticCache) with every layer's key cache appending through Triton (the interpreter here): the eager
    append's tokens, logits and per-step block selections."""
    import functools

    from hf_models import GATE, input_ids, make_model

    import seerattn.hf.integration as integration
    import seerattn.ops.kcache as kcache_ops
    from seerattn.decode_policy import DecodePolicy
    from seerattn.hf import DecodeConfig, SeerConfig, apply_seer_attention, decode_gate_modules

    model = make_model("llama")
    decode = DecodeConfig(DecodeGateConfig(block_size=16), DecodePolicy("budget", 48))
    state = apply_seer_attention(model, SeerConfig(gate=GATE, mode="dense", decode=decode))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in decode_gate_modules(model).values():
            gate.k_proj.add_(torch.randn(gate.k_proj.shape, generator=g) * 0.3)
    ids = input_ids(40, b=2)
    launches = []
    real = kcache_ops.gate_key_append
    monkeypatch.setattr(kcache_ops, "gate_key_append", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    runs = {}
    for impl in ("eager", "triton"):
        monkeypatch.setattr(integration, "GateKeyCache", functools.partial(GateKeyCache, impl=impl))
        seen = []
        state.decode_observer = seen.append
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                pad_token_id=0, cache_implementation="static", output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        runs[impl] = (out.sequences, torch.stack(out.logits, 1), [s.blocks.clone() for s in seen])
        if impl == "eager":
            assert not launches
    assert len(launches) == len(runs["triton"][2]) >= 29  # one Triton append per layer and decode step
    assert torch.equal(runs["triton"][0], runs["eager"][0])
    torch.testing.assert_close(runs["triton"][1], runs["eager"][1], atol=1e-5, rtol=1e-5)
    for a, b in zip(runs["triton"][2], runs["eager"][2], strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not _on_gpu(), reason="needs a CUDA GPU and the compiled kernel (no TRITON_INTERPRET)")
def test_block_bounds_update_matches_eager_gpu():
    """BlockBounds.update's kernel against its torch path on a bf16 cache of Llama-3.1-8B's layer shape (Hkv 8,
    D 128, 64-token blocks), B = 5 with left-padding starts, 150 steps, each step under set_sync_debug_mode("error"):
    the bounds are equal bit for bit (min / max of the same values)."""
    from seerattn.gate import BlockBounds

    bs, b, hkv, d, t, steps = 64, 5, 8, 128, 300, 150
    g = torch.Generator().manual_seed(6)
    key = torch.randn(b, hkv, t + steps, d, generator=g).to("cuda", torch.bfloat16)
    starts = torch.tensor([0, 299, 236, 100, 1], device="cuda")
    twins = [BlockBounds(key[:, :, :t], bs, t, impl=impl) for impl in ("eager", "triton")]
    for bounds in twins:
        bounds.refresh(key[:, :, :t], starts)
    for step in range(steps):
        lens = t + step + 1 - starts
        for bounds in twins:
            bounds.reserve(t + step + 1)
            torch.cuda.set_sync_debug_mode("error")
            try:
                bounds.update(key[:, :, : t + step + 1], lens, starts)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(twins[0].kmin, twins[1].kmin) and torch.equal(twins[0].kmax, twins[1].kmax)
