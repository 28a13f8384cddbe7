"""95 % intervals for the evaluation's numbers, so that a reader can tell a real difference from noise.

- :func:`wilson_interval`: a proportion (passkey accuracy: ``k`` correct of ``n`` prompts). The Wilson score
  interval, not the normal approximation ``p ± z·sqrt(p(1-p)/n)``, because our accuracies sit at 0 or 1
  where the normal interval collapses to zero width.
- :func:`paired_bootstrap_ppl`: the relative difference of a method's perplexity from dense,
  ``PPL_method / PPL_dense - 1`` with ``PPL = exp(sum NLL / sum tokens)``, and its percentile interval from a
  *paired* bootstrap over windows: each resample draws windows with replacement and uses the same draw
  for dense and the method. Pairing removes the window-to-window spread that both share (some book
  passages are simply harder), which is most of the spread of either PPL on its own.

Both treat the units (prompts, windows) as independent draws. Passkey prompts at different depths of one
context share their key and filler, and windows come from a few books, so the intervals are somewhat
narrower than the truth when the units are correlated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch

__all__ = ["BOOTSTRAP_RESAMPLES", "CI_LEVEL", "paired_bootstrap_ppl", "wilson_interval"]

CI_LEVEL = 0.95  # coverage of every interval the harness reports
BOOTSTRAP_RESAMPLES = 2000  # percentile intervals need ~1000+ resamples for stable tails (Efron & Tibshirani)


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf((1.0 + level) / 2.0)


def wilson_interval(successes: int, trials: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / trials``; ``(lo, hi)`` within [0, 1]."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, trials = {trials}], got {successes}")
    z2 = _z(level) ** 2
    p = successes / trials
    denom = 1.0 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denom
    half = math.sqrt(z2) / denom * math.sqrt(p * (1.0 - p) / trials + z2 / (4 * trials**2))
    # at 0 and n the formula's bound is exactly 0 / 1; rounding would leave it a hair off
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == trials else min(1.0, centre + half)
    return lo, hi


def paired_bootstrap_ppl(
    dense_nll: Sequence[float],
    method_nll: Sequence[float],
    tokens: Sequence[int],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float, float]:
    """Relative perplexity difference of a method from dense over the same windows, with its interval.

    Args:
        dense_nll: [W] summed NLL of each window under dense attention.
        method_nll: [W] summed NLL of the same windows under the method.
        tokens: [W] scored tokens of each window (the same for both: same windows, same targets).
        resamples: bootstrap resamples (each draws W windows with replacement).
        seed: seed of the resampling (the result is a function of the inputs and the seed).

    Returns:
        ``(diff, lo, hi)``: ``diff = PPL_method / PPL_dense - 1`` on all windows, ``lo``/``hi`` the
        ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the same quantity over the resamples.
    """
    d = torch.as_tensor(dense_nll, dtype=torch.float64)
    m = torch.as_tensor(method_nll, dtype=torch.float64)
    t = torch.as_tensor(tokens, dtype=torch.float64)
    if d.ndim != 1 or d.shape != m.shape or d.shape != t.shape or d.numel() == 0:
        raise ValueError(
            f"dense_nll, method_nll and tokens must be non-empty 1-d sequences of one length (one value per "
            f"window), got shapes {tuple(d.shape)}, {tuple(m.shape)}, {tuple(t.shape)}"
        )
    if not (t > 0).all():
        raise ValueError("every window must score at least one token")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    _z(level)  # validates level

    def rel_diff(idx: torch.Tensor | slice) -> torch.Tensor:
        n = t[idx].sum(-1)
        return torch.expm1((m[idx].sum(-1) - d[idx].sum(-1)) / n)

    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(d.numel(), (resamples, d.numel()), generator=g)  # [R, W]
    boot = rel_diff(idx)  # [R]
    q = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=torch.float64)
    lo, hi = torch.quantile(boot, q).tolist()
    return rel_diff(slice(None)).item(), lo, hi
