"""Layer fusion on SmolLM2: LaCo's merge vs plain removal of the same layers vs block_influence's removal, and the
same runs shared (averaged weights) instead of merged, beside the untouched model (same run).

Data as benchmarks/heal_bench.py: calibration is Moby-Dick before chapter 110 (`--calib-blocks` x 256 tokens; the
block_influence scores use all of them, LaCo's similarity the first `--laco-blocks`, as the paper uses a few
sentences), held-out perplexity on 16 x 256 tokens from chapter 110 on. For each target, LaCo chooses runs; "plain
removal" runs the layers LaCo kept, unmerged (its plan); "shared" keeps every position and lets each merged run's
positions share one averaged layer (same executed depth as the untouched model, fewer unique parameters). Parameters
are counted in memory (a shared tensor once); file sizes are of `save_model` exports (which store every position).

    python benchmarks/fusion_bench.py --json benchmarks/fusion_bench.json
    python benchmarks/fusion_bench.py --n-remove 8 --merge-count 2 --threshold 0.9
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import depthprune
from depthprune.bench.perplexity import perplexity
from depthprune.data import heldout_text, token_blocks
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan, layer_sizes, source_plan
from depthprune.static.export import save_model
from depthprune.static.fusion import laco, merge_layers, parse_runs, share_layers, unique_parameters, weights_bytes
from depthprune.static.prune import calibration_batches
from depthprune.static.scorers import get_scorer

ROOT = Path(__file__).resolve().parents[1]


def file_bytes(model, scratch: Path, name: str) -> int:
    folder = save_model(model, scratch / name)
    size = weights_bytes(folder)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    return size


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(ROOT / ".." / "shared" / "data" / "moby-dick.txt"), help="the book")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n-remove", nargs="+", type=int, default=[4, 8, 12])
    parser.add_argument("--merge-count", type=int, default=None, help="LaCo's C (default: laco's)")
    parser.add_argument("--threshold", type=float, default=None, help="LaCo's T (default: laco's)")
    parser.add_argument("--interval", type=int, default=None, help="LaCo's I (default: laco's)")
    parser.add_argument("--low", type=int, default=None, help="LaCo's L (default: laco's, half the depth)")
    parser.add_argument("--high", type=int, default=None, help="LaCo's H (default: laco's, the depth)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-blocks", type=int, default=96)
    parser.add_argument("--laco-blocks", type=int, default=8)
    parser.add_argument("--heldout-blocks", type=int, default=16)
    parser.add_argument(
        "--explicit", nargs="*", default=[], help="runs merged by hand (e.g. 20-21 20-23), beside plain removal of them"
    )
    parser.add_argument("--share-first", action="store_true", help="also share each run's first layer (no average)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start_all = time.perf_counter()

    model = depthprune.load_model(args.model).eval()
    tokenizer = depthprune.load_tokenizer(args.model)
    batches = calibration_batches(tokenizer, path=args.text, seq_len=args.seq_len, n_blocks=args.calib_blocks)
    laco_batches = calibration_batches(tokenizer, path=args.text, seq_len=args.seq_len, n_blocks=args.laco_blocks)
    heldout = token_blocks(tokenizer, heldout_text(args.text), args.seq_len, args.heldout_blocks)  # [blocks, seq]
    sizes = layer_sizes(model)
    stack = list(sizes)[-1]
    n_layers = sizes[stack]
    options = {
        k: v
        for k, v in {
            "merge_count": args.merge_count,
            "threshold": args.threshold,
            "interval": args.interval,
            "low": args.low,
            "high": args.high,
        }.items()
        if v is not None
    }
    scratch = Path(tempfile.mkdtemp(prefix="fusion_bench-"))

    def row(n: int, method: str, m, executed: int, **extra) -> dict:
        t = time.perf_counter()
        ppl = perplexity(m, heldout)
        out = {"n_remove": n, "method": method, "executed_layers": executed, "ppl": ppl}
        out |= {"parameters": unique_parameters(m), **extra, "eval_seconds": time.perf_counter() - t}
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}), flush=True)
        return out

    rows = [row(0, "untouched", model, n_layers, file_bytes=file_bytes(model, scratch, "untouched"))]
    t = time.perf_counter()
    scores = get_scorer("block_influence")(model, batches, n_remove=max(args.n_remove), stack=stack).scores
    bi_seconds = time.perf_counter() - t
    for text in args.explicit:
        ((a, b),) = parse_runs(text)
        merged = merge_layers(model, [(a, b)], stack=stack)
        rows.append(row(b - a, f"merge {a}-{b} (by hand)", merged, n_layers - (b - a), plan=text))
        plan = source_plan(merged)
        rows.append(row(b - a, f"plain removal {a + 1}-{b}", apply_plan(model, plan, share_weights=True),
                        n_layers - (b - a), plan=plan.to_text()))  # fmt: skip
        del merged
    for n in args.n_remove:
        t = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = laco(model, laco_batches, n, stack=stack, **options)
        except ValueError as err:  # no candidate passed: recorded, not fatal
            rows.append({"n_remove": n, "method": "laco", "error": str(err), "seconds": time.perf_counter() - t})
            print(rows[-1], flush=True)
            continue
        for w in caught:
            print(f"warning: {w.message}", flush=True)
        seconds = time.perf_counter() - t
        merged_plan = source_plan(result.model)
        groups = sorted((min(s), max(s)) for s in result.merged_layers.values())
        kept = n_layers - result.n_removed
        rows.append(
            row(
                n,
                "laco",
                result.model,
                kept,
                plan=merged_plan.to_text(),
                merged=result.merged_layers,
                removed=result.n_removed,
                similarities=result.similarities,
                candidates=[[c.first, c.last, round(c.similarity, 4), c.accepted] for c in result.candidates],
                seconds=seconds,
            )
        )
        plain = apply_plan(model, merged_plan, share_weights=True)
        rows.append(row(n, "plain removal (laco's layers)", plain, kept, plan=merged_plan.to_text()))
        bi = sorted(range(n_layers), key=lambda i: (scores[i], i))[: result.n_removed]
        bi_plan = LayerPlan.drop(sizes, {stack: bi})
        rows.append(
            row(n, "block_influence removal", apply_plan(model, bi_plan, share_weights=True), kept,
                plan=bi_plan.to_text(), seconds=bi_seconds)
        )  # fmt: skip
        modes = ["average", "first"] if args.share_first else ["average"]
        for mode in modes:
            shared = share_layers(model, groups, mode=mode, stack=stack)
            rows.append(
                row(n, f"shared ({mode}) laco's runs", shared, n_layers, groups=groups,
                    file_bytes=file_bytes(shared, scratch, f"shared-{n}-{mode}"))
            )  # fmt: skip
            del shared
    scratch.rmdir()
    result = {
        "model": args.model,
        "laco_options": options,
        "calibration_tokens": args.calib_blocks * args.seq_len,
        "laco_calibration_tokens": args.laco_blocks * args.seq_len,
        "heldout_tokens": int(heldout.numel()),
        "threads": args.threads,
        "wall_seconds": time.perf_counter() - start_all,
        "rows": rows,
    }
    print(f"wall time {result['wall_seconds']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
