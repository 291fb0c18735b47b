"""What scorers share: checking their arguments, and reading or replacing a stack's hidden states with hooks.

Everything here runs the model's own forward pass; hooks on the stack's layer modules only *record* what each layer
receives and returns (`record_stack`), or *replace* what the first layer of the stack receives (`feed_stack`, used to
resume a forward pass from cached hidden states instead of recomputing a shared prefix of layers). Hooks are removed and
training flags restored on exit, so the model is left as it was given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from depthprune.adapters.base import Adapter, StackSpec, backbone
from depthprune.adapters.registry import get_adapter


@dataclasses.dataclass(frozen=True)
class Target:
    """The stack a scorer works on: its adapter, spec and number of source layers."""

    adapter: Adapter
    spec: StackSpec
    n_layers: int

    @property
    def name(self) -> str:
        return self.spec.name


def resolve_target(model: nn.Module, stack: str | None, n_remove: int, scorer: str) -> Target:
    """Check `stack` (default: the model's last stack, the decoder of an encoder-decoder) and `n_remove`."""
    adapter = get_adapter(model)
    present = adapter.present_stacks(model)
    names = [s.name for s in present]
    if stack is None:
        spec = present[-1]
    elif stack in names:
        spec = present[names.index(stack)]
    else:
        raise ValueError(f"{scorer}: the model has no stack {stack!r}; its stacks are {names}")
    n_layers = adapter.num_layers(model)[spec.name]
    if isinstance(n_remove, bool) or not isinstance(n_remove, int) or not 0 <= n_remove < n_layers:
        raise ValueError(
            f"{scorer}: n_remove must be an integer from 0 to {n_layers - 1} (stack {spec.name!r} has {n_layers} "
            f"layers and keeps at least one), got {n_remove!r}"
        )
    return Target(adapter, spec, n_layers)


def as_batches(batches: Sequence[torch.Tensor] | torch.Tensor, scorer: str, min_len: int = 1) -> list[torch.Tensor]:
    """Validate calibration batches: a list of LongTensor [batch, seq] token ids (a single 2-D tensor is one batch)."""
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    batches = list(batches)
    if not batches:
        raise ValueError(f"{scorer}: no calibration batches given; pass a list of LongTensor [batch, seq] token ids")
    for i, ids in enumerate(batches):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long or ids.shape[1] < min_len:
            what = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(
                f"{scorer}: batch {i} must be a LongTensor [batch, seq>={min_len}] of token ids, got {what}"
            )
    return batches


def model_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments for one plain forward pass on token ids [batch, seq]: an encoder-decoder reads `ids` on
    both sides; models with a KV cache are asked not to build one."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return kwargs


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder-only model with a language-model head (it can `generate` and is not an encoder-decoder)."""
    can_generate = getattr(model, "can_generate", None)
    return not getattr(model.config, "is_encoder_decoder", False) and callable(can_generate) and bool(can_generate())


def require_causal_lm(model: nn.Module, scorer: str) -> None:
    if not is_causal_lm(model):
        raise ValueError(
            f"{scorer} needs a causal language model; use block_influence or angular for "
            f"{type(model).__name__} (model_type {model.config.model_type!r}), which has no causal LM head"
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` in eval mode (no dropout) and give every module its own training flag back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _layer_modules(model: nn.Module, target: Target) -> list[nn.Module]:
    """The distinct layer modules of the stack (a shared module appears once; ALBERT runs one module many times)."""
    seen: dict[int, nn.Module] = {}
    for layer in target.adapter.layers(model, target.spec):
        seen.setdefault(id(layer), layer)
    return list(seen.values())


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: Any) -> torch.Tensor:
    # Most layers return a tensor; some (T5) a tuple whose first item is the hidden states.
    return output if isinstance(output, torch.Tensor) else output[0]


@contextlib.contextmanager
def record_stack(
    model: nn.Module, target: Target, *, outputs: bool = True
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Record (input, output) hidden states [batch, seq, hidden] of every layer call of the stack, in call order.

    Calls are what plan indices count: a layer module that runs several times (ALBERT) records once per run. The
    list is filled by forward passes made inside the block; with `outputs=False` only inputs are kept.
    """
    calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    pending: list[torch.Tensor] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # A copy, in case a layer adds to its input in place.
        pending.append(_hidden_in(args, kwargs).detach().clone())

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        calls.append((pending.pop(), _hidden_out(output).detach() if outputs else None))

    handles = []
    try:
        for layer in _layer_modules(model, target):
            handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook, with_kwargs=True))
        yield calls
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def stack_states(model: nn.Module, ids: torch.Tensor, target: Target) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inputs and outputs [batch, seq, hidden] of each layer of the stack, from one normal forward pass on `ids`.

    The backbone runs (no task head); `model` must already be in eval mode.
    """
    with record_stack(model, target) as calls:
        backbone(model)(**model_inputs(model, ids))
    if len(calls) != target.n_layers:
        raise RuntimeError(
            f"expected {target.n_layers} layer calls in stack {target.name!r} during one forward pass, saw "
            f"{len(calls)}; does the adapter name the right layer list?"
        )
    return [c[0] for c in calls], [c[1] for c in calls]


@contextlib.contextmanager
def feed_stack(model: nn.Module, target: Target) -> Iterator[Callable[[torch.Tensor], None]]:
    """Within the block, `feed(hidden)` makes the next forward pass hand `hidden` [batch, seq, hidden] to the first
    layer of the stack in place of what the layers before it (embedding, earlier layers) produced.

    This resumes a forward pass from cached hidden states: everything else the layer receives (masks, position
    embeddings) still comes from the model's own forward pass.
    """
    state: dict[str, torch.Tensor] = {}

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = state.pop("hidden", None)  # one-shot: only the first layer call of a forward pass
        if hidden is None:
            return None
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def feed(hidden: torch.Tensor) -> None:
        state["hidden"] = hidden

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in _layer_modules(model, target)]
    try:
        yield feed
        if state:
            raise RuntimeError(f"a hidden state fed to stack {target.name!r} was never used by a forward pass")
    finally:
        for h in handles:
            h.remove()
