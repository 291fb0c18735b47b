"""A small Fashion-MNIST CNN trained here (through the one training loop): its penultimate features are the
"domain classifier" features of `fid.py`, its predictions the class accuracy of class-conditional samples."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "classifier_config.json"
WEIGHTS_NAME = "classifier.safetensors"


class FashionCNN(nn.Module):
    """Two conv blocks and an MLP: images [b, 1, s, s] in [-1, 1] -> logits [b, classes]; `features` gives the
    128-d penultimate activations."""

    def __init__(self, size: int = 28, classes: int = 10, feature_dim: int = 128) -> None:
        super().__init__()
        self.size, self.classes, self.feature_dim = size, classes, feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * (size // 4) ** 2, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(images, labels, *, epochs: int = 2, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     progress: bool = True) -> FashionCNN:  # fmt: skip
    """Train a FashionCNN on (images [n, 1, s, s], labels [n]) with cross-entropy; returns it in eval mode."""
    from depthprune.training import train

    torch.manual_seed(seed)
    model = FashionCNN(size=images.shape[-1])

    def loss(batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    train(loss, list(model.parameters()), torch.utils.data.TensorDataset(images, labels), epochs=epochs, lr=lr,
          batch_size=batch_size, seed=seed, progress=progress, desc="train classifier")  # fmt: skip
    return model.eval()


@torch.no_grad()
def accuracy(model: FashionCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Share of `images` the classifier puts in their `labels`' class."""
    hits = sum(int((model(images[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum())
               for i in range(0, len(images), batch_size))  # fmt: skip
    return hits / max(len(images), 1)


def save_classifier(model: FashionCNN, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write the classifier to folder `path` atomically (config JSON with `extra`, e.g. its test accuracy)."""
    from safetensors.torch import save_file

    from depthprune.fsutil import atomic_folder

    out = Path(path).expanduser()
    with atomic_folder(out) as tmp:
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_NAME))
        config = {"size": model.size, "classes": model.classes, "feature_dim": model.feature_dim, **(extra or {})}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return out


def load_classifier(path: str | os.PathLike) -> tuple[FashionCNN, dict]:
    """(classifier, its config record) from a folder written by `save_classifier`."""
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no classifier ({CONFIG_NAME}); make one with "
                                "`depthprune diffusion train-classifier -o DIR`")  # fmt: skip
    config = json.loads((folder / CONFIG_NAME).read_text())
    model = FashionCNN(config["size"], config["classes"], config["feature_dim"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    return model.eval(), config


__all__ = ["FashionCNN", "accuracy", "load_classifier", "save_classifier", "train_classifier"]
