"""DeeDiff commands (thin wrappers over depthprune.diffusion): `depthprune diffusion train | train-exits | calibrate |
sample | eval | train-classifier`.

    depthprune diffusion train -o out/dit --epochs 2
    depthprune diffusion train-classifier -o out/classifier
    depthprune diffusion train-exits out/dit --mode frozen
    depthprune diffusion calibrate out/dit --classifier out/classifier --max-fid-increase 0.1 --delta 0.1
    depthprune diffusion sample out/dit --exit uncertainty:auto --steps 20 -o grid.png
    depthprune diffusion eval out/dit --exit uncertainty:auto --classifier out/classifier
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
    from depthprune.diffusion.train import load_diffusion, train_dit

    _threads(args)
    shape = _shape(args)  # checked before any data is read
    check_output_folder(args.output_dir, args.overwrite, resume=args.resume, source=args.init_from)
    init = load_diffusion(args.init_from) if args.init_from else (None, None, None)
    size = init[0].config.sample_size if args.init_from else args.size
    images, labels = load_fashion_mnist("train", size=size, root=args.data, limit=args.limit)
    _, _, run = train_dit(
        images, labels, shape=shape, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        output_dir=args.output_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
        overwrite=args.overwrite, progress=not args.quiet, save_dtype=torch.float16 if args.fp16 else None,
        init=init[0], init_scheduler=init[1], init_record=init[2],
    )  # fmt: skip
    last = run.epoch_losses[-1]["loss"] if run.epoch_losses else float("nan")
    print(json.dumps({"output_dir": run.output_dir, "steps": run.global_step, "seconds": run.train_seconds,
                      "last_epoch_loss": last}))  # fmt: skip
    return 0


# ---- train-exits -------------------------------------------------------------------------------------------------
def cmd_train_exits(args: argparse.Namespace) -> int:
    import torch

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
            save_diffusion(tmp, trained, scheduler, {**meta, "exits": record},
                           dtype=torch.float16 if args.fp16 else None)  # fmt: skip
        target = args.output_dir
    save_uems(uems, target, extra=record)
    print(json.dumps({"uems": f"{target}/uem", **record}))
    return 0


# ---- sample / eval ------------------------------------------------------------------------------------------------
def _load(args: argparse.Namespace):
    from depthprune.diffusion.calibrate import AUTO, calibrated_threshold
    from depthprune.diffusion.io import load_uems
    from depthprune.diffusion.sample import ExitPolicy, parse_exit
    from depthprune.diffusion.train import load_diffusion

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    model, scheduler, _ = load_diffusion(args.model)
    if args.exit == AUTO:  # the threshold `diffusion calibrate` wrote beside the UEMs
        threshold, record = calibrated_threshold(args.model)
        policy = ExitPolicy("uncertainty", threshold)
        settings = record["settings"]
        if (settings["steps"], settings["scheduler"]) != (args.steps, args.scheduler):
            print(f"warning: the threshold was calibrated for {settings['steps']} {settings['scheduler']} steps, "
                  f"this run takes {args.steps} {args.scheduler} steps: its guarantee does not carry over",
                  file=sys.stderr)  # fmt: skip
    else:
        policy = parse_exit(args.exit, model.config.num_layers)  # checked before sampling
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


# ---- calibrate --------------------------------------------------------------------------------------------------
def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from depthprune.bench.report import format_table
    from depthprune.cli.common import calibrate_check_write
    from depthprune.diffusion import calibrate as cal
    from depthprune.diffusion.classifier import load_classifier
    from depthprune.diffusion.data import load_fashion_mnist
    from depthprune.diffusion.fid import classifier_features, frechet_distance
    from depthprune.diffusion.io import load_uems
    from depthprune.diffusion.train import load_diffusion

    _threads(args)
    grid = args.grid or cal.GRID
    cal.check_settings(delta=args.delta, epsilon=args.epsilon, max_fid_increase=args.max_fid_increase,
                       steps=args.steps, grid=grid, risk=args.risk, tolerance=args.tolerance)  # fmt: skip
    if min(args.per_class, args.heldout_per_class) < 1 or args.reference < 2:
        raise ValueError("--per-class and --heldout-per-class must be >= 1 and --reference >= 2")
    model, scheduler, _ = load_diffusion(args.model)
    uems = load_uems(args.model, num_layers=model.config.num_layers)
    classifier, _ = load_classifier(args.classifier)
    reference, _ = load_fashion_mnist("test", size=model.config.sample_size, root=args.data, limit=args.reference)
    classes = torch.arange(model.config.num_embeds_ada_norm)
    labels, held_labels = classes.repeat_interleave(args.per_class), classes.repeat_interleave(args.heldout_per_class)
    kw = dict(steps=args.steps, kind=args.scheduler, batch_size=args.batch_size)
    held_seed = args.seed + 1  # held-out samples: other noise (generators are seeded by seed and index)
    held_full = cal.draw(model, scheduler, uems, classifier, held_labels, None, seed=held_seed, **kw)
    tolerance = args.tolerance
    if args.risk == "features" and tolerance is None:  # from the held-out full samples: fixed before calibration
        fid_full = frechet_distance(held_full.features, classifier_features(classifier, reference))
        tolerance = cal.feature_tolerance(args.max_fid_increase, fid_full, len(held_labels))
        if not args.json:
            print(f"tolerance {tolerance:.4g}: the feature distance that keeps FID within +{args.max_fid_increase:g} "
                  f"of the full model's held-out FID {fid_full:.4g} if no sample moves further")  # fmt: skip

    def calibrate_one(_name: str):
        result = cal.calibrate_threshold(model, scheduler, uems, classifier, labels, delta=args.delta,
                                         epsilon=args.epsilon, risk=args.risk, tolerance=tolerance, seed=args.seed,
                                         grid=grid, **kw)  # fmt: skip
        result.settings.update({"uems_sha256": cal.uem_fingerprint(args.model),
                                "max_fid_increase": args.max_fid_increase})  # fmt: skip
        return result

    def check_one(_name: str, threshold: float) -> dict:
        return cal.check_threshold(model, scheduler, uems, classifier, held_labels, threshold, full=held_full,
                                   risk=args.risk, tolerance=tolerance, reference=reference, seed=held_seed,
                                   **kw)  # fmt: skip

    def show(result) -> None:
        print(format_table(result.table, title=f"DeeDiff thresholds (risk {result.risk}, delta {result.delta:g})"))

    calibrate_check_write(["uncertainty"], calibrate_one, check_one, cal.calibration_path(args.model).parent,
                          title="held-out check (other seeds)", as_json=args.json, show=show)  # fmt: skip
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
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="go on training a copy of this trained DiT (a `diffusion train` folder; its shape, not "
                   "--size/--width/...)")  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = dsub.add_parser("train-exits", help="train DeeDiff's UEMs (backbone frozen, or jointly with the model)")
    common(p)
    p.add_argument("model", help="a folder written by `diffusion train`")
    p.add_argument("--mode", choices=("frozen", "joint"), default="frozen")
    p.add_argument("-o", "--output-dir", default=None, help="joint mode: the new model's folder")
    p.add_argument("--target", choices=("noise", "final", "x0"), default="noise",
                   help="UEM target: error vs the noise (DeeDiff), vs the full output, or of the clean-image "
                   "prediction (x0)")  # fmt: skip
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--backbone-lr", type=float, default=1e-4)
    p.add_argument("--fp16", action="store_true", help="joint mode: save the new model's weights in float16")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train_exits)

    def sampling(p: argparse.ArgumentParser) -> None:
        common(p)
        p.add_argument("model", help="a folder written by `diffusion train` (+ `train-exits` for uncertainty:T)")
        p.add_argument("--exit", default="full", help="full, uncertainty:T, uncertainty:auto (the threshold "
                       "`diffusion calibrate` wrote), fixed:K, late:K, early:K")  # fmt: skip
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

    p = dsub.add_parser("calibrate", help="choose the uncertainty threshold by Learn-then-Test (then --exit "
                        "uncertainty:auto)")  # fmt: skip
    common(p)
    p.add_argument("model", help="a folder written by `diffusion train` + `train-exits`")
    p.add_argument("--classifier", required=True, help="a folder written by `diffusion train-classifier`")
    p.add_argument("--max-fid-increase", type=float, default=0.1,
                   help="FID budget that sets the per-sample feature tolerance (default 0.1: +10%%)")  # fmt: skip
    p.add_argument("--tolerance", type=float, default=None, help="the feature distance itself (instead)")
    p.add_argument("--risk", choices=("features", "class"), default="features",
                   help="per-sample loss: features beyond the tolerance (default) or another class than the full "
                   "model's sample")  # fmt: skip
    p.add_argument("--delta", type=float, default=0.1, help="share of samples allowed to fail (default 0.1)")
    p.add_argument("--epsilon", type=float, default=0.05, help="1 - confidence (default 0.05)")
    p.add_argument("--grid", type=float, nargs="+", default=None, help="candidate thresholds (tested ascending)")
    p.add_argument("--per-class", type=int, default=10, help="calibration samples per class")
    p.add_argument("--heldout-per-class", type=int, default=10, help="held-out samples per class (other seeds)")
    p.add_argument("--reference", type=int, default=2000, help="test images for the Frechet reference")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the calibration as JSON")
    p.set_defaults(func=cmd_calibrate)

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
