"""`depthprune eval DIR --lm-eval TASKS`: lm-evaluation-harness scores of a model and its untouched source, side by
side (depthprune.bench.harness; the `lm-eval` extra)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="score with lm-evaluation-harness instead: comma-separated tasks; 'local' = moby_cloze,moby_mc (written "
        "from the held-out text, no hub); with a hub any lm-eval task, e.g. hellaswag,arc_easy,mmlu",
    )
    p.add_argument("--lm-eval-limit", type=int, help="documents per task (default: all)")
    p.add_argument("--lm-eval-batch-size", type=int, default=8)
    p.add_argument(
        "--tasks-dir", help="folder for the local task files (default: under the depthprune cache; rewritten each run)"
    )


def _source_of(folder: str) -> str | None:
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    return (json.loads(config.read_text()).get("depthprune") or {}).get("source") or None


def run(args: argparse.Namespace) -> int:
    from depthprune.bench.harness import LOCAL_TASKS, lm_eval_models, write_local_tasks
    from depthprune.bench.report import format_table
    from depthprune.io import cache_dir, local_folder

    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    tasks = [name for t in tasks for name in (LOCAL_TASKS if t == "local" else (t,))]
    folder = local_folder(args.model)
    models = {"model": folder}
    baseline = args.baseline or _source_of(folder)
    if baseline and not args.no_baseline:
        models = {"untouched": local_folder(baseline), "model": folder}
    include = None
    if any(t in LOCAL_TASKS for t in tasks) or args.tasks_dir:
        include = write_local_tasks(args.tasks_dir or cache_dir() / "lm_eval_tasks", heldout=args.heldout)
    with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints progress to stdout: keep --json output clean
        report = lm_eval_models(
            models, tasks, include_path=include, limit=args.lm_eval_limit, batch_size=args.lm_eval_batch_size
        )
    if args.json:
        print(json.dumps({**report.to_dict(), "models": {k: str(v) for k, v in models.items()}}, indent=2))
    else:
        limit = f", {args.lm_eval_limit} documents per task" if args.lm_eval_limit else ""
        print(format_table(report.rows(), title=f"lm-evaluation-harness (HF backend{limit})"))
    return 0
