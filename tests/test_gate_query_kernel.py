"""The decode gate's query in one Triton launch (``DecodeGate(query_impl="triton")``, ``ops.gate_decode_query``)
against the eager query it replaces (``query_impl="eager"``): interpreter on CPU, compiled on GPU (``-m gpu``).

Positions are spread over thousands of tokens so that every rotary row differs; the gates are moved away from
their identity init (random projection, non-trivial norm weight) so the projection's every weight counts.
"""

from __future__ import annotations

import os

import pytest
import torch

from seerattn.gate import DecodeGate, DecodeGateConfig
from seerattn.gate.decode_gate import RotaryTable
from seerattn.ops import gate_decode_query

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("one_thread")


class HFStyleRotary:
    """transformers' rotary convention: (x [B, H, N, Dg] for dtype and device, positions [B, N]) -> cos, sin
    [B, N, Dg], computed in fp32 and cast to x's dtype."""

    rope_type = "default"

    def __call__(self, x, pos):
        dg = x.shape[-1]
        f = pos.float().unsqueeze(-1) / 10000 ** (torch.arange(0, dg, 2, device=x.device) / dg)
        emb = torch.cat((f, f), -1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


rotary = HFStyleRotary()


def make_gate(hq=4, hkv=2, d=16, dg=None, use_rope=True, seed=0, dtype=torch.float32, device="cpu"):
    """A decode gate away from its identity init."""
    g = torch.Generator().manual_seed(seed)
    gate = DecodeGate(hq, hkv, d, DecodeGateConfig(block_size=16, gate_dim=dg, use_rope=use_rope))
    with torch.no_grad():
        gate.q_proj.copy_(torch.randn(gate.q_proj.shape, generator=g) * 0.3)
        gate.q_norm.weight.copy_(1 + 0.2 * torch.randn(gate.q_norm.weight.shape, generator=g))
    return gate.to(device=device, dtype=dtype)


def both(gate, q, positions, rot=rotary):
    """(eager, triton) gate queries of one step."""
    out = []
    for impl in ("eager", "triton"):
        gate.query_impl = impl
        with torch.no_grad():
            out.append(gate.decode_query(q, positions, rot if gate.config.use_rope else None))
    return out


POSITIONS = torch.tensor([0, 37, 5000], dtype=torch.int32)  # the steps hand lens - 1 in int32


@pytest.mark.parametrize(
    "hq, hkv, d, dg",
    [(4, 2, 16, None), (4, 4, 16, 8), (8, 2, 12, 16)],
    ids=["llama-like", "G1-Dg8", "G4-D12"],  # D 12: G * D = 48 channels, not a multiple of the 32-row chunk
)
@pytest.mark.parametrize("use_rope", [True, False])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16])
def test_query_matches_eager(hq, hkv, d, dg, use_rope, q_dtype):
    """fp32 gate: equal to the eager query up to the projection's summation order."""
    gate = make_gate(hq, hkv, d, dg, use_rope)
    q = torch.randn(3, hq, d, generator=torch.Generator().manual_seed(1)).to(q_dtype)
    eager, triton_ = both(gate, q, POSITIONS)
    assert triton_.shape == eager.shape == (3, hkv, gate.gate_dim) and triton_.dtype == torch.float32
    torch.testing.assert_close(triton_, eager, atol=2e-6, rtol=0)
    assert eager.abs().amin(-1).gt(0).all()  # every vector compared is a real one (not left unwritten)


def test_query_strided_q_and_rotary_table():
    """q as the decode step hands it (a [B, 1, Hq, D] projection's view: head stride D, batch stride Hq * D * 2
    here, padded) and cos / sin from a RotaryTable (two gathers): the same as the eager query."""
    gate = make_gate()
    base = torch.randn(3, 2, 4, 16, generator=torch.Generator().manual_seed(2))
    q = base[:, 1]  # [3, 4, 16], strides (128, 16, 1)
    assert not q.is_contiguous()
    table = RotaryTable(rotary, 6000, 16, torch.float32, torch.device("cpu"))
    eager, triton_ = both(gate, q, POSITIONS, table)
    torch.testing.assert_close(triton_, eager, atol=2e-6, rtol=0)
    assert torch.equal(eager, both(gate, q, POSITIONS)[0])  # the table is the rotary's own rows


def test_query_fp16_gate():
    """An fp16 gate: within an fp16 rounding or two of the eager query (the kernel rounds its rotation once, the
    eager ops at each product and the sum) and in fp16."""
    gate = make_gate(dtype=torch.float16)
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(3)).half()
    eager, triton_ = both(gate, q, POSITIONS)
    assert triton_.dtype == torch.float16
    torch.testing.assert_close(triton_.float(), eager.float(), atol=4e-3, rtol=2e-3)


