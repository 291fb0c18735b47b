"""Order search: hill climbing over layer plans with reorders and repeats, at a fixed number of executed layers.

A plan here is the sequence of source layers one stack runs (`LayerPlan`: drop, repeat, reorder). Starting from a
plan of `depth` layers (by default the best pure removal a scorer finds), local moves that keep the depth fixed are
scored on the calibration next-token loss (mean NLL), and a better neighbour replaces the current plan:

- `swap`: two neighbouring positions run in the other order;
- `repeat`: the layer at one position gives its slot to a neighbour, which then runs twice in a row ("layers as
  painters", Sun et al. 2024: a middle layer run again in place of a removed one);
- `move`: one layer moves 2 to `max_shift` positions earlier or later (one position is a swap);
- `exchange`: one executed layer leaves and an unused one enters (the pure-removal move: which layer of a run is
  removed); in a pure-removal plan the newcomer takes its place in source order, so the plan stays a pure removal,
  otherwise it takes the slot of the layer it replaces.

Every candidate runs on the runner through `lm_loss` (the model's own layers, no what-if copy): the hidden states after
each leading part of the current plan are cached, so a candidate reruns only from its first position that differs.
The loss reported for a plan is the loss of `apply_plan(model, plan)` on the same batches (tests/test_search.py).
`monotone=True` keeps only pure removals (strictly increasing plans), for a comparison at the same budget.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from depthprune.errors import PlanError
from depthprune.plan import LayerPlan
from depthprune.registry import SCORERS
from depthprune.static.scorers.hidden import Target, check_arguments, eval_mode
from depthprune.static.scorers.lm_loss import Loss, PrefixCache, cache_loss, plan_inputs

NAME = "search-order"
MOVES = ("swap", "repeat", "move", "exchange")
"""Every move kind, in the order candidates of one neighbourhood are interleaved."""
STRATEGIES = ("first", "best")
"""first: take the first better neighbour (in a seeded random order); best: score the whole neighbourhood first."""


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """One scored plan: its layers, calibration loss (mean NLL, nats) and the move that made it ("start" for the
    start plan)."""

    plan: LayerPlan
    loss: float
    move: str

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_text(), "loss": self.loss, "move": self.move}


@dataclasses.dataclass(frozen=True)
class OrderSearchResult:
    """What an order search found: the best plan and its calibration loss, where it started, every plan it scored."""

    stack: str
    depth: int
    best: LayerPlan
    best_loss: float
    start: LayerPlan
    start_loss: float
    history: tuple[Evaluated, ...]  # every distinct plan scored, in order, the start first
    evaluations: int  # plans scored (the start included); equals len(history)
    seconds: float
    non_monotone: bool  # the best plan reorders or repeats layers (is not a pure removal)
    steps: int  # accepted moves
    stopped: str  # "local optimum", "budget" (evaluations) or "time" (max_seconds)
    moves: tuple[str, ...]
    strategy: str
    monotone_only: bool
    seed: int
    tokens: int  # predicted calibration tokens per evaluation

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(
            best=self.best.to_text(),
            start=self.start.to_text(),
            history=[e.to_dict() for e in self.history],
            moves=list(self.moves),
        )
        return out


def is_pure_removal(keep: Sequence[int]) -> bool:
    """A plan that only drops layers: strictly increasing source indices (no reorder, no repeat)."""
    return all(a < b for a, b in zip(keep, keep[1:], strict=False))


def neighbours(
    keep: Sequence[int], n_layers: int, moves: Sequence[str] = MOVES, *, max_shift: int = 4
) -> dict[str, list[tuple[int, ...]]]:
    """Every plan one move away from `keep` (a sequence of source layers of a stack of `n_layers`), per move kind;
    each has len(keep) layers, none equals `keep`, and a plan two kinds reach is listed under the first of them."""
    keep = tuple(keep)
    depth = len(keep)
    unused = [r for r in range(n_layers) if r not in set(keep)]
    pure = is_pure_removal(keep)
    seen = {keep}
    out: dict[str, list[tuple[int, ...]]] = {}
    for kind in moves:
        found: list[tuple[int, ...]] = []
        if kind == "swap":
            raw = (keep[:p] + (keep[p + 1], keep[p]) + keep[p + 2 :] for p in range(depth - 1))
        elif kind == "repeat":
            raw = (
                keep[:p] + (keep[q],) + keep[p + 1 :] for p in range(depth) for q in (p - 1, p + 1) if 0 <= q < depth
            )
        elif kind == "move":
            raw = (
                _moved(keep, p, q)
                for p in range(depth)
                for q in range(max(0, p - max_shift), min(depth, p + max_shift + 1))
                if abs(p - q) >= 2
            )
        elif kind == "exchange":
            if pure:
                raw = (tuple(sorted(keep[:p] + keep[p + 1 :] + (r,))) for p in range(depth) for r in unused)
            else:
                raw = (keep[:p] + (r,) + keep[p + 1 :] for p in range(depth) for r in unused)
        else:
            raise ValueError(f"{NAME}: unknown move {kind!r}; the moves are {', '.join(MOVES)}")
        for cand in raw:
            if cand not in seen:
                seen.add(cand)
                found.append(cand)
        out[kind] = found
    return out


def _moved(keep: tuple[int, ...], p: int, q: int) -> tuple[int, ...]:
    rest = list(keep[:p] + keep[p + 1 :])
    rest.insert(q, keep[p])
    return tuple(rest)


def _interleave(groups: dict[str, list[tuple[int, ...]]], rng: random.Random) -> list[tuple[str, tuple[int, ...]]]:
    """Each kind's candidates shuffled, then taken in turn (so a large kind cannot crowd the others out of a budget)."""
    lists = []
    for kind, cands in groups.items():
        cands = list(cands)
        rng.shuffle(cands)
        lists.append([(kind, c) for c in cands])
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def _check_moves(moves: Sequence[str] | str, monotone: bool) -> tuple[str, ...]:
    if isinstance(moves, str):
        moves = [m.strip() for m in moves.split(",") if m.strip()]
    moves = tuple(dict.fromkeys(moves))
    bad = [m for m in moves if m not in MOVES]
    if bad or not moves:
        raise ValueError(
            f"{NAME}: unknown move(s) {bad}; the moves are {', '.join(MOVES)}" if bad else f"{NAME}: no move given"
        )
    if monotone:
        moves = tuple(m for m in moves if m == "exchange")
        if not moves:
            raise ValueError(f"{NAME}: monotone (pure-removal) search needs the 'exchange' move; the others reorder")
    return moves


