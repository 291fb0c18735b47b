"""Heal a statically pruned model by distillation from the untouched model, with LoRA (the "heal" step of ShortGPT /
Gromov et al., who fine-tune the pruned model; here the target is the full model's next-token distribution).

The pruned copy (`apply_plan(model, plan)`) gets LoRA on every linear projection of its kept decoder layers (or on
`targets`); the loss per position is KL(teacher || student) of the next-token distributions at `temperature`
(scaled by temperature**2, Hinton et al., so gradients keep their size) plus `nll_weight` times the next-token NLL
of the calibration text, averaged over positions. The teacher is the untouched model, run under no_grad and handed to
the loop as `frozen` (never wrapped by DDP, never trained). nll_weight defaults to 0.1: the KL already carries the
teacher's whole distribution (a richer signal than one token), the small NLL term only anchors the student to the
real text where the teacher is itself wrong, without pulling it away from the teacher on a small calibration set.
Training runs `epochs` passes over the calibration blocks, or stops at `max_tokens` training tokens, whichever comes
first, through `depthprune.training.train` (checkpoints hold the LoRA weights; `resume=True`). At the end the LoRA
updates are merged (`merge_and_unload` on a copy) into an ordinary model of the input's class. The input model is
never modified.

Encoder-decoders (Whisper, BART, T5) are healed by the same method with their encoder frozen and cached:
`distill_seq2seq.py`, which `heal` hands them to.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from depthprune.lora import lora_copy, lora_settings, merged_copy
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan, layer_sizes
from depthprune.static.heal import check_options
from depthprune.training import RunKwargs, train

RECORD_KEY = "depthprune_healing"

if TYPE_CHECKING:
    from typing_extensions import Unpack


@dataclasses.dataclass
class DistillResult:
    """What a healing run did. history: the loss per optimizer step (this process); epoch_losses: per epoch, the mean
    loss, KL and NLL over all processes; tokens: training tokens seen (all processes). model: the merged, healed model
    (not in to_dict)."""

    plan: str
    lora_rank: int
    lora_alpha: float
    targets: list[str] | None
    epochs: int
    lr: float
    batch_size: int
    seed: int
    temperature: float
    nll_weight: float
    max_tokens: int | None
    tokens: int
    steps: int
    num_processes: int
    epoch_losses: list[dict[str, Any]]
    history: list[float]
    train_seconds: float
    output_dir: str | None = None
    model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(teacher || student) * temperature**2 averaged over every position, next-token NLL of ids averaged over
    positions) from logits [batch, seq, vocab] and ids [batch, seq]."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # [b, s, v]
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [b, s, v]
    kl = (t.exp() * (t - s)).sum(-1).mean() * temperature**2
    nll = nn.functional.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return kl, nll


class _DistillLoss(nn.Module):
    """The LoRA student plus the loss, as one module DDP can wrap; the teacher is held outside the module tree."""

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float, nll_weight: float):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # not a submodule: frozen, never wrapped or trained
        self.temperature = temperature
        self.nll_weight = nll_weight

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher = self._teacher[0](input_ids=ids, use_cache=False).logits  # [b, s, v]
        student = self.student(input_ids=ids, use_cache=False).logits  # [b, s, v]
        kl, nll = distill_loss(student, teacher, ids, self.temperature)
        return {"loss": kl + self.nll_weight * nll, "kl": kl.detach(), "nll": nll.detach()}


@torch.no_grad()
def distill_kl(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor], temperature: float = 1.0) -> float:
    """Mean per-position KL(teacher || student) of the next-token distributions over `batches` [batch, seq]."""
    total, count = 0.0, 0
    for ids in batches:
        kl, _ = distill_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, ids, temperature)
        total += float(kl) * ids.shape[0] * ids.shape[1]
        count += ids.shape[0] * ids.shape[1]
    return total / count


def _blocks(batches: Any) -> torch.Tensor:
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    batches = list(batches)
    if not batches or any(not isinstance(b, torch.Tensor) or b.numel() == 0 for b in batches):
        raise ValueError("healing needs calibration batches: a non-empty list of LongTensor [batch, seq] token ids")
    if any(b.dim() != 2 or b.is_floating_point() for b in batches) or len({b.shape[1] for b in batches}) != 1:
        raise ValueError(
            f"calibration batches must be integer tensors [batch, seq] of one seq length, got shapes "
            f"{[tuple(b.shape) for b in batches]}"
        )
    if batches[0].shape[1] < 2:
        raise ValueError("calibration sequences need at least 2 tokens (one next-token prediction)")
    return torch.cat(batches).long()  # [n_blocks, seq]


def _budget(blocks: torch.Tensor, epochs: int, max_tokens: int | None, seed: int) -> tuple[torch.Tensor, int]:
    """(training rows, epochs for the loop): every block `epochs` times, or, when max_tokens stops earlier, that many
    tokens' worth of whole blocks in one pass (each earlier epoch's blocks, then part of the last, seeded)."""
    n, seq = blocks.shape
    if max_tokens is None or max_tokens >= epochs * n * seq:
        return blocks, epochs
    if max_tokens < seq:
        raise ValueError(f"max_tokens={max_tokens} is less than one calibration block ({seq} tokens)")
    rows = max_tokens // seq
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(rows / n))])[:rows]
    return blocks[order], 1


def distill_heal(
    model: nn.Module,
    plan: LayerPlan | str,
    batches: list[torch.Tensor],
    *,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    targets: tuple[str, ...] | list[str] | None = None,
    epochs: int = 1,
    lr: float = 2e-4,
    batch_size: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
    nll_weight: float = 0.1,
    max_tokens: int | None = None,
    warmup: float = 0.1,
    start: nn.Module | None = None,
    **run_kwargs: Unpack[RunKwargs],
) -> DistillResult:
    """Prune a copy of `model` by `plan`, train LoRA on it to match `model`'s next-token distributions on `batches`
    (a list of LongTensor [batch, seq]), merge; return the result with the healed model (same class as `model`).

    start: a model already running `plan` (an earlier healer's output, e.g. the fold's) to train from instead of the
    plain pruned copy; it is not modified either."""
    if epochs < 0 or batch_size < 1 or not lr > 0 or not temperature > 0 or nll_weight < 0:
        raise ValueError(
            f"need epochs >= 0, batch_size >= 1, lr > 0, temperature > 0, nll_weight >= 0; got {epochs}, "
            f"{batch_size}, {lr}, {temperature}, {nll_weight}"
        )
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive token count or None, got {max_tokens}")
    blocks = _blocks(batches)
    plan = LayerPlan.parse(plan) if isinstance(plan, str) else plan
    pruned = apply_plan(model, plan)  # checks the plan (and the architecture) with clear errors
    sizes = layer_sizes(model)
    resolved = plan.resolve(sizes)
    if start is not None:
        kept = {name: len(layers) for name, layers in resolved.stacks.items()}
        if type(start) is not type(model) or layer_sizes(start) != kept:
            raise ValueError(
                f"distill: start must be a {type(model).__name__} running the plan {resolved} (layers per stack "
                f"{kept}); got a {type(start).__name__} with {layer_sizes(start)}"
            )
        pruned = start  # lora_copy copies it
    if resolved.is_identity(sizes):
        raise ValueError(f"the plan {resolved} keeps every layer: there is nothing to heal")
    if any(len(set(layers)) != len(layers) for layers in resolved.stacks.values()):
        raise ValueError(f"the plan {resolved} repeats a layer; LoRA on shared weights is not supported when healing")
    peft_model = lora_copy(pruned, lora_rank, lora_alpha, targets)
    del pruned
    student = peft_model.get_base_model()  # the HF class with LoRA inside
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    data, loop_epochs = _budget(blocks, epochs, max_tokens, seed)
    run = train(
        _DistillLoss(student, model, temperature, nll_weight),
        trainable,
        data,
        epochs=loop_epochs,
        lr=lr,
        warmup=warmup,
        train_mode=False,  # eval mode: no dropout in student or teacher
        batch_size=batch_size,
        seed=seed,
        frozen=[model],
        fingerprint={
            "healer": "distill",
            "plan": resolved.to_text(),
            "lora_rank": lora_rank,
            "targets": targets and list(targets),
            "max_tokens": max_tokens,
            "start": None if start is None else (getattr(start.config, RECORD_KEY, None) or {}).get("method", "given"),
        },  # fmt: skip
        desc="distill heal",
        **run_kwargs,
    )
    for p in trainable:
        p.requires_grad_(False)
    merged = merged_copy(peft_model)
    merged.eval()
    result = DistillResult(
        plan=resolved.to_text(),
        **lora_settings(lora_rank, lora_alpha, targets),
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        temperature=temperature,
        nll_weight=nll_weight,
        max_tokens=max_tokens,
        tokens=sum(run.samples_per_rank) * int(blocks.shape[1]),
        steps=run.global_step,
        **run.record(),
        model=merged,
    )
    record = {k: v for k, v in result.to_dict().items() if k not in ("history", "output_dir")}
    setattr(merged.config, RECORD_KEY, {"method": "distill", **record})
    return result


def heal(
    model: nn.Module, plan: LayerPlan | str, batches: list[torch.Tensor], *, progress: bool = False, **options: Any
) -> nn.Module:
    """The healer interface: a new model of `model`'s class running `plan`, healed by distillation (`distill_heal`;
    an encoder-decoder, whose batches are encoder inputs, by `distill_seq2seq.distill_seq2seq`: encoder frozen and
    cached, decoder trained)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        from depthprune.static.heal import distill_seq2seq

        return distill_seq2seq.heal(model, plan, batches, progress=progress, **options)
    check_options("distill", distill_heal, options, extra=RunKwargs.__annotations__)
    return distill_heal(model, plan, batches, progress=progress, **options).model


# inspect.signature(heal) reads distill_heal's options (a chain checks a later stage takes start= first)
heal.__wrapped__ = distill_heal
HEALER = heal

__all__ = ["HEALER", "DistillResult", "distill_heal", "distill_kl", "distill_loss", "heal"]
