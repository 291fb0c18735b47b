"""`depthprune train-exits --model DECODER ...`: train exit heads of a decoder-only causal LM (`train_decoder_exits`).

Also runs on several processes: `accelerate launch --multi_gpu --num_processes N -m depthprune train-exits smollm2
-o out/smollm2-lens` (on a machine without GPUs the processes use CPU and gloo).
"""

from __future__ import annotations

import argparse

from depthprune.cli.common import add_tokenizer_option, tokenizer_for
from depthprune.cli.train_exits import add_model_arguments, parse
from depthprune.exits.lm_heads import TRANSLATOR_KINDS, DecoderExitHeads
from depthprune.exits.train.lm_exits import fit_confidence, fit_lens, train_decoder_exits


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="depthprune train-exits", description="Train exit heads of a decoder-only causal LM."
    )
    add_model_arguments(p, "smollm2")
    p.add_argument(
        "--data",
        default=None,
        help="a UTF-8 text file, e.g. the whole book: only its calibration part is used (before 'CHAPTER 110.', else "
        "the first 80%%), the rest stays held out (default: the packaged Moby-Dick calibration excerpt)",
    )
    p.add_argument("--kind", default="lens", choices=[k for k in TRANSLATOR_KINDS if k != "logit_lens"])
    p.add_argument(
        "--layers", type=int, nargs="*", default=None, help="exit after these layers (default: all but last)"
    )
    p.add_argument("--mlp-dim", type=int, default=None, help="width of the 'mlp' kind (default: hidden size / 4)")
    p.add_argument("--confidence", action="store_true", help="also train CALM's confidence classifier")
    p.add_argument(
        "--fit",
        action="store_true",
        help="lens kind: set the translators by least squares first (fit_lens; one forward pass, no gradient steps)",
    )
    p.add_argument("--fit-blocks", type=int, default=None, help="--fit on the first N token blocks (default: all)")
    p.add_argument(
        "--confidence-only", action="store_true", help="train only CALM's classifier, translators kept as fitted"
    )
    p.add_argument(
        "--fit-confidence",
        action="store_true",
        help="train CALM's classifiers on cached features of the training blocks first (fit_confidence: one forward "
        "pass, then full-batch steps); with --confidence-only --epochs 0 nothing else trains",
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-blocks", type=int, default=None, help="train on the first N token blocks only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output-dir", required=True, help="folder for the exit heads and train_log.json")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    add_tokenizer_option(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse(parser(), argv)
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from depthprune.data import calibration_text, token_blocks
    from depthprune.io import load_model
    from depthprune.training import no_accelerator

    state = PartialState(cpu=no_accelerator())  # as the trainer's Accelerator, so both see the same processes
    model = load_model(args.model, task="causal-lm")
    tokenizer = tokenizer_for(args, args.model)
    text = calibration_text(args.data)
    all_blocks = token_blocks(tokenizer, text, args.seq_len)
    blocks = all_blocks[: args.max_blocks] if args.max_blocks is not None else all_blocks
    set_seed(args.seed)
    heads = DecoderExitHeads.for_model(model, args.layers, args.kind, mlp_dim=args.mlp_dim, confidence=args.confidence)
    if args.fit:
        residuals = fit_lens(model, heads, all_blocks[: args.fit_blocks], batch_size=args.batch_size)
        if state.is_main_process:
            print("least-squares lens, relative residual per layer:", {k: round(v, 4) for k, v in residuals.items()})
    if args.fit_confidence:
        report = fit_confidence(model, heads, blocks, batch_size=args.batch_size, seed=args.seed)
        if state.is_main_process:
            print("confidence classifiers (held-out positions):")
            for layer, fig in report.items():
                print(
                    f"  layer {layer}: exit agrees on {fig['positive_rate']:.3f} of positions; held-out BCE "
                    f"{fig['heldout_bce']:.4f}, accuracy {fig['heldout_accuracy']:.3f} (train {fig['train_bce']:.4f})"
                )
    result = train_decoder_exits(
        model,
        heads,
        blocks,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        confidence=args.confidence,
        train_translators=not args.confidence_only,
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if state.is_main_process:
        last = result.epoch_losses[-1] if result.epoch_losses else {}
        print(
            f"trained {result.kind} exits after layers {result.layers} on {result.num_blocks} blocks of "
            f"{result.seq_len} tokens in {result.train_seconds:.1f} s ({result.num_processes} process(es)); "
            f"final mean KL {last.get('kl', float('nan')):.4f}; wrote {result.output_dir}"
        )
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
