"""Real tier: an exported pruned SmolLM2 folder scored by lm-evaluation-harness (HF backend) on a local task, in a
process that never imports depthprune."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import depthprune
from depthprune.bench.harness import write_local_tasks
from depthprune.static.export import save_model
from depthprune.static.prune import prune

pytestmark = pytest.mark.real

SCRIPT = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": sys.argv[1], "dtype": "float32"},
    tasks=["moby_mc"], task_manager=TaskManager(include_path=sys.argv[2]), limit=3, batch_size=16,
    device="cpu", bootstrap_iters=0)
assert not any(m.split(".")[0] == "depthprune" for m in sys.modules), "depthprune was imported"
print(json.dumps({"config": out["config"]["model_args"], "results": out["results"]}, default=str))
"""


def test_pruned_smollm2_scored_by_lm_eval_without_depthprune(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install '.[lm-eval]')")
    pruned = prune(depthprune.load_model("smollm2"), plan="0-11,18-24,27-29").model
    folder = save_model(pruned, tmp_path / "m", depthprune.load_tokenizer("smollm2"))
    tasks = write_local_tasks(tmp_path / "tasks")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(tasks)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])["results"]
    assert 0 <= results["moby_mc"]["acc,none"] <= 1 and 0 <= results["moby_mc"]["acc_norm,none"] <= 1
