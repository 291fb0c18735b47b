"""Measuring: speed side by side, theoretical FLOPs, perplexity, tables and plots.

Public functions (imported lazily, so `import depthprune.bench` stays fast):
    compare_speed, SpeedReport, machine_info        bench.speed
    estimate_flops, flops_ratio, FlopsEstimate      bench.flops
    perplexity, mean_nll                            bench.perplexity
    plot_layer_scores, plot_ppl_curves              bench.plots
    format_table, write_json, write_csv             bench.report
    interleaved_seconds, speed_ratios, markdown_table   bench.generation
    fluency, repeated_ngram_share                   bench.fluency
    compare_tokens_per_s, plain_greedy, new_tokens       bench.generation
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compare_speed": "depthprune.bench.speed",
    "SpeedReport": "depthprune.bench.speed",
    "SpeedResult": "depthprune.bench.speed",
    "MachineInfo": "depthprune.bench.speed",
    "machine_info": "depthprune.bench.speed",
    "random_prompts": "depthprune.bench.speed",
    "estimate_flops": "depthprune.bench.flops",
    "flops_ratio": "depthprune.bench.flops",
    "FlopsEstimate": "depthprune.bench.flops",
    "StackFlops": "depthprune.bench.flops",
    "perplexity": "depthprune.bench.perplexity",
    "mean_nll": "depthprune.bench.perplexity",
    "plot_layer_scores": "depthprune.bench.plots",
    "plot_ppl_curves": "depthprune.bench.plots",
    "format_table": "depthprune.bench.report",
    "write_json": "depthprune.bench.report",
    "write_csv": "depthprune.bench.report",
    "interleaved_seconds": "depthprune.bench.generation",
    "speed_ratios": "depthprune.bench.generation",
    "markdown_table": "depthprune.bench.generation",
    "fluency": "depthprune.bench.fluency",
    "repeated_ngram_share": "depthprune.bench.fluency",
    "compare_tokens_per_s": "depthprune.bench.generation",
    "plain_greedy": "depthprune.bench.generation",
    "new_tokens": "depthprune.bench.generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'depthprune.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
