"""Diffusion transformers from diffusers: `DiTTransformer2DModel` (found by class: its config has no model_type).

Layers are `transformer_blocks`; each takes the timestep and class labels as per-row keyword arguments. The final step
(`ImageHead`) is the model's own: the output LayerNorm modulated by shift/scale from `proj_out_1` on the first block's
timestep + label embedding, `proj_out_2`, and the unpatchify, exactly as `DiTTransformer2DModel.forward` does; every
exit shares it, as early exits in an LM share the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from depthprune.adapters.base import Adapter, ConfigField, ImageHead, StackSpec


def dit_conditioning(model: nn.Module, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
    """[b] timesteps, [b] labels -> the final modulation's input [b, d] (the model's first block's embedding)."""
    dtype = next(model.proj_out_1.parameters()).dtype
    return model.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=dtype)


def dit_output(model: nn.Module, hidden: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
    """States leaving a block [b, tokens, d] -> the model's output [b, c, h, w] (as the model's forward computes it)."""
    shift, scale = model.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
    hidden = model.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]
    hidden = model.proj_out_2(hidden)  # [b, tokens, p * p * c]
    p, c = model.patch_size, model.out_channels
    side = int(hidden.shape[1] ** 0.5)
    hidden = hidden.reshape(-1, side, side, p, p, c)
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    return hidden.reshape(-1, c, side * p, side * p)


BLOCKS = StackSpec(name="blocks", layers="transformer_blocks", depth_fields=(ConfigField("num_layers"),))

ADAPTERS = [
    Adapter(
        family="dit",
        model_types=(),
        model_classes=("DiTTransformer2DModel",),
        stacks=(BLOCKS,),
        logit_softcap=None,
        row_kwargs=("timestep", "class_labels"),
        image_head=ImageHead(conditioning=dit_conditioning, forward=dit_output),
    )
]
