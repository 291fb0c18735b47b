"""Held-out perplexity of SmolLM2-135M after removing the layers each importance scorer chooses.

Calibration: blocks from Moby-Dick before chapter 110; evaluation: blocks from chapter 110 on (depthprune.data).
Every scorer gets the same calibration batches; the pruned model is a what-if copy sharing the weights.

    python benchmarks/scorers_check.py                       # all scorers, n_remove 4 and 8
    python benchmarks/scorers_check.py --scorers sleb --n-remove 8 --json out/scorers.json
    python benchmarks/scorers_check.py --json out/new.json --reuse out/scorers.json   # only what is not there yet
    python benchmarks/scorers_check.py --n-remove 4 8 12 --png curve.png --reuse out/scorers.json  # plot, no runs

--png writes the layers-removed vs held-out perplexity curve of every scorer (the untouched model at 0 removed).

SLEB is greedy, so its choice for a smaller n_remove is the start of its removal order for the largest one (what a
separate run would return); it runs once at the largest n unless --rerun-greedy is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import depthprune
from depthprune.bench.perplexity import perplexity
from depthprune.data import calibration_text, heldout_text, token_blocks
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan, layer_sizes
from depthprune.static.scorers import LayerScores, get_scorer

ROOT = Path(__file__).resolve().parents[1]
SCORERS = ("block_influence", "angular", "sleb", "lookahead_kl")
GREEDY = ("sleb",)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moby-dick", default=str(ROOT / ".." / "shared" / "data" / "moby-dick.txt"))
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded SmolLM2)")
    parser.add_argument("--scorers", nargs="+", default=list(SCORERS), choices=SCORERS)
    parser.add_argument("--n-remove", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-blocks", type=int, default=8)
    parser.add_argument("--heldout-blocks", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1, help="calibration blocks per batch given to scorers")
    parser.add_argument("--rerun-greedy", action="store_true", help="run SLEB separately for every n_remove")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--png", default=None, help="also plot layers removed vs held-out perplexity here")
    parser.add_argument(
        "--reuse",
        nargs="+",
        default=[],
        metavar="JSON",
        help="take (scorer, n_remove) results found in these "
        "--json outputs of earlier runs (same data) instead of running them again; also resumes a cut-short run",
    )
    args = parser.parse_args(argv)

    model = depthprune.load_model(args.model)
    tokenizer = depthprune.load_tokenizer(args.model)
    calib = token_blocks(tokenizer, calibration_text(args.moby_dick), args.seq_len, args.calib_blocks)
    heldout = token_blocks(tokenizer, heldout_text(args.moby_dick), args.seq_len, args.heldout_blocks)
    batches = list(calib.split(args.batch_size))
    sizes = layer_sizes(model)
    stack = list(sizes)[-1]
    log(
        f"model {type(model).__name__}, {sizes[stack]} layers; calibration {tuple(calib.shape)}, "
        f"held-out {tuple(heldout.shape)}, {torch.get_num_threads()} threads"
    )

    t = time.perf_counter()
    full_ppl = perplexity(model, heldout)
    results: dict = {"full": {"heldout_ppl": full_ppl, "eval_seconds": time.perf_counter() - t}, "scorers": {}}
    log(f"full model: held-out perplexity {full_ppl:.2f}")

    ns = sorted(set(args.n_remove))
    earlier: dict[str, dict[int, dict]] = {}
    for path in args.reuse:
        if Path(path).exists():
            for name, runs in json.loads(Path(path).read_text())["scorers"].items():
                earlier.setdefault(name, {}).update({int(n): run for n, run in runs.items()})
    for name in args.scorers:
        out = results["scorers"][name] = {}
        for n in ns:
            if n in earlier.get(name, {}):
                out[n] = earlier[name][n]
                log(f"{name} n={n}: taken from an earlier run")
        todo = [n for n in ns if n not in out]
        if not todo:
            continue
        scorer = get_scorer(name)
        if name in GREEDY and not args.rerun_greedy:
            t = time.perf_counter()
            result = scorer(model, batches, n_remove=todo[-1], progress=True)
            seconds = time.perf_counter() - t
            for n in todo:
                remove = sorted(result.details["order"][:n])
                out[n] = heldout_run(model, heldout, stack, remove, seconds if n == todo[-1] else None, result)
                log_run(name, n, out[n], todo[-1])
                save(results, args.json)
            continue
        for n in todo:
            t = time.perf_counter()
            result = scorer(model, batches, n_remove=n, progress=True)
            out[n] = heldout_run(model, heldout, stack, list(result.remove), time.perf_counter() - t, result)
            log_run(name, n, out[n], n)
            save(results, args.json)

    print_tables(results, ns)
    save(results, args.json)
    if args.png:
        from depthprune.bench.plots import plot_ppl_curves

        full = results["full"]["heldout_ppl"]
        curves = {
            name: {0: full, **{n: run["heldout_ppl"] for n, run in runs.items()}}
            for name, runs in results["scorers"].items()
        }
        title = f"{sizes[stack]}-layer model: held-out perplexity vs layers removed"
        log(f"wrote {plot_ppl_curves(curves, args.png, baseline=full, title=title)}")
    return results


def heldout_run(
    model: nn.Module, heldout: torch.Tensor, stack: str, remove: list[int], seconds: float | None, result: LayerScores
) -> dict:
    """Held-out perplexity of the model without the layers `remove`, with what the scorer said."""
    pruned = apply_plan(model, LayerPlan.drop(layer_sizes(model), {stack: remove}), share_weights=True)
    return {
        "remove": remove,
        "seconds": seconds,
        "heldout_ppl": perplexity(pruned, heldout),
        "scores": list(result.scores),
        "details": result.details,
    }


def log_run(name: str, n: int, run: dict, largest: int) -> None:
    took = f"from the n={largest} run" if run["seconds"] is None else f"{run['seconds']:.0f}s"
    log(f"{name} n={n}: remove {run['remove']} ({took}) -> held-out perplexity {run['heldout_ppl']:.2f}")


def save(results: dict, path: str | None) -> None:
    """Write the results so far (after every run, so a long check that is cut short keeps what it has)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2, default=str))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def print_tables(results: dict, ns: list[int]) -> None:
    scorers = results["scorers"]
    width = max([len(s) for s in scorers] + [10])
    print(f"\nHeld-out perplexity (full model: {results['full']['heldout_ppl']:.2f})")
    print(f"{'scorer':<{width}} " + " ".join(f"{'n=' + str(n):>10}" for n in ns))
    for name, runs in scorers.items():
        print(f"{name:<{width}} " + " ".join(f"{runs[n]['heldout_ppl']:>10.2f}" for n in ns))
    baselines = [s for s in scorers if s != "lookahead_kl"]
    if "lookahead_kl" in scorers and baselines:
        ratios = []
        for n in ns:
            best = min(scorers[s][n]["heldout_ppl"] for s in baselines)
            ratios.append(f"{scorers['lookahead_kl'][n]['heldout_ppl'] / best:>10.3f}")
        print(f"{'ratio':<{width}} " + " ".join(ratios) + "   (lookahead_kl / best other scorer)")
    print("\nScorer runtime (seconds)")
    for name, runs in scorers.items():
        cells = ["from n=" + str(ns[-1]) if runs[n]["seconds"] is None else f"{runs[n]['seconds']:.0f}" for n in ns]
        print(f"{name:<{width}} " + " ".join(f"{c:>10}" for c in cells))
    print("\nLayers removed")
    for name, runs in scorers.items():
        for n in ns:
            print(f"{name:<{width}} n={n}: {runs[n]['remove']}")


if __name__ == "__main__":
    main()
