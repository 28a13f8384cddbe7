"""The fused gate kernels (``AttnGate(impl="triton")`` / ``seerattn.ops.gate_block_logits``) against
the eager AttnGate: the same logits within the project's data-derived tolerance (error against an
fp64 run of the eager gate <= 2x the eager fp32 gate's error, plus epsilon), the same ``-inf``
pattern, on tiny shapes under the interpreter (odd T, partial last blocks and windows, GQA,
``q_subblock`` None/1/8/16, blocks 16/32/64, several row and key tiles of the scores kernel, with and
without a Q projection and RoPE)."""

from __future__ import annotations

import os

import pytest
import torch
from kernel_helpers import rel

from seerattn.gate import AttnGate, GateConfig
from seerattn.ops import gate_block_logits

# The interpreter tests run on CPU tensors: on a CUDA machine only with TRITON_INTERPRET=1 set by hand
# (the conftest turns the interpreter on only where there is no GPU); the GPU tests run there instead.
interpreter = pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="interpreter tests run on CPU-only machines (set TRITON_INTERPRET=1 to force)",
)

EPS = 1e-6  # the gate computes in fp32 whatever the input dtype


def _rope(positions: torch.Tensor, dim: int):
    """cos, sin [1, N, dim] fp64 in Hugging Face's layout (frequencies repeated on both halves)."""
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = positions.double()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    return emb.cos()[None], emb.sin()[None]


def _case(hq, hkv, t, d, cfg, dtype, seed=0, batch=2, per_batch_rope=False):
    """(gate with random weights, q, k, cos, sin) for one configuration."""
    g = torch.Generator().manual_seed(seed)
    gate = AttnGate(hq, hkv, d, cfg)
    with torch.no_grad():
        gate.k_proj.copy_(torch.randn(gate.k_proj.shape, generator=g) / d**0.5)
        if gate.q_proj is not None:
            gate.q_proj.copy_(torch.randn(gate.q_proj.shape, generator=g) / d**0.5)
    q = torch.randn(batch, t, hq, d, generator=g).to(dtype).transpose(1, 2)  # the model's strided view
    k = torch.randn(batch, t, hkv, d, generator=g).to(dtype).transpose(1, 2)
    cos = sin = None
    if cfg.use_rope:
        ns = -(-t // cfg.q_step)
        starts = torch.arange(ns) * cfg.q_step + 5
        cos, sin = _rope(starts, gate.gate_dim)
        if per_batch_rope:  # [B, NS, Dg]: a second prompt at other positions
            c2, s2 = _rope(starts + 100, gate.gate_dim)
            cos, sin = torch.cat([cos, c2]), torch.cat([sin, s2])
    return gate, q, k, cos, sin


def _check(gate, q, k, cos, sin):
    """Kernel vs eager fp32 vs eager fp64 (the oracle) on the same inputs."""
    f32 = (None, None) if cos is None else (cos.float(), sin.float())
    with torch.no_grad():
        got = gate(q, k, *f32, impl="triton")
        lowp = gate(q, k, *f32, impl="eager")
        oracle = gate.double()(q.double(), k.double(), cos, sin, impl="eager")
        gate.float()
    assert got.dtype == torch.float32 and got.shape == lowp.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(oracle)), "-inf pattern differs from the eager gate"
    fin = torch.isfinite(oracle)
    assert torch.isfinite(got[fin]).all()
    err, lp_err = rel(got[fin], oracle[fin]), rel(lowp[fin], oracle[fin])
    assert err <= 2 * lp_err + EPS, f"error {err:.3g} vs eager fp32 {lp_err:.3g}"
    return got


