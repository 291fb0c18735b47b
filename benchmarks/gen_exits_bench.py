"""Early exit in text generation on SmolLM2: agreement with plain greedy decoding vs measured decode speedup.

    OMP_NUM_THREADS=1 python benchmarks/gen_exits_bench.py out/smollm2-lens --out benchmarks/gen_exits

(out/smollm2-lens: decoder exit heads written by `depthprune train-exits --model smollm2 --kind lens --output-dir
out/smollm2-lens`). Defaults (8 held-out prompts of 64 tokens, 24 new tokens, 2 thresholds per criterion, 3 repeats:
32 configurations, 40 with CALM's classifier) take about 10-15 minutes on one otherwise idle CPU thread; --calibrate
adds each criterion's Learn-then-Test threshold (64 calibration prompts: several minutes more per criterion).

For every token criterion the heads support x a few thresholds of its grid (from the conservative end towards the
aggressive one, plus the LTT-calibrated threshold with --calibrate) x kv in (propagate, recompute) x prefill in (deep,
shallow), on prompts drawn from the held-out Moby-Dick text:
- agreement: token agreement (share of positions equal), ROUGE-L F1 and share of identical continuations, against
  plain greedy `model.generate` on the same prompts in the same run; both generate exactly --max-new-tokens tokens
  (no stop at end of sequence: the end-of-sequence token is a token like any other);
- mean decoder layers run per generated token;
- decode speed at batch 1 and batch 8 as a RATIO to plain greedy `model.generate` measured in the same run: every
  repeat runs the baseline and every configuration once, in a rotating order (interleaved, so a burst of load from
  other processes hits all alike), after --warmup short runs of each; the figure is the median over repeats of
  baseline seconds / configuration seconds. Decode time covers the max_new_tokens - 1 steps after the first token
  (prefill excluded) on both sides; the baseline is forced to the same length (min_new_tokens = max_new_tokens);
- what each criterion costs per decoding step (batch 1 and 8): one decoder layer (with the prompt's KV cache), the
  exit head (translator + final norm + projection onto the vocabulary), the softmax decisions, saturation's cosine,
  the CALM classifier.

Writes into --out: gen_exits_bench.json (everything, with the machine), gen_exits_table.txt and gen_exits_table.md
(the table, plain and markdown), gen_exits_pareto.png (agreement vs speedup, batch 1 and batch 8).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import statistics
import time
from pathlib import Path

import torch

from depthprune.bench.generation import (
    add_timing_arguments,
    check_timing_arguments,
    interleaved_seconds,
    markdown_table,
    speed_ratios,
)
from depthprune.bench.report import format_table, to_jsonable
from depthprune.bench.speed import _decode_generate, machine_info
from depthprune.data import calibration_text, heldout_text
from depthprune.exits.lm_heads import DecoderExitHeads
from depthprune.exits.token_criteria import TokenState, criterion_class, make_criterion
from depthprune.fsutil import write_atomic
from depthprune.generation.calibrate import (
    calibrate_generation,
    early_exit_continuations,
    greedy_continuations,
    prompt_blocks,
    rouge_l,
    supported_criteria,
    token_consistency,
)
from depthprune.generation.generate import early_exit_generate
from depthprune.io import load_model, load_tokenizer

NO_EOS = ()  # generate exactly max_new_tokens tokens on both sides


def parse_exit(text: str, names: list[str]) -> tuple[str, float]:
    """'max_prob:0.9' -> ('max_prob', 0.9), for a criterion these heads support."""
    name, sep, value = text.partition(":")
    try:
        threshold = float(value)
    except ValueError:
        threshold = None
    if not sep or threshold is None or name not in names:
        raise SystemExit(f"--exits takes NAME:THRESHOLD with NAME one of {names} (for these heads), got {text!r}")
    return name, threshold


def pick_thresholds(name: str, k: int) -> list[float]:
    """k thresholds spread over the inside of the criterion's grid (its first, never-exiting end left out)."""
    grid = criterion_class(name).grid()
    idx = torch.linspace(1, len(grid) - 1, k + 2)[1:-1].round().long().tolist()
    return [grid[i] for i in dict.fromkeys(idx)]


