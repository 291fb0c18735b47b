"""DeeDiff's training of the exits, through depthprune's one training loop: the uncertainty-aware layer-wise loss.

For a noisy batch, every block runs through the runner; after block i the shared final step gives the exit output
g_i and UEM i its uncertainty u_i. Losses (DeeDiff, eq. 6-9):
  L_u   = mean_i (u_i - tanh(mean |g_i - ref|))^2       the UEMs learn each exit's error (ref: the true noise)
  L_UAL = mean_i (1 - u_i) * ||g_i - noise||^2          each exit learns to denoise, weighted by its certainty
  L     = ||g_L - noise||^2 + L_UAL + lambda_u * L_u
mode "frozen": the backbone is fixed and only the UEMs train (L_u); mode "joint": the backbone trains too (L), so
intermediate layers learn to be good exits while the last stays a good denoiser. u_i is detached in the L_UAL weight
(so L_UAL cannot be lowered by claiming certainty; L_u alone trains the UEMs).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from depthprune.adapters.registry import get_adapter
from depthprune.diffusion.train import noise_batch
from depthprune.diffusion.uem import UEMConfig, UEMStack, uncertainty_target
from depthprune.runner import capture_stack

MODES = ("frozen", "joint")


def layer_outputs(model, noisy: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor):
    """Per block i: (states leaving block i [b, tokens, d], exit output g_i [b, c, h, w]); the final step is shared."""
    head = get_adapter(model).image_head
    hidden, call = capture_stack(model, {"hidden_states": noisy, "timestep": timestep, "class_labels": labels})
    conditioning = head.conditioning(model, timestep, labels)
    found = []
    for i in range(len(call)):
        hidden = call.run(hidden, i, i + 1)
        found.append((hidden, head.forward(model, hidden, conditioning)))
    return found


def exit_loss(model, scheduler, uems: UEMStack, *, mode: str = "frozen", lambda_u: float = 1.0):
    """The loss of one batch (images, labels) for `mode` (see the module doc); returns a dict with the metrics."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def loss(batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch
        noisy, t, noise = noise_batch(scheduler, images)
        with torch.set_grad_enabled(mode == "joint"):
            outputs = layer_outputs(model, noisy, t, labels)
        features = uems.time_features(t)
        u = torch.stack([uems(i, h.detach(), features) for i, (h, _) in enumerate(outputs)])  # [layers, b]
        if uems.config.target == "x0":  # the clean image the sampler would derive from each exit's noise
            a = scheduler.alphas_cumprod.to(noisy.device)[t].view(-1, 1, 1, 1).to(noisy.dtype)

            def clean(eps: torch.Tensor) -> torch.Tensor:
                return ((noisy - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)

            target = torch.stack([uncertainty_target(clean(g.detach()), images) for _, g in outputs])
        else:
            reference = noise if uems.config.target == "noise" else outputs[-1][1].detach()
            target = torch.stack([uncertainty_target(g.detach(), reference) for _, g in outputs])
        l_u = (u - target).pow(2).mean()
        parts = {"uem_mse": l_u.detach(), "exit_mae": target.mean(dim=1).detach()}
        if mode == "frozen":
            return {"loss": l_u, **parts}
        errors = torch.stack([(g - noise).pow(2).mean(dim=(1, 2, 3)) for _, g in outputs])  # [layers, b]
        l_simple = errors[-1].mean()
        l_ual = ((1 - u.detach()) * errors).mean()
        return {"loss": l_simple + l_ual + lambda_u * l_u, "simple": l_simple.detach(), "ual": l_ual.detach(), **parts}

    return loss


def train_uems(
    model,
    scheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    mode: str = "frozen",
    config: UEMConfig | None = None,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    backbone_lr: float = 1e-4,
    lambda_u: float = 1.0,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
):
    """Train UEMs for `model` (and, in joint mode, a copy of the model): returns (model, uems, TrainRun). The input
    model is never modified (joint mode trains a copy). output_dir is written by the caller (see cli)."""
    from depthprune.training import train

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    adapter = get_adapter(model)
    if adapter.image_head is None:
        raise ValueError(f"{type(model).__name__} is not a diffusion transformer (its adapter has no image head)")
    depth = adapter.num_layers(model)["blocks"]
    config = config or UEMConfig(num_layers=depth, width=model.inner_dim)
    if config.num_layers != depth:
        raise ValueError(f"UEMConfig.num_layers is {config.num_layers}, the model has {depth} blocks")
    torch.manual_seed(seed)
    uems = UEMStack(config)
    trained = copy.deepcopy(model) if mode == "joint" else model
    groups = [{"params": list(uems.parameters()), "lr": lr}]
    if mode == "joint":
        groups.append({"params": list(trained.parameters()), "lr": backbone_lr})
    run = train(
        exit_loss(trained, scheduler, uems, mode=mode, lambda_u=lambda_u),
        groups,
        torch.utils.data.TensorDataset(images, labels),
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        warmup=0.05,
        seed=seed,
        frozen=[trained] if mode == "frozen" else [],
        output_dir=output_dir,
        overwrite=overwrite,
        progress=progress,
        desc=f"train UEMs ({mode})",
    )
    return trained.eval(), uems.eval(), run


__all__ = ["MODES", "exit_loss", "layer_outputs", "train_uems"]
