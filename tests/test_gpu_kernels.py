"""GPU tests of the Triton kernels (bf16, 8k-64k tokens): triton vs the fp32 reference vs FlexAttention.

Tolerance from the data: ``||out - ref|| / ||ref||`` of our kernel must be at most twice that of plain
bf16 PyTorch SDPA (causal, dense, on the same inputs) against the fp32 reference, plus a small
epsilon. The references run on the GPU in fp32 on upcast inputs, row-chunked (never a T x T map).
Run on the H200 with ``pytest -m gpu tests/test_gpu_kernels.py``.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="GPU tests run the compiled kernels"
    ),
]

from kernel_helpers import BackwardLaunches, deterministic_algorithms  # noqa: E402

from seerattn import BlockMask, SparsityPolicy, mask_from_scores  # noqa: E402
from seerattn.ops import attention_with_block_scores, block_sparse_attention, reference  # noqa: E402

EPS = 1e-4


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_qkv(b, hq, hkv, t, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(b, h, t, d, device="cuda", generator=g, dtype=torch.bfloat16)
    return mk(hq), mk(hkv), mk(hkv)


def structured_mask(b, h, t, bs, density, seed=0, random=False) -> BlockMask:
    """Density-policy mask over synthetic scores: sink + local band + a few vertical columns
    (structured), or uniform scores (random); sink and diagonal always kept."""
    nb = math.ceil(t / bs)
    g = torch.Generator(device="cuda").manual_seed(seed)
    noise = torch.rand(b, h, nb, nb, device="cuda", generator=g)
    if random:
        scores = noise
    else:
        i = torch.arange(nb, device="cuda")
        local = torch.exp(-(i.view(-1, 1) - i.view(1, -1)).clamp_min(0).float() / 4.0)
        cols = torch.randint(0, nb, (b, h, 8), device="cuda", generator=g)
        vertical = torch.zeros(b, h, nb, device="cuda").scatter_(-1, cols, 0.8).unsqueeze(-2)
        scores = local + vertical + 0.3 * noise
    return mask_from_scores(scores, SparsityPolicy("density", density), t, bs)


_SDPA_ERR: dict[tuple, float] = {}


def sdpa_bf16_error(q, k, v) -> float:
    """Relative error of bf16 SDPA (dense causal) against the fp32 reference on the same inputs."""
    key = (q.data_ptr(), tuple(q.shape))
    if key not in _SDPA_ERR:
        g = q.shape[1] // k.shape[1]
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True
        )
        ref = reference.causal_attention(q.float(), k.float(), v.float())
        _SDPA_ERR[key] = rel(sdpa, ref)
    return _SDPA_ERR[key]


@pytest.mark.parametrize("allocation", ["row", "uniform", "floor", "head"])
def test_sparse_layer_path_has_no_host_sync(allocation):
    """Policy, densities and the sparse kernel run without a host sync (which would stall the GPU
    once per layer): any synchronising call raises under ``set_sync_debug_mode("error")``."""
    q, k, v = make_qkv(1, 8, 2, 4096, 64)
    nb = 4096 // 64
    logits = torch.randn(1, 8, nb, nb, device="cuda")
    scores = logits.masked_fill(~torch.ones(nb, nb, dtype=torch.bool, device="cuda").tril(), float("-inf")).softmax(-1)
    policies = [
        SparsityPolicy("density", 0.1, allocation),
        SparsityPolicy("threshold", 0.01),
        SparsityPolicy("top_p", 0.9),
    ]
    for pol in policies:  # compile, and tune each policy's kind of mask (the tuner keys on it), outside the check
        block_sparse_attention(q, k, v, mask_from_scores(scores, pol, 4096, 64))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = []
        for pol in policies:
            mask = mask_from_scores(scores, pol, 4096, 64)
            results.append((block_sparse_attention(q, k, v, mask), *mask.densities()))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for out, density, token_density in results:
        assert torch.isfinite(out).all() and 0 < density.item() <= 1 and 0 < token_density.item() <= 1
    assert results[0][1].item() < 0.2  # the density policy kept about its 10 %


SPARSE_CASES = [
    # T, Hq, Hkv, D, block, mask heads, density, random
    (8192, 32, 8, 128, 64, "hkv", 0.1, False),
    (8192, 32, 8, 128, 128, "hq", 0.3, True),
    (16384, 28, 4, 128, 64, "hq", 0.1, False),
    (32768, 8, 2, 64, 64, "hkv", 0.1, False),
    (65536, 4, 1, 128, 128, "hkv", 0.05, False),
    (8192, 32, 8, 128, 32, "hq", 0.1, True),
]


@pytest.mark.parametrize(
    "t,hq,hkv,d,bs,mh,density,random", SPARSE_CASES,
    ids=[f"T{c[0]}-{c[1]}x{c[2]}-D{c[3]}-bs{c[4]}-{c[5]}-{c[6]}{'r' if c[7] else 's'}" for c in SPARSE_CASES],
)  # fmt: skip
def test_sparse_bf16(t, hq, hkv, d, bs, mh, density, random):
    q, k, v = make_qkv(1, hq, hkv, t, d, seed=t + bs)
    mask = structured_mask(1, hq if mh == "hq" else hkv, t, bs, density, seed=t, random=random)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="triton")
    ref_out, ref_lse = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask, return_lse=True)
    tol = 2 * sdpa_bf16_error(q, k, v) + EPS
    err = rel(out, ref_out)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert err <= tol, (err, tol)
    assert (lse - ref_lse).abs().max().item() < 1e-2
    if t == 8192:  # the cross-check with FlexAttention (each new shape costs a compile)
        f_out, f_lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="flex")
        assert rel(f_out, ref_out) <= tol
        assert rel(out, f_out) <= tol


@pytest.mark.parametrize("bs,mh", [(32, "hq"), (32, "hkv"), (64, "hq"), (64, "hkv"), (128, "hkv")])
@pytest.mark.parametrize("random", [False, True])
def test_every_sparse_config_matches_the_reference(bs, mh, random):
    """Each candidate the tuner may pick (not only the one it picked) is correct."""
    from seerattn.ops._triton import sparse_fwd_ws
    from seerattn.ops._triton.config import sparse_configs
    from seerattn.ops._triton.sparse_fwd import block_sparse_attention_fwd

    t, hq, hkv, d = 4096 + 77, 8, 2, 128
    q, k, v = make_qkv(1, hq, hkv, t, d, seed=bs)
    mask = structured_mask(1, hq if mh == "hq" else hkv, t, bs, 0.2, seed=1, random=random)
    ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask)
    tol = 2 * sdpa_bf16_error(q, k, v) + EPS
    scale = d**-0.5
    hopper_ws = sparse_fwd_ws.supported(q, k, v, bs, mask.num_heads) is None
    cands = sparse_configs(bs, hq // mask.num_heads, d, hopper_ws)
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert any(c.hopper_ws for c in cands) == (hopper and bs in (64, 128))
    for cfg in cands:
        out, _ = block_sparse_attention_fwd(
            q, k, v, mask.kv_num_blocks, mask.kv_indices, bs, scale, return_lse=False, config=cfg
        )
        assert rel(out, ref) <= tol, (cfg.short(), rel(out, ref), tol)


@pytest.mark.parametrize(
    "group,d,dtype,layout,mh,mb,block_n",
    [(4, 128, torch.bfloat16, "bthd", "hkv", 64, 64), (2, 128, torch.float16, "bhtd", "hkv", 64, 64),
     (8, 64, torch.bfloat16, "bthd", "hkv", 64, 64), (4, 64, torch.float16, "bhtd", "hkv", 64, 64),
     (4, 128, torch.bfloat16, "bthd", "hkv", 64, 128), (2, 128, torch.float16, "bhtd", "hkv", 64, 128),
     (8, 64, torch.bfloat16, "bthd", "hkv", 64, 128), (4, 64, torch.float16, "bhtd", "hkv", 64, 128),
     (4, 128, torch.bfloat16, "bthd", "hkv", 128, 128), (2, 128, torch.float16, "bhtd", "hkv", 128, 128),
     (8, 64, torch.bfloat16, "bthd", "hkv", 128, 128),
     (4, 128, torch.bfloat16, "bthd", "hq", 64, 64), (1, 128, torch.float16, "bhtd", "hq", 64, 64),
     (2, 64, torch.bfloat16, "bthd", "hq", 64, 64),
     (4, 128, torch.bfloat16, "bthd", "hq", 128, 128), (1, 128, torch.float16, "bhtd", "hq", 128, 128),
     (2, 64, torch.bfloat16, "bthd", "hq", 128, 128),
     (4, 128, torch.bfloat16, "bthd", "hq-union", 64, 64), (1, 128, torch.float16, "bhtd", "hq-union", 64, 64),
     (2, 64, torch.bfloat16, "bthd", "hq-union", 64, 64), (4, 128, torch.bfloat16, "bthd", "hq-union", 64, 128),
     (1, 128, torch.float16, "bhtd", "hq-union", 64, 128), (2, 64, torch.bfloat16, "bthd", "hq-union", 64, 128)],
)  # fmt: skip
def test_hopper_ws_forward_matches_the_reference(group, d, dtype, layout, mh, mb, block_n):
    """The warp-specialised Hopper forward (Gluon) on its own: batch 2, an odd length (a partial last block), empty
    rows and a block above the diagonal, both q/k/v layouts (transformers' [B, T, H, D] memory and contiguous
    [B, H, T, D]), fp16 / bf16, D 64 / 128, per-group masks (groups 2 / 4 / 8; 64-token blocks with 64- and 128-key
    steps, lists of odd and even lengths; 128-token blocks) and per-query-head masks (groups 1 / 2 / 4; at 64-token
    blocks two heads a tile or two query blocks of one head (``hq-union``), at 128-token blocks one head a tile in the
    per-group kernel, MHA included): output
    within the Triton kernel's error of the fp32 reference, lse equal to the reference's (-inf on empty rows, whose
    output is 0)."""
    from kernel_helpers import rand_mask

    from seerattn.ops._triton import sparse_fwd_ws
    from seerattn.ops._triton.config import KernelConfig
    from seerattn.ops._triton.sparse_fwd import block_sparse_attention_fwd

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialised forward is for sm_90")
    b, hkv, t = 2, 2, 1000 + 37
    hq = hkv * group
    g = torch.Generator(device="cuda").manual_seed(group * d)

    def mk(h):
        shape = (b, t, h, d) if layout == "bthd" else (b, h, t, d)
        x = torch.randn(shape, device="cuda", generator=g, dtype=dtype)
        return x.transpose(1, 2) if layout == "bthd" else x

    q, k, v = mk(hq), mk(hkv), mk(hkv)
    hm = hkv if mh == "hkv" else hq
    mask = rand_mask(b, hm, t, mb, density=0.3, seed=group + d, empty_rows=True).to("cuda")
    assert sparse_fwd_ws.supported(q, k, v, mb, hm) is None
    per_head = mh != "hkv"
    cfg = ws_config(mh, mb, block_n, group)
    lists = (mask.kv_num_blocks, mask.kv_indices)
    counts = mask.kv_num_blocks[mask.kv_num_blocks > 0]
    assert (counts % 2 == 1).any() and (counts % 2 == 0).any()  # 128-key steps: odd lists end on a half step
    out, lse = block_sparse_attention_fwd(q, k, v, *lists, mb, d**-0.5, None, True, cfg)
    if per_head:
        triton_cfg = KernelConfig(64, 64, 1, 4, 3) if mb == 64 else KernelConfig(128, 64, 1, 8, 3)
    else:
        triton_cfg = KernelConfig(128, 64, 128 // mb, 8, 3)
    tri, _ = block_sparse_attention_fwd(q, k, v, *lists, mb, d**-0.5, None, True, triton_cfg)
    ref, ref_lse = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask, return_lse=True)
    assert rel(out, ref) <= 1.5 * rel(tri, ref) + EPS, (rel(out, ref), rel(tri, ref))
    empty = torch.isinf(ref_lse)
    assert empty.any() and torch.equal(torch.isinf(lse), empty)
    assert (out.float()[empty.unsqueeze(-1).expand_as(out)] == 0).all()
    assert (lse[~empty] - ref_lse[~empty]).abs().max().item() < 1e-2


WS_CASES = [("hq", 64, 64), ("hq-union", 64, 64), ("hq-union", 64, 128), ("hkv", 64, 64), ("hkv", 64, 128),
            ("hkv", 128, 128), ("hq", 128, 128)]  # fmt: skip


def ws_config(mh: str, mb: int, block_n: int, group: int):
    """The Hopper forward's config for masks ``mh`` ("hkv" per group of ``group`` heads, "hq" per query head,
    "hq-union" per query head on the union kernel) of ``mb``-token blocks, ``block_n`` keys a step."""
    from seerattn.ops._triton import sparse_fwd_ws
    from seerattn.ops._triton.config import KernelConfig

    if mh == "hq-union":
        return KernelConfig(128, block_n, 1, 4, sparse_fwd_ws.stages(block_n), hopper_ws=True, union=True)
    stages = sparse_fwd_ws.STAGES_HEADS if mh == "hq" and mb == 64 else sparse_fwd_ws.stages(block_n)
    return KernelConfig(128, block_n, 1 if mh == "hq" else group, 4, stages, hopper_ws=True)


@pytest.mark.parametrize("mh,mb,block_n", WS_CASES)
def test_hopper_ws_forward_replays_in_a_cuda_graph(mh, mb, block_n):
    """The warp-specialised forward captured in a CUDA graph (host TMA descriptors of q / k / v, baked into the
    captured launch: the graph's static tensors) and replayed on new q / k / v: the same output, bit for bit, as an
    eager launch on those inputs."""
    from seerattn.ops._triton.sparse_fwd import block_sparse_attention_fwd

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialised forward is for sm_90")
    hq, hkv, t, d = 8, 2, 2048 + 40, 128
    q, k, v = make_qkv(1, hq, hkv, t, d, seed=3)
    mask = structured_mask(1, hkv if mh == "hkv" else hq, t, mb, 0.3, seed=2)
    cfg = ws_config(mh, mb, block_n, hq // hkv)

    def fwd():
        return block_sparse_attention_fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, mb, d**-0.5, None, True, cfg)

    fwd()  # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_lse = fwd()
    for x in (q, k, v):
        x.copy_(torch.randn_like(x))
    graph.replay()
    out, lse = fwd()
    assert torch.equal(static_out, out) and torch.equal(static_lse, lse)
    assert out.abs().sum() > 0


@pytest.mark.parametrize("mh,mb,block_n", WS_CASES)
def test_hopper_ws_programs_walk_many_tiles(mh, mb, block_n):
    """The persistent forward with 3 programs (each walks 64 tiles: the Q buffer's and the ring's barrier phases
    across tiles, lists of every length including empty ones) gives the default launch's output and lse bit for bit."""
    from kernel_helpers import rand_mask

    from seerattn.ops._triton import sparse_fwd_ws

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialised forward is for sm_90")
    b, hq, hkv, t, d = 2, 8, 2, 1500 + 11, 128
    q, k, v = make_qkv(b, hq, hkv, t, d, seed=5)
    hm = hkv if mh == "hkv" else hq
    mask = rand_mask(b, hm, t, mb, density=0.3, seed=7, empty_rows=True).to("cuda")
    runs = []
    for programs in (None, 3):
        out = torch.empty(b, t, hq, d, device="cuda", dtype=q.dtype).transpose(1, 2)
        lse = torch.empty(b, hq, t, device="cuda", dtype=torch.float32)
        sparse_fwd_ws.launch(q, k, v, out, lse, mask.kv_num_blocks, mask.kv_indices, d**-0.5, mb, block_n, programs,
                             union=mh == "hq-union")  # fmt: skip
        runs.append((out, lse))
    (out, lse), (few_out, few_lse) = runs
    assert torch.equal(out, few_out) and torch.equal(lse, few_lse)
    assert torch.isinf(lse).any() and out.abs().sum() > 0  # empty rows and real output both present


@pytest.mark.parametrize("mh,mb,block_n", WS_CASES)
def test_hopper_ws_varlen_is_each_sequence_alone(mh, mb, block_n):
    """Packed sequences (varlen: lengths under a block, under a tile's 32 positions, odd, long; a sequence's partial
    last block followed by the next sequence's tokens, which the causal mask must hide) give, bit for bit, what the
    forward gives each sequence alone with its mask's top-left corner, with one program a multiprocessor and with 3
    (tiles past a sequence's end skipped by the loader and the math alike); and the fp32 reference within the Triton
    kernel's error."""
    from kernel_helpers import rand_mask

    from seerattn.ops._triton import sparse_fwd_ws

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialised forward is for sm_90")
    lens = [20, 700, 1 + 128, 1500 + 11, 45]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    hq, hkv, d = 8, 2, 128
    q, k, v = make_qkv(1, hq, hkv, int(cu[-1]), d, seed=9)
    hm = hkv if mh == "hkv" else hq
    mask = rand_mask(len(lens), hm, max(lens), mb, density=0.3, seed=4, empty_rows=True).to("cuda")
    assert sparse_fwd_ws.supported(q, k, v, mb, hm) is None

    def run(q, k, v, num, idx, cu=None, programs=None):
        out = torch.empty(1, q.shape[2], hq, d, device="cuda", dtype=q.dtype).transpose(1, 2)
        lse = torch.empty(1, hq, q.shape[2], device="cuda", dtype=torch.float32)
        sparse_fwd_ws.launch(q, k, v, out, lse, num, idx, d**-0.5, mb, block_n, programs, cu_seqlens=cu,
                             union=mh == "hq-union")  # fmt: skip
        return out, lse

    packed = [run(q, k, v, mask.kv_num_blocks, mask.kv_indices, cu, programs) for programs in (None, 3)]
    assert torch.equal(packed[0][0], packed[1][0]) and torch.equal(packed[0][1], packed[1][1])
    out, lse = packed[0]
    for n, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:], strict=False)):
        nq = -(-(e - s) // mb)
        alone = run(*(x[:, :, s:e] for x in (q, k, v)), mask.kv_num_blocks[n : n + 1, :, :nq],
                    mask.kv_indices[n : n + 1, :, :nq])  # fmt: skip
        assert torch.equal(out[:, :, s:e], alone[0]) and torch.equal(lse[:, :, s:e], alone[1]), n
    ref, ref_lse = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask, return_lse=True,
                                                    cu_seqlens=cu)  # fmt: skip
    assert rel(out, ref) <= 2 * sdpa_bf16_error(q, k, v) + EPS
    empty = torch.isinf(ref_lse)
    assert empty.any() and torch.equal(torch.isinf(lse), empty)
    assert (lse[~empty] - ref_lse[~empty]).abs().max().item() < 1e-2


