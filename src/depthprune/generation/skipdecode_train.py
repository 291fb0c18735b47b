"""Adapt a causal LM to a SkipDecode schedule (Del Corro et al. 2023), with LoRA, through Hugging Face Accelerate.

The model learns to predict well when the generated positions skip their lower layers: every training block is split
at a random prompt length per row (uniform in min_prompt .. seq_len-1); the prompt runs all layers and the positions
after it run the top `schedule.layers_at(k)` layers, k counting from the prompt's end, as in decoding. The loss is
the ordinary next-token cross-entropy over every position, computed by `skipdecode_logits` (teacher forcing, the
same computation as decoding). Only LoRA weights train (`depthprune.generation.lora`); at the end they are merged into
a new model, an ordinary Hugging Face model that `skipdecode_generate` runs with the same schedule. The input model is
never modified. `output_dir`: the main process writes the merged model (save_pretrained, the schedule recorded in its
config as `skipdecode_schedule`), skip_schedule.json and train_log.json there, atomically.

Same call on one CPU, one GPU or many processes (`accelerate launch`): batch_size is per process. From the command
line: `depthprune train-skipdecode --speedup 2 --output-dir out/smollm2-skip2` (or `accelerate launch -m depthprune
train-skipdecode ...`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthprune.generation.lora import add_lora, lora_parameters, merge_lora
from depthprune.generation.skipdecode import SkipSchedule, _parts, skipdecode_logits

LOG_NAME = "train_log.json"
SCHEDULE_NAME = "skip_schedule.json"
CONFIG_KEY = "skipdecode_schedule"


@dataclasses.dataclass
class SkipDecodeTrainResult:
    """What a run did. epoch_losses: per epoch, the mean loss over all processes. history: this process's loss per
    optimizer step. model: the merged model (a new plain HF model); lora_model: the trained LoRA-wrapped copy. Neither
    is part of to_dict."""

    schedule: dict[str, Any]
    lora_rank: int
    lora_alpha: float
    targets: list[str] | None
    epochs: int
    lr: float
    batch_size: int
    seq_len: int
    min_prompt: int
    seed: int
    num_blocks: int
    num_processes: int
    epoch_losses: list[dict[str, Any]]
    history: list[float]
    train_seconds: float
    output_dir: str | None = None
    model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    lora_model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        skip = {"model", "lora_model"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


def sample_layer_counts(
    schedule: SkipSchedule, batch: int, seq_len: int, min_prompt: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Layer counts [batch, seq_len] for training: each row gets a prompt length drawn uniformly from
    min_prompt .. seq_len-1 (full depth), then the schedule from its first generated position on."""
    if not 1 <= min_prompt < seq_len:
        raise ValueError(f"need 1 <= min_prompt < seq_len, got min_prompt={min_prompt}, seq_len={seq_len}")
    prompts = torch.randint(min_prompt, seq_len, (batch,), generator=generator)
    steps = torch.tensor(schedule.steps(seq_len), dtype=torch.long)  # [seq_len]
    k = torch.arange(seq_len)[None] - prompts[:, None]  # [batch, seq] generated-token index (negative: prompt)
    return torch.where(k < 0, schedule.num_layers, steps[k.clamp_min(0)])


