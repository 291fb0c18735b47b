"""Distillation healing on SmolLM2-135M: Block Influence removes 8 of 30 layers; held-out perplexity of the untouched,
the unhealed and the distilled model in one run, on one CPU thread, with a training budget sized to `--minutes`.

    PYTHONPATH=src python benchmarks/heal_distill.py --minutes 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import depthprune
from depthprune.bench.perplexity import perplexity
from depthprune.data import heldout_text, token_blocks
from depthprune.static.apply import apply_plan, layer_sizes
from depthprune.static.heal.distill import _DistillLoss, distill_heal
from depthprune.static.prune import calibration_batches
from depthprune.static.scorers import get_scorer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--remove", type=int, default=8)
    p.add_argument("--calib-blocks", type=int, default=64)
    p.add_argument("--heldout-blocks", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = depthprune.load_model("smollm2"), depthprune.load_tokenizer("smollm2")
    model.eval()
    batches = calibration_batches(tokenizer, seq_len=args.seq_len, n_blocks=args.calib_blocks)
    remove = get_scorer("block_influence")(model, batches, args.remove).remove
    plan = depthprune.LayerPlan.drop(layer_sizes(model), remove)
    heldout = token_blocks(tokenizer, heldout_text(), args.seq_len, args.heldout_blocks)

    # time one training step (teacher forward, student forward + backward) to size the token budget
    from depthprune.lora import lora_copy

    probe = lora_copy(apply_plan(model, plan), 8)
    loss = _DistillLoss(probe.get_base_model(), model, 1.0, 0.1)
    t0 = time.perf_counter()
    for _ in range(2):
        loss(batches[0])["loss"].backward()
    step = (time.perf_counter() - t0) / 2
    del probe, loss
    steps = int(args.minutes * 60 / step)
    max_tokens = steps * batches[0].shape[0] * args.seq_len
    print(f"step {step:.2f}s -> {steps} steps, max_tokens={max_tokens}", flush=True)

    ppl_full = perplexity(model, heldout)
    ppl_pruned = perplexity(apply_plan(model, plan), heldout)
    result = distill_heal(model, plan, batches, epochs=100, lr=args.lr, max_tokens=max_tokens, progress=False)
    ppl_healed = perplexity(result.model, heldout)
    report = {
        "plan": str(plan),
        "removed": list(remove),
        "calib_blocks": args.calib_blocks,
        "heldout_blocks": args.heldout_blocks,
        "seq_len": args.seq_len,
        "tokens": result.tokens,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "lr": args.lr,
        "ppl_untouched": ppl_full,
        "ppl_unhealed": ppl_pruned,
        "ppl_distilled": ppl_healed,
        "epoch_losses": result.epoch_losses,
        "first_losses": result.history[:5],
        "last_losses": result.history[-5:],
    }
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
