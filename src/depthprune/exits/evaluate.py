"""Early-exit classifiers measured against the untouched classifier: accuracy, layers used, wall-clock speedup."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from depthprune.exits.criteria import Criterion
from depthprune.exits.data import LabelledTexts, tokenize_batches
from depthprune.exits.heads import ExitHeads
from depthprune.exits.inference import EarlyExitClassifier


def _pass(fn: Callable[[dict], Any], batches: Sequence[dict]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            fn(b)
    return time.perf_counter() - start


def time_exit_configs(
    model: nn.Module,
    heads: ExitHeads,
    configs: Sequence[tuple[str, Criterion]],
    data: LabelledTexts,
    tokenizer: Any,
    *,
    batch_size: int,
    repeats: int = 3,
    max_length: int = 128,
) -> dict[str, list[float]]:
    """Seconds per pass over `data` of the untouched classifier ('full': the model's own forward) and of each
    (name, criterion), interleaved round-robin with a rotating start so machine noise hits all alike; one warm-up."""
    batches = [
        {k: v for k, v in b.items() if k != "labels"}
        for b in tokenize_batches(tokenizer, data, batch_size=batch_size, max_length=max_length)
    ]
    runners: dict[str, Callable[[dict], Any]] = {"full": lambda b: model(**b)}
    for name, crit in configs:
        clf = EarlyExitClassifier(model, heads, crit)
        runners[name] = lambda b, clf=clf: clf(b["input_ids"], b["attention_mask"])
    for fn in runners.values():
        _pass(fn, batches[:2])
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_pass(runners[name], batches))
    return times


def speedups(times: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds of 'full' over median seconds of each configuration."""
    full = statistics.median(times["full"])
    return {name: full / statistics.median(ts) for name, ts in times.items()}


@torch.inference_mode()
def classify(
    model: nn.Module,
    heads: ExitHeads | None,
    criterion: Criterion | None,
    texts: Sequence[str],
    tokenizer: Any,
    *,
    batch_size: int = 32,
    max_length: int = 128,
) -> list[dict[str, Any]]:
    """Predicted label id, probability and exit layer (1-based count of layers run) for each text."""
    clf = EarlyExitClassifier(model, heads, criterion)
    rows = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = clf(enc["input_ids"], enc["attention_mask"])
        probs = out.logits.float().softmax(-1)
        for i in range(len(chunk)):
            rows.append(
                {
                    "label": int(out.predictions[i]),
                    "probability": float(probs[i].max()),
                    "layers": int(out.layers_used[i]),
                    "of_layers": out.num_layers,
                }
            )
    return rows