@pytest.mark.parametrize("kind", ["structured", "random"])
def test_hopper_ws_union_equals_the_head_pair_kernel(kind):
    """Per-query-head masks at 64-token blocks: the union kernel (two query blocks of one head a tile, the union of
    their lists copied once, each warpgroup skipping the other's blocks) runs each row's own blocks in the same order
    with the same arithmetic as the head-pair kernel, so output and lse equal it bit for bit: adjacent rows sharing
    most blocks (structured) or few, with gaps of more than a ring between a row's blocks (random), empty rows, an odd
    block count (the last pair's second block missing), with the default program count and with 3."""
    from kernel_helpers import rand_mask

    from seerattn.ops._triton import sparse_fwd_ws

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialised forward is for sm_90")
    b, hq, hkv, d = 2, 8, 2, 128
    for t in (64 * 41 + 5, 64 * 40 + 5):  # 42 query blocks (21 pairs) and 41 (the last pair's second block missing)
        q, k, v = make_qkv(b, hq, hkv, t, d, seed=13)
        if kind == "structured":
            mask = structured_mask(b, hq, t, 64, 0.2, seed=6)
        else:
            mask = rand_mask(b, hq, t, 64, density=0.15, seed=6, empty_rows=True).to("cuda")
        lists = (mask.kv_num_blocks, mask.kv_indices)
        runs = {}
        for union, programs in ((False, None), (True, None), (True, 3)):
            out = torch.empty(b, t, hq, d, device="cuda", dtype=q.dtype).transpose(1, 2)
            lse = torch.empty(b, hq, t, device="cuda", dtype=torch.float32)
            sparse_fwd_ws.launch(q, k, v, out, lse, *lists, d**-0.5, 64, 64, programs, union=union)
            runs[union, programs] = (out, lse)
        pair = runs[False, None]
        for key in ((True, None), (True, 3)):
            assert torch.equal(runs[key][0], pair[0]) and torch.equal(runs[key][1], pair[1]), (kind, t, key)
        assert pair[0].abs().sum() > 0


