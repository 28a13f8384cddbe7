"""95 % intervals of the evaluation: Wilson for accuracies, the paired bootstrap for PPL differences from dense."""

from __future__ import annotations

import math

import pytest
import torch

from seerattn.eval.stats import BOOTSTRAP_RESAMPLES, paired_bootstrap_ppl, wilson_interval


def _wilson_formula(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The textbook formula, written out once more: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_wilson_known_values():
    # 95 % Wilson bounds to 4 decimals (as any Wilson calculator gives them)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    for k, n in [(0, 10), (10, 10), (5, 10), (1, 20), (59, 60), (178, 180), (3, 7)]:
        assert wilson_interval(k, n) == pytest.approx(_wilson_formula(k, n), abs=1e-12), (k, n)
        lo, hi = wilson_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    # a wider level gives a wider interval; more trials a narrower one
    assert wilson_interval(5, 10, level=0.99)[0] < wilson_interval(5, 10)[0]
    assert wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0] < wilson_interval(5, 10)[1] - 0.2366


@pytest.mark.parametrize(
    "k, n, level, match",
    [(1, 0, 0.95, "trials must be >= 1"), (11, 10, 0.95, "successes must be in"), (-1, 10, 0.95, "successes"),
     (5, 10, 1.0, "level must be in")],
)  # fmt: skip
def test_wilson_rejects_bad_input(k, n, level, match):
    with pytest.raises(ValueError, match=match):
        wilson_interval(k, n, level)


def _windows(n: int, shift: float, noise: float, seed: int, tokens: int = 100):
    """Per-window NLL sums: window difficulty varies a lot (shared), the method adds ``shift`` nats per token
    plus a small per-window noise."""
    g = torch.Generator().manual_seed(seed)
    per_token = 3.0 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    dense = per_token * tokens
    method = (per_token + shift + noise * torch.randn(n, generator=g, dtype=torch.float64)) * tokens
    return dense.tolist(), method.tolist(), [tokens] * n


def test_bootstrap_point_estimate_is_the_ppl_ratio():
    dense, method, tokens = _windows(16, 0.02, 0.01, seed=0)
    diff, lo, hi = paired_bootstrap_ppl(dense, method, tokens)
    ppl = lambda nll: math.exp(sum(nll) / sum(tokens))  # noqa: E731
    assert diff == pytest.approx(ppl(method) / ppl(dense) - 1, rel=1e-12)
    assert lo < diff < hi


def test_bootstrap_interval_covers_a_known_shift():
    """A shift of s nats per token is a PPL ratio of exp(s); the interval holds it in ~95 % of draws and is
    far narrower than an unpaired view would allow (the windows' own spread is 0.5 nats)."""
    shift = 0.02
    truth = math.expm1(shift)
    covered, widths = 0, []
    for seed in range(40):
        _, lo, hi = paired_bootstrap_ppl(*_windows(32, shift, 0.01, seed), resamples=1000, seed=seed)
        covered += lo <= truth <= hi
        widths.append(hi - lo)
    assert covered >= 34  # 95 % nominal; a percentile bootstrap on 32 windows under-covers a little
    assert max(widths) < 0.02  # paired: only the 0.01-nat noise enters, not the 0.5-nat window spread
    # an interval that excludes zero for a real shift, and one that holds zero for none
    _, lo, hi = paired_bootstrap_ppl(*_windows(32, shift, 0.01, 0))
    assert lo > 0
    _, lo, hi = paired_bootstrap_ppl(*_windows(32, 0.0, 0.01, 0))
    assert lo < 0 < hi


def test_bootstrap_is_degenerate_when_windows_agree():
    dense, method, tokens = _windows(8, 0.0, 0.0, seed=1)
    assert paired_bootstrap_ppl(dense, method, tokens) == (0.0, 0.0, 0.0)
    # every window with the same shift: every resample gives the same ratio
    dense, tokens = [300.0] * 8, [100] * 8
    diff, lo, hi = paired_bootstrap_ppl(dense, [310.0] * 8, tokens)
    assert diff == pytest.approx(math.expm1(0.1)) and lo == diff == hi


def test_bootstrap_is_deterministic_under_a_seed():
    data = _windows(16, 0.01, 0.02, seed=3)
    assert paired_bootstrap_ppl(*data, seed=7) == paired_bootstrap_ppl(*data, seed=7)
    assert paired_bootstrap_ppl(*data, seed=7)[1:] != paired_bootstrap_ppl(*data, seed=8)[1:]
    assert BOOTSTRAP_RESAMPLES == 2000


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="one value per window"):
        paired_bootstrap_ppl([1.0, 2.0], [1.0], [1, 1])
    with pytest.raises(ValueError, match="one value per window"):
        paired_bootstrap_ppl([], [], [])
    with pytest.raises(ValueError, match="at least one token"):
        paired_bootstrap_ppl([1.0], [1.0], [0])
    with pytest.raises(ValueError, match="resamples must be"):
        paired_bootstrap_ppl([1.0], [1.0], [1], resamples=0)
