"""Run a model's layers one at a time, with exactly the arguments the model's own forward gives them.

Early exit needs to stop between layers, look at the hidden state, and go on for some rows of a batch only. Instead of
re-implementing each architecture's forward pass (masks, position embeddings, caches differ per family and per
transformers release), depthprune lets the model's own forward run up to its first layer, captures the arguments that
forward passes to that layer (a forward pre-hook), and stops it. Every later layer is then called with those same
arguments, sliced to the rows still running.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from depthprune.adapters.base import Adapter, StackSpec
from depthprune.adapters.registry import get_adapter


class _Captured(Exception):
    """Raised inside the pre-hook to stop the model's forward once the first layer's inputs are known."""


@dataclasses.dataclass
class LayerCall:
    """The arguments a stack's layers are called with (besides the hidden states)."""

    args: tuple[Any, ...]  # positional arguments after hidden_states
    kwargs: dict[str, Any]
    batch_size: int

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Run one layer: [batch, seq, hidden] -> [batch, seq, hidden]."""
        out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def select(self, rows: torch.Tensor) -> LayerCall:
        """The call for a subset of the batch rows (LongTensor of row indices)."""
        if rows.numel() == self.batch_size:
            return self
        return LayerCall(
            tuple(_take_rows(a, rows, self.batch_size) for a in self.args),
            {k: _take_rows(v, rows, self.batch_size) for k, v in self.kwargs.items()},
            int(rows.numel()),
        )


def _take_rows(value: Any, rows: torch.Tensor, batch_size: int) -> Any:
    # Tensors with a leading batch dimension are sliced; broadcast tensors (leading dim 1, e.g. rotary cos/sin) and
    # 1-D tensors (cache positions) are shared by every row.
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch_size and batch_size > 1:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, tuple):
        return tuple(_take_rows(v, rows, batch_size) for v in value)
    if isinstance(value, list):
        return [_take_rows(v, rows, batch_size) for v in value]
    if isinstance(value, dict):
        return {k: _take_rows(v, rows, batch_size) for k, v in value.items()}
    return value


def capture_layer_inputs(
    model: nn.Module, inputs: dict[str, Any], *, stack: str | StackSpec | None = None, adapter: Adapter | None = None
) -> tuple[torch.Tensor, LayerCall]:
    """Run `model(**inputs)` up to the first layer of `stack` and return (hidden states entering it, LayerCall).

    The model's own embedding and mask code runs; the layers do not.
    """
    adapter = adapter or get_adapter(model)
    spec = adapter.present_stacks(model)[-1] if stack is None else stack
    spec = adapter.stack(spec) if isinstance(spec, str) else spec
    first = adapter.layers(model, spec)[0]
    seen: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            seen["hidden"], seen["args"] = args[0], tuple(args[1:])
            seen["kwargs"] = dict(kwargs)
        else:
            seen["hidden"] = kwargs.pop("hidden_states")
            seen["args"], seen["kwargs"] = (), dict(kwargs)
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise RuntimeError(f"{type(model).__name__}'s forward never reached its first {spec.name} layer")
    hidden = seen["hidden"]
    return hidden, LayerCall(seen["args"], seen["kwargs"], hidden.shape[0])