def test_query_ignores_autocast():
    """decode_query runs in the gate's dtype whatever the autocast state, on both paths."""
    gate = make_gate()
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, triton_ = both(gate, q, POSITIONS)
    assert eager.dtype == triton_.dtype == torch.float32
    torch.testing.assert_close(triton_, eager, atol=2e-6, rtol=0)


def test_impl_choice(monkeypatch):
    gate = make_gate()
    with pytest.raises(ValueError, match="query_impl must be one of"):
        gate.query_impl = "reference"
    with pytest.raises(ValueError, match="query_impl must be one of"):
        DecodeGate(4, 2, 16, query_impl="flex")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with torch.no_grad():
        assert gate.decode_query_impl(cpu, torch.float32) == "eager"
        assert gate.decode_query_impl(cuda, torch.bfloat16) == "triton"
        assert gate.decode_query_impl(cuda, torch.float64) == "eager"  # queries the kernel does not take
        assert make_gate(dtype=torch.float64).decode_query_impl(cuda, torch.float32) == "eager"  # nor fp64 gates
    assert gate.decode_query_impl(cuda, torch.float32) == "eager"  # gradients on, the weights require them: training
    gate.requires_grad_(False)
    assert gate.decode_query_impl(cuda, torch.float32) == "triton"  # frozen weights, queries without gradients
    assert gate.decode_query_impl(cuda, torch.float32, requires_grad=True) == "eager"
    gate.requires_grad_(True)
    gate.query_impl = "eager"
    assert gate.decode_query_impl(cuda, torch.float32) == "eager"
    gate.query_impl = "triton"  # as given: it raises where it cannot run, never falls back
    assert gate.decode_query_impl(cpu, torch.float64) == "triton"
    q = torch.randn(2, 4, 16)
    with pytest.raises(RuntimeError, match="no backward"):
        gate.decode_query(q, POSITIONS[:2], rotary)  # gradients enabled, the weights require them
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor outside the interpreter: refused
    with torch.no_grad(), pytest.raises(ValueError, match="needs CUDA tensors"):
        gate.decode_query(q, POSITIONS[:2], rotary)


def _op_args(b=2, hq=4, hkv=2, d=16, dg=16, rope=True):
    args = dict(
        q=torch.randn(b, hq, d),
        q_proj=torch.randn(hkv, hq // hkv * d, dg),
        norm_weight=torch.ones(dg),
        eps=1e-6,
        cos=torch.ones(b, 1, dg) if rope else None,
        sin=torch.zeros(b, 1, dg) if rope else None,
    )
    return args


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(sin=None), "both cos and sin"),
        (dict(q=torch.randn(2, 4)), "q must be a non-empty"),
        (dict(q=torch.randn(2, 3, 16)), "does not fit q_proj"),
        (dict(q=torch.randn(2, 4, 8)), "does not fit q_proj"),
        (dict(q_proj=torch.randn(2, 32)), "q_proj must be a non-empty"),
        (dict(q_proj=torch.randn(2, 32, 15), norm_weight=torch.ones(15)), "even"),
        (dict(norm_weight=torch.ones(8)), "norm_weight must be"),
        (dict(norm_weight=torch.ones(16, dtype=torch.float16)), "gate's dtype"),
        (dict(q=torch.randn(2, 4, 16, dtype=torch.float64)), "dtype must be one of"),
        (dict(q=torch.randn(2, 4, 16).bfloat16()), "bf16 is silently wrong"),
        (dict(cos=torch.ones(2, 2, 16), sin=torch.ones(2, 2, 16)), "cos must be"),
        (dict(cos=torch.ones(2, 1, 16, dtype=torch.long), sin=torch.ones(2, 1, 16, dtype=torch.long)), "floating"),
        (dict(q=torch.randn(2, 4, 16, device="meta")), "is on cpu but q is on meta"),
        (dict(eps=0.0), "eps must be"),
        (dict(eps=1), "eps must be"),
    ],
)
def test_op_validation(change, match):
    args = _op_args()
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        gate_decode_query(**args)


