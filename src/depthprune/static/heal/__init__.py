"""Healing a statically pruned model: one file per method, registered by name (`depthprune.registry.HEALERS`).

Every healer has the same interface: `HEALER(model, plan, batches, *, progress=False, **options) -> nn.Module`, where
`model` is the untouched source model, `plan` a LayerPlan (or its text), `batches` a list of LongTensor [batch, seq]
calibration token ids; it returns a NEW model of the same class that runs the plan, healed (an ordinary Hugging Face
model: `depthprune.save_model` exports it). The input model is never modified.

- fold (ReplaceMe-style, training-free): a linear map per removed run, fitted by least squares on calibration
  activations and folded into the output projection of the layer before the run.
- distill: LoRA (peft) on the pruned model, trained through the one training loop towards the untouched model's
  next-token distribution (KL) plus the text's NLL, merged into a plain model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from depthprune.plan import LayerPlan


def list_healers() -> list[str]:
    from depthprune.registry import HEALERS

    return HEALERS.names()


def heal(
    model: nn.Module, plan: LayerPlan | str, batches: list[torch.Tensor], *, method: str = "fold", **options: Any
) -> nn.Module:
    """`plan` applied to a copy of `model`, healed by `method` on `batches` (see the module docstring)."""
    from depthprune.registry import HEALERS

    return HEALERS.get(method)(model, plan, batches, **options)
