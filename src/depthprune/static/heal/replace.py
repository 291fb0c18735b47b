"""Healing by a replacement layer (LLM-Streamline-style): each removed run of layers becomes ONE layer, trained to map
the run's input hidden state to its output.

For every contiguous removed run [i, j) of a stack the healed model keeps one layer of the run, the *init layer* k,
in its own slot (the plan that keeps k, so its index attributes, the config depth fields and its `layer_types` entry
stay its own: a sliding-window layer stays sliding, a global one global, whatever its neighbours in the run were).
That layer is trained, every other weight frozen, so that from the run's input h_i it gives the untouched model's
h_j: MSE on hidden states (`loss="cosine"`: 1 - cosine similarity per token). A run at the end of a stack has as its
target the stack's last hidden state before the final norm; a run at the start reads the embedding output.

init: "first" (default) is LLM-Streamline's choice: its replacement layer starts from the parameters of the first
layer of the pruned run (ShortGPT replaces nothing). That layer already reads h_i, so its input statistics (and its
norms' scales) match from the first step. "last" starts from layer j-1, whose output statistics match h_j; an int
is a position inside every run (0 = first, -1 = last); a list gives one source layer index per run, in order.

Runs are fitted in order along the stack (`sequential=True`, like the fold): the input h_i of a later run comes from
the model healed so far (earlier replacements trained), the target h_j from the untouched model, so each layer also
corrects what earlier runs left. `sequential=False` takes h_i from the untouched model for every run.

Activations are STREAMED: h_i and h_j of a batch are computed under no_grad by the runner (`capture_stack` +
`StackCall.run`) when the batch is first needed, and kept in a cache bounded by `cache_mb` (pairs of calibration
blocks, filled in block order until the bound; blocks beyond it are recomputed each time they are trained on). A
block the run before (same stack) holds in its cache continues from that run's (h_i, h_j), so only the layers
between the two runs run; that cache is dropped once the next run's first pass is done, so memory stays under
2 x cache_mb plus one batch. The default (512 MiB) holds 96 x 256 tokens of a 576-wide model with room to spare;
`cache_mb=0` recomputes every batch from the embedding: memory is one batch of activations whatever the
calibration size (LLM-Streamline's issue #5 is the OOM of materialising every hidden state at once). The first pass
over the blocks (mse_before) is what fills the cache, so the training epochs cost one layer each per step.

Training goes through `depthprune.training.train`, one call per run (AdamW at lr 1e-3 by default: on SmolLM2 1e-4
barely moved the MSE in a calibration-sized budget; warm-up then linear decay, seeds, progress; `max_tokens` caps
each run's training tokens like distill's budget). With `output_dir` each run writes its own folder
`run-<stack>-<i>-<j>` (checkpoints, the trained layer, its record); `resume=True` loads the runs already finished
and goes on from the newest checkpoint of the one that was interrupted.

The healed model keeps (kept + number of runs) layers: compare it with plain removal at the same executed depth.
Stacks the runner cannot run layer by layer (T5's relative position bias) and adapters whose layers share weights
(ALBERT's groups) are refused. The input model is never modified.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from depthprune.adapters.base import StackSpec
from depthprune.adapters.registry import get_adapter
from depthprune.fsutil import check_output_folder
from depthprune.plan import LayerPlan
from depthprune.runner import capture_stack
from depthprune.static.apply import apply_plan
from depthprune.static.heal import check_options
from depthprune.static.heal.fold import removed_runs
from depthprune.static.scorers.hidden import Target, as_batches, eval_mode, model_inputs, runner_serves
from depthprune.training import RunKwargs, model_source, train

if TYPE_CHECKING:
    from typing_extensions import Unpack

NAME = "replace"
LOSSES = ("mse", "cosine")
INITS = ("first", "last")
RECORD_KEY = "depthprune_healing"
LAYER_FILE = "layer.safetensors"
RUN_FILE = "replacement.json"


@dataclasses.dataclass
class Replacement:
    """One removed run [start, stop) of `stack`, replaced by source layer `init_layer` (at `position` of the healed
    stack) trained on `tokens` tokens in `steps` steps. mse_before / mse_after: mean squared error of that layer's
    output against the untouched model's h_stop over every calibration token, at init and after training."""

    stack: str
    start: int
    stop: int
    init_layer: int
    position: int
    layer_type: str | None
    mse_before: float
    mse_after: float
    tokens: int
    steps: int
    train_seconds: float
    history: list[float] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "removed": [self.start, self.stop],
            "init_layer": self.init_layer,
            "position": self.position,
            "layer_type": self.layer_type,
            "mse_before": self.mse_before,
            "mse_after": self.mse_after,
            "tokens": self.tokens,
            "steps": self.steps,
            "train_seconds": self.train_seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Replacement:
        start, stop = data["removed"]
        fields = {k: v for k, v in data.items() if k != "removed"}
        return cls(start=start, stop=stop, **fields)


