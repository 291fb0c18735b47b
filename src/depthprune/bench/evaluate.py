"""Quality next to speed, against the untouched model, in one run: what `depthprune eval` and the demo print."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from depthprune.bench.flops import estimate_flops
from depthprune.bench.perplexity import perplexity


@dataclasses.dataclass
class EvalReport:
    """rows: one per model (perplexity, layers, measured and theoretical speedups vs the baseline); speed: the raw
    side-by-side speed report (None when speed was not measured)."""

    baseline: str
    rows: list[dict[str, Any]]
    speed: Any = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def table(self, title: str | None = None) -> str:
        from depthprune.bench.report import format_table

        return format_table(self.rows, title=title)

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "rows": self.rows,
            "settings": self.settings,
            "speed": None if self.speed is None else self.speed.to_dict(),
        }


def layers_run(model: nn.Module) -> int:
    from depthprune.adapters.registry import get_adapter

    adapter = get_adapter(model)
    return sum(len(adapter.run_sequence(model, s)) for s in adapter.present_stacks(model))


def evaluate_models(
    models: Mapping[str, nn.Module],
    tokenizer: Any,
    heldout_blocks: torch.Tensor,
    *,
    baseline: str = "full",
    speed: bool = True,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    progress: bool = False,
) -> EvalReport:
    """Held-out perplexity of each model, its layer count, theoretical decode speedup (FLOPs ratio) and, with
    `speed`, decode/prefill speedups measured side by side with the baseline."""
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not among the models {list(models)}")
    context = prompt_len + new_tokens // 2
    base_flops = estimate_flops(models[baseline], context)
    rows = []
    for name, model in models.items():
        flops = estimate_flops(model, context)
        rows.append(
            {
                "model": name,
                "layers": layers_run(model),
                "heldout_ppl": perplexity(model, heldout_blocks, progress=progress),
                "theoretical_speedup": base_flops.decode_per_token / flops.decode_per_token,
            }
        )
    report = EvalReport(
        baseline, rows, settings={"heldout_tokens": int(heldout_blocks.numel()), "context_for_flops": context}
    )
    if speed:
        from depthprune.bench.speed import compare_speed

        sp = compare_speed(
            dict(models),
            tokenizer,
            batch_sizes=tuple(batch_sizes),
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            repeats=repeats,
            baseline=baseline,
            progress=progress,
        )
        for row in rows:
            for b in batch_sizes:
                r = sp.result(row["model"], b)
                row[f"decode_speedup_b{b}"] = r.decode_ratio
                row[f"prefill_speedup_b{b}"] = r.prefill_ratio
                row[f"decode_tok_s_b{b}"] = r.decode_tokens_per_s
        report.speed = sp
    return report
