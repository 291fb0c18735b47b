"""`depthprune merge` (LaCo's layer merging: given runs, or chosen on calibration text) and `depthprune share` (groups
of positions running one set of weights): thin commands over `depthprune.static.fusion`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from depthprune.cli.common import (
    MODEL_HELP,
    add_calibration_options,
    add_tokenizer_option,
    calibration_from_args,
    tokenizer_for,
)
from depthprune.cli.gguf import GGUF_HELP, add_gguf_option, check_output, save_output

RUNS_HELP = "first-last positions, both included, comma-separated, e.g. 10-13,20-22"


def _tokenizer_if_any(args: argparse.Namespace) -> Any:
    """The tokenizer to copy along with an export that tokenized nothing (None when the model folder has none)."""
    from depthprune.io import has_tokenizer

    source = args.tokenizer or args.model
    return tokenizer_for(args, source) if args.tokenizer or has_tokenizer(source) else None


def _report(model: Any, before: Any, out: Any) -> dict[str, Any]:
    from depthprune.adapters.registry import get_adapter
    from depthprune.static.fusion import unique_parameters, weights_bytes

    adapter = get_adapter(model)
    return {
        "output": str(out),
        "layers_before": adapter.num_layers(before),
        "layers_after": adapter.num_layers(model),
        "parameters_before": unique_parameters(before),
        "parameters_after": unique_parameters(model),
        "file_bytes": out.stat().st_size if out.is_file() else weights_bytes(out),
    }


def _print(summary: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    for line in lines:
        print(line)

    def depth(sizes: dict[str, int]) -> str:
        return str(*sizes.values()) if len(sizes) == 1 else ", ".join(f"{k} {v}" for k, v in sizes.items())

    print(
        f"layers {depth(summary['layers_before'])} -> {depth(summary['layers_after'])}; parameters in memory "
        f"{summary['parameters_before']:,} -> {summary['parameters_after']:,}; weights file "
        f"{summary['file_bytes'] / 2**20:.1f} MiB; saved to {summary['output']}"
    )


def cmd_merge(args: argparse.Namespace) -> int:
    from depthprune.io import load_model
    from depthprune.static.fusion import format_runs, laco, merge_layers, parse_runs
    from depthprune.static.fusion.runs import resolve_stack
    from depthprune.static.prune import n_to_remove

    gguf_source = check_output(args)  # before minutes of loading and searching
    runs = parse_runs(args.runs) if args.runs is not None else None  # a malformed list fails before the model loads
    model = load_model(args.model)
    if runs is not None:
        tokenizer = _tokenizer_if_any(args)
        merged, found = merge_layers(model, runs, stack=args.stack), {"method": "merge", "runs": runs}
    else:
        tokenizer = tokenizer_for(args, args.model)
        batches = calibration_from_args(args, tokenizer)
        n = n_to_remove(len(resolve_stack(model, args.stack, "merge")), args.remove)
        options = {
            k: v
            for k, v in {
                "merge_count": args.merge_count,
                "low": args.low,
                "high": args.high,
                "threshold": args.threshold,
                "interval": args.interval,
            }.items()
            if v is not None
        }
        result = laco(model, batches, n, stack=args.stack, progress=not args.json, **options)
        merged, found = result.model, result.to_dict()
    out = save_output(merged, tokenizer, args, gguf_source)
    summary = {**_report(merged, model, out), **found}
    lines = [f"merged runs {format_runs(found['runs'])}" + (" (chosen by laco)" if runs is None else "")]
    if runs is None:
        lines.append(
            f"similarities {', '.join(f'{s:.4f}' for s in found['similarities'])}; removed {found['n_removed']} of "
            f"{found['n_remove']} layers asked"
        )
    _print(summary, args.json, lines)
    return 0


def cmd_share(args: argparse.Namespace) -> int:
    from depthprune.io import load_model
    from depthprune.static.fusion import format_runs, parse_runs, share_layers

    gguf_source = check_output(args)
    groups = parse_runs(args.groups)
    model = load_model(args.model)
    tokenizer = _tokenizer_if_any(args)
    shared = share_layers(model, groups, mode=args.mode, stack=args.stack)
    out = save_output(shared, tokenizer, args, gguf_source)
    summary = {**_report(shared, model, out), "method": "share", "mode": args.mode, "groups": groups}
    lines = [
        f"groups {format_runs(groups)} share one layer each ({args.mode}); the file stores every position "
        "(plain transformers loads it as is); depthprune.load_model ties them again"
    ]
    _print(summary, args.json, lines)
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "merge", help="merge runs of layers into one (LaCo), given or chosen on calibration text, and export the model"
    )
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--runs", help=f"runs to merge, each into its first layer: {RUNS_HELP}")
    how.add_argument("--remove", type=float, help="layers to remove by LaCo's search: a count (8) or a fraction (0.25)")
    p.add_argument(
        "--threshold", type=float, help="LaCo's T: least cosine similarity of final hidden states to keep a merge"
    )
    p.add_argument("--merge-count", type=int, help="LaCo's C: layers merged into one per step")
    p.add_argument("--low", type=int, help="LaCo's L: lowest position a merge may touch (default: half the depth)")
    p.add_argument(
        "--high", type=int, help="LaCo's H: end (excluded) of the positions merges may touch (default: depth)"
    )
    p.add_argument("--interval", type=int, help="LaCo's I: positions to step down after a kept merge")
    p.add_argument("-o", "--output", required=True, help=GGUF_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    add_gguf_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_calibration_options(p)
    add_tokenizer_option(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "share", help="let groups of positions run one shared set of weights (first or averaged), export"
    )
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--groups", required=True, help=f"groups of positions sharing one layer: {RUNS_HELP}")
    p.add_argument(
        "--mode", choices=("average", "first"), default="average", help="the shared weights (default average)"
    )
    p.add_argument("--stack", help="which stack (encoder/decoder) on encoder-decoder models; default: last")
    p.add_argument("-o", "--output", required=True, help=GGUF_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    add_gguf_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_tokenizer_option(p)
    p.set_defaults(func=cmd_share)
