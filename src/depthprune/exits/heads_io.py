"""Saving and loading exit heads (classifier and decoder ones alike): a JSON config + a safetensors file beside a
model, each written atomically through depthprune.fsutil.write_atomic (weights first, config last, so a config always
describes complete weights), and refused over existing heads unless overwrite=True."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthprune.fsutil import write_atomic


def save_heads(
    heads: nn.Module, folder: str | os.PathLike, files: tuple[str, str], *, overwrite: bool = False, what: str = ""
) -> Path:
    """Write `heads.state_dict()` to folder/files[1] and `heads.config.to_dict()` to folder/files[0] (config name,
    weights name); returns the folder."""
    from safetensors.torch import save

    config_name, weights_name = files
    what = what or "exit heads"
    folder = Path(folder)
    targets = [folder / weights_name, folder / config_name]
    if not overwrite and any(t.exists() for t in targets):
        from depthprune.errors import OutputExistsError

        raise OutputExistsError(f"{folder} already has {what}; pass overwrite=True to replace them")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    write_atomic(targets[0], save(tensors, metadata={"format": "pt"}))
    write_atomic(targets[1], json.dumps(heads.config.to_dict(), indent=2))
    return folder


def load_heads(
    folder: str | os.PathLike, files: tuple[str, str], *, hint: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, state dict) saved by `save_heads`; a clear error naming the folder and `hint` (how to make
    them) when either file is missing."""
    from safetensors.torch import load_file

    config_name, weights_name = files
    folder = Path(folder)
    missing = [n for n in (config_name, weights_name) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {' + '.join(missing)}; {hint}")
    try:
        config = json.loads((folder / config_name).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / config_name} is not valid JSON: {err}") from None
    return config, load_file(str(folder / weights_name))
