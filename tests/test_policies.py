"""Sparsity policies: ``mask_from_scores`` under each ``SparsityPolicy`` hits its target exactly.

Every test runs twice (module-scoped ``impl`` parameter): with the PyTorch policies and with the
selection kernel (``impl="triton"``: the interpreter on the CPU, the GPU where there is one), which
must keep the same blocks with the same tie rule.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seerattn
from seerattn import BlockMask, SparsityPolicy
from seerattn.block_mask import ALLOCATIONS, density_row_budget

HYP = settings(max_examples=50, deadline=None)
mask_from_scores = seerattn.mask_from_scores  # rebound per implementation by the ``impl`` fixture


def _with_impl(impl, scores, policy, *args, **kwargs):
    if impl == "triton" and torch.cuda.is_available() and scores.device.type == "cpu":
        # with a GPU the kernel runs there (the interpreter is on only without one)
        return seerattn.mask_from_scores(scores.cuda(), policy, *args, impl=impl, **kwargs).to("cpu")
    return seerattn.mask_from_scores(scores, policy, *args, impl=impl, **kwargs)


@pytest.fixture(scope="module", autouse=True, params=["reference", "triton"])
def impl(request):
    """Module-scoped (hypothesis refuses function-scoped fixtures): the tests call the module-level
    ``mask_from_scores``, which is bound to the implementation here."""
    global mask_from_scores
    mask_from_scores = functools.partial(_with_impl, request.param)
    yield request.param
    mask_from_scores = seerattn.mask_from_scores


def _probs(b, h, nq, seed, dtype=torch.float32):
    """Causal softmax rows [B, H, NQ, NQ] with distinct values (zeros above the diagonal)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, nq, nq, generator=g, dtype=torch.float64) * 2
    causal = torch.ones(nq, nq, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).to(dtype)


def _forced(nq, sink, diag):
    f = torch.zeros(nq, nq, dtype=torch.bool)
    if sink:
        f[:, 0] = True
    if diag:
        f |= torch.eye(nq, dtype=torch.bool)
    return f


def _kept(scores, policy, bs=16, seq_len=None):
    nq = scores.shape[-1]
    seq_len = nq * bs if seq_len is None else seq_len
    m = mask_from_scores(scores, policy, seq_len, bs)
    assert isinstance(m, BlockMask) and m.shape == tuple(scores.shape)
    assert m.seq_len == seq_len and m.block_size == bs
    return m.to_dense()


def _check_invariants(dense):
    nq = dense.shape[-1]
    upper = torch.ones(nq, nq, dtype=torch.bool).triu(1)
    assert not dense[..., upper].any(), "a policy kept a block above the diagonal"
    assert dense.any(-1).all(), "a policy left a row empty"


# ===================================================================== density


# one random density case: block count, density, which blocks are forced, scores' seed
DENSITY_CASE = {
    "nq": st.integers(1, 24),
    "rho": st.floats(0.01, 1.0),
    "sink": st.booleans(),
    "diag": st.booleans(),
    "seed": st.integers(0, 10_000),
}
density_cases = given(**DENSITY_CASE)


def _density_case(allocation, nq, rho, sink, diag, seed):
    """(scores, kept, forced, causal) of one density case under ``allocation`` (invariants checked)."""
    scores = _probs(2, 3, nq, seed)
    pol = SparsityPolicy("density", rho, allocation, keep_sink=sink, keep_diagonal=diag)
    dense = _kept(scores, pol)
    _check_invariants(dense)
    return scores, dense, _forced(nq, sink, diag), torch.ones(nq, nq, dtype=torch.bool).tril()


