"""The selection kernel (``mask_from_scores(impl="triton")`` / ``seerattn.ops.select_blocks``) beyond the
policy properties of tests/test_policies.py (which run for both implementations): the same lists
as the PyTorch policies on low-precision and strided scores, per-group masks, signed zeros and
infinities, longer rows (several programs), and the dispatch rules."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seerattn import SparsityPolicy, mask_from_scores
from seerattn.ops import select_blocks
from seerattn.ops._triton import select as select_mod

# The interpreter tests run on CPU tensors: on a CUDA machine only with TRITON_INTERPRET=1 set by hand
# (the conftest turns the interpreter on only where there is no GPU); the GPU tests run there instead.
interpreter = pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="interpreter tests run on CPU-only machines (set TRITON_INTERPRET=1 to force)",
)

POLICIES = [
    SparsityPolicy("density", 0.2),
    SparsityPolicy("density", 0.3, "uniform", keep_sink=False),
    SparsityPolicy("density", 0.15, "floor", keep_diagonal=False),
    SparsityPolicy("density", 0.1, keep_sink=False, keep_diagonal=False, dense_last_rows=2),
    SparsityPolicy("density", 0.2, "head"),
    SparsityPolicy("density", 0.05, "head", keep_sink=False, keep_diagonal=False),
    SparsityPolicy("threshold", 0.04),
    SparsityPolicy("top_p", 0.8),
    SparsityPolicy("top_p", 0.5, keep_sink=False, keep_diagonal=False),
    SparsityPolicy("dense"),
]


def _probs(b, h, nq, seed, levels=None):
    """Causal softmax rows; with ``levels`` the logits take few values (many ties)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (b, h, nq, nq), generator=g).float() if levels else torch.randn(b, h, nq, nq)
    causal = torch.ones(nq, nq, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def _same(scores, policy, bs=16):
    nq = scores.shape[-1]
    want = mask_from_scores(scores, policy, nq * bs - 3, bs, impl="reference")
    got = mask_from_scores(scores, policy, nq * bs - 3, bs, impl="triton")
    assert got.seq_len == want.seq_len and got.block_size == bs
    assert torch.equal(got.kv_num_blocks, want.kv_num_blocks)
    assert torch.equal(got.kv_indices, want.kv_indices), "lists differ (padding slots must be 0 too)"
    got.validate()


@interpreter
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.kind}-{p.allocation}-{p.value}")
@pytest.mark.parametrize("levels", [None, 3])
def test_kernel_lists_equal_pytorch_policies(policy, levels):
    _same(_probs(2, 3, 37, seed=1, levels=levels), policy)  # 37 rows: several row tiles, odd NQ


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_low_precision_and_fp64_scores(dtype):
    for policy in POLICIES[:8]:
        _same(_probs(1, 2, 12, seed=2, levels=4).to(dtype), policy)


@interpreter
def test_strided_scores_and_group_masks():
    """A transposed-batch view (unit last stride, other strides arbitrary); H = Hkv mask heads."""
    s = _probs(3, 2, 10, seed=3).transpose(0, 1)  # [2, 3, 10, 10] view
    for policy in POLICIES:
        _same(s, policy)


@interpreter
def test_signed_zero_and_infinities_keep_the_sort_order():
    """-0.0 ties with 0.0 (by column), +inf ranks with the forced blocks, -inf rows keep their best."""
    nq = 6
    s = torch.zeros(1, 2, nq, nq)
    s[0, 0, 5] = torch.tensor([0.0, -0.0, 0.0, -0.0, 0.2, 0.1])
    s[0, 1, 5] = torch.tensor([float("-inf")] * 3 + [float("inf"), 0.5, float("-inf")])
    s[0, 1, 4, :5] = float("-inf")
    for policy in (*POLICIES, SparsityPolicy("density", 0.5, keep_sink=False, keep_diagonal=False)):
        _same(s, policy)


DENSITY_ROWS = [  # the row allocations, with and without forced blocks and dense last rows
    SparsityPolicy("density", 0.1),
    SparsityPolicy("density", 0.05, keep_sink=False, keep_diagonal=False),
    SparsityPolicy("density", 0.3, "uniform", keep_sink=False),
    SparsityPolicy("density", 0.15, "floor", keep_diagonal=False, dense_last_rows=3),
    SparsityPolicy("density", 0.97, "uniform"),  # budgets of whole rows: the search stops at once
]


