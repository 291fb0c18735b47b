"""Held-out perplexity of SmolLM2 after static pruning, unhealed vs healed, beside the untouched model (same run).

Plans come from one scorer (default block_influence, ShortGPT) on the calibration batches; every healing method
gets the same plan and the same batches. Calibration: Moby-Dick before chapter 110, held-out: from chapter 110 on
(depthprune.data), both in 256-token blocks. One thread, so figures are
comparable on a shared machine.

    python benchmarks/heal_bench.py                                        # fold, 4 and 8 removed
    python benchmarks/heal_bench.py --n-remove 4 8 12 --methods fold fold:loss=cosine --json out/heal.json
    python benchmarks/heal_bench.py --removed 5,13-18,26 --methods fold    # SLEB's 8-layer set, given by hand

A method is a registered healer name with optional options: `name:key=value,key=value` (values parsed as JSON when
they parse, else kept as text), e.g. `fold:sequential=false`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import depthprune
from depthprune.bench.perplexity import perplexity
from depthprune.data import heldout_text, token_blocks
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan, layer_sizes
from depthprune.static.heal import heal
from depthprune.static.prune import calibration_batches
from depthprune.static.scorers import get_scorer

ROOT = Path(__file__).resolve().parents[1]


def parse_method(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def book_data(
    tokenizer, text: str, seq_len: int = 256, calib_blocks: int = 96, heldout_blocks: int = 16
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(calibration batches from before chapter 110 of the book at path `text`, held-out blocks [blocks, seq_len]
    from chapter 110 on): the data of every healing and order-search benchmark."""
    batches = calibration_batches(tokenizer, path=text, seq_len=seq_len, n_blocks=calib_blocks)
    return batches, token_blocks(tokenizer, heldout_text(text), seq_len, heldout_blocks)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(ROOT / ".." / "shared" / "data" / "moby-dick.txt"), help="the book")
    parser.add_argument("--model", default="smollm2", help="model name, folder or alias (default: embedded SmolLM2)")
    parser.add_argument("--methods", nargs="+", default=["fold"], help="healers, optionally name:key=value,...")
    parser.add_argument("--scorer", default="block_influence")
    parser.add_argument("--n-remove", nargs="+", type=int, default=[4, 8])
    parser.add_argument(
        "--removed", nargs="+", default=[], help="explicit removal sets instead of the scorer's, e.g. 5,13-18,26"
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-blocks", type=int, default=96)
    parser.add_argument("--heldout-blocks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = depthprune.load_model(args.model).eval()
    tokenizer = depthprune.load_tokenizer(args.model)
    batches, heldout = book_data(tokenizer, args.text, args.seq_len, args.calib_blocks, args.heldout_blocks)
    sizes = layer_sizes(model)
    stack = list(sizes)[-1]
    rows = [{"n_remove": 0, "method": "untouched", "plan": "", "ppl": perplexity(model, heldout), "seconds": 0.0}]
    print(f"untouched: {rows[0]['ppl']:.2f}", flush=True)
    chosen = [list(LayerPlan.parse(text).stacks.values())[0] for text in args.removed]
    if not chosen:
        chosen = [get_scorer(args.scorer)(model, batches, n_remove=n, stack=stack).remove for n in args.n_remove]
    for remove in chosen:
        n = len(remove)
        plan = LayerPlan.drop(sizes, {stack: remove})
        pruned = apply_plan(model, plan, share_weights=True)
        row = {"n_remove": n, "method": "unhealed", "plan": plan.to_text(), "ppl": perplexity(pruned, heldout)}
        rows.append({**row, "seconds": 0.0})
        print(f"{n} removed {sorted(remove)}: unhealed {row['ppl']:.2f}", flush=True)
        for method in args.methods:
            name, options = parse_method(method)
            start = time.perf_counter()
            healed = heal(model, plan, batches, method=name, **options)
            seconds = time.perf_counter() - start
            ppl = perplexity(healed, heldout)
            rows.append({"n_remove": n, "method": method, "plan": plan.to_text(), "ppl": ppl, "seconds": seconds})
            print(f"{n} removed: {method} {ppl:.2f} ({ppl / row['ppl']:.3f} x unhealed, {seconds:.0f} s)", flush=True)
            del healed
    result = {
        "model": args.model,
        "scorer": "explicit" if args.removed else args.scorer,
        "calibration_tokens": args.calib_blocks * args.seq_len,
        "heldout_tokens": int(heldout.numel()),
        "threads": args.threads,
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
