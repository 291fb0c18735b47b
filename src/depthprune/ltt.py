"""Learn-then-Test (Angelopoulos et al. 2021), as CALM and CAT use it: fixed-sequence testing of candidate thresholds.

For each candidate threshold t (most conservative first), the null hypothesis H_t says "the risk of t exceeds delta".
Its p-value on n calibration samples is the exact binomial tail P[Binomial(n, delta) <= k] for 0/1 losses (k the
number of losses), Hoeffding's bound for losses in [0, 1]. Testing stops at the first candidate not rejected at level
epsilon (fixed-sequence testing controls the family-wise error at epsilon with no correction); the chosen threshold
is the most aggressive rejected one. Every method that calibrates a threshold (exit criteria for classifiers and for
generation, and the coming routers and cascades) uses these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P[Binomial(n, p) <= k], exactly (log-space sum)."""
    if k >= n:
        return 1.0
    if k < 0:
        return 0.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def risk_p_value(losses: torch.Tensor, delta: float) -> float:
    """p-value of H0: E[loss] > delta, for per-sample losses in [0, 1] (exact binomial when all losses are 0/1)."""
    n = losses.numel()
    if n == 0:
        return 1.0
    binary = bool(((losses == 0) | (losses == 1)).all())
    if binary:
        return binomial_cdf(int(losses.sum().item()), n, delta)
    mean = float(losses.float().mean())
    return 1.0 if mean >= delta else math.exp(-2 * n * (delta - mean) ** 2)


def ltt_select(
    thresholds: Sequence[float],
    losses_of: Callable[[float], torch.Tensor],
    delta: float,
    epsilon: float,
    extra_of: Callable[[float], dict[str, Any]] | None = None,
) -> tuple[float | None, list[dict[str, Any]]]:
    """Fixed-sequence Learn-then-Test over `thresholds` (conservative first). Returns (chosen, table)."""
    if not 0 < delta < 1 or not 0 < epsilon < 1:
        raise ValueError(f"delta and epsilon must lie in (0, 1); got delta={delta}, epsilon={epsilon}")
    chosen, table = None, []
    for t in thresholds:
        losses = losses_of(t)
        p = risk_p_value(losses, delta)
        rejected = p <= epsilon
        table.append(
            {
                "threshold": t,
                "risk": float(losses.float().mean()),
                "p_value": p,
                "rejected": rejected,
                **(extra_of(t) if extra_of else {}),
            }
        )
        if not rejected:
            break
        chosen = t
    return chosen, table
