"""Class-conditional DiT training: diffusers' `DiTTransformer2DModel` in pixel space, noise-prediction MSE under a
diffusers `DDPMScheduler`, through depthprune's one training loop; saved with `save_pretrained`.

The output folder is a small pipeline-like layout: `transformer/` (the DiT), `scheduler/` (its DDPM schedule) and
`depthprune_diffusion.json` (image size, classes, the training record). diffusers' DiT drops the class label with
probability 0.1 while training (its own `LabelEmbedding`), so the null class (index `num_classes`) is learned too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

TRANSFORMER = "transformer"
SCHEDULER = "scheduler"
META = "depthprune_diffusion.json"


@dataclasses.dataclass
class DiTShape:
    """The size of a small pixel-space DiT (defaults: Fashion-MNIST's 28x28 grey images, 49 patches of 4x4)."""

    sample_size: int = 28
    patch_size: int = 4
    channels: int = 1
    width: int = 128
    heads: int = 4
    depth: int = 8
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size {self.sample_size} must be a multiple of patch_size {self.patch_size}")
        if min(self.depth, self.channels, self.num_classes, self.patch_size) < 1:
            raise ValueError(f"depth, channels, num_classes and patch_size must be >= 1: {self}")


def build_dit(shape: DiTShape, *, seed: int = 0):
    """A fresh diffusers DiT of `shape` (random weights from `seed`)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=shape.heads,
        attention_head_dim=shape.width // shape.heads,
        in_channels=shape.channels,
        out_channels=shape.channels,
        num_layers=shape.depth,
        sample_size=shape.sample_size,
        patch_size=shape.patch_size,
        num_embeds_ada_norm=shape.num_classes,
        norm_num_groups=1,
    )


def build_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2"):
    """The training noise schedule (diffusers' DDPMScheduler, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )


def noise_batch(scheduler, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy images x_t, timesteps t, the noise) for clean `images` [b, c, h, w], t uniform over the schedule."""
    noise = torch.randn_like(images)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],), device=images.device)
    return scheduler.add_noise(images, noise, t), t, noise


def denoising_loss(model, scheduler):
    """The DDPM loss as a function of a batch (images, labels): MSE between the predicted and the true noise."""

    def loss(batch: Any) -> torch.Tensor:
        images, labels = batch
        noisy, t, noise = noise_batch(scheduler, images)
        return torch.nn.functional.mse_loss(model(noisy, t, labels).sample, noise)

    return loss


def save_diffusion(folder: Path, model, scheduler, meta: dict[str, Any], *, dtype: torch.dtype | None = None) -> None:
    """Write `folder/transformer`, `folder/scheduler` and the metadata (into an existing, empty folder)."""
    import copy

    saved = model if dtype is None else copy.deepcopy(model).to(dtype)
    saved.save_pretrained(folder / TRANSFORMER)
    scheduler.save_pretrained(folder / SCHEDULER)
    (folder / META).write_text(json.dumps(meta, indent=1))


def load_diffusion(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """(model, scheduler, metadata) of a folder written by `train_dit` (a clear error when it is not one)."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    folder = Path(path).expanduser()
    missing = [name for name in (TRANSFORMER, SCHEDULER, META) if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a depthprune diffusion model folder (missing {', '.join(missing)}); "
            "make one with `depthprune diffusion train -o DIR`"
        )
    model = DiTTransformer2DModel.from_pretrained(folder / TRANSFORMER, torch_dtype=dtype).eval()
    scheduler = DDPMScheduler.from_pretrained(folder / SCHEDULER)
    return model, scheduler, json.loads((folder / META).read_text())


def shape_of(model) -> DiTShape:
    """The DiTShape of a diffusers DiT (the inverse of `build_dit`)."""
    c = model.config
    return DiTShape(sample_size=c.sample_size, patch_size=c.patch_size, channels=c.in_channels,
                    width=c.num_attention_heads * c.attention_head_dim, heads=c.num_attention_heads, depth=c.num_layers,
                    num_classes=c.num_embeds_ada_norm)  # fmt: skip


def train_dit(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    shape: DiTShape | None = None,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    save_dtype: torch.dtype | None = None,
    init=None,
    init_scheduler=None,
    init_record: dict[str, Any] | None = None,
):
    """Train a class-conditional DiT on `images` [n, c, h, w] in [-1, 1] with `labels` [n]; returns
    (model, scheduler, TrainRun). With output_dir, the folder is written atomically at the end (see module doc).
    `init` (+ `init_scheduler`, `init_record`: what `load_diffusion` gives): go on training a copy of a trained DiT
    (its shape; the input model is left as it was) instead of a fresh one."""
    import copy

    from depthprune.training import train

    if init is not None:
        shape = shape_of(init)
    if images.ndim != 4 or images.shape[1] != shape.channels or images.shape[-1] != shape.sample_size:
        raise ValueError(f"images must be [n, {shape.channels}, {shape.sample_size}, {shape.sample_size}], got "
                         f"{tuple(images.shape)}")  # fmt: skip
    if labels.shape != images.shape[:1] or int(labels.min()) < 0 or int(labels.max()) >= shape.num_classes:
        raise ValueError(f"labels must be [n] in [0, {shape.num_classes}), got {tuple(labels.shape)}")
    model = build_dit(shape, seed=seed) if init is None else copy.deepcopy(init).float().train()
    scheduler = build_scheduler() if init_scheduler is None else init_scheduler
    data = torch.utils.data.TensorDataset(images, labels)
    meta = {"shape": dataclasses.asdict(shape), "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
            "examples": len(data), "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    if init is not None:
        meta["init_from"] = {k: v for k, v in (init_record or {}).items() if k != "epoch_losses"}

    def save(folder: Path, run) -> None:
        record = {
            **meta,
            "train_seconds": run.train_seconds,
            "steps": run.global_step,
            "epoch_losses": run.epoch_losses,
        }
        save_diffusion(folder, model, scheduler, record, dtype=save_dtype)

    run = train(
        denoising_loss(model, scheduler),
        list(model.parameters()),
        data,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        warmup=0.05,
        seed=seed,
        output_dir=output_dir,
        save=save,
        checkpoint_every=checkpoint_every,
        resume=resume,
        overwrite=overwrite,
        fingerprint={"recipe": "dit-ddpm", **meta},
        progress=progress,
        desc="train DiT",
    )
    return model.eval(), scheduler, run


__all__ = ["DiTShape", "build_dit", "build_scheduler", "denoising_loss", "load_diffusion", "noise_batch",
           "save_diffusion", "shape_of", "train_dit"]  # fmt: skip
