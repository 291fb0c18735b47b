"""DeeDiff benchmark: sampling wall-clock vs the full model (same DDIM scheduler, steps and seeds), mean blocks per
step, FID on the domain classifier's features and class accuracy, for uncertainty thresholds and the static baselines;
a PNG of the mean exit layer against the timestep. After a warm-up, policies run one after another; with
--rounds R they run R times in turn (interleaved) and each one's time is its median, so load drift hits all alike;
the process's CPU time is recorded beside the wall-clock (`cpu_speedup`: what one thread computes, whatever the load).
--baseline MODEL: the FID of that model's full samples (the untouched DiT, when --model was trained further, e.g.
jointly with its exits) is the reference of `fid_increase_vs_baseline`.

    python benchmarks/diffusion_bench.py --model DIR --classifier DIR -o benchmarks/diffusion_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    p.add_argument("--rounds", type=int, default=1, help="timing rounds over all policies (median time)")
    p.add_argument("--no-b1", action="store_true", help="skip the batch-1 timing")
    p.add_argument("--baseline", default=None, help="another model whose full samples' FID is the reference too")
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
    times: dict[str, list[float]] = {policy: [] for policy in policies}
    times_b1: dict[str, list[float]] = {policy: [] for policy in policies}
    cpu: dict[str, list[float]] = {policy: [] for policy in policies}  # this process's CPU time: robust to load
    for r in range(args.rounds):
        for policy in policies:
            t0, c0 = time.perf_counter(), time.process_time()
            out = sample_batches(model, sched, labels, policy=policy, **kw)
            times[policy].append(time.perf_counter() - t0)
            cpu[policy].append(time.process_time() - c0)
            if not args.no_b1:
                t1 = time.perf_counter()
                sample_batches(model, sched, labels[:2], policy=policy, **{**kw, "batch_size": 1})
                times_b1[policy].append((time.perf_counter() - t1) / 2)
            if r:
                continue
            quality = image_quality(classifier, out.images, labels, reference)
            rows.append({"policy": policy, "mean_layers": round(out.mean_layers, 3), **quality})
            curves[policy] = (out.timesteps.tolist(), out.layers.float().mean(1).tolist())
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        row["seconds"] = round(statistics.median(times[row["policy"]]), 2)
        row["seconds_all"] = [round(t, 2) for t in times[row["policy"]]]
        row["cpu_seconds"] = round(statistics.median(cpu[row["policy"]]), 2)
        if not args.no_b1:
            row["seconds_per_sample_b1"] = round(statistics.median(times_b1[row["policy"]]), 3)
    baseline_fid = None
    if args.baseline:
        base, base_sched, _ = load_diffusion(args.baseline)
        got = sample_batches(base, base_sched, labels, policy="full", **kw)
        baseline_fid = image_quality(classifier, got.images, labels, reference)["fid"]
    full = rows[0]
    for r in rows:
        r["speedup"] = round(full["seconds"] / r["seconds"], 3)
        r["cpu_speedup"] = round(full["cpu_seconds"] / r["cpu_seconds"], 3)
        if not args.no_b1:
            r["speedup_b1"] = round(full["seconds_per_sample_b1"] / r["seconds_per_sample_b1"], 3)
        r["fid_increase"] = round(r["fid"] / full["fid"] - 1, 4)
        if baseline_fid is not None:
            r["fid_increase_vs_baseline"] = round(r["fid"] / baseline_fid - 1, 4)
        r["layers_saved"] = round(1 - r["mean_layers"] / model.config.num_layers, 4)
    record = {"rows": rows, "curves": curves, "steps": args.steps, "samples": len(labels), "rounds": args.rounds,
              "model": args.model, "baseline": args.baseline, "baseline_fid": baseline_fid,
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
