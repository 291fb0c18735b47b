"""Held-out perplexity of SmolLM2 after static pruning, unhealed vs healed, beside the untouched model (same run).

Plans come from one scorer (default block_influence, ShortGPT) on the calibration batches; every healing method
gets the same plan and the same batches. Calibration: Moby-Dick before chapter 110, held-out: from chapter 110 on
(depthprune.data), both in 256-token blocks. One thread, so figures are
comparable on a shared machine.

    python benchmarks/heal_bench.py                                        # fold, 4 and 8 removed
    python benchmarks/heal_bench.py --n-remove 4 8 12 --methods fold fold:loss=cosine --json out/heal.json
    python benchmarks/heal_bench.py --removed 5,13-18,26 --methods fold    # SLEB's 8-layer set, given by hand

A method is a registered healer name with optional options: `name:key=value,key=value` (values parsed as JSON when
they parse, else kept as text), e.g. `fold:sequential=false`, `replace:epochs=4,lr=0.001`.

Every row records the layers the evaluated model runs. A healer that keeps more layers than the plan (replace keeps
one layer per removed run) gets two rows beside it: the same model before training (the plan with each run's init
layer kept, "..., untrained") and the scorer's plain removal at that same executed depth ("unhealed, same depth"),
so that a healed model is also compared with pruning that runs as many layers.
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
    began = time.perf_counter()

    model = depthprune.load_model(args.model).eval()
    tokenizer = depthprune.load_tokenizer(args.model)
    batches, heldout = book_data(tokenizer, args.text, args.seq_len, args.calib_blocks, args.heldout_blocks)
    sizes = layer_sizes(model)
    stack = list(sizes)[-1]
    n_layers = sizes[stack]
    rows = [
        {"n_remove": 0, "method": "untouched", "plan": "", "layers": n_layers, "ppl": perplexity(model, heldout)}
        | {"seconds": 0.0}
    ]
    print(f"untouched: {rows[0]['ppl']:.2f}", flush=True)
    scored: dict[int, list[int]] = {}

    def choose(n: int) -> list[int]:
        if n not in scored:
            scored[n] = list(get_scorer(args.scorer)(model, batches, n_remove=n, stack=stack).remove)
        return scored[n]

    def unhealed(remove: list[int], method: str = "unhealed") -> dict:
        plan = LayerPlan.drop(sizes, {stack: remove})
        pruned = apply_plan(model, plan, share_weights=True)
        ppl = perplexity(pruned, heldout)
        row = {"n_remove": len(remove), "method": method, "plan": plan.to_text(), "layers": n_layers - len(remove)}
        return row | {"ppl": ppl, "seconds": 0.0}

    chosen = [list(LayerPlan.parse(text).stacks.values())[0] for text in args.removed]
    if not chosen:
        chosen = [choose(n) for n in args.n_remove]
    for remove in chosen:
        n = len(remove)
        plan = LayerPlan.drop(sizes, {stack: remove})
        row = unhealed(remove)
        rows.append(row)
        print(f"{n} removed {sorted(remove)}: unhealed {row['ppl']:.2f}", flush=True)
        for method in args.methods:
            name, options = parse_method(method)
            start = time.perf_counter()
            healed = heal(model, plan, batches, method=name, **options)
            seconds = time.perf_counter() - start
            ppl = perplexity(healed, heldout)
            layers = layer_sizes(healed)[stack]
            rows.append(
                {"n_remove": n, "method": method, "plan": plan.to_text(), "layers": layers, "ppl": ppl}
                | {"seconds": seconds, "healing": getattr(healed.config, "depthprune_healing", None)}
            )
            ratio = ppl / row["ppl"]
            print(f"{n} removed: {method} {ppl:.2f} ({ratio:.3f} x unhealed, {layers} layers, {seconds:.0f} s)")
            record = getattr(healed.config, "depthprune_healing", None) or {}
            del healed
            kept = [k for k in range(n_layers) if k not in remove]
            inits = [r["init_layer"] for r in record.get("replacements", [])]
            if inits:  # the replaced model before training: the plan with each run's init layer kept
                alone = unhealed([k for k in range(n_layers) if k not in kept + inits], "init layers kept, untrained")
                rows.append(alone | {"n_remove": n, "plan": plan.to_text(), "method": f"{method}, untrained"})
                print(f"{n} removed: {method} before training {alone['ppl']:.2f} ({alone['layers']} layers)")
            if layers > n_layers - n and not any(
                r["method"] == "unhealed, same depth" and r["layers"] == layers for r in rows
            ):
                same = unhealed(choose(n_layers - layers), "unhealed, same depth")
                rows.append(same)
                print(f"{n_layers - layers} removed ({layers} layers, {args.scorer}): {same['ppl']:.2f}", flush=True)
    result = {
        "model": args.model,
        "scorer": "explicit" if args.removed else args.scorer,
        "calibration_tokens": args.calib_blocks * args.seq_len,
        "heldout_tokens": int(heldout.numel()),
        "threads": args.threads,
        "wall_seconds": round(time.perf_counter() - began, 1),
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
