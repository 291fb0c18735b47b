"""Early-exit commands: train-exits, calibrate, classify, eval-exits (thin wrappers over depthprune.exits)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from depthprune.cli.common import CALIBRATION_FILE, add_tokenizer_option, calibrate_check_write, tokenizer_for


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help=".jsonl/.csv with text/label columns, 'spam-assassin' or its path")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--train", type=float, default=0.6, help="train fraction used when the heads were trained")
    p.add_argument("--calibration", type=float, default=0.2, help="calibration fraction (the rest is test)")
    p.add_argument("--seed", type=int, default=0, help="split seed used when the heads were trained")
    p.add_argument("--max-length", type=int, default=128)


def _load(args: argparse.Namespace):
    from depthprune.exits.heads import ExitHeads
    from depthprune.io import load_model

    model = load_model(args.folder, task="seq-cls")
    return model, ExitHeads.load(args.folder, model).eval(), tokenizer_for(args, args.folder)


def _splits(args: argparse.Namespace):
    from depthprune.exits.data import load_data, split

    if not args.data:
        raise ValueError("give --data: a .jsonl/.csv file with text/label columns, or 'spam-assassin'")
    data = load_data(args.data, args.text_column, args.label_column, progress=False)
    return split(data, args.train, args.calibration, seed=args.seed)


def is_decoder_heads_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds decoder exit heads (written by the decoder trainer) rather than a classifier's."""
    from depthprune.exits.lm_heads import CONFIG_NAME

    return (Path(folder) / CONFIG_NAME).is_file()


def cmd_calibrate(args: argparse.Namespace) -> int:
    if is_decoder_heads_folder(args.folder):
        from depthprune.cli.generation import cmd_calibrate_decoder

        return cmd_calibrate_decoder(args)
    from depthprune.exits.calibrate import calibrate, check, collect_records
    from depthprune.exits.criteria import make_criterion
    from depthprune.exits.data import tokenize_batches

    splits = _splits(args)  # first: a missing --data fails before the model loads
    model, heads, tokenizer = _load(args)
    cal = collect_records(
        model, heads, tokenize_batches(tokenizer, splits.calibration, 32, args.max_length), progress=True
    )
    test = collect_records(model, heads, tokenize_batches(tokenizer, splits.test, 32, args.max_length), progress=True)
    delta = 0.01 if args.delta is None else args.delta
    calibrate_check_write(
        args.criterion.split(","),
        lambda name: calibrate(name, cal, delta=delta, epsilon=args.epsilon, risk=args.risk),
        lambda name, threshold: check(make_criterion(name, threshold), test),
        args.folder,
        title=f"held-out check on the test split ({test.n} samples)",
        as_json=args.json,
    )
    return 0


def _criterion(args: argparse.Namespace):
    from depthprune.exits.criteria import make_criterion, parse_criterion

    if args.exit:
        return parse_criterion(args.exit)
    path = Path(args.folder) / CALIBRATION_FILE
    if not path.exists():
        raise ValueError(f"pass --exit CRITERION:THRESHOLD, or run `depthprune calibrate {args.folder}` first")
    chosen = [r for r in json.loads(path.read_text()) if r["threshold"] is not None]
    if not chosen:
        raise ValueError(f"{path} certifies no threshold; pass --exit CRITERION:THRESHOLD")
    return make_criterion(chosen[0]["criterion"], chosen[0]["threshold"])