@HYP
@density_cases
def test_density_row_counts(nq, rho, sink, diag, seed):
    scores, dense, forced, causal = _density_case("row", nq, rho, sink, diag, seed)
    for i in range(nq):
        n = i + 1
        target = round(rho * n)
        budget = max(1, target)
        n_forced = int(forced[i].sum())
        kept = dense[..., i, :].sum(-1)
        # Exactly the budget unless the forced blocks alone exceed it; always within one block of
        # round(rho * n) when the forced blocks fit.
        assert (kept == max(budget, n_forced)).all(), (i, kept, budget, n_forced)
        if n_forced <= budget:
            assert ((kept - target).abs() <= 1).all()
        # Forced blocks are in, and every other kept block outscores every dropped causal block.
        assert dense[..., i, forced[i]].all()
        free_kept = dense[..., i, :] & ~forced[i] & causal[i]
        dropped = ~dense[..., i, :] & causal[i]
        s = scores[..., i, :]
        lo = s.masked_fill(~free_kept, float("inf")).amin(-1)
        hi = s.masked_fill(~dropped, float("-inf")).amax(-1)
        assert (lo >= hi).all()


@pytest.mark.parametrize("rho", [0.05, 0.1, 0.3, 0.5, 0.8])
def test_overall_density_converges_to_target(rho):
    nq = 64
    scores = _probs(1, 4, nq, seed=int(rho * 100))
    m = mask_from_scores(scores, SparsityPolicy("density", rho, keep_sink=False, keep_diagonal=False), nq * 64, 64)
    assert abs(m.density() - rho) < 0.02
    # With the forced blocks on, the realised density is still near (but not below) the target.
    m2 = mask_from_scores(scores, SparsityPolicy("density", rho), nq * 64, 64)
    assert m2.density() >= m.density() - 1e-12


def test_density_one_keeps_whole_causal_triangle():
    scores = _probs(1, 2, 9, seed=3)
    dense = _kept(scores, SparsityPolicy("density", 1.0, keep_sink=False, keep_diagonal=False))
    assert torch.equal(dense, torch.ones(9, 9, dtype=torch.bool).tril().expand(1, 2, 9, 9))


# ===================================================================== density allocations


def _assert_top_scores(dense, scores, forced, causal, dims):
    """Forced blocks are kept and every other kept block outscores every dropped causal block,
    comparing within ``dims`` (``(-1,)`` per row, ``(-2, -1)`` per head)."""
    assert dense[..., forced].all()
    free_kept = dense & ~forced & causal
    dropped = ~dense & causal
    lo = scores.masked_fill(~free_kept, float("inf")).amin(dim=dims)
    hi = scores.masked_fill(~dropped, float("-inf")).amax(dim=dims)
    assert (lo >= hi).all()


@HYP
@density_cases
def test_uniform_allocation_keeps_one_count_per_row(nq, rho, sink, diag, seed):
    scores, dense, forced, causal = _density_case("uniform", nq, rho, sink, diag, seed)
    # k by brute force: the count whose triangle total sum_I min(k, I + 1) is closest to the target
    totals = [sum(min(k, i + 1) for i in range(nq)) for k in range(1, nq + 1)]
    target = rho * nq * (nq + 1) / 2
    k = 1 + min(range(nq), key=lambda j: (abs(totals[j] - target), j))
    assert density_row_budget(nq, rho, allocation="uniform").tolist() == [min(k, i + 1) for i in range(nq)]
    for i in range(nq):
        want = max(min(k, i + 1), int(forced[i].sum()))
        assert (dense[..., i, :].sum(-1) == want).all(), (i, k)
    _assert_top_scores(dense, scores, forced, causal, dims=(-1,))


