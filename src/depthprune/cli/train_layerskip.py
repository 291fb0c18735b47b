"""`depthprune train-layerskip`: train a decoder's backbone for early exits with the LayerSkip recipe (LoRA, peft).

Also runs on several processes: `accelerate launch --multi_gpu --num_processes N -m depthprune train-layerskip ...`.
The output folder is a peft adapter folder that `depthprune generate FOLDER --speculative|--exit ...` loads (base +
adapter merged); `--merge` adds the merged weights (an ordinary HF model folder).
"""

from __future__ import annotations

import argparse
import json

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
from depthprune.exits.train.layerskip import CURRICULA, DEPTH_SCALES, LOSS_SCALES, TIME_SCALES, LayerSkipConfig

DESCRIPTION = (
    "Train a decoder-only causal LM for early exits (LayerSkip: layer dropout rising with depth + an early-exit loss "
    "on the shared head, with a curriculum) with LoRA; writes the adapter."
)
EVAL_NAME = "layerskip_eval.json"


def parser(prog: str = "depthprune train-layerskip") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `depthprune train-layerskip`."""
    add_training_text_options(p)
    p.add_argument("--recipe", default="layerskip", help="backbone recipe (see `depthprune list`; default layerskip)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training block (default 256)")
    p.add_argument("--max-blocks", type=int, default=None, help="train on the first N token blocks only")
    p.add_argument("--dropout-max", type=float, default=0.1, help="layer dropout of the last layer (default 0.1)")
    p.add_argument("--dropout-scale", choices=list(DEPTH_SCALES), default="exp", help="rise with depth (default exp)")
    p.add_argument("--dropout-ramp", choices=list(TIME_SCALES), default="constant", help="rise over training")
    p.add_argument("--exit-scale", type=float, default=1.0, help="weight of the early-exit losses (0: none)")
    add_kl_weight_option(p)  # not in LayerSkip: it holds the last layer to the untouched model
    p.add_argument("--loss-scale", choices=list(LOSS_SCALES), default="l", help="per-exit weight by depth (default l)")
    p.add_argument("--exit-layers", type=int, nargs="+", default=None, help="exit layers, 0-based (default: all)")
    p.add_argument("--curriculum", choices=CURRICULA, default="rotational")
    p.add_argument("--rotation", type=int, default=4, help="rotational: every R-th exit is on at a step (default 4)")
    p.add_argument("--gradual-speed", type=float, default=2.0, help="gradual: all exits on after 1/this of training")
    add_lora_training_options(p)
    p.add_argument("--checkpoint-every", type=int, default=0, help="optimizer steps between checkpoints (0: none)")
    p.add_argument("--resume", action="store_true", help="go on from the newest checkpoint in --output-dir")
    p.add_argument(
        "--eval-blocks",
        type=int,
        default=0,
        help=f"held-out blocks of --seq-len tokens: per-layer top-1 agreement with the untouched model and final-layer "
        f"perplexity, before and after training, printed and written to {EVAL_NAME} (default 0: none)",
    )
    p.add_argument("--merge", action="store_true", help="also write the merged model's weights into --output-dir")
    p.add_argument("-o", "--output-dir", required=True, help="folder for the adapter, layerskip.json, train_log.json")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir (atomically, at the end)")
    add_tokenizer_option(p)
    p.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = parser() if prog is None else parser(prog)
    return run(p.parse_args(argv), p)


def _agreement_line(name: str, figures: dict) -> str:
    agree = " ".join(f"{a:.2f}" for a in figures["agreement"])
    return f"{name}: final-layer perplexity {figures['ppl']:.2f}; top-1 agreement per layer: {agree}"


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Train as `args` say; `parser` reports bad values (exit status 2)."""
    p = parser
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from depthprune.data import heldout_text, token_blocks
    from depthprune.decoding import decoder_parts
    from depthprune.errors import OutputExistsError
    from depthprune.exits.train.layerskip import exit_agreement_with
    from depthprune.fsutil import write_atomic
    from depthprune.io import load_model
    from depthprune.registry import BACKBONE_RECIPES
    from depthprune.training import no_accelerator

    try:
        recipe = BACKBONE_RECIPES.get(args.recipe)
    except ValueError as err:
        p.error(f"argument --recipe: {err}")
    if not args.resume:
        try:  # before anything loads: a full folder is refused at once, not after training
            check_output_folder(args.output_dir, args.overwrite, source=args.model)
        except OutputExistsError as err:
            p.error(f"argument --output-dir: {err}")
    if args.eval_blocks < 0:
        p.error(f"argument --eval-blocks: must be >= 0, got {args.eval_blocks}")
    state = PartialState(cpu=no_accelerator())  # as the trainer's Accelerator, so both see the same processes
    model = load_model(args.model, task="causal-lm")
    tokenizer = tokenizer_for(args, args.model)
    num_layers = len(decoder_parts(model, "LayerSkip training").layers)
    try:
        config = LayerSkipConfig(
            num_layers=num_layers,
            dropout_max=args.dropout_max,
            dropout_scale=args.dropout_scale,
            dropout_ramp=args.dropout_ramp,
            exit_scale=args.exit_scale,
            kl_weight=args.kl_weight,
            loss_scale=args.loss_scale,
            exit_layers=None if args.exit_layers is None else tuple(args.exit_layers),
            curriculum=args.curriculum,
            rotation=args.rotation,
            gradual_speed=args.gradual_speed,
        )
    except ValueError as err:
        p.error(str(err).replace("LayerSkip ", "argument --").replace("_", "-", 1))
    blocks = training_blocks(args, tokenizer, p)
    try:
        held = token_blocks(tokenizer, heldout_text(args.data), args.seq_len, args.eval_blocks or None)
    except ValueError as err:
        p.error(f"argument --data/--seq-len/--eval-blocks: {err}")
    evaluation = {}
    if args.eval_blocks and state.is_main_process:
        evaluation["before"] = exit_agreement_with(model, model, held[: args.eval_blocks])
        print(_agreement_line("untouched", evaluation["before"]), flush=True)
    set_seed(args.seed)  # the LoRA initialization too
    result = recipe(
        model,
        config,
        blocks,
        **lora_training_kwargs(args),
        base_model=args.model,
        merge=args.merge,
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )
    if state.is_main_process:
        last = result.epoch_losses[-1] if result.epoch_losses else {"loss": float("nan"), "final": float("nan")}
        print(
            f"LayerSkip ({config.curriculum} curriculum, exits {list(config.exits)[:3]}..., dropout max "
            f"{config.dropout_max:g} {config.dropout_scale}): LoRA rank {result.lora_rank} trained on {result.tokens} "
            f"tokens ({result.num_blocks} blocks of {result.seq_len}) in {result.train_seconds:.1f} s "
            f"({result.num_processes} process(es)); last epoch loss {last['loss']:.4f}, final-layer CE "
            f"{last.get('final', float('nan')):.4f}; wrote {result.output_dir}"
        )
        if args.eval_blocks:
            adapted = result.peft_model.get_base_model().eval()
            evaluation["after"] = exit_agreement_with(adapted, model, held[: args.eval_blocks])
            print(_agreement_line("adapted", evaluation["after"]), flush=True)
            ratio = evaluation["after"]["ppl"] / evaluation["before"]["ppl"]
            print(f"final-layer held-out perplexity: {ratio:.4f}x the untouched model's")
            write_atomic(f"{args.output_dir}/{EVAL_NAME}", json.dumps(evaluation, indent=1))
    state.wait_for_everyone()
    return 0
