"""Order search on SmolLM2: do reorders and repeats beat pure removal at the same executed depth?

For each number of removed layers and each start plan (block_influence's and SLEB's pure removals), two searches with
the same evaluation budget and seed: all moves (swap, repeat, move, exchange) and monotone-only (exchange: pure
removals). Both score plans on the calibration NLL of the first `--search-blocks` calibration blocks; the verdict is
the held-out perplexity (Moby-Dick from chapter 110 on) of the start, the best monotone and the best all-moves plan,
and of the best non-monotone plan any search scored. Data: heal_bench.book_data (96 x 256 calibration blocks before
chapter 110, 16 x 256 held-out blocks), the untouched model measured in the same run. One thread.

    python benchmarks/order_search.py --n-remove 8 --json benchmarks/order_search.json    # then --n-remove 4

Start plans: block_influence is scored on the search blocks (cheap); SLEB's greedy run costs hundreds of
evaluations, so its plans are read from benchmarks/scorers_check.json (SLEB on 8 x 256 calibration blocks, RESULTS
1b) unless --run-sleb. The JSON file is updated in place: rows of the depths run here replace earlier ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from heal_bench import book_data

import depthprune
from depthprune.bench.perplexity import perplexity
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan
from depthprune.static.scorers import get_scorer
from depthprune.static.search import is_pure_removal, search_order

ROOT = Path(__file__).resolve().parents[1]


def recorded_sleb(path: Path, n_remove: int) -> list[int] | None:
    if not path.is_file():
        return None
    record = json.loads(path.read_text()).get("scorers", {}).get("sleb", {}).get(str(n_remove))
    return None if record is None else list(record["remove"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(ROOT / ".." / "shared" / "data" / "moby-dick.txt"), help="the book")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n-remove", nargs="+", type=int, default=[8, 4])
    parser.add_argument("--starts", nargs="+", default=["block_influence", "sleb"])
    parser.add_argument("--budget", type=int, default=20, help="plans each search scores (start included)")
    parser.add_argument("--search-blocks", type=int, default=4, help="calibration blocks the search scores on")
    parser.add_argument("--strategy", default="first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-sleb", action="store_true", help="run SLEB on the search blocks (slow)")
    parser.add_argument("--sleb-record", default=str(ROOT / "benchmarks" / "scorers_check.json"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="update this JSON file with the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    model = depthprune.load_model(args.model).eval()
    tokenizer = depthprune.load_tokenizer(args.model)
    batches, heldout = book_data(tokenizer, args.text)  # 96 x 256 in batches of 4; 16 x 256 held-out
    search = torch.cat(batches)[: args.search_blocks]
    search = list(search.split(4))
    n_layers = len(model.model.layers)
    ppl_cache: dict[tuple[int, ...], float] = {}

    def heldout_ppl(keep: tuple[int, ...]) -> float:
        if keep not in ppl_cache:
            ppl_cache[keep] = perplexity(apply_plan(model, LayerPlan({"decoder": keep}), share_weights=True), heldout)
        return ppl_cache[keep]

    untouched = perplexity(model, heldout)
    print(f"untouched: held-out ppl {untouched:.2f}", flush=True)
    runs = []
    for n in args.n_remove:
        depth = n_layers - n
        pure_best: tuple[float, tuple[int, ...]] | None = None
        mixed_best: tuple[float, tuple[int, ...]] | None = None
        for start_name in args.starts:
            if start_name == "sleb" and not args.run_sleb and (removed := recorded_sleb(Path(args.sleb_record), n)):
                source = "sleb (benchmarks/scorers_check.json, 8 x 256 calibration)"
            else:
                removed = list(get_scorer(start_name)(model, search, n_remove=n).remove)
                source = f"{start_name} on the search blocks"
            start = tuple(i for i in range(n_layers) if i not in set(removed))
            row = {"n_remove": n, "depth": depth, "start": start_name, "start_source": source}
            for mode, monotone in (("monotone", True), ("all", False)):
                result = search_order(
                    model,
                    search,
                    start=start,
                    budget=args.budget,
                    strategy=args.strategy,
                    monotone=monotone,
                    seed=args.seed,
                )
                keep = result.best.stacks["decoder"]
                row.setdefault("start_plan", result.start.to_text())
                row.setdefault("start_loss", result.start_loss)
                row[mode] = {
                    "plan": result.best.to_text(),
                    "loss": result.best_loss,
                    "non_monotone": result.non_monotone,
                    "evaluations": result.evaluations,
                    "steps": result.steps,
                    "stopped": result.stopped,
                    "seconds": result.seconds,
                    "moves_scored": {m: sum(e.move == m for e in result.history) for m in result.moves},
                    "heldout_ppl": heldout_ppl(keep),
                    "history": [e.to_dict() for e in result.history],
                }
                for e in result.history:
                    cand = e.plan.stacks["decoder"]
                    if is_pure_removal(cand):
                        pure_best = min(pure_best or (e.loss, cand), (e.loss, cand))
                    else:
                        mixed_best = min(mixed_best or (e.loss, cand), (e.loss, cand))
                print(
                    f"{n} removed, from {start_name}, {mode}: {result.start_loss:.4f} -> {result.best_loss:.4f} "
                    f"({result.evaluations} plans, {result.steps} moves, {result.seconds:.0f} s, {result.stopped}); "
                    f"best {result.best.to_text()} held-out ppl {row[mode]['heldout_ppl']:.2f}",
                    flush=True,
                )
            row["start_heldout_ppl"] = heldout_ppl(start)
            print(f"{n} removed, {start_name} start {row['start_plan']}: held-out {row['start_heldout_ppl']:.2f}")
            runs.append(row)
        verdict = {"n_remove": n, "best_pure_loss": pure_best[0], "best_pure_plan": list(pure_best[1])}
        verdict["best_pure_heldout_ppl"] = heldout_ppl(pure_best[1])
        if mixed_best is not None:
            verdict.update(best_non_monotone_loss=mixed_best[0], best_non_monotone_plan=list(mixed_best[1]))
            verdict["best_non_monotone_heldout_ppl"] = heldout_ppl(mixed_best[1])
            verdict["non_monotone_beats_pure_on_calibration"] = mixed_best[0] < pure_best[0]
            verdict["non_monotone_beats_pure_heldout"] = (
                verdict["best_non_monotone_heldout_ppl"] < verdict["best_pure_heldout_ppl"]
            )
        print(json.dumps(verdict), flush=True)
        runs.append({"verdict": verdict})
    result = {
        "model": args.model,
        "untouched_heldout_ppl": untouched,
        "search_tokens": int(sum(b.numel() for b in search)),
        "heldout_tokens": int(heldout.numel()),
        "budget": args.budget,
        "strategy": args.strategy,
        "seed": args.seed,
        "threads": args.threads,
        "seconds": time.perf_counter() - began,
        "runs": runs,
    }
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else {}
        merged = {k: v for k, v in old.items() if k != "by_n_remove"}
        by_n = old.get("by_n_remove", {})
        for n in args.n_remove:
            by_n[str(n)] = {**{k: v for k, v in result.items() if k != "runs"}, "runs": []}
        for row in runs:
            n = row.get("n_remove", row.get("verdict", {}).get("n_remove"))
            by_n[str(n)]["runs"].append(row)
        path.write_text(json.dumps({**merged, "by_n_remove": by_n}, indent=2))
    print(f"total {time.perf_counter() - began:.0f} s")
    return result


if __name__ == "__main__":
    main()
