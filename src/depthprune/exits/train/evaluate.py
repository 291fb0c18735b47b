"""Accuracy of every exit and of the final layer on labelled batches: how good each internal classifier is alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from depthprune.exits.heads import ExitHeads
from depthprune.exits.inference import all_exit_outputs


@dataclasses.dataclass
class ExitAccuracy:
    """exits[j]: argmax accuracy of the exit after layer layers[j] (0-based); final: the model's own classifier."""

    layers: list[int]
    exits: list[float]
    final: float
    num_examples: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        rows = [f"{'exit after layer':>18} {'accuracy':>9}"]
        rows += [f"{layer:>18} {acc:>9.4f}" for layer, acc in zip(self.layers, self.exits, strict=True)]
        rows.append(f"{'final':>18} {self.final:>9.4f}")
        return "\n".join(rows)


@torch.inference_mode()
def exit_accuracies(
    model: nn.Module, heads: ExitHeads, batches: Iterable[dict[str, torch.Tensor]], *, progress: bool = True
) -> ExitAccuracy:
    """Run every exit on `batches` (dicts with input_ids, attention_mask, labels) and count argmax hits."""
    from tqdm.auto import tqdm

    model.eval()
    heads.eval()
    device = next(model.parameters()).device
    batches = list(batches) if not hasattr(batches, "__len__") else batches
    hits = torch.zeros(len(heads.config.layers) + 1, dtype=torch.long)
    n = 0
    for batch in tqdm(batches, desc="exit accuracy", disable=not progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        out = all_exit_outputs(model, heads, **batch)
        logits = [e.logits for e in out.exits] + [out.final]
        hits += torch.stack([(z.argmax(-1) == labels).sum().cpu() for z in logits])
        n += int(labels.numel())
    if n == 0:
        raise ValueError("no examples to measure accuracy on")
    acc = (hits.double() / n).tolist()
    return ExitAccuracy(list(heads.config.layers), acc[:-1], acc[-1], n)
