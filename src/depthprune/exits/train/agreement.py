"""The learned exit classifier alone (the `learned` criterion's `agreement` extra), as a post-hoc step: backbone and
heads frozen, each exit's agreement logit is trained with BCE to predict whether that exit's argmax already equals
the final layer's. BERxiT's learning-to-exit module (Xin et al., 2021) predicts whether an exit is already right; the
target here is agreement with the final layer instead, which comes from the frozen classifiers and needs no labels.
"""

from __future__ import annotations

import torch

from depthprune.exits.inference import AllExits
from depthprune.exits.train import Stage, agreement_loss

NEEDS = ("agreement",)


def loss(outputs: AllExits, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE of the agreement logits against detached 'exit argmax == final argmax' targets."""
    return agreement_loss(outputs, labels)


STAGES = [Stage("agreement", loss, "agreement")]
