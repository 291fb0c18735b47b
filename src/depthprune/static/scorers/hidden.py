"""What scorers share: checking their arguments, the per-batch loop, and the hidden states around every layer.

The hidden states entering and leaving each layer of a stack come from the runner (`depthprune.runner`): one
`capture_stack` (the model's own embedding, mask and position code, no layer) and one `StackCall.run` per layer, each
layer with the arguments the model's own forward gives it (per attention type on Gemma 3's sliding/full mix).

One kind of stack the runner cannot serve: T5's, whose first block computes the relative position bias and whose
stack forward hands it on to every later block as an argument, so a block run on its own gets no bias. Such stacks
are recorded instead with hooks in the model's own forward pass (`record_stack`); hooks are removed on exit.
Training flags are restored on exit too, so the model is left as it was given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from depthprune.adapters.base import Adapter, StackSpec, backbone
from depthprune.adapters.registry import get_adapter
from depthprune.runner import StackCall, capture_stack


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
    spec = adapter.find_stack(model, stack, scorer)
    n_layers = adapter.num_layers(model)[spec.name]
    if isinstance(n_remove, bool) or not isinstance(n_remove, int) or not 0 <= n_remove < n_layers:
        raise ValueError(
            f"{scorer}: n_remove must be an integer from 0 to {n_layers - 1} (stack {spec.name!r} has {n_layers} "
            f"layers and keeps at least one), got {n_remove!r}"
        )
    return Target(adapter, spec, n_layers)


def as_batches(
    batches: Sequence[torch.Tensor] | torch.Tensor, scorer: str, min_len: int = 1, *, inputs: bool = False
) -> list[torch.Tensor]:
    """Validate calibration batches: a list of LongTensor [batch, seq] token ids (a single 2-D tensor is one batch).
    inputs=True also takes dicts of forward-pass keyword arguments (an encoder-decoder's own inputs, e.g. Whisper's
    input_features with the decoder_input_ids of its transcripts)."""
    if isinstance(batches, (torch.Tensor, dict)):
        batches = [batches]
    batches = list(batches)
    if not batches:
        raise ValueError(f"{scorer}: no calibration batches given; pass a list of LongTensor [batch, seq] token ids")
    for i, ids in enumerate(batches):
        if inputs and isinstance(ids, dict):
            if not ids or not all(isinstance(v, torch.Tensor) for v in ids.values()):
                raise ValueError(f"{scorer}: batch {i} is a dict; it must map forward-pass argument names to tensors")
            continue
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long or ids.shape[1] < min_len:
            what = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(
                f"{scorer}: batch {i} must be a LongTensor [batch, seq>={min_len}] of token ids, got {what}"
            )
    return batches


def model_inputs(model: nn.Module, ids: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments for one plain forward pass on token ids [batch, seq]: an encoder-decoder reads `ids` on
    both sides (or `ids` is a dict of the forward's own arguments); models with a KV cache are asked not to build
    one."""
    device = next(model.parameters()).device
    if isinstance(ids, dict):
        kwargs = {k: v.to(device) for k, v in ids.items()}
        if "use_cache" in inspect.signature(model.forward).parameters:
            kwargs["use_cache"] = False
        return kwargs
    ids = ids.to(device)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return kwargs


def _encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


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


def check_arguments(
    model: nn.Module,
    batches: Sequence[torch.Tensor] | torch.Tensor,
    n_remove: int,
    stack: str | None,
    scorer: str,
    *,
    loss: bool = False,
) -> tuple[Target, list[torch.Tensor]]:
    """A scorer's (target stack, calibration batches), checked. loss=True: the scorer compares calibration losses, so
    it needs a causal LM, sequences of at least 2 tokens and a stack of at least 2 layers."""
    if loss:
        require_causal_lm(model, scorer)
    target = resolve_target(model, stack, n_remove, scorer)
    # dicts of forward arguments: for an encoder-decoder's own inputs (Whisper's features), hidden-state scorers only
    batches = as_batches(batches, scorer, min_len=2 if loss else 1, inputs=not loss and _encoder_decoder(model))
    if loss and target.n_layers < 2:
        raise ValueError(f"{scorer}: stack {target.name!r} has a single layer; there is nothing to compare")
    return target, batches