def _with_ties_and_zeros(scores, seed):
    """A copy of ``scores`` with some rows of few values (ties across the budget), zeros of both signs
    and -inf entries, so that one program holds rows that stop the search early and rows that run it
    to the end."""
    g = torch.Generator().manual_seed(seed)
    s = scores.clone()
    nq = s.shape[-1]
    causal = torch.ones(nq, nq, dtype=torch.bool).tril()
    few = torch.randint(0, 3, s.shape, generator=g).float() / 4
    rows = torch.rand(s.shape[:-1], generator=g) < 0.4
    s = torch.where(rows[..., None] & causal, few, s)
    signed = torch.rand(s.shape, generator=g)
    s = torch.where(causal & (signed < 0.1), torch.tensor(-0.0), s)
    s = torch.where(causal & (signed > 0.97), torch.tensor(float("-inf")), s)
    return s


@interpreter
@pytest.mark.parametrize("nq", [1, 2, 63, 64, 65, 200])
@pytest.mark.parametrize("policy", DENSITY_ROWS, ids=lambda p: f"{p.allocation}-{p.value}")
def test_density_width_classes_every_row_length(nq, policy):
    """Rows of every length 1..NQ across the width classes (NQ = 200: widths 256, 128 and 64 with the
    rows under 64), NQ a power of two or not, ties across the budget, -0.0 and -inf."""
    _same(_with_ties_and_zeros(_probs(1, 3, nq, seed=nq), seed=nq), policy)


@interpreter
def test_density_every_width_class_down_to_one(monkeypatch):
    """With the narrowest class at width 1 every class runs (1, 2, 4, ..., 64 for NQ = 100), in fp32
    and fp64 (64-bit keys, 32 passes of two bits)."""
    monkeypatch.setattr(select_mod, "MIN_WIDTH", 1)
    s = _with_ties_and_zeros(_probs(1, 2, 100, seed=5), seed=6)
    for policy in DENSITY_ROWS[::2]:
        _same(s, policy)
    _same(s.double(), DENSITY_ROWS[0])


@interpreter
def test_density_gpu_tiles(monkeypatch):
    """The GPU's launch (at most DENSITY_ROWS rows a program, many programs a class) run by the
    interpreter: rows of one program belong to different heads, and the last program of a class is
    partly past its end."""
    monkeypatch.setattr(select_mod, "interpreting", lambda: False)
    s = _with_ties_and_zeros(_probs(1, 2, 70, seed=7), seed=8)
    for policy in DENSITY_ROWS[:2]:
        _same(s, policy)


class _Launches:
    """Stands in for ``_density_kernel``: records each launch's (programs, classes, warps), then launches it."""

    def __init__(self, kernel):
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append((grid[0], kwargs["CLASSES"], kwargs["num_warps"]))
            return self.kernel[grid](*args, **kwargs)

        return launch


@interpreter
@pytest.mark.parametrize(
    ("nq", "per_thread", "launches"),
    [
        (200, 16, [(200 * 2, 3, 1)]),  # widths 256, 128, 64: one-warp programs, one launch
        (200, 2, [(72 * 2, 1, 4), (64 * 2, 1, 2), (64 * 2, 1, 1)]),  # 4, 2 and 1 warps: a launch each
        (200, 4, [(72 * 2, 1, 2), (128 * 2, 2, 1)]),  # 2 warps, then 128 and 64 together
    ],
)
def test_density_classes_share_launches(monkeypatch, nq, per_thread, launches):
    """The GPU's launch (one row a program): consecutive width classes whose programs have the same warps run in
    one launch, each class its rows, and the lists equal the sort's whatever the grouping."""
    monkeypatch.setattr(select_mod, "interpreting", lambda: False)
    monkeypatch.setattr(select_mod, "DENSITY_PER_THREAD", per_thread)
    recorder = _Launches(select_mod._density_kernel)
    monkeypatch.setattr(select_mod, "_density_kernel", recorder)
    s = _with_ties_and_zeros(_probs(1, 2, nq, seed=11), seed=12)
    _same(s, DENSITY_ROWS[1])
    assert recorder.seen == launches


