"""Exit heads for decoder-only causal LMs: map the hidden state leaving a decoder layer to next-token logits.

Every kind ends in the model's OWN final norm and LM head (shared with the model, never copied, never trained, never
saved): an exit only learns a small correction of the hidden state, so an untrained head is exactly the logit lens.
- "logit_lens": nothing learned; final norm + LM head read the layer's hidden state as it is (nostalgebraist 2020).
- "lens": the tuned lens (Belrose et al. 2023), an affine translator per layer, h -> h + A h + b (A = 0, b = 0 at the
  start).
- "mlp": EE-Tuning (Pan et al. 2024) style, a residual MLP per layer, h -> h + W2 gelu(W1 norm(h)), where norm is a
  trainable copy of the model's final norm and W2 starts at zero.
Optional `confidence`: CALM's meta-classifier (Schuster et al. 2022), a small MLP on the exit's normalized state that
gives P(this exit's top token equals the full model's); it reads the state only, so it costs no vocabulary projection.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from depthprune.adapters.registry import get_adapter
from depthprune.exits.heads_io import load_heads, save_heads
from depthprune.registry import HEAD_KINDS

CONFIG_NAME = "decoder_exit_heads.json"
WEIGHTS_NAME = "decoder_exit_heads.safetensors"
FILES = (CONFIG_NAME, WEIGHTS_NAME)
KINDS = tuple(HEAD_KINDS)  # names and descriptions: depthprune.registry
TRANSLATOR_KINDS = ("logit_lens", "lens", "mlp")  # the kinds DecoderExitHeads builds; "truncated" wraps any of them


@dataclasses.dataclass(frozen=True)
class DecoderExitConfig:
    """Which decoder layers have an exit (0-based index of the layer whose output it reads) and what kind it is.

    model_type / num_layers / hidden_size / vocab_size describe the model the heads were built for (checked on load).
    mlp_dim: width of the "mlp" kind's hidden layer (default hidden_size // 4). confidence: add CALM's classifier,
    confidence_dim wide.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    layers: tuple[int, ...]
    kind: str = "lens"
    mlp_dim: int | None = None
    confidence: bool = False
    confidence_dim: int = 64

    def __post_init__(self) -> None:
        if self.kind not in TRANSLATOR_KINDS:
            extra = " (truncated-vocabulary heads wrap one: depthprune.exits.vocab_heads)" if self.kind in KINDS else ""
            raise ValueError(f"unknown exit head kind {self.kind!r}{extra}; choose one of {TRANSLATOR_KINDS}")
        if self.num_layers < 2:
            raise ValueError(f"a decoder needs at least 2 layers to have an early exit, this one has {self.num_layers}")
        layers = tuple(sorted({int(i) for i in self.layers}))
        if not layers:
            raise ValueError("give at least one layer to put an exit after (or layers=None for all but the last)")
        bad = [i for i in layers if not 0 <= i < self.num_layers - 1]
        if bad:
            raise ValueError(
                f"exit layers {bad} out of range: exits go after layers 0-{self.num_layers - 2} of this "
                f"{self.num_layers}-layer decoder (the last layer, {self.num_layers - 1}, already exits through the "
                "model's own final norm and LM head); pass indices in that range"
            )
        mlp_dim = self.mlp_dim if self.mlp_dim is not None else max(1, self.hidden_size // 4)
        if mlp_dim < 1 or self.confidence_dim < 1:
            raise ValueError(f"mlp_dim and confidence_dim must be >= 1, got {mlp_dim}, {self.confidence_dim}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "mlp_dim", int(mlp_dim))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderExitConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known and k != "layers"}, layers=tuple(data["layers"]))


@dataclasses.dataclass(frozen=True)
class _Shared:
    """The model's own final norm and LM head. A plain object, not a module: nn.Module does not register what it
    holds, so the heads' parameters(), state_dict() and optimizer never see the model's weights."""

    norm: nn.Module
    head: nn.Module
    softcap: float | None  # Gemma's final_logit_softcapping, applied by the model after its head
    adapter: Any = None  # the model's adapter and the model: `Adapter.head_logits` is the model's own final step
    model: Any = None

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self  # a copy of the heads still reads through the same model's modules


class _Lens(nn.Module):
    """Tuned-lens translator: h + A h + b, A and b zero at the start."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.linear(hidden)


class _ResidualMLP(nn.Module):
    """EE-Tuning style: h + W2 gelu(W1 norm(h)); `norm` a trainable copy of the final norm, W2 zero at the start."""

    def __init__(self, norm: nn.Module, hidden_size: int, mlp_dim: int):
        super().__init__()
        self.norm = norm
        self.up = nn.Linear(hidden_size, mlp_dim)
        self.down = nn.Linear(mlp_dim, hidden_size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.down(nn.functional.gelu(self.up(self.norm(hidden))))


def _confidence_net(hidden_size: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden_size, width), nn.Tanh(), nn.Linear(width, 1))


def _model_facts(model: nn.Module) -> tuple[Any, _Shared, int, int, int]:
    """(adapter, shared final norm + head, depth, hidden size, vocab size) of a decoder-only LM, or a clear error."""
    adapter = get_adapter(model)  # an unsupported architecture gets the registry's error
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    stacks = [s.name for s in adapter.present_stacks(model)]
    if getattr(model.config, "is_encoder_decoder", False) or stacks != ["decoder"]:
        raise ValueError(
            f"DecoderExitHeads are for decoder-only causal LMs; {type(model).__name__} has the stacks {stacks}. "
            "For an encoder classifier use depthprune.exits.heads.ExitHeads; load a decoder with "
            "depthprune.io.load_model(name, task='causal-lm')"
        )
    norm, head = adapter.final_norm(model), adapter.head(model)
    weight = getattr(head, "weight", None)
    vocab = int(getattr(config, "vocab_size", -1) or -1)
    hidden = int(getattr(config, "hidden_size", -1) or -1)
    if norm is None or weight is None or weight.dim() != 2 or weight.shape[0] != vocab:
        raise ValueError(
            f"{type(model).__name__} has no language-model head over its {vocab}-token vocabulary after its final "
            f"norm (found {type(head).__name__}); load the model as a causal LM: "
            "depthprune.io.load_model(name, task='causal-lm')"
        )
    if weight.shape[1] != hidden and adapter.final_projection(model) is None:
        raise ValueError(
            f"{type(model).__name__}'s LM head reads {weight.shape[1]} features but its layers output {hidden}, and "
            f"the {adapter.family} adapter names no projection between them (StackSpec.final_proj, as OPT's "
            "project_out); declare it in the adapter"
        )
    depth = adapter.num_layers(model)["decoder"]
    return adapter, _Shared(norm, head, adapter.softcap(model), adapter, model), depth, hidden, vocab


class DecoderExitHeads(nn.Module):
    """Exit heads of one decoder-only LM; satisfies `depthprune.generation.ExitHeadsLike`.

    `logits(layer, hidden)` for `layer` in `layers` applies that exit; for the last layer (`num_layers - 1`) it
    applies the model's own final norm + head, so callers can treat the full model as the last exit.
    Only the translators (and confidence classifiers) are parameters of this module; they live on the model's device
    and in its dtype (or the `dtype` asked for).
    """

    def __init__(self, config: DecoderExitConfig, model: nn.Module, dtype: torch.dtype | None = None):
        super().__init__()
        _, shared, depth, hidden, vocab = _model_facts(model)
        mine = (model.config.model_type, depth, hidden, vocab)
        theirs = (config.model_type, config.num_layers, config.hidden_size, config.vocab_size)
        if mine != theirs:
            raise ValueError(
                "these exit heads were built for a {} with {} layers, hidden size {} and vocabulary {}, not this {} "
                "with {} layers, hidden size {} and vocabulary {}; load them with the model they were trained "
                "on, or build new ones with DecoderExitHeads.for_model(model)".format(*theirs, *mine)
            )
        self.config = config
        self.layers: tuple[int, ...] = config.layers
        self.num_layers: int = config.num_layers
        self._shared = shared
        if config.kind == "lens":
            self.translators = nn.ModuleDict({str(i): _Lens(hidden) for i in config.layers})
        elif config.kind == "mlp":
            self.translators = nn.ModuleDict(
                {str(i): _ResidualMLP(copy.deepcopy(shared.norm), hidden, config.mlp_dim) for i in config.layers}
            )
        if config.confidence:
            self.confidence_nets = nn.ModuleDict(
                {str(i): _confidence_net(hidden, config.confidence_dim) for i in config.layers}
            )
        for p in self.parameters():  # the mlp kind's norm copies the model's flag
            p.requires_grad_(True)
        ref = next(model.parameters())
        self.dtype = dtype or ref.dtype  # may differ from the model's, e.g. float32 heads on a bfloat16 model
        self.to(device=ref.device, dtype=self.dtype)

    # ---- construction -----------------------------------------------------------------------------------------------
    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        layers: list[int] | tuple[int, ...] | None = None,
        kind: str = "lens",
        *,
        mlp_dim: int | None = None,
        confidence: bool = False,
        confidence_dim: int = 64,
        dtype: torch.dtype | None = None,
    ) -> DecoderExitHeads:
        """New exit heads for a decoder-only causal LM; default: an exit after every layer but the last.

        dtype: of the heads' own parameters (default: the model's); inputs are cast to it and results back."""
        _, _, depth, hidden, vocab = _model_facts(model)
        config = DecoderExitConfig(
            model_type=model.config.model_type,
            num_layers=depth,
            hidden_size=hidden,
            vocab_size=vocab,
            layers=tuple(range(depth - 1)) if layers is None else tuple(layers),
            kind=kind,
            mlp_dim=mlp_dim,
            confidence=confidence,
            confidence_dim=confidence_dim,
        )
        return cls(config, model, dtype)

    @classmethod
    def logit_lens(cls, model: nn.Module, layers: list[int] | tuple[int, ...] | None = None) -> DecoderExitHeads:
        """Untrained exits: the model's final norm + LM head applied to each chosen layer's hidden state."""
        return cls.for_model(model, layers, kind="logit_lens")

    # ---- the ExitHeadsLike contract ---------------------------------------------------------------------------------
    def _check(self, layer: int) -> None:
        if layer not in self.layers and layer != self.num_layers - 1:
            raise ValueError(
                f"no exit after layer {layer}: these heads have exits after layers {list(self.layers)}, and layer "
                f"{self.num_layers - 1} exits through the model's own head"
            )

    def state(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """[batch, seq, hidden] leaving `layer` -> the exit's normed state [batch, seq, hidden] (the head's input)."""
        self._check(layer)
        key = str(layer)
        if layer != self.num_layers - 1 and self.config.kind != "logit_lens":
            hidden = self.translators[key](hidden.to(self.dtype)).to(hidden.dtype)
        return self._shared.norm(hidden)

    def logits_from_state(self, state: torch.Tensor) -> torch.Tensor:
        """The model's own LM head (and logit soft-capping, where the model has it): [b, s, hidden] -> [b, s, vocab]."""
        return self._shared.adapter.head_logits(self._shared.model, state)

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [batch, seq, hidden_size] leaving layer `layer` -> next-token logits [batch, seq, vocab]."""
        return self.logits_from_state(self.state(layer, hidden))

    def head_parts(self) -> tuple[nn.Module, nn.Module | None, float | None]:
        """The model's own LM head, the projection before it (OPT's project_out) or None, and the logit soft-cap or
        None: what `logits_from_state` applies after the final norm (truncated-vocabulary heads reuse it)."""
        shared = self._shared
        return shared.head, shared.adapter.final_projection(shared.model), shared.softcap

    def confidence_logits(self, layer: int, state: torch.Tensor) -> torch.Tensor | None:
        """CALM classifier logits [batch, seq] from an exit's normalized `state` (see `state`); None without one."""
        if not self.config.confidence or layer not in self.layers:
            return None
        return self.confidence_nets[str(layer)](state.to(self.dtype)).squeeze(-1)

    def confidence(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """P(this exit's top token equals the full model's) [batch, seq], or None when the heads have no classifier
        (or for the last layer, which is the full model)."""
        out = self.confidence_logits(layer, self.state(layer, hidden)) if self.config.confidence else None
        return None if out is None else torch.sigmoid(out.float())

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(layer, hidden)

    # ---- persistence ------------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write decoder_exit_heads.safetensors + decoder_exit_heads.json into `folder`, each file atomically (the
        model's final norm and LM head are not written: they stay the model's)."""
        return save_heads(self, folder, FILES, overwrite=overwrite, what="decoder exit heads")

    @classmethod
    def load(cls, folder: str | os.PathLike, model: nn.Module, dtype: torch.dtype | None = None) -> DecoderExitHeads:
        """Exit heads saved by `save`, attached to `model` (which must be the kind of model they were built for).

        dtype: of the heads' parameters (default: as saved)."""
        data, saved = load_heads(
            folder,
            FILES,
            hint="train decoder exit heads first (depthprune.exits.train.lm_exits.train_decoder_exits, or "
            "depthprune train-exits --model ...)",
        )
        config = DecoderExitConfig.from_dict(data)
        if dtype is None and saved:
            dtype = next(iter(saved.values())).dtype
        heads = cls(config, model, dtype)
        heads.load_state_dict(saved)  # copies into the heads' own device and dtype
        return heads


def top_tokens(heads: ExitHeadsLike, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """Greedy next-token ids [batch, seq] of exit `layer`: the heads' own `top_tokens` where they have one (a
    truncated-vocabulary head takes the argmax over its K tokens without building full rows), else the argmax of
    `heads.logits`."""
    fast = getattr(heads, "top_tokens", None)
    return fast(layer, hidden) if fast is not None else heads.logits(layer, hidden).argmax(-1)


@runtime_checkable
class ExitHeadsLike(Protocol):
    """What the generation loop needs from a decoder's exit heads.

    layers: sorted 0-based indices of the decoder layers after which an exit exists (never the last layer: the model's
    own final norm + LM head is the last exit). num_layers: depth of the decoder stack the heads were built for.
    """

    layers: tuple[int, ...]
    num_layers: int

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [batch, seq, hidden_size] leaving layer `layer` -> logits [batch, seq, vocab]."""
        ...

    def confidence(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """CALM's learned meta-classifier: P(this exit's token equals the full model's) [batch, seq], or None when
        the heads have no such classifier."""
        ...
