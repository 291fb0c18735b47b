"""Train exit heads (and the backbone, when a recipe asks) with Hugging Face Accelerate.

The same call runs on one CPU, one GPU, or many processes: `accelerate launch --multi_gpu --num_processes N -m
depthprune.cli.train_exits ...` (on a machine without GPUs the processes use CPU and gloo). Note that
`accelerate launch --cpu --num_processes N` starts a single process unless an MPI launcher is configured.

A recipe's stages run in order; each stage trains the parameters it names with AdamW (linear warm-up and decay) and
its loss. The model and the heads are wrapped in one module whose forward computes the loss, so that data-parallel
training synchronizes gradients (preparing the two separately and calling them outside DDP's forward would not).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthprune.errors import OutputExistsError
from depthprune.exits.data import LabelledTexts, tokenize_batch
from depthprune.exits.heads import ExitHeads
from depthprune.exits.inference import all_exit_outputs
from depthprune.exits.train import Stage, recipe_module, recipe_stages, trainable_parameters, with_agreement
from depthprune.training import no_accelerator

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
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


class _ExitModel(nn.Module):
    """Backbone + exit heads as one module whose forward returns a stage's loss (what DDP must wrap)."""

    def __init__(self, model: nn.Module, heads: ExitHeads):
        super().__init__()
        self.model = model
        self.heads = heads

    def forward(self, loss_fn: Callable[..., torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        outputs = all_exit_outputs(self.model, self.heads, **inputs)
        return loss_fn(outputs, batch["labels"])


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


def _checksum(model: nn.Module, heads: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() for p in [*model.parameters(), *heads.parameters()]))


def _check_output_dir(out: Path, model: nn.Module, overwrite: bool, resume: bool) -> None:
    source = getattr(model.config, "_name_or_path", "")
    if source and Path(source).expanduser().is_dir() and Path(source).expanduser().resolve() == out:
        raise OutputExistsError(f"{out} is the folder this model was loaded from; write to a new folder")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file; pass a folder for the trained model")
    if out.exists() and not overwrite:
        others = [p.name for p in out.iterdir() if not (resume and p.name == CHECKPOINTS)]
        if others:
            raise OutputExistsError(
                f"{out} already exists and is not empty ({sorted(others)[:4]}); choose a new folder, pass "
                "overwrite=True (--overwrite) to replace it at the end, or resume=True (--resume) to go on from its "
                "checkpoints"
            )


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder under output_dir/checkpoints, or None."""
    folder = Path(output_dir) / CHECKPOINTS
    found = sorted(folder.glob("step-*")) if folder.is_dir() else []
    found = [f for f in found if (f / STATE_NAME).exists()]
    return found[-1] if found else None


def _save_checkpoint(out: Path, model, heads, optimizer, scheduler, state: dict[str, Any]) -> Path:
    from safetensors.torch import save_model

    target = out / CHECKPOINTS / f"step-{state['global_step']:07d}"
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        heads.save(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_final(out: Path, model, heads, tokenizer, result: TrainResult) -> None:
    from depthprune.fsutil import atomic_folder
    from depthprune.static.export import save_model

    with atomic_folder(out) as tmp:
        save_model(model, tmp, tokenizer)
        heads.save(tmp)
        (tmp / LOG_NAME).write_text(json.dumps(result.to_dict(), indent=1))
        if (out / CHECKPOINTS).is_dir():
            os.replace(out / CHECKPOINTS, tmp / CHECKPOINTS)


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
    output_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
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
    optimizer steps (0: none), and `resume=True` goes on from the newest one (model, heads, optimizer, position in the
    data; dropout randomness is not restored).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

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
    out = Path(output_dir).expanduser().resolve() if output_dir is not None else None
    if (checkpoint_every or resume) and out is None:
        raise ValueError("checkpoints and resume need an output_dir")

    accelerator = Accelerator(
        cpu=no_accelerator(), kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
    )
    if out is not None:
        _check_output_dir(out, model, overwrite, resume)
    set_seed(seed)
    dataset, collate = _dataset_and_collate(data, tokenizer, max_length)
    if len(dataset) == 0:
        raise ValueError("no training examples")

    start = {"stage": 0, "epoch": 0, "batch": 0, "global_step": 0, "history": [], "epoch_losses": [], "samples": 0}
    ckpt = latest_checkpoint(out) if resume and out is not None else None
    if ckpt is not None:
        from safetensors.torch import load_model

        load_model(model, str(ckpt / "model.safetensors"), device=str(next(model.parameters()).device))
        heads.load_state_dict(ExitHeads.load(ckpt, model).state_dict())
        start.update(json.loads((ckpt / STATE_NAME).read_text()))
        if start.get("recipe") != recipe:
            raise ValueError(f"checkpoint {ckpt} is from recipe {start.get('recipe')!r}, not {recipe!r}")

    flags = {id(p): p.requires_grad for p in [*model.parameters(), *heads.parameters()]}
    history: list[dict[str, Any]] = list(start["history"])
    epoch_losses: list[dict[str, Any]] = list(start["epoch_losses"])
    global_step = int(start["global_step"])
    samples = int(start["samples"])
    t0 = time.perf_counter()
    try:
        for s, (stage, loss_fn, n_epochs, stage_lr) in enumerate(
            zip(stages, losses, epochs_list, lr_list, strict=True)
        ):
            if s < start["stage"] or n_epochs == 0:
                continue
            for p in [*model.parameters(), *heads.parameters()]:
                p.requires_grad_(False)
            params = list({id(p): p for p in trainable_parameters(stage.trainable, model, heads)}.values())
            for p in params:
                p.requires_grad_(True)
            model.train()
            heads.train()
            wrapper = _ExitModel(model, heads)
            optimizer = torch.optim.AdamW(
                _param_groups(params, heads, stage_lr, head_lr if stage.trainable == "all" else None),
                lr=stage_lr,
                weight_decay=weight_decay,
            )
            wrapped, optimizer = accelerator.prepare(wrapper, optimizer)
            loaders = []
            for epoch in range(n_epochs):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + s * 1009 + epoch)
                loader = torch.utils.data.DataLoader(
                    dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate
                )
                loaders.append(accelerator.prepare(loader))
            total = sum(len(dl) for dl in loaders)
            scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(warmup * total), total)
            resuming = ckpt is not None and s == start["stage"]
            if resuming:
                saved = torch.load(ckpt / "optimizer.pt", weights_only=False)
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
            for epoch, loader in enumerate(loaders):
                skip = 0
                if resuming:
                    if epoch < start["epoch"]:
                        continue
                    if epoch == start["epoch"]:
                        skip = int(start["batch"])
                batches = accelerator.skip_first_batches(loader, skip) if skip else loader
                bar = tqdm(
                    batches,
                    total=len(loader) - skip,
                    desc=f"{recipe} [{stage.name}] epoch {epoch + 1}/{n_epochs}",
                    disable=not (progress and accelerator.is_main_process),
                )
                loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
                steps = 0
                for b, batch in enumerate(bar, start=skip):
                    loss = wrapped(loss_fn, batch)
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    global_step += 1
                    steps += 1
                    samples += int(batch["labels"].shape[0])
                    value = float(loss.detach())
                    loss_sum += value
                    history.append({"stage": stage.name, "epoch": epoch, "step": global_step, "loss": value})
                    bar.set_postfix(loss=f"{value:.4f}")
                    if checkpoint_every and global_step % checkpoint_every == 0:
                        state = {
                            "recipe": recipe, "stage": s, "epoch": epoch, "batch": b + 1, "global_step": global_step,
                            "samples": samples, "history": history, "epoch_losses": epoch_losses,
                        }  # fmt: skip
                        if accelerator.is_main_process:
                            _save_checkpoint(out, model, heads, optimizer, scheduler, state)
                        accelerator.wait_for_everyone()
                bar.close()
                total_loss = accelerator.reduce(loss_sum, reduction="sum")
                total_steps = accelerator.reduce(torch.tensor(float(steps), device=accelerator.device), "sum")
                if float(total_steps) > 0:  # an epoch a resumed run found already done adds nothing
                    mean = float(total_loss / total_steps)
                    epoch_losses.append({"stage": stage.name, "epoch": epoch, "mean_loss": mean, "steps": steps})
            del wrapped
            accelerator.free_memory()  # drop this stage's DDP wrapper and optimizer before the next stage
    finally:
        for p in [*model.parameters(), *heads.parameters()]:
            p.requires_grad_(flags.get(id(p), True))
        model.eval()
        heads.eval()
    seconds = time.perf_counter() - t0

    def everyone(value: float) -> list[float]:
        gathered = accelerator.gather(torch.tensor([value], dtype=torch.float64, device=accelerator.device))
        return [float(v) for v in gathered.cpu()]

    result = TrainResult(
        recipe=recipe,
        stages=[s.name for s in stages],
        epochs=epochs_list,
        lr=lr_list,
        head_lr=head_lr,
        batch_size=batch_size,
        seed=seed,
        hyper=hyper,
        num_processes=accelerator.num_processes,
        samples_per_rank=[int(v) for v in everyone(samples)],
        checksums=everyone(_checksum(model, heads)),
        history=history,
        epoch_losses=epoch_losses,
        train_seconds=round(seconds, 2),
        output_dir=str(out) if out is not None else None,
    )
    if out is not None:
        if accelerator.is_main_process:
            _save_final(out, model, heads, tokenizer, result)
        accelerator.wait_for_everyone()
    return result


def fit_agreement(model: nn.Module, heads: ExitHeads, data: Any, **kwargs: Any) -> TrainResult:
    """Post-hoc: train only the agreement extra (learned exit classifier) of trained heads on a frozen backbone."""
    return train_exits(model, heads, data, recipe="agreement", **kwargs)
