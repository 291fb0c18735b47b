"""Theoretical FLOPs per token of a (possibly planned) model, counting the layers it actually runs.

Per token, each layer run costs 2 x its parameters (one multiply-add per weight) plus its attention scores and
weighted values (4 x context x attention width); the head costs 2 x its parameters. Embedding lookups are free.
A layer that a plan repeats is counted every time it runs (its parameters are shared, its FLOPs are not).

What is left out, as small or model-specific: norms and activations beyond their parameter count, cross-attention
scores of encoder-decoder models, mixture-of-experts routing (every expert is counted as if it ran), and matmuls
outside the layer stacks other than the head (ALBERT's embedding projection). An encoder-decoder's prefill counts
both stacks over the prompt (its decoder really starts from one token); its decode counts the decoder only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from torch import nn

from depthprune.adapters.base import Adapter
from depthprune.adapters.registry import get_adapter

Phase = Literal["prefill", "decode"]


@dataclasses.dataclass(frozen=True)
class StackFlops:
    """FLOPs per token of one layer stack.

    layers_run: how many layers run per token (a repeated layer counts each time).
    layer_params_run: parameters of the layers run, summed over runs (embedding tables inside layers excluded).
    attention_prefill / attention_decode: attention score + value FLOPs per token, summed over the layers run.
    """

    name: str
    layers_run: int
    layer_params_run: int
    attention_prefill: float
    attention_decode: float
    causal: bool

    @property
    def prefill(self) -> float:
        return 2.0 * self.layer_params_run + self.attention_prefill

    @property
    def decode(self) -> float:
        return 2.0 * self.layer_params_run + self.attention_decode

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "prefill": self.prefill, "decode": self.decode}


@dataclasses.dataclass(frozen=True)
class FlopsEstimate:
    """Theoretical FLOPs per token of a model at one context length.

    prefill_per_token: mean FLOPs per prompt token when a prompt of `context_len` tokens is processed at once (causal
        attention sees (L+1)/2 tokens on average; the head runs on the last position only, as generation does, unless
        `logits='all'`).
    decode_per_token: FLOPs of one decoding step with `context_len` tokens in the cache (decoder stacks only, where
        the model has an encoder too).
    """

    model_type: str
    context_len: int
    logits: str
    stacks: tuple[StackFlops, ...]
    head_params: int

    def __post_init__(self) -> None:
        if self.context_len < 1:
            raise ValueError(f"context_len must be at least 1, got {self.context_len}")
        if self.logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last' or 'all', got {self.logits!r}")

    @property
    def head(self) -> float:
        """Head FLOPs for one position."""
        return 2.0 * self.head_params

    @property
    def prefill_per_token(self) -> float:
        head = self.head if self.logits == "all" else self.head / self.context_len
        return sum(s.prefill for s in self.stacks) + head

    @property
    def decode_per_token(self) -> float:
        # an encoder-decoder decodes with its decoder only (the encoder ran once, in prefill)
        stacks = [s for s in self.stacks if s.causal] or self.stacks
        return sum(s.decode for s in stacks) + self.head

    @property
    def layers_run(self) -> int:
        return sum(s.layers_run for s in self.stacks)

    def per_token(self, phase: Phase) -> float:
        if phase == "prefill":
            return self.prefill_per_token
        if phase == "decode":
            return self.decode_per_token
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "context_len": self.context_len,
            "logits": self.logits,
            "layers_run": self.layers_run,
            "head_params": self.head_params,
            "prefill_per_token": self.prefill_per_token,
            "decode_per_token": self.decode_per_token,
            "stacks": [s.to_dict() for s in self.stacks],
        }


def estimate_flops(model: nn.Module, context_len: int = 128, *, logits: str = "last") -> FlopsEstimate:
    """Theoretical FLOPs per token for prefill and decode of `model`, counting the layers its stacks run.

    context_len: prompt length for prefill; tokens in the cache for a decode step.
    logits: 'last' (the head runs once per prompt, as in generation) or 'all' (every position, as in perplexity).
    """
    adapter = get_adapter(model)
    config = _text_config(model.config)
    stacks = tuple(
        _stack_flops(model, adapter, spec.name, config, context_len) for spec in adapter.present_stacks(model)
    )
    head = adapter.head(model)
    head_params = _matmul_params(head) if head is not None else 0
    return FlopsEstimate(
        model_type=str(getattr(model.config, "model_type", type(model).__name__)),
        context_len=context_len,
        logits=logits,
        stacks=stacks,
        head_params=head_params,
    )


def flops_ratio(pruned: nn.Module, full: nn.Module, context_len: int = 128, phase: Phase = "decode") -> float:
    """Theoretical speedup of `pruned` over `full`: FLOPs per token of full / FLOPs per token of pruned."""
    return estimate_flops(full, context_len).per_token(phase) / estimate_flops(pruned, context_len).per_token(phase)


# ---- internals --------------------------------------------------------------------------------------------------


def _stack_flops(model: nn.Module, adapter: Adapter, stack: str, config: Any, context_len: int) -> StackFlops:
    runs = adapter.run_sequence(model, stack)  # modules in execution order; a shared module once per run
    causal = stack != "encoder"
    width = _attention_width(config, stack)
    params = 0
    att_prefill = att_decode = 0.0
    for pos, layer in enumerate(runs):
        params += _matmul_params(layer)
        window = _window(config, pos)
        att_prefill += 4.0 * width * _mean_context(context_len, causal, window)
        att_decode += 4.0 * width * (min(context_len, window) if window else context_len)
    return StackFlops(
        name=stack,
        layers_run=len(runs),
        layer_params_run=params,
        attention_prefill=att_prefill,
        attention_decode=att_decode,
        causal=causal,
    )


def _window(config: Any, pos: int) -> int | None:
    """Sliding-window size of the layer at position `pos`, or None for full attention.

    Per-layer `layer_types` decide where a config has them (Gemma 3, Qwen2); otherwise a `sliding_window` applies to
    every layer (Mistral) unless `use_sliding_window` is False.
    """
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if pos < len(types) and "sliding" in str(types[pos]) else None
    return None if getattr(config, "use_sliding_window", True) is False else int(window)


def _matmul_params(module: nn.Module) -> int:
    """Parameters of `module` that cost FLOPs per token: all but embedding tables (lookups)."""
    lookups = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in lookups)


def _mean_context(length: int, causal: bool, window: int | None) -> float:
    """Mean number of keys a query attends to when a sequence of `length` tokens is processed at once."""
    if not causal:
        return float(min(length, window) if window else length)
    if window is None or window >= length:
        return (length + 1) / 2
    # positions 1..window see themselves and every earlier token, later ones see `window` tokens
    return (window * (window + 1) / 2 + (length - window) * window) / length


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _first(config: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return value
    return None


def _attention_width(config: Any, stack: str) -> int:
    """Query heads x head dim: the width over which attention scores and values are computed."""
    own = ("encoder_attention_heads",) if stack == "encoder" else ("decoder_attention_heads",)
    heads = _first(config, own + ("num_attention_heads", "n_head", "num_heads", "n_heads"))
    hidden = _first(config, ("hidden_size", "n_embd", "d_model", "dim"))
    head_dim = _first(config, ("head_dim", "d_kv", "attention_head_size"))
    if heads and head_dim:
        return int(heads) * int(head_dim)
    if hidden:
        return int(hidden)
    raise ValueError(
        f"cannot tell the attention width of {type(config).__name__}: it has none of num_attention_heads/head_dim "
        "or hidden_size/n_embd/d_model/dim"
    )
