"""The one training loop of depthprune (through Hugging Face Accelerate): every method brings a loss and parameters."""

from __future__ import annotations

import torch


def no_accelerator() -> bool:
    """True on a machine without a GPU (or other torch accelerator): Accelerate must then be told to use the CPU, or
    several launched processes would not form one data-parallel group."""
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return not probe.is_available()
    return not torch.cuda.is_available()
