"""What the generation benchmarks (benchmarks/gen_exits_bench.py, benchmarks/spec_bench.py) and `depthprune generate
--compare` share: their timing options, interleaved timing against a baseline measured in the same rounds, the speed
ratios taken from it, tokens/s of decoders side by side with plain greedy `generate`, markdown tables."""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn


def add_timing_arguments(p: argparse.ArgumentParser) -> None:
    """--batch-sizes, --repeats, --warmup and --threads: how a generation benchmark times."""
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="short (4-token) warm-up runs of each, per batch")
    p.add_argument("--threads", type=int, default=1)


def check_timing_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An argparse error unless --max-new-tokens >= 2 (decode time covers the steps after the first token) and
    --prompts >= the largest batch size (each batch size is timed on the first prompts)."""
    if args.max_new_tokens < 2:
        p.error("--max-new-tokens must be >= 2 (decode time covers the steps after the first token)")
    if args.prompts < max(args.batch_sizes):
        p.error(f"--prompts must be >= the largest batch size ({max(args.batch_sizes)})")


def interleaved_seconds(
    runs: Mapping[str, Callable[[], float]],
    repeats: int,
    *,
    warmup: int = 1,
    warmup_runs: Mapping[str, Callable[[], object]] | None = None,
    label: str | None = None,
) -> dict[str, list[float]]:
    """Seconds of every entry of `runs` per round (each callable times itself and returns its seconds).

    Each of `repeats` rounds calls every entry once, the starting entry rotating from round to round, so a burst of
    load from other processes hits all alike; garbage collection is paused during each call. Before the rounds,
    `warmup` untimed rounds call `warmup_runs` (default: `runs`): the first call of each code path is slow.
    label: print one progress line per round, starting with it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(runs)
    for _ in range(warmup):
        for fn in (warmup_runs or runs).values():
            fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        t0 = time.perf_counter()
        for name in order:
            gc.collect()
            gc.disable()
            try:
                times[name].append(runs[name]())
            finally:
                gc.enable()
        if label is not None:
            print(f"  {label}: round {r + 1}/{repeats} took {time.perf_counter() - t0:.0f} s", flush=True)
    return times


def speed_ratios(times: Mapping[str, Sequence[float]], baseline: str, tokens: int) -> dict[str, dict[str, Any]]:
    """Per entry: ratio, the median over rounds of baseline seconds / the entry's seconds in the same round (> 1:
    faster than the baseline); tok_s, `tokens` / the entry's median seconds; seconds, as measured.

    Times derived by subtraction (a call minus a separately timed prefill) can come out <= 0 when the part left is
    lost in the noise (tiny models): such rounds are left out, and ratio / tok_s are None when no round is left."""
    base = times[baseline]
    out = {}
    for name, seconds in times.items():
        pairs = [(b, t) for b, t in zip(base, seconds, strict=True) if b > 0 and t > 0]
        valid = [t for t in seconds if t > 0]
        out[name] = {
            "ratio": statistics.median(b / t for b, t in pairs) if pairs else None,
            "tok_s": tokens / statistics.median(valid) if valid else None,
            "seconds": list(seconds),
        }
    return out


def new_tokens(new: torch.Tensor, eos: Sequence[int]) -> int:
    """Real tokens of generated continuations new [batch, new]: each row up to and including its first
    end-of-sequence token (the padding after it does not count)."""
    if not len(eos):
        return int(new.numel())
    hit = torch.isin(new, torch.tensor(list(eos), device=new.device))
    after = torch.cumsum(hit.long(), 1) - hit.long() > 0
    return int((~after).sum())


def plain_greedy(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: Sequence[int],
    pad_token_id: int,
) -> torch.Tensor:
    """Plain greedy `model.generate` (the baseline every decoder is compared with): [batch, prompt + new]."""
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(eos_token_id) or None)
    config.pad_token_id = pad_token_id
    config.temperature = config.top_p = config.top_k = None
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=attention_mask, generation_config=config)


def plain_sample(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Plain sampling `model.generate(do_sample=True)` with only temperature and top-k (the baseline of a sampling
    decoder; no top-p or other warpers the model's generation config may carry): [batch, prompt + new]."""
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=True, max_new_tokens=max_new_tokens, eos_token_id=list(eos_token_id) or None)
    config.pad_token_id = pad_token_id
    config.temperature, config.top_k, config.top_p = temperature, top_k, None
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=attention_mask, generation_config=config)


def compare_tokens_per_s(
    runs: Mapping[str, Callable[[], int]], baseline: str, *, repeats: int = 3, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """Tokens/s of decoders side by side: each entry of `runs` generates once and returns how many real new tokens it
    made; every entry is timed `repeats` times, interleaved (`interleaved_seconds`), after `warmup` untimed rounds.

    Per entry: tok_s (tokens / median seconds), ratio (median over rounds of its tokens/s / the baseline's tokens/s in
    the same round; > 1: faster), seconds (per round) and tokens. Whole calls, prefill included."""
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the runs {list(runs)}")
    tokens: dict[str, int] = {}

    def timed(name: str) -> float:
        start = time.perf_counter()
        tokens[name] = runs[name]()
        return time.perf_counter() - start

    times = interleaved_seconds({n: (lambda n=n: timed(n)) for n in runs}, repeats, warmup=warmup)
    base = times[baseline]
    out = {}
    for name, seconds in times.items():
        rates = [tokens[name] / t / (tokens[baseline] / b) for t, b in zip(seconds, base, strict=True)]
        out[name] = {
            "tok_s": tokens[name] / statistics.median(seconds),
            "ratio": statistics.median(rates),
            "seconds": list(seconds),
            "tokens": tokens[name],
        }
    return out


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of `rows` (one dict per row): floats to 3 significant digits, a missing value as "-"."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


__all__ = [
    "add_timing_arguments",
    "check_timing_arguments",
    "compare_tokens_per_s",
    "interleaved_seconds",
    "markdown_table",
    "new_tokens",
    "plain_greedy",
    "speed_ratios",
]
