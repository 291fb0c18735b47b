"""Run part of a model's layer stack, each layer with exactly the arguments the model's own forward gives it.

Early exit, layer skipping, speculative drafts and scorers need to stop between layers, look at the hidden state, and
go on for some rows of a batch only. Instead of re-implementing each architecture's forward pass (masks, position
embeddings, caches differ per family and per transformers release), depthprune lets the model's own forward run over
the stack with every layer temporarily replaced by a recorder: a tiny module that stores the (args, kwargs) it is
called with and hands its hidden input on unchanged. No layer runs. The forward is stopped (an exception) at the last
position whose arguments are new: a stack whose config has per-layer `layer_types` (Gemma 3's sliding/full attention
mix) gives every attention type its own mask and position embeddings, so the forward runs up to the first layer of
the last new type; any other stack (Llama, BERT) stops at its first layer, as cheap as a forward pre-hook.

`capture_stack` returns the hidden states entering the stack and a `StackCall`: one `LayerCall` per position (positions
of one attention type share one object, sliced once per row subset); `StackCall.run` runs layers [start, stop) or any
sequence of positions from a hidden state, for a subset of rows, with or without a replacement cache.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from depthprune.adapters.base import Adapter, StackSpec
from depthprune.adapters.registry import get_adapter


class _Captured(Exception):
    """Raised by a recorder to stop the model's forward once every distinct set of layer arguments is known."""


