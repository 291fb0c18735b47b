"""Batched early-exit inference for encoder classifiers.

Each sample exits at its own layer and leaves the batch; the samples still running go on as a smaller batch, so a
batch of 32 gets faster too (DeeBERT, PABEE and EE-LLM only exit at batch size 1). Layers run one at a time with the
arguments the model's own forward gives each of them (depthprune.runner), so no forward pass is re-implemented.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from depthprune.adapters.registry import get_adapter
from depthprune.exits.criteria import Criterion, ExitState
from depthprune.exits.families import final_head, head_family
from depthprune.exits.heads import ExitHeads, ExitOutput
from depthprune.runner import capture_stack


@dataclasses.dataclass
class ExitResult:
    """logits [batch, labels] of the exit each sample left at; exit_layer [batch]: 0-based index of its last layer."""

    logits: torch.Tensor
    exit_layer: torch.Tensor
    num_layers: int

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(-1)

    @property
    def layers_used(self) -> torch.Tensor:
        return self.exit_layer + 1


def _model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, extra: dict[str, Any]) -> dict:
    inputs = {"input_ids": input_ids, **extra}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    return inputs


class EarlyExitClassifier:
    """A sequence classifier with exit heads and an exit criterion. The backbone is used as is, never modified.

    With `criterion=None` (or no heads) every sample runs all layers and gets the model's own logits.
    """

    def __init__(self, model: nn.Module, heads: ExitHeads | None = None, criterion: Criterion | None = None):
        head_family(model)
        for need in getattr(criterion, "needs", ()):
            if heads is None or need not in heads.config.extras:
                raise ValueError(
                    f"criterion {criterion.name!r} needs exit heads with the {need!r} extra; "
                    f"these heads have {list(heads.config.extras) if heads else 'none'}: train them with a recipe "
                    "that learns it"
                )
        self.model = model
        self.heads = heads
        self.criterion = criterion
        self.adapter = get_adapter(model)
        self.stack = self.adapter.present_stacks(model)[-1]
        self.final = final_head(model)

    @property
    def num_layers(self) -> int:
        return len(self.adapter.run_sequence(self.model, self.stack))

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **extra: Any) -> ExitResult:
        inputs = _model_inputs(input_ids, attention_mask, extra)
        hidden, call = capture_stack(self.model, inputs, stack=self.stack, adapter=self.adapter)
        n_layers = len(call)
        batch = hidden.shape[0]
        device = hidden.device
        active = torch.arange(batch, device=device)
        out_logits: torch.Tensor | None = None
        exit_layer = torch.full((batch,), n_layers - 1, dtype=torch.long, device=device)
        history: list[torch.Tensor] = []
        halting: list[torch.Tensor] = []
        mask = attention_mask  # [active, seq] or None
        use_exits = self.heads is not None and self.criterion is not None
        for i in range(n_layers):
            hidden = call.run(hidden, i, i + 1)  # [active, seq, hidden]
            if i == n_layers - 1:
                logits = head_forward(self.final, self.heads, self.model, hidden)
                out_logits = _put(out_logits, active, logits, batch)
                break
            j = self.heads.position(i) if use_exits else None
            if j is None:
                continue
            out: ExitOutput = self.heads(j, hidden, mask)
            history.append(out.logits)
            if out.halting is not None:
                halting.append(out.halting)
            state = ExitState(i, n_layers, out.logits, history, halting, out.gate, out.agreement)
            done = self.criterion.decide(state)  # [active] bool
            if not bool(done.any()):
                continue
            predict = getattr(self.criterion, "predict", None)
            logits = predict(state) if predict is not None else out.logits
            rows = done.nonzero().squeeze(1)
            out_logits = _put(out_logits, active[rows], logits.index_select(0, rows), batch)
            exit_layer[active[rows]] = i
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            active = active[keep]
            hidden = hidden.index_select(0, keep)
            mask = None if mask is None else mask.index_select(0, keep)
            call = call.select(keep)
            history = [h.index_select(0, keep) for h in history]
            halting = [h.index_select(0, keep) for h in halting]
        return ExitResult(out_logits, exit_layer, n_layers)


def head_forward(final: nn.ModuleDict, heads: ExitHeads | None, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own classifier on the last hidden states [batch, seq, hidden] -> [batch, labels]."""
    family = heads.family if heads is not None else head_family(model)
    return family.forward(final, hidden)


def _put(target: torch.Tensor | None, rows: torch.Tensor, values: torch.Tensor, batch: int) -> torch.Tensor:
    if target is None:
        target = torch.zeros(batch, values.shape[-1], dtype=values.dtype, device=values.device)
    target[rows] = values.to(target.dtype)
    return target


@dataclasses.dataclass
class AllExits:
    """Every exit's outputs for a batch (training and calibration): exits[j] reads layer heads.config.layers[j];
    final: the model's own logits [batch, labels]."""

    exits: list[ExitOutput]
    final: torch.Tensor
    layers: tuple[int, ...] | None = None  # 0-based layer each exit reads; None: consecutive layers 0, 1, ...
    num_layers: int | None = None  # depth of the stack (the final logits read its last layer); None: len(exits) + 1


def all_exit_outputs(
    model: nn.Module,
    heads: ExitHeads,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **extra: Any,
) -> AllExits:
    """Run every layer and every exit head (with autograd when enabled): what training and calibration need."""
    adapter = get_adapter(model)
    stack = adapter.present_stacks(model)[-1]
    hidden, call = capture_stack(model, _model_inputs(input_ids, attention_mask, extra), stack=stack, adapter=adapter)
    exits: list[ExitOutput] = []
    for i in range(len(call)):
        hidden = call.run(hidden, i, i + 1)
        j = heads.position(i)
        if j is not None:
            exits.append(heads(j, hidden, attention_mask))
    return AllExits(exits, head_forward(final_head(model), heads, model, hidden), heads.config.layers, len(call))
