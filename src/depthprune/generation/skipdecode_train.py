"""Adapt a causal LM to a SkipDecode schedule (Del Corro et al. 2023), with LoRA, through Hugging Face Accelerate.

The model learns to predict well when the generated positions skip their lower layers: every training block is split
at a random prompt length per row (uniform in min_prompt .. seq_len-1); the prompt runs all layers and the positions
after it run the top `schedule.layers_at(k)` layers, k counting from the prompt's end, as in decoding. The loss is
the ordinary next-token cross-entropy over every position, computed by `skipdecode_logits` (teacher forcing, the
same computation as decoding), plus, with kl_weight > 0, kl_weight x KL(untouched || adapted) of the next-token
distributions (the untouched model's full-depth logits as soft targets: `depthprune.lora.untouched_logits`). Only
LoRA weights train (peft's `LoraConfig` / `get_peft_model` on a copy of the model); at the end they are merged
(`merge_and_unload`, on another copy) into an ordinary Hugging Face model that `skipdecode_generate` runs with the
same schedule. The input model is never modified. The loop is `depthprune.training.train` (checkpoints every
`checkpoint_every` steps hold only the LoRA weights; `resume=True`). `output_dir`: the main process writes the merged
model (save_pretrained, the schedule recorded in its config as `skipdecode_schedule`), skip_schedule.json and
train_log.json there, atomically.

Same call on one CPU, one GPU or many processes (`accelerate launch`): batch_size is per process. From the command
line: `depthprune train-skipdecode --speedup 2 --output-dir out/smollm2-skip2` (or `accelerate launch -m depthprune
train-skipdecode ...`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from depthprune.generation.skipdecode import SkipSchedule, skipdecode_logits, skipdecode_parts
from depthprune.lora import kl_to_teacher, lora_copy, lora_settings, lora_targets, merged_copy, untouched_logits
from depthprune.training import TrainRun, check_token_blocks, train

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from depthprune.training import RunKwargs

LOG_NAME = "train_log.json"
SCHEDULE_NAME = "skip_schedule.json"
CONFIG_KEY = "skipdecode_schedule"


@dataclasses.dataclass
class SkipDecodeTrainResult:
    """What a run did. epoch_losses: per epoch, the mean loss over all processes. history: this process's loss per
    optimizer step. model: the merged model (a new plain HF model); lora_model: the trained copy with peft's LoRA layers
    in its projections (the HF model class; `peft_model` is the PeftModel around it). None of these is in to_dict."""

    schedule: dict[str, Any]
    lora_rank: int
    lora_alpha: float
    targets: list[str] | None
    epochs: int
    lr: float
    batch_size: int
    seq_len: int
    min_prompt: int
    kl_weight: float
    seed: int
    num_blocks: int
    num_processes: int
    epoch_losses: list[dict[str, Any]]
    history: list[float]
    train_seconds: float
    output_dir: str | None = None
    model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    lora_model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    peft_model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        skip = {"model", "lora_model", "peft_model"}
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


def skip_lm_loss(
    model: nn.Module,
    ids: torch.Tensor,
    depth: torch.Tensor | list[int],
    teacher_logits: torch.Tensor | None = None,
    kl_weight: float = 0.0,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ids [batch, seq] when position p runs the top depth[.., p] layers, plus
    kl_weight x the mean KL(teacher || model) over the predicting positions when teacher_logits [batch, seq, vocab]
    (the untouched model's) are given."""
    logits = skipdecode_logits(model, ids, depth)  # [batch, seq, vocab]
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    if kl_weight > 0:
        if teacher_logits is None:
            raise ValueError("kl_weight > 0 needs teacher_logits (the untouched model's logits)")
        loss = loss + kl_weight * kl_to_teacher(logits[:, :-1], teacher_logits[:, :-1])
    return loss


