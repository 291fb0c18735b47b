"""`depthprune search-order`: hill climbing over layer orders with reorders and repeats (depthprune.static.search)."""

from __future__ import annotations

import argparse
import json

from depthprune.cli.common import (
    MODEL_HELP,
    add_calibration_options,
    add_tokenizer_option,
    calibration_from_args,
    check_output_folder,
    tokenizer_for,
)


def cmd_search_order(args: argparse.Namespace) -> int:
    from depthprune.io import load_model
    from depthprune.static.apply import apply_plan, layer_sizes
    from depthprune.static.export import save_model
    from depthprune.static.prune import n_to_remove
    from depthprune.static.search import search_order

    if args.output:
        check_output_folder(args.output, args.overwrite, source=args.model)  # before minutes of loading and search
    model, tokenizer = load_model(args.model), tokenizer_for(args, args.model)
    batches = calibration_from_args(args, tokenizer)
    n_remove = None
    if args.remove is not None:
        sizes = layer_sizes(model)
        n_remove = n_to_remove(sizes[args.stack or list(sizes)[-1]], args.remove)
    result = search_order(
        model,
        batches,
        depth=args.depth,
        n_remove=n_remove,
        start=args.start,
        moves=args.moves,
        budget=args.budget,
        max_seconds=args.seconds,
        strategy=args.strategy,
        monotone=args.monotone,
        seed=args.seed,
        max_shift=args.max_shift,
        stack=args.stack,
        progress=not args.json,
    )
    summary = result.to_dict()
    if args.output:
        out = save_model(apply_plan(model, result.best), args.output, tokenizer, overwrite=args.overwrite)
        summary["output"] = str(out)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    kind = "reorders or repeats layers" if result.non_monotone else "a pure removal"
    print(f"start {result.start.to_text()}: calibration NLL {result.start_loss:.4f}")
    print(f"best  {result.best.to_text()}: calibration NLL {result.best_loss:.4f} ({kind})")
    print(
        f"{result.evaluations} plans of {result.depth} layers scored in {result.seconds:.1f} s, {result.steps} moves "
        f"accepted; stopped: {result.stopped}"
    )
    if args.output:
        print(f"saved the best plan's model to {summary['output']}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search-order",
        help="search layer plans with reorders and repeats at a fixed depth, scored on calibration loss; exports the "
        "best plan's model with -o",
    )
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--depth", type=int, help="executed layers to keep fixed (default: the start plan's)")
    depth.add_argument("--remove", type=float, help="layers removed: a count (8) or a fraction (0.25)")
    p.add_argument(
        "--start",
        default="sleb",
        help="start plan: a scorer's pure removal at this depth (default sleb, the greedy calibration-loss removal; "
        "block_influence is the fast one) or an explicit plan, e.g. 0-11,18-24,27-29",
    )
    p.add_argument(
        "--moves",
        default="swap,repeat,move,exchange",
        help="comma-separated moves: swap (neighbours), repeat (a neighbour runs twice in a layer's slot), move "
        "(a layer 2..--max-shift positions away), exchange (one executed layer out, one unused in); default all",
    )
    p.add_argument("--budget", type=int, default=100, help="plans to score at most, the start included (default 100)")
    p.add_argument("--seconds", type=float, help="stop after this many seconds (the result then depends on speed)")
    p.add_argument("--strategy", default="first", choices=["first", "best"], help="first or best improvement")
    p.add_argument("--monotone", action="store_true", help="pure removals only (the exchange move), for comparison")
    p.add_argument("--seed", type=int, default=0, help="order in which neighbours are tried (default 0)")
    p.add_argument("--max-shift", type=int, default=4, help="farthest a `move` moves a layer (default 4 positions)")
    p.add_argument("-o", "--output", help="export the best plan's model to this folder (a plain HF model folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    p.add_argument("--json", action="store_true", help="print the result (every scored plan included) as JSON")
    add_calibration_options(p)
    add_tokenizer_option(p)
    p.set_defaults(func=cmd_search_order)