def test_op_refuses_gradients():
    args = _op_args()
    args["q"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        gate_decode_query(**args)


def test_hf_generate_with_the_triton_query_equals_the_eager_query(monkeypatch):
    """Sparse decode through seerattn.hf (a tiny Llama, 40-token prompts + 30 tokens over 16-token blocks, a
    StaticCache: the gate query rotates with the shared RotaryTable) with every layer's gate query through Triton
    (the interpreter here): the eager query's tokens, logits and per-step block selections."""
    from hf_models import GATE, input_ids, make_model

    import seerattn.ops.gate_query as gate_query_ops
    from seerattn.decode_policy import DecodePolicy
    from seerattn.hf import DecodeConfig, SeerConfig, apply_seer_attention, decode_gate_modules

    model = make_model("llama")
    decode = DecodeConfig(DecodeGateConfig(block_size=16), DecodePolicy("budget", 48))
    state = apply_seer_attention(model, SeerConfig(gate=GATE, mode="dense", decode=decode))
    gates = decode_gate_modules(model).values()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in gates:
            gate.q_proj.add_(torch.randn(gate.q_proj.shape, generator=g) * 0.3)
    ids = input_ids(40, b=2)
    launches = []
    real = gate_query_ops.gate_decode_query
    monkeypatch.setattr(gate_query_ops, "gate_decode_query", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    runs = {}
    for impl in ("eager", "triton"):
        for gate in gates:
            gate.query_impl = impl
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
    assert len(launches) == len(runs["triton"][2]) >= 29  # one Triton query per layer and decode step
    assert torch.equal(runs["triton"][0], runs["eager"][0])
    torch.testing.assert_close(runs["triton"][1], runs["eager"][1], atol=1e-5, rtol=1e-5)
    for a, b in zip(runs["triton"][2], runs["eager"][2], strict=True):
        assert torch.equal(a, b)


def _on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


needs_gpu = pytest.mark.skipif(not _on_gpu(), reason="needs a CUDA GPU and the compiled kernel (no TRITON_INTERPRET)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "gate_dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 0.06, 0.02)], ids=["fp32", "bf16"]
)
@pytest.mark.parametrize("use_rope", [True, False])
def test_query_matches_eager_gpu(gate_dtype, atol, rtol, use_rope):
    """Llama-3.1-8B's layer shape (Hq 32, Hkv 8, D 128), bf16 queries (the model's), B = 5 at spread positions. An
    fp32 gate (as the HF integration attaches) matches to summation order; a bf16 gate to its rounding (a bf16 ulp
    or two of the unit-RMS vectors: the kernel rounds at fewer points than the eager ops)."""
    gate = make_gate(32, 8, 128, use_rope=use_rope, dtype=gate_dtype, device="cuda")
    q = torch.randn(5, 32, 128, generator=torch.Generator().manual_seed(5)).to("cuda", torch.bfloat16)
    positions = torch.tensor([0, 63, 64, 4097, 131071], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        assert gate.decode_query_impl(q.device, q.dtype) == "triton"  # the automatic choice on CUDA
    eager, triton_ = both(gate, q, positions)
    assert triton_.dtype == gate_dtype
    torch.testing.assert_close(triton_, eager, atol=atol, rtol=rtol)


@pytest.mark.gpu
@needs_gpu
def test_query_replayed_from_cuda_graph():
    """The Triton query with its RotaryTable gathers captured once in a CUDA graph and replayed on new queries and
    positions: the eager query's values (no host read in the step)."""
    gate = make_gate(32, 8, 128, device="cuda")
    table = RotaryTable(rotary, 8192, 128, torch.float32, torch.device("cuda"))
    g = torch.Generator().manual_seed(6)
    qs = torch.randn(20, 4, 32, 128, generator=g).to("cuda", torch.bfloat16)
    ps = torch.randint(0, 8192, (20, 4), generator=g, dtype=torch.int32).to("cuda")
    static_q, static_p = qs[0].clone(), ps[0].clone()
    gate.query_impl = "triton"
    with torch.no_grad():
        gate.decode_query(static_q, static_p, table)  # compiles the kernel outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            out = gate.decode_query(static_q, static_p, table)
        torch.cuda.current_stream().wait_stream(stream)
        for i in range(1, 20):
            static_q.copy_(qs[i])
            static_p.copy_(ps[i])
            graph.replay()
            gate.query_impl = "eager"
            eager = gate.decode_query(qs[i], ps[i], table)
            gate.query_impl = "triton"
            torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_hf_generate_with_the_triton_query_equals_the_eager_query_gpu():
    """A tiny fp32 Llama on the GPU, sparse decode on a StaticCache, steps replayed from CUDA graphs (the default):
    the Triton query (the default on CUDA) selects the eager query's blocks, so the same tokens and logits."""
    from hf_models import GATE, input_ids, make_model

    from seerattn.decode_policy import DecodePolicy
    from seerattn.hf import DecodeConfig, SeerConfig, apply_seer_attention, decode_gate_modules

    model = make_model("llama")
    decode = DecodeConfig(DecodeGateConfig(block_size=16), DecodePolicy("budget", 48))
    apply_seer_attention(model, SeerConfig(gate=GATE, mode="dense", decode=decode))
    gates = decode_gate_modules(model).values()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in gates:
            gate.q_proj.add_(torch.randn(gate.q_proj.shape, generator=g) * 0.3)
    model.to("cuda")
    ids = input_ids(70, b=3).cuda()
    runs = {}
    for impl in ("eager", None):
        for gate in gates:
            gate.query_impl = impl
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                pad_token_id=0, cache_implementation="static", output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        runs[impl] = (out.sequences, torch.stack(out.logits, 1))
    assert torch.equal(runs[None][0], runs["eager"][0])
    torch.testing.assert_close(runs[None][1], runs["eager"][1], atol=1e-4, rtol=1e-4)