@dataclasses.dataclass
class LayerCall:
    """The arguments one layer is called with (besides the hidden states)."""

    args: tuple[Any, ...]  # positional arguments after hidden_states
    kwargs: dict[str, Any]
    batch_size: int
    row_kwargs: tuple[str, ...] = ()  # keyword arguments with one entry per row even when 1-D (the adapter's)

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Run one layer: [batch, seq, hidden] -> [batch, seq, hidden]."""
        out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def select(self, rows: torch.Tensor) -> LayerCall:
        """The call for a subset of the batch rows, in the order given (LongTensor of distinct row indices)."""
        if _all_rows(rows, self.batch_size):
            return self
        kwargs = {}
        for k, v in self.kwargs.items():
            per_row = k in self.row_kwargs and isinstance(v, torch.Tensor) and v.dim() == 1
            per_row = per_row and v.shape[0] == self.batch_size
            kwargs[k] = v.index_select(0, rows.to(v.device)) if per_row else _take_rows(v, rows, self.batch_size)
        return LayerCall(
            tuple(_take_rows(a, rows, self.batch_size) for a in self.args), kwargs, int(rows.numel()), self.row_kwargs
        )

    def with_cache(self, view: Any) -> LayerCall:
        """The same call with every Cache argument (cache / past_key_values / layer_past, by keyword or position)
        replaced by `view`; a clear error when the model passed its layers no cache."""
        from transformers.cache_utils import Cache

        found = False

        def swap(value: Any) -> Any:
            nonlocal found
            if isinstance(value, Cache):
                found = True
                return view
            return value

        args = tuple(swap(a) for a in self.args)
        kwargs = {k: swap(v) for k, v in self.kwargs.items()}
        if not found:
            raise RuntimeError(
                "the model's forward passed no KV cache to its layers; cached decoding needs use_cache=True and a "
                "DynamicCache reaching every layer"
            )
        return LayerCall(args, kwargs, self.batch_size, self.row_kwargs)


def _all_rows(rows: torch.Tensor, batch_size: int) -> bool:
    """rows is 0..batch_size-1 in order (so nothing needs slicing)."""
    if rows.numel() != batch_size:
        return False
    return batch_size == 1 or bool((rows == torch.arange(batch_size, device=rows.device)).all())


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


@dataclasses.dataclass
class StackCall:
    """Every position of one stack: the layer module it runs and the arguments the model's own forward gives it.

    layers[i]: the module at position i of the run sequence (ALBERT repeats its shared groups); calls[i]: its
    arguments, one object per distinct argument set (attention type), so slicing for a row subset is done once per set.
    """

    layers: list[nn.Module]
    calls: list[LayerCall]
    batch_size: int
    kv_layout: str | None = None  # the stack's StackSpec.kv_layout (how depthprune.kv computes keys/values alone)
    sublayers: str | None = None  # the stack's StackSpec.sublayers (how depthprune.sublayers splits a layer)

    def __len__(self) -> int:
        return len(self.layers)

    def _map(self, fn: Any, batch_size: int) -> StackCall:
        done: dict[int, LayerCall] = {}
        calls = []
        for call in self.calls:
            if id(call) not in done:
                done[id(call)] = fn(call)
            calls.append(done[id(call)])
        return StackCall(self.layers, calls, batch_size, self.kv_layout, self.sublayers)

    def select(self, rows: torch.Tensor | None) -> StackCall:
        """The stack's calls for a subset of the batch rows (LongTensor of distinct indices, in the order of the hidden
        states that will run; None: all rows in order)."""
        if rows is None or _all_rows(rows, self.batch_size):
            return self
        return self._map(lambda call: call.select(rows), int(rows.numel()))

    def with_cache(self, view: Any) -> StackCall:
        """The same calls with the model's cache replaced by `view` (e.g. a `depthprune.kv.RowView`)."""
        return self._map(lambda call: call.with_cache(view), self.batch_size)

    def run(
        self,
        hidden: torch.Tensor,
        start: int = 0,
        stop: int | None = None,
        *,
        order: Sequence[int] | None = None,
        rows: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """Run positions [start, stop) (or the positions in `order`, e.g. a plan's) from `hidden` [n, seq, hidden].

        rows: which batch rows `hidden` holds, in its order (n indices; None: every row); cache: a Cache-like object
        that replaces the model's cache in every call (None: the calls' own). Each position gets its own arguments.
        """
        positions = range(start, len(self) if stop is None else stop) if order is None else order
        stack = self.select(rows)
        if cache is not None:
            stack = stack.with_cache(cache)
        for i in positions:
            hidden = stack.calls[i].run(stack.layers[i], hidden)
        return hidden

    def run_part(
        self, hidden: torch.Tensor, position: int, part: str, *, rows: torch.Tensor | None = None, cache: Any = None
    ) -> torch.Tensor:
        """Run one sub-layer ("attention" or "mlp", depthprune.sublayers) of the layer at `position` from `hidden`
        [n, seq, hidden], residual included; rows and cache as in `run`."""
        from depthprune.sublayers import check_layout, run_part

        layout = check_layout(self.sublayers, f"a {type(self.layers[position]).__name__} stack")
        stack = self.select(rows)
        if cache is not None and part == "attention":
            stack = stack.with_cache(cache)
        call = stack.calls[position]
        if call.args:
            raise RuntimeError("a layer called with positional arguments cannot be split into sub-layers")
        return run_part(layout, stack.layers[position], part, hidden, call.kwargs)


_CAPTURE_LOCK = threading.RLock()


class _Recorder(nn.Module):
    """Stands in for one layer during a capture: stores its call, passes its hidden input on, or stops the forward."""

    def __init__(self, layer: nn.Module, seen: list[tuple[torch.Tensor, tuple, dict]], stop_after: int) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: the recorder owns nothing
        object.__setattr__(self, "_seen", seen)
        object.__setattr__(self, "_stop_after", stop_after)

    def __getattr__(self, name: str) -> Any:  # a forward may read layer attributes (e.g. `attention_type`)
        return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        self._seen.append((hidden, rest, dict(kwargs)))
        if len(self._seen) > self._stop_after:
            raise _Captured
        return hidden


def _argument_sets(types: list[str] | None, n: int) -> list[int]:
    """For each position, the first position sharing its arguments (its attention type's first layer)."""
    if types is None or len(types) != n:
        return [0] * n
    first: dict[str, int] = {}
    return [first.setdefault(t, i) for i, t in enumerate(types)]


def capture_stack(
    model: nn.Module, inputs: dict[str, Any], *, stack: str | StackSpec | None = None, adapter: Adapter | None = None
) -> tuple[torch.Tensor, StackCall]:
    """Run `model(**inputs)` over `stack` (default: the model's last stack) without running any of its layers.

    Returns (hidden states entering the stack [batch, seq, hidden], StackCall). The model's own embedding, mask and
    position code runs; its layer modules are restored before this returns, whatever happens. Captures are serialized
    by a lock; while one runs, the same model must not run a forward pass in another thread (its layers are stand-ins
    for that moment): a server that shares one model between threads runs it under one lock.
    """
    adapter = adapter or get_adapter(model)
    spec = adapter.present_stacks(model)[-1] if stack is None else stack
    spec = adapter.stack(spec) if isinstance(spec, str) else spec
    seen: list[tuple[torch.Tensor, tuple, dict]] = []
    with _CAPTURE_LOCK:  # also around reading the layers: another thread's capture may have stand-ins in place
        sequence = adapter.run_sequence(model, spec)
        first_of = _argument_sets(adapter.layer_types(model, spec), len(sequence))
        stop_after = max(first_of)  # the forward's call index after which nothing new can be learnt
        module_list = adapter.layers(model, spec)
        originals = list(module_list)
        # Where the forward calls the list in order (position i runs module i), only the positions up to the stop need
        # a recorder: the forward never reaches the others (a decoding loop captures once per token, so this is per
        # step).
        in_order = len(originals) == len(sequence) and all(a is b for a, b in zip(originals, sequence, strict=True))
        replaced = originals[: stop_after + 1] if in_order else originals
        try:
            for i, layer in enumerate(replaced):
                module_list[i] = _Recorder(layer, seen, stop_after)
            try:
                model(**inputs)
            except _Captured:
                pass
        finally:
            for i, layer in enumerate(replaced):
                module_list[i] = layer
    if len(seen) <= stop_after:
        raise RuntimeError(
            f"{type(model).__name__}'s forward called {len(seen)} {spec.name} layers, fewer than the {stop_after + 1} "
            "needed to learn every layer's arguments; does the adapter name the right layer list?"
        )
    hidden = seen[0][0]
    calls: dict[int, LayerCall] = {}
    for p in sorted(set(first_of)):
        calls[p] = LayerCall(seen[p][1], seen[p][2], hidden.shape[0], adapter.row_kwargs)
    for i, p in enumerate(first_of[: stop_after + 1]):
        if i != p and not _same_arguments(seen[i], seen[p]):
            raise RuntimeError(
                f"{type(model).__name__} gives {spec.name} layers {p} and {i} different arguments although its config "
                "gives them the same layer type; depthprune cannot tell which arguments every layer gets"
            )
    calls_of = [calls[p] for p in first_of]
    return hidden, StackCall(list(sequence), calls_of, hidden.shape[0], spec.kv_layout, spec.sublayers)


def _same_arguments(a: tuple[torch.Tensor, tuple, dict], b: tuple[torch.Tensor, tuple, dict]) -> bool:
    """The same objects (not merely equal values) as arguments, hidden states aside."""
    return a[2].keys() == b[2].keys() and _same(a[1], b[1]) and all(_same(a[2][k], b[2][k]) for k in a[2])


def _same(x: Any, y: Any) -> bool:
    if x is y:
        return True
    if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
        return len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y, strict=True))
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return False
    return type(x) is type(y) and x == y


def capture_layer_inputs(
    model: nn.Module, inputs: dict[str, Any], *, stack: str | StackSpec | None = None, adapter: Adapter | None = None
) -> tuple[torch.Tensor, LayerCall]:
    """(hidden states entering `stack`, the one LayerCall every layer of it takes): for stacks whose layers all get the
    same arguments. A stack with several attention types raises: use `capture_stack`, whose StackCall knows each
    layer's own arguments."""
    hidden, call = capture_stack(model, inputs, stack=stack, adapter=adapter)
    if len({id(c) for c in call.calls}) > 1:
        raise ValueError(
            f"{type(model).__name__}'s layers take different arguments per attention type; use "
            "depthprune.runner.capture_stack, whose StackCall runs each layer with its own"
        )
    return hidden, call.calls[0]


__all__ = ["LayerCall", "StackCall", "capture_layer_inputs", "capture_stack"]
