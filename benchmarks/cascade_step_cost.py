r"""What one decoding step costs each side of a SmolLM2 big/little cascade (the cause behind cascade_bench's speeds).

    OMP_NUM_THREADS=1 python benchmarks/cascade_step_cost.py --remove 3,4,5,12-18,25,26

The little model is the big one without --remove (shapes are what matter for time; the fold changes no shape). After a
--prompt-len token prefill, at each of --batch-sizes: one cached step of the big model (full head), of the little model
(full head), of the little model's layers + final norm and a head over --vocab-k tokens (what cascade_generate runs
with little_vocab), and the big model's forward over 4 new columns (a lossless round with 3 drafts). Median of --steps
calls, interleaved; ratios to the big model's step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers.cache_utils import DynamicCache

from depthprune.io import load_model
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan, layer_sizes


def measure(big, little, weight, b: int, args: argparse.Namespace) -> dict:
    """Median ms of each kind of step at batch b, and its ratio to the big model's step."""
    ids = torch.randint(100, 5000, (b, args.prompt_len + 4))

    def fresh(model):
        cache = DynamicCache()
        model(ids[:, : args.prompt_len], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    caches = {"big": fresh(big), "little": fresh(little)}
    tok = ids[:, args.prompt_len : args.prompt_len + 1]
    four = ids[:, args.prompt_len :]

    def step(model, name, x):
        cache = caches[name]
        model(x, past_key_values=cache, use_cache=True)
        cache.crop(-x.shape[1])  # back to the prompt's columns

    def little_subset():
        cache = caches["little"]
        h = little.model(tok, past_key_values=cache, use_cache=True).last_hidden_state
        torch.nn.functional.linear(h, weight)
        cache.crop(-1)

    runs = {
        "big step": lambda: step(big, "big", tok),
        "little step (full head)": lambda: step(little, "little", tok),
        f"little step (head over {args.vocab_k})": little_subset,
        "big over 4 columns": lambda: step(big, "big", four),
    }
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(args.steps):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {k: {"ms": 1000 * v, "x_big_step": v / med["big step"]} for k, v in med.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--remove", default="3,4,5,12-18,25,26")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--vocab-k", type=int, default=6814)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    big = load_model("smollm2", task="causal-lm").eval()
    sizes = layer_sizes(big)
    remove = LayerPlan.parse(args.remove).stacks
    little = apply_plan(big, LayerPlan.drop(sizes, list(remove.values())[0])).eval()
    rows = torch.arange(args.vocab_k)
    weight = little.lm_head.weight.detach()[rows].clone()
    out = {}
    with torch.inference_mode():
        for b in args.batch_sizes:
            out[b] = measure(big, little, weight, b, args)
            for k, v in out[b].items():
                print(f"b{b} {k}: {v['ms']:.1f} ms = {v['x_big_step']:.2f} big steps", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
