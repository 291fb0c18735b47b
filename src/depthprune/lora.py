"""LoRA on a copy of a decoder-only LM (peft) and merging it back into a plain Hugging Face model.

Shared by every trainer that adapts a model with LoRA (SkipDecode adaptation, distillation healing of a pruned model):
`lora_copy` puts LoRA on the linear projections of the decoder layers of a deep copy (B = 0: the copy computes what
the model does), `merged_copy` folds the trained updates into an ordinary model of the original class. Core: imports
no method.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from depthprune.decoding import decoder_parts


def lora_targets(model: nn.Module, targets: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Full names of the projections LoRA adapts: every nn.Linear / transformers Conv1D inside the decoder layers
    (attention and MLP; not the LM head), or those whose last name part is in `targets` (e.g. ("q_proj", "v_proj"))."""
    from transformers.pytorch_utils import Conv1D

    _, layers, _ = decoder_parts(model, "LoRA")
    names = {id(m): name for name, m in model.named_modules()}
    wanted = None if targets is None else set(targets)
    chosen = [
        names[id(m)]
        for layer in layers
        for name, m in layer.named_modules()
        if name and isinstance(m, (nn.Linear, Conv1D)) and (wanted is None or name.rsplit(".", 1)[-1] in wanted)
    ]
    if not chosen:
        raise ValueError(
            f"no linear projection in {type(model).__name__}'s decoder layers matches targets={sorted(wanted or [])}"
        )
    return list(dict.fromkeys(chosen))  # a repeated layer (shared modules) once


def lora_copy(
    model: nn.Module, rank: int = 8, alpha: float | None = None, targets: tuple[str, ...] | list[str] | None = None
) -> nn.Module:
    """A peft LoRA model (`get_peft_model`) on a deep copy of the decoder-only LM `model`: LoRA on `lora_targets`,
    update scaled by alpha / rank (default alpha = rank), B = 0 at the start (the copy computes what `model` does);
    only the LoRA weights require gradients. `model` is not touched. GPT-2's Conv1D gets fan_in_fan_out=True."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = lora_targets(model, targets)
    conv = any(isinstance(model.get_submodule(n), Conv1D) for n in names)
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(rank if alpha is None else alpha),
        lora_dropout=0.0,
        target_modules=names,
        fan_in_fan_out=conv,
        bias="none",
    )
    return get_peft_model(copy.deepcopy(model), config)


def merged_copy(peft_model: nn.Module) -> nn.Module:
    """A plain HF model (the original class) with the LoRA updates of `peft_model` folded into its weights
    (`merge_and_unload` on a deep copy; `peft_model` is unchanged); every parameter trainable, as after
    from_pretrained."""
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"merged_copy takes a peft model (from lora_copy), got {type(peft_model).__name__}")
    merged = copy.deepcopy(peft_model).merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def untouched_logits(peft_model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids [batch, seq] -> logits [batch, seq, vocab] of the model `peft_model` was copied from: the same weights with
    the adapter disabled (peft's `disable_adapter`), no second copy in memory, no gradients. The teacher of a KL term
    that holds an adapted model to the untouched one."""

    @torch.no_grad()
    def logits(ids: torch.Tensor) -> torch.Tensor:
        with peft_model.disable_adapter():
            return peft_model.get_base_model()(input_ids=ids, use_cache=False).logits

    return logits


def kl_to_teacher(
    logits: torch.Tensor, teacher_logits: torch.Tensor, scored: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher || model) of the next-token distributions, summed over the vocabulary and averaged over positions
    (logits and teacher_logits [..., vocab]; scored: a bool mask over the positions, None: every one)."""
    student = nn.functional.log_softmax(logits.float(), -1).flatten(0, -2)
    teacher = nn.functional.log_softmax(teacher_logits.float(), -1).flatten(0, -2)
    per_pos = nn.functional.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # [positions]
    return per_pos.mean() if scored is None else per_pos[scored.flatten()].mean()


__all__ = ["kl_to_teacher", "lora_copy", "lora_targets", "merged_copy", "untouched_logits"]


def lora_settings(rank: int, alpha: float | None, targets: Sequence[str] | None) -> dict[str, Any]:
    """The LoRA settings a trainer records in its result: rank, the alpha used (default: the rank), the targets."""
    return {
        "lora_rank": rank,
        "lora_alpha": float(rank if alpha is None else alpha),
        "targets": None if targets is None else list(targets),
    }