CASES = [
    # hq, hkv, t, d, config
    (4, 2, 45, 16, GateConfig(block_size=32)),  # odd T, partial last block, GQA 2, paper gate
    (4, 1, 97, 32, GateConfig(block_size=32, q_subblock=16, q_pooling=("avg", "max", "min"))),  # windows
    (2, 2, 130, 16, GateConfig(block_size=64, q_subblock=16, q_pooling=("avg", "max", "min"))),  # block 64
    (4, 2, 64, 16, GateConfig(block_size=64)),  # one full block
    (4, 2, 33, 16, GateConfig(block_size=32, k_pooling=("avg",), use_rope=False)),
    (4, 4, 70, 16, GateConfig(block_size=32, q_pooling=("max",), k_pooling=("min", "max"), gate_dim=8, use_rope=False)),
    (2, 1, 50, 16, GateConfig(block_size=32, q_subblock=16, q_pooling=("max",), q_projection=False)),
    (4, 2, 1, 16, GateConfig(block_size=32, q_subblock=16)),  # one token
    (2, 1, 70, 16, GateConfig(block_size=32, q_subblock=16, gate_dim=6)),  # RoPE on Dg 6: halves of 3 in 4 lanes
    # several row and key tiles of the scores kernel (interpreter tile: 16 windows, 16 key blocks)
    (2, 1, 557, 16, GateConfig(block_size=32, q_subblock=8, q_pooling=("avg", "max", "min"))),  # R 4, 18 blocks,
    # the last with 2 of its 4 windows
    (2, 2, 300, 16, GateConfig(block_size=16)),  # R 1, 19 blocks
    (2, 1, 100, 16, GateConfig(block_size=32, q_subblock=1)),  # R 32: one block per program, 32 windows
]


