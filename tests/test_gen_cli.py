"""The command line for early-exit generation, on a tiny saved causal LM: `generate` prints exit layers, `calibrate`
routes a folder of decoder exit heads to the generation calibration, `train-exits` trains decoder exits for a causal
LM, `train-skipdecode` adapts one to a SkipDecode schedule, `list` names the token criteria, and mistakes get clear
errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny_models import WORDS, build, tokenizer

from depthprune.cli.exits import is_causal_lm, is_decoder_heads_folder
from depthprune.cli.main import main
from depthprune.cli.train_skipdecode import describe
from depthprune.cli.train_skipdecode import main as skipdecode_main
from depthprune.exits.lm_heads import CONFIG_NAME, DecoderExitHeads
from depthprune.generation.skipdecode import SkipSchedule, floored_schedule
from depthprune.generation.skipdecode_train import load_schedule


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(tiny llama + tokenizer folder, its lens exit heads folder, a book of random WORDS)."""
    root = tmp_path_factory.mktemp("gen_cli")
    model = build("llama")
    model.generation_config.eos_token_id = []  # a random model stops at random places otherwise
    model.save_pretrained(root / "model")
    tokenizer().save_pretrained(root / "model")
    DecoderExitHeads.for_model(model, kind="lens").save(root / "heads")
    book = root / "book.txt"
    book.write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(400)))
    return root / "model", root / "heads", book


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_prints_the_exit_layers(folders, capsys):
    model, heads, _ = folders
    rc, out, _ = _run(
        capsys,
        "generate",
        model,
        "--heads",
        heads,
        "--exit",
        "fixed:1",
        "--uncalibrated",
        "--prompt",
        "the whale",
        "--max-new-tokens",
        "4",
    )
    assert rc == 0
    assert "fixed:1, kv=propagate, deep prefill; exit layers are 0-based, 3 = all 4 layers" in out
    assert "@3 " in out and out.count("@1") == 3  # the first token comes from the full model's prefill
    assert "mean layers per token: 2.50 of 4" in out


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_generate_json_with_shallow_prefill_and_a_batch(folders, capsys, kv):
    model, heads, _ = folders
    rc, out, _ = _run(
        capsys,
        "generate",
        model,
        "--heads",
        heads,
        "--exit",
        "fixed:0",
        "--uncalibrated",
        "--kv",
        kv,
        "--shallow-prefill",
        "--prompt",
        "the white whale",
        "sea",
        "--max-new-tokens",
        "3",
        "--json",
    )
    assert rc == 0
    report = json.loads(out)
    assert report["criterion"] == "fixed:0" and report["kv"] == kv and report["deep_prefill"] is False
    assert [r["prompt"] for r in report["results"]] == ["the white whale", "sea"]
    for row in report["results"]:
        assert row["exit_layers"] == [0, 0, 0] and row["mean_layers"] == 1.0 and len(row["tokens"]) == 3


