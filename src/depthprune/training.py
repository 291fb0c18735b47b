"""The one training loop of depthprune (through Hugging Face Accelerate): every method brings a loss and parameters.

`train(loss, params, data, ...)` trains one set of parameters; `train_stages([TrainStage(...), ...], data, ...)` runs
a multi-stage recipe (DeeBERT: fine-tune, then freeze the backbone and train the exits) in ONE call, because a resumed
run must find its place across the stages (stage, epoch, batch) from one series of checkpoints, and the stages share
one output folder and one result record; successive calls would each need their own checkpoints and the caller would
have to work out which calls are already done.

The same call runs on one CPU, one GPU or many processes (`accelerate launch --multi_gpu --num_processes N ...`; on a
machine without GPUs the processes use the CPU and gloo). The loss is computed inside the forward of the module that
Accelerate prepares (DDP wraps it), so gradients synchronize: a loss given as an nn.Module is that module; a loss given
as a function is wrapped in one that holds the trained parameters. Each stage gets AdamW (linear warm-up, then linear
decay to zero); every epoch shuffles the data with a generator seeded from (seed, stage, epoch), and every optimizer
step seeds torch's global RNG from (seed, process, step), so randomness inside the loss (dropout, sampled depths) is
the same in a resumed run as in an uninterrupted one. Checkpoints every `checkpoint_every` optimizer steps hold the
trained parameters, the optimizer, the scheduler and the position in the data; `resume=True` goes on from the newest.
Loss sums (and any extra metrics the loss returns) are reduced over processes once an epoch. The main process writes
the output folder atomically at the end through the caller's savers.

This module is core: it imports no method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from depthprune.fsutil import check_output_folder

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
PARAMS_NAME = "trained.safetensors"
OPTIMIZER_NAME = "optimizer.pt"

Loss = nn.Module | Callable[[Any], torch.Tensor | dict[str, torch.Tensor]]
Saver = Callable[[Path, "TrainRun"], None]


def no_accelerator() -> bool:
    """True on a machine without a GPU (or other torch accelerator): Accelerate must then be told to use the CPU, or
    several launched processes would not form one data-parallel group."""
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return not probe.is_available()
    return not torch.cuda.is_available()


@dataclasses.dataclass
class TrainStage:
    """One stage of training: a loss (an nn.Module or function taking a batch, returning the loss or a dict with
    "loss" and extra metrics), the parameters it trains (parameters, or optimizer groups {"params": [...], "lr": x}
    with their own learning rate), for `epochs` epochs at learning rate `lr`."""

    loss: Loss
    params: Sequence[nn.Parameter] | Sequence[dict[str, Any]]
    epochs: int = 1
    lr: float = 1e-3
    name: str = "train"

    def __post_init__(self) -> None:
        if not callable(self.loss):
            raise TypeError(f"a stage's loss must be an nn.Module or a function, got {type(self.loss).__name__}")
        if self.epochs < 0 or not self.lr > 0:
            raise ValueError(f"stage {self.name!r}: epochs must be >= 0 and lr > 0, got {self.epochs}, {self.lr}")
        self.params = list(self.params)
        if not self.params:
            raise ValueError(f"stage {self.name!r} has no parameters to train")

    def groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, each with an lr."""
        if isinstance(self.params[0], dict):
            return [{**g, "params": list(g["params"]), "lr": g.get("lr", self.lr)} for g in self.params]
        return [{"params": list(self.params), "lr": self.lr}]

    def parameters(self) -> list[nn.Parameter]:
        """Every trained parameter once."""
        return list({id(p): p for g in self.groups() for p in g["params"]}.values())


