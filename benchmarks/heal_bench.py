"""Healing after static pruning on SmolLM2: held-out perplexity of each scorer's plan, unhealed and healed, next to the
untouched model, in one run.

    OMP_NUM_THREADS=1 python benchmarks/heal_bench.py --n-remove 4 8 12 --methods fold --json out/heal.json

Calibration: --calib-blocks blocks of --seq-len tokens from the book's calibration part (before chapter 110); the
scorers choose on the first --score-blocks of them, the healers fit on all. Held-out: --heldout-blocks blocks from
chapter 110 on (depthprune.data). The healed model's decode speed equals the unhealed one's (same layers, same shapes:
a fold only changes weight values), so no timing here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from depthprune.bench.perplexity import perplexity
from depthprune.bench.report import format_table, to_jsonable
from depthprune.bench.speed import machine_info
from depthprune.data import calibration_text, heldout_text, token_blocks
from depthprune.io import load_model, load_tokenizer
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan, layer_sizes
from depthprune.static.heal import heal
from depthprune.static.scorers import get_scorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--book", default=None, help="a text file (e.g. ../shared/data/moby-dick.txt); default: packaged")
    p.add_argument("--scorers", nargs="+", default=["block_influence"])
    p.add_argument("--methods", nargs="+", default=["fold"])
    p.add_argument("--n-remove", type=int, nargs="+", default=[4, 8, 12])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-blocks", type=int, default=32)
    p.add_argument("--score-blocks", type=int, default=8)
    p.add_argument("--heldout-blocks", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, task="causal-lm"), load_tokenizer(args.model)
    cal = token_blocks(tokenizer, calibration_text(args.book), args.seq_len, args.calib_blocks)
    held = token_blocks(tokenizer, heldout_text(args.book), args.seq_len, args.heldout_blocks)
    cal_batches = list(cal.split(4))
    sizes = layer_sizes(model)
    full = perplexity(model, held)
    print(f"untouched: held-out perplexity {full:.2f} ({held.numel()} tokens); calibration {tuple(cal.shape)}")
    rows = [{"scorer": "-", "removed": 0, "method": "untouched", "ppl": full, "x_untouched": 1.0, "seconds": 0.0}]
    for scorer in args.scorers:
        for n in args.n_remove:
            chosen = get_scorer(scorer)(model, cal_batches[: max(1, args.score_blocks // 4)], n_remove=n).remove
            plan = LayerPlan.drop(sizes, chosen)
            unhealed = perplexity(apply_plan(model, plan, share_weights=True), held)
            rows.append(
                {"scorer": scorer, "removed": n, "method": "none", "ppl": unhealed, "x_untouched": unhealed / full}
            )
            rows[-1].update(plan=plan.to_text(), seconds=0.0)
            for method in args.methods:
                t0 = time.perf_counter()
                try:
                    healed = heal(model, plan, cal_batches, method=method)
                except ValueError as err:  # e.g. a plan removing layer 0 cannot be folded
                    rows.append({"scorer": scorer, "removed": n, "method": method, "error": str(err)})
                    continue
                seconds = time.perf_counter() - t0
                ppl = perplexity(healed, held)
                rows.append(
                    {
                        "scorer": scorer,
                        "removed": n,
                        "method": method,
                        "ppl": ppl,
                        "x_untouched": ppl / full,
                        "x_unhealed": ppl / unhealed,
                        "seconds": round(seconds, 1),
                    }
                )
                print(f"{scorer} -{n} {method}: {unhealed:.1f} -> {ppl:.1f} ({seconds:.0f} s)")
    print(format_table(rows, columns=["scorer", "removed", "method", "ppl", "x_untouched", "x_unhealed", "seconds"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(to_jsonable({"machine": machine_info(), "args": vars(args), "rows": rows}), indent=1)
        )


if __name__ == "__main__":
    main()
