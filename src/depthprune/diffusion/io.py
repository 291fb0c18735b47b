"""Save / load a model's UEMs beside it (`DIR/uem/`: config JSON + safetensors), atomically; a clear error when a
model folder has none."""

from __future__ import annotations

import json
import os
from pathlib import Path

from depthprune.diffusion.uem import UEMConfig, UEMStack

UEM_FOLDER = "uem"
CONFIG_NAME = "uem_config.json"
WEIGHTS_NAME = "uem.safetensors"


def has_uems(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / UEM_FOLDER / CONFIG_NAME).is_file()


def save_uems(uems: UEMStack, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write `uems` to `path/uem/` (replacing an earlier set atomically); `extra` (the training record) goes into the
    config file under "training"."""
    from safetensors.torch import save_file

    from depthprune.fsutil import atomic_folder

    target = Path(path).expanduser() / UEM_FOLDER
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(target) as tmp:
        tmp.mkdir()
        state = {k: v.detach().contiguous().cpu() for k, v in uems.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME))
        record = {"config": uems.config.to_dict(), "training": extra or {}}
        (tmp / CONFIG_NAME).write_text(json.dumps(record, indent=1))
    return target


def load_uems(path: str | os.PathLike, *, num_layers: int | None = None) -> UEMStack:
    """The UEMs saved beside the model at `path`; `num_layers` (the model's depth) is checked against them."""
    from safetensors.torch import load_file

    folder = Path(path).expanduser() / UEM_FOLDER
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{Path(path)} has no exit modules (no {UEM_FOLDER}/{CONFIG_NAME}): train them first with "
            f"`depthprune diffusion train-exits {path}`, or sample without early exit (--exit full)"
        )
    record = json.loads((folder / CONFIG_NAME).read_text())
    uems = UEMStack(UEMConfig.from_dict(record["config"]))
    if num_layers is not None and uems.config.num_layers != num_layers:
        raise ValueError(
            f"the UEMs in {folder} are for {uems.config.num_layers} layers, the model has {num_layers}; "
            "train them again for this model"
        )
    uems.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS_NAME)).items()})
    return uems.eval()


__all__ = ["has_uems", "load_uems", "save_uems"]