@HYP
@given(**DENSITY_CASE, allocation=st.sampled_from(["row", "uniform", "floor"]), levels=st.integers(1, 3))
def test_density_ties_keep_the_lower_columns(nq, rho, sink, diag, seed, allocation, levels):
    """Scores with many ties: each row keeps what a stable descending sort of the row puts first
    (forced blocks, then the highest scores, equal scores by lower column), budget as allocated."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (2, 3, nq, nq), generator=g).float()
    dense = _kept(scores, SparsityPolicy("density", rho, allocation, keep_sink=sink, keep_diagonal=diag))
    forced = _forced(nq, sink, diag)
    budget = density_row_budget(nq, rho, allocation=allocation)
    want = torch.zeros(2, 3, nq, nq, dtype=torch.bool)
    for i in range(nq):
        row = scores[..., i, : i + 1].masked_fill(forced[i, : i + 1], float("inf"))
        order = row.argsort(dim=-1, descending=True, stable=True)[..., : int(budget[i])]
        want[..., i, :].scatter_(-1, order, True)
        want[..., i, :] |= forced[i]
    assert torch.equal(dense, want)


def test_uniform_allocation_is_the_papers_nz_ratio():
    """k ~ (1 - sqrt(1 - rho)) * NQ, and the triangle is kept at rho up to rounding of k."""
    nq = 128
    for rho in (0.1, 0.2, 0.5):
        budget = density_row_budget(nq, rho, allocation="uniform")
        k = int(budget.max())
        assert abs(k - (1 - (1 - rho) ** 0.5) * nq) <= 1
        # one step of k moves the total by at most NQ blocks, so the closest k is within half of it
        assert abs(budget.sum().item() - rho * nq * (nq + 1) / 2) <= nq / 2
        assert (budget[:k] == torch.arange(1, k + 1)).all(), "the first k rows are dense"


@HYP
@density_cases
def test_floor_allocation_is_proportional_above_half_the_uniform_count(nq, rho, sink, diag, seed):
    scores, dense, forced, causal = _density_case("floor", nq, rho, sink, diag, seed)
    budget = density_row_budget(nq, rho, allocation="floor")
    least = -(-int(density_row_budget(nq, rho, allocation="uniform").max()) // 2)
    rows = torch.arange(1, nq + 1)
    assert (budget >= torch.clamp(rows, max=least)).all() and (budget <= rows).all()
    assert (budget[1:] >= budget[:-1]).all(), "a later row never keeps fewer blocks"
    # no other scale of the proportional part brings the total closer to the target
    target = rho * nq * (nq + 1) / 2
    best = min(
        abs(torch.minimum(rows, torch.clamp(torch.round(rows * c), min=least)).sum().item() - target)
        for c in torch.linspace(0, 1, 2001, dtype=torch.float64).tolist()
    )
    assert abs(budget.sum().item() - target) <= best + 1e-9
    for i in range(nq):
        assert (dense[..., i, :].sum(-1) == max(int(budget[i]), int(forced[i].sum()))).all(), i
    _assert_top_scores(dense, scores, forced, causal, dims=(-1,))


def test_floor_allocation_between_row_and_uniform():
    """At 8k / 10 %: the first rows get the uniform count's half, the last ones most of row's budget."""
    nq = 128
    row, uniform, floor = (density_row_budget(nq, 0.1, allocation=a) for a in ("row", "uniform", "floor"))
    assert int(uniform.max()) == 7 and floor[:4].tolist() == [1, 2, 3, 4] and (floor[3:40] >= 4).all()
    assert int(row[-1]) == 13 and 10 <= int(floor[-1]) < 13
    assert abs(floor.sum().item() / (nq * (nq + 1) / 2) - 0.1) < 0.002


@HYP
@density_cases
def test_head_allocation_keeps_the_heads_top_scores(nq, rho, sink, diag, seed):
    scores, dense, forced, causal = _density_case("head", nq, rho, sink, diag, seed)
    total = round(rho * nq * (nq + 1) / 2)
    kept = dense.sum((-2, -1))
    if sink or diag:  # every row has a forced block: exactly the budget unless the forced exceed it
        assert (kept == max(total, int(forced.sum()))).all()
        _assert_top_scores(dense, scores, forced, causal, dims=(-2, -1))
    else:  # rows left empty by the budget get their best block back
        assert ((kept >= total) & (kept <= total + nq)).all()


def test_head_allocation_gives_concentrated_rows_fewer_blocks():
    """A row whose scores sit on one block keeps that block; a flat row takes the freed budget."""
    nq = 8
    scores = torch.full((1, 1, nq, nq), 1e-3).tril()
    scores[0, 0, 7] = torch.tensor([0.0, 0, 0, 0.9, 0, 0, 0, 0.1])  # row 7 concentrated on block 3
    scores[0, 0, 6, :7] = 1 / 7  # row 6 flat
    pol = SparsityPolicy("density", 0.35, allocation="head", keep_sink=False, keep_diagonal=False)
    dense = _kept(scores, pol)[0, 0]
    assert dense[7].nonzero().flatten().tolist() == [3, 7]
    assert dense[6, :7].all()


# ===================================================================== threshold


@HYP
@given(
    nq=st.integers(1, 12),
    t=st.floats(0.0, 1.0),
    sink=st.booleans(),
    diag=st.booleans(),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_threshold_exact(nq, t, sink, diag, seed, dtype):
    scores = _probs(2, 2, nq, seed, dtype=dtype)
    dense = _kept(scores, SparsityPolicy("threshold", t, keep_sink=sink, keep_diagonal=diag))
    _check_invariants(dense)
    causal = torch.ones(nq, nq, dtype=torch.bool).tril()
    expect = ((scores >= t) & causal) | _forced(nq, sink, diag)
    # A row with nothing over the threshold and nothing forced keeps its best causal block.
    empty = ~expect.any(-1)
    best = scores.masked_fill(~causal, float("-inf")).argmax(-1)
    expect = expect | (empty.unsqueeze(-1) & torch.nn.functional.one_hot(best, nq).bool())
    assert torch.equal(dense, expect)


def test_threshold_fp64_exact_at_the_boundary():
    """fp64 scores a hair below / at / above the threshold: only >= t is kept (no fp32 rounding)."""
    t = 0.3
    scores = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    scores[0, 0, 3, :3] = torch.tensor([t - 1e-12, t, t + 1e-12], dtype=torch.float64)
    scores[0, 0, 2, :2] = torch.tensor([t - 1e-15, 0.0], dtype=torch.float64)
    dense = _kept(scores, SparsityPolicy("threshold", t, keep_sink=False, keep_diagonal=True))
    assert dense[0, 0, 3].tolist() == [False, True, True, True]
    assert dense[0, 0, 2].tolist() == [False, False, True, False]


def test_threshold_zero_and_one():
    scores = _probs(1, 1, 6, seed=1)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(_kept(scores, SparsityPolicy("threshold", 0.0))[0, 0], causal)
    only_forced = _kept(scores, SparsityPolicy("threshold", 1.0))[0, 0]
    assert torch.equal(only_forced, _forced(6, True, True))


# ===================================================================== top_p


def _top_p_oracle(scores, p, forced):
    """Per row: the fewest highest causal blocks whose mass reaches p * row mass, plus forced."""
    b, h, nq, _ = scores.shape
    out = torch.zeros(b, h, nq, nq, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                row = scores[bi, hi, i, : i + 1].tolist()
                order = sorted(range(i + 1), key=lambda j: -row[j])
                total, acc = sum(row), 0.0
                for j in order:
                    if acc >= p * total:
                        break
                    out[bi, hi, i, j] = True
                    acc += row[j]
                out[bi, hi, i] |= forced[i]
    return out


@HYP
@given(
    nq=st.integers(1, 10),
    p=st.sampled_from([0.25, 0.5, 0.75, 0.9, 0.3, 1.0]),
    sink=st.booleans(),
    diag=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_top_p_minimal_prefix_exact(nq, p, sink, diag, seed):
    """Distinct integer scores in fp64: every partial sum is exact, so the set is checked exactly."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.stack([torch.randperm(nq, generator=g) for _ in range(2 * nq)]).double() + 1
    scores = scores.view(1, 2, nq, nq).tril()
    dense = _kept(scores, SparsityPolicy("top_p", p, keep_sink=sink, keep_diagonal=diag))
    _check_invariants(dense)
    assert torch.equal(dense, _top_p_oracle(scores, p, _forced(nq, sink, diag)))