@dataclasses.dataclass
class TrainRun:
    """What the loop did. history: one entry per optimizer step (this process's loss); epoch_losses: per stage-epoch,
    this process's steps, all processes' steps and the mean loss and metrics over all processes. samples_per_rank and
    checksums (the sum of the loss modules' parameters) come from every process: equal checksums show that the
    data-parallel replicas stayed in sync."""

    stages: list[str]
    num_processes: int
    global_step: int
    train_seconds: float
    output_dir: str | None
    samples_per_rank: list[int]
    checksums: list[float]
    epoch_losses: list[dict[str, Any]]
    history: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def record(self) -> dict[str, Any]:
        """What a method's result records of the run: the processes, per stage-epoch the steps (all processes'),
        mean loss and metrics, the loss of every optimizer step, the wall time and the output folder."""
        return {
            "num_processes": self.num_processes,
            "epoch_losses": [
                {"epoch": e["epoch"], "steps": e["total_steps"], "loss": e["loss"], **e.get("metrics", {})}
                for e in self.epoch_losses
            ],
            "history": [h["loss"] for h in self.history],
            "train_seconds": self.train_seconds,
            "output_dir": self.output_dir,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainRun:
        return cls(**data)


def check_token_blocks(token_blocks: Any, epochs: int, batch_size: int, lr: float, *, min_len: int = 1) -> None:
    """Refuse training data that is not an integer tensor [n_blocks, seq_len] with seq_len >= min_len, and settings
    outside epochs >= 0, batch_size >= 1, lr > 0, with what was given."""
    if not isinstance(token_blocks, torch.Tensor) or token_blocks.dim() != 2 or token_blocks.is_floating_point():
        raise ValueError("token_blocks must be an integer tensor [n_blocks, seq_len]")
    if len(token_blocks) == 0 or token_blocks.shape[1] < min_len:
        raise ValueError(f"need at least one block of >= {min_len} tokens, got shape {tuple(token_blocks.shape)}")
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"epochs must be >= 0, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")


def model_source(module: nn.Module) -> Path | None:
    """The folder `module` (an HF model, or a module holding one) was loaded from, if it was loaded from a folder."""
    for m in module.modules():
        source = getattr(getattr(m, "config", None), "_name_or_path", "") or ""
        if source and Path(source).expanduser().is_dir():
            return Path(source).expanduser().resolve()
    return None


