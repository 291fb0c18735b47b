"""The layer-skipping command line on a tiny saved causal LM: train-router writes routers, calibrate-router prints
and checks a guarantee, generate --routers prints the layers each token ran, list shows router kinds; bad input
gets a clear error (exit code 2)."""

from __future__ import annotations

import json

import pytest
from tiny_models import WORDS, build, tokenizer

from depthprune.cli.main import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("skip_cli")
    model = build("llama")
    model.generation_config.eos_token_id = []
    model.save_pretrained(root / "model")
    tokenizer().save_pretrained(root / "model")
    book = root / "book.txt"
    book.write_text(" ".join(WORDS[(5 * i) % len(WORDS)] for i in range(300)) + " CHAPTER 110. " + " ".join(WORDS * 20))
    return root / "model", book


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_train_calibrate_generate(folders, tmp_path, capsys):
    model, book = folders
    routers = tmp_path / "routers"
    rc, out, err = _run(capsys, "train-router", model, "--target-layers", "3", "-o", routers, "--data", book,
                        "--seq-len", "8", "--blocks", "8", "--quiet")  # fmt: skip
    assert rc == 0, err
    assert (routers / "routers.json").is_file()
    rc, out, err = _run(capsys, "calibrate-router", model, "--routers", routers, "--text", book, "--prompts", "8",
                        "--prompt-len", "4", "--max-new-tokens", "3", "--delta", "0.5", "--epsilon", "0.2")  # fmt: skip
    assert rc == 0, err
    assert "threshold 0.00" in out and "wrote" in out
    record = json.loads((routers / "router_calibration.json").read_text())
    assert record["table"][0]["risk"] == 0.0
    rc, out, err = _run(capsys, "generate", model, "--routers", routers, "--prompt", "the whale", "--max-new-tokens",
                        "3", "--json")  # fmt: skip
    assert rc == 0, err
    report = json.loads(out)
    assert report["decoder"] == "routers" and len(report["results"][0]["layers"]) == 3
    both = []
    for prefill in ("full", "routed"):  # threshold 0: every layer runs, so both prefills give plain greedy tokens
        argv = ["--router-prefill", prefill, "--router-threshold", "0", "--max-new-tokens", "3", "--json"]
        rc, out, err = _run(capsys, "generate", model, "--routers", routers, "--prompt", "the whale", *argv)
        assert rc == 0, err
        both.append(json.loads(out)["results"][0]["tokens"])
    assert both[0] == both[1] and len(both[0]) == 3
    rc, out, err = _run(capsys, "generate", model, "--routers", routers, "--router-threshold", "2", "--prompt", "the")
    assert rc == 2 and "outside [0, 1]" in err
    rc, out, err = _run(capsys, "train-router", model, "--target-layers", "9", "-o", tmp_path / "x", "--data", book)
    assert rc == 2 and "target depth 9.0 out of range" in err


def test_list_shows_router_kinds(capsys):
    rc, out, _ = _run(capsys, "list")
    assert rc == 0 and "token_linear" in out and "sample_linear" in out