def skip_lm_loss(model: nn.Module, ids: torch.Tensor, depth: torch.Tensor | list[int]) -> torch.Tensor:
    """Mean next-token cross-entropy of ids [batch, seq] when position p runs the top depth[.., p] layers."""
    logits = skipdecode_logits(model, ids, depth)  # [batch, seq, vocab]
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class _SkipLoss(nn.Module):
    """The LoRA-wrapped model plus the loss, as one module whose forward DDP can wrap."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        return skip_lm_loss(self.model, ids, depth)


@torch.no_grad()
def skipdecode_loss(
    model: nn.Module, schedule: SkipSchedule, token_blocks: torch.Tensor, *, prompt_len: int, batch_size: int = 8
) -> float:
    """Mean next-token cross-entropy over every position of `token_blocks` [n, seq] when the first prompt_len tokens
    run all layers and the rest follow `schedule` (the training loss at a fixed prompt length)."""
    device = next(model.parameters()).device
    depth = schedule.for_sequence(prompt_len, token_blocks.shape[1])
    total, count = 0.0, 0
    for ids in token_blocks.split(batch_size):
        ids = ids.to(device)
        total += float(skip_lm_loss(model, ids, depth)) * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
    return total / count


def train_skipdecode(
    model: nn.Module,
    schedule: SkipSchedule,
    token_blocks: torch.Tensor,
    *,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    targets: tuple[str, ...] | list[str] | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 8,
    min_prompt: int = 1,
    seed: int = 0,
    warmup: float = 0.0,
    weight_decay: float = 0.0,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SkipDecodeTrainResult:
    """Train LoRA adapters (rank `lora_rank`, scale lora_alpha / rank, on `targets` or every linear projection of
    the decoder layers) of a copy of `model` under `schedule` on token blocks [n_blocks, seq_len]; return the result
    with the merged model. AdamW, linear warm-up (`warmup` of the steps) then decay; the model runs in eval mode (no
    dropout). `model` is not modified.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from depthprune.fsutil import atomic_folder
    from depthprune.training import check_output_dir, no_accelerator

    if not isinstance(schedule, SkipSchedule):
        raise TypeError(f"schedule must be a SkipSchedule, got {type(schedule).__name__}")
    if not isinstance(token_blocks, torch.Tensor) or token_blocks.dim() != 2 or token_blocks.is_floating_point():
        raise ValueError("token_blocks must be an integer tensor [n_blocks, seq_len]")
    if len(token_blocks) == 0:
        raise ValueError("no training blocks")
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"epochs must be >= 0, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    seq_len = int(token_blocks.shape[1])
    sample_layer_counts(schedule, 1, seq_len, min_prompt)  # validates min_prompt against seq_len
    _, layers, _ = _parts(model)  # a full-attention decoder-only LM, or a clear error
    if schedule.num_layers != len(layers):
        raise ValueError(f"the schedule was built for {schedule.num_layers} layers, the model has {len(layers)}")
    lora_model = add_lora(model, lora_rank, lora_alpha, targets)  # a copy
    out = Path(output_dir).expanduser().resolve() if output_dir is not None else None

    accelerator = Accelerator(cpu=no_accelerator())
    if out is not None:
        check_output_dir(out, overwrite=overwrite)
    set_seed(seed)
    device = accelerator.device
    lora_model.to(device)
    lora_model.eval()
    trainable = lora_parameters(lora_model)
    history: list[float] = []
    epoch_losses: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    wrapped = _SkipLoss(lora_model)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    loaders = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = torch.utils.data.DataLoader(
            token_blocks.long(), batch_size=batch_size, shuffle=True, generator=generator
        )
        loaders.append(accelerator.prepare(loader))
    total = sum(len(dl) for dl in loaders)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(warmup * total), max(total, 1))
    prompts = torch.Generator().manual_seed(seed * 7919 + accelerator.process_index)
    for epoch, loader in enumerate(loaders):
        bar = tqdm(
            loader,
            desc=f"skipdecode LoRA epoch {epoch + 1}/{epochs}",
            disable=not (progress and accelerator.is_main_process),
        )
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # steps, loss
        for ids in bar:
            counts = sample_layer_counts(schedule, ids.shape[0], seq_len, min_prompt, prompts).to(ids.device)
            loss = wrapped(ids, counts)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            history.append(value)
            sums += torch.tensor([1.0, value], dtype=torch.float64, device=device)
            bar.set_postfix(loss=f"{value:.4f}")
        bar.close()
        sums = accelerator.reduce(sums, reduction="sum")
        steps = max(float(sums[0]), 1.0)
        epoch_losses.append({"epoch": epoch, "steps": int(sums[0]), "loss": float(sums[1]) / steps})
    del wrapped
    accelerator.free_memory()
    for p in trainable:
        p.requires_grad_(False)
    seconds = time.perf_counter() - t0

    merged = merge_lora(lora_model)
    merged.eval()
    setattr(merged.config, CONFIG_KEY, schedule.to_dict())
    result = SkipDecodeTrainResult(
        schedule=schedule.to_dict(),
        lora_rank=lora_rank,
        lora_alpha=float(lora_rank if lora_alpha is None else lora_alpha),
        targets=None if targets is None else list(targets),
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seq_len=seq_len,
        min_prompt=min_prompt,
        seed=seed,
        num_blocks=len(token_blocks),
        num_processes=accelerator.num_processes,
        epoch_losses=epoch_losses,
        history=history,
        train_seconds=round(seconds, 2),
        output_dir=str(out) if out is not None else None,
        model=merged,
        lora_model=lora_model,
    )
    if out is not None:
        if accelerator.is_main_process:
            with atomic_folder(out) as tmp:
                merged.save_pretrained(tmp)
                (tmp / SCHEDULE_NAME).write_text(json.dumps(schedule.to_dict(), indent=2))
                (tmp / LOG_NAME).write_text(json.dumps(result.to_dict(), indent=1))
        accelerator.wait_for_everyone()
    return result


def load_schedule(model_or_folder: nn.Module | str | os.PathLike) -> SkipSchedule:
    """The SkipSchedule a model was adapted to: from its config (`skipdecode_schedule`) or a saved folder."""
    if isinstance(model_or_folder, nn.Module):
        data = getattr(model_or_folder.config, CONFIG_KEY, None)
        if data is None:
            raise ValueError(f"{type(model_or_folder).__name__}'s config records no SkipDecode schedule")
        return SkipSchedule.from_dict(data)
    path = Path(model_or_folder) / SCHEDULE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; train with train_skipdecode(..., output_dir=...) first")
    return SkipSchedule.from_dict(json.loads(path.read_text()))


__all__ = [
    "SkipDecodeTrainResult",
    "load_schedule",
    "sample_layer_counts",
    "skip_lm_loss",
    "skipdecode_loss",
    "train_skipdecode",
]