def _narrow_rows(b, h, nq, seed):
    """Raw logits (the sparse path ranks the gate's logits, not probabilities) whose rows span few binades, so that
    their keys share the top bits and the density search starts low: fresh gates' narrow rows (1.387 +- 0.03),
    negative ones, rows with two values 2^-20 apart, constant rows (one possible threshold), rows with +inf and -inf on
    unforced blocks, and wide rows (N(0, 3^2)) beside them."""
    g = torch.Generator().manual_seed(seed)
    shape = (b, h, nq, nq)
    kinds = torch.randint(0, 6, shape[:-1], generator=g)[..., None]
    noise = torch.randn(shape, generator=g)
    two = 1.0 + torch.randint(0, 2, shape, generator=g).float() * 2.0**-20
    odd = torch.where(torch.rand(shape, generator=g) < 0.1, float("inf"), -0.75)
    odd = torch.where(torch.rand(shape, generator=g) < 0.1, float("-inf"), odd)
    s = torch.where(kinds == 0, 1.387 + 0.03 * noise, 3 * noise)
    s = torch.where(kinds == 1, -5.0 - 0.001 * noise.abs(), s)
    s = torch.where(kinds == 2, two, s)
    s = torch.where(kinds == 3, torch.full_like(s, 0.25), s)
    s = torch.where(kinds == 4, odd, s)
    causal = torch.ones(nq, nq, dtype=torch.bool).tril()
    return s.masked_fill(~causal, float("-inf"))


@interpreter
@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interpreter-tiles", "gpu-tiles"])
def test_density_search_from_the_rows_common_bits(monkeypatch, gpu_tiles):
    """The search starts at the highest bit where a row's possible thresholds differ: rows of narrow, constant,
    two-valued and infinite logits, with and without forced blocks, a program of many rows (the interpreter's
    launch: one start for all) and of one row each (the GPU's: every row its own start), 32- and 64-bit keys."""
    if gpu_tiles:
        monkeypatch.setattr(select_mod, "interpreting", lambda: False)
    s = _narrow_rows(1, 2, 70, seed=13)
    for policy in DENSITY_ROWS if not gpu_tiles else DENSITY_ROWS[:2]:
        _same(s, policy)
    _same(s.double(), DENSITY_ROWS[0])


@interpreter
@pytest.mark.slow
def test_density_2048_wide_rows():
    """NQ = 2048 (128k tokens at block 64) at one head: the widest class holds the rows 1024..2047,
    some of them ties across the budget."""
    s = _with_ties_and_zeros(_probs(1, 1, 2048, seed=9), seed=10)
    _same(s, SparsityPolicy("density", 0.05), bs=64)


@interpreter
@pytest.mark.parametrize("nq", [64, 512, 1024])
def test_density_rows_as_wide_as_their_class(nq):
    """The last row of NQ = W has W causal blocks, all of them (positive probabilities) at or above the search's
    first candidates: the packed counts reach W, which must fit a lane (10 bits of an int32 up to W = 512)."""
    s = _probs(1, 2, nq, seed=nq)
    for density in (0.1, 0.5):
        _same(s, SparsityPolicy("density", density), bs=64)


