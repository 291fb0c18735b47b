"""PNG plots where a person would rather look than read: per-layer importance, perplexity vs layers removed.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so plotting works on
machines without a display and never changes the caller's matplotlib state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# scores of one scorer: a sequence of floats, or an object with `.scores` (a LayerScores)
Scores = Sequence[float] | Any
# one perplexity curve: {layers removed: perplexity} or [(layers removed, perplexity), ...]
Curve = Mapping[int, float] | Iterable[tuple[int, float]]


def normalize(scores: Sequence[float]) -> list[float]:
    """Scores rescaled to [0, 1] (min -> 0, max -> 1); all-equal scores become 0.5; non-finite values stay NaN."""
    values = [float(s) for s in scores]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [math.nan] * len(values)
    lo, hi = min(finite), max(finite)
    if hi == lo:
        return [0.5 if math.isfinite(v) else math.nan for v in values]
    return [(v - lo) / (hi - lo) if math.isfinite(v) else math.nan for v in values]


def plot_layer_scores(
    scores: Mapping[str, Scores],
    path: str | os.PathLike,
    *,
    title: str = "Layer importance by scorer",
    removed: Mapping[str, Iterable[int]] | None = None,
) -> Path:
    """Per-layer importance, one line per scorer, each normalized to [0, 1] so they share an axis; writes a PNG.

    scores: scorer name -> one score per layer (or a LayerScores); higher = more important.
    removed: optional scorer name -> layers it removes, marked with hollow circles on its line.
    """
    if not scores:
        raise ValueError("plot_layer_scores needs the scores of at least one scorer")
    fig, ax = _figure()
    n_max = 0
    for name, s in scores.items():
        values = normalize(_as_scores(s))
        n_max = max(n_max, len(values))
        (line,) = ax.plot(range(len(values)), values, marker="o", markersize=3, linewidth=1.5, label=name)
        gone = sorted(set((removed or {}).get(name, ())))
        if gone:
            ax.plot(
                gone,
                [values[i] for i in gone],
                linestyle="none",
                marker="o",
                markersize=9,
                markerfacecolor="none",
                markeredgecolor=line.get_color(),
            )
    ax.set_title(title + (" (circled: removed)" if removed else ""))
    ax.set_xlabel("layer index")
    ax.set_ylabel("importance (normalized per scorer, 0 = least, 1 = most)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(_ticks(n_max))
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def plot_ppl_curves(
    curves: Mapping[str, Curve],
    path: str | os.PathLike,
    *,
    title: str = "Held-out perplexity vs layers removed",
    baseline: float | None = None,
) -> Path:
    """Held-out perplexity (log scale) against the number of layers removed, one line per scorer; writes a PNG.

    curves: scorer name -> {layers removed: perplexity} (or a list of pairs).
    baseline: the untouched model's perplexity, drawn as a dashed horizontal line.
    """
    from matplotlib.ticker import FuncFormatter

    if not curves:
        raise ValueError("plot_ppl_curves needs at least one curve")
    fig, ax = _figure()
    xs_all: set[int] = set()
    for name, curve in curves.items():
        points = sorted((dict(curve) if not isinstance(curve, Mapping) else curve).items())
        xs = [int(x) for x, _ in points]
        ys = [float(y) for _, y in points]
        if any(not (y > 0) for y in ys):
            raise ValueError(f"perplexities of {name!r} must be positive for a log axis, got {ys}")
        xs_all.update(xs)
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, label=name)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label=f"untouched ({baseline:.3g})")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 40, not 4 x 10^1
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize="small")
    ax.set_title(title)
    ax.set_xlabel("layers removed")
    ax.set_ylabel("held-out perplexity (log scale)")
    if xs_all:
        ax.set_xticks(_ticks(max(xs_all) + 1, start=min(xs_all)))
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def _legend(ax: Any) -> None:
    # outside the axes, on the right: never hides a line, however many scorers there are
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _as_scores(s: Scores) -> Sequence[float]:
    return s.scores if hasattr(s, "scores") else s


def _ticks(n: int, start: int = 0) -> list[int]:
    step = max(1, math.ceil((n - start) / 16))
    return list(range(start, n, step))


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
