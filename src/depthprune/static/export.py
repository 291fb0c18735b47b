"""Export a (pruned, reordered, fused) model as an ordinary Hugging Face folder, atomically.

The folder loads with plain `AutoModel*.from_pretrained` in a process that never imports depthprune. safetensors
cannot alias tensors and plain transformers has no way to tie arbitrary layers on load, so repeated layers are written
out once per position they run at; the record in `config.json` ("depthprune" key: the plan, and "shared_layers", the
positions that share weights) lets `depthprune.load_model` tie them again in memory.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthprune.fsutil import atomic_folder, check_output_folder


def source_folders(model: nn.Module) -> list[str]:
    """The folders `model` (or the model a plan was applied to) was loaded from: never written by an export."""
    record = getattr(model.config, "depthprune", None) or {}
    return [p for p in (getattr(model.config, "_name_or_path", ""), record.get("source", "")) if p]


def _untied_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict in which every tensor owns its storage, except weights the model class ties itself."""
    state = model.state_dict()
    tied_targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    groups: dict[Any, list[str]] = collections.defaultdict(list)
    for name, tensor in state.items():
        groups[(tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))].append(name)
    for names in groups.values():
        own = [n for n in names if n not in tied_targets]
        for name in own[1:]:
            state[name] = state[name].clone()
    return state


def save_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    max_shard_size: str = "2GB",
) -> Path:
    """Write `model` (and `tokenizer`) to `out_dir` with `save_pretrained`, atomically.

    Refuses the folder the model was loaded from, and an existing non-empty folder unless `overwrite=True`; with it,
    the old folder is replaced only after the new one is completely written.
    """
    from depthprune.io import plain_copy

    out = check_output_folder(
        out_dir, overwrite=overwrite, sources=source_folders(model), what="the exported model", replace_source=True
    )
    if (
        getattr(model.config, "quantization_config", None) is not None
        and getattr(model, "hf_quantizer", None) is not None
    ):
        model = plain_copy(model)

    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp, state_dict=_untied_state_dict(model), max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
