"""`depthprune train-skipdecode`: adapt a decoder-only causal LM to a SkipDecode schedule with LoRA (train_skipdecode).

Also runs on several processes: `accelerate launch --multi_gpu --num_processes N -m depthprune train-skipdecode ...`.
"""

from __future__ import annotations

import argparse
import math

from depthprune.cli.common import (
    add_kl_weight_option,
    add_lora_training_options,
    add_tokenizer_option,
    add_training_text_options,
    check_output_folder,
    lora_training_kwargs,
    tokenizer_for,
    training_blocks,
)
from depthprune.generation.skipdecode import SkipSchedule, floored_schedule, skipdecode_parts
from depthprune.generation.skipdecode_train import train_skipdecode

DESCRIPTION = "Adapt a decoder-only causal LM to a SkipDecode schedule with LoRA; writes the merged model."


def parser(prog: str = "depthprune train-skipdecode") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `depthprune train-skipdecode` (a subcommand of `depthprune`, or this module's own parser)."""
    add_training_text_options(p)
    p.add_argument(
        "--speedup",
        type=float,
        default=2.0,
        help="target mean decoder-layer speed-up S over --budget generated tokens: floored_schedule(L, S) (default 2)",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=31,
        help="generated tokens after the first one that the speed-up is averaged over (default 31: 32 new tokens)",
    )
    p.add_argument("--max-layers", type=int, default=None, help="layers of the first generated token (default: auto)")
    p.add_argument(
        "--min-layers",
        type=int,
        default=None,
        help="layers at the end of the decay: the depth floor (default: a quarter of the layers)",
    )
    p.add_argument(
        "--seq-len", type=int, default=96, help="tokens per training block (default 96: a 64-token prompt + 32 new)"
    )
    p.add_argument("--min-prompt", type=int, default=1, help="shortest prompt (full depth) drawn per row (default 1)")
    p.add_argument("--max-blocks", type=int, default=None, help="train on the first N token blocks only")
    add_lora_training_options(p)
    add_kl_weight_option(p)
    p.add_argument(
        "-o",
        "--output-dir",
        required=True,
        help="folder for the merged model, skip_schedule.json, train_log.json",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir (atomically, at the end)")
    add_tokenizer_option(p)
    p.add_argument("--no-progress", action="store_true")


def describe(schedule: SkipSchedule, budget: int) -> str:
    """One line for people: the decay and the speed-up it gives over `budget` generated tokens."""
    s = schedule
    return (
        f"{s.max_layers} -> {s.min_layers} of {s.num_layers} layers over {s.decay_tokens:g} tokens "
        f"({s.speedup(budget):.2f}x over {budget} tokens)"
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = parser() if prog is None else parser(prog)
    return run(p.parse_args(argv), p)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Train as `args` say; `parser` reports bad values (exit status 2)."""
    p = parser
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from depthprune.errors import OutputExistsError
    from depthprune.io import load_model
    from depthprune.training import no_accelerator

    try:  # before anything loads: a full folder is refused at once, not after training
        check_output_folder(args.output_dir, args.overwrite, source=args.model)
    except OutputExistsError as err:
        p.error(f"argument --output-dir: {err}")
    if args.budget < 1:
        p.error(f"argument --budget: must be >= 1 generated token, got {args.budget}")
    if not 1 <= args.min_prompt < args.seq_len:
        p.error(f"need 1 <= --min-prompt < --seq-len, got {args.min_prompt} and {args.seq_len}")
    if not (args.kl_weight >= 0 and math.isfinite(args.kl_weight)):
        p.error(f"argument --kl-weight: must be a finite number >= 0 (0: no KL term), got {args.kl_weight}")
    state = PartialState(cpu=no_accelerator())  # as the trainer's Accelerator, so both see the same processes
    model = load_model(args.model, task="causal-lm")
    tokenizer = tokenizer_for(args, args.model)
    num_layers = len(skipdecode_parts(model)[1])
    try:
        schedule = floored_schedule(
            num_layers, args.speedup, budget=args.budget, max_layers=args.max_layers, min_layers=args.min_layers
        )
    except (TypeError, ValueError) as err:
        p.error(f"argument --speedup/--max-layers/--min-layers: {str(err).replace('min_layers=', '--min-layers ')}")
    blocks = training_blocks(args, tokenizer, p)
    set_seed(args.seed)  # the LoRA initialization too
    result = train_skipdecode(
        model,
        schedule,
        blocks,
        **lora_training_kwargs(args),
        min_prompt=args.min_prompt,
        kl_weight=args.kl_weight,
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if state.is_main_process:
        losses = [e["loss"] for e in result.epoch_losses] or [float("nan")]
        print(
            f"SkipDecode schedule {describe(schedule, args.budget)}: LoRA rank {result.lora_rank} trained on "
            f"{result.num_blocks} blocks of {result.seq_len} tokens in {result.train_seconds:.1f} s "
            f"({result.num_processes} process(es)); loss first epoch {losses[0]:.4f}, last epoch {losses[-1]:.4f}; "
            f"wrote {result.output_dir}"
        )
    state.wait_for_everyone()
    return 0