@dataclasses.dataclass
class ReplaceResult:
    """What a replacement healing did. plan: the removal plan given; executed_plan: the plan the healed model runs
    (the kept layers plus each run's init layer, in its own slot). model: the healed model (not in to_dict)."""

    plan: str
    executed_plan: str
    init: Any
    loss: str
    sequential: bool
    epochs: int
    lr: float
    batch_size: int
    seed: int
    max_tokens: int | None
    cache_mb: float
    replacements: list[Replacement]
    layers: dict[str, int]  # layers each stack of the healed model runs: kept + one per removed run
    output_dir: str | None = None
    model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        out["replacements"] = [r.to_dict() for r in self.replacements]
        return out


@dataclasses.dataclass(frozen=True)
class Job:
    """One run to replace: stack, removed [start, stop), the source layer kept in its place and that layer's
    position in the healed stack."""

    spec: StackSpec
    start: int
    stop: int
    init_layer: int
    position: int

    @property
    def folder(self) -> str:
        return f"run-{self.spec.name}-{self.start}-{self.stop}"


def _init_layers(init: Any, runs: list[tuple[str, int, int]]) -> list[int]:
    """The source layer each run [i, j) starts from (see the module docstring for what `init` may be)."""
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(f"replace: init must be one of {INITS}, a position in the run or a list; got {init!r}")
        return [i if init == "first" else j - 1 for _, i, j in runs]
    if isinstance(init, bool) or not isinstance(init, (int, list, tuple)):
        raise ValueError(f"replace: init must be 'first', 'last', an int or a list of ints, got {init!r}")
    if isinstance(init, int):
        for stack, i, j in runs:
            if not -(j - i) <= init < j - i:
                raise ValueError(
                    f"replace: init={init} is a position inside each run, but run {i}-{j - 1} of stack {stack!r} has "
                    f"{j - i} layer(s) (valid: {-(j - i)} to {j - i - 1})"
                )
        return [range(i, j)[init] for _, i, j in runs]
    chosen = list(init)
    if len(chosen) != len(runs):
        raise ValueError(
            f"replace: init lists {len(chosen)} layer(s), but the plan removes {len(runs)} run(s) "
            f"{[f'{s}:{i}-{j - 1}' for s, i, j in runs]}; give one source layer index per run"
        )
    for k, (stack, i, j) in zip(chosen, runs, strict=True):
        if isinstance(k, bool) or not isinstance(k, int) or not i <= k < j:
            raise ValueError(f"replace: init layer {k!r} is not in the removed run {i}-{j - 1} of stack {stack!r}")
    return chosen


def replacement_plan(model: nn.Module, plan: LayerPlan | str, init: Any = "first") -> tuple[LayerPlan, list[Job]]:
    """(the plan the healed model runs: `plan`'s layers plus one init layer per removed run, the jobs), checked:
    a clear ValueError for a plan that reorders or repeats layers, removes nothing, or an init that does not fit."""
    if isinstance(plan, str):
        plan = LayerPlan.parse(plan)
    adapter = get_adapter(model)
    sizes = adapter.num_layers(model)
    plan = plan.resolve(sizes)
    found: list[tuple[StackSpec, int, int]] = []
    for spec in adapter.present_stacks(model):
        layers = list(plan.stacks[spec.name])
        if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
            raise ValueError(
                f"replace heals plans that only remove layers (indices strictly increasing); stack {spec.name!r} of "
                f"{plan.to_text()} reorders or repeats layers, so a removed run has no single input and output"
            )
        found += [(spec, i, j) for i, j in removed_runs(layers, sizes[spec.name])]
    if not found:
        raise ValueError(f"replace: the plan {plan.to_text()} removes no layer; there is nothing to heal")
    if adapter.apply_stack is not None:
        raise ValueError(
            f"replace trains one layer's own weights; the {adapter.family} family shares weights between layers "
            "(its adapter rearranges groups), so a replacement layer cannot be trained alone"
        )
    for spec, *_ in found:
        if not runner_serves(model, Target(adapter, spec, sizes[spec.name])):
            raise ValueError(
                f"replace runs a stack layer by layer; stack {spec.name!r} of {type(model).__name__} hands a relative "
                "position bias from its first block to the others (T5), which the runner cannot reproduce"
            )
    inits = _init_layers(init, [(spec.name, i, j) for spec, i, j in found])
    stacks = {name: list(layers) for name, layers in plan.stacks.items()}
    for (spec, _, _), k in zip(found, inits, strict=True):
        stacks[spec.name] = sorted([*stacks[spec.name], k])
    executed = LayerPlan(stacks)
    jobs = [
        Job(spec, i, j, k, executed.stacks[spec.name].index(k)) for (spec, i, j), k in zip(found, inits, strict=True)
    ]
    return executed, jobs