def _depth(n_layers: int, depth: int | None, n_remove: int | None, start_len: int | None) -> int:
    if depth is not None and n_remove is not None:
        raise ValueError(f"{NAME}: give the executed depth or the number of layers to remove, not both")
    if n_remove is not None:
        if isinstance(n_remove, bool) or not isinstance(n_remove, int) or not 1 <= n_remove < n_layers:
            raise ValueError(
                f"{NAME}: n_remove must be an integer from 1 to {n_layers - 1} (the stack has {n_layers} layers), "
                f"got {n_remove!r}"
            )
        depth = n_layers - n_remove
    if depth is None:
        if start_len is None:
            raise ValueError(f"{NAME}: say how many layers run (depth=D or n_remove=N), or give a start plan")
        depth = start_len
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth < n_layers:
        raise ValueError(
            f"{NAME}: the executed depth must be an integer from 1 to {n_layers - 1} (the stack has {n_layers} "
            f"layers; at {n_layers} nothing is removed), got {depth!r}"
        )
    return depth


def _start_layers(
    model: nn.Module,
    batches: list[Tensor],
    target: Target,
    start: Any,
    depth: int | None,
    n_remove: int | None,
    progress: bool,
) -> tuple[tuple[int, ...], int]:
    """(start plan's layers, depth): a plan (LayerPlan, its text, or a sequence of source layers) or a scorer name."""
    n = target.n_layers
    if isinstance(start, str) and start in SCORERS.names():
        depth = _depth(n, depth, n_remove, None)
        scores = SCORERS.get(start)(model, batches, n_remove=n - depth, stack=target.name, progress=progress)
        return tuple(i for i in range(n) if i not in set(scores.remove)), depth
    if isinstance(start, str):
        try:
            start = LayerPlan.parse(start)
        except PlanError as err:
            raise ValueError(
                f"{NAME}: start {start!r} is neither a scorer ({', '.join(SCORERS.names())}) nor a layer plan: {err}"
            ) from None
    if isinstance(start, LayerPlan):
        sizes = target.adapter.num_layers(model)
        resolved = start.resolve(sizes)
        others = [s for s in sizes if s != target.name and resolved.stacks[s] != tuple(range(sizes[s]))]
        if others:
            raise ValueError(f"{NAME}: the search works on stack {target.name!r}; the start plan changes {others}")
        keep = resolved.stacks[target.name]
    else:
        keep = tuple(start)
        bad = [i for i in keep if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
        if bad:
            raise ValueError(f"{NAME}: the start plan's layers must be indices 0-{n - 1}, got {bad}")
    depth = _depth(n, depth, n_remove, len(keep))
    if len(keep) != depth:
        raise ValueError(f"{NAME}: the start plan runs {len(keep)} layers, not the requested depth {depth}")
    return tuple(keep), depth


@torch.no_grad()
def search_order(
    model: nn.Module,
    batches: Sequence[Tensor] | Tensor,
    *,
    depth: int | None = None,
    n_remove: int | None = None,
    start: LayerPlan | str | Sequence[int] = "sleb",
    moves: Sequence[str] | str = MOVES,
    budget: int = 100,
    max_seconds: float | None = None,
    strategy: str = "first",
    monotone: bool = False,
    seed: int = 0,
    max_shift: int = 4,
    stack: str | None = None,
    progress: bool = False,
) -> OrderSearchResult:
    """Hill-climb from `start` (a scorer name: its pure removal at this depth; or a plan) to the plan of `depth`
    executed layers (or `n_layers - n_remove`) with the lowest calibration NLL on `batches` (LongTensor [batch, seq]
    token ids), scoring at most `budget` plans (the start included) and, with `max_seconds`, stopping once that much
    time has passed (then the result depends on the machine's speed). `model` is left unchanged.
    """
    target, batches = check_arguments(model, batches, 0, stack, NAME, loss=True)
    if strategy not in STRATEGIES:
        raise ValueError(f"{NAME}: unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"{NAME}: budget is the number of plans to score, at least 1; got {budget!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"{NAME}: max_seconds must be positive, got {max_seconds!r}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 2:
        raise ValueError(f"{NAME}: max_shift (how far `move` moves a layer) must be an integer >= 2, got {max_shift!r}")
    moves = _check_moves(moves, monotone)
    began = time.perf_counter()
    rng = random.Random(seed)
    history: list[Evaluated] = []
    scored: dict[tuple[int, ...], float] = {}
    stopped = "local optimum"
    steps = 0
    bar = None
    with eval_mode(model):
        keep, depth = _start_layers(model, batches, target, start, depth, n_remove, progress)
        if monotone and not is_pure_removal(keep):
            raise ValueError(f"{NAME}: monotone search needs a pure-removal start plan, got {_text(keep)}")
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=budget, desc=NAME, unit="plan")

        def score(plan: tuple[int, ...], move: str, cache: PrefixCache | None) -> tuple[Loss, PrefixCache]:
            """Run `plan` from the states it shares with `cache` (its leading layers), keep its states."""
            states = plan_inputs(model, batches, target, plan, cache=cache)
            loss = cache_loss(model, batches, target, states)
            scored[plan] = loss.nll
            history.append(Evaluated(LayerPlan({target.name: plan}), loss.nll, move))
            if bar is not None:
                bar.update()
                bar.set_postfix(best=f"{min(scored.values()):.4f}")
            return loss, states

        def out_of_budget() -> str | None:
            if len(history) >= budget:
                return "budget"
            if max_seconds is not None and time.perf_counter() - began >= max_seconds:
                return "time"
            return None

        first, current = score(keep, "start", None)
        start_loss = current_loss = first.nll
        improved = True
        while improved and stopped == "local optimum":
            improved = False
            candidates = _interleave(neighbours(keep, target.n_layers, moves, max_shift=max_shift), rng)
            best: tuple[float, tuple[int, ...], PrefixCache] | None = None
            for kind, cand in candidates:
                if cand in scored or (monotone and not is_pure_removal(cand)):
                    continue
                if (why := out_of_budget()) is not None:
                    stopped = why
                    break
                loss, states = score(cand, kind, current)
                if loss.nll < current_loss and (best is None or loss.nll < best[0]):
                    best = (loss.nll, cand, states)
                    if strategy == "first":
                        break
            if best is not None:
                current_loss, keep, current = best
                steps += 1
                improved = True
            if stopped == "local optimum" and improved and (why := out_of_budget()) is not None:
                stopped = why
    if bar is not None:
        bar.close()
    best_plan = LayerPlan({target.name: keep})
    return OrderSearchResult(
        stack=target.name,
        depth=depth,
        best=best_plan,
        best_loss=current_loss,
        start=history[0].plan,
        start_loss=start_loss,
        history=tuple(history),
        evaluations=len(history),
        seconds=time.perf_counter() - began,
        non_monotone=not is_pure_removal(keep),
        steps=steps,
        stopped=stopped,
        moves=moves,
        strategy=strategy,
        monotone_only=monotone,
        seed=seed,
        tokens=first.tokens,
    )


def _text(keep: Sequence[int]) -> str:
    return LayerPlan({"*": tuple(keep)}).to_text()


__all__ = ["MOVES", "STRATEGIES", "Evaluated", "OrderSearchResult", "is_pure_removal", "neighbours", "search_order"]
