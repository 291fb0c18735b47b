"""The local lm-eval tasks: documents built from held-out text, written in lm-eval's YAML task format over JSONL."""

from __future__ import annotations

import json

import yaml

from depthprune.bench.harness import HarnessReport, local_task_docs, write_local_tasks
from depthprune.data import heldout_text


def test_local_task_docs_are_deterministic_and_well_formed():
    text = heldout_text(None)
    docs = local_task_docs(text, n=50)
    assert docs == local_task_docs(text, n=50)
    assert len(docs["moby_cloze"]) == 50 and len(docs["moby_mc"]) == 50
    for d in docs["moby_cloze"]:
        assert d["target"].isalpha() and not d["context"].endswith(" ")
        assert d["context"].replace(" ", "") in text.replace("\n", "").replace(" ", "")
    labels = [d["label"] for d in docs["moby_mc"]]
    assert set(labels) == {0, 1, 2, 3}  # the true sentence is not always in one place
    for d in docs["moby_mc"]:
        assert len(d["choices"]) == 4 == len(set(d["choices"]))


def test_write_local_tasks_gives_yaml_over_the_jsonl_beside_it(tmp_path):
    out = write_local_tasks(tmp_path / "tasks", text=heldout_text(None), n=20)
    for name, kind in (("moby_cloze", "loglikelihood"), ("moby_mc", "multiple_choice")):
        spec = yaml.safe_load((out / f"{name}.yaml").read_text())
        assert spec["task"] == name and spec["output_type"] == kind
        data = spec["dataset_kwargs"]["data_files"]["test"]
        assert data == str(out / f"{name}.jsonl")
        assert len([json.loads(line) for line in open(data)]) == 20
    report = HarnessReport(["moby_mc"], {"a": {"moby_mc": {"acc": 0.5, "acc_stderr": 0.1}}, "b": {}}, 20)
    assert report.rows() == [{"task": "moby_mc", "metric": "acc", "a": "0.5 ± 0.1", "b": "-"}]
