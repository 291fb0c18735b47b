"""benchmarks/spec_bench.py end to end on a tiny saved llama (4 layers) with a word tokenizer: greedy
self-speculative decoding (exit, skip and chosen drafts) and transformers' assistant_early_exit are token-identical to
plain generate at every batch size, SkipDecode reports each target beside an adapted model, and every promised file is
written and parses. Speed figures are only checked to be positive numbers (speed is never asserted in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from tiny_models import build

from depthprune.exits.lm_heads import DecoderExitHeads
from depthprune.generation.skipdecode import SkipSchedule
from depthprune.generation.skipdecode_train import SCHEDULE_NAME

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "spec_bench.py"
WORDS = ["the", "whale", "sea", "ship", "captain", "white", "boat", "harpoon", "deep", "wave", "sail", "storm"]
NEW = 4
BATCHES = (1, 2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Run the script once on the tiny model; (its JSON report, its output folder, the adapted schedule)."""
    root = tmp_path_factory.mktemp("spec_bench")
    model = build("llama")
    model.save_pretrained(root / "model")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / "model")
    DecoderExitHeads.logit_lens(model, [0, 1]).save(root / "heads")
    # an "adapted" model: the same weights with the schedule a train_skipdecode folder records
    schedule = SkipSchedule.linear(4, 3, 1, 2.0)
    model.save_pretrained(root / "adapted")
    (root / "adapted" / SCHEDULE_NAME).write_text(json.dumps(schedule.to_dict()))
    out = root / "bench"
    cmd = [
        sys.executable, str(SCRIPT), str(root / "heads"), "--model", str(root / "model"), "--prompts", "2",
        "--prompt-len", "4", "--max-new-tokens", str(NEW), "--batch-sizes", *map(str, BATCHES), "--repeats", "1",
        "--draft-lens", "2", "--choose", "--skip-speedups", "2", "3", "--adapted", f"2={root / 'adapted'}",
        "--ppl-blocks", "3", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "spec_bench.json").read_text()), out, schedule


def test_self_speculative_is_token_identical_at_every_batch_size(run):
    report, _, _ = run
    rows = {r["name"]: r for r in report["speculative"]}
    drafts = {r["draft"] for r in rows.values() if r["method"] == "self-spec"}
    assert drafts == {"exit", "skip"}
    assert {"exit 0 k=2", "exit 1 k=2", "skip 2 k=2"} <= set(rows)
    assert sum(r["chosen"] for r in rows.values() if r["method"] == "self-spec") == 1
    for r in rows.values():
        if r["method"] != "self-spec":
            continue
        for b in BATCHES:
            assert r[f"identical_b{b}"] == 1.0, r["name"]
            assert 0.0 <= r[f"mean_accepted_b{b}"] <= r["draft_len"]
            assert r[f"e2e_speedup_b{b}"] > 0 and (r[f"speedup_b{b}"] is None or r[f"speedup_b{b}"] > 0)
    skip = report["skip_draft"]
    assert len(skip["skip_layers"]) == 2 and len(skip["block_influence"]) == 4  # half of 4 layers, lowest BI
    assert rows["skip 2 k=2"]["skip_layers"] == skip["skip_layers"]
    assert {t["exit_layer"] for t in report["choice"]["table"]} == {0, 1}


def test_hf_assistant_early_exit_runs_at_batch_one_only(run):
    report, _, _ = run
    hf = [r for r in report["speculative"] if r["method"] == "hf generate"]
    assert [r["name"] for r in hf] == ["hf assistant_early_exit=1", "hf assistant_early_exit=2"]
    for r in hf:
        assert r["identical_b1"] == 1.0 and r["e2e_speedup_b1"] > 0
        assert "identical_b2" not in r and "speedup_b2" not in r


