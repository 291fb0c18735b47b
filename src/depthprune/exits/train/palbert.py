"""PALBERT (Balagansky & Gavrilov, 2022, "PALBERT: Teaching ALBERT to Ponder"), after PonderNet (Banino et al., 2021).

The `halting` extra of exit i gives lambda_i, the probability of stopping there given that no earlier exit stopped.
p_i = lambda_i * prod_{j<i} (1 - lambda_j); the final layer takes the remainder. The loss is the expected
cross-entropy sum_i p_i * CE_i plus beta * KL(p || geometric prior with parameter lambda_p), truncated to the exits
and the final layer and renormalized. At inference the q_exit criterion reads the same lambdas.
"""

from __future__ import annotations

import torch

from depthprune.exits.inference import AllExits
from depthprune.exits.train import Stage, cross_entropies, exit_distribution, extra_logits

NEEDS = ("halting",)


def geometric_prior(n: int, lambda_p: float) -> torch.Tensor:
    """log of the geometric distribution lambda_p * (1 - lambda_p)^i over i = 0..n-1, renormalized: [n]."""
    if not 0.0 < lambda_p < 1.0:
        raise ValueError(f"lambda_p must be in (0, 1), got {lambda_p}")
    i = torch.arange(n, dtype=torch.float)
    log_p = torch.log(torch.tensor(lambda_p)) + i * torch.log1p(torch.tensor(-lambda_p))
    return log_p - torch.logsumexp(log_p, 0)


def stop_log_probs(outputs: AllExits) -> torch.Tensor:
    """log p_i, [exits + 1, batch]: where each sample stops under the halting lambdas (the last row: final layer)."""
    return exit_distribution(extra_logits(outputs, "halting"))


def loss(
    outputs: AllExits, labels: torch.Tensor, beta: float = 0.01, lambda_p: float = 0.2, ce_weight: float = 0.0
) -> torch.Tensor:
    """sum_i p_i CE_i + beta * KL(p || prior), averaged over the batch (+ ce_weight * mean CE over all classifiers, an
    optional aid that trains exits the halting distribution rarely reaches; 0 by default as in PonderNet)."""
    log_p = stop_log_probs(outputs)  # [exits + 1, batch]
    ce = cross_entropies(outputs, labels)  # [exits + 1, batch]
    p = log_p.exp()
    expected = (p * ce).sum(0).mean()
    prior = geometric_prior(log_p.shape[0], lambda_p).to(log_p.device)[:, None]  # [exits + 1, 1]
    kl = (p * (log_p - prior)).sum(0).mean()
    total = expected + beta * kl
    if ce_weight:
        total = total + ce_weight * ce.mean()
    return total


STAGES = [Stage("palbert", loss, "all")]
