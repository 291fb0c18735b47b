"""Saving and loading routers beside a model, as exit heads are (depthprune.exits.heads_io: weights first, config
last, each file atomic; refused over existing routers unless overwrite=True); loading refuses routers made for
another model (depthprune.skipping.routers.check_model)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from depthprune.exits.heads_io import load_heads, save_heads
from depthprune.registry import ROUTER_KINDS
from depthprune.skipping.routers import RouterConfig, check_model

CONFIG_NAME = "routers.json"
WEIGHTS_NAME = "routers.safetensors"
FILES = (CONFIG_NAME, WEIGHTS_NAME)


def save_routers(routers: nn.Module, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write routers.safetensors + routers.json into `folder`; returns the folder."""
    return save_heads(routers, folder, FILES, overwrite=overwrite, what="routers")


def has_routers(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def load_routers(folder: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Routers saved by `save_routers`, checked against `model`, on its device, in eval mode."""
    data, saved = load_heads(folder, FILES, hint="train routers first (depthprune train-router MODEL -o FOLDER)")
    config = RouterConfig.from_dict(data)
    check_model(config, model)
    routers = ROUTER_KINDS.get(config.kind)(config)
    routers.load_state_dict(saved)
    return routers.to(next(model.parameters()).device).eval()


__all__ = ["CONFIG_NAME", "FILES", "WEIGHTS_NAME", "has_routers", "load_routers", "save_routers"]
