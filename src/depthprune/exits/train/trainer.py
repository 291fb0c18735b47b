"""Train exit heads (and the backbone, when a recipe asks) with Hugging Face Accelerate.

The same call runs on one CPU, one GPU, or many processes: `accelerate launch --multi_gpu --num_processes N -m
depthprune.cli.train_exits ...` (on a machine without GPUs the processes use CPU and gloo). Note that
`accelerate launch --cpu --num_processes N` starts a single process unless an MPI launcher is configured.

A recipe's stages run in order, as the stages of one `depthprune.training.train_stages` call (the one training loop:
AdamW, linear warm-up and decay, checkpoints and resume); each stage brings its loss and the parameters it names. The
model and the heads are wrapped in one module whose forward computes the loss, so that data-parallel training
synchronizes gradients (preparing the two separately and calling them outside DDP's forward would not).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from depthprune.exits.data import LabelledTexts, tokenize_batch
from depthprune.exits.heads import ExitHeads
from depthprune.exits.inference import all_exit_outputs
from depthprune.exits.train import Stage, recipe_module, recipe_stages, trainable_parameters, with_agreement
from depthprune.training import TrainRun, TrainStage, latest_checkpoint, train_stages

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from depthprune.training import RunKwargs

LOG_NAME = "train_log.json"


@dataclasses.dataclass
class TrainResult:
    """What a training run did. history: one entry per optimizer step (this process's loss); epochs: the mean loss of
    every stage-epoch over all processes. samples_per_rank and checksums come from every process: equal checksums
    show that data-parallel replicas stayed in sync."""

    recipe: str
    stages: list[str]
    epochs: list[int]
    lr: list[float]
    batch_size: int
    seed: int
    hyper: dict[str, Any]
    num_processes: int
    samples_per_rank: list[int]
    checksums: list[float]
    history: list[dict[str, Any]]
    epoch_losses: list[dict[str, Any]]
    train_seconds: float
    output_dir: str | None = None
    head_lr: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        return cls(**data)


class _ExitLoss(nn.Module):
    """Backbone + exit heads as one module whose forward returns a stage's loss (what DDP must wrap)."""

    def __init__(self, model: nn.Module, heads: ExitHeads, loss_fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.model = model
        self.heads = heads
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        outputs = all_exit_outputs(self.model, self.heads, **inputs)
        return self.loss_fn(outputs, batch["labels"])


class _TensorRows(torch.utils.data.Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        lengths = {k: len(v) for k, v in tensors.items()}
        if "labels" not in tensors or "input_ids" not in tensors:
            raise ValueError(f"pre-tokenized data needs 'input_ids' and 'labels' tensors, got {sorted(tensors)}")
        if len(set(lengths.values())) != 1:
            raise ValueError(f"pre-tokenized tensors differ in length: {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def _dataset_and_collate(data: Any, tokenizer: Any, max_length: int) -> tuple[Any, Callable]:
    if isinstance(data, LabelledTexts):
        if tokenizer is None:
            raise ValueError("training on texts needs a tokenizer (tokenizer=...)")

        def collate(rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
            return tokenize_batch(tokenizer, [r[0] for r in rows], [r[1] for r in rows], max_length=max_length)

        return data, collate
    if isinstance(data, dict):
        return _TensorRows(data), torch.utils.data.default_collate
    raise TypeError(
        f"train_exits takes LabelledTexts (with a tokenizer) or a dict of equal-length tensors (input_ids, "
        f"attention_mask, labels), got {type(data).__name__}"
    )


def _per_stage(value: Any, n: int, name: str, kind: type) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) == 1 and n > 1:
        values = values * n
    if len(values) != n:
        raise ValueError(f"{name}: give one value or one per stage ({n} stages), got {len(values)}")
    return [kind(v) for v in values]


def _bind_hyper(stages: list[Stage], hyper: dict[str, Any]) -> list[Callable[..., torch.Tensor]]:
    """Each stage's loss with the recipe hyperparameters it accepts; a hyperparameter no stage accepts is an error."""
    used: set[str] = set()
    bound = []
    for stage in stages:
        accepted = set(inspect.signature(stage.loss).parameters) - {"outputs", "labels"}
        mine = {k: v for k, v in hyper.items() if k in accepted}
        used |= set(mine)
        bound.append(stage.loss if not mine else _partial(stage.loss, mine))
    unknown = set(hyper) - used
    if unknown:
        options = sorted({p for s in stages for p in inspect.signature(s.loss).parameters} - {"outputs", "labels"})
        raise ValueError(f"unknown recipe hyperparameters {sorted(unknown)}; this recipe takes {options}")
    return bound


def _partial(fn: Callable[..., torch.Tensor], kwargs: dict[str, Any]) -> Callable[..., torch.Tensor]:
    def bound(outputs, labels):
        return fn(outputs, labels, **kwargs)

    return bound


def _param_groups(
    params: list[nn.Parameter], heads: nn.Module, lr: float, head_lr: float | None
) -> list[dict[str, Any]]:
    """One optimizer group, or two when the exit heads get their own learning rate."""
    if head_lr is None:
        return [{"params": params, "lr": lr}]
    head_ids = {id(p) for p in heads.parameters()}
    groups = [
        {"params": [p for p in params if id(p) not in head_ids], "lr": lr},
        {"params": [p for p in params if id(p) in head_ids], "lr": head_lr},
    ]
    return [g for g in groups if g["params"]]


def train_exits(
    model: nn.Module,
    heads: ExitHeads,
    data: LabelledTexts | dict[str, torch.Tensor],
    *,
    tokenizer: Any = None,
    recipe: str = "two_stage",
    epochs: int | Sequence[int] = 1,
    lr: float | Sequence[float] = 5e-5,
    head_lr: float | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
    hyper: dict[str, Any] | None = None,
    fit_agreement: bool = False,
    agreement_weight: float = 0.0,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    **run_kwargs: Unpack[RunKwargs],
) -> TrainResult:
    """Train `heads` (and `model`, when the recipe's stages say so) on `data`, in place, through Accelerate.

    recipe: a name from `depthprune.exits.train.list_recipes()`; its stages run in order. epochs / lr: one value for
    every stage or one per stage. head_lr: the exit heads' learning rate in stages that also train the backbone
    (fresh heads usually want a larger one than a fine-tuned backbone; default: the stage's lr). batch_size is per
    process. hyper: the recipe loss's keyword arguments (e.g. palbert's beta, lambda_p). fit_agreement: append a
    stage that trains only the agreement extra (backbone and heads frozen); agreement_weight > 0 instead adds the
    agreement BCE to every stage that trains the heads.
    output_dir: where the main process writes the fine-tuned model (save_pretrained) + tokenizer + exit heads +
    train_log.json, atomically at the end; checkpoints go to output_dir/checkpoints/step-N every `checkpoint_every`
    optimizer steps (0: none), and `resume=True` goes on from the newest one (the trained parameters, optimizer,
    scheduler, position in the data; dropout is seeded per step, so it repeats too).
    """
    hyper = dict(hyper or {})
    module = recipe_module(recipe)
    missing = [e for e in getattr(module, "NEEDS", ()) if e not in heads.config.extras]
    if fit_agreement or agreement_weight:
        missing += [] if "agreement" in heads.config.extras else ["agreement"]
    if missing:
        raise ValueError(
            f"recipe {recipe!r} needs exit heads with the extras {missing}; these have {list(heads.config.extras)}: "
            f"build them with ExitHeads.for_model(model, extras={tuple(sorted({*heads.config.extras, *missing}))})"
        )
    stages = recipe_stages(recipe)
    if agreement_weight:
        stages = [
            dataclasses.replace(s, loss=with_agreement(s.loss, agreement_weight))
            if s.trainable in ("heads", "all")
            else s
            for s in stages
        ]
    if fit_agreement:
        stages.append(recipe_stages("agreement")[0])
    losses = _bind_hyper(stages, hyper)
    epochs_list = _per_stage(epochs, len(stages), "epochs", int)
    lr_list = _per_stage(lr, len(stages), "lr", float)
    if head_lr is not None and not head_lr > 0:
        raise ValueError(f"head_lr must be positive, got {head_lr!r}")
    if any(e < 0 for e in epochs_list) or batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {epochs_list}, {batch_size}")
    dataset, collate = _dataset_and_collate(data, tokenizer, max_length)
    core = [
        TrainStage(
            _ExitLoss(model, heads, loss_fn),
            _param_groups(
                list({id(p): p for p in trainable_parameters(stage.trainable, model, heads)}.values()),
                heads,
                stage_lr,
                head_lr if stage.trainable == "all" else None,
            ),
            epochs=n_epochs,
            lr=stage_lr,
            name=stage.name,
        )
        for stage, loss_fn, n_epochs, stage_lr in zip(stages, losses, epochs_list, lr_list, strict=True)
    ]

    def make_result(run: TrainRun) -> TrainResult:
        return TrainResult(
            recipe=recipe,
            stages=[s.name for s in stages],
            epochs=epochs_list,
            lr=lr_list,
            head_lr=head_lr,
            batch_size=batch_size,
            seed=seed,
            hyper=hyper,
            num_processes=run.num_processes,
            samples_per_rank=run.samples_per_rank,
            checksums=run.checksums,
            history=run.history,
            epoch_losses=[
                {"stage": e["stage"], "epoch": e["epoch"], "mean_loss": e["loss"], "steps": e["steps"]}
                for e in run.epoch_losses
            ],
            train_seconds=run.train_seconds,
            output_dir=run.output_dir,
        )

    def save(folder: Path, run: TrainRun) -> None:
        from depthprune.static.export import save_model

        save_model(model, folder, tokenizer)
        heads.save(folder)
        (folder / LOG_NAME).write_text(json.dumps(make_result(run).to_dict(), indent=1))

    try:
        run = train_stages(
            core,
            dataset,
            collate=collate,
            warmup=warmup,
            weight_decay=weight_decay,
            find_unused_parameters=True,  # a stage may leave some exit heads' extras unused
            batch_size=batch_size,
            seed=seed,
            save=save,
            fingerprint={"recipe": recipe},
            desc=recipe,
            **run_kwargs,
        )
    finally:
        model.eval()
        heads.eval()
    return make_result(run)


def fit_agreement(model: nn.Module, heads: ExitHeads, data: Any, **kwargs: Any) -> TrainResult:
    """Post-hoc: train only the agreement extra (learned exit classifier) of trained heads on a frozen backbone."""
    return train_exits(model, heads, data, recipe="agreement", **kwargs)


__all__ = ["TrainResult", "fit_agreement", "latest_checkpoint", "train_exits"]
