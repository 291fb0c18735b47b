"""Self-distillation (Phuong & Lampert, 2019, "Distillation-Based Training for Multi-Exit Architectures"; Zhang et al.,
2019, "Be Your Own Teacher"): the final layer learns from the labels, and each exit learns the final layer's
temperature-softened distribution (a detached teacher), so exits imitate the full model they replace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from depthprune.exits.inference import AllExits
from depthprune.exits.train import Stage

NEEDS: tuple[str, ...] = ()


def distill_term(outputs: AllExits, temperature: float = 2.0) -> torch.Tensor:
    """Mean over exits of T^2 * KL(softmax(final / T) || softmax(exit / T)); zero when every exit equals the final."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    teacher = F.log_softmax(outputs.final.detach().float() / temperature, dim=-1)  # [batch, labels]
    kls = [
        F.kl_div(F.log_softmax(e.logits.float() / temperature, dim=-1), teacher, log_target=True, reduction="batchmean")
        for e in outputs.exits
    ]
    return temperature**2 * torch.stack(kls).mean()


def loss(
    outputs: AllExits, labels: torch.Tensor, temperature: float = 2.0, alpha: float = 1.0, exit_ce: float = 0.0
) -> torch.Tensor:
    """CE(final) + alpha * distill_term (+ exit_ce * mean exit CE, Phuong & Lampert's mix; 0 by default)."""
    total = F.cross_entropy(outputs.final.float(), labels) + alpha * distill_term(outputs, temperature)
    if exit_ce:
        total = total + exit_ce * torch.stack([F.cross_entropy(e.logits.float(), labels) for e in outputs.exits]).mean()
    return total


STAGES = [Stage("self-distill", loss, "all")]
