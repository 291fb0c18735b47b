"""DeeDiff benchmark: sampling wall-clock vs the full model (same DDIM scheduler, steps and seeds), mean blocks per
step, FID on the domain classifier's features and class accuracy, for uncertainty thresholds and the static baselines;
a PNG of the mean exit layer against the timestep. Policies run interleaved, after a warm-up.

    python benchmarks/diffusion_bench.py --model DIR --classifier DIR -o benchmarks/diffusion_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from depthprune.diffusion.classifier import load_classifier
from depthprune.diffusion.data import load_fashion_mnist
from depthprune.diffusion.fid import image_quality
from depthprune.diffusion.io import load_uems
from depthprune.diffusion.sample import sample_batches
from depthprune.diffusion.train import load_diffusion
from depthprune.fsutil import write_atomic


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--classifier", required=True)
    p.add_argument("--policies", default="full,uncertainty:0.2,uncertainty:0.3,uncertainty:0.4,fixed:5,late:2,early:2")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reference", type=int, default=2000, help="test images for the Frechet reference")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--output", default="benchmarks/diffusion_bench.json")
    p.add_argument("--plot", default="benchmarks/diffusion_exit_vs_timestep.png")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, sched, _ = load_diffusion(args.model)
    uems = load_uems(args.model, num_layers=model.config.num_layers)
    classifier, cconf = load_classifier(args.classifier)
    reference, _ = load_fashion_mnist("test", limit=args.reference)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    policies = args.policies.split(",")
    kw = dict(steps=args.steps, uems=uems, seed=0, batch_size=args.batch_size)
    sample_batches(model, sched, labels[:4], policy="full", **{**kw, "steps": 2})  # warm-up
    rows = []
    curves = {}
    for policy in policies:
        t0 = time.perf_counter()
        out = sample_batches(model, sched, labels, policy=policy, **kw)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        sample_batches(model, sched, labels[:2], policy=policy, **{**kw, "batch_size": 1})
        seconds_b1 = (time.perf_counter() - t1) / 2
        quality = image_quality(classifier, out.images, labels, reference)
        rows.append({"policy": policy, "seconds": round(seconds, 2), "seconds_per_sample_b1": round(seconds_b1, 3),
                     "mean_layers": round(out.mean_layers, 3), **quality})  # fmt: skip
        curves[policy] = (out.timesteps.tolist(), out.layers.float().mean(1).tolist())
        print(json.dumps(rows[-1]), flush=True)
    full = rows[0]
    for r in rows:
        r["speedup"] = round(full["seconds"] / r["seconds"], 3)
        r["speedup_b1"] = round(full["seconds_per_sample_b1"] / r["seconds_per_sample_b1"], 3)
        r["fid_increase"] = round(r["fid"] / full["fid"] - 1, 4)
        r["layers_saved"] = round(1 - r["mean_layers"] / model.config.num_layers, 4)
    record = {"rows": rows, "curves": curves, "steps": args.steps, "samples": len(labels),
              "batch_size": args.batch_size, "classifier_test_accuracy": cconf.get("test_accuracy"),
              "load": os.getloadavg(), "machine": "2-core CPU, 1 torch thread"}  # fmt: skip
    write_atomic(args.output, json.dumps(record, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, (ts, layers) in curves.items():
        ax.plot(ts, layers, label=policy)
    ax.set_xlabel("timestep (1000 = pure noise)")
    ax.set_ylabel("mean blocks run")
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
