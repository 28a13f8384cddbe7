"""sparse_decode_attention: the Triton kernel (interpreter on CPU) and the reference against an fp64 oracle.

Tolerance rule of the project: error vs the fp64 oracle <= 2x the error of the same attention computed
in plain low-precision PyTorch (``kernel_helpers.lowp_attention``), plus a small epsilon.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from kernel_helpers import assert_within_lowp, lowp_attention, poisoned_outputs

from seerattn.ops import sparse_decode_attention
from seerattn.ops.reference import _kept_tokens, gather_paged_kv

triton = pytest.importorskip("triton")
from seerattn.ops._triton.decode_fwd import sparse_decode_fwd  # noqa: E402

DTYPES = (torch.float32, torch.float16)


def make_case(lens, hq, hkv, d, tmax, bs, k_slots, dtype, seed=0, empty_heads=()):
    """q [B, Hq, D], k/v [B, Hkv, Tmax, D], cache_seqlens int32 [B], block_indices int32 [B, Hkv, K]: each
    (sequence, KV head) selects a random, unsorted subset of the blocks covering its cache (sometimes a
    block past its end), -1 padded; the (b, h) pairs in ``empty_heads`` select nothing."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, tmax, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, tmax, d, generator=g).to(dtype)
    nb_cap = math.ceil(tmax / bs)
    idx = torch.full((b, hkv, k_slots), -1, dtype=torch.int32)
    for i, n in enumerate(lens):
        nb = min(nb_cap, math.ceil(n / bs) + 1)  # one block past the end: masked by the length
        for h in range(hkv):
            if (i, h) in empty_heads:
                continue
            perm = torch.randperm(nb, generator=g)[: int(torch.randint(1, k_slots + 1, (1,), generator=g))]
            slots = torch.randperm(k_slots, generator=g)[: len(perm)]  # padding anywhere in the list
            idx[i, h, slots] = perm.to(torch.int32)
    return q, k, v, torch.tensor(lens, dtype=torch.int32), idx


