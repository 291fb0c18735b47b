"""Healing after static depth pruning: a method takes the untouched model, a plan and calibration batches and returns
a new model of the same class running the plan, repaired. One file per method, registered by name in
`depthprune.registry.HEALERS` (`fold`: training-free linear fold; `replace`: one trained layer per removed run;
`distill`: LoRA distillation); third parties add theirs with `register_healer`.

Methods chain with `+`: `heal(model, plan, batches, "fold+distill")` folds, then distils starting from the folded
model (a later stage names `start=` in its signature: the model the earlier stages made; the teacher stays the
untouched model).
In a chain every option names its stage: `**{"distill.max_tokens": 65536, "fold.loss": "cosine"}`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from depthprune.plan import LayerPlan
from depthprune.registry import HEALERS


def list_healers() -> list[str]:
    """The registered healing methods' names."""
    return HEALERS.names()


def get_healer(name: str) -> Any:
    """The healer registered as `name`: `(model, plan, batches, *, progress=False, **options) -> nn.Module`."""
    return HEALERS.get(name)


def check_options(
    name: str, function: Callable[..., Any], options: Mapping[str, Any], extra: Iterable[str] = ()
) -> None:
    """Refuse options `function` (a healer's main function) does not take, naming the ones it does (`extra`: more
    accepted keys, e.g. the training loop's keyword arguments that `**run_kwargs` hands on)."""
    params = inspect.signature(function).parameters.values()
    skip = {"model", "plan", "batches"}
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    accepted = {p.name for p in params if p.kind in kinds and p.name not in skip} | set(extra)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"healer {name!r} has no option(s) {unknown}; it takes: {', '.join(sorted(accepted))}")


RECORD_KEY = "depthprune_healing"


def _takes_start(healer: Callable[..., Any]) -> bool:
    """Whether `healer` names `start=` (a model an earlier stage made) in its signature (or in the signature of the
    function it forwards to, `healer.__wrapped__`): the contract for a healer that can follow another stage."""
    return "start" in inspect.signature(healer).parameters


def stage_options(method: str, options: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """[(healer name, its options)] of `method` ("fold" or a chain "fold+distill"); in a chain each option key is
    "stage.key". Checks the names against the registry and the keys against the stages, with clear errors."""
    names = [name.strip() for name in method.split("+")]
    if not all(names):
        raise ValueError(f"healing method {method!r}: empty stage name (write e.g. 'fold' or 'fold+distill')")
    if len(set(names)) != len(names):
        raise ValueError(f"healing method {method!r} names a stage twice")
    for name in names:
        HEALERS.check(name)
    for name in names[1:]:
        if not _takes_start(get_healer(name)):
            raise ValueError(
                f"healing method {name!r} cannot follow another stage in {method!r} (it takes no start= model); "
                "put it first"
            )
    if len(names) == 1:
        return [(names[0], dict(options))]
    per_stage: dict[str, dict[str, Any]] = {name: {} for name in names}
    for key, value in options.items():
        stage, dot, option = key.partition(".")
        if not dot or stage not in per_stage:
            raise ValueError(
                f"option {key!r}: in the chain {method!r} every option names its stage, e.g. "
                f"'{names[-1]}.{key.rpartition('.')[2]}' (stages: {', '.join(names)})"
            )
        per_stage[stage][option] = value
    return list(per_stage.items())


def heal(
    model: nn.Module,
    plan: LayerPlan | str,
    batches: Sequence[torch.Tensor],
    method: str = "fold",
    *,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """A new model running `plan` on `model`'s layers, healed by `method` on `batches` (one healer, or a chain
    "a+b": b starts from a's model); `model` is untouched."""
    stages = stage_options(method, options)
    healed: nn.Module | None = None
    records = []
    for name, opts in stages:
        healer = get_healer(name)
        if healed is not None:
            opts = {**opts, "start": healed}
        healed = healer(model, plan, batches, progress=progress, **opts)
        records.append(getattr(healed.config, RECORD_KEY, None) or {"method": name})
    if len(stages) > 1:
        setattr(healed.config, RECORD_KEY, {"method": method, "stages": records})
    return healed


__all__ = ["check_options", "get_healer", "heal", "list_healers", "stage_options"]