class _Pairs:
    """(h_i, h_j) of calibration blocks for one run: computed under no_grad by the runner when asked for, kept for
    the first blocks up to `budget` bytes, recomputed for the others. h_i comes from `source` (the healed model so
    far, or the untouched one), h_j always from the untouched `model`. With `previous` (the pairs of the run before,
    in the same stack), a block it holds continues from its (h_i, h_j) instead of from the embedding: only the layers
    between the two runs run."""

    def __init__(
        self, model: nn.Module, source: nn.Module, job: Job, blocks: torch.Tensor, budget: float, previous=None
    ):
        self.model, self.source, self.job, self.blocks = model, source, job, blocks
        self.budget = budget
        self.previous: _Pairs | None = previous if previous is not None and previous.job.spec == job.spec else None
        self.used = 0
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _compute(self, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        job, ids, prev = self.job, self.blocks[keys], self.previous
        sequential = self.source is not self.model
        hidden, call = capture_stack(self.model, model_inputs(self.model, ids), stack=job.spec)
        if prev is not None and all(k in prev.cache for k in keys):
            p_in = torch.stack([prev.cache[k][0] for k in keys]).to(hidden.device)  # [m, seq, hidden]
            p_out = torch.stack([prev.cache[k][1] for k in keys]).to(hidden.device)
            if sequential:  # h_j on from the run before's h_j; h_i on from its h_i through the healed layers between
                target = call.run(p_out, prev.job.stop, job.stop)
                _, own = capture_stack(self.source, model_inputs(self.source, ids), stack=job.spec)
                return own.run(p_in, prev.job.position, job.position), target
            h_in = call.run(p_out, prev.job.stop, job.start)
            return h_in, call.run(h_in, job.start, job.stop)
        h_in = call.run(hidden, 0, job.start)  # [m, seq, hidden] the untouched model's h_i
        target = call.run(h_in, job.start, job.stop)  # [m, seq, hidden] the untouched model's h_j
        if sequential:
            hidden, own = capture_stack(self.source, model_inputs(self.source, ids), stack=job.spec)
            h_in = own.run(hidden, 0, job.position)  # the healed-so-far model's h_i
        return h_in, target

    @torch.no_grad()
    def get(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_i, h_j) [len(rows), seq, hidden] of the calibration blocks `rows`."""
        keys = [int(r) for r in rows]
        missing = [k for k in keys if k not in self.cache]
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        prev = self.previous.cache if self.previous is not None else {}
        for group in ([k for k in missing if k in prev], [k for k in missing if k not in prev]):
            if not group:
                continue
            h_in, target = self._compute(group)
            for n, k in enumerate(group):
                fresh[k] = (h_in[n], target[n])
                size = (h_in[n].numel() + target[n].numel()) * h_in.element_size()
                if self.used + size <= self.budget:
                    self.cache[k] = (h_in[n].clone(), target[n].clone())
                    self.used += size
        pairs = [self.cache.get(k) or fresh[k] for k in keys]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class _ReplaceLoss(nn.Module):
    """The trained layer plus its loss on a batch of calibration block indices, as one module DDP can wrap; the
    models that give the layer's arguments and activations are held outside the module tree."""

    def __init__(self, layer: nn.Module, healed: nn.Module, pairs: _Pairs, loss: str):
        super().__init__()
        self.layer = layer
        self._outside = [healed, pairs]  # not submodules: frozen, never wrapped or trained
        self.loss = loss

    def predict(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        healed, pairs = self._outside
        h_in, target = pairs.get(rows)
        device = next(self.layer.parameters()).device
        h_in, target = h_in.to(device), target.to(device)  # a cache filled before the loop moved the models
        with torch.no_grad():  # the layer's own arguments (mask, positions) for these blocks; no layer runs
            _, call = capture_stack(healed, model_inputs(healed, pairs.blocks[rows]), stack=pairs.job.spec)
        return call.calls[pairs.job.position].run(self.layer, h_in), target  # [b, seq, hidden] twice

    def forward(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        pred, target = self.predict(rows.cpu())
        mse = (pred.float() - target.float()).pow(2).mean()
        if self.loss == "mse":
            return {"loss": mse, "mse": mse.detach()}
        cosine = 1 - nn.functional.cosine_similarity(pred.float(), target.float(), dim=-1).mean()  # per token
        return {"loss": cosine, "mse": mse.detach()}


@torch.no_grad()
def _mean_mse(loss: _ReplaceLoss, n_blocks: int, batch_size: int) -> float:
    total, count = 0.0, 0
    for at in range(0, n_blocks, batch_size):
        rows = torch.arange(at, min(at + batch_size, n_blocks))
        pred, target = loss.predict(rows)
        total += float((pred.double() - target.double()).pow(2).sum())
        count += target.numel()
    return total / count


def _blocks(batches: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    batches = as_batches(batches, NAME)
    if len({b.shape[1] for b in batches}) != 1:
        raise ValueError(
            f"replace: calibration batches must share one seq length, got shapes {[tuple(b.shape) for b in batches]}"
        )
    return torch.cat([b.cpu() for b in batches])  # [n_blocks, seq]


def _budget(n: int, seq: int, epochs: int, max_tokens: int | None, seed: int) -> tuple[torch.Tensor, int]:
    """(training rows: block indices, epochs for the loop): every block `epochs` times, or, when max_tokens stops
    earlier, that many tokens' worth of whole blocks in one pass (seeded)."""
    rows = torch.arange(n)
    if max_tokens is None or max_tokens >= epochs * n * seq:
        return rows, epochs
    if max_tokens < seq:
        raise ValueError(f"replace: max_tokens={max_tokens} is less than one calibration block ({seq} tokens)")
    count = max_tokens // seq
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(count / n))])[:count], 1


def _finish(record: Replacement, run: Any, module: _ReplaceLoss, blocks: torch.Tensor, batch_size: int) -> None:
    """Fill `record` from a finished training run: steps, tokens, time, loss history and the MSE after training."""
    record.steps, record.train_seconds = run.global_step, run.train_seconds
    record.tokens = sum(run.samples_per_rank) * int(blocks.shape[1])
    record.history = [h["loss"] for h in run.history]
    record.mse_after = _mean_mse(module, blocks.shape[0], batch_size)


def _layer_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items()}