def runner_serves(model: nn.Module, target: Target) -> bool:
    """Whether `StackCall.run` reproduces the stack: not for T5-style stacks, whose blocks compute a relative position
    bias in the first block that the stack's forward hands on to the later ones (module docstring)."""
    first = target.adapter.layers(model, target.spec)[0]
    return not any(hasattr(m, "has_relative_attention_bias") for m in first.modules())


def _layer_modules(model: nn.Module, target: Target) -> list[nn.Module]:
    """The distinct layer modules of the stack (a shared module appears once; ALBERT runs one module many times)."""
    seen: dict[int, nn.Module] = {}
    for layer in target.adapter.layers(model, target.spec):
        seen.setdefault(id(layer), layer)
    return list(seen.values())


@contextlib.contextmanager
def record_stack(model: nn.Module, target: Target) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record (input, output) hidden states [batch, seq, hidden] of every layer call of the stack, in call order, in
    the forward passes made inside the block (for the stacks the runner cannot serve: `runner_serves`)."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    pending: list[torch.Tensor] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # A copy, in case a layer adds to its input in place.
        pending.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # T5 blocks return a tuple whose first item is the hidden states.
        calls.append((pending.pop(), (output if isinstance(output, torch.Tensor) else output[0]).detach()))

    handles = []
    try:
        for layer in _layer_modules(model, target):
            handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook, with_kwargs=True))
        yield calls
    finally:
        for h in handles:
            h.remove()


def stack_call(model: nn.Module, ids: torch.Tensor, target: Target) -> tuple[torch.Tensor, StackCall]:
    """(hidden states entering the stack [batch, seq, hidden], each layer's arguments) on token ids [batch, seq]:
    the model's own embedding, mask and position code runs, none of its layers."""
    hidden, call = capture_stack(model, model_inputs(model, ids), stack=target.spec, adapter=target.adapter)
    if len(call) != target.n_layers:
        raise RuntimeError(f"stack {target.name!r} runs {len(call)} layers, not its {target.n_layers} source layers")
    return hidden, call


@torch.no_grad()
def stack_states(model: nn.Module, ids: torch.Tensor, target: Target) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inputs and outputs [batch, seq, hidden] of each layer of the stack on token ids [batch, seq] or a dict of
    forward arguments (outputs[i] equals inputs[i + 1]); `model` must already be in eval mode."""
    if isinstance(ids, dict) or not runner_serves(model, target):  # dicts: recorded in the model's own forward
        with record_stack(model, target) as calls:
            backbone(model)(**model_inputs(model, ids))
        if len(calls) != target.n_layers:
            raise RuntimeError(
                f"expected {target.n_layers} layer calls in stack {target.name!r} during one forward pass, saw "
                f"{len(calls)}; does the adapter name the right layer list?"
            )
        return [c[0] for c in calls], [c[1] for c in calls]
    hidden, call = stack_call(model, ids, target)
    states = [hidden]  # states[i] enters layer i, states[i + 1] leaves it
    for i in range(target.n_layers):
        states.append(call.run(states[-1], i, i + 1))
    return states[:-1], states[1:]


def batch_states(
    model: nn.Module, batches: list[torch.Tensor], target: Target, scorer: str, progress: bool = False
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]]:
    """(ids, inputs, outputs of every layer) for each calibration batch in turn, the model in eval mode meanwhile;
    progress: a progress bar named after `scorer`."""
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=scorer, unit="batch")
    with eval_mode(model):
        for ids in batches:
            yield (ids, *stack_states(model, ids, target))