def test_skipdecode_reports_every_target_and_the_adapted_model(run):
    report, _, schedule = run
    rows = {(r["model"], r["target"]): r for r in report["skipdecode_rows"]}
    assert set(rows) == {("unadapted", 2.0), ("unadapted", 3.0), ("adapted", 2.0)}
    ppl_full = report["skipdecode"]["ppl_full"]
    for (which, target), r in rows.items():
        assert r["ppl_full"] == ppl_full and r["ppl"] > 0
        for b in BATCHES:
            assert 0.0 <= r[f"identical_b{b}"] <= r[f"agreement_b{b}"] <= 1.0
            # decode = call - prefill can be lost in the noise on a tiny model: None then, never <= 0
            assert r[f"e2e_speedup_b{b}"] > 0 and (r[f"speedup_b{b}"] is None or r[f"speedup_b{b}"] > 0)
        if which == "unadapted":  # for_speedup over the NEW - 1 decode steps
            assert r["ideal_speedup"] == pytest.approx(target, rel=0.25)
    adapted = rows[("adapted", 2.0)]
    assert adapted["mean_layers"] == pytest.approx(schedule.mean_layers(NEW - 1))
    # the same weights as the untouched model under a different schedule than the unadapted 2x row
    assert report["skipdecode"]["schedules"]["skipdecode 2x adapted"] == schedule.to_dict()


def test_outputs_are_written_and_parse(run):
    report, out, _ = run
    assert set(report["baseline_decode_tok_s"]) == {str(b) for b in BATCHES}
    assert report["machine"]["torch_threads"] == 1 and report["args"]["max_new_tokens"] == NEW
    text = (out / "spec_table.txt").read_text()
    md = (out / "spec_table.md").read_text()
    assert "self-speculative decoding" in text and "SkipDecode" in text
    assert md.count("| name |") == 1 and md.count("| model |") == 1
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_truncated_vocabulary_drafts_and_head_costs(tmp_path):
    """--draft-vocab / --draft-vocab-k add truncated-vocabulary exit drafts (token-identical like every greedy draft),
    --head-costs times the heads against a layer; --no-skip-draft / --no-hf leave those out."""
    model = build("llama")
    model.save_pretrained(tmp_path / "model")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tmp_path / "model")
    DecoderExitHeads.logit_lens(model, [1]).save(tmp_path / "heads")
    out = tmp_path / "bench"
    cmd = [
        sys.executable, str(SCRIPT), str(tmp_path / "heads"), "--model", str(tmp_path / "model"), "--prompts", "2",
        "--prompt-len", "4", "--max-new-tokens", str(NEW), "--batch-sizes", *map(str, BATCHES), "--repeats", "1",
        "--draft-lens", "2", "--draft-vocab", "0.9", "--draft-vocab-k", "3", "--head-costs", "--no-skip-draft",
        "--no-hf", "--no-skipdecode", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "spec_bench.json").read_text())
    rows = {r["name"]: r for r in report["speculative"]}
    assert set(rows) == {"exit 1 k=2", "exit 1 k=2 vocab cov0.9", "exit 1 k=2 vocab k3"}
    for r in rows.values():
        assert all(r[f"identical_b{b}"] == 1.0 for b in BATCHES), r["name"]
    vocab_info = report["draft_vocab"]
    assert vocab_info["k3"]["k_given"] == 3 and vocab_info["cov0.9"]["coverage"] >= 0.9
    assert rows["exit 1 k=2 vocab k3"]["vocab_k"] == vocab_info["k3"]["k"]
    costs = report["head_costs"]
    assert [c["batch"] for c in costs] == list(BATCHES)
    for c in costs:
        assert c["layer_ms"] > 0 and c["full_head_layers"] == pytest.approx(c["full_head_ms"] / c["layer_ms"])
        assert {"cov0.9_logits_layers", "cov0.9_top_layers", "k3_top_layers"} <= set(c)
    assert report["skip_draft"]["rule"] == "--no-skip-draft" and "not measured" in report["hf_early_exit"]["note"]