def test_hopper_ws_takes_a_batch_broadcast_kv():
    """K / V expanded along the batch (stride 0, as ``k.expand``) go into the TMA descriptors as they are: the driver
    takes the zero stride and the output is the Triton kernel's, within its error of the fp32 reference."""
    from kernel_helpers import rand_mask

    from seerattn.ops._triton import sparse_fwd_ws
    from seerattn.ops._triton.config import KernelConfig
    from seerattn.ops._triton.sparse_fwd import block_sparse_attention_fwd

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialised forward is for sm_90")
    b, hq, hkv, t, d = 2, 8, 2, 1000, 128
    q, k1, v1 = make_qkv(1, hq, hkv, t, d, seed=11)
    q = torch.cat([q, torch.randn_like(q)])
    k, v = k1.expand(b, -1, -1, -1), v1.expand(b, -1, -1, -1)
    assert k.stride(0) == 0 and sparse_fwd_ws.supported(q, k, v, 64, hkv) is None
    mask = rand_mask(b, hkv, t, 64, density=0.3, seed=1).to("cuda")
    lists = (mask.kv_num_blocks, mask.kv_indices)
    cfg = KernelConfig(128, 64, hq // hkv, 4, sparse_fwd_ws.STAGES, hopper_ws=True)
    out, _ = block_sparse_attention_fwd(q, k, v, *lists, 64, d**-0.5, None, False, cfg)
    tri, _ = block_sparse_attention_fwd(q, k, v, *lists, 64, d**-0.5, None, False, KernelConfig(128, 64, 2, 8, 3))
    ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask)
    assert rel(out, ref) <= 1.5 * rel(tri, ref) + EPS, (rel(out, ref), rel(tri, ref))