def cmd_classify(args: argparse.Namespace) -> int:
    if args.routers:  # layer skipping (depthprune.cli.skipping)
        from depthprune.cli.skipping import cmd_classify as cmd_classify_routed

        return cmd_classify_routed(args)
    from depthprune.exits.data import read_texts
    from depthprune.exits.evaluate import classify

    model, heads, tokenizer = _load(args)
    criterion = _criterion(args)
    if args.text:
        texts = args.text
    elif args.file:
        texts = read_texts(args.file, args.text_column)
    else:
        raise ValueError("give --text TEXT (repeatable) or --file PATH")
    rows = classify(model, heads, criterion, texts, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
    names = getattr(model.config, "id2label", None) or {}
    for text, row in zip(texts, rows, strict=True):
        row["label_name"] = names.get(row["label"], str(row["label"]))
        row["text"] = text[:80]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(
                f"{row['label_name']:>10}  p={row['probability']:.3f}  exit after {row['layers']}/{row['of_layers']} "
                f"layers  {row['text']!r}"
            )
    return 0


def cmd_eval_exits(args: argparse.Namespace) -> int:
    from depthprune.bench.report import format_table
    from depthprune.exits.calibrate import check, collect_records
    from depthprune.exits.data import tokenize_batches
    from depthprune.exits.evaluate import speedups, time_exit_configs

    splits = _splits(args)
    model, heads, tokenizer = _load(args)
    criterion = _criterion(args)
    test = collect_records(model, heads, tokenize_batches(tokenizer, splits.test, 32, args.max_length), progress=True)
    row = {"criterion": f"{criterion.name}:{criterion.threshold:g}", **check(criterion, test)}
    timing = splits.test.subset(range(min(args.timing_samples, len(splits.test))))
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        times = time_exit_configs(
            model,
            heads,
            [("exit", criterion)],
            timing,
            tokenizer,
            batch_size=bs,
            repeats=args.repeats,
            max_length=args.max_length,
        )
        row[f"speedup_b{bs}"] = speedups(times)["exit"]
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        print(
            format_table([row], title=f"test split ({test.n}); wall-clock on {len(timing)} samples vs the full model")
        )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-exits",
        add_help=False,
        help="train exit heads through Accelerate: an encoder classifier's (and its backbone, per recipe), or a causal "
        "LM's decoder exits when MODEL is one; `depthprune train-exits [MODEL] --help` for options; "
        "multi-process: accelerate launch -m depthprune train-exits ...",
    )
    p.add_argument("options", nargs=argparse.REMAINDER)  # handled by depthprune.cli.main before parsing

    p = sub.add_parser(
        "calibrate",
        help="choose exit thresholds with a guarantee (Learn-then-Test) and check them; a folder of decoder exit heads "
        "is calibrated on generated continuations",
    )
    p.add_argument("folder", help="a folder written by train-exits (classifier, or decoder exit heads)")
    p.add_argument("--criterion", default="max_prob", help="criterion name(s), comma-separated (see `depthprune list`)")
    p.add_argument(
        "--risk",
        default="disagreement",
        choices=["disagreement", "accuracy_drop"],
        help="classifiers: what delta bounds: disagreement with the full model (default), or the accuracy drop "
        "(needs labels)",
    )
    p.add_argument(
        "--delta",
        type=float,
        default=None,
        help="allowed risk (default 0.01 for classifiers; 0.2 for decoders, where it bounds 1 - expected consistency)",
    )
    p.add_argument("--epsilon", type=float, default=0.05, help="allowed failure probability (default 0.05)")
    _split_args(p)
    from depthprune.cli.generation import add_calibrate_options

    add_calibrate_options(p)
    add_tokenizer_option(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("classify", help="predict with early exit; prints each input's label and exit layer")
    p.add_argument("folder", help="a folder written by train-exits")
    p.add_argument("--exit", help="CRITERION:THRESHOLD (default: the calibrated one in calibration.json)")
    p.add_argument("--text", action="append", help="a text to classify (repeatable)")
    p.add_argument("--file", help="a .jsonl/.csv file with a text column")
    p.add_argument("--text-column", default="text")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--json", action="store_true")
    add_tokenizer_option(p)
    from depthprune.cli.skipping import add_classify_options

    add_classify_options(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("eval-exits", help="accuracy, mean layers and wall-clock speedup vs the full model")
    p.add_argument("folder", help="a folder written by train-exits")
    p.add_argument("--exit", help="CRITERION:THRESHOLD (default: the calibrated one in calibration.json)")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--timing-samples", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    _split_args(p)
    add_tokenizer_option(p)
    p.set_defaults(func=cmd_eval_exits)


# ---- train-exits: one command, two trainers ---------------------------------------------------------------------
def _model_option(argv: list[str]) -> str | None:
    """The model of a train-exits command line: its first argument when that is not an option, else --model."""
    if argv and not argv[0].startswith("-"):
        return argv[0]
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return None


def is_causal_lm(name: str | os.PathLike) -> bool:
    """Whether the checkpoint `name` (folder, hub id, .gguf or alias) is a causal LM (its config's architectures name
    a *ForCausalLM or *LMHeadModel class). False when its config cannot be read: the encoder trainer reports that."""
    from transformers import AutoConfig

    from depthprune.errors import DepthpruneError
    from depthprune.io import local_folder

    try:
        config = AutoConfig.from_pretrained(local_folder(name))
    except (DepthpruneError, OSError, ValueError):
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or [])


def train_exits_main(argv: list[str]) -> int:
    """`depthprune train-exits ...`: decoder exit heads (depthprune.cli.train_lm_exits) when --model is a causal LM,
    else an encoder classifier's exits (depthprune.cli.train_exits, whose default model is minilm)."""
    model = _model_option(argv)
    if model is not None and is_causal_lm(model):
        from depthprune.cli.train_lm_exits import main as decoder_main

        return decoder_main(argv)
    from depthprune.cli.train_exits import main as launch_main

    return launch_main(argv)