class _SkipLoss(nn.Module):
    """The LoRA model plus the loss, as one module whose forward DDP can wrap. Each batch draws its rows' prompt
    lengths from torch's global RNG, which the loop seeds per step (so a resumed run draws the same)."""

    def __init__(
        self,
        model: nn.Module,
        schedule: SkipSchedule,
        min_prompt: int,
        teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
        kl_weight: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.min_prompt = min_prompt
        self.teacher = teacher
        self.kl_weight = kl_weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        counts = sample_layer_counts(self.schedule, ids.shape[0], ids.shape[1], self.min_prompt).to(ids.device)
        teacher = self.teacher(ids) if self.kl_weight > 0 and self.teacher is not None else None
        return skip_lm_loss(self.model, ids, counts, teacher, self.kl_weight)


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
    kl_weight: float = 0.0,
    **run_kwargs: Unpack[RunKwargs],
) -> SkipDecodeTrainResult:
    """Train LoRA adapters (rank `lora_rank`, scale lora_alpha / rank, on `targets` or every linear projection of
    the decoder layers) of a copy of `model` under `schedule` on token blocks [n_blocks, seq_len]; return the result
    with the merged model. AdamW, linear warm-up (`warmup` of the steps) then decay; the model runs in eval mode (no
    dropout). kl_weight: weight of the KL term to the untouched model's distributions (0: cross-entropy only).
    `model` is not modified.
    """
    if not (kl_weight >= 0 and math.isfinite(kl_weight)):
        raise ValueError(f"kl_weight must be a finite number >= 0 (0: no KL term), got {kl_weight!r}")
    if not isinstance(schedule, SkipSchedule):
        raise TypeError(f"schedule must be a SkipSchedule, got {type(schedule).__name__}")
    check_token_blocks(token_blocks, epochs, batch_size, lr)
    seq_len = int(token_blocks.shape[1])
    sample_layer_counts(schedule, 1, seq_len, min_prompt)  # validates min_prompt against seq_len
    _, layers, _ = skipdecode_parts(model)  # a full-attention decoder-only LM, or a clear error
    if schedule.num_layers != len(layers):
        raise ValueError(f"the schedule was built for {schedule.num_layers} layers, the model has {len(layers)}")
    peft_model = lora_copy(model, lora_rank, lora_alpha, targets)
    lora_model = peft_model.get_base_model()  # the HF class, LoRA inside: what skipdecode_logits runs
    trainable = [p for p in peft_model.parameters() if p.requires_grad]

    def make_result(run: TrainRun, merged: nn.Module | None) -> SkipDecodeTrainResult:
        return SkipDecodeTrainResult(
            schedule=schedule.to_dict(),
            **lora_settings(lora_rank, lora_alpha, targets),
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seq_len=seq_len,
            min_prompt=min_prompt,
            kl_weight=kl_weight,
            seed=seed,
            num_blocks=len(token_blocks),
            **run.record(),
            model=merged,
            lora_model=lora_model,
            peft_model=peft_model,
        )

    def merge() -> nn.Module:
        merged = merged_copy(peft_model)
        merged.eval()
        setattr(merged.config, CONFIG_KEY, schedule.to_dict())
        return merged

    merged: nn.Module | None = None  # the main process merges while saving; the others after training

    def save(folder: Path, run: TrainRun) -> None:
        nonlocal merged
        merged = merge()
        merged.save_pretrained(folder)
        (folder / SCHEDULE_NAME).write_text(json.dumps(schedule.to_dict(), indent=2))
        (folder / LOG_NAME).write_text(json.dumps(make_result(run, None).to_dict(), indent=1))

    run = train(
        _SkipLoss(lora_model, schedule, min_prompt, untouched_logits(peft_model), kl_weight),
        trainable,
        token_blocks.long(),
        epochs=epochs,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        train_mode=False,  # eval mode: no dropout
        batch_size=batch_size,
        seed=seed,
        save=save,
        fingerprint={
            "schedule": schedule.to_dict(),
            "lora_rank": lora_rank,
            "targets": targets and list(targets),
            **({"kl_weight": kl_weight} if kl_weight else {}),  # runs without the term resume as before
        },
        desc="skipdecode LoRA",
        **run_kwargs,
    )
    for p in trainable:
        p.requires_grad_(False)
    return make_result(run, merged if merged is not None else merge())


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
    "lora_copy",
    "lora_targets",
    "merged_copy",
    "sample_layer_counts",
    "skip_lm_loss",
    "skipdecode_loss",
    "train_skipdecode",
]