def test_hopper_ws_refuses_what_it_cannot_run():
    """Cases outside the warp-specialised forward: a reason, and a forced config raises naming it."""
    from seerattn.ops._triton import sparse_fwd_ws
    from seerattn.ops._triton.config import KernelConfig
    from seerattn.ops._triton.sparse_fwd import block_sparse_attention_fwd

    q, k, v = make_qkv(1, 8, 2, 256, 128)
    assert "mask blocks" in sparse_fwd_ws.supported(q, k, v, 32, 2)
    assert sparse_fwd_ws.supported(q, k, v, 128, 8) is None  # per query head at 128-token blocks: a head a tile
    assert "per-group" in sparse_fwd_ws.supported(q, k, v, 64, 4)  # neither per head (8) nor per group (2)
    assert "fp16 / bf16" in sparse_fwd_ws.supported(q.float(), k.float(), v.float(), 64, 2)
    q3, k3, v3 = make_qkv(1, 3, 3, 256, 128)
    assert "even head count" in sparse_fwd_ws.supported(q3, k3, v3, 64, 3)
    assert sparse_fwd_ws.supported(q3, k3, v3, 128, 3) is None  # MHA, 128-token blocks: any head count
    shifted = torch.empty(q.numel() + 4, device=q.device, dtype=q.dtype)[4:].view(q.shape)  # 8 bytes off
    assert "q at a 16-byte aligned address" in sparse_fwd_ws.supported(shifted, k, v, 64, 2)
    mask = structured_mask(1, 2, 256, 32, 0.5)  # per group, 32-token blocks
    with pytest.raises(ValueError, match="warp-specialised Hopper kernel"):
        block_sparse_attention_fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, 32, 0.1, None, True,
                                   KernelConfig(128, 64, 4, 4, 4, hopper_ws=True))  # fmt: skip
    mask = structured_mask(1, 2, 256, 128, 0.5)  # 128-token blocks: 128-key steps only
    with pytest.raises(ValueError, match=r"\(mask_block, block_n\) must be one of"):
        block_sparse_attention_fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, 128, 0.1, None, True,
                                   KernelConfig(128, 64, 4, 4, 4, hopper_ws=True))  # fmt: skip
    per_head = structured_mask(1, 8, 256, 64, 0.5)
    # per query head, 128-key steps on the union tile only (two rings of 128-key slots do not fit in shared memory)
    with pytest.raises(ValueError, match="block_n 128 with per-group masks, 128-token blocks or union=True only"):
        block_sparse_attention_fwd(q, k, v, per_head.kv_num_blocks, per_head.kv_indices, 64, 0.1, None, True,
                                   KernelConfig(128, 128, 1, 4, 3, hopper_ws=True))  # fmt: skip
    per_group = structured_mask(1, 2, 256, 64, 0.5)
    # the union tile pairs two query blocks of one head: per-query-head masks only
    with pytest.raises(ValueError, match="union=True takes per-query-head masks at 64-token blocks only"):
        block_sparse_attention_fwd(q, k, v, per_group.kv_num_blocks, per_group.kv_indices, 64, 0.1, None, True,
                                   KernelConfig(128, 128, 4, 4, 3, hopper_ws=True, union=True))  # fmt: skip