def check_output_dir(
    out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False, sources: Iterable[Path | None] = ()
) -> Path:
    """Refuse, before any training, an output folder that is a file, one of `sources` (folders models were loaded
    from: never overwritten), or not empty (unless overwrite, or resume and it holds only checkpoints)."""
    return check_output_folder(
        out, overwrite=overwrite, sources=sources, keep=(CHECKPOINTS,) if resume else (), what="the training output"
    )


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder under output_dir/checkpoints, or None."""
    folder = Path(output_dir) / CHECKPOINTS
    found = sorted(folder.glob("step-*")) if folder.is_dir() else []
    found = [f for f in found if (f / STATE_NAME).exists()]
    return found[-1] if found else None


class _FunctionLoss(nn.Module):
    """A loss function as a module that holds the parameters it trains, so that DDP can wrap it."""

    def __init__(self, fn: Callable[[Any], Any], params: list[nn.Parameter]):
        super().__init__()
        self.fn = fn
        self.trained = nn.ParameterList(params)

    def forward(self, batch: Any) -> Any:
        return self.fn(batch)


def _rows(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return _rows(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _rows(batch[0])
    raise TypeError(f"cannot count the rows of a batch of type {type(batch).__name__}")


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + step * 104_729) % (2**63 - 1)


def _save_checkpoint(out: Path, params: list[nn.Parameter], optimizer, scheduler, state: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    target = out / CHECKPOINTS / f"step-{state['global_step']:07d}"
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_file({str(i): p.detach().contiguous().cpu() for i, p in enumerate(params)}, str(tmp / PARAMS_NAME))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_NAME)
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_params(ckpt: Path, params: list[nn.Parameter]) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / PARAMS_NAME))
    if len(saved) != len(params):
        raise ValueError(f"checkpoint {ckpt} holds {len(saved)} trained tensors, this run trains {len(params)}")
    with torch.no_grad():
        for i, p in enumerate(params):
            if saved[str(i)].shape != p.shape:
                raise ValueError(f"checkpoint {ckpt}: tensor {i} is {tuple(saved[str(i)].shape)}, not {tuple(p.shape)}")
            p.copy_(saved[str(i)])


class RunKwargs(TypedDict, total=False):
    """Where a training run writes and how it is checkpointed, resumed and shown: the keyword arguments every trainer
    (`train_exits`, `train_decoder_exits`, `train_skipdecode`, ...) hands on to the loop unchanged.

    output_dir: the main process writes the trainer's files there, atomically, at the end (None: nothing written).
    checkpoint_every: optimizer steps between checkpoints in output_dir/checkpoints/step-N (0: none).
    resume: go on from the newest checkpoint in output_dir. overwrite: replace a non-empty output_dir at the end.
    progress: a progress bar on the main process.
    """

    output_dir: str | os.PathLike | None
    checkpoint_every: int
    resume: bool
    overwrite: bool
    progress: bool


def train(
    loss: Loss,
    params: Sequence[nn.Parameter] | Sequence[dict[str, Any]],
    data: Any,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    **kwargs: Any,
) -> TrainRun:
    """Train `params` to lower `loss` over `data` (one stage); see `train_stages` for the keyword arguments."""
    return train_stages([TrainStage(loss, params, epochs=epochs, lr=lr)], data, **kwargs)


def train_stages(
    stages: Sequence[TrainStage],
    data: Any,
    *,
    collate: Callable[[list[Any]], Any] | None = None,
    batch_size: int = 8,
    warmup: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    save: Saver | Sequence[Saver] | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    fingerprint: dict[str, Any] | None = None,
    frozen: Sequence[nn.Module] = (),
    train_mode: bool = True,
    find_unused_parameters: bool = False,
    progress: bool = True,
    desc: str = "train",
    on_step: Callable[[int, int], None] | None = None,
) -> TrainRun:
    """Run `stages` in order over `data` (a torch Dataset, or a tensor whose rows are the examples, batched by
    `collate`), through Accelerate; parameters change in place. Returns the run's record.

    batch_size is per process. warmup: the share of a stage's steps with a rising learning rate. While a stage runs,
    only its parameters require gradients (every flag and train/eval mode comes back as it was); the loss modules are
    in train mode (eval mode when train_mode=False: no dropout). frozen: modules the loss uses but that are not its
    registered submodules (a teacher): moved to the device, in eval mode, without gradients, not wrapped by DDP.
    output_dir: an existing non-empty folder is refused before any training unless overwrite (replace it at the end)
    or resume (go on from its newest checkpoint; `fingerprint`, e.g. the recipe name, must match the one saved); the
    folder a model in the loss was loaded from is never written. At the end the main process fills a temporary folder
    with `save` (one saver or a list, each called as saver(folder, run); default: the run as train_log.json), moves
    the checkpoints in and swaps it in (depthprune.fsutil.atomic_folder); the folder exists, empty, when savers run.
    on_step(step, total): called before each batch with the optimizer steps this stage has done and its total (a
    curriculum that depends on the training progress; a resumed run gets the same values).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from depthprune.fsutil import atomic_folder

    stages = list(stages)
    if not stages:
        raise ValueError("no training stages")
    if batch_size < 1 or checkpoint_every < 0 or not 0 <= warmup <= 1:
        raise ValueError(
            f"batch_size must be >= 1, checkpoint_every >= 0 and warmup in [0, 1], got {batch_size}, "
            f"{checkpoint_every}, {warmup}"
        )
    out = Path(output_dir).expanduser().resolve() if output_dir is not None else None
    if (checkpoint_every or resume) and out is None:
        raise ValueError("checkpoints and resume need an output_dir")
    modules = [s.loss if isinstance(s.loss, nn.Module) else _FunctionLoss(s.loss, s.parameters()) for s in stages]
    if out is not None:
        sources = [model_source(m) for m in [*modules, *frozen]]
        check_output_dir(out, overwrite=overwrite, resume=resume, sources=sources)
    if len(data) == 0:
        raise ValueError("no training examples")

    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    accelerator = Accelerator(cpu=no_accelerator(), kwargs_handlers=[ddp])
    set_seed(seed)
    device = accelerator.device
    trained = list({id(p): p for s in stages for p in s.parameters()}.values())  # what checkpoints hold
    watched = list({id(p): p for m in modules for p in m.parameters()}.values())  # what checksums sum
    everything = {id(p): p for m in [*modules, *frozen] for p in m.parameters()}
    flags = {i: p.requires_grad for i, p in everything.items()}
    modes = {m: m.training for root in [*modules, *frozen] for m in root.modules()}

    start: dict[str, Any] = {"stage": 0, "epoch": 0, "batch": 0, "global_step": 0, "samples": 0}
    start.update(history=[], epoch_losses=[], fingerprint=fingerprint)
    ckpt = latest_checkpoint(out) if resume and out is not None else None
    if ckpt is not None:
        saved = json.loads((ckpt / STATE_NAME).read_text())
        if saved.get("fingerprint") != fingerprint:
            raise ValueError(f"checkpoint {ckpt} is from a run of {saved.get('fingerprint')}, not {fingerprint}")
        start.update(saved)
        _load_params(ckpt, trained)
    history: list[dict[str, Any]] = list(start["history"])
    epoch_losses: list[dict[str, Any]] = list(start["epoch_losses"])
    global_step = int(start["global_step"])
    samples = int(start["samples"])
    for m in frozen:
        m.to(device)
        m.eval()
    t0 = time.perf_counter()
    try:
        for s, (stage, module) in enumerate(zip(stages, modules, strict=True)):
            if s < start["stage"] or stage.epochs == 0:
                continue
            for p in everything.values():
                p.requires_grad_(False)
            for p in stage.parameters():
                p.requires_grad_(True)
            module.train(train_mode)
            optimizer = torch.optim.AdamW(stage.groups(), lr=stage.lr, weight_decay=weight_decay)
            wrapped, optimizer = accelerator.prepare(module, optimizer)
            loaders = []
            for epoch in range(stage.epochs):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + s * 1009 + epoch)
                loader = torch.utils.data.DataLoader(
                    data, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate
                )
                loaders.append(accelerator.prepare(loader))
            total = sum(len(dl) for dl in loaders)
            scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(warmup * total), max(total, 1))
            resuming = ckpt is not None and s == start["stage"]
            if resuming:
                saved = torch.load(ckpt / OPTIMIZER_NAME, weights_only=False)
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
            label = desc if len(stages) == 1 else f"{desc} [{stage.name}]"
            for epoch, loader in enumerate(loaders):
                skip = 0
                if resuming and epoch < start["epoch"]:
                    continue
                if resuming and epoch == start["epoch"]:
                    skip = int(start["batch"])
                batches = accelerator.skip_first_batches(loader, skip) if skip else loader
                bar = tqdm(
                    batches,
                    total=len(loader) - skip,
                    desc=f"{label} epoch {epoch + 1}/{stage.epochs}",
                    disable=not (progress and accelerator.is_main_process),
                )
                sums: torch.Tensor | None = None  # [steps, loss, *metrics flattened]
                shapes: dict[str, torch.Size] = {}
                steps = 0
                if skip and start.get("partial"):  # the part of this epoch done before the checkpoint
                    partial = start["partial"]
                    steps = int(partial["steps"])
                    shapes = {k: torch.Size(v) for k, v in partial["shapes"].items()}
                    sums = torch.tensor(partial["sums"], dtype=torch.float64, device=device)
                    if not accelerator.is_main_process:  # the saved sums are over all processes already
                        sums = torch.zeros_like(sums)
                for b, batch in enumerate(bar, start=skip):
                    torch.manual_seed(_step_seed(seed, accelerator.process_index, global_step))
                    if on_step is not None:
                        on_step(sum(len(dl) for dl in loaders[:epoch]) + b, total)
                    output = wrapped(batch)
                    parts = output if isinstance(output, dict) else {"loss": output}
                    accelerator.backward(parts["loss"])
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    global_step += 1
                    steps += 1
                    samples += _rows(batch)
                    value = float(parts["loss"].detach())
                    metrics = {k: v.detach().double().reshape(-1) for k, v in parts.items() if k != "loss"}
                    shapes = {k: torch.as_tensor(v).shape for k, v in parts.items() if k != "loss"}
                    row = torch.cat([torch.tensor([1.0, value], dtype=torch.float64, device=device), *metrics.values()])
                    sums = row if sums is None else sums + row
                    history.append({"stage": stage.name, "epoch": epoch, "step": global_step, "loss": value})
                    bar.set_postfix(loss=f"{value:.4f}")
                    if checkpoint_every and global_step % checkpoint_every == 0:
                        partial = {
                            "steps": steps,
                            "shapes": {k: list(v) for k, v in shapes.items()},
                            "sums": accelerator.reduce(sums.clone(), reduction="sum").tolist(),
                        }
                        state = {
                            "fingerprint": fingerprint, "stage": s, "epoch": epoch, "batch": b + 1,
                            "global_step": global_step, "samples": samples, "history": history,
                            "epoch_losses": epoch_losses, "partial": partial,
                        }  # fmt: skip
                        if accelerator.is_main_process:
                            _save_checkpoint(out, trained, optimizer, scheduler, state)
                        accelerator.wait_for_everyone()
                bar.close()
                if sums is None:  # a process with no batch this epoch (or an epoch a resumed run found done)
                    sums = torch.zeros(2 + sum(math.prod(v) for v in shapes.values()), dtype=torch.float64)
                    sums = sums.to(device)
                sums = accelerator.reduce(sums, reduction="sum")
                total_steps = float(sums[0])
                if total_steps > 0:
                    means = (sums / total_steps).tolist()
                    entry = {"stage": stage.name, "epoch": epoch, "steps": steps, "total_steps": int(total_steps)}
                    entry["loss"] = means[1]
                    entry["metrics"], at = {}, 2
                    for name, shape in shapes.items():
                        n = math.prod(shape)
                        entry["metrics"][name] = means[at] if len(shape) == 0 else means[at : at + n]
                        at += n
                    epoch_losses.append(entry)
            del wrapped
            accelerator.free_memory()  # drop this stage's DDP wrapper and optimizer before the next stage
    finally:
        for i, p in everything.items():
            p.requires_grad_(flags[i])
        for m, mode in modes.items():
            m.train(mode)
    seconds = time.perf_counter() - t0

    def everyone(value: float) -> list[float]:
        gathered = accelerator.gather(torch.tensor([value], dtype=torch.float64, device=device))
        return [float(v) for v in gathered.cpu()]

    with torch.no_grad():
        checksum = float(sum((p.double().sum() for p in watched), torch.zeros((), dtype=torch.float64)))
    run = TrainRun(
        stages=[s.name for s in stages],
        num_processes=accelerator.num_processes,
        global_step=global_step,
        samples_per_rank=[int(v) for v in everyone(samples)],
        checksums=everyone(checksum),
        history=history,
        epoch_losses=epoch_losses,
        train_seconds=round(seconds, 2),
        output_dir=str(out) if out is not None else None,
    )
    if out is not None:
        if accelerator.is_main_process:
            savers = [save] if callable(save) else list(save or [_save_log])
            with atomic_folder(out) as tmp:
                tmp.mkdir()
                for saver in savers:
                    saver(tmp, run)
                if (out / CHECKPOINTS).is_dir():
                    os.replace(out / CHECKPOINTS, tmp / CHECKPOINTS)
        accelerator.wait_for_everyone()
    return run


def _save_log(folder: Path, run: TrainRun) -> None:
    (folder / "train_log.json").write_text(json.dumps(run.to_dict(), indent=1))


__all__ = [
    "TrainRun",
    "TrainStage",
    "check_output_dir",
    "check_token_blocks",
    "latest_checkpoint",
    "model_source",
    "no_accelerator",
    "train",
    "train_stages",
]
