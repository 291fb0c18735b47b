"""`depthprune generate MODEL --little MODEL --cascade ...` on a tiny saved causal LM and a pruned copy of it: lossless
and the neutral fallback print the big model's greedy tokens, --compare prints tokens/s beside plain generate, and
options that do not fit get clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny_models import build, tokenizer

from depthprune.cli.main import main
from depthprune.static.apply import apply_plan

PROMPTS = ("the white whale", "sea")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade_cli")
    big = build("llama")
    big.generation_config.eos_token_id = []
    little = apply_plan(big, "0,3")
    for name, model in (("big", big), ("little", little)):
        model.save_pretrained(root / name)
        tokenizer().save_pretrained(root / name)
    other = root / "other"
    build("llama").save_pretrained(other)
    tokenizer(["moby", "dick"]).save_pretrained(other)
    return root / "big", root / "little", other


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _greedy(folder, n):
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    enc = tok(list(PROMPTS), return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        ref = lm.generate(**enc, do_sample=False, max_new_tokens=n, eos_token_id=[], pad_token_id=tok.pad_token_id)
    return ref[:, enc["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("mode", [["lossless", "--run-len", "3"], ["fallback", "--threshold", "1"]])
def test_cascade_prints_the_big_models_greedy_tokens(folders, capsys, mode):
    big, little, _ = folders
    ref = _greedy(big, 6)
    rc, out, err = _run(capsys, "generate", big, "--little", little, "--cascade", *mode, "--prompt", *PROMPTS,
                        "--max-new-tokens", "6", "--json")  # fmt: skip
    assert rc == 0, err
    report = json.loads(out)
    assert report["decoder"] == "cascade" and report["mode"] == mode[0]
    assert [r["tokens"] for r in report["results"]] == ref
    if mode[0] == "fallback":
        assert not any(any(r["little"]) for r in report["results"])


def test_cascade_compare_and_rollback(folders, capsys):
    big, little, _ = folders
    argv = ["generate", big, "--little", little, "--cascade", "rollback", "--threshold", "0.01", "--fallback", "0",
            "--little-vocab", "1", "--prompt", *PROMPTS, "--max-new-tokens", "4", "--compare", "--repeats", "2",
            "--warmup", "0"]  # fmt: skip
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    assert "cascade rollback (0.01): big" in out and "little tokens kept" in out
    assert "tokens/s (batch of 2, whole calls with prefill, median of 2 interleaved rounds" in out and "x)" in out


def test_cascade_clear_errors(folders, capsys):
    big, little, other = folders
    base = ["generate", big, "--prompt", "the whale"]
    for argv, message in [
        (["--cascade", "lossless"], "a cascade needs both --little MODEL and --cascade"),
        (["--little", little], "a cascade needs both --little MODEL and --cascade"),
        (["--threshold", "0.5"], "--threshold set a cascade: add --little MODEL --cascade MODE"),
        (["--little", little, "--cascade", "fallback"], "--cascade fallback needs --threshold T in [0, 1]"),
        (["--little", little, "--cascade", "fallback", "--threshold", "2"], "fallback is a probability threshold"),
        (["--little", little, "--cascade", "lossless", "--run-len", "0"], "--run-len is the longest little run"),
        (["--little", little, "--cascade", "lossless", "--speculative"], "--speculative belong to other decoders"),
        (["--little", other, "--cascade", "lossless"], "tokenizers differ"),
        (["--little", little, "--cascade", "fallback", "--threshold", "0.5", "--fallback", "0.2"], "--fallback is"),
    ]:
        rc, _, err = _run(capsys, *base, *argv)
        assert rc == 2 and message in err, (argv, err)
    with pytest.raises(SystemExit):
        main([*map(str, base), "--little", str(little), "--cascade", "beam"])


def test_sampling_cascade_and_speculative_are_seeded_and_checked(folders, capsys):
    big, little, _ = folders
    base = ["generate", big, "--prompt", *PROMPTS, "--max-new-tokens", "5", "--json", "--sample", "--temperature",
            "1.5", "--top-k", "20"]  # fmt: skip
    runs = {}
    for decoder in (["--little", little, "--cascade", "lossless"], ["--speculative", "--draft-layers", "1"]):
        for seed in ("1", "1", "2"):
            rc, out, err = _run(capsys, *base, *decoder, "--seed", seed)
            assert rc == 0, err
            report = json.loads(out)
            assert report["decoding"] == f"sampling (temperature 1.5, top-k 20, seed {seed})"
            runs.setdefault(decoder[-1], []).append([r["tokens"] for r in report["results"]])
    for name, (a, b, c) in runs.items():
        assert a == b and a != c, name  # the seed makes a run reproducible; another seed draws other tokens
        assert a != _greedy(big, 5), name
    rc, out, err = _run(capsys, *base, "--little", little, "--cascade", "lossless", "--compare", "--repeats", "1",
                        "--warmup", "0")  # fmt: skip
    assert rc == 0 and json.loads(out)["compare"]["generate"]["tok_s"] > 0, err
    for argv, message in [
        (["--temperature", "0.5"], "--temperature set sampling: add --sample"),
        (["--sample", "--exit", "max_prob:0.9"], "--sample works with --speculative and --cascade"),
        (["--sample", "--skipdecode", "2"], "skipdecode decoding is greedy here"),
        (["--sample", "--speculative", "--temperature", "0"], "--temperature must be > 0"),
        (["--sample", "--little", little, "--cascade", "lossless", "--top-k", "0"], "--top-k must be >= 1"),
    ]:
        rc, _, err = _run(capsys, "generate", big, "--prompt", "the whale", *argv)
        assert rc == 2 and message in err, (argv, err)