@interpreter
@pytest.mark.parametrize("hq,hkv,t,d,cfg", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_gate_equals_eager_gate(hq, hkv, t, d, cfg, dtype):
    _check(*_case(hq, hkv, t, d, cfg, dtype, seed=t))


@interpreter
def test_fused_gate_per_batch_rope_and_identity_init():
    """cos/sin given per batch entry; the untrained (identity-initialised) gate."""
    cfg = GateConfig(block_size=32, q_subblock=16, q_pooling=("avg", "max", "min"))
    gate, q, k, cos, sin = _case(4, 2, 77, 16, cfg, torch.float32, per_batch_rope=True)
    _check(gate, q, k, cos, sin)
    gate.reset_parameters()
    _check(gate, q, k, cos, sin)


@interpreter
def test_impl_resolution_and_errors():
    gate, q, k, cos, sin = _case(4, 2, 40, 16, GateConfig(block_size=32), torch.float32)
    cos, sin = cos.float(), sin.float()
    # None on the CPU is the eager gate (bitwise), and training needs the eager gate
    torch.testing.assert_close(gate(q, k, cos, sin), gate(q, k, cos, sin, impl="eager"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no backward"):
        gate(q, k, cos, sin, impl="triton")  # the weights require grad
    with pytest.raises(ValueError, match="impl must be"):
        gate(q, k, cos, sin, impl="fused")
    with torch.no_grad():
        with pytest.raises(ValueError, match="needs cos and sin"):
            gate(q, k, impl="triton")
        with pytest.raises(ValueError, match="cos/sin must be"):
            gate(q, k, cos[:, :1], sin[:, :1], impl="triton")
        with pytest.raises(TypeError, match="bf16"):
            gate(q.bfloat16(), k.bfloat16(), cos, sin, impl="triton")
    w = gate.k_proj.detach()
    kw = dict(block_size=32, q_step=16, q_pooling=("avg",), k_pooling=("max", "min", "avg"))
    with pytest.raises(ValueError, match="k_proj must be"):
        gate_block_logits(q, k, w[:, :16], None, cos, sin, **kw)
    with pytest.raises(ValueError, match="q_step must be"):
        gate_block_logits(q, k, w, None, cos, sin, **{**kw, "q_step": 48})
    with pytest.raises(ValueError, match="does not match q"):
        gate_block_logits(q, k[:, :, :20], w, None, cos, sin, **kw)


@interpreter
@pytest.mark.parametrize("mask_heads", ["kv", "q"])
def test_sparse_mode_with_fused_gate_and_selection_kernel(monkeypatch, mask_heads):
    """A tiny Llama in sparse mode: gate_impl='triton' (interpreter) builds the same masks as the eager
    gate and policies, hence the same logits; record_densities=False leaves the densities out. Per-query-head masks
    take the logits straight to the policy, so the fused gate is asked for their causal part only (causal_only)."""
    from hf_models import input_ids, make_model

    import seerattn.ops
    from seerattn import SparsityPolicy
    from seerattn.hf import SeerConfig, apply_seer_attention, integration, remove_seer_attention

    recorded, causal_only = [], []
    real, real_gate = integration.block_sparse_attention, seerattn.ops.gate_block_logits

    def spy(q, k, v, mask, **kwargs):
        recorded.append(mask)
        return real(q, k, v, mask, **kwargs)

    def gate_spy(*args, **kwargs):
        causal_only.append(kwargs["causal_only"])
        return real_gate(*args, **kwargs)

    monkeypatch.setattr(integration, "block_sparse_attention", spy)
    monkeypatch.setattr(seerattn.ops, "gate_block_logits", gate_spy)
    model, ids = make_model("llama"), input_ids(150)
    gate = GateConfig(block_size=32, q_subblock=16, q_pooling=("avg", "max", "min"))
    runs = {}
    for gate_impl in ("eager", "triton"):
        cfg = SeerConfig(gate=gate, policy=SparsityPolicy("density", 0.4), gate_impl=gate_impl, mask_heads=mask_heads)
        state = apply_seer_attention(model, cfg)
        recorded.clear()
        with torch.no_grad():
            runs[gate_impl] = (model(ids).logits, list(recorded))
        assert 0.4 <= state.mean_density() < 1.0
        state.record_densities = False
        with torch.no_grad():
            model(ids)
        assert all(st == {"path": "sparse"} for st in state.stats.values())
        with pytest.raises(RuntimeError, match="record_densities"):
            state.mean_density()
        remove_seer_attention(model)
    for a, b in zip(runs["eager"][1], runs["triton"][1], strict=True):
        assert torch.equal(a.kv_num_blocks, b.kv_num_blocks) and torch.equal(a.kv_indices, b.kv_indices)
    torch.testing.assert_close(runs["triton"][0], runs["eager"][0], rtol=0, atol=0)
    assert causal_only and set(causal_only) == {mask_heads == "q"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cfg", [GateConfig(), GateConfig(q_pooling=("avg", "max", "min"), q_subblock=16)])
def test_fused_gate_bf16_32k_equals_eager(cfg):
    """Llama-3.1-8B-shaped heads (D = 128, GQA 4; 8 query heads to keep the eager oracle small), bf16
    inputs at 32k tokens; per head the kernel's logits (fp32) against the eager gate in fp32 and fp64."""
    hq, hkv, t, d = 8, 2, 32768, 128
    gate, q, k, cos, sin = _case(hq, hkv, t, d, cfg, torch.bfloat16, batch=1)
    gate, q, k, cos, sin = gate.cuda(), q.cuda(), k.cuda(), cos.cuda(), sin.cuda()
    _check(gate, q, k, cos, sin)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_gate_policy_and_kernel_run_without_host_sync():
    """A sparse layer's gate (fused), policy (selection kernel) and attention at 8k, Llama-3.1-8B heads:
    no synchronising call (``set_sync_debug_mode("error")`` raises on one)."""
    from seerattn import SparsityPolicy, block_sparse_attention, mask_from_scores

    t = 8192
    cfg = GateConfig(q_pooling=("avg", "max", "min"), q_subblock=16)
    gate, q, k, cos, sin = _case(32, 8, t, 128, cfg, torch.bfloat16, batch=1)
    gate, q, k, cos, sin = gate.cuda(), q.cuda(), k.cuda(), cos.cuda().float(), sin.cuda().float()

    def layer():
        with torch.no_grad():
            probs = gate(q, k, cos, sin).softmax(-1)
            mask = mask_from_scores(probs, SparsityPolicy("density", 0.1), t, 64)
            return block_sparse_attention(q, k, k, mask)

    layer()  # compile and tune outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


@interpreter
def test_scores_precision_is_checked():
    """The scores kernel's dot precision is one of the listed ones; anything else is refused by name."""
    from seerattn.ops._triton import gate_fwd

    gate, q, k, cos, sin = _case(4, 2, 64, 16, GateConfig(block_size=32, q_subblock=16), torch.float32)
    args = (q, k, gate.k_proj, gate.q_proj, cos.float(), sin.float(), 32, 16, ("avg",), ("max", "min", "avg"))
    ref = gate_fwd.gate_logits_fwd(*args, precision="ieee")
    # the interpreter computes the fp16 products in exact fp32: tf32x3's split (hi.hi + hi.lo + lo.hi of 22-bit
    # halves) misses only lo.lo (< 2^-22 of each product) and sums in another order
    got = gate_fwd.gate_logits_fwd(*args, precision="tf32x3")
    assert not torch.equal(got, ref)  # the split ran (not the single fp32 dot)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"one of \('ieee', 'tf32x3', 'tf32'\), got 'bf16'"):
        gate_fwd.gate_logits_fwd(*args, precision="bf16")


@interpreter
@pytest.mark.parametrize(
    "hq,hx,n,c,dg,rope", [(4, 2, 37, 48, 6, True), (2, 2, 16, 16, 32, True), (4, 1, 70, 40, 8, False)]
)
def test_projection_kernel_equals_matmul_then_rotary(hq, hx, n, c, dg, rope):
    """``_project``: pooled rows [B, Hx, N, C] x W [Hq, C, Dg] (query head h reads input head h // G), then
    rotate-half at cos/sin row n * c_step — against torch's matmul and the eager gate's apply_rotary, on ragged
    tiles (N, C not multiples of the tile; Dg / 2 odd) and per-batch tables."""
    from seerattn.gate import apply_rotary
    from seerattn.ops._triton import gate_fwd

    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, hx, n, c, generator=g)
    w = torch.randn(hq, c, dg, generator=g)
    step = 3
    cos = sin = None
    if rope:
        ang = torch.rand(2, n * step, dg // 2, generator=g) * 6
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    got = gate_fwd._project(x, w, cos, sin, step, "ieee")
    want = torch.matmul(x.repeat_interleave(hq // hx, 1), w)
    if rope:
        want = apply_rotary(want, cos[:, ::step], sin[:, ::step])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@interpreter
def test_split_pooling_keeps_22_bits_of_every_row_in_fp16_range():
    """``_pool(split=True)``: each pooled row as fp16 halves of the row times a power of two, and its inverse —
    (hi + lo) * inv equals the fp32 pooling to 2^-22 of the row's largest value, the scaled largest lies in
    [2^14, 2^15) (fp16's range, whatever the row's magnitude: rows from 1e-30 to 1e30 here), and an all-zero row
    gives zeros and a finite scale."""
    from seerattn.ops._triton import gate_fwd

    g = torch.Generator().manual_seed(3)
    t, d, step = 150, 16, 16  # 10 windows, the last partial
    x = torch.randn(1, 2, t, d, generator=g) * torch.logspace(-30, 30, t)[None, None, :, None]
    x[:, 1, :step] = 0.0  # head 1's first window all zero
    pools = ("avg", "max", "min")
    ref = gate_fwd._pool(x, step, pools, (16, 4))
    split = gate_fwd._pool(x, step, pools, (16, 4), split=True)
    halves, inv = split.halves, split.inv
    assert split.lo_pools == 0b111 and split.pool_dim == d  # fp32 inputs: every pooling has lo halves
    c = ref.shape[-1]
    assert halves.dtype == torch.float16 and halves.shape == (*ref.shape[:3], 2 * c) and inv.shape == ref.shape[:3]
    hi, lo = halves[..., :c].double(), halves[..., c:].double()
    row_max = ref.double().abs().amax(-1)
    got = (hi + lo) * inv.double()[..., None]
    assert ((got - ref.double()).abs().amax(-1) <= 2.0**-22 * row_max).all()
    scaled_max = hi.abs().amax(-1)
    live = row_max > 0
    assert ((scaled_max[live] >= 2.0**14) & (scaled_max[live] < 2.0**15)).all()
    assert (halves[0, 1, 0] == 0).all() and torch.isfinite(inv).all()


@interpreter
@pytest.mark.parametrize("pools", [("avg", "max", "min"), ("max", "min", "avg"), ("min", "avg"), ("max",)])
def test_split_pooling_of_16_bit_inputs_keeps_lo_halves_of_averages_only(pools):
    """A 16-bit input's max / min channels are its own values: their ``hi`` halves hold them exactly (no ``lo`` halves
    written), the average's ``lo`` halves follow the ``hi`` ones, and the rows equal the fp32 pooling as before."""
    from seerattn.ops._triton import gate_fwd

    g = torch.Generator().manual_seed(6)
    t, d, step = 150, 16, 16
    x = (torch.randn(1, 2, t, d, generator=g) * torch.logspace(-3, 3, t)[None, None, :, None]).half()
    ref = gate_fwd._pool(x, step, pools, (16, 4)).double()
    split = gate_fwd._pool(x, step, pools, (16, 4), split=True)
    lo_pools = [p for p, name in enumerate(pools) if name == "avg"]
    c = len(pools) * d
    assert split.lo_pools == sum(1 << p for p in lo_pools) and split.halves.shape[-1] == c + d * len(lo_pools)
    inv = split.inv.double()[..., None]
    for p, name in enumerate(pools):
        hi = split.halves[..., p * d : (p + 1) * d].double()
        want = ref[..., p * d : (p + 1) * d]
        if name == "avg":
            j = lo_pools.index(p)
            lo = split.halves[..., c + j * d : c + (j + 1) * d].double()
            row_max = ref.abs().amax(-1, keepdim=True)
            assert ((hi + lo) * inv - want).abs().le(2.0**-22 * row_max).all()
        else:
            assert torch.equal(hi * inv, want)  # exact


@interpreter
@pytest.mark.parametrize("rope", [True, False])
def test_split_projection_of_16_bit_inputs_equals_the_fp64_projection(rope):
    """The projection of a 16-bit input's split rows (``lo`` halves for the averages only, K's and Q's poolings in
    other orders in one launch) equals the fp64 projection to 1e-6 a row."""
    from seerattn.gate import apply_rotary
    from seerattn.ops._triton import gate_fwd

    g = torch.Generator().manual_seed(7)
    hq, hx, t, d, step = 4, 2, 300, 16, 16
    xk = (torch.randn(1, hx, t, d, generator=g) * torch.logspace(-3, 3, t)[None, None, :, None]).half()
    xq = (torch.randn(1, hq, t, d, generator=g) * 100).half()
    pk, pq = ("max", "min", "avg"), ("avg", "max", "min")
    dg = 12
    wk = torch.randn(hq, 3 * d, dg, generator=g)
    wq = torch.randn(hq, 3 * d, dg, generator=g) * 1e3
    n = -(-t // step)
    cos = sin = None
    if rope:
        ang = torch.rand(1, n, dg // 2, generator=g) * 6
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    kp, qp = gate_fwd._pool(xk, step, pk, (16, 4), True, second=(xq, step, pq, 16, True))
    (kh, ki), (qh, qi) = gate_fwd._project(kp, wk, cos, sin, 1, "tf32x3", second=(qp, wq, 1))
    for x, pools, w, h, i in ((xk, pk, wk, kh, ki), (xq, pq, wq, qh, qi)):
        rows = gate_fwd._pool(x, step, pools, (16, 4)).double()
        want = torch.matmul(rows.repeat_interleave(hq // x.shape[1], 1), w.double())
        if rope:
            want = apply_rotary(want, cos.double(), sin.double())
        got = (h[..., :dg].double() + h[..., dg:].double()) * i.double()[..., None]
        assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < 1e-6


@interpreter
def test_split_weights_are_kept_until_the_weights_change():
    """The split weights are made once per weights (kept on the tensor) and made again after an in-place update of
    either, after new data at either, never kept for inference tensors; always equal to a fresh split."""
    from seerattn.ops._triton import gate_fwd

    def fresh_equal(got, w, w2):
        want = gate_fwd._split_weights(w, w2)
        return all(torch.equal(a, b) for x, y in zip(got, want, strict=True) for a, b in zip(x, y, strict=True))

    g = torch.Generator().manual_seed(0)
    w, w2 = torch.randn(2, 48, 16, generator=g), torch.randn(2, 16, 16, generator=g)
    first = gate_fwd._split_weights_cached(w, w2)
    assert gate_fwd._split_weights_cached(w, w2) is first and fresh_equal(first, w, w2)
    w.mul_(3.0)  # in place: the version moves
    after = gate_fwd._split_weights_cached(w, w2)
    assert after is not first and fresh_equal(after, w, w2)
    w2.data = torch.randn(2, 16, 16, generator=g)  # new data behind the same tensor (the other weights)
    swapped = gate_fwd._split_weights_cached(w, w2)
    assert swapped is not after and fresh_equal(swapped, w, w2)
    alone = gate_fwd._split_weights_cached(w)  # one job (a gate without a Q projection): not the pair's entry
    assert all(torch.equal(a, b) for a, b in zip(alone, gate_fwd._split_weights(w), strict=True))
    with torch.inference_mode():
        wi = torch.randn(2, 48, 16)
    assert gate_fwd._split_weights_cached(wi) is not gate_fwd._split_weights_cached(wi)


@interpreter
def test_split_weights_keep_22_bits_of_each_column_pair():
    """``_split_weights``: each head's rotate-half pair of gate channels (columns j and j + Dg / 2 of ``[C, Dg]``)
    times the power of two that puts the pair's largest in [2^14, 2^15), as fp16 hi rows then lo rows, the inverse
    per (head, pair) — 2^-22 of the pair's largest, for pairs from 1e-20 to 1e20 (an fp16 copy would flush or
    overflow) and an all-zero pair; two weights in one launch (different C) equal each alone; more pairs than a
    program takes."""
    from seerattn.ops._triton import gate_fwd

    g = torch.Generator().manual_seed(4)
    half = 10
    w = torch.randn(3, 40, 2 * half, generator=g) * torch.logspace(-20, 20, half).repeat(2)
    w[1, :, [7, 7 + half]] = 0.0
    w[2, :, 3] *= 1e-3  # a pair whose halves differ: one scale for both
    w2 = torch.randn(3, 24, 2 * half, generator=g)
    (halves, inv), (halves2, inv2) = gate_fwd._split_weights(w, w2)
    assert inv.shape == (3, half) and halves.shape == (3, 80, 2 * half) and halves.dtype == torch.float16
    assert torch.equal(gate_fwd._split_weights(w2)[0], halves2)
    for x, h, i in ((w, halves, inv), (w2, halves2, inv2)):
        c = x.shape[1]
        got = (h[:, :c].double() + h[:, c:].double()) * i.double().repeat(1, 2)[:, None, :]
        col_max = x.double().abs().amax(1)
        pair_max = torch.maximum(col_max[:, :half], col_max[:, half:]).repeat(1, 2)
        assert ((got - x.double()).abs() <= 2.0**-22 * pair_max[:, None, :]).all()
        scaled = h[:, :c].double().abs().amax(1)
        scaled_pair = torch.maximum(scaled[:, :half], scaled[:, half:])
        live = pair_max[:, :half] > 0
        assert ((scaled_pair[live] >= 2.0**14) & (scaled_pair[live] < 2.0**15)).all()
    assert (halves[1, :, [7, 7 + half]] == 0).all() and torch.isfinite(inv).all()


@interpreter
@pytest.mark.parametrize("rope", [True, False])
def test_split_projection_equals_the_fp64_projection(rope):
    """``_project`` at tf32x3 (split rows and weights, three fp16 products a step, the gate vectors written split):
    the fp64 matmul (then rotate-half) to a relative error of 1e-6, with pooled rows and weights far outside fp16's
    range (1e-12 to 1e12), GQA (query head h reads row head h // 2), ragged tiles; the IEEE path on the same rows
    agrees."""
    from seerattn.gate import apply_rotary
    from seerattn.ops._triton import gate_fwd

    g = torch.Generator().manual_seed(5)
    hq, hx, t, d, step = 4, 2, 300, 16, 16
    x = torch.randn(2, hx, t, d, generator=g) * torch.logspace(-12, 12, t)[None, None, :, None]
    pools = ("avg", "max", "min")
    rows = gate_fwd._pool(x, step, pools, (16, 4))
    split = gate_fwd._pool(x, step, pools, (16, 4), split=True)
    n, c, dg = rows.shape[2], rows.shape[3], 10
    w = torch.randn(hq, c, dg, generator=g) * torch.tensor([1e-6, 1.0, 1e6, 3e4])[:, None, None]
    w[2, :, 3] *= 1e-9  # a column far below its head's others
    cos = sin = None
    if rope:
        ang = torch.rand(1, n, dg // 2, generator=g) * 6
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    want = torch.matmul(rows.double().repeat_interleave(hq // hx, 1), w.double())
    if rope:
        want = apply_rotary(want, cos.double(), sin.double())
    halves, inv = gate_fwd._project(split, w, cos, sin, 1, "tf32x3")  # the gate vectors split too
    assert halves.dtype == torch.float16 and halves.shape[-1] == 2 * dg
    got = (halves[..., :dg].double() + halves[..., dg:].double()) * inv.double()[..., None]
    ieee = gate_fwd._project(rows, w, cos, sin, 1, "ieee")
    for out in (got, ieee):
        # per (head, row): the error against the row's own scale (rows span 24 decades)
        err = (out.double() - want).norm(dim=-1) / want.norm(dim=-1)
        assert err.max() < 1e-6


@interpreter
@pytest.mark.parametrize("q_split", [True, False], ids=["windows-split", "windows-fp32"])
def test_split_scores_equal_the_fp64_scores(q_split):
    """``_scores`` at tf32x3: key vectors split by the projection (fp16 halves and an inverse scale a block), the
    windows split too or fp32 (the paper's gate: split in the kernel), vectors from 1e-10 to 1e10 a row — the
    log-sum-exp over each block's windows of the fp64 scores, to 1e-6 of each logit's scale, -inf above the
    diagonal."""
    from seerattn.ops._triton import gate_fwd

    g = torch.Generator().manual_seed(6)
    hq, ns, r, dg = 2, 40, 4, 24  # 10 blocks of 4 windows
    nb = ns // r
    qg = torch.randn(1, hq, ns, dg, generator=g) * torch.logspace(-10, 10, ns)[:, None]
    kg = torch.randn(1, hq, nb, dg, generator=g) * torch.logspace(10, -10, nb)[:, None]

    split = _split_vectors
    got = gate_fwd._scores(split(qg) if q_split else qg, split(kg), r, "tf32x3")
    s = torch.einsum("bhid,bhjd->bhij", qg.double(), kg.double()) / dg**0.5  # [B, H, NS, NB]
    want = torch.logsumexp(s.view(1, hq, nb, r, nb), 3)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert torch.isinf(got[..., ~causal]).all() and (got[..., ~causal] < 0).all()
    scale = (
        qg.double().norm(dim=-1).view(1, hq, nb, r).amax(-1)[..., None] * kg.double().norm(dim=-1)[:, :, None]
    ) / dg**0.5
    assert ((got.double() - want).abs()[..., causal] <= 1e-6 * scale[..., causal] + 1e-12).all()
    # two key tiles a loop iteration (the default at tf32x3) and one: the same logits bit for bit
    assert torch.equal(got, gate_fwd._scores(split(qg) if q_split else qg, split(kg), r, "tf32x3", steps=1))


def _split_vectors(x: torch.Tensor):
    """Gate vectors [..., Dg] as the projection writes them split: (fp16 halves [..., 2 * Dg] of the row times the power
    of two that puts its largest in [2^14, 2^15), inverse scales [...])."""
    e = torch.frexp(x.abs().amax(-1))[1] - 1  # 2^e <= amax < 2^(e + 1)
    v = x * torch.exp2(14 - e.float())[..., None]
    hi = v.half()
    return torch.cat([hi, (v - hi.float()).half()], -1), torch.exp2(e.float() - 14)


@interpreter
@pytest.mark.parametrize("r,nb", [(4, 18), (1, 33), (2, 16)])
def test_scores_take_two_key_tiles_an_iteration_with_the_same_logits(r, nb):
    """The scores kernel's loop over key tiles, two a loop iteration (the last iteration's second tile past the
    diagonal, or past NB) and one: the same logits bit for bit, -inf above the diagonal, at the interpreter's tile (16
    windows, 16 key blocks): rows of 1, 2 or several key tiles, an odd count of them, R 1 / 2 / 4."""
    from seerattn.ops._triton import gate_fwd

    g = torch.Generator().manual_seed(nb)
    qg, kg = torch.randn(2, 3, nb * r, 32, generator=g), torch.randn(2, 3, nb, 32, generator=g)
    one, two = (gate_fwd._scores(_split_vectors(qg), _split_vectors(kg), r, "tf32x3", steps=s) for s in (1, 2))
    assert torch.equal(one, two)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert torch.isneginf(two[..., ~causal]).all() and torch.isfinite(two[..., causal]).all()
    with pytest.raises(ValueError, match="steps must be None, 1 or 2"):
        gate_fwd._scores(_split_vectors(qg), _split_vectors(kg), r, "tf32x3", steps=3)


@interpreter
def test_causal_only_logits_leave_the_upper_key_tiles_unwritten(monkeypatch):
    """``causal_only``: the same logits bit for bit on and below the block diagonal, the key tiles wholly above it not
    written (the output made NaN-filled here, so an unwritten entry shows), and the policies' masks the same from
    either; ``causal_only`` that is not a bool is refused by name."""
    from seerattn import SparsityPolicy, mask_from_scores
    from seerattn.ops._triton import gate_fwd

    class NanEmpty:  # gate_fwd's torch, whose fp32 empty tensors come NaN-filled
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*shape, **kwargs):
            out = torch.empty(*shape, **kwargs)
            return out.fill_(float("nan")) if out.dtype == torch.float32 else out

    cfg = GateConfig(block_size=32, q_subblock=8, q_pooling=("avg", "max", "min"))
    gate, q, k, cos, sin = _case(2, 1, 1100, 16, cfg, torch.float32, seed=3)  # 35 blocks: 3 key tiles, R 4
    monkeypatch.setattr(gate_fwd, "torch", NanEmpty())
    with torch.no_grad():
        full = gate(q, k, cos.float(), sin.float(), impl="triton")
        part = gate(q, k, cos.float(), sin.float(), impl="triton", causal_only=True)
    causal = torch.ones(35, 35, dtype=torch.bool).tril()
    assert torch.equal(full[..., causal], part[..., causal])
    assert torch.isneginf(full[..., ~causal]).all()
    assert torch.isnan(part[..., ~causal]).any(), "the key tiles above the diagonal were written"
    for policy in (SparsityPolicy("density", 0.3), SparsityPolicy("density", 0.3, allocation="head")):
        a, b = (mask_from_scores(x, policy, 1100, 32, impl="triton") for x in (full, part))
        assert torch.equal(a.kv_num_blocks, b.kv_num_blocks) and torch.equal(a.kv_indices, b.kv_indices)
        a = mask_from_scores(part, policy, 1100, 32)  # the reference reads the causal part only too
        assert torch.equal(a.kv_num_blocks, b.kv_num_blocks) and torch.equal(a.kv_indices, b.kv_indices)
    for impl in ("triton", "eager"):
        with pytest.raises(TypeError, match="AttnGate: causal_only must be True or False"), torch.no_grad():
            gate(q, k, cos.float(), sin.float(), impl=impl, causal_only=1)
    c = gate.config
    with pytest.raises(TypeError, match="gate_block_logits: causal_only must be True or False"):
        gate_block_logits(q, k, gate.k_proj.detach(), gate.q_proj.detach(), cos.float(), sin.float(),
                          block_size=c.block_size, q_step=c.q_step, q_pooling=c.q_pooling, k_pooling=c.k_pooling,
                          causal_only="yes")  # fmt: skip


@interpreter
def test_gate_parts_benchmark_runs_in_its_cpu_smoke_configuration(tmp_path):
    from benchmarks import gate_parts
    from seerattn.record import read_record

    assert gate_parts.main(["--smoke", "--json", str(tmp_path / "g.json")]) == 0
    rows = read_record(tmp_path / "g.json")["results"]
    parts = {r["part"] for r in rows}
    assert {"pool_q", "pool_k", "pool_pair", "proj_q", "proj_k", "proj_pair", "scores", "gate", "select"} <= parts
    assert all(r["ms"] > 0 for r in rows if r["bytes"])
    assert [r["ms"] for r in rows if r["part"] == "rows_differ_probs_logits"] == [0.0]
    # --parts: only the parts named
    assert gate_parts.main(["--smoke", "--parts", "select", "--json", str(tmp_path / "s.json")]) == 0
    parts = {r["part"] for r in read_record(tmp_path / "s.json")["results"]}
    assert parts == {"softmax", "select", "select_logits", "rows_differ_probs_logits"}
    with pytest.raises(SystemExit):
        gate_parts.main(["--smoke", "--parts", "select,sort"])
    # the paper's gate: no Q projection, so no proj_q rows
    argv = ["--smoke", "--gate", "paper", "--parts", "proj,scores", "--json", str(tmp_path / "p.json")]
    assert gate_parts.main(argv) == 0
    parts = {r["part"] for r in read_record(tmp_path / "p.json")["results"]}
    assert parts == {"proj_k", "scores", "scores_tf32"}