def test_sparse_varlen_bf16():
    lens = [100, 8000, 40, 12345]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total = int(cu[-1])
    q, k, v = make_qkv(1, 32, 8, total, 128, seed=1)
    mask = structured_mask(len(lens), 8, max(lens), 64, 0.2, seed=1)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, cu_seqlens=cu, impl="triton")
    ref_out, ref_lse = reference.block_sparse_attention(
        q.float(), k.float(), v.float(), mask, return_lse=True, cu_seqlens=cu
    )
    assert rel(out, ref_out) <= 2 * sdpa_bf16_error(q, k, v) + EPS
    assert (lse - ref_lse).abs().max().item() < 1e-2


def test_per_group_equals_expanded_per_head():
    """A per-Hkv mask (head-packed tiles) and the same mask expanded to Hq (union tiles) agree."""
    q, k, v = make_qkv(1, 32, 8, 8192, 128, seed=2)
    mask = structured_mask(1, 8, 8192, 64, 0.1, seed=2)
    a = block_sparse_attention(q, k, v, mask, impl="triton")
    b = block_sparse_attention(q, k, v, mask.expand_heads(32), impl="triton")
    assert rel(a, b) < 1e-3


def test_int64_offsets():
    """Batch 65 of [66, 32, 8192, 128] starts past 2**31 elements: same result as alone."""
    b, hq, hkv, t, d = 66, 32, 8, 8192, 128
    assert (b - 1) * hq * t * d >= 2**31
    q, k, v = make_qkv(b, hq, hkv, t, d, seed=3)
    mask = structured_mask(1, hkv, t, 64, 0.05, seed=3)
    big = BlockMask(
        mask.kv_num_blocks.expand(b, -1, -1).contiguous(),
        mask.kv_indices.expand(b, -1, -1, -1).contiguous(),
        mask.block_size,
        mask.seq_len,
    )
    out = block_sparse_attention(q, k, v, big, impl="triton")
    alone = block_sparse_attention(q[-1:].clone(), k[-1:].clone(), v[-1:].clone(), mask, impl="triton")
    assert torch.equal(out[-1:], alone)
    del out
    o_big, l_big, s_big = attention_with_block_scores(q[-2:], k[-2:], v[-2:], block_size=64, impl="triton")
    o1, l1, s1 = attention_with_block_scores(q[-1:].clone(), k[-1:].clone(), v[-1:].clone(), 64, impl="triton")
    assert torch.equal(o_big[-1:], o1) and torch.equal(l_big[-1:], l1) and torch.equal(s_big[-1:], s1)


