"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package: the IDX files, read with numpy, as tensors.

Images come back as float [n, 1, size, size] in [-1, 1] (the range a DDPM predicts in), zero-padded from 28x28 to
`size` when asked (padding is the background value -1); labels as int64 [n].
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV = "DEPTHPRUNE_FASHION_MNIST"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the IDX files: `root`, else $DEPTHPRUNE_FASHION_MNIST, else Debian's install path."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT).expanduser()


def available(root: str | os.PathLike | None = None) -> bool:
    """True when both splits' IDX files are there."""
    folder = data_root(root)
    return all((folder / name).is_file() for pair in FILES.values() for name in pair)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes), the file holds {data.size}")
    return data.reshape(dims)


def load_fashion_mnist(
    split: str = "train", *, size: int = 28, root: str | os.PathLike | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float [n, 1, size, size] in [-1, 1], labels int64 [n]) of one split ("train": 60k, "test": 10k)."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    if size < 28:
        raise ValueError(f"size must be >= 28 (the images are 28x28; larger sizes are zero-padded), got {size}")
    folder = data_root(root)
    paths = [folder / name for name in FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed: missing {', '.join(missing)}. Install Debian's package "
            f"(sudo apt-get install dataset-fashion-mnist) or point ${ROOT_ENV} at a folder holding the IDX .gz files."
        )
    images, labels = (_read_idx(p) for p in paths)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)  # [n, 1, 28, 28]
    if size > 28:
        lo = (size - 28) // 2
        x = torch.nn.functional.pad(x, (lo, size - 28 - lo, lo, size - 28 - lo), value=-1.0)
    return x, torch.from_numpy(labels.astype(np.int64))


__all__ = ["CLASSES", "available", "data_root", "load_fashion_mnist"]