def replace_heal(
    model: nn.Module,
    plan: LayerPlan | str,
    batches: Sequence[torch.Tensor] | torch.Tensor,
    *,
    init: str | int | Sequence[int] = "first",
    loss: str = "mse",
    sequential: bool = True,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 4,
    seed: int = 0,
    max_tokens: int | None = None,
    warmup: float = 0.1,
    weight_decay: float = 0.0,
    cache_mb: float = 512.0,
    **run_kwargs: Unpack[RunKwargs],
) -> ReplaceResult:
    """Prune a copy of `model` by `plan`, putting one trained layer in the place of each removed run (module
    docstring); return the result with the healed model (same class as `model`). `model` is never modified."""
    if loss not in LOSSES:
        raise ValueError(f"replace: loss must be one of {LOSSES}, got {loss!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"replace: need epochs >= 0, batch_size >= 1 and lr > 0; got {epochs}, {batch_size}, {lr}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"replace: max_tokens must be a positive token count or None, got {max_tokens!r}")
    if not cache_mb >= 0:
        raise ValueError(f"replace: cache_mb must be >= 0 (0: recompute every batch), got {cache_mb!r}")
    blocks = _blocks(batches)
    if isinstance(plan, str):
        plan = LayerPlan.parse(plan)
    executed, jobs = replacement_plan(model, plan, init)
    removal = plan.resolve(get_adapter(model).num_layers(model))
    data, loop_epochs = _budget(blocks.shape[0], blocks.shape[1], epochs, max_tokens, seed)

    output_dir = run_kwargs.pop("output_dir", None)
    resume = bool(run_kwargs.get("resume", False))
    out = None
    if output_dir is not None:  # checked before anything slow runs; each run's own folder is checked by the loop
        out = check_output_folder(
            output_dir,
            overwrite=bool(run_kwargs.get("overwrite", False)),
            sources=[model_source(model)],
            keep=[job.folder for job in jobs] if resume else (),
            what="the healing output",
        )

    healed = apply_plan(model, executed)
    source_of_inputs = healed if sequential else model
    adapter = get_adapter(healed)
    replacements: list[Replacement] = []
    previous: _Pairs | None = None
    settings = {"init": init if isinstance(init, (str, int)) else list(init), "loss": loss, "sequential": sequential}
    with eval_mode(model), eval_mode(healed):
        for job in jobs:
            layer = adapter.layers(healed, job.spec)[job.position]
            pairs = _Pairs(model, source_of_inputs, job, blocks, cache_mb * 2**20, previous)
            module = _ReplaceLoss(layer, healed, pairs, loss)
            fingerprint = {
                "healer": NAME, "plan": removal.to_text(), "run": [job.spec.name, job.start, job.stop],
                "init_layer": job.init_layer, "loss": loss, "sequential": sequential, "max_tokens": max_tokens,
                "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
            }  # fmt: skip
            folder = out / job.folder if out is not None else None
            done = _finished(folder, fingerprint) if resume and folder is not None else None
            if done is not None:
                from safetensors.torch import load_file

                with torch.no_grad():
                    layer.load_state_dict(load_file(str(folder / LAYER_FILE)))
                replacements.append(done)
                continue
            layer_type = (adapter.layer_types(model, job.spec) or [None] * job.stop)[job.init_layer]
            mse_before = _mean_mse(module, blocks.shape[0], batch_size)  # also fills the bounded cache
            pairs.previous = previous = None  # the run before's cache has served: one run's cache from here on
            record = Replacement(
                job.spec.name, job.start, job.stop, job.init_layer, job.position, layer_type,
                mse_before, mse_before, 0, 0, 0.0,
            )  # fmt: skip
            if loop_epochs > 0:
                saved: list[bool] = []

                def save(tmp: Path, run, record=record, module=module, fingerprint=fingerprint, saved=saved) -> None:
                    from safetensors.torch import save_file

                    _finish(record, run, module, blocks, batch_size)
                    saved.append(True)
                    save_file(_layer_state(module.layer), str(tmp / LAYER_FILE))
                    (tmp / "train_log.json").write_text(json.dumps(run.to_dict(), indent=1))
                    (tmp / RUN_FILE).write_text(json.dumps({"fingerprint": fingerprint, **record.to_dict()}, indent=1))

                run = train(
                    module,
                    list(layer.parameters()),
                    data,
                    epochs=loop_epochs,
                    lr=lr,
                    warmup=warmup,
                    weight_decay=weight_decay,
                    batch_size=batch_size,
                    seed=seed,
                    train_mode=False,  # eval mode: no dropout
                    frozen=[model, healed],
                    fingerprint=fingerprint,
                    desc=f"{NAME} {job.spec.name} {job.start}-{job.stop - 1}",
                    output_dir=folder,
                    save=save,
                    **run_kwargs,
                )
                if not saved:  # the saver did not run (no output folder, or not the main process)
                    _finish(record, run, module, blocks, batch_size)
            replacements.append(record)
            previous = pairs
    healed.eval()
    setattr(
        healed.config,
        RECORD_KEY,
        {"method": NAME, **settings, "replacements": [r.to_dict() for r in replacements]},
    )
    return ReplaceResult(
        plan=removal.to_text(),
        executed_plan=executed.to_text(),
        init=settings["init"],
        loss=loss,
        sequential=sequential,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        max_tokens=max_tokens,
        cache_mb=cache_mb,
        replacements=replacements,
        layers=executed.num_layers(),
        output_dir=str(out) if out is not None else None,
        model=healed,
    )


def _finished(folder: Path, fingerprint: dict[str, Any]) -> Replacement | None:
    """The record of a run a previous call finished in `folder` with the same settings, else None."""
    record, weights = folder / RUN_FILE, folder / LAYER_FILE
    if not (record.is_file() and weights.is_file()):
        return None
    data = json.loads(record.read_text())
    if data.pop("fingerprint", None) != fingerprint:
        raise ValueError(f"{folder} holds a replacement trained with other settings ({record}); use a new folder")
    return Replacement.from_dict(data)


def heal(
    model: nn.Module,
    plan: LayerPlan | str,
    batches: Sequence[torch.Tensor] | torch.Tensor,
    *,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """The healer interface: a new model of `model`'s class running `plan`, one trained layer per removed run."""
    check_options(NAME, replace_heal, options, extra=RunKwargs.__annotations__)
    return replace_heal(model, plan, batches, progress=progress, **options).model


# inspect.signature(heal) reads replace_heal's options (a chain checks a later stage takes start= first)
heal.__wrapped__ = replace_heal
HEALER = heal

__all__ = ["HEALER", "Replacement", "ReplaceResult", "heal", "replace_heal", "replacement_plan"]