@interpreter
@settings(max_examples=25, deadline=None)
@given(
    nq=st.integers(1, 90),
    heads=st.integers(1, 3),
    levels=st.sampled_from([None, 2, 5]),
    density=st.floats(0.01, 1.0),
    allocation=st.sampled_from(["row", "uniform", "floor"]),
    sink=st.booleans(),
    diag=st.booleans(),
    dense_last=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_density_property_equals_the_sort(nq, heads, levels, density, allocation, sink, diag, dense_last, seed):
    policy = SparsityPolicy("density", density, allocation, keep_sink=sink, keep_diagonal=diag,
                            dense_last_rows=dense_last)  # fmt: skip
    _same(_probs(1, heads, nq, seed=seed, levels=levels), policy)


@interpreter
def test_dispatch_rules():
    s = _probs(1, 1, 4, seed=0)
    with pytest.raises(ValueError, match="impl must be"):
        mask_from_scores(s, SparsityPolicy(), 64, 16, impl="flex")
    # automatic: the PyTorch policies on the CPU (bitwise the reference)
    auto = mask_from_scores(s, SparsityPolicy(), 64, 16)
    ref = mask_from_scores(s, SparsityPolicy(), 64, 16, impl="reference")
    assert torch.equal(auto.kv_indices, ref.kv_indices)
    with pytest.raises(TypeError, match="bf16"):
        select_blocks(s.bfloat16(), SparsityPolicy(), 64, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads", [8, 32])
def test_cuda_kernel_equals_pytorch_policies_at_32k(heads):
    """32k tokens, block 64 (NQ = 512), gate-like softmax rows in fp32: density and threshold lists
    are identical; top_p sums the mass in another order, so a row may differ only where the mass
    before a block lies within fp32 rounding of the target."""
    nq = 512
    logits = torch.randn(1, heads, nq, nq, device="cuda") * 3
    causal = torch.ones(nq, nq, dtype=torch.bool, device="cuda").tril()
    s = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    for policy in POLICIES:
        want = mask_from_scores(s, policy, nq * 64, 64, impl="reference")
        got = mask_from_scores(s, policy, nq * 64, 64, impl="triton")
        if policy.kind != "top_p":
            assert torch.equal(got.kv_num_blocks, want.kv_num_blocks) and torch.equal(got.kv_indices, want.kv_indices)
        else:
            same_rows = (got.to_dense() == want.to_dense()).all(-1)
            assert same_rows.float().mean() > 0.999
    s = _narrow_rows(1, heads, nq, seed=15).cuda()  # raw logits of narrow, constant and infinite rows
    for policy in DENSITY_ROWS:
        want = mask_from_scores(s, policy, nq * 64, 64, impl="reference")
        got = mask_from_scores(s, policy, nq * 64, 64, impl="triton")
        assert torch.equal(got.kv_num_blocks, want.kv_num_blocks) and torch.equal(got.kv_indices, want.kv_indices)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_density_classes_equal_pytorch_policies_at_128k():
    """128k tokens, block 64 (NQ = 2048: width classes 2048 down to 64), 4 heads, gate-like fp32 rows and rows
    with many ties (logits rounded to 0.5): the density lists are identical to the sort's."""
    nq = 2048
    logits = torch.randn(1, 4, nq, nq, device="cuda") * 3
    causal = torch.ones(nq, nq, dtype=torch.bool, device="cuda").tril()
    for x in (logits, (logits * 2).round() / 2):
        s = x.masked_fill(~causal, float("-inf")).softmax(-1)
        for policy in DENSITY_ROWS:
            want = mask_from_scores(s, policy, nq * 64, 64, impl="reference")
            got = mask_from_scores(s, policy, nq * 64, 64, impl="triton")
            assert torch.equal(got.kv_num_blocks, want.kv_num_blocks) and torch.equal(got.kv_indices, want.kv_indices)
    # raw logits of narrow rows (fresh gates'), constant, two-valued and infinite rows: the search from a row's
    # common bits
    s = _narrow_rows(1, 4, nq, seed=14).cuda()
    for policy in DENSITY_ROWS[:2]:
        want = mask_from_scores(s, policy, nq * 64, 64, impl="reference")
        got = mask_from_scores(s, policy, nq * 64, 64, impl="triton")
        assert torch.equal(got.kv_num_blocks, want.kv_num_blocks) and torch.equal(got.kv_indices, want.kv_indices)


@interpreter
@pytest.mark.parametrize("allocation", ["row", "uniform", "floor"])
def test_row_budgets_are_made_once_and_never_written(allocation):
    """The density selection's row budgets: one tensor per (NQ, density, allocation, device), reused by every later
    selection (no launches for them after the first), equal to ``density_row_budget`` and unchanged by the
    selections that read it; another density gets its own."""
    from seerattn.block_mask import density_row_budget
    from seerattn.ops import gate_ops

    scores = torch.randn(1, 2, 70, 70, generator=torch.Generator().manual_seed(1))
    policy = SparsityPolicy("density", 0.3, allocation=allocation)
    first = gate_ops._row_budget(70, 0.3, allocation, scores.device)
    assert torch.equal(first, density_row_budget(70, 0.3, scores.device, allocation))
    before = first.clone()
    for _ in range(2):
        got = select_blocks(scores, policy, 70 * 16, 16)
        want = mask_from_scores(scores, policy, 70 * 16, 16, impl="reference")
        assert torch.equal(got.kv_num_blocks, want.kv_num_blocks) and torch.equal(got.kv_indices, want.kv_indices)
    assert gate_ops._row_budget(70, 0.3, allocation, scores.device) is first and torch.equal(first, before)
    assert gate_ops._row_budget(70, 0.25, allocation, scores.device) is not first
