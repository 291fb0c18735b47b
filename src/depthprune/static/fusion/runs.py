"""What merging and sharing have in common: runs of layer positions (read, checked against a model), the record a
fused model keeps in its config, and the figures a fused model is reported with (unique parameters, export size).

A run is a pair (first, last) of positions of one stack, both included, as the command line writes it ("10-13").
Positions are those of the model given (for a model made by depthprune, its module list, not the original layers).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from depthprune.adapters.base import Adapter, StackSpec
from depthprune.adapters.registry import get_adapter
from depthprune.io import WEIGHT_FILES
from depthprune.static.apply import source_plan

RECORD_KEY = "depthprune_fusion"
"""The config key under which a merged or shared model records what was fused (its steps, in order)."""

Run = tuple[int, int]

_RUN = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_runs(text: str) -> list[Run]:
    """'10-13,20-22' -> [(10, 13), (20, 22)]; a single 'N' is the run (N, N)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty list of runs; write e.g. '10-13,20-22' (first-last positions, both included)")
    runs = []
    for item in text.replace(" ", "").strip(",").split(","):
        m = _RUN.match(item)
        if not m:
            raise ValueError(
                f"cannot read {item!r} in {text!r}: write each run as 'FIRST-LAST' (e.g. 10-13), comma-separated"
            )
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if b < a:
            raise ValueError(f"run {item!r} goes downwards; write it as {b}-{a}")
        runs.append((a, b))
    return runs


def format_runs(runs: Iterable[Run]) -> str:
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


@dataclasses.dataclass(frozen=True)
class Target:
    """The stack runs are checked against: its adapter, spec and module list."""

    adapter: Adapter
    spec: StackSpec
    layers: list[nn.Module]

    @property
    def name(self) -> str:
        return self.spec.name

    def __len__(self) -> int:
        return len(self.layers)


def resolve_stack(model: nn.Module, stack: str | None, method: str) -> Target:
    """The stack to fuse (default: the model's last one); refuses families whose layers are not one module each."""
    adapter = get_adapter(model)
    spec = adapter.find_stack(model, stack, method)
    if adapter.apply_stack is not None or adapter.layer_sequence is not None or adapter.stack_sizes is not None:
        raise ValueError(
            f"{method}: the {adapter.family} family runs shared layer groups (its layers are not one module each), "
            "so there is no single layer per position to fuse; its layers already share weights by design"
        )
    return Target(adapter, spec, list(adapter.layers(model, spec)))


def _owners(layers: Sequence[nn.Module]) -> dict[int, set[int]]:
    """id(parameter) -> the positions holding it."""
    owners: dict[int, set[int]] = {}
    for pos, layer in enumerate(layers):
        for p in layer.parameters():
            owners.setdefault(id(p), set()).add(pos)
    return owners


def check_runs(model: nn.Module, target: Target, runs: Sequence[Sequence[int]], method: str) -> list[Run]:
    """Validate runs against the stack: integer pairs in range, first <= last, not overlapping, one attention type
    each, the same parameters (names and shapes) at every position of a run, and no position whose weights are also
    run somewhere outside its run (a repeated layer: fusing it would change the other position too). Sorted."""
    n = len(target)
    if isinstance(runs, str):
        runs = parse_runs(runs)
    clean: list[Run] = []
    for run in runs:
        if (
            not isinstance(run, Sequence)
            or len(run) != 2
            or any(isinstance(i, bool) or not isinstance(i, int) for i in run)
        ):
            raise ValueError(f"{method}: a run is a pair (first, last) of layer positions, got {run!r}")
        a, b = run
        if not 0 <= a <= b < n:
            raise ValueError(
                f"{method}: run {a}-{b} is outside stack {target.name!r}, which has positions 0-{n - 1} "
                "(runs are first-last, both included, first <= last)"
            )
        clean.append((a, b))
    if not clean:
        raise ValueError(f"{method}: no runs given; pass e.g. [(10, 13)] (first, last positions, both included)")
    clean.sort()
    for (a, b), (c, d) in zip(clean, clean[1:], strict=False):
        if c <= b:
            raise ValueError(f"{method}: runs {a}-{b} and {c}-{d} overlap; give each position to one run at most")
    types = target.adapter.layer_types(model, target.spec)
    owners = _owners(target.layers)
    for a, b in clean:
        if types is not None and len(set(types[a : b + 1])) > 1:
            mixed = ", ".join(f"{i}: {types[i]}" for i in range(a, b + 1))
            raise ValueError(
                f"{method}: run {a}-{b} mixes attention types ({mixed}); a fused layer runs one attention type, so "
                "give runs of one type only"
            )
        shapes = {k: tuple(p.shape) for k, p in target.layers[a].named_parameters()}
        for i in range(a + 1, b + 1):
            other = {k: tuple(p.shape) for k, p in target.layers[i].named_parameters()}
            if other != shapes:
                diff = sorted(set(shapes.items()) ^ set(other.items()))[:3]
                raise ValueError(
                    f"{method}: layers {a} and {i} do not have the same parameters (differ in {diff}), so they "
                    "cannot be fused into one; choose runs of layers of one shape"
                )
        inside = set(range(a, b + 1))
        for i in range(a, b + 1):
            outside = sorted(set().union(*(owners[id(p)] for p in target.layers[i].parameters())) - inside)
            if outside:
                raise ValueError(
                    f"{method}: position {i} shares its weights with position(s) {outside} outside run {a}-{b} "
                    "(a repeated layer); fusing it would change those too: fuse before repeating layers, or put "
                    "every position that shares them in one run"
                )
    return clean


def fusion_record(model: nn.Module) -> dict[str, Any]:
    """The fusion record of a model (steps applied so far, and which source layers each merged position holds)."""
    record = copy.deepcopy(getattr(model.config, RECORD_KEY, None) or {})  # never an alias of the model's own record
    return {"steps": list(record.get("steps", [])), "merged_layers": dict(record.get("merged_layers", {}))}


def source_layers(model: nn.Module, target: Target) -> list[list[int]]:
    """For each position of the stack, the original source layers its weights hold: the layer the recorded plan
    runs there, or, for a merged or averaged position, every layer fused into it."""
    plan = source_plan(model)
    kept = list(plan.stacks[target.name]) if plan is not None and target.name in plan.stacks else range(len(target))
    fused = fusion_record(model)["merged_layers"].get(target.name, {})
    return [list(fused.get(str(pos), [src])) for pos, src in enumerate(kept)]


def unique_parameters(model: nn.Module) -> int:
    """Number of parameter values the model holds in memory: a tensor shared by several positions counts once."""
    seen: dict[tuple[int, int], int] = {}
    for p in model.parameters():
        seen[(p.data_ptr(), p.numel())] = p.numel()
    return sum(seen.values())


def weights_bytes(folder: str | os.PathLike) -> int:
    """Size on disk of an exported folder's weight files (safetensors shards, or pytorch .bin)."""
    folder = Path(folder)
    stems = {Path(w).name.split(".")[0] for w in WEIGHT_FILES}
    files = [p for p in folder.iterdir() if p.is_file() and p.name.split("-")[0].split(".")[0] in stems]
    return sum(p.stat().st_size for p in files if p.suffix in (".safetensors", ".bin"))
