"""Score every layer with several scorers side by side: a table for people, JSON for programs, a PNG plot."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthprune.static.scorers import LayerScores, get_scorer, list_scorers


def analyze(
    model: nn.Module,
    batches: list[torch.Tensor],
    *,
    scorers: Sequence[str] | None = None,
    n_remove: int = 1,
    stack: str | None = None,
    progress: bool = False,
) -> dict[str, LayerScores]:
    """Run each scorer (default: all registered) on the same calibration batches; `model` is untouched."""
    results: dict[str, LayerScores] = {}
    for name in scorers or list_scorers():
        start = time.perf_counter()
        scores = get_scorer(name)(model, batches, n_remove=n_remove, stack=stack, progress=progress)
        scores.details.setdefault("seconds", time.perf_counter() - start)
        results[name] = scores
    return results


def score_rows(results: dict[str, LayerScores]) -> list[dict[str, Any]]:
    """One row per layer, one column per scorer (and a rank column: 1 = least important)."""
    names = list(results)
    n = len(next(iter(results.values())).scores)
    ranks = {name: _ranks(results[name].scores) for name in names}
    rows = []
    for layer in range(n):
        row: dict[str, Any] = {"layer": layer}
        for name in names:
            row[name] = results[name].scores[layer]
            row[f"{name} rank"] = ranks[name][layer]
        rows.append(row)
    return rows


def _ranks(scores: Sequence[float]) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0] * len(scores)
    for r, i in enumerate(order, start=1):
        ranks[i] = r
    return ranks


def write_analysis(results: dict[str, LayerScores], out_dir: str | os.PathLike, *, title: str = "") -> dict[str, Path]:
    """Write scores.json, scores.csv and layer_scores.png into `out_dir`."""
    from depthprune.bench.plots import plot_layer_scores
    from depthprune.bench.report import write_csv, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = score_rows(results)
    return {
        "json": write_json({name: r.to_dict() for name, r in results.items()}, out / "scores.json"),
        "csv": write_csv(rows, out / "scores.csv"),
        "png": plot_layer_scores(
            {name: r.scores for name, r in results.items()},
            out / "layer_scores.png",
            title=title or "Layer importance by scorer (normalized; higher = more important)",
            removed={name: r.remove for name, r in results.items()},
        ),
    }
