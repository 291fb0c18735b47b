"""Batched class-conditional sampling with early exit: at every denoising step each sample runs blocks until its
exit policy says stop, then the shared final step gives its noise prediction; exited samples leave the batch (the
rows still running are the only ones computed, as in `depthprune.exits.inference`). diffusers' DDIM / DDPM schedulers
take the steps; every sample has its own generator (seed + its index), so a sample is the same alone or in a batch.

Exit policies (`parse_exit`): "full" (the model's own forward), "uncertainty:T" (DeeDiff: the first layer whose UEM
uncertainty is < T, T in [0, 1]), "fixed:K" (every step runs K blocks), "late:K" / "early:K" (a step-dependent
static schedule: K blocks at the noisiest step rising linearly to all blocks at the last one, or the reverse).
"""

from __future__ import annotations

import dataclasses

import torch

from depthprune.adapters.registry import get_adapter
from depthprune.runner import capture_stack

KINDS = ("full", "uncertainty", "fixed", "late", "early")


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
    """kind: one of KINDS; value: the threshold (uncertainty) or the number of blocks (fixed, late, early)."""

    kind: str
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"exit policy kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "uncertainty" and not 0.0 <= self.value <= 1.0:
            raise ValueError(
                f"the uncertainty threshold must be in [0, 1] (UEM outputs are sigmoids), got {self.value}"
            )
        if self.kind in ("fixed", "late", "early") and (self.value < 1 or self.value != int(self.value)):
            raise ValueError(f"{self.kind}:K needs a whole number of blocks K >= 1, got {self.value}")

    def depth(self, step: int, num_steps: int, num_layers: int) -> int:
        """Blocks a static policy runs at step `step` (0 = the noisiest) of `num_steps`."""
        k = min(int(self.value), num_layers)
        if self.kind == "fixed":
            return k
        frac = step / max(num_steps - 1, 1)  # 0 at the noisiest step, 1 at the last
        if self.kind == "early":
            frac = 1 - frac
        return int(round(k + (num_layers - k) * frac))

    def __str__(self) -> str:
        if self.kind == "full":
            return "full"
        return f"{self.kind}:{self.value:g}"


def parse_exit(text: str, num_layers: int | None = None) -> ExitPolicy:
    """'full', 'uncertainty:T', 'fixed:K', 'late:K', 'early:K' -> ExitPolicy (K checked against num_layers)."""
    kind, _, value = str(text).strip().partition(":")
    if kind == "full" and not value:
        return ExitPolicy("full")
    if kind not in KINDS or kind == "full" or not value:
        raise ValueError(f"cannot read exit policy {text!r}: write full, uncertainty:T, fixed:K, late:K or early:K")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"cannot read exit policy {text!r}: {value!r} is not a number") from None
    policy = ExitPolicy(kind, number)
    if num_layers is not None and kind != "uncertainty" and number > num_layers:
        raise ValueError(f"{text!r}: the model has {num_layers} blocks")
    return policy


@dataclasses.dataclass
class SampleResult:
    """images [b, c, h, w] in [-1, 1]; layers [steps, b]: blocks each sample ran at each step; timesteps [steps]."""

    images: torch.Tensor
    layers: torch.Tensor
    timesteps: torch.Tensor
    num_layers: int

    @property
    def mean_layers(self) -> float:
        return float(self.layers.float().mean())


