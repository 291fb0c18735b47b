"""Exit heads for encoder classifiers: one internal classifier after each chosen layer, saved beside the backbone.

Each head is a copy of the family's own pooling + classifier modules (initialized from the final head's weights, a
good start for training). Optional extra outputs per exit serve the learned exit decisions:
- `halting`: PALBERT's lambda layer, the logit of the probability of stopping at this layer given not stopped before;
- `gate`: JEI-DNN's exit gate, trained jointly with the heads;
- `agreement`: a learned exit classifier predicting whether this exit's prediction already equals the final layer's.
These read the pooled hidden state plus the exit's own softmax statistics.

Pooling: 'mean' (default) feeds the family's head the masked mean of the token states in place of the first token's
state; 'first' uses the first token ([CLS] / <s>) as the final head does. Mean pooling is the default because on
sentence-embedding checkpoints (all-MiniLM-L6-v2 is trained with mean pooling) the first token's state after the early
layers barely differs between inputs: measured on SpamAssassin, 'first' exits after layers 0-3 only learned the class
prior (0.687 test accuracy) while a linear probe on the same states reached 0.90-0.95.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthprune.adapters.registry import get_adapter
from depthprune.exits.families import family_for, final_head, head_family
from depthprune.exits.heads_io import load_heads, save_heads

CONFIG_NAME = "exit_heads.json"
WEIGHTS_NAME = "exit_heads.safetensors"
FILES = (CONFIG_NAME, WEIGHTS_NAME)
EXTRAS = ("halting", "gate", "agreement")
POOLINGS = ("mean", "first")


@dataclasses.dataclass(frozen=True)
class ExitHeadsConfig:
    """Which layers have exits (0-based index of the layer an exit reads), and which extra outputs they carry."""

    model_type: str
    num_layers: int
    num_labels: int
    hidden_size: int
    layers: tuple[int, ...]
    extras: tuple[str, ...] = ()
    pooling: str = "mean"

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        family_for(self.model_type)  # a clear error for model types without a declared classification head
        layers = tuple(int(i) for i in self.layers)
        if not layers:
            raise ValueError("give at least one layer to put an exit after")
        bad = [i for i in layers if not 0 <= i < self.num_layers - 1]
        if bad:
            raise ValueError(
                f"exit layers {bad} out of range: exits go after layers 0-{self.num_layers - 2} "
                f"(the last layer, {self.num_layers - 1}, already has the model's own classifier)"
            )
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"exit layers must be increasing and distinct, got {list(layers)}")
        unknown = set(self.extras) - set(EXTRAS)
        if unknown:
            raise ValueError(f"unknown exit extras {sorted(unknown)}; choose from {EXTRAS}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "extras", tuple(e for e in EXTRAS if e in self.extras))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExitHeadsConfig:
        return cls(
            **{
                **data,
                "layers": tuple(data["layers"]),
                "extras": tuple(data.get("extras", ())),
                "pooling": data.get("pooling", "first"),  # heads saved before pooling was configurable
            }
        )


def _extra_net(hidden_size: int) -> nn.Module:
    # pooled [CLS] state + (max prob, margin, entropy) of the exit's softmax -> one logit
    return nn.Sequential(nn.Linear(hidden_size + 3, 64), nn.Tanh(), nn.Linear(64, 1))


def softmax_stats(logits: torch.Tensor) -> torch.Tensor:
    """[batch, labels] -> [batch, 3]: max probability, top-1 minus top-2 probability, normalized entropy."""
    probs = logits.float().softmax(-1)
    top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    margin = top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0.0)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / max(
        torch.log(torch.tensor(probs.shape[-1])).item(), 1e-6
    )
    return torch.stack([top[:, 0], margin, entropy], dim=-1)


@dataclasses.dataclass
class ExitOutput:
    """One exit's outputs for a batch: class logits [batch, labels] and optional extra logits [batch]."""

    logits: torch.Tensor
    halting: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    agreement: torch.Tensor | None = None


class ExitHeads(nn.Module):
    """The internal classifiers of one backbone. `heads[j]` reads the output of layer `config.layers[j]`."""

    def __init__(self, config: ExitHeadsConfig, heads: list[nn.ModuleDict]):
        super().__init__()
        if len(heads) != len(config.layers):
            raise ValueError(f"{len(heads)} heads for {len(config.layers)} exit layers")
        self.config = config
        self.family = family_for(config.model_type)
        self.heads = nn.ModuleList(heads)
        for extra in config.extras:
            setattr(self, extra, nn.ModuleList(_extra_net(config.hidden_size) for _ in config.layers))

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        layers: list[int] | None = None,
        extras: tuple[str, ...] = (),
        pooling: str = "mean",
    ) -> ExitHeads:
        """New exit heads for a sequence classifier, copied from its own head.

        Default: an exit after every layer but the last (which has the model's own classifier)."""
        head_family(model)  # a clear error for models without a supported classification head
        n = get_adapter(model).num_layers(model)["encoder"]
        config = ExitHeadsConfig(
            model_type=model.config.model_type,
            num_layers=n,
            num_labels=model.config.num_labels,
            hidden_size=model.config.hidden_size,
            layers=tuple(range(n - 1)) if layers is None else tuple(layers),
            extras=tuple(extras),
            pooling=pooling,
        )
        template = final_head(model)
        heads = [copy.deepcopy(template) for _ in config.layers]
        return cls(config, heads).to(next(model.parameters()).dtype)

    def position(self, layer: int) -> int | None:
        """Index into `heads` of the exit after `layer`, or None."""
        try:
            return self.config.layers.index(layer)
        except ValueError:
            return None

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, seq, hidden] -> [batch, hidden] by the configured pooling (mask: [batch, seq], 1 = token)."""
        if self.config.pooling == "first":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(1)
        mask = attention_mask[:, : hidden.shape[1]].to(hidden.dtype).unsqueeze(-1)  # [batch, seq, 1]
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, j: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ExitOutput:
        """Outputs of exit `j` for hidden states [batch, seq, hidden] (attention_mask [batch, seq] for mean pooling)."""
        pooled = self.pool(hidden, attention_mask)  # [batch, hidden]
        logits = self.family.forward(self.heads[j], pooled.unsqueeze(1))  # the family head reads position 0
        out = ExitOutput(logits)
        if self.config.extras:
            feats = torch.cat([pooled.float(), softmax_stats(logits).detach()], dim=-1).to(hidden.dtype)
            for extra in self.config.extras:
                setattr(out, extra, getattr(self, extra)[j](feats).squeeze(-1))
        return out

    # ---- persistence ------------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write `exit_heads.json` + `exit_heads.safetensors` into `folder` (e.g. beside the backbone), atomically."""
        return save_heads(self, folder, FILES, overwrite=overwrite)

    @classmethod
    def load(cls, folder: str | os.PathLike, model: nn.Module) -> ExitHeads:
        """Load exit heads saved by `save`, building their modules from `model` (the backbone they were trained on)."""
        data, state = load_heads(
            folder,
            FILES,
            hint="train exit heads first (train-exits)",
        )
        config = ExitHeadsConfig.from_dict(data)
        if config.model_type != model.config.model_type or config.num_labels != model.config.num_labels:
            raise ValueError(
                f"exit heads in {folder} were made for a {config.model_type} with {config.num_labels} labels, "
                f"not this {model.config.model_type} with {model.config.num_labels}"
            )
        heads = cls.for_model(model, list(config.layers), config.extras, config.pooling)
        heads.load_state_dict(state)
        return heads