# ---- agreement ----------------------------------------------------------------------------------------------------
def agreement(model, heads, prompts, refs, config, max_new_tokens, batch_size) -> dict:
    got = early_exit_continuations(
        model,
        heads,
        prompts,
        config["criterion"],
        max_new_tokens,
        kv=config["kv"],
        deep_prefill=config["prefill"] == "deep",
        batch_size=batch_size,
        eos_token_id=NO_EOS,
    )
    pairs = list(zip(got.tokens, refs, strict=True))
    return {
        "agreement": sum(token_consistency(c, r) for c, r in pairs) / len(pairs),
        "rouge_l": sum(rouge_l(c, r) for c, r in pairs) / len(pairs),
        "identical": sum(int(c == r) for c, r in pairs) / len(pairs),
        "mean_layers": got.mean_layers(),
    }


# ---- speed --------------------------------------------------------------------------------------------------------
def decode_seconds(model, heads, ids, config, max_new_tokens) -> float:
    """Seconds of the max_new_tokens - 1 decode steps after the first token (None config: plain generate)."""
    if config is None:
        return _decode_generate(model, ids, max_new_tokens, ids.device)
    out = early_exit_generate(
        model,
        heads,
        ids,
        criterion=config["criterion"],
        max_new_tokens=max_new_tokens,
        kv=config["kv"],
        deep_prefill=config["prefill"] == "deep",
        eos_token_id=NO_EOS,
        return_exit_layers=False,
        timing=True,
    )
    return sum(out.step_times[1:])


@torch.inference_mode()
def speed(model, heads, prompts, configs, batch_size, max_new_tokens, repeats, warmup, progress) -> dict:
    """Interleaved timing: each round runs the baseline and every configuration once, in a rotating order."""
    ids = prompts[:batch_size]
    names = ["generate", *configs]

    def runs(n_tokens):
        return {c: functools.partial(decode_seconds, model, heads, ids, configs.get(c), n_tokens) for c in names}

    label = f"batch {batch_size}" if progress else None  # warm-up: short runs (the first call of a path is slow)
    times = interleaved_seconds(
        runs(max_new_tokens), repeats, warmup=warmup, warmup_runs=runs(min(4, max_new_tokens)), label=label
    )
    return speed_ratios(times, "generate", batch_size * (max_new_tokens - 1))


# ---- what a criterion costs ---------------------------------------------------------------------------------------
def per_call_ms(fn, *args, repeats: int = 20, reset=None) -> float:
    """Median milliseconds of fn(*args) over `repeats` calls (after one warm-up); reset() runs untimed after each."""
    fn(*args)
    if reset:
        reset()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t0)
        if reset:
            reset()
    return 1000 * statistics.median(out)


def decide(crit, heads, layer, h, prev, logits):
    """One decision on a fresh state (so nothing computed lazily is kept from an earlier call); with `logits` given,
    the decision alone, without the exit head."""
    state = TokenState(
        layer, heads.num_layers, h[:, -1], prev[:, -1], logits=logits,
        confidence_fn=lambda: heads.confidence(layer, h)[:, -1],
    )  # fmt: skip
    return crit.decide(state)


