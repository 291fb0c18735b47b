"""Command line for `train_exits`, meant to be started by `accelerate launch` (or plain `python -m`):

    depthprune train-exits minilm --data spam-assassin.jsonl --format email --recipe two_stage -o out/minilm-spam
    accelerate launch --multi_gpu --num_processes 2 -m depthprune train-exits \\
        minilm --data spam-assassin --recipe two_stage --epochs 1 2 -o out/minilm-spam

On a machine without GPUs the processes run on CPU (gloo). `accelerate launch --cpu --num_processes N` starts only
one process unless an MPI launcher is configured, so use --multi_gpu (or torchrun) for several CPU processes.
The data is split 60/20/20 (train/calibration/test, stratified, seeded); after training the main process measures
every exit on the test split and writes eval_test.json beside the model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from depthprune.cli.common import add_tokenizer_option, check_output_folder, tokenizer_for


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if "." not in text and "e" not in text.lower() else value


def _hyper(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--hyper takes NAME=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parser() -> argparse.ArgumentParser:
    from depthprune.exits.data import FORMATS
    from depthprune.exits.train import list_recipes

    p = argparse.ArgumentParser(
        prog="depthprune train-exits", description="Train exit heads of an encoder classifier (and its backbone)."
    )
    add_model_arguments(p, "minilm")
    p.add_argument("--data", required=True, help=".jsonl/.csv file, 'spam-assassin', or a Hugging Face dataset name")
    p.add_argument(
        "--format",
        default="auto",
        choices=list(FORMATS),
        help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()).replace("%", "%%"),
    )
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--train", type=_number, default=0.6, help="train fraction (float) or count (int); default 0.6")
    p.add_argument("--calibration", type=_number, default=0.2, help="calibration fraction or count; default 0.2")
    p.add_argument("--limit-train", type=int, default=None, help="train on a stratified sample of N train examples")
    p.add_argument("--recipe", default="two_stage", choices=list_recipes())
    p.add_argument("--epochs", type=int, nargs="+", default=[1], help="one value, or one per stage")
    p.add_argument("--lr", type=float, nargs="+", default=[5e-5], help="one value, or one per stage")
    p.add_argument(
        "--head-lr",
        type=float,
        default=None,
        help="the exit heads' learning rate in stages that also train the backbone (default: --lr)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the new heads and the training order")
    p.add_argument(
        "--layers", type=int, nargs="*", default=None, help="exit after these layers (default: all but last)"
    )
    p.add_argument("--extras", nargs="*", default=None, help="halting gate agreement (default: what the recipe needs)")
    p.add_argument("--hyper", nargs="*", default=[], help="recipe hyperparameters NAME=VALUE, e.g. beta=0.01")
    p.add_argument("--fit-agreement", action="store_true", help="then train the agreement extra on frozen heads")
    p.add_argument("--agreement-weight", type=float, default=0.0, help="add the agreement BCE to head-training stages")
    p.add_argument("-o", "--output-dir", required=True, help="folder for the trained model and its exit heads")
    p.add_argument("--checkpoint-every", type=int, default=0, help="optimizer steps between checkpoints (0: none)")
    p.add_argument("--resume", action="store_true", help="go on from the newest checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-eval", action="store_true", help="skip measuring the exits on the test split")
    p.add_argument("--no-progress", action="store_true")
    add_tokenizer_option(p)
    return p


def add_model_arguments(p: argparse.ArgumentParser, default: str) -> None:
    """MODEL as the first argument (`depthprune train-exits minilm ...`) or as --model."""
    p.add_argument("model_name", nargs="?", metavar="MODEL", help=f"model folder, hub id or alias (default: {default})")
    p.add_argument("--model", dest="model_option", metavar="MODEL", default=None, help="the same as MODEL")
    p.set_defaults(default_model=default)


def resolve_model(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Set args.model from MODEL or --model (not both, unless equal)."""
    if args.model_name and args.model_option and args.model_name != args.model_option:
        p.error(f"give the model once: MODEL {args.model_name!r} or --model {args.model_option!r}")
    args.model = args.model_name or args.model_option or args.default_model
    return args


def parse(p: argparse.ArgumentParser, argv: list[str] | None, *, resume: bool = False) -> argparse.Namespace:
    """Parse, then refuse an occupied output folder before anything loads."""
    from depthprune.errors import OutputExistsError

    args = resolve_model(p, p.parse_args(argv))
    try:
        check_output_folder(
            args.output_dir, args.overwrite, resume=resume and getattr(args, "resume", False), source=args.model
        )
    except OutputExistsError as err:
        p.error(f"argument -o/--output-dir: {err}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(parser(), argv, resume=True)
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from depthprune.exits.data import load_data, split, tokenize_batches
    from depthprune.exits.heads import ExitHeads
    from depthprune.exits.train import recipe_module
    from depthprune.exits.train.evaluate import exit_accuracies
    from depthprune.exits.train.trainer import train_exits
    from depthprune.io import load_model
    from depthprune.training import no_accelerator

    state = PartialState(cpu=no_accelerator())  # as train_exits' Accelerator, so both see the same processes
    data = load_data(
        args.data,
        args.text_column,
        args.label_column,
        format=args.format,
        progress=state.is_main_process and not args.no_progress,
    )
    parts = split(data, args.train, args.calibration, seed=args.seed)
    if args.limit_train is not None and args.limit_train < len(parts.train):
        parts.train = split(parts.train, args.limit_train, 0, seed=args.seed).train
    names = data.label_names
    model = load_model(
        args.model,
        task="seq-cls",
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    tokenizer = tokenizer_for(args, args.model)
    extras = args.extras
    if extras is None:
        extras = list(getattr(recipe_module(args.recipe), "NEEDS", ()))
        if args.fit_agreement or args.agreement_weight:
            extras.append("agreement")
    set_seed(args.seed)
    heads = ExitHeads.for_model(model, layers=args.layers, extras=tuple(extras))
    result = train_exits(
        model,
        heads,
        parts.train,
        tokenizer=tokenizer,
        recipe=args.recipe,
        epochs=args.epochs,
        lr=args.lr,
        head_lr=args.head_lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        hyper=_hyper(args.hyper),
        fit_agreement=args.fit_agreement,
        agreement_weight=args.agreement_weight,
        output_dir=args.output_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if state.is_main_process:
        sizes = {k: len(getattr(parts, k)) for k in ("train", "calibration", "test")}
        print(
            f"trained {args.recipe} on {sizes['train']} examples in {result.train_seconds:.1f} s "
            f"({result.num_processes} process(es)); splits {sizes}"
        )
        if not args.no_eval and len(parts.test):
            batches = tokenize_batches(tokenizer, parts.test, args.batch_size, args.max_length)
            acc = exit_accuracies(model, heads, batches, progress=not args.no_progress)
            print(acc.table())
            report = {"split": "test", "splits": sizes, "seed": args.seed, **acc.to_dict()}
            (Path(args.output_dir) / "eval_test.json").write_text(json.dumps(report, indent=1))
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