def oracle_and_lowp(q, k, v, lens, idx, bs):
    """(fp64 oracle out, lse), (low-precision PyTorch out, lse) via masked dense attention."""
    keep = _kept_tokens(idx, lens, bs, k.shape[2])  # [B, Hkv, T]
    keep = keep.repeat_interleave(q.shape[1] // k.shape[1], 1).unsqueeze(2)
    scale = 1.0 / math.sqrt(q.shape[-1])
    o64, l64, _ = lowp_attention(q.double().unsqueeze(2), k.double(), v.double(), keep, scale)
    olp, llp, _ = lowp_attention(q.unsqueeze(2), k, v, keep, scale)
    return (o64.squeeze(2), l64.squeeze(2)), (olp.squeeze(2), llp.squeeze(2))


def check(out, lse, q, k, v, lens, idx, bs, name):
    (o64, l64), (olp, llp) = oracle_and_lowp(q, k, v, lens, idx, bs)
    assert not torch.isnan(out).any(), f"{name}: NaN in the output"
    assert_within_lowp(f"{name} out", out, olp, o64, q.dtype, 2.0)
    empty = torch.isinf(l64)
    assert torch.equal(torch.isinf(lse), empty), f"{name}: lse -inf pattern differs"
    assert (out[empty] == 0).all(), f"{name}: rows with nothing selected must be zeros"
    assert_within_lowp(f"{name} lse", lse[~empty], llp[~empty], l64[~empty], q.dtype, 2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("hq", "hkv"), [(2, 2), (4, 2), (4, 1), (8, 1)], ids=["g1", "g2", "g4", "g8"])
def test_triton_matches_oracle_gqa_varlen_odd_lengths(dtype, hq, hkv):
    lens = [1, 45, 100, 17]
    q, k, v, sl, idx = make_case(lens, hq, hkv, 16, 112, 16, 5, dtype, seed=hq * 7 + hkv, empty_heads={(3, 0)})
    with poisoned_outputs():
        out, lse = sparse_decode_attention(q, k, v, sl, idx, 16, return_lse=True, impl="triton")
    check(out, lse, q, k, v, sl, idx, 16, f"triton {dtype} g{hq // hkv}")


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
@pytest.mark.parametrize("bs", [16, 32, 64])
def test_triton_splits_and_block_sizes(num_splits, bs):
    """Forced split counts (LSE merge, splits with nothing kept) and block sizes (several key steps per block)."""
    lens = [150, 33, 0]
    q, k, v, sl, idx = make_case(lens, 4, 2, 16, 160, bs, 6, torch.float32, seed=bs + num_splits)
    with poisoned_outputs():
        out, lse = sparse_decode_fwd(q, k, v, sl, idx, bs, 0.25, num_splits=num_splits)
    check(out, lse, q, k, v, sl, idx, bs, f"splits {num_splits} bs {bs}")
    assert (out[2] == 0).all() and torch.isinf(lse[2]).all()  # empty cache


def test_reference_matches_oracle():
    q, k, v, sl, idx = make_case([7, 64, 99], 4, 2, 16, 128, 32, 3, torch.float16, seed=3)
    out, lse = sparse_decode_attention(q, k, v, sl, idx, 32, return_lse=True, impl="reference")
    check(out, lse, q, k, v, sl, idx, 32, "reference fp16")


def test_empty_selection_gives_zeros_not_nan():
    q, k, v, sl, _ = make_case([40, 3], 4, 2, 16, 64, 16, 3, torch.float32)
    idx = torch.full((2, 2, 3), -1, dtype=torch.int32)
    idx[1, 1, 0] = 2  # a block past the end of a 3-token cache: nothing visible either
    for impl in ("triton", "reference"):
        out, lse = sparse_decode_attention(q, k, v, sl, idx, 16, return_lse=True, impl=impl)
        assert torch.equal(out, torch.zeros_like(out)), impl
        assert torch.isinf(lse).all() and (lse < 0).all(), impl


# ------------------------------------------------------------------------------ per-sequence starts (left padding)
def padded_rows(k, v, lens, starts, capacity):
    """The sequences of k, v [B, Hkv, Tmax, D] (sequence b: its first lens[b] tokens) placed at token starts[b] of
    rows of ``capacity`` tokens, every other token NaN (pad keys and values the kernel must never read)."""
    kp, vp = (torch.full((k.shape[0], k.shape[1], capacity, k.shape[3]), float("nan"), dtype=k.dtype) for _ in "kv")
    for i, (n, s) in enumerate(zip(lens, starts, strict=True)):
        kp[i, :, s : s + n], vp[i, :, s : s + n] = k[i, :, :n], v[i, :, :n]
    return kp, vp


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("hq", "hkv"), [(2, 2), (4, 2), (8, 1)], ids=["g1", "g2", "g8"])
def test_cache_starts_give_each_sequence_from_its_start(impl, dtype, hq, hkv):
    """Sequences of odd lengths starting at tokens 0, mid-block, on a block boundary and near the row's end
    (NaN pad keys before and after them), one selecting nothing: each gets what it gets at the start of its row
    (blocks counted from its first token), and the fp64 oracle's result."""
    lens, starts = [1, 45, 30, 17, 9], [0, 7, 16, 40, 63]
    q, k, v, sl, idx = make_case(lens, hq, hkv, 16, 48, 16, 4, dtype, seed=hq * 3 + hkv, empty_heads={(2, 1)})
    kp, vp = padded_rows(k, v, lens, starts, 72)
    st = torch.tensor(starts, dtype=torch.int32)
    with poisoned_outputs():
        out, lse = sparse_decode_attention(q, kp, vp, sl, idx, 16, return_lse=True, impl=impl, cache_starts=st)
    alone = padded_rows(k, v, lens, [0] * len(lens), 72)
    want, want_lse = sparse_decode_attention(q, *alone, sl, idx, 16, return_lse=True, impl=impl)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)
    k0, v0 = (torch.nan_to_num(x) for x in alone)
    check(out, lse, q, k0, v0, sl, idx, 16, f"{impl} starts {dtype} g{hq // hkv}")


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("bs", [16, 64])
def test_cache_starts_with_splits_and_block_sizes(num_splits, bs):
    """The launcher with forced splits (LSE merge) and blocks of several key steps: starts give the shifted rows."""
    lens, starts = [150, 33, 0], [10, 100, 160]
    q, k, v, sl, idx = make_case(lens, 4, 2, 16, 150, bs, 6, torch.float32, seed=bs + num_splits)
    kp, vp = padded_rows(k, v, lens, starts, 192)
    with poisoned_outputs():
        out, lse = sparse_decode_fwd(
            q, kp, vp, sl, idx, bs, 0.25, num_splits=num_splits, cache_starts=torch.tensor(starts, dtype=torch.int32)
        )
    k0, v0 = (torch.nan_to_num(x) for x in padded_rows(k, v, lens, [0, 0, 0], 192))
    want, want_lse = sparse_decode_fwd(q, k0, v0, sl, idx, bs, 0.25, num_splits=num_splits)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)
    assert (out[2] == 0).all() and torch.isinf(lse[2]).all()  # an empty sequence at the row's end


