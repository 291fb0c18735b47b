"""Prefill and decode throughput of causal LMs, always measured side by side against a baseline model.

Models are timed interleaved on the same prompts, so machine noise hits every model alike: each repeat runs every
model once (round-robin, the starting model rotating each repeat), and with method='loop' the decode steps of the
models alternate step by step. Each figure is the median over repeats, and each model's speed is reported as a ratio
to the baseline measured in the same repeats. Speed is never asserted in unit tests: it belongs in benchmarks.

One measurement of a model at one batch size:
  prefill: the model's forward on a [batch, prompt_len] prompt with an empty KV cache (logits for the last position
      only, as generation computes them), timed alone;
  decode: `new_tokens` greedy steps from that prefill's cache, timed alone. method='loop' calls the model's own
      forward once per step with its KV cache, then takes the argmax (the model's cost and nothing else);
      method='generate' times the steps inside `model.generate(do_sample=False, ...)` by timestamping each step from
      a stopping criterion, so it includes generate's per-step bookkeeping (logits processors, stopping checks) and
      covers `new_tokens - 1` steps (the first token comes out of the prefill).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from depthprune.decoding import last_logits_only

METHODS = ("loop", "generate")


@dataclasses.dataclass(frozen=True)
class MachineInfo:
    """Where a measurement ran."""

    platform: str
    processor: str
    python: str
    cpu_count: int | None
    torch_threads: int
    torch_interop_threads: int
    torch_version: str
    transformers_version: str
    device: str
    load_average: tuple[float, float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def machine_info(device: str | torch.device = "cpu") -> MachineInfo:
    """Facts about this machine and the libraries, with torch's current thread settings and the load average (other
    processes competing for the CPUs make CPU timings noisy)."""
    import transformers

    device = str(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return MachineInfo(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        device=device,
        load_average=tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )


@dataclasses.dataclass(frozen=True)
class SpeedResult:
    """Timings of one model at one batch size; seconds per repeat, in repeat order (paired with the baseline's).

    prefill_ratio / decode_ratio: speed relative to the baseline (> 1 = faster), the median over repeats of
    baseline seconds / this model's seconds in the same repeat.
    """

    model: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    decode_steps: int
    prefill_seconds: tuple[float, ...]
    decode_seconds: tuple[float, ...]
    prefill_ratio: float
    decode_ratio: float

    def __post_init__(self) -> None:
        if not self.prefill_seconds or len(self.prefill_seconds) != len(self.decode_seconds):
            raise ValueError("a speed result needs the same number (at least one) of prefill and decode timings")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch_size * self.prompt_len / statistics.median(self.prefill_seconds)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size * self.decode_steps / statistics.median(self.decode_seconds)

    @property
    def decode_ms_per_step(self) -> float:
        return 1000.0 * statistics.median(self.decode_seconds) / self.decode_steps

    def row(self) -> dict[str, Any]:
        """The figures people read, as one flat table row."""
        return {
            "model": self.model,
            "batch": self.batch_size,
            "prefill_tok_s": self.prefill_tokens_per_s,
            "prefill_ratio": self.prefill_ratio,
            "decode_tok_s": self.decode_tokens_per_s,
            "decode_ms_step": self.decode_ms_per_step,
            "decode_ratio": self.decode_ratio,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), **self.row()}


@dataclasses.dataclass(frozen=True)
class SpeedReport:
    """Side-by-side speed of several models, with the baseline and the machine they ran on."""

    baseline: str
    results: tuple[SpeedResult, ...]
    machine: MachineInfo
    settings: Mapping[str, Any]

    def result(self, model: str, batch_size: int) -> SpeedResult:
        for r in self.results:
            if r.model == model and r.batch_size == batch_size:
                return r
        raise KeyError(f"no result for model {model!r} at batch size {batch_size}")

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.results]

    def table(self) -> str:
        from depthprune.bench.report import format_table

        m = self.machine
        title = (
            f"speed vs {self.baseline!r}: prompt {self.settings['prompt_len']}, {self.settings['new_tokens']} new "
            f"tokens ({self.settings['method']}), median of {self.settings['repeats']}; "
            f"{m.torch_threads} torch threads of {m.cpu_count} CPUs, {m.device}"
        )
        return format_table(self.rows(), title=title)

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "settings": dict(self.settings),
            "machine": self.machine.to_dict(),
            "results": [r.to_dict() for r in self.results],
        }


def random_prompts(
    tokenizer_or_vocab: Any, batch_size: int, prompt_len: int, *, seed: int = 0, vocab_limit: int | None = None
) -> torch.Tensor:
    """Fixed random prompts [batch_size, prompt_len] of real token ids (a tokenizer's special tokens left out).

    tokenizer_or_vocab: a tokenizer, or a vocabulary size (ids 0..vocab-1).
    vocab_limit: only ids below it (the smallest embedding table of the models compared).
    """
    if isinstance(tokenizer_or_vocab, int):
        ids = torch.arange(tokenizer_or_vocab)
    else:
        special = set(getattr(tokenizer_or_vocab, "all_special_ids", ()) or ())
        ids = torch.tensor([i for i in range(len(tokenizer_or_vocab)) if i not in special])
    if vocab_limit is not None:
        ids = ids[ids < vocab_limit]
    if ids.numel() == 0:
        raise ValueError("no token ids to draw prompts from: the vocabulary is empty")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, ids.numel(), (batch_size, prompt_len), generator=gen)
    return ids[pick]  # [batch, prompt_len]


def compare_speed(
    models: Mapping[str, nn.Module],
    tokenizer_or_vocab: Any,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    baseline: str = "full",
    *,
    method: str = "loop",
    threads: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> SpeedReport:
    """Prefill and decode tokens/s of every model at every batch size, measured interleaved, with ratios to `baseline`.

    models: name -> causal LM (eval mode; all on their own device); `baseline` must be one of the names.
    tokenizer_or_vocab: where prompt token ids come from (a tokenizer, or a vocabulary size).
    method: 'loop' (decode steps through the model's forward) or 'generate' (steps inside `model.generate`).
    threads: torch intra-op threads for the run (default: the current setting); set explicitly and recorded.
    """
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not among the models {list(models)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if prompt_len < 1 or repeats < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("prompt_len, repeats and batch sizes must be positive and warmup non-negative")
    if new_tokens < (2 if method == "generate" else 1):
        raise ValueError(f"new_tokens must be at least {2 if method == 'generate' else 1} for method {method!r}")
    decode_steps = new_tokens if method == "loop" else new_tokens - 1
    vocab_limit = min(m.get_input_embeddings().num_embeddings for m in models.values())
    names = list(models)

    old_threads = torch.get_num_threads()
    threads = old_threads if threads is None else threads
    was_training = {name: m.training for name, m in models.items()}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batch_sizes) * len(names) * (warmup + repeats), desc="speed", unit="run")
    try:
        torch.set_num_threads(threads)
        for m in models.values():
            m.eval()
        machine = machine_info(_device(next(iter(models.values()))))
        results = []
        for b in batch_sizes:
            prompt = random_prompts(tokenizer_or_vocab, b, prompt_len, seed=seed + b, vocab_limit=vocab_limit)
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            for r in range(warmup + repeats):
                order = names[r % len(names) :] + names[: r % len(names)]
                measured = _measure_round({name: models[name] for name in order}, prompt, new_tokens, method)
                if r >= warmup:
                    for name in names:
                        times[name].append(measured[name])
                if bar is not None:
                    bar.update(len(names))
            base = times[baseline]
            for name in names:
                prefill = tuple(t[0] for t in times[name])
                decode = tuple(t[1] for t in times[name])
                results.append(
                    SpeedResult(
                        model=name,
                        batch_size=b,
                        prompt_len=prompt_len,
                        new_tokens=new_tokens,
                        decode_steps=decode_steps,
                        prefill_seconds=prefill,
                        decode_seconds=decode,
                        prefill_ratio=_paired_ratio(base, times[name], 0),
                        decode_ratio=_paired_ratio(base, times[name], 1),
                    )
                )
    finally:
        torch.set_num_threads(old_threads)
        for name, m in models.items():
            m.train(was_training[name])
        if bar is not None:
            bar.close()
    settings = {
        "batch_sizes": list(batch_sizes),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "decode_steps": decode_steps,
        "repeats": repeats,
        "warmup": warmup,
        "method": method,
        "seed": seed,
        "threads": threads,
        "dtype": str(next(next(iter(models.values())).parameters()).dtype),
    }
    return SpeedReport(baseline=baseline, results=tuple(results), machine=machine, settings=settings)


# ---- one measurement --------------------------------------------------------------------------------------------


def _paired_ratio(base: list[tuple[float, float]], mine: list[tuple[float, float]], k: int) -> float:
    """Median over repeats of baseline seconds / this model's seconds, each pair measured in the same repeat."""
    return statistics.median(b[k] / m[k] for b, m in zip(base, mine, strict=True))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _measure_round(
    models: Mapping[str, nn.Module], prompt: torch.Tensor, new_tokens: int, method: str
) -> dict[str, tuple[float, float]]:
    """(prefill seconds, decode seconds) of every model for one repeat, models taken in the mapping's order.

    Prefills run one model after another. With method 'loop' the decode steps are interleaved too: step k of every
    model runs before step k+1 of any (the order rotating each step), so a burst of load from other processes lands
    on all models alike instead of on whichever model happened to be decoding. Garbage collection is paused.
    """
    names = list(models)
    prefill: dict[str, float] = {}
    decode: dict[str, float] = dict.fromkeys(names, 0.0)
    state: dict[str, tuple[Any, torch.Tensor]] = {}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name in names:
            model = models[name]
            ids = prompt.to(_device(model))  # [batch, prompt_len]
            extra = last_logits_only(model)
            out, prefill[name] = _timed(_device(model), model, input_ids=ids, use_cache=True, **extra)
            if method == "generate":
                del out
                decode[name] = _decode_generate(model, ids, new_tokens, _device(model))
            else:
                state[name] = (out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True))  # token [batch, 1]
        if method == "loop":
            for step in range(new_tokens):
                for name in names[step % len(names) :] + names[: step % len(names)]:
                    model = models[name]
                    state[name], seconds = _timed(_device(model), _greedy_step, model, state[name])
                    decode[name] += seconds
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: (prefill[name], decode[name]) for name in names}


def _greedy_step(model: nn.Module, state: tuple[Any, torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """One decoding step: the model's forward on the last token with its KV cache, then the greedy next token."""
    cache, token = state  # token [batch, 1]
    from depthprune.decoding import cache_kwarg

    out = model(input_ids=token, **{cache_kwarg(model): cache}, use_cache=True)
    return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)


def _timed(device: torch.device, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """fn(*args, **kwargs) and the seconds it took, waiting for `device` to finish its work."""
    _sync(device)
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    _sync(device)
    return result, time.perf_counter() - t0


def _decode_generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class StepClock(StoppingCriteria):
        """Never stops; records when each generation step ends."""

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            _sync(device)
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        min_new_tokens=new_tokens,
        max_new_tokens=new_tokens,
        pad_token_id=pad,
        stopping_criteria=StoppingCriteriaList([StepClock()]),
    )
    if len(stamps) != new_tokens:
        raise RuntimeError(f"generate ran {len(stamps)} steps, expected {new_tokens}")
    # stamps[0] ends the step whose token came out of the prefill; the rest are decode steps
    return stamps[-1] - stamps[0]
