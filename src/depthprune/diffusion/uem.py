"""DeeDiff's uncertainty estimation modules (UEMs): one small timestep-aware head per layer that predicts, from the
states leaving that layer, how wrong the exit output there would be.

UEM i: per token, LayerNorm(h) -> Linear(d, r) + Linear(sinusoidal(t)) -> SiLU -> Linear(r, 1) -> sigmoid; the
sample's uncertainty is the mean over tokens, u_i in (0, 1). A step exits at the first layer whose u_i is under the
threshold. The training target is tanh(mean |exit output - reference|) (DeeDiff: the reference is the true noise).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass
class UEMConfig:
    """num_layers: one UEM after each block (the last block's is trained too, never used to exit); width: the
    model's hidden size; rank: the UEM's inner width; time_dim: the sinusoidal timestep features;
    target: "noise" (DeeDiff: error against the true noise), "final" (error against the full model's output) or "x0"
    (error of the clamped clean-image prediction the sampler derives from the exit's noise, against the clean image:
    the noise error scaled by sqrt((1 - a_t) / a_t), so large at the noisy steps, where it moves the sample most)."""

    num_layers: int
    width: int
    rank: int = 64
    time_dim: int = 128
    target: str = "noise"

    def __post_init__(self) -> None:
        if min(self.num_layers, self.width, self.rank, self.time_dim) < 1:
            raise ValueError(f"UEMConfig sizes must be >= 1: {self}")
        if self.target not in ("noise", "final", "x0"):
            raise ValueError(f"target must be 'noise' (DeeDiff), 'final' or 'x0', got {self.target!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UEMConfig:
        return cls(**data)


class UEM(nn.Module):
    """One layer's uncertainty head: states [b, tokens, d], time features [b, time_dim] -> u [b] in (0, 1)."""

    def __init__(self, width: int, rank: int, time_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.state = nn.Linear(width, rank)
        self.time = nn.Linear(time_dim, rank)
        self.out = nn.Linear(rank, 1)

    def forward(self, hidden: torch.Tensor, time_features: torch.Tensor) -> torch.Tensor:
        inner = self.state(self.norm(hidden)) + self.time(time_features)[:, None]  # [b, tokens, rank]
        return torch.sigmoid(self.out(nn.functional.silu(inner))).mean(dim=(1, 2))  # [b]


class UEMStack(nn.Module):
    """The UEMs of one model, one per block, with their shared sinusoidal timestep features."""

    def __init__(self, config: UEMConfig) -> None:
        super().__init__()
        from diffusers.models.embeddings import Timesteps

        self.config = config
        self.features = Timesteps(config.time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.heads = nn.ModuleList(UEM(config.width, config.rank, config.time_dim) for _ in range(config.num_layers))

    def time_features(self, timestep: torch.Tensor) -> torch.Tensor:
        """[b] timesteps -> [b, time_dim] (computed once per denoising step, shared by every layer)."""
        return self.features(timestep).to(self.heads[0].state.weight.dtype)

    def forward(self, layer: int, hidden: torch.Tensor, time_features: torch.Tensor) -> torch.Tensor:
        """Uncertainty u [b] of layer `layer`'s output states [b, tokens, d]."""
        return self.heads[layer](hidden, time_features)


def uncertainty_target(exit_output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The UEM's target per sample: tanh of the mean absolute error of an exit output [b, c, h, w] -> [b]."""
    return torch.tanh((exit_output - reference).abs().mean(dim=(1, 2, 3)))


__all__ = ["UEM", "UEMConfig", "UEMStack", "uncertainty_target"]
