"""The `depthprune` command as a new user meets it, on tiny models saved to tmp folders: every registry listed, a plan
needs no tokenizer, output folders are checked before anything loads, bad input gets a clear error that names the
flag or file, and a config that does not match its weights is refused."""

from __future__ import annotations

import doctest
import json

import pytest
import torch
import transformers
from tiny_models import WORDS, build, tokenizer

import depthprune.registry
from depthprune.cli.main import main
from depthprune.errors import ModelLoadError, OutputExistsError
from depthprune.registry import CRITERIA, HEAD_KINDS, KV_STRATEGIES, RECIPES, REGISTRIES, SCORERS, TOKEN_CRITERIA


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(tiny llama without a tokenizer, the same with one, a tiny BERT backbone with one, like MiniLM)."""
    root = tmp_path_factory.mktemp("cli")
    build("llama").save_pretrained(root / "bare")
    build("llama").save_pretrained(root / "llama")
    tokenizer().save_pretrained(root / "llama")
    build("bert").bert.save_pretrained(root / "bert")
    tokenizer().save_pretrained(root / "bert")
    return root / "bare", root / "llama", root / "bert"


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---- registries ------------------------------------------------------------------------------------------------------
def test_registry_docstring_examples_run():
    assert doctest.testmod(depthprune.registry).failed == 0


def test_registries_know_their_builtins_and_refuse_unknown_names():
    assert SCORERS.names() == ["block_influence", "angular", "sleb", "lookahead_kl"]
    assert "patience" in CRITERIA and "saturation" in TOKEN_CRITERIA and "two_stage" in RECIPES
    assert KV_STRATEGIES.names() == ["propagate", "recompute"]
    assert HEAD_KINDS.names() == ["logit_lens", "lens", "mlp", "truncated"]
    with pytest.raises(ValueError, match="unknown training recipe 'nope'; available: two_stage, joint"):
        RECIPES.get("nope")
    with pytest.raises(ValueError, match="already exists"):
        depthprune.registry.register_scorer("sleb", lambda *a, **k: None)
    assert SCORERS.get("sleb").__module__ == "depthprune.static.scorers.sleb"


def test_generation_and_heads_read_their_names_from_the_registry():
    from depthprune.exits.lm_heads import KINDS
    from depthprune.generation.generate import KV_MODES

    assert KV_MODES == tuple(KV_STRATEGIES) and KINDS == tuple(HEAD_KINDS)


def test_list_prints_every_registry_as_a_table_and_as_json(capsys):
    rc, out, _ = _run(capsys, "list")
    assert rc == 0
    for registry in REGISTRIES.values():
        assert registry.plural in out
    assert "model types:" in out and "SLEB: greedy removal" in out
    rc, out, _ = _run(capsys, "list", "--json")
    listing = json.loads(out)
    assert set(listing) == {*REGISTRIES, "model_types"}
    assert [r["name"] for r in listing["kv_strategies"]] == ["propagate", "recompute"]
    assert any(r["name"] == "bert" and "classifier early exit" in r["description"] for r in listing["model_types"])


def test_classification_heads_are_declared_by_the_adapters():
    from depthprune.adapters.registry import get_adapter
    from depthprune.exits.families import classifier_model_types, head_family

    assert {"bert", "roberta", "distilbert", "albert"} <= set(classifier_model_types())
    model = build("bert")
    assert head_family(model) is get_adapter(model).classification_head
    with pytest.raises(ValueError, match="early exit for classifiers supports model types"):
        head_family(build("llama"))


def test_exit_heads_save_atomically_and_refuse_to_overwrite(tmp_path):
    from depthprune.exits.heads import ExitHeads

    model = build("bert")
    heads = ExitHeads.for_model(model)
    heads.save(tmp_path)
    with pytest.raises(OutputExistsError, match="already has exit heads"):
        heads.save(tmp_path)
    heads.save(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exit_heads.json", "exit_heads.safetensors"]
    again = ExitHeads.load(tmp_path, model)
    torch.testing.assert_close(again.state_dict(), heads.state_dict())
    (tmp_path / "exit_heads.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no exit_heads.safetensors"):
        ExitHeads.load(tmp_path, model)


# ---- prune -----------------------------------------------------------------------------------------------------------
def test_prune_with_a_plan_needs_no_tokenizer(folders, capsys, tmp_path):
    bare, llama, _ = folders
    rc, out, err = _run(capsys, "prune", bare, "--plan", "0,2,2,1", "-o", tmp_path / "p")
    assert rc == 0, err
    assert "has no tokenizer: saved the model alone" in out
    assert transformers.AutoConfig.from_pretrained(tmp_path / "p").num_hidden_layers == 4
    rc, out, err = _run(capsys, "prune", bare, "--plan", "0,1", "--tokenizer", llama, "-o", tmp_path / "q")
    assert rc == 0, err
    assert (tmp_path / "q" / "tokenizer_config.json").is_file()


def test_text_without_a_tokenizer_is_a_clear_error(folders, capsys, tmp_path):
    bare, llama, _ = folders
    rc, _, err = _run(capsys, "prune", bare, "--remove", "1", "--scorer", "block_influence", "-o", tmp_path / "p")
    assert rc == 2 and f"{bare} has no tokenizer" in err and "--tokenizer" in err
    assert not (tmp_path / "p").exists()
    book = tmp_path / "book.txt"
    book.write_text(" ".join(WORDS * 40))
    argv = ["--remove", "1", "--scorer", "block_influence", "--calibration", book, "--seq-len", "8", "--blocks", "2"]
    rc, out, err = _run(capsys, "prune", bare, *argv, "--tokenizer", llama, "-o", tmp_path / "p")
    assert rc == 0, err and "chosen by block_influence" in out


def test_an_occupied_output_folder_is_refused_before_the_model_loads(folders, capsys, tmp_path, monkeypatch):
    import depthprune.io

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(depthprune.io, "load_model", no_loading)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    rc, _, err = _run(capsys, "prune", folders[1], "--remove", "1", "-o", full)
    assert rc == 2 and "already exists and is not empty; choose a new folder or pass --overwrite" in err
    assert (full / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit) as exc:
        main(["train-exits", str(folders[2]), "--data", "x.jsonl", "-o", str(full)])
    assert exc.value.code == 2 and "already exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-exits", str(folders[1]), "-o", str(full)])  # the decoder trainer (a causal LM) checks too
    assert "already exists and is not empty" in capsys.readouterr().err


def test_prune_bad_input_names_the_flag(folders, capsys, tmp_path):
    _, llama, _ = folders
    rc, _, err = _run(capsys, "prune", llama, "--plan", "", "-o", tmp_path / "p")
    assert rc == 2 and "empty layer plan" in err and "remove=N" not in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc, _, err = _run(capsys, "prune", llama, "--remove", "1", "--calibration", empty, "-o", tmp_path / "p")
    assert rc == 2 and f"--calibration {empty}" in err and "is empty" in err
    short = tmp_path / "short.txt"
    short.write_text("the whale")
    rc, _, err = _run(capsys, "prune", llama, "--remove", "1", "--calibration", short, "-o", tmp_path / "p")
    assert rc == 2 and f"--calibration {short}" in err and "--seq-len 256" in err
    assert not (tmp_path / "p").exists()


# ---- configs that do not match their weights -------------------------------------------------------------------------
def test_a_config_without_weights_is_refused_before_building_the_model(tmp_path):
    from depthprune.io import load_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="has a config.json but no weights file"):
        load_model(tmp_path)


def test_a_config_edited_to_more_or_fewer_layers_is_refused(folders, tmp_path):
    import shutil

    from depthprune.io import load_model

    for layers, what in [(6, "missing weight"), (3, "unexpected weight")]:
        folder = tmp_path / f"l{layers}"
        shutil.copytree(folders[1], folder)
        config = json.loads((folder / "config.json").read_text())
        config["num_hidden_layers"] = layers
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError, match=f"do not match its config.json .*{what}.*layers\\.") as exc:
            load_model(folder)
        assert "num_hidden_layers" in str(exc.value)
    load_model(folders[2], task="seq-cls")  # a checkpoint with its classifier loads as before


# ---- train-exits -----------------------------------------------------------------------------------------------------
def test_train_exits_without_the_label_column_is_a_clear_error(folders, capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": w}) for w in WORDS))
    rc, _, err = _run(capsys, "train-exits", folders[2], "--data", data, "-o", tmp_path / "out", "--no-progress")
    assert rc == 2
    assert f"depthprune train-exits: error: {data} has no column(s) ['label']" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_train_exits_reads_raw_emails_with_format_email(folders, capsys, tmp_path):
    mails = [
        ("ham", "Subject: lunch\n\nthe boat sails at noon"),
        ("spam", "Subject: WIN\n\nbuy the white whale now"),
    ] * 4
    data = tmp_path / "mails.jsonl"
    data.write_text("\n".join(json.dumps({"label": y, "raw": raw}) for y, raw in mails))
    argv = ["train-exits", folders[2], "--data", data, "--format", "email", "--recipe", "joint", "--epochs", "1"]
    rc, out, err = _run(capsys, *argv, "--batch-size", "4", "-o", tmp_path / "out", "--no-progress", "--no-eval")
    assert rc == 0, err
    assert "trained joint on" in out and (tmp_path / "out" / "exit_heads.json").is_file()
