"""lm-evaluation-harness as the evaluator: pruned and untouched models scored side by side by lm-eval itself
(`lm_eval.simple_evaluate` with its HF backend, the `lm-eval` extra), on any of its tasks.

No hub is needed for two small local tasks written here in lm-eval's own YAML task format over local JSONL, both
from held-out text (by default the Moby-Dick excerpt packaged with depthprune, chapter 110 on):

- `moby_cloze`: LAMBADA-style last word of a passage (loglikelihood: accuracy of the greedy word, perplexity);
- `moby_mc`: which sentence comes next, the true one or three from elsewhere in the book (multiple choice, HellaSwag's
  layout: acc, acc_norm).

With a hub the standard tasks run the same way: `depthprune eval DIR --lm-eval hellaswag,arc_easy,arc_challenge,mmlu`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from depthprune.data import heldout_text
from depthprune.fsutil import atomic_folder

LOCAL_TASKS = ("moby_cloze", "moby_mc")

_CLOZE_YAML = """task: moby_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: " {{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  description: "depthprune: last word of a passage of held-out text ({n} passages)"
"""

_MC_YAML = """task: moby_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  description: "depthprune: the true next sentence of held-out text among four ({n} items)"
"""


def _sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text).strip()
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", flat) if s.strip()]


def local_task_docs(text: str, *, n: int = 100, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The documents of both local tasks from `text` (deterministic for a given text and seed)."""
    body = text.split("\n\n", 1)[-1] if text.startswith("Herman Melville") else text  # drop the packaged header
    sents = [s for s in _sentences(body) if not s.upper().startswith("CHAPTER")]
    cloze = []
    for prev, sent in zip(sents, sents[1:], strict=False):
        words = sent.split()
        last = re.sub(r"[^A-Za-z]+$", "", words[-1]) if words else ""
        if len(words) >= 12 and last.isalpha() and len(last) >= 3:
            cloze.append({"context": f"{prev} {' '.join(words[:-1])}", "target": last})
    rng = random.Random(seed)
    usable = [s for s in sents if 6 <= len(s.split()) <= 40]
    mc = []
    for i in range(len(sents) - 1):
        context, true = sents[i], sents[i + 1]
        if not (8 <= len(context.split()) <= 60 and true in usable):
            continue
        others = rng.sample([s for s in usable if s != true], 3)
        choices = [true, *others]
        rng.shuffle(choices)
        mc.append({"context": context, "choices": choices, "label": choices.index(true)})
    pick = lambda docs: docs[:: max(1, len(docs) // n)][:n]  # noqa: E731  (spread over the whole text)
    return {"moby_cloze": pick(cloze), "moby_mc": pick(mc)}


def write_local_tasks(
    folder: str | os.PathLike, *, text: str | None = None, heldout: str | os.PathLike | None = None, n: int = 100
) -> Path:
    """Write both local tasks (YAML + JSONL) into `folder` (replaced atomically) and return it; pass the folder to
    lm-eval as `TaskManager(include_path=folder)` or `lm_eval --include_path folder`."""
    docs = local_task_docs(text if text is not None else heldout_text(heldout), n=n)
    out = Path(folder).expanduser().resolve()
    with atomic_folder(out) as tmp:
        tmp.mkdir(parents=True)
        for name, template in (("moby_cloze", _CLOZE_YAML), ("moby_mc", _MC_YAML)):
            data = out / f"{name}.jsonl"  # the final location: YAML paths must hold after the swap
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[name]))
            (tmp / f"{name}.yaml").write_text(template.format(data=json.dumps(str(data)), n=len(docs[name])))
    return out


def _prefix_token(folder: str | os.PathLike) -> int | None:
    """lm-eval's HF backend starts each context with the BOS (else EOS) token and fails on a tokenizer with neither;
    such a tokenizer gets its pad token (or id 0) as the prefix instead."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None  # a hub id or a folder lm-eval reads its own way: leave it to lm-eval
    if tok.bos_token_id is not None or tok.eos_token_id is not None:
        return None
    return tok.pad_token_id if tok.pad_token_id is not None else 0


@dataclasses.dataclass
class HarnessReport:
    """lm-eval's scores per model, task and metric (value and standard error), and the task list."""

    tasks: list[str]
    scores: dict[str, dict[str, dict[str, float]]]  # model -> task -> metric -> value (metric_stderr too)
    limit: int | None

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for task in self.tasks:
            metrics = sorted({m for s in self.scores.values() for m in s.get(task, {}) if not m.endswith("_stderr")})
            for metric in metrics:
                row: dict[str, Any] = {"task": task, "metric": metric}
                for model, by_task in self.scores.items():
                    value = by_task.get(task, {}).get(metric)
                    err = by_task.get(task, {}).get(metric + "_stderr")
                    row[model] = "-" if value is None else f"{value:.4g}" + (f" ± {err:.2g}" if err else "")
                rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lm_eval_models(
    models: Mapping[str, str | os.PathLike],
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    bootstrap_iters: int = 1000,
) -> HarnessReport:
    """Score each model folder (name -> folder or hub id) with `lm_eval.simple_evaluate` (HF backend) on `tasks`.

    `bootstrap_iters` resamples for the standard errors of corpus metrics such as perplexity (lm-eval's default
    100,000 takes minutes on a CPU; 0 turns them off)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("lm-evaluation-harness is not installed: pip install 'depthprune[lm-eval]'") from err

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"lm-eval knows no task {unknown}; local tasks: {', '.join(LOCAL_TASKS)} (written by write_local_tasks), "
            "or any lm-eval task name (those need their data set from the hub)"
        )
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for name, folder in models.items():
        model_args: dict[str, Any] = {"pretrained": str(folder), "dtype": dtype}
        prefix = _prefix_token(folder)
        if prefix is not None:
            model_args["prefix_token_id"] = prefix
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            batch_size=batch_size,
            device="cpu",
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
        )
        scores[name] = {
            task: {k.split(",")[0]: float(v) for k, v in res.items() if isinstance(v, int | float) and "," in k}
            for task, res in out["results"].items()
        }
    return HarnessReport(list(tasks), scores, limit)
