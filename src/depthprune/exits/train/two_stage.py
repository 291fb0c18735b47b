"""DeeBERT two-stage training (Xin et al., 2020, "DeeBERT: Dynamic Early Exiting for Accelerating BERT Inference").

Stage 1 fine-tunes the backbone and its final classifier with cross-entropy on the final layer only; stage 2 freezes
them and trains the exit heads with the sum of the exits' cross-entropies, so the final layer is exactly the
fine-tuned model and the exits cannot degrade it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from depthprune.exits.inference import AllExits
from depthprune.exits.train import Stage

NEEDS: tuple[str, ...] = ()


def final_loss(outputs: AllExits, labels: torch.Tensor) -> torch.Tensor:
    """Stage 1: mean cross-entropy of the model's own (final) classifier."""
    return F.cross_entropy(outputs.final.float(), labels)


def loss(outputs: AllExits, labels: torch.Tensor) -> torch.Tensor:
    """Stage 2: sum over exits of each exit's mean cross-entropy (the final layer is frozen and not counted)."""
    if not outputs.exits:
        raise ValueError("two_stage needs at least one exit head")
    return sum(F.cross_entropy(e.logits.float(), labels) for e in outputs.exits)


STAGES = [Stage("fine-tune", final_loss, "model"), Stage("exit heads", loss, "heads")]