def paged_copy(k, v, page, seed=0):
    """The contiguous cache k, v [B, Hkv, Tmax, D] as shuffled pages [P, page, Hkv, D] + block_table."""
    b, hkv, t, d = k.shape
    n = t // page
    perm = torch.randperm(b * n, generator=torch.Generator().manual_seed(seed))
    table = perm.view(b, n).to(torch.int32)
    kp, vp = (torch.empty(b * n, page, hkv, d, dtype=k.dtype) for _ in range(2))
    kp[perm] = k.transpose(1, 2).reshape(b * n, page, hkv, d)
    vp[perm] = v.transpose(1, 2).reshape(b * n, page, hkv, d)
    return kp, vp, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [16, 64])
def test_paged_equals_contiguous(dtype, page):
    q, k, v, sl, idx = make_case([70, 128, 5], 8, 2, 16, 128, 16, 4, dtype, seed=page)
    kp, vp, table = paged_copy(k, v, page)
    assert torch.equal(gather_paged_kv(kp, table), k)
    for impl in ("triton", "reference"):
        want = sparse_decode_attention(q, k, v, sl, idx, 16, return_lse=True, impl=impl)
        got = sparse_decode_attention(q, kp, vp, sl, idx, 16, block_table=table, return_lse=True, impl=impl)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def paged_pool(k, v, lens, page, seed=0, spare=3):
    """The contiguous cache k, v [B, Hkv, Tmax, D] as an engine's page pool [P, page, Hkv, D] + block_table int32
    [B, Tmax / page]: sequence b owns ceil(lens[b] / page) pages (its last one partial when page does not divide
    lens[b]) at random places in a pool with ``spare`` more pages; the pages nobody owns are NaN and the table's
    entries past a sequence's own pages point at them or at other sequences' pages (an engine's stale entries).
    Returns kp, vp, table and the [B, Hkv, Tmax, D] view through the table (NaN or foreign past each length)."""
    b, hkv, t, d = k.shape
    assert t % page == 0
    g = torch.Generator().manual_seed(seed)
    owned = [-(-int(n) // page) for n in lens]
    total = sum(owned) + spare
    ids = torch.randperm(total, generator=g)
    kp, vp = (torch.full((total, page, hkv, d), float("nan"), dtype=k.dtype) for _ in range(2))
    table = torch.randint(0, total, (b, t // page), generator=g, dtype=torch.int32)
    start = 0
    for i, n in enumerate(owned):
        mine = ids[start : start + n]
        start += n
        table[i, :n] = mine.to(torch.int32)
        kp[mine] = k[i, :, : n * page].transpose(0, 1).reshape(n, page, hkv, d)
        vp[mine] = v[i, :, : n * page].transpose(0, 1).reshape(n, page, hkv, d)
    return kp, vp, table, gather_paged_kv(kp, table), gather_paged_kv(vp, table)


# 224 tokens of capacity: 3.5 blocks of 64 (the capacity's last block is partial), 14 / 7 / 224 pages of 16 / 32 / 1.
# Lengths: one token, partial last page and block (45 = 2 pages of 16 + 13, 1 page of 32 + 13), a full cache, a
# block boundary, a partial page in the capacity's partial block (201).
PAGED_LENS = [1, 45, 224, 128, 201]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("page", "block_n"), [(1, 32), (1, 64), (16, 16), (16, 64), (32, 32), (32, 64)])
def test_paged_pages_smaller_than_a_block(page, block_n, dtype):
    """64-token blocks over 1-, 16- and 32-token pages in a shuffled pool (a block spans 64 / page pages): every
    key step of BLOCK_N keys with one page id (page >= BLOCK_N) or one per key row (page < BLOCK_N), forced;
    GQA group 4, one (sequence, head) with nothing selected, -1 padding, split and unsplit. The kernel on the pages
    == the kernel on the contiguous cache, bit for bit (the same config); both within the fp64-oracle tolerance;
    the reference on the pages == the reference on the contiguous cache."""
    from seerattn.ops._triton.config import KernelConfig

    seed = page * 10 + block_n
    q, k, v, sl, idx = make_case(PAGED_LENS, 8, 2, 16, 224, 64, 3, dtype, seed=seed, empty_heads={(1, 1)})
    kp, vp, table, kg, _ = paged_pool(k, v, sl.tolist(), page, seed=page + block_n)
    cfg = KernelConfig(16, block_n, 1, num_warps=4, num_stages=1)
    for num_splits in (1, 2):
        with poisoned_outputs():
            got = sparse_decode_fwd(q, kp, vp, sl, idx, 64, 0.25, block_table=table, num_splits=num_splits, config=cfg)
        want = sparse_decode_fwd(q, k, v, sl, idx, 64, 0.25, num_splits=num_splits, config=cfg)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        check(got[0], got[1], q, k, v, sl, idx, 64, f"paged {page} block_n {block_n} splits {num_splits}")
    ref = sparse_decode_attention(q, kp, vp, sl, idx, 64, block_table=table, return_lse=True, impl="reference")
    ref_contig = sparse_decode_attention(q, k, v, sl, idx, 64, return_lse=True, impl="reference")
    torch.testing.assert_close(ref[0], ref_contig[0], rtol=0, atol=0)
    torch.testing.assert_close(ref[1], ref_contig[1], rtol=0, atol=0)
    # past each sequence's own pages the table shows NaN or foreign keys: the equalities above show they are not read
    own = -(-sl // page) * page
    assert all(not torch.equal(kg[i, :, own[i] :], k[i, :, own[i] :]) for i in range(len(PAGED_LENS)) if own[i] < 224)


@pytest.mark.parametrize("page", [1, 16])
def test_paged_small_pages_public_entry_point_gqa(page):
    """Through ``sparse_decode_attention`` (validation, default config and split count), group sizes 1 and 8:
    triton on the pages == reference on the pages within the oracle tolerance, and == triton contiguous."""
    for hq, hkv in ((2, 2), (8, 1)):
        q, k, v, sl, idx = make_case(PAGED_LENS, hq, hkv, 16, 224, 64, 4, torch.float16, seed=hq + page)
        kp, vp, table, _, _ = paged_pool(k, v, sl.tolist(), page, seed=hq)
        out, lse = sparse_decode_attention(q, kp, vp, sl, idx, 64, block_table=table, return_lse=True, impl="triton")
        check(out, lse, q, k, v, sl, idx, 64, f"page {page} g{hq // hkv}")
        want = sparse_decode_attention(q, k, v, sl, idx, 64, impl="triton")
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_paged_small_pages_all_empty_selection():
    q, k, v, sl, _ = make_case([40, 3], 4, 2, 16, 128, 64, 3, torch.float32)
    kp, vp, table, _, _ = paged_pool(k, v, sl.tolist(), 16)
    idx = torch.full((2, 2, 3), -1, dtype=torch.int32)
    idx[1, 1, 0] = 1  # a block past the end of a 3-token cache, whose table entries point at NaN or foreign pages
    for impl in ("triton", "reference"):
        out, lse = sparse_decode_attention(q, kp, vp, sl, idx, 64, block_table=table, return_lse=True, impl=impl)
        assert torch.equal(out, torch.zeros_like(out)), impl
        assert torch.isinf(lse).all() and (lse < 0).all(), impl


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_blocks_selected_is_dense_decode_attention(dtype):
    lens, tmax, bs = [97, 128, 1], 128, 32
    q, k, v, sl, _ = make_case(lens, 8, 2, 32, tmax, bs, 1, dtype, seed=11)
    idx = torch.arange(tmax // bs, dtype=torch.int32).flip(0).expand(3, 2, -1).contiguous()
    out, lse = sparse_decode_attention(q, k, v, sl, idx, bs, return_lse=True, impl="triton")
    keep = (torch.arange(tmax) < sl.view(-1, 1)).view(3, 1, 1, tmax)
    scale = 1.0 / math.sqrt(32)
    o64, l64, _ = lowp_attention(q.double().unsqueeze(2), k.double(), v.double(), keep, scale)
    olp, _, _ = lowp_attention(q.unsqueeze(2), k, v, keep, scale)
    assert_within_lowp("dense", out, olp.squeeze(2), o64.squeeze(2), dtype, 2.0)
    torch.testing.assert_close(
        lse.double(), l64.squeeze(2).double(), rtol=0, atol=1e-3 if dtype == torch.float16 else 1e-5
    )


def test_reference_fp64_and_gradients():
    q, k, v, sl, idx = make_case([20, 50], 4, 2, 16, 64, 16, 3, torch.float64, seed=2)
    q.requires_grad_(True)
    out, lse = sparse_decode_attention(q, k, v, sl, idx, 16, return_lse=True, impl="reference")
    assert out.dtype == lse.dtype == torch.float64
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    with pytest.raises(NotImplementedError, match="no backward"):
        sparse_decode_attention(q.float(), k.float(), v.float(), sl, idx, 16, impl="triton")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.update(q=a["q"][0]), "q must be 3-D"),
        (lambda a: a.update(block_indices=a["block_indices"].long()), "block_indices must be int32"),
        (lambda a: a.update(cache_seqlens=torch.tensor([9, 200], dtype=torch.int32)), "cache_seqlens must lie"),
        (lambda a: a["block_indices"].__setitem__((0, 0, 0), 9), r"block_indices must be -1 \(padding\) or in"),
        (lambda a: a["block_indices"].__setitem__((0, 0, slice(0, 2)), 1), "repeats a block"),
        (lambda a: a.update(block_size=24), "power of two"),
        (lambda a: a.update(v_cache=a["v_cache"].half()), "share one floating dtype"),
        (lambda a: a.update(q=a["q"][:, :3]), "multiple of key/value heads"),
        (lambda a: a.update(cache_starts=torch.tensor([0, 1])), "cache_starts must be int32"),
        (lambda a: a.update(cache_starts=torch.tensor([0], dtype=torch.int32)), r"cache_starts must be \[B\]"),
        (
            lambda a: a.update(cache_starts=torch.tensor([56, 0], dtype=torch.int32)),
            r"cache_starts \+ cache_seqlens <= 64, got cache_starts \[56, 0\]",
        ),
        (lambda a: a.update(cache_starts=torch.tensor([-1, 0], dtype=torch.int32)), "0 <= cache_starts"),
        (
            lambda a: a.update(
                k_cache=torch.zeros(4, 32, 2, 16),
                v_cache=torch.zeros(4, 32, 2, 16),
                block_table=torch.zeros(2, 2, dtype=torch.int32),
                cache_starts=torch.zeros(2, dtype=torch.int32),
            ),
            "cache_starts take a contiguous cache only",
        ),
        (
            lambda a: a.update(
                k_cache=torch.zeros(4, 24, 2, 16),
                v_cache=torch.zeros(4, 24, 2, 16),
                block_table=torch.zeros(2, 3, dtype=torch.int32),
            ),
            r"page size \(24 tokens\) must be a multiple of block_size \(16\) or divide it",
        ),
        (
            lambda a: a.update(
                k_cache=torch.zeros(4, 48, 2, 16),
                v_cache=torch.zeros(4, 48, 2, 16),
                block_table=torch.zeros(2, 2, dtype=torch.int32),
                block_size=32,
            ),
            r"a power of two from 1 to 32",
        ),
    ],
)
def test_bad_input_is_named(mutate, match):
    q, k, v, sl, idx = make_case([9, 30], 4, 2, 16, 64, 16, 3, torch.float32)
    args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=sl, block_indices=idx, block_size=16)
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        sparse_decode_attention(**args, impl="reference")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # the CPU peer is eager
def test_decode_benchmark_runs_in_its_cpu_smoke_configuration(tmp_path):
    from benchmarks import decode
    from seerattn.record import read_record

    args = ["--smoke", "--batches", "2", "--budgets", "64,128", "--reps", "1", "--json", str(tmp_path / "d.json")]
    assert decode.main(args) == 0
    record = read_record(tmp_path / "d.json")
    assert record["kind"] == "bench-decode" and record["config"]["impl"] == "triton"  # the interpreter here
    rows = {(r["provider"], r.get("budget")): r for r in record["results"]}
    providers = ("ours", "ours-starts", "seer", "seer-fused", "seer-bound", "flex")
    assert set(rows) == {("sdpa", None)} | {(p, b) for p in providers for b in (64, 128)}
    assert all("error" not in r and r["ms"] > 0 for r in rows.values())
    assert rows[("ours-starts", 64)]["speedup_vs_ours"] > 0  # the cost of the starts, in the same run
    assert rows[("ours", 64)]["kept_tokens"] == 64 and rows[("ours", 64)]["speedup_vs_sdpa"] > 0
    assert rows[("flex", 64)]["max_abs_diff_vs_ours"] < 1e-5  # FlexAttention on the same selection agrees
    # the fused gate scores + selection keep the blocks the eager seer step keeps
    assert all(rows[("seer-fused", b)]["max_abs_diff_vs_seer"] < 1e-5 for b in (64, 128))


def test_triton_kernels_run_under_the_interpreter_outside_the_test_suite(tmp_path):
    """A fresh process under TRITON_INTERPRET=1 (without this suite's conftest): the decode kernel's tensor-bounded
    loops run, because importing the kernels' config applies the interpreter work-around (triton#9171 with NumPy
    >= 2.4; without it the decode kernel raised 'only 0-dimensional arrays can be converted')."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import torch\n"
        "from seerattn.ops import sparse_decode_attention\n"
        "q, k, v = torch.randn(1, 4, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)\n"
        "idx = torch.tensor([[[0, 2], [1, -1]]], dtype=torch.int32)\n"
        "lens = torch.tensor([50], dtype=torch.int32)\n"
        "a = sparse_decode_attention(q, k, v, lens, idx, 16, impl='triton')\n"
        "b = sparse_decode_attention(q, k, v, lens, idx, 16, impl='reference')\n"
        "print(float((a - b).abs().max()))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root / "src")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.strip().splitlines()[-1]) < 1e-5


def test_decode_benchmark_smoke_on_a_paged_cache(tmp_path):
    """``--page 4`` under 16-token blocks (a block spans 4 pages): ours / seer run on the paged copy and agree with
    the contiguous cache bit for bit (the same config in the interpreter)."""
    from benchmarks import decode
    from seerattn.record import read_record

    args = ["--smoke", "--batches", "2", "--budgets", "64", "--reps", "1", "--providers", "sdpa,ours,seer", "--page"]
    assert decode.main([*args, "4", "--json", str(tmp_path / "d.json")]) == 0
    rows = {r["provider"]: r for r in read_record(tmp_path / "d.json")["results"]}
    assert set(rows) == {"sdpa", "ours", "seer"} and all(r["page"] == 4 and r["ms"] > 0 for r in rows.values())
    assert rows["ours"]["max_abs_diff_vs_contiguous"] == 0.0
    with pytest.raises(SystemExit):  # 256-token contexts: a 48-token page does not divide them
        decode.main([*args, "48"])
    with pytest.raises(SystemExit):  # cache_starts take a contiguous cache only
        decode.main(["--smoke", "--providers", "ours-starts", "--page", "4"])


# ---------------------------------------------------------------------- GPU (compiled kernels, bf16)
def _on_gpu():
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


gpu = pytest.mark.skipif(not _on_gpu(), reason="needs a CUDA GPU and the compiled kernels (no TRITON_INTERPRET)")


def _check_bf16_against_oracle(out, lse, qb, kb, vb, sl, idx) -> None:
    """bf16 kernel output / lse against the fp64 oracle: error <= 2x bf16 PyTorch's + eps, empty rows exact."""
    (o64, l64), (olp, _) = oracle_and_lowp(qb, kb, vb, sl, idx, 64)
    err, lp_err = (out - o64).double().norm() / o64.double().norm(), (olp - o64).double().norm() / o64.double().norm()
    assert err <= 2 * lp_err + 1e-3, f"error {err:.3g} vs bf16 PyTorch {lp_err:.3g}"
    empty = torch.isinf(l64)
    assert torch.equal(torch.isinf(lse), empty) and (out[empty] == 0).all() and not torch.isnan(out).any()
    torch.testing.assert_close(lse[~empty].double(), l64[~empty].double(), rtol=0, atol=2e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_gpu_bf16_llama_shapes(paged):
    """Llama-3.1-8B heads, bf16, 8k cache, varlen, 64-token blocks: error vs fp64 <= 2x bf16 PyTorch + eps."""
    lens = [8192, 5001, 77, 1]
    q, k, v, sl, idx = make_case(lens, 32, 8, 128, 8192, 64, 32, torch.float32, seed=1, empty_heads={(2, 3)})
    q, k, v, sl, idx = (x.cuda() for x in (q, k, v, sl, idx))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    if paged:
        kp, vp, table = (x.cuda() for x in paged_copy(kb.cpu(), vb.cpu(), 256))
        out, lse = sparse_decode_attention(qb, kp, vp, sl, idx, 64, block_table=table, return_lse=True)
    else:
        out, lse = sparse_decode_attention(qb, kb, vb, sl, idx, 64, return_lse=True)
    _check_bf16_against_oracle(out, lse, qb, kb, vb, sl, idx)


@pytest.mark.gpu
@gpu
def test_gpu_bf16_cache_starts_left_padded_8k():
    """A left-padded batch (Llama-3.1-8B heads, bf16, 8k rows, 64-token blocks, NaN pad keys): every sequence ends
    at the row's end and starts at its own token; error vs fp64 <= 2x bf16 PyTorch + eps, and bit-equal to the
    kernel on each sequence moved to the start of its row (same shapes: the same tuned config)."""
    lens = [8192, 5001, 77, 1]
    starts = [8192 - n for n in lens]
    q, k, v, sl, idx = make_case(lens, 32, 8, 128, 8192, 64, 32, torch.float32, seed=2, empty_heads={(2, 3)})
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    kp, vp = padded_rows(kb, vb, lens, starts, 8192)
    st = torch.tensor(starts, dtype=torch.int32)
    qb, kb, vb, kp, vp, sl, idx, st = (x.cuda() for x in (qb, kb, vb, kp, vp, sl, idx, st))
    out, lse = sparse_decode_attention(qb, kp, vp, sl, idx, 64, return_lse=True, cache_starts=st)
    _check_bf16_against_oracle(out, lse, qb, kb, vb, sl, idx)
    zero = torch.zeros_like(st)
    out0, lse0 = sparse_decode_attention(qb, kb, vb, sl, idx, 64, return_lse=True, cache_starts=zero)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)


@pytest.mark.gpu
@gpu
def test_gpu_bf16_16_token_pages_32k():
    """vLLM's default 16-token pages under 64-token blocks (a block spans 4 pages: per-row page ids in the kernel),
    bf16, Llama-3.1-8B heads, 32k cache, varlen (partial last pages), a 4096-token budget, a shuffled pool with NaN
    pages nobody owns: error vs fp64 <= 2x bf16 PyTorch + eps, and the contiguous kernel's result."""
    lens = [32768, 20001, 77, 1]
    q, k, v, sl, idx = make_case(lens, 32, 8, 128, 32768, 64, 64, torch.float32, seed=5, empty_heads={(1, 2)})
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    kp, vp, table, _, _ = paged_pool(kb, vb, lens, 16, seed=5)
    qb, kb, vb, kp, vp, table, sl, idx = (x.cuda() for x in (qb, kb, vb, kp, vp, table, sl, idx))
    out, lse = sparse_decode_attention(qb, kp, vp, sl, idx, 64, block_table=table, return_lse=True)
    _check_bf16_against_oracle(out, lse, qb, kb, vb, sl, idx)
    out_c, lse_c = sparse_decode_attention(qb, kb, vb, sl, idx, 64, return_lse=True)
    torch.testing.assert_close(out.float(), out_c.float(), rtol=0, atol=2e-2)  # configs may differ (autotuned)
    torch.testing.assert_close(lse, lse_c, rtol=0, atol=1e-3)


@pytest.mark.gpu
@gpu
def test_gpu_decode_step_has_no_host_sync_and_replays_in_a_cuda_graph():
    """Gate scores -> budget policy -> kernel -> cache append: no synchronising call (after the first call
    tuned the kernel), and a CUDA graph of the step replays to the eager result on new inputs."""
    from seerattn.decode_policy import DecodePolicy, select_decode_blocks
    from seerattn.gate import DecodeGate, DecodeGateConfig, GateKeyCache

    def rotary(x, pos):
        f = pos.float().unsqueeze(-1) / 10000 ** (torch.arange(0, 128, 2, device=x.device) / 128)
        emb = torch.cat((f, f), -1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    b, t = 4, 4096
    gate = DecodeGate(32, 8, 128, DecodeGateConfig()).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(b, 8, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    q = torch.randn(b, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    lens = torch.tensor([4000, 3000, 129, 64], dtype=torch.int32, device="cuda")
    cache = GateKeyCache(gate, b, max_tokens=t)
    # Prefill from the longest prompt's keys only: the cache's host bound is then 4000 tokens, so the
    # append below stays inside the t // 64 blocks the step's selection is sized for (a prefill of all
    # t keys sets the bound to t and the append grew the cache to 2x: the GPU run of a59562e failed so).
    cache.prefill(k[:, :, : int(lens.max())], lens - 1, rotary)
    policy = DecodePolicy("budget", 1024)

    def step():
        with torch.no_grad():
            logits = gate.scores(q, cache.keys, (lens - 1).long(), rotary)
            idx = select_decode_blocks(logits, lens, policy, 64, t // 64)
            return sparse_decode_attention(q, k, v, lens, idx, 64), idx

    step()  # first call: kernel tuning (timed, synchronising)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, idx = step()
        cache.append(k[:, :, 0], rotary)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.capacity == t // 64
    want = sparse_decode_attention(q, k, v, lens, idx, 64, impl="reference")
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        static_out, _ = step()
    q.copy_(torch.randn(q.shape, device="cuda", generator=g))
    graph.replay()
    torch.testing.assert_close(static_out, step()[0], rtol=0, atol=0)
