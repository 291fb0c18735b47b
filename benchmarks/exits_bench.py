"""Early exit on SpamAssassin: accuracy vs measured wall-clock speedup for every recipe and criterion.

For each trained model folder (backbone + exit heads, written by `depthprune train-exits`):
1. record every exit's outputs on the calibration and test splits (the splits training used: same seed);
2. for every criterion the heads support: calibrate its threshold with Learn-then-Test for each risk (disagreement
   with the full model <= delta, and/or the accuracy drop <= delta, with probability >= 1 - epsilon), check the
   guarantee on the test split, and sweep its whole threshold grid (accuracy and mean layers from an exact offline
   replay of the criterion);
3. time the calibrated configurations on a fixed subset of the test split at batch 1 and batch 32, interleaved with the
   untouched classifier (the plain model forward) in the same run: median of repeats, ratio to the full model;
4. measure what each criterion costs per exit (head + decision) next to one layer.

Writes a table (stdout + RESULTS-ready markdown), JSON, and a Pareto PNG (accuracy vs wall-clock speedup).

    python benchmarks/exits_bench.py out/minilm-spam-two_stage out/minilm-spam-joint --out benchmarks/exits
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from depthprune.bench.report import format_table, write_json
from depthprune.bench.speed import machine_info
from depthprune.exits.calibrate import RISKS, calibrate, check, collect_records, simulate
from depthprune.exits.criteria import ExitState, criterion_class, list_criteria, make_criterion
from depthprune.exits.data import spam_assassin, split, tokenize_batches
from depthprune.exits.evaluate import speedups, time_exit_configs
from depthprune.exits.heads import ExitHeads
from depthprune.io import load_model, load_tokenizer


def usable(name: str, heads: ExitHeads) -> bool:
    return all(need in heads.config.extras for need in criterion_class(name).needs)


def per_call_ms(fn, *args, repeats: int = 30) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return 1000 * (time.perf_counter() - start) / repeats


@torch.inference_mode()
def criterion_costs(model, heads, tokenizer, texts, max_length):
    """Milliseconds per exit of: one layer, one exit head, and each criterion's decision, at batch 1 and 32."""
    from depthprune.adapters.registry import get_adapter
    from depthprune.runner import capture_layer_inputs

    rows = []
    adapter = get_adapter(model)
    stack = adapter.present_stacks(model)[-1]
    layers = adapter.run_sequence(model, stack)
    for bs in (1, 32):
        batch = tokenizer(texts[:bs], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden, call = capture_layer_inputs(model, dict(batch), stack=stack, adapter=adapter)
        hidden = call.run(layers[0], hidden)
        mask = batch["attention_mask"]
        row = {
            "batch": bs,
            "layer_ms": per_call_ms(call.run, layers[1], hidden),
            "head_ms": per_call_ms(heads, 1, hidden, mask),
        }
        first, out = heads(0, hidden, mask), heads(1, hidden, mask)
        halting = [first.halting, out.halting] if out.halting is not None else []
        state = ExitState(
            1, heads.config.num_layers, out.logits, [first.logits, out.logits], halting, out.gate, out.agreement
        )
        for name in list_criteria():
            if usable(name, heads):
                crit = make_criterion(name, criterion_class(name).grid()[2])
                row[f"{name}_ms"] = per_call_ms(crit.decide, state)
        rows.append(row)
    return rows


def pareto_png(points, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6))
    FigureCanvasAgg(fig)
    for k, bs in enumerate((1, 32)):
        ax = fig.add_subplot(1, 2, k + 1)
        for recipe in sorted({p["recipe"] for p in points}):
            pts = sorted((p for p in points if p["recipe"] == recipe), key=lambda p: p[f"speedup_b{bs}"])
            ax.plot([p[f"speedup_b{bs}"] for p in pts], [100 * p["accuracy"] for p in pts], "o", label=recipe)
            for p in pts:
                ax.annotate(p["criterion"], (p[f"speedup_b{bs}"], 100 * p["accuracy"]), fontsize=6)
        full = points[0]["full_accuracy"] * 100
        ax.axhline(full, ls="--", c="gray", lw=0.8, label="full model")
        ax.axhline(full - 0.5, ls=":", c="red", lw=0.8, label="full - 0.5 pt")
        ax.set_xlabel(f"measured wall-clock speedup, batch {bs}")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"SpamAssassin test, MiniLM-L6, batch {bs}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="folders written by train-exits")
    p.add_argument("--data", default="../shared/data/spam-assassin.jsonl")
    p.add_argument("--seed", type=int, default=0, help="the split seed training used")
    p.add_argument("--delta", type=float, default=0.005)
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument(
        "--risks",
        nargs="+",
        default=["disagreement", "accuracy_drop"],
        choices=RISKS,
        help="what the calibration bounds by delta: disagreement with the full model, and/or the accuracy drop",
    )
    p.add_argument("--timing-samples", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--criteria", nargs="*", default=None)
    p.add_argument("--out", default="benchmarks/exits")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    splits = split(spam_assassin(args.data), seed=args.seed)
    timing = splits.test.subset(range(min(args.timing_samples, len(splits.test))))
    summary_rows, sweep_rows, points, costs, raw = [], [], [], {}, {}
    for folder in args.models:
        recipe = Path(folder).name
        model = load_model(folder, task="seq-cls").eval()
        tokenizer = load_tokenizer(folder)
        heads = ExitHeads.load(folder, model).eval()
        cal = collect_records(model, heads, tokenize_batches(tokenizer, splits.calibration, 32, args.max_length))
        test = collect_records(model, heads, tokenize_batches(tokenizer, splits.test, 32, args.max_length))
        full_acc = float((test.final.argmax(-1) == test.labels).float().mean())
        names = [n for n in (args.criteria or list_criteria()) if usable(n, heads)]
        configs: dict[str, object] = {}
        for name in names:
            for t in criterion_class(name).grid():
                figs = check(make_criterion(name, t), test)
                sweep_rows.append(
                    {
                        "recipe": recipe,
                        "criterion": name,
                        "threshold": t,
                        "accuracy": figs["accuracy"],
                        "agreement": figs["agreement"],
                        "mean_layers": figs["mean_layers"],
                    }
                )
            for risk in args.risks:
                result = calibrate(name, cal, delta=args.delta, epsilon=args.epsilon, risk=risk)
                base = {"recipe": recipe, "risk": risk, "criterion": name, "threshold": result.threshold}
                if result.threshold is None:
                    summary_rows.append({**base, "note": "no threshold certified"})
                    continue
                crit = make_criterion(name, result.threshold)
                figs = check(crit, test)
                configs.setdefault(f"{name}:{result.threshold:g}", crit)
                summary_rows.append(
                    {
                        **base,
                        "test_acc": figs["accuracy"],
                        "full_acc": full_acc,
                        "acc_drop_pts": 100 * (full_acc - figs["accuracy"]),
                        "agreement": figs["agreement"],
                        "mean_layers": figs["mean_layers"],
                        "layers_saved": 1 - figs["mean_layers"] / test.num_layers,
                    }
                )
        for bs in (1, 32):
            all_times = time_exit_configs(
                model,
                heads,
                list(configs.items()),
                timing,
                tokenizer,
                batch_size=bs,
                repeats=args.repeats,
                max_length=args.max_length,
            )
            raw[f"{recipe}/b{bs}"] = all_times
            ratio = speedups(all_times)
            full_median = statistics.median(all_times["full"])
            for row in summary_rows:
                if row["recipe"] == recipe and row.get("threshold") is not None:
                    key = f"{row['criterion']}:{row['threshold']:g}"
                    row[f"speedup_b{bs}"] = ratio[key]
                    row[f"full_ms_per_sample_b{bs}"] = 1000 * full_median / len(timing)
        # timing subset: layers used on exactly those samples, to compare with the measured speedup
        for row in summary_rows:
            if row["recipe"] == recipe and row.get("threshold") is not None:
                _, layers = simulate(
                    make_criterion(row["criterion"], row["threshold"]), test.subset(torch.arange(len(timing)))
                )
                row["timing_mean_layers"] = float((layers + 1).float().mean())
                points.append({**row, "accuracy": row["test_acc"], "full_accuracy": full_acc})
        costs[recipe] = criterion_costs(model, heads, tokenizer, timing.texts, args.max_length)

    cols = [
        "recipe",
        "risk",
        "criterion",
        "threshold",
        "test_acc",
        "full_acc",
        "acc_drop_pts",
        "agreement",
        "mean_layers",
        "layers_saved",
        "speedup_b1",
        "speedup_b32",
        "timing_mean_layers",
    ]
    table = format_table(
        summary_rows,
        columns=cols,
        title=(
            f"calibrated thresholds (LTT, w.p. >= {1 - args.epsilon:g}: risk 'disagreement' keeps agreement >= "
            f"{1 - args.delta:g}, risk 'accuracy_drop' keeps the accuracy drop <= {100 * args.delta:g} pts); "
            f"test n={len(splits.test)}, timing n={len(timing)}, {args.threads} thread(s)"
        ),
    )
    print(table)
    for recipe, rows in costs.items():
        print(format_table(rows, title=f"{recipe}: cost per exit (ms)"))
    if points:
        pareto_png(points, out / "pareto.png")
    write_json(
        {
            "summary": summary_rows,
            "sweep": sweep_rows,
            "costs": costs,
            "raw_seconds": raw,
            "machine": machine_info().to_dict(),
            "args": vars(args),
        },
        out / "exits_bench.json",
    )
    (out / "exits_table.txt").write_text(table + "\n")
    print(f"wrote {out / 'exits_bench.json'}, {out / 'pareto.png'}")


if __name__ == "__main__":
    main()