def lowp_block_scores(q, k, bs, scale):
    """Block scores from plain bf16 PyTorch (bf16 logits and softmax), row-chunked."""
    b, hq, t, _ = q.shape
    kx = k.repeat_interleave(hq // k.shape[1], 1)
    nb = math.ceil(t / bs)
    rows = []
    cols = torch.arange(t, device=q.device)
    for r0 in range(0, t, 1024):
        r1 = min(r0 + 1024, t)
        logits = (q[:, :, r0:r1] @ kx.transpose(-1, -2)) * scale
        keep = cols.view(1, -1) <= torch.arange(r0, r1, device=q.device).view(-1, 1)
        p = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1)
        p = torch.nn.functional.pad(p, (0, nb * bs - t)).view(b, hq, r1 - r0, nb, bs).amax(-1).float()
        rows.append(p)
    p = torch.cat(rows, 2)
    p = torch.nn.functional.pad(p, (0, 0, 0, nb * bs - t)).view(b, hq, nb, bs, nb).amax(3)
    return p / p.sum(-1, keepdim=True)


SCORE_CASES = [(8192, 32, 8, 128, 64), (16384, 28, 4, 128, 128), (32768, 4, 1, 64, 64)]


@pytest.mark.parametrize(
    "t,hq,hkv,d,bs", SCORE_CASES, ids=[f"T{c[0]}-{c[1]}x{c[2]}-D{c[3]}-bs{c[4]}" for c in SCORE_CASES]
)
def test_block_scores_bf16(t, hq, hkv, d, bs):
    q, k, v = make_qkv(1, hq, hkv, t, d, seed=t + 7)
    out, lse, scores = attention_with_block_scores(q, k, v, block_size=bs, impl="triton")
    ref_out, ref_lse, ref_scores = reference.attention_with_block_scores(q.float(), k.float(), v.float(), bs)
    assert not torch.isnan(scores).any()
    assert rel(out, ref_out) <= 2 * sdpa_bf16_error(q, k, v) + EPS
    assert (lse - ref_lse).abs().max().item() < 1e-2
    lp = lowp_block_scores(q, k, bs, 1.0 / math.sqrt(d))
    err, lp_err = (scores - ref_scores).abs().max().item(), (lp - ref_scores).abs().max().item()
    assert err <= 2 * lp_err + EPS, (err, lp_err)
    assert rel(scores, ref_scores) <= 2 * rel(lp, ref_scores) + EPS


