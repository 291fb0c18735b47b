"""Measured speedup of a depth-pruned model against its theoretical FLOPs ratio, and the cost of apply_plan itself.

Times three models side by side (interleaved, median of repeats): the untouched model ("full", the baseline), the
same model passed through apply_plan with the identity plan ("identity", should be ~1.00), and a plan dropping some
layers ("pruned"). Prints measured prefill/decode ratios next to the theoretical FLOPs ratios, and splits the decode
step time into a per-layer part and a fixed part (embedding, head, Python) fitted from the full and pruned models.

Targets (the issue): pruned decode speedup >= 0.95 x theoretical FLOPs ratio at every batch size; identity at most
2% slower than the untouched model (ratio >= 0.98).

    python benchmarks/speed_check.py                        # SmolLM2-135M, drop layers 20-27, batch 1 and 8
    python benchmarks/speed_check.py --method both --json speed.json
"""

from __future__ import annotations

import argparse
import statistics

import torch

from depthprune import LayerPlan, apply_plan, load_model, load_tokenizer
from depthprune.bench.flops import estimate_flops
from depthprune.bench.report import format_table, write_json
from depthprune.bench.speed import SpeedReport, compare_speed
from depthprune.static.apply import layer_sizes

DECODE_TARGET = 0.95  # measured decode speedup / theoretical FLOPs ratio
IDENTITY_TARGET = 0.98  # identity-plan speed / untouched speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded SmolLM2-135M)")
    parser.add_argument("--drop", default="20-27", help="source layers to remove, plan syntax (default: 20-27)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: robust on shared CPUs)")
    parser.add_argument(
        "--method",
        choices=["loop", "generate", "both"],
        default="loop",
        help="decode timing: model forward per step (loop), inside model.generate (generate), or both",
    )
    parser.add_argument("--json", default=None, help="also write every timing and figure to this JSON file")
    args = parser.parse_args()

    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    sizes = layer_sizes(model)
    (stack,) = sizes  # one-stack causal LM
    remove = LayerPlan.parse(args.drop).stacks
    remove = remove.get(stack, next(iter(remove.values())))
    models = {
        "full": model,
        "identity": apply_plan(model, LayerPlan.identity(sizes)),
        "pruned": apply_plan(model, LayerPlan.drop(sizes, remove)),
    }
    n_full, n_pruned = sizes[stack], layer_sizes(models["pruned"])[stack]
    print(f"{n_full} layers; pruned runs {n_pruned} (removed {args.drop})")

    # prefill sees prompt_len tokens; decode steps see prompt_len .. prompt_len + new_tokens, so take the middle
    prefill_flops = {n: estimate_flops(m, args.prompt_len).prefill_per_token for n, m in models.items()}
    decode_ctx = args.prompt_len + args.new_tokens // 2
    decode_flops = {n: estimate_flops(m, decode_ctx).decode_per_token for n, m in models.items()}
    full_est = estimate_flops(model, decode_ctx)
    print(
        f"theoretical decode FLOPs/token at context {decode_ctx}: full {decode_flops['full'] / 1e6:.1f} M, "
        f"pruned {decode_flops['pruned'] / 1e6:.1f} M (head {full_est.head / 1e6:.1f} M = "
        f"{full_est.head / full_est.decode_per_token:.1%} of full)"
    )

    methods = ["loop", "generate"] if args.method == "both" else [args.method]
    reports: dict[str, SpeedReport] = {}
    for method in methods:
        reports[method] = compare_speed(
            models,
            tokenizer,
            batch_sizes=args.batch_sizes,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            warmup=args.warmup,
            baseline="full",
            method=method,
            threads=args.threads,
            progress=True,
        )

    summary = []
    for method, report in reports.items():
        print()
        print(report.table())
        for b in args.batch_sizes:
            for name in ("identity", "pruned"):
                r = report.result(name, b)
                theo_pre = prefill_flops["full"] / prefill_flops[name]
                theo_dec = decode_flops["full"] / decode_flops[name]
                target = IDENTITY_TARGET if name == "identity" else DECODE_TARGET * theo_dec
                summary.append(
                    {
                        "method": method,
                        "model": name,
                        "batch": b,
                        "prefill_x": r.prefill_ratio,
                        "prefill_flops_x": theo_pre,
                        "decode_x": r.decode_ratio,
                        "decode_flops_x": theo_dec,
                        "decode/flops": r.decode_ratio / theo_dec,
                        "target": f">= {target:.3f}",
                        "met": r.decode_ratio >= target,
                    }
                )
    print()
    print(format_table(summary, title="measured speedup (x) vs theoretical FLOPs ratio", digits=4))

    # decode step = fixed part + layers x per-layer part, fitted from the full and pruned models
    fits = []
    for method, report in reports.items():
        for b in args.batch_sizes:
            full, pruned = report.result("full", b), report.result("pruned", b)
            per_layer = (full.decode_ms_per_step - pruned.decode_ms_per_step) / (n_full - n_pruned)
            fixed = full.decode_ms_per_step - n_full * per_layer
            fits.append(
                {
                    "method": method,
                    "batch": b,
                    "full_ms_step": full.decode_ms_per_step,
                    "ms_per_layer": per_layer,
                    "fixed_ms": fixed,
                    "fixed_share": fixed / full.decode_ms_per_step,
                    "flops_fixed_share": full_est.head / full_est.decode_per_token,
                    "spread_full": _spread(full.decode_seconds),
                    "spread_pruned": _spread(pruned.decode_seconds),
                }
            )
    print()
    print(
        format_table(
            fits,
            title="decode step split: fixed (embedding, head, sampling, Python) + per layer; "
            "flops_fixed_share = head FLOPs / step FLOPs; spread = (max-min)/median over repeats",
        )
    )
    m = next(iter(reports.values())).machine
    print(
        f"\nmachine: {m.platform}, {m.processor}, {m.cpu_count} CPUs, torch {m.torch_version} "
        f"({m.torch_threads} threads), transformers {m.transformers_version}, load average {m.load_average}"
    )
    if args.json:
        write_json(
            {
                "reports": reports,
                "summary": summary,
                "decode_split": fits,
                "flops": {"prefill_per_token": prefill_flops, "decode_per_token": decode_flops},
            },
            args.json,
        )
        print(f"wrote {args.json}")


def _spread(seconds: tuple[float, ...]) -> float:
    return (max(seconds) - min(seconds)) / statistics.median(seconds)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