@pytest.mark.parametrize("p", [0.5, 0.9, 0.95])
def test_top_p_reaches_mass_with_fewest_blocks(p):
    scores = _probs(2, 2, 12, seed=7)
    dense = _kept(scores, SparsityPolicy("top_p", p, keep_sink=False, keep_diagonal=False))
    _check_invariants(dense)
    for idx in torch.nonzero(torch.ones(2, 2, 12)).tolist():
        b, h, i = idx
        row = scores[b, h, i, : i + 1].double()
        kept = dense[b, h, i, : i + 1]
        k = int(kept.sum())
        top = row.sort(descending=True).values
        # The kept set is the top-k, it reaches the mass, and top-(k-1) does not.
        assert torch.equal(kept, row >= top[k - 1])
        assert top[:k].sum() >= p * row.sum() - 1e-6
        assert k == 1 or top[: k - 1].sum() < p * row.sum() + 1e-6


def test_top_p_one_keeps_all_positive_blocks():
    scores = _probs(1, 1, 5, seed=2)
    dense = _kept(scores, SparsityPolicy("top_p", 1.0, keep_sink=False, keep_diagonal=False))
    assert torch.equal(dense[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())


# ===================================================================== forced blocks, dense rows, dense


def _low_forced_scores(nq):
    """Scores where the sink column and the diagonal are the worst causal blocks of every row."""
    s = _probs(1, 2, nq, seed=5) + 1.0
    s[..., :, 0] = 0.0
    s[..., torch.arange(nq), torch.arange(nq)] = 0.0
    return s.tril()


@pytest.mark.parametrize("kind,value", [("density", 0.05), ("threshold", 0.9), ("top_p", 0.05)])
@pytest.mark.parametrize("sink", [True, False])
@pytest.mark.parametrize("diag", [True, False])
def test_sink_and_diagonal_kept_only_when_asked(kind, value, sink, diag):
    nq = 10
    scores = _low_forced_scores(nq)
    if kind == "threshold":
        scores = scores / scores.amax()  # off-forced blocks in [~0.5, 1]; forced blocks 0
    dense = _kept(scores, SparsityPolicy(kind, value, keep_sink=sink, keep_diagonal=diag))
    _check_invariants(dense)
    rows = torch.arange(2, nq)  # rows >= 2 have better blocks than the sink and the diagonal
    sink_col = dense[..., rows, 0]
    diag_col = dense[..., rows, rows]
    assert sink_col.all() if sink else not sink_col.any()
    assert diag_col.all() if diag else not diag_col.any()
    if sink or diag:
        assert dense[..., 0, 0].all()


@pytest.mark.parametrize("rows", [0, 1, 3, 8, 100])
def test_dense_last_rows(rows):
    nq = 8
    scores = _probs(1, 2, nq, seed=4)
    base = SparsityPolicy("density", 0.2)
    sparse = _kept(scores, base)
    dense = _kept(scores, SparsityPolicy("density", 0.2, dense_last_rows=rows))
    _check_invariants(dense)
    cut = max(nq - rows, 0)
    causal = torch.ones(nq, nq, dtype=torch.bool).tril()
    assert torch.equal(dense[..., cut:, :], causal[cut:].expand(1, 2, -1, -1))
    assert torch.equal(dense[..., :cut, :], sparse[..., :cut, :])


def test_dense_policy_keeps_causal_triangle_and_ignores_upper_scores():
    scores = torch.full((1, 3, 7, 7), 0.5)
    scores[..., 0, 6] = 100.0  # above the diagonal: must be ignored by every policy
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    assert torch.equal(_kept(scores, SparsityPolicy("dense"))[0, 0], causal)
    for pol in (
        SparsityPolicy("density", 0.3),
        SparsityPolicy("top_p", 0.5),
        SparsityPolicy("threshold", 0.4),
    ):
        _check_invariants(_kept(scores, pol))


def test_partial_last_block_seq_len():
    scores = _probs(1, 1, 5, seed=8)
    m = mask_from_scores(scores, SparsityPolicy("density", 0.5), seq_len=65, block_size=16)
    assert m.seq_len == 65 and m.shape == (1, 1, 5, 5)


@st.composite
def adversarial_scores(draw):
    nq = draw(st.integers(1, 10))
    kind = draw(st.sampled_from(["all_zero", "constant", "one_hot_upper", "neg_inf", "pos_inf", "random"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    s = torch.rand(1, 2, nq, nq, generator=g)
    if kind == "all_zero":
        s.zero_()
    elif kind == "constant":
        s.fill_(0.25)
    elif kind == "one_hot_upper":  # all mass above the diagonal (junk the policy must ignore)
        s = torch.ones(1, 2, nq, nq).triu(1)
    elif kind == "neg_inf":
        s = s.masked_fill(torch.rand(1, 2, nq, nq, generator=g) < 0.5, float("-inf"))
    elif kind == "pos_inf":
        s = s.masked_fill(torch.rand(1, 2, nq, nq, generator=g) < 0.2, float("inf"))
    zero_rows = torch.rand(nq, generator=g) < 0.3
    s[..., zero_rows, :] = 0.0
    return s


@HYP
@given(
    scores=adversarial_scores(),
    kind=st.sampled_from(["dense", "threshold", "density", "top_p"]),
    value=st.floats(0.001, 1.0),
    sink=st.booleans(),
    diag=st.booleans(),
    last=st.integers(0, 3),
    allocation=st.sampled_from(list(ALLOCATIONS)),
)
def test_no_empty_row_and_nothing_above_diagonal(scores, kind, value, sink, diag, last, allocation):
    allocation = allocation if kind == "density" else "row"
    pol = SparsityPolicy(kind, value, allocation, keep_sink=sink, keep_diagonal=diag, dense_last_rows=last)
    m = mask_from_scores(scores, pol, scores.shape[-1] * 16, 16)
    dense = m.to_dense()
    _check_invariants(dense)
    assert (m.kv_num_blocks >= 1).all()


# ===================================================================== config: overrides, dicts


def test_layer_overrides_for_layer():
    l3 = SparsityPolicy("threshold", 0.01)
    l5 = SparsityPolicy("dense")
    pol = SparsityPolicy("density", 0.2, layer_overrides={3: l3, 5: l5})
    assert pol.for_layer(3) is l3 and pol.for_layer(5) is l5
    assert pol.for_layer(0) is pol and pol.for_layer(None) is pol
    scores = _probs(1, 1, 6, seed=0)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(_kept(scores, pol.for_layer(5))[0, 0], causal)
    assert not torch.equal(_kept(scores, pol.for_layer(4))[0, 0], causal)


def test_to_dict_from_dict_round_trip_through_json():
    pol = SparsityPolicy(
        "top_p",
        0.9,
        keep_sink=False,
        keep_diagonal=True,
        dense_last_rows=2,
        layer_overrides={
            0: SparsityPolicy("dense"),
            3: SparsityPolicy("density", 0.1, allocation="head"),
            7: SparsityPolicy("threshold", 0.05, keep_sink=False),
        },
    )
    d = pol.to_dict()
    assert d["kind"] == "top_p" and d["value"] == 0.9 and d["dense_last_rows"] == 2
    back = SparsityPolicy.from_dict(json.loads(json.dumps(d)))
    assert back == pol
    assert back.for_layer(7) == SparsityPolicy("threshold", 0.05, keep_sink=False)
    assert back.for_layer(3).allocation == "head" and d["allocation"] == "row"
    # adapters written before allocations existed have no such key: they meant "row"
    assert SparsityPolicy.from_dict({"kind": "density", "value": 0.2}).allocation == "row"
    assert SparsityPolicy.from_dict({}) == SparsityPolicy()


# ===================================================================== GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "kind,value,allocation",
    [
        ("density", 0.1, "row"),
        ("density", 0.1, "uniform"),
        ("density", 0.1, "floor"),
        ("density", 0.1, "head"),
        ("threshold", 0.01, "row"),
        ("top_p", 0.9, "row"),
    ],
)
def test_cuda_masks_equal_cpu_masks(kind, value, allocation):
    """The policies rank with sorts and scatters whose CUDA versions must pick the same blocks (8k tokens)."""
    scores = _probs(1, 8, 128, seed=5)
    pol = SparsityPolicy(kind, value, allocation)
    cpu = seerattn.mask_from_scores(scores, pol, 128 * 64, 64).to_dense()
    gpu = mask_from_scores(scores.cuda(), pol, 128 * 64, 64).to_dense().cpu()
    assert torch.equal(cpu, gpu)


# ===================================================================== ranking on logits


def test_ranks_within_rows_names_the_row_ranked_policies():
    want = {("dense", "row"): True, ("threshold", "row"): False, ("top_p", "row"): False}
    want |= {("density", a): a != "head" for a in ALLOCATIONS}
    for (kind, allocation), ranked in want.items():
        assert SparsityPolicy(kind, 0.5, allocation).ranks_within_rows is ranked, (kind, allocation)


@HYP
@given(
    nq=st.integers(1, 24),
    rho=st.floats(0.01, 1.0),
    seed=st.integers(0, 10_000),
    allocation=st.sampled_from([a for a in ALLOCATIONS if SparsityPolicy("density", 0.1, a).ranks_within_rows]),
)
def test_row_ranked_policies_keep_the_same_blocks_from_logits_as_from_probabilities(nq, rho, seed, allocation):
    # the sparse prefill skips the softmax for these policies (seerattn.hf.integration._prefill_mask)
    g = torch.Generator().manual_seed(seed)
    causal = torch.ones(nq, nq, dtype=torch.bool).tril()
    # rows on different scales, as gate logits are
    logits = torch.randn(2, 3, nq, nq, generator=g) * torch.linspace(0.5, 8.0, nq)[:, None]
    logits = logits.masked_fill(~causal, float("-inf"))
    pol = SparsityPolicy("density", rho, allocation)
    assert torch.equal(_kept(logits, pol), _kept(logits.softmax(-1), pol))


def test_head_allocation_ranks_across_rows_so_logits_differ():
    # row 1's logits are shifted up by 10: the same probabilities as row 0's pattern, far larger logits
    logits = torch.tensor([[0.0, float("-inf"), float("-inf")], [10.0, 11.0, float("-inf")], [0.0, 0.5, 3.0]])
    pol = SparsityPolicy("density", 0.5, "head", keep_sink=False, keep_diagonal=False)
    assert not pol.ranks_within_rows
    assert not torch.equal(_kept(logits[None, None], pol), _kept(logits.softmax(-1)[None, None], pol))


@pytest.mark.parametrize("kind,value", [("density", 0.3), ("threshold", 0.05), ("top_p", 0.9), ("dense", 1.0)])
def test_nan_is_refused_on_and_below_the_diagonal_only(kind, value):
    """CPU scores: NaN where a policy reads (on or below the block diagonal) raises; NaN above it, which every policy
    ignores (the gate's causal_only logits leave it unwritten), gives the mask of -inf there."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 2, 9, 9, generator=g).softmax(-1)
    above = torch.ones(9, 9, dtype=torch.bool).triu(1)
    policy = SparsityPolicy(kind, value)
    want = seerattn.mask_from_scores(scores.masked_fill(above, float("-inf")), policy, 9 * 16, 16)
    got = seerattn.mask_from_scores(scores.masked_fill(above, float("nan")), policy, 9 * 16, 16)
    assert torch.equal(got.kv_num_blocks, want.kv_num_blocks) and torch.equal(got.kv_indices, want.kv_indices)
    bad = scores.clone()
    bad[0, 1, 4, 4] = float("nan")  # on the diagonal
    with pytest.raises(ValueError, match="NaN on or below the block diagonal"):
        seerattn.mask_from_scores(bad, policy, 9 * 16, 16)
