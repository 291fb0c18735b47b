"""The decoder kit every decoding method stands on (early exit, self-speculative decoding, SkipDecode, LoRA training).

- `decoder_parts`: a decoder-only causal LM's adapter, decoder layers (run order) and final step (the model's own final
  norm, LM head and logit soft-capping), or a clear error.
- `prompt_mask`, `positions_from_mask`: the prompts' 2D attention mask and the position ids transformers' generate
  derives from it (each row counts its real tokens; padding gets 0).
- `mask_arg`: the mask as generate passes it (None without padding, so the model builds the same 4D mask).
- `special_tokens`: end-of-sequence ids and the pad id, from the arguments or the model's generation config.
- `cache_kwarg` / `step_inputs`: the keyword a model's forward takes its KV cache by (`cache` in recent transformers,
  `past_key_values` before) and the inputs of one cached forward step.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from depthprune.adapters.base import Adapter
from depthprune.adapters.registry import get_adapter


class DecoderParts(NamedTuple):
    """adapter, decoder layers in run order, and hidden [b, s, hidden] -> logits [b, s, vocab] (the final step)."""

    adapter: Adapter
    layers: list[nn.Module]
    final_logits: Callable[[torch.Tensor], torch.Tensor]


def decoder_parts(model: nn.Module, what: str = "early-exit generation") -> DecoderParts:
    """The parts of a decoder-only causal LM, or a clear error naming `what` needed them."""
    adapter = get_adapter(model)
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{what} supports decoder-only causal LMs; {type(model).__name__} is an encoder-decoder")
    stacks = adapter.present_stacks(model)
    if [s.name for s in stacks] != ["decoder"]:
        raise ValueError(
            f"{what} needs a decoder-only causal LM; {type(model).__name__} has the stacks "
            f"{[s.name for s in stacks]} (encoders cannot generate text)"
        )
    head = adapter.head(model)
    if head is None or not hasattr(model, "generate") or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no language-model head; load it with AutoModelForCausalLM")
    if head.weight.shape[0] != getattr(config, "vocab_size", head.weight.shape[0]):
        raise ValueError(f"{type(model).__name__}'s head is not a language-model head (load with AutoModelForCausalLM)")
    layers = adapter.run_sequence(model, "decoder")
    return DecoderParts(adapter, layers, functools.partial(adapter.final_logits, model))


def prompt_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The prompts' attention mask as a long tensor on input_ids' device (all ones when None), shapes checked."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    return mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids [batch, seq] of a 2D attention mask, as transformers' generate computes them."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def mask_arg(mask: torch.Tensor) -> torch.Tensor | None:
    """transformers' generate drops an all-ones mask (no padding); do the same so the model builds the same 4D mask."""
    return None if bool(mask.all()) else mask


def special_tokens(
    model: nn.Module, eos_token_id: int | list[int] | tuple[int, ...] | None, pad_token_id: int | None
) -> tuple[list[int], int]:
    """(end-of-sequence ids, pad id): None takes the model's generation config; the pad defaults to the first eos."""
    gen = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gen, "eos_token_id", None)
    eos = [] if eos_token_id is None else [int(eos_token_id)] if isinstance(eos_token_id, int) else list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(gen, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return eos, int(pad_token_id)


@functools.lru_cache(maxsize=64)
def _cache_kwarg(forward_owner: type) -> str:
    try:
        params = inspect.signature(forward_owner.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: nn.Module) -> str:
    """The keyword `model`'s forward takes a KV cache by: "cache" (transformers >= 5.2x, where "past_key_values" is
    deprecated) or "past_key_values"."""
    return _cache_kwarg(type(model))


def step_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: Any,
    *,
    last_logits: bool = False,
) -> dict[str, Any]:
    """Keyword arguments of one cached forward of `input_ids` [batch, s]: `mask` is the 2D mask over cache columns
    and these tokens (None: no padding), `position_ids` [batch, s] (None: the model's default).

    last_logits: the caller reads the logits of the last position only (a prompt's forward): where the model's forward
    takes `logits_to_keep`, as `generate` passes it, the head runs on that position alone (on SmolLM2 the head over a
    64-token prompt at batch 8 costs more than the 30 layers over it)."""
    inputs: dict[str, Any] = {"input_ids": input_ids, cache_kwarg(model): cache, "use_cache": True}
    if last_logits:
        inputs.update(last_logits_only(model))
    if mask is not None:
        inputs["attention_mask"] = mask_arg(mask)
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    return inputs


def last_logits_only(model: nn.Module) -> dict[str, Any]:
    """The forward's keyword that computes the head on the last position only (`logits_to_keep=1`, what `generate`
    passes for a prompt), or nothing where the model's forward has no such argument."""
    return {"logits_to_keep": 1} if _takes_logits_to_keep(type(model)) else {}


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


__all__ = [
    "DecoderParts",
    "cache_kwarg",
    "decoder_parts",
    "last_logits_only",
    "mask_arg",
    "positions_from_mask",
    "prompt_mask",
    "special_tokens",
    "step_inputs",
]


def wall_time(device: torch.device, *, sync: bool = True) -> float:
    """time.perf_counter() once the device has finished its queued work (CUDA kernels run asynchronously)."""
    if sync and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