@torch.inference_mode()
def criterion_costs(model, heads, prompts, names) -> list[dict]:
    """Milliseconds per token and exit, at batch 1 and 8: a decoder layer, the exit head, each criterion's decision."""
    from transformers.cache_utils import DynamicCache

    from depthprune.adapters.registry import get_adapter
    from depthprune.decoding import step_inputs
    from depthprune.exits.token_criteria import probs
    from depthprune.runner import capture_stack

    adapter = get_adapter(model)
    layers = adapter.run_sequence(model, "decoder")
    mid = heads.layers[len(heads.layers) // 2]
    rows = []
    for bs in (1, 8):
        ids = prompts[:bs]
        cache = DynamicCache(config=model.config)
        model(**step_inputs(model, ids, None, None, cache))
        hidden, stack = capture_stack(model, step_inputs(model, ids[:, -1:], None, None, cache), adapter=adapter)
        call = stack.calls[mid]  # [bs, 1, hidden] enters; the arguments of layer `mid`
        kv = cache.layers[mid]
        kept = (kv.keys, kv.values)  # [bs, heads, n, dim]: restored after each timed call, which appends a position

        def reset(kv=kv, kept=kept):
            kv.keys, kv.values = kept

        h = call.run(layers[mid], hidden)
        reset()
        logits = heads.logits(mid, h)[:, -1]  # [bs, vocab]
        row = {
            "batch": bs,
            "layer_ms": per_call_ms(call.run, layers[mid], hidden, reset=reset),
            "exit_head_ms": per_call_ms(heads.logits, mid, h),
            "softmax_max_ms": per_call_ms(lambda x: probs(x).max(-1), logits),
        }
        for name in names:
            crit = make_criterion(name, pick_thresholds(name, 1)[0])
            key = "learned_ms" if name == "learned" else f"{name}_decide_ms"  # learned: the classifier runs too
            row[key] = per_call_ms(decide, crit, heads, mid, h, hidden, None if name == "learned" else logits)
        row["head_in_layers"] = row["exit_head_ms"] / row["layer_ms"]
        rows.append(row)
    return rows


# ---- figures --------------------------------------------------------------------------------------------------------
def pareto_png(rows, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5))
    FigureCanvasAgg(fig)
    criteria = sorted({r["criterion"] for r in rows})
    colors = dict(zip(criteria, ["C0", "C1", "C2", "C3", "C4", "C5"], strict=False))
    markers = {("propagate", "deep"): "o", ("propagate", "shallow"): "s", ("recompute", "deep"): "^"}
    markers[("recompute", "shallow")] = "v"
    for k, bs in enumerate((1, 8)):
        ax = fig.add_subplot(1, 2, k + 1)
        for r in rows:
            x = r.get(f"speedup_b{bs}")
            if x is None:
                continue
            ax.plot(x, 100 * r["agreement"], markers[(r["kv"], r["prefill"])], c=colors[r["criterion"]], ms=5)
            ax.annotate(f"{r['threshold']:g}", (x, 100 * r["agreement"]), fontsize=5)
        ax.plot(1.0, 100.0, "k*", ms=10, label="plain greedy generate")
        for name in criteria:
            ax.plot([], [], "o", c=colors[name], label=name)
        for (kv, prefill), m in markers.items():
            ax.plot([], [], m, c="gray", label=f"kv={kv}, {prefill} prefill")
        ax.axvline(1.0, ls="--", c="gray", lw=0.8)
        ax.set_xlabel(f"decode speed / plain greedy generate, batch {bs}")
        ax.set_ylabel("token agreement with plain greedy (%)")
        ax.set_title(f"{title}, batch {bs}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    write_atomic(path, png.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("heads", help="folder of decoder exit heads (train-exits on the model)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts for agreement (>= 8: batch 8 is timed)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--thresholds", type=int, default=2, help="thresholds per criterion, spread over its grid")
    p.add_argument("--criteria", nargs="*", default=None, help="default: every criterion the heads support")
    p.add_argument(
        "--exits",
        nargs="+",
        default=None,
        metavar="NAME:THRESHOLD",
        help="exactly these criterion:threshold pairs instead of --thresholds picks from each criterion's grid",
    )
    p.add_argument("--agreement-only", action="store_true", help="measure agreement and layers run, no timing")
    p.add_argument("--kv", nargs="+", default=["propagate", "recompute"])
    p.add_argument("--prefill", nargs="+", default=["deep", "shallow"], choices=["deep", "shallow"])
    p.add_argument("--calibrate", action="store_true", help="add each criterion's LTT threshold (kv propagate, deep)")
    p.add_argument("--cal-prompts", type=int, default=64, help="calibration prompts for --calibrate")
    p.add_argument("--delta", type=float, default=0.2, help="--calibrate: 1 - expected token agreement allowed")
    p.add_argument("--epsilon", type=float, default=0.05)
    add_timing_arguments(p)
    p.add_argument("--out", default="benchmarks/gen_exits")
    args = p.parse_args()
    check_timing_arguments(p, args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    model = load_model(args.model, task="causal-lm").eval()
    tokenizer = load_tokenizer(args.model)
    heads = DecoderExitHeads.load(args.heads, model).eval()
    names = [n for n in (args.criteria or supported_criteria(heads)) if n in supported_criteria(heads)]
    prompts = prompt_blocks(tokenizer, heldout_text(), args.prompts, args.prompt_len)
    refs = greedy_continuations(model, prompts, args.max_new_tokens, eos_token_id=NO_EOS)

    if args.exits:
        pairs = [parse_exit(text, names) for text in args.exits]
        names = list(dict.fromkeys(n for n, _ in pairs))
        thresholds = {n: [t for m, t in pairs if m == n] for n in names}
    else:
        thresholds = {n: pick_thresholds(n, args.thresholds) for n in names}
    calibrations = {}
    if args.calibrate:
        cal = prompt_blocks(tokenizer, calibration_text(), args.cal_prompts, args.prompt_len)
        for name in names:
            print(f"calibrating {name} ...", flush=True)
            result = calibrate_generation(
                model, heads, cal, name, delta=args.delta, epsilon=args.epsilon, max_new_tokens=args.max_new_tokens,
                eos_token_id=NO_EOS, progress=True,
            )  # fmt: skip
            calibrations[name] = result.to_dict()
            print(result.guarantee())
            if result.threshold is not None and result.threshold not in thresholds[name]:
                thresholds[name].append(result.threshold)

    configs = {}
    for name in names:
        for t in thresholds[name]:
            for kv in args.kv:
                for prefill in args.prefill:
                    key = f"{name}:{t:g}/{kv}/{prefill}"
                    calibrated = calibrations.get(name, {}).get("threshold") == t
                    configs[key] = {"criterion": make_criterion(name, t), "name": name, "threshold": t, "kv": kv,
                                    "prefill": prefill, "calibrated": calibrated}  # fmt: skip

    rows = []
    print(f"agreement of {len(configs)} configurations on {len(prompts)} held-out prompts ...", flush=True)
    with torch.inference_mode():
        for key, c in configs.items():
            figs = agreement(model, heads, prompts, refs, c, args.max_new_tokens, max(args.batch_sizes))
            rows.append({"config": key, "criterion": c["name"], "threshold": c["threshold"], "kv": c["kv"],
                         "prefill": c["prefill"], "ltt": c["calibrated"], **figs,
                         "layers_saved": 1 - figs["mean_layers"] / heads.num_layers})  # fmt: skip
    timings = {}
    for bs in [] if args.agreement_only else args.batch_sizes:
        print(f"timing at batch {bs} ...", flush=True)
        timings[bs] = speed(model, heads, prompts, configs, bs, args.max_new_tokens, args.repeats, args.warmup, True)
        for row in rows:
            row[f"speedup_b{bs}"] = timings[bs][row["config"]]["ratio"]
            row[f"tok_s_b{bs}"] = timings[bs][row["config"]]["tok_s"]
    print("measuring per-token costs ...", flush=True)
    costs = [] if args.agreement_only else criterion_costs(model, heads, prompts, names)

    columns = ["criterion", "threshold", "kv", "prefill", "ltt", "agreement", "rouge_l", "identical", "mean_layers",
               "layers_saved"] + [f"speedup_b{bs}" for bs in timings]  # fmt: skip
    base = {bs: timings[bs]["generate"]["tok_s"] for bs in timings}
    title = (
        f"{args.model} + {Path(args.heads).name} ({heads.config.kind} exits after {len(heads.layers)} of "
        f"{heads.num_layers} layers): {len(prompts)} held-out prompts of {args.prompt_len} tokens, "
        f"{args.max_new_tokens} new tokens; speedup = decode speed / plain greedy generate in the same run "
        f"(median of {args.repeats}; generate: "
        + (", ".join(f"{base[bs]:.1f} tok/s at batch {bs}" for bs in timings) or "not timed")
        + f"); {torch.get_num_threads()} thread(s)"
    )
    table = format_table(rows, columns=columns, title=title)
    cost_cols = list(dict.fromkeys(k for r in costs for k in r))
    cost_table = format_table(costs, columns=cost_cols, title="cost per token and exit (ms): layer vs head vs decision")
    print(table)
    print(cost_table)
    write_atomic(out / "gen_exits_table.txt", table + "\n\n" + cost_table + "\n")
    write_atomic(
        out / "gen_exits_table.md",
        f"{title}\n\n{markdown_table(rows, columns)}\n\n"
        f"cost per token and exit (ms)\n\n{markdown_table(costs, cost_cols)}\n",
    )
    if timings:
        pareto_png(rows, out / "gen_exits_pareto.png", f"{args.model}, {heads.config.kind} exits")
    report = {
        "rows": rows,
        "costs": costs,
        "calibrations": calibrations,
        "baseline_tok_s": base,
        "raw_seconds": {str(bs): {k: v["seconds"] for k, v in t.items()} for bs, t in timings.items()},
        "heads": heads.config.to_dict(),
        "machine": machine_info().to_dict(),
        "args": vars(args),
        "wall_seconds": time.perf_counter() - t_start,
    }
    write_atomic(out / "gen_exits_bench.json", json.dumps(to_jsonable(report), indent=2) + "\n")
    print(f"wrote {out}/gen_exits_bench.json, gen_exits_table.txt/.md, gen_exits_pareto.png "
          f"in {report['wall_seconds']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