# ---------------------------------------------------------------------------------------- backward
_SDPA_GRAD_ERR: dict[tuple, list[float]] = {}


def sdpa_bf16_grad_errors(q, k, v, dout) -> list[float]:
    """Relative errors of bf16 SDPA's (dense causal) dq, dk, dv against fp32 SDPA's on the same inputs:
    the low-precision yardstick of the gradient tolerance (3x, plus EPS)."""
    key = (q.data_ptr(), tuple(q.shape))
    if key not in _SDPA_GRAD_ERR:

        def g(dtype):
            xs = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
            out = torch.nn.functional.scaled_dot_product_attention(*xs, is_causal=True, enable_gqa=True)
            return torch.autograd.grad(out, xs, dout.to(dtype))

        _SDPA_GRAD_ERR[key] = [rel(a, b) for a, b in zip(g(torch.bfloat16), g(torch.float32), strict=True)]
    return _SDPA_GRAD_ERR[key]


def sparse_grads(q, k, v, dout, mask, impl, cu_seqlens=None, dtype=None):
    xs = [x.detach().to(dtype or x.dtype).requires_grad_(True) for x in (q, k, v)]
    out = block_sparse_attention(*xs, mask, cu_seqlens=cu_seqlens, impl=impl)
    return torch.autograd.grad(out, xs, dout.to(out.dtype))


def assert_grads_close(got, ref, lowp, label: str) -> None:
    for name, x, r, lp in zip(("dq", "dk", "dv"), got, ref, lowp, strict=True):
        assert not torch.isnan(x).any(), (label, name)
        assert rel(x, r) <= 3 * lp + EPS, (label, name, rel(x, r), lp)


@contextlib.contextmanager
def atomic_dq_only(monkeypatch):
    """Inside: the backward runs the first atomic-dQ dK/dV candidate, untuned (every candidate is
    checked by ``test_every_backward_config_matches_the_reference``; timing them here would cost
    GPU time)."""
    from seerattn.ops._triton import config, sparse_bwd

    with monkeypatch.context() as m:
        m.setattr(sparse_bwd, "dkdv_configs", lambda *a: [c for c in config.dkdv_configs(*a) if c.atomic_dq])
        m.setenv("SEERATTN_TRITON_AUTOTUNE", "0")
        yield


def check_grads(q, k, v, mask, cu_seqlens=None, seed=0, monkeypatch=None):
    """The tuned backward (split or atomic dQ) against the fp32 reference; with ``monkeypatch`` also
    the atomic path (forced) and the split path (under ``torch.use_deterministic_algorithms``, twice:
    bitwise equal)."""
    dout = torch.randn(
        q.shape, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(seed)
    )
    got = sparse_grads(q, k, v, dout, mask, "triton", cu_seqlens)
    ref = sparse_grads(q, k, v, dout, mask, "reference", cu_seqlens, torch.float32)
    lowp = sdpa_bf16_grad_errors(q, k, v, dout)
    assert_grads_close(got, ref, lowp, "tuned")
    if monkeypatch is not None:
        launches = BackwardLaunches(monkeypatch)
        with atomic_dq_only(monkeypatch):
            atomic = sparse_grads(q, k, v, dout, mask, "triton", cu_seqlens)
        assert launches.take()[-1] == "dkdv-atomic"
        assert_grads_close(atomic, ref, lowp, "atomic")
        with deterministic_algorithms():
            split = sparse_grads(q, k, v, dout, mask, "triton", cu_seqlens)
            again = sparse_grads(q, k, v, dout, mask, "triton", cu_seqlens)
        assert launches.take()[-4:] == ["dkdv-split", "dq"] * 2
        assert_grads_close(split, ref, lowp, "deterministic")
        assert all(torch.equal(a, b) for a, b in zip(split, again, strict=True)), "split path must be deterministic"
    return got, dout


