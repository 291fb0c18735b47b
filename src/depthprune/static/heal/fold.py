"""Training-free healing by a linear fold (ReplaceMe-style): a removed run of layers becomes a linear map folded into
the output projection of the layer kept just before it.

What is exact. In every supported block the output projection's output m (Llama's `mlp.down_proj`, GPT-2's
`mlp.c_proj`) is added to the residual stream with nothing after it: h_out = h_mid + m, where h_mid is everything
else the block adds (pre-norm attention, or GPT-NeoX's parallel attention), so h_mid = h_out - m. Removing the run
[i, j) drops r = h_j - h_i from the stream. We fit T [hidden, hidden] on calibration tokens so that the kept layer
i-1 gives h_mid + m T ~ h_j, i.e. m T ~ Y with Y = m + r = h_j - h_mid (least squares with a ridge: T = (M^T M +
lambda I)^-1 M^T Y, the normal equations accumulated in float64 over batches, so memory is two [hidden, hidden]
matrices). Because m = x W^T + b for the projection's input x, m T = x (W^T T) + b T: the fold W' = T^T W, b' = b T
(a Conv1D stores W^T, so W' = W T) is *exactly* the pruned model with T applied to that projection's output, and the
export is an ordinary model of the same architecture. `loss="cosine"` is ReplaceMe's cosine variant: T, started from
the least-squares solution, is refined by Adam on 1 - cos(h_mid + m T, h_j) over a bounded sample of tokens.

Runs are fitted in order along the stack on the model healed so far (`sequential=True`): the activations of layer
i-1 are those of the pruned model with the earlier folds in place and the target h_j is the untouched model's, so
each fold also corrects what earlier removals left. A run at the start of a stack (layer 0 removed) has no layer
before it: it is skipped with a warning and recorded as skipped (folding into the embedding would be a per-token map
of a context-dependent target, and would change a tied LM head). A run at the end (the last layers removed) is
folded with the stack's last hidden state (before the final norm) as its target.

Families whose MLP output goes through something nonlinear before the residual (Gemma 3's post-feedforward RMSNorm,
post-norm BERT blocks) have no exact fold: their adapters name no `StackSpec.output_proj`, and fold refuses them.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from depthprune.adapters.base import StackSpec, get_path
from depthprune.adapters.registry import get_adapter, supported_model_types
from depthprune.plan import LayerPlan
from depthprune.runner import capture_stack
from depthprune.static.apply import apply_plan
from depthprune.static.heal import check_options
from depthprune.static.scorers.hidden import as_batches, eval_mode, model_inputs

NAME = "fold"
LOSSES = ("lstsq", "cosine")
RECORD_KEY = "depthprune_healing"


@dataclasses.dataclass
class Fold:
    """One removed run [start, stop) of `stack` and the map T [hidden, hidden] folded into the output projection of
    the kept layer `start - 1` (at `position` in the pruned stack)."""

    stack: str
    start: int
    stop: int
    position: int
    T: torch.Tensor  # float64 [hidden, hidden]
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"stack": self.stack, "removed": [self.start, self.stop], "into_layer": self.start - 1}


@dataclasses.dataclass
class FoldResult:
    model: nn.Module
    plan: LayerPlan
    folds: list[Fold]
    skipped: list[tuple[str, int, int]]  # (stack, start, stop) of runs that could not be folded


def foldable_families() -> list[str]:
    """The adapter families whose stacks name an output projection (so fold can heal them)."""
    families = set()
    for model_type in supported_model_types():
        adapter = get_adapter(types.SimpleNamespace(model_type=model_type))
        if any(s.output_proj for s in adapter.stacks):
            families.add(adapter.family)
    return sorted(families)


def removed_runs(plan: Sequence[int], n_layers: int) -> list[tuple[int, int]]:
    """Maximal runs [i, j) of source layers a pure-removal plan (strictly increasing indices) never runs."""
    if any(b <= a for a, b in zip(plan, plan[1:], strict=False)):
        raise ValueError(
            f"fold heals plans that only remove layers (indices strictly increasing); got {list(plan)}: "
            "reordered or repeated layers have no single layer before a removed run"
        )
    runs, prev = [], -1
    for k in [*plan, n_layers]:
        if k > prev + 1:
            runs.append((prev + 1, k))
        prev = k
    return runs


def output_projection(layer: nn.Module, spec: StackSpec) -> nn.Module:
    proj = get_path(layer, spec.output_proj)
    if not isinstance(proj, nn.Linear) and type(proj).__name__ != "Conv1D":
        raise TypeError(f"{spec.output_proj} is a {type(proj).__name__}; fold knows nn.Linear and GPT-2's Conv1D")
    return proj


def fold_into(proj: nn.Module, T: torch.Tensor) -> None:
    """Replace `proj` (y = x W^T + b) by y T in place: W' = T^T W, b' = b T (Conv1D stores W^T: W' = W T)."""
    with torch.no_grad():
        w = proj.weight.detach().double()
        new = w @ T if type(proj).__name__ == "Conv1D" else T.T @ w
        proj.weight.copy_(new.to(proj.weight.dtype))
        if getattr(proj, "bias", None) is not None:
            proj.bias.copy_((proj.bias.detach().double() @ T).to(proj.bias.dtype))


def _stack_targets(model: nn.Module, plan: LayerPlan) -> list[tuple[StackSpec, tuple[int, ...], list[tuple[int, int]]]]:
    adapter = get_adapter(model)
    sizes = adapter.num_layers(model)
    plan = plan.resolve(sizes)
    found = []
    for spec in adapter.present_stacks(model):
        layers = plan.stacks[spec.name]
        runs = removed_runs(layers, sizes[spec.name])
        if not runs:
            continue
        if not spec.output_proj:
            raise ValueError(
                f"fold: the {adapter.family} family names no output projection for stack {spec.name!r} "
                f"(StackSpec.output_proj), so no exact linear fold exists"
                + (" (Gemma 3 normalises the MLP output after down_proj)" if "gemma" in adapter.family else "")
                + f"; fold supports: {', '.join(foldable_families())}"
            )
        found.append((spec, layers, runs))
    if not found:
        raise ValueError(f"fold: the plan {plan.to_text()} removes no layer; there is nothing to heal")
    return found


def _collect(model, healed, spec, position, stop, batches, max_tokens, generator):
    """Normal equations (float64 M^T M, M^T Y) of one run over every batch, and a token sample for the cosine loss."""
    proj = output_projection(get_adapter(healed).layers(healed, spec)[position], spec)
    seen: list[torch.Tensor] = []
    hook = proj.register_forward_hook(lambda _m, _i, out: seen.append(out))
    d = proj.weight.shape[1] if type(proj).__name__ == "Conv1D" else proj.weight.shape[0]
    mtm = torch.zeros(d, d, dtype=torch.float64)
    mty = torch.zeros(d, d, dtype=torch.float64)
    sample: list[tuple[torch.Tensor, ...]] = []
    tokens = 0
    try:
        for ids in batches:
            hidden, call = capture_stack(model, model_inputs(model, ids), stack=spec.name)
            target = call.run(hidden, 0, stop)  # [b, s, hidden] the untouched model's h_j
            hidden, call = capture_stack(healed, model_inputs(healed, ids), stack=spec.name)
            seen.clear()
            out = call.run(hidden, 0, position + 1)  # the healed model's h_out of layer i-1
            m = seen[-1]
            mid = (out - m).reshape(-1, d)
            m, target = m.reshape(-1, d), target.reshape(-1, d)
            y = (target - mid).double()
            mtm += m.double().T @ m.double()
            mty += m.double().T @ y
            tokens += m.shape[0]
            if max_tokens:
                keep = torch.randperm(m.shape[0], generator=generator)[: max(1, max_tokens // len(batches))]
                sample.append((m[keep].float(), mid[keep].float(), target[keep].float()))
    finally:
        hook.remove()
    return mtm, mty, sample, tokens


def _cosine(T: torch.Tensor, sample, steps: int, lr: float) -> torch.Tensor:
    """Refine T on 1 - cos(h_mid + m T, h_j) (ReplaceMe's cosine objective) with Adam, from the given T."""
    m, mid, target = (torch.cat(parts) for parts in zip(*sample, strict=True))
    t = T.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([t], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = 1 - nn.functional.cosine_similarity(mid + m @ t, target, dim=-1).mean()
            loss.backward()
            opt.step()
    return t.detach().double()


def fold(
    model: nn.Module,
    plan: LayerPlan | str,
    batches: Sequence[torch.Tensor] | torch.Tensor,
    *,
    loss: str = "lstsq",
    ridge: float = 1e-4,
    sequential: bool = True,
    cosine_steps: int = 200,
    cosine_lr: float = 1e-4,
    cosine_tokens: int = 16384,
    progress: bool = False,
) -> FoldResult:
    """Apply `plan` to a copy of `model` and fold a fitted linear map into the layer before each removed run.

    ridge: lambda relative to the mean eigenvalue of M^T M (trace / hidden); sequential: fit each run on the model
    healed so far (else every run on the untouched model's activations). `model` is never modified."""
    if loss not in LOSSES:
        raise ValueError(f"fold: loss must be one of {LOSSES}, got {loss!r}")
    if isinstance(plan, str):
        plan = LayerPlan.parse(plan)
    batches = as_batches(batches, NAME)
    targets = _stack_targets(model, plan)
    healed = apply_plan(model, plan)
    reference = apply_plan(model, plan) if not sequential else healed
    folds: list[Fold] = []
    skipped: list[tuple[str, int, int]] = []
    jobs = [(spec, layers, run) for spec, layers, runs in targets for run in runs]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=NAME, unit="run")
    generator = torch.Generator().manual_seed(0)
    with eval_mode(model), eval_mode(healed), eval_mode(reference), torch.no_grad():
        for spec, layers, (start, stop) in jobs:
            if start == 0:
                skipped.append((spec.name, start, stop))
                warnings.warn(
                    f"fold: layers {start}-{stop - 1} of stack {spec.name!r} start the stack; no layer before them "
                    "to fold into, so that run is left unhealed",
                    stacklevel=2,
                )
            else:
                position = layers.index(start - 1)
                mtm, mty, sample, tokens = _collect(
                    model, reference, spec, position, stop, batches, cosine_tokens if loss == "cosine" else 0, generator
                )
                lam = ridge * float(torch.trace(mtm)) / mtm.shape[0]
                T = torch.linalg.solve(mtm + lam * torch.eye(mtm.shape[0], dtype=mtm.dtype), mty)
                if loss == "cosine":
                    T = _cosine(T, sample, cosine_steps, cosine_lr)
                proj = output_projection(get_adapter(healed).layers(healed, spec)[position], spec)
                fold_into(proj, T)
                folds.append(Fold(spec.name, start, stop, position, T, tokens))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    setattr(
        healed.config,
        RECORD_KEY,
        {
            "method": NAME,
            "loss": loss,
            "folds": [f.to_dict() for f in folds],
            "skipped": [{"stack": s, "removed": [a, b]} for s, a, b in skipped],
        },
    )
    return FoldResult(healed, plan, folds, skipped)


def heal(
    model: nn.Module, plan: LayerPlan | str, batches: Sequence[torch.Tensor], *, progress: bool = False, **options
):
    """The healer interface: a new model running `plan`, each removed run folded into the layer before it."""
    check_options(NAME, fold, options)
    return fold(model, plan, batches, progress=progress, **options).model


# inspect.signature(heal) reads fold's options (a chain checks a later stage takes start= first)
heal.__wrapped__ = fold
HEALER = heal