def test_generate_without_exit_equals_plain_greedy(folders, capsys):
    model, heads, _ = folders
    rc, out, _ = _run(
        capsys,
        "generate",
        model,
        "--heads",
        heads,
        "--exit",
        "max_prob:1.0",
        "--uncalibrated",
        "--prompt",
        "the sea",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert rc == 0
    lm = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    ids = transformers.AutoTokenizer.from_pretrained(model)("the sea", return_tensors="pt")["input_ids"]
    ref = lm.generate(ids, do_sample=False, max_new_tokens=5, eos_token_id=[], pad_token_id=0)
    assert json.loads(out)["results"][0]["tokens"] == ref[0, ids.shape[1] :].tolist()


def test_generate_clear_errors(folders, capsys, tmp_path):
    model, heads, _ = folders
    base = ["generate", model, "--heads", heads, "--prompt", "the whale", "--uncalibrated"]
    for bad, message in [
        ("nope:0.5", "unknown token exit criterion 'nope'"),
        ("max_prob", "give a threshold: 'max_prob:VALUE'"),
        ("max_prob:high", "threshold 'high' of criterion 'max_prob' is not a number"),
        ("learned:0.9", "'learned' criterion needs exit heads trained with CALM's confidence classifier"),
    ]:
        rc, _, err = _run(capsys, *base, "--exit", bad)
        assert rc == 2 and message in err, err
    rc, _, err = _run(capsys, *base[:-1])
    assert rc == 2 and "pass --exit CRITERION:THRESHOLD --uncalibrated" in err
    # heads of a 3-layer model on the 4-layer one
    config = build("llama").config
    config.num_hidden_layers = 3
    DecoderExitHeads.for_model(transformers.LlamaForCausalLM(config)).save(tmp_path / "other")
    rc, _, err = _run(
        capsys,
        "generate",
        model,
        "--heads",
        tmp_path / "other",
        "--exit",
        "max_prob:0.9",
        "--uncalibrated",
        "--prompt",
        "x",
    )
    assert rc == 2 and "these exit heads were built for a llama with 3 layers" in err
    rc, _, err = _run(
        capsys,
        "generate",
        model,
        "--heads",
        tmp_path / "missing",
        "--exit",
        "max_prob:0.9",
        "--uncalibrated",
        "--prompt",
        "x",
    )
    assert rc == 2 and "has no decoder_exit_heads.json" in err


def test_calibrate_routes_decoder_heads_to_the_generation_calibration(folders, capsys, tmp_path):
    model, heads, book = folders
    work = tmp_path / "heads"
    work.mkdir()
    for f in heads.iterdir():
        (work / f.name).write_bytes(f.read_bytes())
    assert is_decoder_heads_folder(work)
    rc, out, err = _run(
        capsys,
        "calibrate",
        work,
        "--model",
        model,
        "--text",
        book,
        "--criterion",
        "fixed,saturation",
        "--prompts",
        "5",
        "--prompt-len",
        "6",
        "--max-new-tokens",
        "3",
        "--delta",
        "0.5",
    )
    assert rc == 0, err
    # fixed's grid starts with thresholds a 4-layer model never reaches: risk 0, p = 0.5^5 = 0.031 <= 0.05
    assert "fixed:" in out and "with probability >= 0.95" in out and "token agreement" in out
    assert "held-out check (5 prompts of 6 tokens)" in out
    results = json.loads((work / "calibration.json").read_text())
    assert [r["criterion"] for r in results] == ["fixed", "saturation"]
    fixed = results[0]
    assert fixed["consistency"] == "tokens" and fixed["n"] == 5 and fixed["delta"] == 0.5
    assert fixed["table"][0]["risk"] == 0.0 and fixed["table"][0]["rejected"]
    assert fixed["threshold"] is not None and fixed["heldout"]["n"] == 5
    # `generate` without --exit uses the calibrated criterion
    rc, out, _ = _run(capsys, "generate", model, "--heads", work, "--prompt", "the", "--max-new-tokens", "2", "--json")
    assert rc == 0 and json.loads(out)["criterion"] == f"fixed:{fixed['threshold']:g}"


def test_calibrate_decoder_clear_errors(folders, capsys):
    model, heads, book = folders
    base = ["calibrate", heads, "--model", model, "--text", book, "--prompts", "2", "--prompt-len", "4"]
    rc, _, err = _run(capsys, *base, "--consistency", "bleu")
    assert rc == 2 and "unknown consistency measure 'bleu'; choose one of tokens, rouge_l" in err
    rc, _, err = _run(capsys, *base, "--delta", "1.5")
    assert rc == 2 and "--delta and --epsilon must lie in (0, 1)" in err
    rc, _, err = _run(capsys, *base, "--prompts", "1000")
    assert rc == 2 and "too few for 1000 prompts" in err
    assert not (heads / "calibration.json").exists()


def test_train_exits_trains_decoder_exits_for_a_causal_lm(folders, capsys, tmp_path):
    model, _, book = folders
    assert is_causal_lm(model)
    build("bert").save_pretrained(tmp_path / "bert")
    assert not is_causal_lm(tmp_path / "bert") and not is_causal_lm(tmp_path / "nothing")
    out = tmp_path / "trained"
    rc, stdout, _ = _run(
        capsys,
        "train-exits",
        "--model",
        model,
        "--data",
        book,
        "--kind",
        "lens",
        "--layers",
        "0",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "8",
        "--max-blocks",
        "8",
        "--output-dir",
        out,
        "--no-progress",
    )
    assert rc == 0
    assert "trained lens exits after layers [0, 2]" in stdout
    assert (out / CONFIG_NAME).is_file() and json.loads((out / CONFIG_NAME).read_text())["layers"] == [0, 2]


def test_train_exits_fit_then_classifier_only(folders, capsys, tmp_path):
    """--fit sets the lens by least squares (reported), --confidence-only then trains CALM's classifier alone."""
    model, _, book = folders
    out = tmp_path / "fitted"
    args = ["--model", model, "--data", book, "--kind", "lens", "--layers", "1", "--seq-len", "8", "--batch-size", "4"]
    rc, stdout, _ = _run(
        capsys, "train-exits", *args, "--fit", "--confidence", "--confidence-only", "--epochs", "1",
        "--max-blocks", "4", "--output-dir", out, "--no-progress",
    )  # fmt: skip
    assert rc == 0
    assert "least-squares lens, relative residual per layer: {1: " in stdout
    lm = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    heads = DecoderExitHeads.load(out, lm)
    assert heads.config.confidence and heads.translators["1"].linear.weight.abs().sum() > 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["num_blocks"] == 4 and "confidence_bce" in log["epoch_losses"][0]
    # the classifier fitted on cached states instead, no SGD epoch at all
    rc, stdout, _ = _run(
        capsys, "train-exits", *args, "--fit", "--fit-confidence", "--confidence", "--confidence-only", "--epochs",
        "0", "--max-blocks", "4", "--output-dir", tmp_path / "fc", "--no-progress",
    )  # fmt: skip
    assert rc == 0 and "confidence classifiers (held-out positions):" in stdout and "layer 1: exit agrees on" in stdout
    fitted = DecoderExitHeads.load(tmp_path / "fc", lm)
    assert fitted.config.confidence  # same seed, same data: the same least-squares translators as above
    torch.testing.assert_close(fitted.translators.state_dict(), heads.translators.state_dict())
    assert json.loads((tmp_path / "fc" / "train_log.json").read_text())["epoch_losses"] == []


def test_list_names_the_token_criteria(capsys):
    rc, out, _ = _run(capsys, "list")
    assert rc == 0
    assert "token exit criteria (generation): max_prob, margin, saturation, learned, fixed" in out


def test_benchmark_script_smoke(folders, tmp_path):
    """benchmarks/gen_exits_bench.py end to end on the tiny model with CALM's classifier: every file it promises."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    model, _, _ = folders
    lm = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    DecoderExitHeads.for_model(lm, [0, 2], kind="mlp", confidence=True).save(tmp_path / "heads")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gen_exits_bench.py"
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        str(script),
        str(tmp_path / "heads"),
        "--model",
        str(model),
        "--prompts",
        "8",
        "--prompt-len",
        "4",
        "--max-new-tokens",
        "3",
        "--thresholds",
        "1",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gen_exits_bench.json").read_text())
    assert {r["criterion"] for r in report["rows"]} == {"max_prob", "margin", "saturation", "learned", "fixed"}
    assert len(report["rows"]) == 5 * 2 * 2 and all("speedup_b8" in r for r in report["rows"])
    assert [c["batch"] for c in report["costs"]] == [1, 8]
    assert (out / "gen_exits_pareto.png").stat().st_size > 0 and (out / "gen_exits_table.md").is_file()


def test_train_skipdecode_writes_a_plain_adapted_model(folders, capsys, tmp_path):
    """`depthprune train-skipdecode` (skipdecode_train.main) replaces an old folder with --overwrite: a merged model
    that plain transformers loads, recording the schedule for the requested speed-up."""
    model, _, book = folders
    out = tmp_path / "skip2"
    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")
    rc, stdout, _ = _run(
        capsys,
        "train-skipdecode",
        "--model",
        model,
        "--data",
        book,
        "--speedup",
        "2",
        "--budget",
        "7",
        "--seq-len",
        "12",
        "--max-blocks",
        "8",
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--lora-rank",
        "2",
        "--output-dir",
        out,
        "--overwrite",
        "--no-progress",
    )
    assert rc == 0
    schedule = floored_schedule(4, 2, budget=7)  # the command's schedule: a depth floor of a quarter of the layers
    assert schedule.speedup(7) == pytest.approx(2, abs=0.1)
    assert f"SkipDecode schedule {describe(schedule, 7)}: LoRA rank 2 trained on 8 blocks of 12 tokens" in stdout
    assert "loss first epoch" in stdout and f"wrote {out.resolve()}" in stdout
    assert not (out / "old.txt").exists()
    assert load_schedule(out) == schedule
    log = json.loads((out / "train_log.json").read_text())
    assert [e["epoch"] for e in log["epoch_losses"]] == [0, 1] and log["seq_len"] == 12
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == "LlamaForCausalLM" and load_schedule(reloaded) == schedule


def test_train_skipdecode_clear_errors(folders, capsys, tmp_path):
    model, _, book = folders
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    base = ["--model", str(model), "--data", str(book), "--seq-len", "12", "--no-progress"]
    for argv, message in [
        (["--output-dir", str(full)], "already exists and is not empty; choose a new folder or pass --overwrite"),
        (
            ["--speedup", "9", "--output-dir", str(tmp_path / "a")],
            "speed-up 9 out of range: a 4-layer model can aim at 1..4x",
        ),
        (["--speedup", "0.5", "--output-dir", str(tmp_path / "a")], "speed-up 0.5 out of range"),
        (["--min-prompt", "12", "--output-dir", str(tmp_path / "a")], "need 1 <= --min-prompt < --seq-len"),
        (["--kl-weight", "-1", "--output-dir", str(tmp_path / "a")], "argument --kl-weight: must be a finite number"),
    ]:
        with pytest.raises(SystemExit) as exc:
            skipdecode_main([*base, *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert (full / "keep.txt").read_text() == "mine" and not (tmp_path / "a").exists()
    with pytest.raises(SystemExit) as exc:  # the same through the depthprune command
        main(["train-skipdecode", *base, "--speedup", "9", "--output-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "depthprune train-skipdecode: error: argument --speedup" in err


# ---- every decoder on the command line ----------------------------------------------------------------------------
PROMPTS = ("the white whale", "sea")  # different lengths: a left-padded batch


def _plain_greedy(model, prompts, n):
    """Plain greedy `model.generate` of the prompts as one left-padded batch: the new token ids per row."""
    lm = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    enc = tok(list(prompts), return_tensors="pt", padding=True, return_token_type_ids=False)
    ref = lm.generate(**enc, do_sample=False, max_new_tokens=n, eos_token_id=[], pad_token_id=tok.pad_token_id)
    return ref[:, enc["input_ids"].shape[1] :].tolist(), lm, enc


@pytest.mark.parametrize("with_heads", [False, True])
def test_generate_speculative_equals_plain_greedy(folders, capsys, with_heads):
    model, heads, _ = folders
    ref, _, _ = _plain_greedy(model, PROMPTS, 6)
    extra = ["--heads", heads, "--draft-layers", "2"] if with_heads else []
    rc, out, err = _run(
        capsys, "generate", model, "--speculative", "--draft-len", "3", *extra, "--prompt", *PROMPTS,
        "--max-new-tokens", "6", "--json",
    )  # fmt: skip
    assert rc == 0, err
    report = json.loads(out)
    assert report["decoder"] == "speculative" and report["draft_len"] == 3
    assert report["draft_layers"] == (2 if with_heads else 3)  # default without heads: round(0.8 * 4) = 3
    assert report["head_kind"] == ("lens" if with_heads else "logit_lens")
    assert [r["tokens"] for r in report["results"]] == ref
    assert report["rounds"] >= 2 and 0 <= report["acceptance_rate"] <= 1


def test_generate_speculative_with_a_truncated_draft_vocabulary(folders, capsys):
    model, _, _ = folders
    ref, _, _ = _plain_greedy(model, PROMPTS, 6)
    rc, out, err = _run(
        capsys, "generate", model, "--speculative", "--draft-vocab", "0.9", "--prompt", *PROMPTS, "--max-new-tokens",
        "6", "--json",
    )  # fmt: skip
    assert rc == 0, err
    report = json.loads(out)
    assert report["head_kind"] == "truncated" and [r["tokens"] for r in report["results"]] == ref
    rc, out, _ = _run(capsys, "generate", model, "--speculative", "--draft-vocab", "0.9", "--prompt", "sea")
    assert rc == 0 and "logit_lens on " in out and "of calibration text) exit draft" in out


def test_generate_skipdecode_runs_its_schedule_with_a_floor(folders, capsys):
    from depthprune.generation.skipdecode import default_floor, skipdecode_generate

    model, _, _ = folders
    rc, out, err = _run(
        capsys, "generate", model, "--skipdecode", "2", "--skip-cost", "nominal", "--prompt", *PROMPTS,
        "--max-new-tokens", "6", "--json",
    )  # fmt: skip
    assert rc == 0, err
    report = json.loads(out)
    floor = default_floor(4)
    schedule = SkipSchedule.for_speedup(4, 2.0, budget=5, min_layers=floor)
    assert SkipSchedule.from_dict(report["schedule"]) == schedule and schedule.min_layers == floor
    _, lm, enc = _plain_greedy(model, PROMPTS, 1)
    want = skipdecode_generate(lm, enc["input_ids"], enc["attention_mask"], schedule=schedule, max_new_tokens=6,
                               eos_token_id=[], pad_token_id=0)  # fmt: skip
    p = enc["input_ids"].shape[1]
    assert [r["tokens"] for r in report["results"]] == want.sequences[:, p:].tolist()
    assert [r["layers"] for r in report["results"]] == want.layers.tolist()
    assert report["results"][0]["layers"][0] == 4 and min(report["results"][0]["layers"]) >= floor
    # a 30-layer model keeps 8 layers by default: 5x (6 layers a token) is refused with what to do
    assert default_floor(30) == 8
    # a floor given explicitly, and the plain-text output
    rc, out, _ = _run(
        capsys, "generate", model, "--skipdecode", "2", "--min-layers", "2", "--skip-cost", "nominal", "--prompt",
        "sea", "--max-new-tokens", "4",
    )  # fmt: skip
    assert rc == 0 and "SkipDecode: the top" in out and "-> 2 layers (floor) of 4" in out
    assert "mean layers per generated token:" in out


def test_generate_skipdecode_saved_schedule(folders, capsys, tmp_path):
    from depthprune.generation.skipdecode_train import SCHEDULE_NAME

    model, _, _ = folders
    folder = tmp_path / "adapted"
    lm = transformers.AutoModelForCausalLM.from_pretrained(model)
    lm.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    saved = SkipSchedule.linear(4, 3, 2, 2.0)
    (folder / SCHEDULE_NAME).write_text(json.dumps(saved.to_dict()))
    rc, out, err = _run(capsys, "generate", folder, "--skipdecode", "saved", "--prompt", "sea", "--json")
    assert rc == 0, err
    assert SkipSchedule.from_dict(json.loads(out)["schedule"]) == saved


@pytest.mark.parametrize(
    "decoder", [["--speculative"], ["--skipdecode", "2", "--skip-cost", "nominal"], ["--exit", "fixed:1"]]
)
def test_generate_compare_prints_tokens_per_second_beside_plain_generate(folders, capsys, decoder):
    model, heads, _ = folders
    extra = ["--heads", heads, "--uncalibrated"] if decoder[0] == "--exit" else []
    argv = ["generate", model, *decoder, *extra, "--prompt", *PROMPTS, "--max-new-tokens", "4", "--compare"]
    rc, out, err = _run(capsys, *argv, "--repeats", "2", "--warmup", "0")
    assert rc == 0, err
    assert "tokens/s (batch of 2, whole calls with prefill, median of 2 interleaved rounds after 0 warm-up): " in out
    assert "plain generate " in out and "x)" in out
    rc, out, _ = _run(capsys, *argv, "--repeats", "2", "--json")
    compare = json.loads(out)["compare"]
    assert len(compare["generate"]["seconds"]) == len(compare["decoder"]["seconds"]) == 2
    assert compare["generate"]["tokens"] == 8 and compare["decoder"]["tokens"] == 8  # no end of sequence
    assert compare["generate"]["tok_s"] > 0 and compare["decoder"]["ratio"] > 0


def test_generate_decoder_options_clear_errors(folders, capsys):
    model, heads, _ = folders
    base = ["generate", model, "--prompt", "the whale"]
    for argv, message in [
        (["--speculative", "--exit", "max_prob:0.9"], "--exit set token-level early exit, which --speculative does"),
        (["--skipdecode", "2", "--kv", "recompute"], "--kv set token-level early exit, which --skipdecode does not"),
        (["--speculative", "--skipdecode", "2"], "--speculative and --skipdecode are two different decoders"),
        (["--speculative", "--draft-len", "0"], "--draft-len is the number of tokens drafted per round"),
        (["--speculative", "--draft-layers", "4"], "--draft-layers 4 out of range: the draft runs the first E layers"),
        (["--speculative", "--draft-layers", "0"], "--draft-layers is how many of the first layers draft"),
        (["--draft-len", "2"], "--draft-len set the draft of --speculative: add --speculative or drop them"),
        (["--min-layers", "2"], "--min-layers is the depth floor of a --skipdecode schedule"),
        (["--skipdecode", "fast"], "--skipdecode takes a target speed-up (e.g. 2) or 'saved'"),
        (["--skipdecode", "9"], "--skipdecode: speed-up 9 out of range: a 4-layer model can aim at 1..4x"),
        (["--skipdecode", "3", "--min-layers", "2"], "below the depth floor of 2 layers; aim lower (at most 2x)"),
        (["--skipdecode", "saved"], "skip_schedule.json does not exist"),
        (["--skipdecode", "2", "--heads", str(heads)], "--skipdecode uses no exit heads"),
        (["--speculative", "--heads", str(heads), "--draft-layers", "4"], "--draft-layers 4 out of range"),
        (["--speculative", "--compare", "--repeats", "0"], "--repeats must be >= 1"),
        (["--draft-vocab", "0.9"], "--draft-vocab set the draft of --speculative"),
        (["--speculative", "--draft-vocab", "1.5"], "--draft-vocab is a share of the calibration tokens, in (0, 1]"),
        (["--speculative", "--uncalibrated"], "--uncalibrated set token-level early exit, which --speculative"),
    ]:
        rc, _, err = _run(capsys, *base, *argv)
        assert rc == 2 and message in err, (argv, err)
    # heads without an exit where the draft would end
    rc, _, err = _run(capsys, *base, "--speculative", "--heads", heads, "--draft-layers", "2")
    assert rc == 0, err
    lm = transformers.AutoModelForCausalLM.from_pretrained(model)
    DecoderExitHeads.logit_lens(lm, [0]).save(folders[0].parent / "exit0")
    rc, _, err = _run(capsys, *base, "--speculative", "--heads", folders[0].parent / "exit0", "--draft-layers", "2")
    assert rc == 2 and "--draft-layers 2 needs an exit after layer 1 (0-based)" in err and "one of [1]" in err


# ---- no silent garbage: uncalibrated thresholds are refused, or run with a measured warning --------------------------
def test_generate_refuses_an_uncalibrated_threshold(folders, capsys):
    model, heads, _ = folders
    rc, _, err = _run(capsys, "generate", model, "--exit", "max_prob:0.9", "--prompt", "the whale")
    assert rc == 2
    assert "max_prob:0.9 is not calibrated for the default logit-lens heads" in err
    assert "print garbage" in err and "depthprune train-exits" in err and "depthprune calibrate HEADS" in err
    assert "--uncalibrated" in err
    rc, _, err = _run(capsys, "generate", model, "--heads", heads, "--exit", "fixed:1", "--prompt", "the whale")
    assert rc == 2 and f"fixed:1 is not calibrated for {heads} (it holds no generation calibration.json)" in err
    assert f"depthprune calibrate {heads} --criterion NAME" in err
    rc, _, err = _run(capsys, "generate", model, "--prompt", "the whale")  # no --exit and nothing calibrated
    assert rc == 2 and "the default logit-lens heads have no calibrated threshold" in err


def test_generate_uncalibrated_warns_with_the_measured_agreement(folders, capsys):
    model, _, _ = folders
    argv = ["generate", model, "--exit", "max_prob:0.5", "--uncalibrated", "--prompt", "the white whale", "sea"]
    rc, out, err = _run(capsys, *argv, "--max-new-tokens", "3", "--json")
    assert rc == 0, err
    assert (
        "warning: max_prob:0.5 is not calibrated for the default logit-lens heads; measured by teacher forcing" in err
    )
    assert "on the prompt (8 positions): it exits after " in err  # 5 + 3 real tokens ([CLS] ... [SEP]), no padding
    assert "on 2 x 64 held-out tokens (128 positions)" in err and "picks the full model's next token at" in err
    report = json.loads(out)
    assert report["calibrated"] is False
    check = report["uncalibrated_check"]
    assert check["prompt"]["positions"] == 8 and check["heldout"]["positions"] == 128
    assert set(check["prompt"]["per_layer"]) == {"0", "1", "2"} and 0 <= check["heldout"]["agreement"] <= 1


def test_generate_runs_a_calibrated_threshold_and_only_that(folders, capsys, tmp_path):
    from depthprune.generation.calibrate import calibrate_generation

    model, heads, _ = folders
    lm = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    work = tmp_path / "heads"
    loaded = DecoderExitHeads.load(heads, lm)
    loaded.save(work)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 40, (5, 4), generator=g)
    result = calibrate_generation(
        lm, loaded, prompts, "fixed", delta=0.5, max_new_tokens=3, grid=[1024.0, 2.0, 0.0], eos_token_id=()
    )
    assert result.threshold is not None
    (work / "calibration.json").write_text(json.dumps([result.to_dict()]))
    base = ["generate", model, "--heads", work, "--prompt", "the whale", "--max-new-tokens", "3"]
    rc, out, err = _run(capsys, *base, "--json")  # the default: the calibrated threshold
    assert rc == 0 and "warning" not in err
    report = json.loads(out)
    assert report["criterion"] == f"fixed:{result.threshold:g}" and report["calibrated"] is True
    rc, out, err = _run(capsys, *base, "--exit", "fixed:1024")  # a more conservative certified one
    assert rc == 0 and "warning" not in err and "with probability >= 0.95" in out
    rc, _, err = _run(capsys, *base, "--exit", "fixed:1")  # never tested
    assert rc == 2 and "fixed:1 (kv=propagate, deep prefill) is not certified by" in err and "fixed at 1024" in err
    rc, _, err = _run(capsys, *base, "--exit", "fixed:1024", "--kv", "recompute")  # calibrated with propagate
    assert rc == 2 and "(kv=recompute, deep prefill) is not certified" in err
    rc, _, err = _run(capsys, *base, "--exit", "fixed:1024", "--uncalibrated")
    assert rc == 2 and "is calibrated for" in err and "drop --uncalibrated" in err
    rc, _, err = _run(capsys, *base, "--exit", "fixed:1", "--uncalibrated")
    assert rc == 0 and "warning: fixed:1 is not calibrated for" in err


def test_generate_skipdecode_aims_at_the_measured_cost_by_default(folders, capsys, monkeypatch):
    """Without --skip-cost, the schedule aims at measured seconds per token: measure_step_cost on the prompts (here
    replaced by a fixed cost: timings on tiny models are noise), its figures and prediction in the report."""
    import depthprune.generation.skipdecode as sd

    model, _, _ = folders
    seen = []

    def fake(lm, ids, mask, *, low_layers=None):
        seen.append((tuple(ids.shape), low_layers))
        return sd.StepCost(fixed_s=0.004, per_layer_s=0.002, num_layers=4, batch_size=ids.shape[0])

    monkeypatch.setattr(sd, "measure_step_cost", fake)
    argv = ["generate", model, "--skipdecode", "1.5", "--prompt", *PROMPTS, "--max-new-tokens", "9", "--json"]
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    report = json.loads(out)
    assert seen == [((2, seen[0][0][1]), None)] and report["step_cost"]["per_layer_s"] == 0.002
    cost = fake(None, torch.zeros(2, 1), None)
    want = sd.floored_schedule(4, 1.5, budget=8, cost=cost)  # 12 ms / 1.5 = 8 ms: 2 layers, not 2.67 (nominal)
    assert SkipSchedule.from_dict(report["schedule"]) == want != sd.floored_schedule(4, 1.5, budget=8)
    assert report["predicted_speedup"] == pytest.approx(cost.speedup(report["mean_layers"]))
    rc, out, err = _run(capsys, *argv[:-1])
    assert rc == 0 and "measured step cost: 4 ms + 2 ms per layer at batch 2: predicted decode speed-up" in out
    for extra, message in [
        (["--skip-cost", "nominal", "--speculative"], "--skip-cost says what a --skipdecode SPEEDUP means"),
        (["--skipdecode", "saved", "--skip-cost", "measured"], "--min-layers and --skip-cost shape a new schedule"),
    ]:
        rc, _, err = _run(capsys, "generate", model, *extra, "--prompt", "sea")
        assert rc == 2 and message in err, (extra, err)