BWD_CASES = [
    # T, Hq, Hkv, D, block, mask heads, density, random
    (8192, 32, 8, 128, 64, "hkv", 0.1, False),
    (8192, 32, 8, 128, 64, "hq", 0.3, True),
    (8192, 16, 4, 128, 128, "hq", 0.1, False),
    (8192 + 77, 8, 1, 64, 32, "hkv", 0.2, True),
    (16384, 4, 1, 128, 64, "hkv", 0.05, False),
]


@pytest.mark.parametrize(
    "t,hq,hkv,d,bs,mh,density,random", BWD_CASES,
    ids=[f"T{c[0]}-{c[1]}x{c[2]}-D{c[3]}-bs{c[4]}-{c[5]}-{c[6]}{'r' if c[7] else 's'}" for c in BWD_CASES],
)  # fmt: skip
def test_sparse_backward_bf16(t, hq, hkv, d, bs, mh, density, random, monkeypatch):
    """Tuned, atomic-dQ and (deterministic) split backward against the reference."""
    q, k, v = make_qkv(1, hq, hkv, t, d, seed=t + bs + 1)
    mask = structured_mask(1, hq if mh == "hq" else hkv, t, bs, density, seed=t, random=random)
    check_grads(q, k, v, mask, seed=t, monkeypatch=monkeypatch)


@pytest.mark.parametrize("bs,mh", [(32, "hq"), (64, "hkv"), (64, "hq"), (128, "hkv")])
def test_every_backward_config_matches_the_reference(bs, mh):
    """Each dK/dV (split and atomic dQ) and dQ candidate the tuner may pick is correct."""
    from seerattn.ops._triton.config import dkdv_configs, dq_configs
    from seerattn.ops._triton.sparse_bwd import block_sparse_attention_bwd

    t, hq, hkv, d = 4096 + 77, 8, 2, 128
    q, k, v = make_qkv(1, hq, hkv, t, d, seed=bs + 5)
    mask = structured_mask(1, hq if mh == "hq" else hkv, t, bs, 0.2, seed=2, random=mh == "hq")
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(1))
    ref = sparse_grads(q, k, v, dout, mask, "reference", dtype=torch.float32)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="triton")
    lists = (mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices)
    lowp = sdpa_bf16_grad_errors(q, k, v, dout)
    c1s, c2s = dkdv_configs(bs, d), dq_configs(bs, hq // mask.num_heads, d)
    for i in range(max(len(c1s), len(c2s))):
        c1, c2 = c1s[i % len(c1s)], c2s[i % len(c2s)]
        got = block_sparse_attention_bwd(q, k, v, out, lse, dout, *lists, bs, d**-0.5, dkdv_config=c1, dq_config=c2)
        for name, x, r, lp in zip(("dq", "dk", "dv"), got, ref, lowp, strict=True):
            assert rel(x, r) <= 3 * lp + EPS, (name, c1.short(), c2.short(), rel(x, r), lp)


def test_sparse_backward_varlen_bf16(monkeypatch):
    lens = [100, 5000, 40, 3001]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = make_qkv(1, 16, 4, int(cu[-1]), 128, seed=4)
    mask = structured_mask(len(lens), 4, max(lens), 64, 0.2, seed=4)
    check_grads(q, k, v, mask, cu_seqlens=cu, monkeypatch=monkeypatch)


def test_backward_int64_offsets(monkeypatch):
    """[9, 32, 65536, 128]: the last batch entry starts past 2**31 elements; its gradients equal those
    of the same entry alone: bitwise on the (deterministic) split path, within bf16 rounding of the
    split ones on the atomic path (the order of its fp32 additions varies)."""
    b, hq, hkv, t, d = 9, 32, 8, 65536, 128
    assert (b - 1) * hq * t * d >= 2**31
    q, k, v = make_qkv(b, hq, hkv, t, d, seed=6)
    mask = structured_mask(1, hkv, t, 64, 0.05, seed=6)
    big = BlockMask(
        mask.kv_num_blocks.expand(b, -1, -1).contiguous(), mask.kv_indices.expand(b, -1, -1, -1).contiguous(), 64, t
    )
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(2))
    with deterministic_algorithms():
        whole = sparse_grads(q, k, v, dout, big, "triton")
        alone = sparse_grads(q[-1:], k[-1:], v[-1:], dout[-1:].contiguous(), mask, "triton")
    for a, w in zip(alone, whole, strict=True):
        assert torch.equal(w[-1:], a)
    del whole
    launches = BackwardLaunches(monkeypatch)
    with atomic_dq_only(monkeypatch):
        atomic = sparse_grads(q, k, v, dout, big, "triton")
    assert launches.take()[-1] == "dkdv-atomic"
    for name, a, w in zip(("dq", "dk", "dv"), alone, atomic, strict=True):
        assert rel(w[-1:], a) < 1e-2, (name, rel(w[-1:], a))


def test_flex_backward_needs_128_token_blocks_on_cuda():
    q, k, v = make_qkv(1, 4, 2, 1024, 64)
    q.requires_grad_(True)
    mask = structured_mask(1, 2, 1024, 64, 0.3)
    with pytest.raises(NotImplementedError, match=">= 128"):
        block_sparse_attention(q, k, v, mask, impl="flex")
