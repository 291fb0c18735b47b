"""LayerPlan: which source layers run, in what order, how often, for each stack of a model.

A plan is plain data. Dropping a layer leaves its index out, repeating one (the same weights run again) lists it
twice, reordering lists indices out of order. Compact text form, as the CLI takes it:

    0-19,22,24-29          one stack (a decoder-only or encoder-only model)
    0,1,2,2,3              layer 2 runs twice
    5-0                    a descending range: layers 5, 4, ..., 0
    3*4                    layer 3 four times
    encoder=0-5;decoder=0,2,4   several stacks, each named
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from depthprune.errors import PlanError

PLAN_CONFIG_KEY = "depthprune"
"""The key under which a model made by depthprune records its plan in config.json."""

# The stack name a plan parsed from text without names gets; resolved against the model's only stack.
UNNAMED = "*"

_ITEM = re.compile(r"^(\d+)(?:-(\d+)|\*(\d+))?$")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Source layer indices to run, per stack name, in order."""

    stacks: Mapping[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        if not self.stacks:
            raise PlanError("a layer plan needs at least one stack; e.g. LayerPlan({'decoder': (0, 1, 2)})")
        clean: dict[str, tuple[int, ...]] = {}
        for name, layers in self.stacks.items():
            if not isinstance(name, str) or not name:
                raise PlanError(f"stack names are non-empty strings, got {name!r}")
            layers = tuple(layers)
            if not layers:
                raise PlanError(f"the plan for stack {name!r} is empty: a stack needs at least one layer")
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                    raise PlanError(f"layer indices are non-negative integers; stack {name!r} has {i!r}")
            clean[name] = layers
        object.__setattr__(self, "stacks", clean)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> LayerPlan:
        """Parse the compact text form (see the module docstring)."""
        if not isinstance(text, str) or not text.strip():
            raise PlanError("empty layer plan; write e.g. '0-19,22,24-29' or 'encoder=0-5;decoder=0,2,4'")
        stacks: dict[str, tuple[int, ...]] = {}
        parts = [p.strip() for p in text.strip().strip(";").split(";")]
        for part in parts:
            name, sep, body = part.partition("=")
            if not sep:
                name, body = UNNAMED, part
            name = name.strip()
            if name in stacks:
                raise PlanError(f"stack {name!r} appears twice in plan {text!r}")
            if len(parts) > 1 and name == UNNAMED:
                raise PlanError(f"plan {text!r} has several parts: name each one, e.g. 'encoder=0-5;decoder=0-2'")
            stacks[name] = tuple(_parse_layers(body, text))
        return cls(stacks)

    @classmethod
    def identity(cls, sizes: Mapping[str, int]) -> LayerPlan:
        """Every layer once, in order."""
        return cls({name: tuple(range(n)) for name, n in sizes.items()})

    @classmethod
    def drop(cls, sizes: Mapping[str, int], remove: Mapping[str, Iterable[int]] | Iterable[int]) -> LayerPlan:
        """All layers but `remove` (a list for a one-stack model, or a mapping stack -> indices)."""
        if not isinstance(remove, Mapping):
            if len(sizes) != 1:
                raise PlanError(f"the model has stacks {sorted(sizes)}: say which stack to remove layers from")
            remove = {next(iter(sizes)): remove}
        stacks = {}
        for name, n in sizes.items():
            gone = set(remove.get(name, ()))
            bad = sorted(i for i in gone if not 0 <= i < n)
            if bad:
                raise PlanError(f"cannot remove layers {bad} from stack {name!r}, which has layers 0-{n - 1}")
            stacks[name] = tuple(i for i in range(n) if i not in gone)
        unknown = set(remove) - set(sizes)
        if unknown:
            raise PlanError(f"unknown stack(s) {sorted(unknown)}; the model has {sorted(sizes)}")
        return cls(stacks)

    # ---- checks against a model -----------------------------------------------------------------------------------
    def resolve(self, sizes: Mapping[str, int]) -> LayerPlan:
        """Check the plan against a model's stacks (name -> number of source layers) and fill the gaps.

        An unnamed plan goes to the model's only stack; stacks the plan does not mention run unchanged.
        """
        stacks = dict(self.stacks)
        if UNNAMED in stacks:
            if len(sizes) != 1:
                raise PlanError(
                    f"the model has stacks {list(sizes)}: name the stack, e.g. "
                    f"'{list(sizes)[-1]}={_format_layers(stacks[UNNAMED])}'"
                )
            stacks[next(iter(sizes))] = stacks.pop(UNNAMED)
        unknown = [s for s in stacks if s not in sizes]
        if unknown:
            raise PlanError(f"the plan names stack(s) {unknown}, but the model's stacks are {list(sizes)}")
        for name, layers in stacks.items():
            n = sizes[name]
            bad = sorted({i for i in layers if i >= n})
            if bad:
                raise PlanError(
                    f"stack {name!r} has layers 0-{n - 1}, but the plan asks for layer(s) {bad}; "
                    f"layer indices count from 0"
                )
        return LayerPlan({name: stacks.get(name, tuple(range(n))) for name, n in sizes.items()})

    def is_identity(self, sizes: Mapping[str, int]) -> bool:
        return self.resolve(sizes) == LayerPlan.identity(sizes)

    def removed(self, sizes: Mapping[str, int]) -> dict[str, list[int]]:
        """Source layers that the plan never runs, per stack."""
        plan = self.resolve(sizes)
        return {name: sorted(set(range(sizes[name])) - set(layers)) for name, layers in plan.stacks.items()}

    # ---- serialization --------------------------------------------------------------------------------------------
    def to_text(self) -> str:
        if list(self.stacks) == [UNNAMED]:
            return _format_layers(self.stacks[UNNAMED])
        return ";".join(f"{name}={_format_layers(layers)}" for name, layers in self.stacks.items())

    def to_dict(self) -> dict[str, list[int]]:
        return {name: list(layers) for name, layers in self.stacks.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerPlan:
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan dict maps stack names to layer lists, got {type(data).__name__}")
        return cls({k: tuple(v) for k, v in data.items()})

    def __str__(self) -> str:
        return self.to_text()

    def __hash__(self) -> int:  # frozen plain data: usable as a dict key or in a set (the stacks dict is not hashable)
        return hash(frozenset(self.stacks.items()))

    def num_layers(self) -> dict[str, int]:
        return {name: len(layers) for name, layers in self.stacks.items()}


def compose(outer: LayerPlan, inner: LayerPlan) -> LayerPlan:
    """The plan on the original source layers of running `outer` on a model that `inner` produced."""
    stacks = {}
    for name, layers in inner.stacks.items():
        out = outer.stacks.get(name)
        stacks[name] = layers if out is None else tuple(layers[i] for i in out)
    return LayerPlan(stacks)


def _parse_layers(body: str, whole: str) -> list[int]:
    out: list[int] = []
    body = body.strip()
    if not body:
        raise PlanError(f"empty layer list in plan {whole!r}")
    for item in body.split(","):
        item = item.strip().replace(" ", "")
        m = _ITEM.match(item)
        if not m:
            raise PlanError(
                f"cannot read {item!r} in plan {whole!r}: write layers as 'N', a range 'A-B', or a repeat 'N*K', "
                "separated by commas"
            )
        a = int(m.group(1))
        if m.group(2) is not None:
            b = int(m.group(2))
            out.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
        elif m.group(3) is not None:
            k = int(m.group(3))
            if k < 1:
                raise PlanError(f"repeat count in {item!r} must be at least 1")
            out.extend([a] * k)
        else:
            out.append(a)
    return out


def _format_layers(layers: Iterable[int]) -> str:
    """Compact text: ascending runs become ranges 'A-B', repeats 'N*K'."""
    layers = list(layers)
    parts: list[str] = []
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[i]:
            j += 1
        if j > i:
            parts.append(f"{layers[i]}*{j - i + 1}")
            i = j + 1
            continue
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{layers[i]}-{layers[j]}")
        else:
            parts.extend(str(x) for x in layers[i : j + 1])
        i = j + 1
    return ",".join(parts)
