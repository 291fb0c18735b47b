"""Training-free healing by a linear fold (ReplaceMe, Shopkhoev et al. 2025): every removed run of layers is replaced by
a linear map, fitted on calibration activations and folded into the layer before the run, so the healed model is an
ordinary model of the same architecture with fewer layers.

What is fitted. Let layers [i, j) be a removed run and k = i - 1 the kept layer before it. In the families this file
serves, layer k's output is h_i = r_k + m_k, where m_k is the output of the layer's `output_proj` (the MLP's down
projection), added straight to the residual stream, and r_k everything else (the residual input plus attention).
The run would have turned h_i into h_j. Replacing m_k by m_k T gives the layer output r_k + m_k T, so T is chosen by
least squares to make that h_j:

    T = argmin_T sum over positions |m_k T - y|^2 + ridge * |T - I|^2,   y = m_k + (h_j - h_i)

(the ridge pulls T towards the identity, i.e. towards plain removal, and is a fraction of the mean diagonal of
m_k^T m_k). The fold is exact: nn.Linear computes x W^T + b, so W' = T^T W and b' = b T; GPT-2's Conv1D computes
x W + b, so W' = W T and b' = b T. Activations come from the untouched model (the runner: `capture_stack` +
`StackCall.run`, each layer called by the model's own forward code), normal equations accumulated in float64 and
streamed over batches (memory: two d x d matrices per run). Every run is fitted on the untouched model's states, as
ReplaceMe does; a later run then sees inputs that the earlier folds only approximate.

Limits (clear errors): plans that reorder or repeat layers (a fold needs a pure removal), a run that starts at layer 0
(no kept layer before it to fold into), and families whose adapter names no `output_proj` (Gemma normalizes the MLP
output before the residual add, so no linear map on it can be folded exactly).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from depthprune.adapters.base import backbone, get_path
from depthprune.adapters.registry import get_adapter, supported_model_types
from depthprune.plan import PLAN_CONFIG_KEY, LayerPlan
from depthprune.runner import capture_stack
from depthprune.static.apply import apply_plan, layer_sizes


def removed_runs(kept: tuple[int, ...], n_layers: int) -> list[tuple[int, int]]:
    """Maximal runs [i, j) of source layers that a pure-removal plan `kept` leaves out."""
    runs, gone = [], sorted(set(range(n_layers)) - set(kept))
    for i in gone:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _check(model: nn.Module, plan: LayerPlan | str, batches: list[torch.Tensor]):
    adapter = get_adapter(model)
    stacks = adapter.present_stacks(model)
    if [s.name for s in stacks] != ["decoder"] or getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"fold heals decoder-only models; {type(model).__name__} has the stacks {[s.name for s in stacks]}"
        )
    spec = stacks[0]
    if spec.output_proj is None:
        foldable = [
            t for t in supported_model_types() if get_adapter(SimpleNamespace(model_type=t)).stacks[-1].output_proj
        ]
        raise ValueError(
            f"the {adapter.family} adapter names no output projection a linear map can be folded into exactly "
            f"(StackSpec.output_proj); fold supports the model types {foldable}. Heal this model with another method"
        )
    sizes = layer_sizes(model, adapter)
    resolved = (LayerPlan.parse(plan) if isinstance(plan, str) else plan).resolve(sizes)
    kept = resolved.stacks[spec.name]
    if list(kept) != sorted(set(kept)):
        raise ValueError(f"fold heals pure removals; the plan {resolved.to_text()} reorders or repeats layers")
    runs = removed_runs(kept, sizes[spec.name])
    if not runs:
        raise ValueError("the plan removes no layer: there is nothing to heal")
    if runs[0][0] == 0:
        raise ValueError(
            f"the plan removes layers {runs[0][0]}-{runs[0][1] - 1}, at the start of the stack: fold needs a kept "
            "layer before each removed run to fold its map into; keep layer 0"
        )
    if not batches:
        raise ValueError("fold needs calibration batches (a list of LongTensor [batch, seq] token ids)")
    for b in batches:
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.dtype != torch.long:
            raise ValueError("calibration batches must be LongTensor [batch, seq] token ids")
    return adapter, spec, resolved, kept, runs


@torch.no_grad()
def fit_maps(
    model: nn.Module,
    runs: list[tuple[int, int]],
    batches: list[torch.Tensor],
    output_proj: str,
    *,
    ridge: float = 1e-4,
    skip_first: int = 1,
    progress: bool = False,
) -> dict[int, tuple[torch.Tensor, float]]:
    """Per run [i, j), keyed by its end j: (T [d, d], relative residual |m T - y|^2 / |y - m|^2, i.e. against plain
    removal), fitted on `batches`.

    skip_first: positions left out at the start of every row (the first token's outlier activations, an attention
    sink, would dominate the fit)."""
    adapter = get_adapter(model)
    spec = adapter.stacks[-1]
    layers = adapter.run_sequence(model, spec)
    device = next(model.parameters()).device
    sums: dict[int, dict[str, torch.Tensor | float]] = {}
    caught: dict[int, torch.Tensor] = {}
    hooks = [
        get_path(layers[i - 1], output_proj).register_forward_hook(
            lambda _m, _a, out, k=i - 1: caught.__setitem__(k, out)
        )
        for i, _ in runs
    ]
    starts = {i: j for i, j in runs}
    ends = {j for _, j in runs}
    was_training = model.training
    model.eval()
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="fold", unit="batch")
    try:
        for ids in iterator:
            ids = ids.to(device)
            hidden, call = capture_stack(model, {"input_ids": ids, "use_cache": False}, adapter=adapter)
            open_runs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # j -> (m_k, h_i)
            h = hidden
            for idx in range(len(layers)):
                if idx in starts:  # h is h_i, the output of layer i - 1
                    open_runs[starts[idx]] = (caught.pop(idx - 1), h)
                if idx in ends:
                    _close(sums, open_runs, idx, h, skip_first)
                h = call.run(h, idx, idx + 1)
            if len(layers) in ends:
                _close(sums, open_runs, len(layers), h, skip_first)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    maps = {}
    for j, s in sums.items():
        xtx, xty = s["xtx"], s["xty"]
        d = xtx.shape[0]
        eye = torch.eye(d, dtype=torch.float64)
        reg = ridge * float(xtx.diagonal().mean())
        t = torch.linalg.solve(xtx + reg * eye, xty + reg * eye)  # [d, d]
        # |m T - y|^2 = |y|^2 - 2 tr(T' X'Y) + tr(T' X'X T); plain removal is T = I: |m - y|^2 = |h_j - h_i|^2
        rss = s["yy"] - 2 * float((t * xty).sum()) + float((t * (xtx @ t)).sum())
        maps[j] = (t, rss / max(float(s["dd"]), 1e-12))
    return maps


def _close(sums: dict, open_runs: dict, j: int, h_j: torch.Tensor, skip_first: int) -> None:
    """Add the positions of the run ending at `j` (states h_j leaving it) to its normal equations (keyed by j)."""
    m, h_i = open_runs.pop(j)
    m = m[:, skip_first:].reshape(-1, m.shape[-1]).double().cpu()
    delta = (h_j - h_i)[:, skip_first:].reshape(-1, m.shape[-1]).double().cpu()
    y = m + delta
    s = sums.setdefault(j, {"xtx": 0.0, "xty": 0.0, "yy": 0.0, "dd": 0.0})
    s["xtx"] = s["xtx"] + m.T @ m
    s["xty"] = s["xty"] + m.T @ y
    s["yy"] = s["yy"] + float(y.pow(2).sum())
    s["dd"] = s["dd"] + float(delta.pow(2).sum())


def fold_heal(
    model: nn.Module,
    plan: LayerPlan | str,
    batches: list[torch.Tensor],
    *,
    ridge: float = 1e-4,
    skip_first: int = 1,
    progress: bool = False,
) -> nn.Module:
    """`plan` (a pure removal) applied to a copy of `model`, each removed run replaced by a least-squares linear map
    folded into the output projection of the kept layer before it (see the module docstring). `model` is untouched.
    The healed model's config records the method and each run's relative residual under "depthprune" -> "healing"."""
    adapter, spec, resolved, kept, runs = _check(model, plan, batches)
    fitted = fit_maps(model, runs, batches, spec.output_proj, ridge=ridge, skip_first=skip_first, progress=progress)
    healed = apply_plan(model, resolved)
    new_layers = get_path(backbone(healed), spec.layers)
    report = []
    for i, j in runs:
        t, residual = fitted[j]
        position = kept.index(i - 1)  # where the kept layer before the run sits in the healed model
        proj = get_path(new_layers[position], spec.output_proj)
        _fold(proj, t)
        report.append({"removed": [i, j - 1], "into_layer": i - 1, "relative_residual": round(residual, 6)})
    record = dict(getattr(healed.config, PLAN_CONFIG_KEY, None) or {})
    record["healing"] = {"method": "fold", "ridge": ridge, "runs": report}
    setattr(healed.config, PLAN_CONFIG_KEY, record)
    return healed


@torch.no_grad()
def _fold(proj: nn.Module, t: torch.Tensor) -> None:
    """Make `proj` compute proj(x) T: nn.Linear (x W^T + b) -> W' = T^T W; Conv1D (x W + b) -> W' = W T; b' = b T."""
    from transformers.pytorch_utils import Conv1D

    w = proj.weight
    t = t.to(device=w.device)
    if isinstance(proj, Conv1D):
        w.copy_((w.double() @ t).to(w.dtype))
    elif isinstance(proj, nn.Linear):
        w.copy_((t.T @ w.double()).to(w.dtype))
    else:
        raise ValueError(f"cannot fold a linear map into a {type(proj).__name__}: expected nn.Linear or Conv1D")
    if getattr(proj, "bias", None) is not None:
        proj.bias.copy_((proj.bias.double() @ t).to(proj.bias.dtype))


def HEALER(model: nn.Module, plan: LayerPlan | str, batches: list[torch.Tensor], *, progress: bool = False, **options):  # noqa: N802
    """The registered healer "fold" (see depthprune.static.heal)."""
    return fold_heal(model, plan, batches, progress=progress, **options)
