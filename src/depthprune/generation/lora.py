"""LoRA (Hu et al. 2021) on the linear projections of a decoder's layers, small enough to read in one sitting.

`add_lora` returns a COPY of the model whose chosen projections (by default every nn.Linear / transformers Conv1D
inside the decoder layers: attention q/k/v/o and the MLP) are wrapped as `LoRALinear`: y = base(x) + s * B(A(x)),
with B = 0 at the start (the copy computes exactly what the model does) and only A, B trainable. `merge_lora` returns
another copy with every wrapper folded back into a plain module of the original class, W + s * B A: an ordinary
Hugging Face model again, to `save_pretrained` and load without depthprune.

Written here rather than taken from `peft`: ~100 lines, no new dependency to keep in step with transformers releases,
GPT-2's Conv1D covered, and the merge is a deep copy by construction, so the input model is never touched.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from depthprune.decoding import decoder_parts

LINEAR_TYPES = (nn.Linear, Conv1D)


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or Conv1D) plus a trainable low-rank update: base(x) + (alpha / rank) * x A^T B^T."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if not isinstance(base, LINEAR_TYPES):
            raise TypeError(f"LoRA wraps nn.Linear or Conv1D modules, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        weight = base.weight
        # nn.Linear keeps its weight as [out, in], Conv1D as [in, out]
        d_in, d_out = (weight.shape[1], weight.shape[0]) if isinstance(base, nn.Linear) else tuple(weight.shape)
        self.base = base
        self.rank = int(rank)
        self.scale = float(alpha) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:  # model code sometimes reads a projection's weight (dtype, device)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T  # [..., out]
        return self.base(x) + (self.scale * update).to(x.dtype)

    def merged(self) -> nn.Module:
        """A copy of the base module with the update folded into its weight."""
        out = copy.deepcopy(self.base)
        delta = self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())  # [out, in]
        if isinstance(out, Conv1D):
            delta = delta.T
        with torch.no_grad():
            out.weight.copy_((out.weight.float() + delta).to(out.weight.dtype))
        return out


def add_lora(
    model: nn.Module, rank: int = 8, alpha: float | None = None, targets: tuple[str, ...] | list[str] | None = None
) -> nn.Module:
    """A copy of the decoder-only LM `model` with LoRA on the linear projections of its decoder layers; only the LoRA
    weights require gradients. alpha: the update is scaled by alpha / rank (default alpha = rank). targets: module
    names (last part, e.g. ("q_proj", "v_proj")) to wrap; default every linear projection in the layers."""
    layers = decoder_parts(model, "LoRA adaptation").layers
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers to adapt")
    out = copy.deepcopy(model)
    layers = decoder_parts(out, "LoRA adaptation").layers
    for p in out.parameters():
        p.requires_grad_(False)
    alpha = float(rank if alpha is None else alpha)
    wanted = None if targets is None else set(targets)
    count = 0
    for layer in layers:
        chosen = [
            (name, module)
            for name, module in layer.named_modules()
            if name and isinstance(module, LINEAR_TYPES) and (wanted is None or name.rsplit(".", 1)[-1] in wanted)
        ]
        for name, module in chosen:
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, attr, LoRALinear(module, rank, alpha))
            count += 1
    if not count:
        raise ValueError(
            f"no linear projection in {type(model).__name__}'s decoder layers matches targets={sorted(wanted or [])}"
        )
    return out


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A and B weights of every `LoRALinear` in `model`."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of `model` with every `LoRALinear` replaced by its merged plain module (all parameters trainable, as a
    freshly loaded model's are); `model` itself is unchanged."""
    out = copy.deepcopy(model)
    wrapped = [(name, m) for name, m in out.named_modules() if isinstance(m, LoRALinear)]
    if not wrapped:
        raise ValueError(f"{type(model).__name__} has no LoRA modules to merge (build it with add_lora)")
    for name, module in wrapped:
        parent_name, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, attr, module.merged())
    for p in out.parameters():
        p.requires_grad_(True)
    return out


__all__ = ["LoRALinear", "add_lora", "lora_parameters", "merge_lora"]