def make_scheduler(train_scheduler, kind: str = "ddim"):
    """A sampling scheduler from the training schedule's config: diffusers' DDIM (deterministic, eta 0) or DDPM."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind not in ("ddim", "ddpm"):
        raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {kind!r}")
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    return cls.from_config(train_scheduler.config)


@torch.no_grad()
def denoise_step(model, noisy, timestep, labels, policy: ExitPolicy, *, uems=None, step: int = 0, num_steps: int = 1):
    """One noise prediction [b, c, h, w] under `policy` and the blocks each sample ran [b]."""
    adapter = get_adapter(model)
    depth = adapter.num_layers(model)["blocks"]
    n = noisy.shape[0]
    if policy.kind == "full":
        return model(noisy, timestep, labels).sample, torch.full((n,), depth)
    head = adapter.image_head
    hidden, call = capture_stack(model, {"hidden_states": noisy, "timestep": timestep, "class_labels": labels})
    conditioning = head.conditioning(model, timestep, labels)
    features = uems.time_features(timestep) if policy.kind == "uncertainty" else None
    stop = depth if policy.kind == "uncertainty" else policy.depth(step, num_steps, depth)
    out = torch.empty_like(noisy)
    layers = torch.full((n,), depth)
    active = torch.arange(n)
    for i in range(stop):
        hidden = call.run(hidden, i, i + 1, rows=active)  # [active, tokens, d]
        if i == stop - 1:
            break
        if features is None:
            continue
        leave = uems(i, hidden, features[active]) < policy.value
        if bool(leave.any()):
            rows = active[leave]
            out[rows] = head.forward(model, hidden[leave], conditioning[rows])
            layers[rows] = i + 1
            active, hidden = active[~leave], hidden[~leave]
            if active.numel() == 0:
                return out, layers
    out[active] = head.forward(model, hidden, conditioning[active] if active.numel() < n else conditioning)
    layers[active] = stop
    return out, layers


@torch.no_grad()
def sample(
    model,
    train_scheduler,
    labels: torch.Tensor,
    *,
    steps: int = 50,
    policy: ExitPolicy | str = "full",
    uems=None,
    seed: int = 0,
    scheduler: str = "ddim",
    first_index: int = 0,
) -> SampleResult:
    """Sample one image per label [b] (class-conditional) in `steps` denoising steps under `policy`. Sample j's noise
    comes from its own generator seeded (seed, first_index + j), so batching does not change a sample."""
    from diffusers.utils.torch_utils import randn_tensor

    adapter = get_adapter(model)
    if adapter.image_head is None:
        raise ValueError(f"{type(model).__name__} is not a diffusion transformer (its adapter has no image head)")
    depth = adapter.num_layers(model)["blocks"]
    policy = parse_exit(policy, depth) if isinstance(policy, str) else policy
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
    if policy.kind == "uncertainty":
        if uems is None:
            raise ValueError("the uncertainty exit needs the model's UEMs (train them with `diffusion train-exits`)")
        if uems.config.num_layers != depth:
            raise ValueError(f"the UEMs are for {uems.config.num_layers} blocks, the model has {depth}")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    classes = model.config.num_embeds_ada_norm
    if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) > classes:
        raise ValueError(
            f"labels must be class ids in [0, {classes}] ({classes}: unconditional), got {labels.tolist()}"
        )
    sched = make_scheduler(train_scheduler, scheduler)
    sched.set_timesteps(steps)
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + first_index + j) for j in range(len(labels))]
    c, size = model.config.in_channels, model.config.sample_size
    x = randn_tensor((len(labels), c, size, size), generator=generators, dtype=next(model.parameters()).dtype)
    x = x * sched.init_noise_sigma
    per_step = []
    for k, t in enumerate(sched.timesteps):
        timestep = torch.full((len(labels),), int(t), dtype=torch.long)
        eps, layers = denoise_step(model, x, timestep, labels, policy, uems=uems, step=k, num_steps=steps)
        x = sched.step(eps, t, x, generator=generators).prev_sample
        per_step.append(layers)
    return SampleResult(x.clamp(-1, 1), torch.stack(per_step), sched.timesteps.clone(), depth)


def sample_batches(model, train_scheduler, labels, *, batch_size: int = 64, **kwargs) -> SampleResult:
    """`sample` over `labels` in batches of `batch_size` (the same samples as one batch: per-sample generators)."""
    parts = [sample(model, train_scheduler, labels[i : i + batch_size], first_index=i, **kwargs)
             for i in range(0, len(labels), batch_size)]  # fmt: skip
    return SampleResult(torch.cat([p.images for p in parts]), torch.cat([p.layers for p in parts], dim=1),
                        parts[0].timesteps, parts[0].num_layers)  # fmt: skip


def save_grid(images: torch.Tensor, path, *, columns: int = 10, scale: int = 2):
    """Write images [n, 1, h, w] in [-1, 1] as one PNG grid (rows of `columns`), enlarged `scale` times."""
    import numpy as np
    from PIL import Image

    from depthprune.fsutil import atomic_file

    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = np.full((rows * (h + 2), columns * (w + 2)), 255, dtype=np.uint8)
    pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(n):
        r, col = divmod(i, columns)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, col * (w + 2) + 1 : col * (w + 2) + 1 + w] = pixels[i]
    picture = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    with atomic_file(path) as tmp:
        picture.save(tmp, format="PNG")
    return path


__all__ = ["KINDS", "ExitPolicy", "SampleResult", "denoise_step", "make_scheduler", "parse_exit", "sample",
           "sample_batches", "save_grid"]  # fmt: skip
