"""DeeDiff commands (thin wrappers over depthprune.diffusion): `depthprune diffusion train | train-exits | sample |
eval | train-classifier`.

    depthprune diffusion train -o out/dit --epochs 2
    depthprune diffusion train-exits out/dit --mode frozen
    depthprune diffusion sample out/dit --exit uncertainty:0.05 --steps 50 -o grid.png
    depthprune diffusion eval out/dit --exit uncertainty:0.05 --classifier out/dit/classifier
"""

from __future__ import annotations

import argparse
import json
import sys

from depthprune.cli.common import check_output_folder


def _threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def _shape(args: argparse.Namespace):
    from depthprune.diffusion.train import DiTShape

    return DiTShape(sample_size=args.size, patch_size=args.patch, width=args.width, heads=args.heads, depth=args.depth)


# ---- train ------------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from depthprune.diffusion.data import load_fashion_mnist
    from depthprune.diffusion.train import train_dit

    _threads(args)
    shape = _shape(args)  # checked before any data is read
    check_output_folder(args.output_dir, args.overwrite, resume=args.resume)
    images, labels = load_fashion_mnist("train", size=args.size, root=args.data, limit=args.limit)
    _, _, run = train_dit(
        images, labels, shape=shape, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        output_dir=args.output_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
        overwrite=args.overwrite, progress=not args.quiet, save_dtype=torch.float16 if args.fp16 else None,
    )  # fmt: skip
    last = run.epoch_losses[-1]["loss"] if run.epoch_losses else float("nan")
    print(json.dumps({"output_dir": run.output_dir, "steps": run.global_step, "seconds": run.train_seconds,
                      "last_epoch_loss": last}))  # fmt: skip
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    top = sub.add_parser("diffusion", help="DeeDiff: train a small class-conditional DiT, its exits, sample, evaluate")
    dsub = top.add_subparsers(dest="diffusion_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
        p.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX .gz files (default: Debian's)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = dsub.add_parser("train", help="train a class-conditional DiT on Fashion-MNIST (noise-prediction MSE, DDPM)")
    common(p)
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--size", type=int, default=28, help="image size (28, or larger: zero-padded)")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--fp16", action="store_true", help="save the weights in float16 (half the size)")
    p.set_defaults(func=cmd_train)


__all__ = ["add_commands"]
if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: depthprune diffusion ...")
