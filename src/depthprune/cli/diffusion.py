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


# ---- train-exits -------------------------------------------------------------------------------------------------
def cmd_train_exits(args: argparse.Namespace) -> int:
    from depthprune.diffusion.data import load_fashion_mnist
    from depthprune.diffusion.exit_train import train_uems
    from depthprune.diffusion.io import save_uems
    from depthprune.diffusion.train import load_diffusion, save_diffusion
    from depthprune.diffusion.uem import UEMConfig

    _threads(args)
    model, scheduler, meta = load_diffusion(args.model)
    config = UEMConfig(num_layers=model.config.num_layers, width=model.inner_dim, rank=args.rank, target=args.target)
    if args.mode == "joint":
        if not args.output_dir:
            raise ValueError("joint training changes the model: give -o DIR for the new model (+ its UEMs)")
        check_output_folder(args.output_dir, args.overwrite, source=args.model)
    images, labels = load_fashion_mnist("train", size=model.config.sample_size, root=args.data, limit=args.limit)
    trained, uems, run = train_uems(
        model, scheduler, images, labels, mode=args.mode, config=config, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, backbone_lr=args.backbone_lr, seed=args.seed, progress=not args.quiet,
    )  # fmt: skip
    record = {"mode": args.mode, "examples": len(images), "epochs": args.epochs, "seconds": run.train_seconds,
              "epoch_losses": run.epoch_losses}  # fmt: skip
    target = args.model
    if args.mode == "joint":
        from pathlib import Path

        from depthprune.fsutil import atomic_folder

        with atomic_folder(Path(args.output_dir).expanduser()) as tmp:
            tmp.mkdir()
            save_diffusion(tmp, trained, scheduler, {**meta, "exits": record})
        target = args.output_dir
    save_uems(uems, target, extra=record)
    print(json.dumps({"uems": f"{target}/uem", **record}))
    return 0


# ---- sample / eval ------------------------------------------------------------------------------------------------
def _load(args: argparse.Namespace):
    from depthprune.diffusion.io import load_uems
    from depthprune.diffusion.sample import parse_exit
    from depthprune.diffusion.train import load_diffusion

    model, scheduler, _ = load_diffusion(args.model)
    policy = parse_exit(args.exit, model.config.num_layers)  # checked before sampling
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    uems = load_uems(args.model, num_layers=model.config.num_layers) if policy.kind == "uncertainty" else None
    return model, scheduler, policy, uems


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from depthprune.diffusion.sample import sample_batches, save_grid

    _threads(args)
    model, scheduler, policy, uems = _load(args)
    labels = torch.arange(model.config.num_embeds_ada_norm).repeat(args.per_class) if args.label is None else (
        torch.full((args.per_class,), args.label))  # fmt: skip
    out = sample_batches(model, scheduler, labels, steps=args.steps, policy=policy, uems=uems, seed=args.seed,
                         scheduler=args.scheduler, batch_size=args.batch_size)  # fmt: skip
    save_grid(out.images, args.output, columns=min(len(labels), model.config.num_embeds_ada_norm))
    print(json.dumps({"grid": args.output, "policy": str(policy), "samples": len(labels),
                      "mean_layers": round(out.mean_layers, 3), "num_layers": out.num_layers}))  # fmt: skip
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import time

    import torch

    from depthprune.diffusion.classifier import load_classifier
    from depthprune.diffusion.data import load_fashion_mnist
    from depthprune.diffusion.fid import image_quality
    from depthprune.diffusion.sample import ExitPolicy, sample_batches

    _threads(args)
    model, scheduler, policy, uems = _load(args)
    classifier, _ = load_classifier(args.classifier)
    reference, _ = load_fashion_mnist("test", size=model.config.sample_size, root=args.data, limit=args.reference)
    labels = torch.arange(model.config.num_embeds_ada_norm).repeat_interleave(args.per_class)
    rows = []
    for p in (ExitPolicy("full"), policy):
        t0 = time.perf_counter()
        out = sample_batches(model, scheduler, labels, steps=args.steps, policy=p, uems=uems, seed=args.seed,
                             scheduler=args.scheduler, batch_size=args.batch_size)  # fmt: skip
        seconds = time.perf_counter() - t0
        rows.append({"policy": str(p), "seconds": round(seconds, 2), "mean_layers": round(out.mean_layers, 3),
                     **image_quality(classifier, out.images, labels, reference)})  # fmt: skip
    rows[1]["speedup"] = round(rows[0]["seconds"] / rows[1]["seconds"], 3)
    print(json.dumps(rows, indent=1))
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    import time

    from depthprune.diffusion.classifier import accuracy, save_classifier, train_classifier
    from depthprune.diffusion.data import load_fashion_mnist

    _threads(args)
    check_output_folder(args.output_dir, args.overwrite)
    images, labels = load_fashion_mnist("train", root=args.data, limit=args.limit)
    test_images, test_labels = load_fashion_mnist("test", root=args.data)
    t0 = time.time()
    model = train_classifier(images, labels, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    acc = accuracy(model, test_images, test_labels)
    save_classifier(model, args.output_dir, extra={"test_accuracy": acc, "epochs": args.epochs,
                                                   "train_seconds": round(time.time() - t0, 1)})  # fmt: skip
    print(json.dumps({"output_dir": args.output_dir, "test_accuracy": acc}))
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

    p = dsub.add_parser("train-exits", help="train DeeDiff's UEMs (backbone frozen, or jointly with the model)")
    common(p)
    p.add_argument("model", help="a folder written by `diffusion train`")
    p.add_argument("--mode", choices=("frozen", "joint"), default="frozen")
    p.add_argument("-o", "--output-dir", default=None, help="joint mode: the new model's folder")
    p.add_argument("--target", choices=("noise", "final"), default="noise", help="UEM target (DeeDiff: noise)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--backbone-lr", type=float, default=1e-4)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train_exits)

    def sampling(p: argparse.ArgumentParser) -> None:
        common(p)
        p.add_argument("model", help="a folder written by `diffusion train` (+ `train-exits` for uncertainty:T)")
        p.add_argument("--exit", default="full", help="full, uncertainty:T, fixed:K, late:K, early:K")
        p.add_argument("--steps", type=int, default=50)
        p.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim")
        p.add_argument("--batch-size", type=int, default=64)

    p = dsub.add_parser("sample", help="sample a PNG grid (one column per class) with early exit")
    sampling(p)
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--label", type=int, default=None, help="one class only")
    p.add_argument("-o", "--output", required=True, help="the PNG grid")
    p.set_defaults(func=cmd_sample)

    p = dsub.add_parser("eval", help="FID (domain classifier) + class accuracy + time of an exit setting vs full")
    sampling(p)
    p.add_argument("--classifier", required=True, help="a folder written by `diffusion train-classifier`")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--reference", type=int, default=2000, help="test images for the Frechet reference")
    p.set_defaults(func=cmd_eval)

    p = dsub.add_parser("train-classifier", help="train the Fashion-MNIST CNN whose features FID and accuracy use")
    common(p)
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train_classifier)


__all__ = ["add_commands"]
if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: depthprune diffusion ...")
