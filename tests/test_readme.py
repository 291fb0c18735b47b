"""Every `depthprune ...` command in README.md's code blocks runs as shown, so the README cannot drift from the
command line again.

Each code block runs in order in a fresh working folder (later commands read what earlier ones wrote, as a reader
pasting the block would see), on tiny random models. What differs from the README text is mechanical and listed here:
- `models`: the embedded aliases name tiny models of the same shape (a 30-layer Llama like SmolLM2, so the README's
  layer counts, plans and exit layers run unchanged; a BERT backbone like MiniLM, with a word-level tokenizer);
- `_write_data`: the README's `../shared/data/...` files are small ones written at that same relative path;
- `SIZE` (keyed by the subcommand, or its first one, two or three words): options that only size the run (how many
  repeats, prompts, blocks) are reduced, SkipDecode aims at the nominal layer ratio, and the decoder `calibrate`,
  which relies on the default model (smollm2), names the tiny one.
`out/...` paths are left as shown: they land in the working folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import shutil
from pathlib import Path

import gguf
import pytest
import torch
import transformers
from gguf_files import write_tiny_gguf
from tiny_models import CASES, WORDS, build, save_speech_model, tokenizer, write_fashion_mnist, write_wavs

from depthprune.cli.main import main
from depthprune.data import calibration_text, heldout_text
from depthprune.plan import LayerPlan

README = Path(__file__).resolve().parents[1] / "README.md"

SIZE: dict[str, list[tuple[str, str]]] = {
    # subcommand (and its first argument where two differ): [(README text, what runs instead)]; "" appends
    "eval": [("", "--repeats 1 --batch-sizes 1 --blocks 4")],
    # 40 prompts: enough for Hoeffding to certify delta 0.2 at epsilon 0.05 (n >= 38), so generate has a threshold
    "calibrate out/smollm2-lens": [("", "--model smollm2 --prompts 40 --prompt-len 16 --max-new-tokens 8")],
    "train-skipdecode": [("", "--max-blocks 8")],
    "train-layerskip": [("", "--max-blocks 2 --seq-len 16")],
    "eval out/p26": [("--lm-eval-limit 50", "--lm-eval-limit 2 --lm-eval-batch-size 2")],
    "train-router": [("", "--blocks 4 --seq-len 8 --quiet")],
    "prune smollm2 --remove": [("", "--option distill.max_tokens=256")],  # the healed start of train-router --start
    # timings of a tiny model are noise: its SkipDecode schedule aims at the layer ratio, not at measured seconds
    "generate smollm2 --skipdecode": [("", "--skip-cost nominal")],
    "calibrate-router": [("", "--prompts 4 --prompt-len 8 --max-new-tokens 2")],
    "prune ~/.cache/depthprune/whisper-tiny.en": [("epochs=6", "epochs=1"), ("", "--option max_new_tokens=4")],
    "calibrate-split": [("", "--prompts 12 --prompt-len 8 --max-new-tokens 2 --delta 0.3 --grid 1.0 0.5")],
    # DeeDiff on a tiny DiT and tiny random Fashion-MNIST files ($DEPTHPRUNE_FASHION_MNIST); 30 calibration samples:
    # enough for zero losses to certify delta 0.1 at epsilon 0.05, so `--exit uncertainty:auto` has a threshold
    "diffusion train": [("--epochs 2", "--epochs 1 --limit 32 --batch-size 16 --width 32 --heads 2 --depth 2 --quiet")],
    "diffusion train-classifier": [("", "--limit 64 --epochs 1 --quiet")],
    "diffusion train-exits": [("--limit 12800", "--limit 32 --batch-size 16 --rank 8 --quiet")],
    "diffusion calibrate": [("", "--steps 2 --per-class 3 --heldout-per-class 2 --reference 32")],
    "diffusion sample": [("--steps 20", "--steps 2 --per-class 1")],
    "diffusion eval": [("--steps 20", "--steps 2 --per-class 1 --reference 32")],
}
NEEDS = {"--lm-eval": "lm_eval"}
"""An option of a README command -> the module of the extra it needs (the command is skipped without it: make test
installs the extras before the real tier only)."""
BENCHMARK_SAMPLES = ("spec/spec_bench.json", "fusion_bench_c3.json")
"""Benchmark JSON files copied to the README's `benchmarks` folder for `depthprune report`."""


def readme_blocks() -> dict[str, list[str]]:
    """{README section: the `depthprune` commands of its code block}, continuation lines joined, comments removed."""
    blocks: dict[str, list[str]] = {}
    heading, in_code = "", False
    for line in README.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif in_code and line.startswith("depthprune "):
            blocks.setdefault(heading, []).append(line.split("  #")[0].strip())
        elif not in_code and line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


def test_the_readme_has_commands_to_check():
    names = {shlex.split(c)[1] for block in readme_blocks().values() for c in block}
    assert {"list", "prune", "analyze", "eval", "train-exits", "calibrate", "classify", "generate"} <= names
    assert "train-skipdecode" in names and "search-order" in names


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """README model names -> tiny model folders: a 30-layer Llama (smollm2, the default) and a BERT backbone."""
    root = tmp_path_factory.mktemp("readme_models")
    config = CASES["llama"].config()
    config.num_hidden_layers, config.max_position_embeddings = 30, 512
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(config).eval()
    llama.generation_config.eos_token_id = []  # a random model stops at random places otherwise
    llama.save_pretrained(root / "smollm2")
    build("bert").bert.save_pretrained(root / "minilm")
    for name in ("smollm2", "minilm"):
        tokenizer(WORDS + "call me ishmael buy now".split()).save_pretrained(root / name)
    gguf_file = write_tiny_gguf(llama, root / "model.gguf")  # the same 30-layer Llama, Q4_1, as llama.cpp reads it
    save_speech_model(root / "whisper", decoder_layers=4)  # Whisper tiny.en's 4 decoder layers, tiny otherwise
    return {
        "~/.cache/depthprune/whisper-tiny.en": str(root / "whisper"),
        "smollm2": str(root / "smollm2"),
        "[MODEL]": str(root / "smollm2"),
        "minilm": str(root / "minilm"),
        "model.gguf": str(gguf_file),
    }


def _write_data(work: Path) -> None:
    """The files the README reads, small, at the README's relative paths: the packaged Moby-Dick excerpts as the book
    (calibration part, then chapter 110 on), and two dozen raw e-mails as spam-assassin.jsonl."""
    data = work.parent / "shared" / "data"
    data.mkdir(parents=True)
    (data / "moby-dick.txt").write_text(calibration_text() + heldout_text())
    mails = [("ham", f"Subject: {w}\n\nthe boat sails at noon {w}") for w in WORDS]
    mails += [("spam", f"Subject: WIN\n\nbuy the white whale now {w}!!!") for w in WORDS]
    (data / "spam-assassin.jsonl").write_text("\n".join(json.dumps({"label": y, "raw": r}) for y, r in mails))
    for folder in ("speech", "speech-heldout"):  # what benchmarks/speech_data.py --out out/... writes (noise here)
        write_wavs(work / "out" / folder)
    texts = [{"file": f"utt{i:02d}.wav", "text": "call me ishmael"} for i in range(4)]
    (work / "out" / "speech-heldout" / "texts.json").write_text(json.dumps(texts))
    for name in BENCHMARK_SAMPLES:
        (work / "benchmarks" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(README.parent / "benchmarks" / name, work / "benchmarks" / name)


def _argv(command: str, models: dict[str, str]) -> list[str]:
    """The README command as it runs here: SIZE overrides applied to its text, then the model names swapped."""
    words = shlex.split(command)[1:]
    for key in (words[0], " ".join(words[:2]), " ".join(words[:3])):
        for old, new in SIZE.get(key, []):
            assert old in command, f"SIZE[{key!r}] expects {old!r} in the README command {command!r}"
            command = command.replace(old, new) if old else f"{command} {new}"
    return [models.get(w, w) for w in shlex.split(command)[1:]]


def _effect(argv: list[str], out: str, work: Path) -> None:
    """At least one visible effect of each command."""
    command, option = argv[0], dict(zip(argv, [*argv[1:], None], strict=True))
    folder = work / (option.get("-o") or option.get("--output-dir") or argv[min(1, len(argv) - 1)])
    if str(option.get("-o", "")).endswith(".gguf"):
        reader = gguf.GGUFReader(folder)
        blocks = reader.get_field("llama.block_count").contents()
        assert blocks == (sum(LayerPlan.parse(option["--plan"]).num_layers().values()) if "--plan" in argv else 30)
        assert "copied byte for byte" in out and reader.get_field("depthprune.plan") is not None
        if "--gguf-type" in argv:
            assert f"written anew ({option['--gguf-type']})" in out
    elif command == "diffusion":
        _diffusion_effect(argv, out, work)
    elif command == "report":
        page = folder.read_text()
        assert page.count("<table>") >= 3 and "<img " in page and folder.with_suffix(".md").is_file()
    elif command == "eval" and "--lm-eval" in argv:
        assert "moby_cloze" in out and "moby_mc" in out and "untouched" in out
    elif command == "list":
        assert json.loads(out)["scorers"] if "--json" in argv else "scorers:" in out
    elif command == "analyze":
        assert {"layer_scores.png", "scores.csv", "scores.json"} <= {p.name for p in folder.iterdir()}
    elif command in ("merge", "share"):
        config = json.loads((folder / "config.json").read_text())
        steps = config["depthprune_fusion"]["steps"]
        removed = sum(b - a for step in steps for a, b in step.get("runs", []))
        assert config["num_hidden_layers"] == 30 - removed and (removed > 0) == (command == "merge")
        if "--remove" in argv:
            assert removed == int(option["--remove"]) and {s["method"] for s in steps} == {"laco"}
        assert "saved to" in out and (steps[-1]["method"] == "share") == (command == "share")
    elif command in ("prune", "heal", "train-skipdecode"):
        config = json.loads((folder / "config.json").read_text())
        assert (folder / "model.safetensors").is_file()
        extra = 0  # layers a healer keeps beyond the plan's: replace keeps one per removed run
        if command == "heal":
            method = option.get("--method", "fold")
            record = config["depthprune_healing"]
            assert record["method"] == method and f"healed by {method}" in out
            extra = len(record.get("replacements", []))
        if "--audio" in argv:  # a speech model: the decoder plan, healed on the WAV folder, with its feature extractor
            if "--plan" in option:
                assert config["decoder_layers"] == LayerPlan.parse(option["--plan"]).num_layers()["decoder"]
            else:  # chosen on the speech
                assert config["decoder_layers"] == 4 - int(option["--remove"]) and "chosen by block_influence" in out
            assert config["depthprune_healing"]["method"] == "distill" and "healed by distill" in out
            assert (folder / "preprocessor_config.json").is_file()
        elif "--plan" in argv:
            planned = sum(LayerPlan.parse(option["--plan"]).num_layers().values())
            assert config["num_hidden_layers"] == planned + extra
        elif "--remove" in argv:
            assert config["num_hidden_layers"] == 30 - int(option["--remove"])
        else:
            assert (folder / "skip_schedule.json").is_file()
    elif command == "search-order":
        config = json.loads((folder / "config.json").read_text())
        assert config["num_hidden_layers"] == 30 - int(option["--remove"]) and "calibration NLL" in out
    elif command == "eval":
        assert ("WER (%) and seconds per utterance" if "--audio" in argv else "perplexity") in out
    elif command == "train-layerskip":
        assert {"adapter_config.json", "layerskip.json"} <= {p.name for p in folder.iterdir()} and "LoRA rank" in out
    elif command == "train-exits":
        assert {"exit_heads.json", "decoder_exit_heads.json"} & {p.name for p in folder.iterdir()}
    elif command == "calibrate":
        results = json.loads((folder / "calibration.json").read_text())
        assert [r["criterion"] for r in results] == option["--criterion"].split(",")
        assert all(r["delta"] == float(option.get("--delta", 0.2)) for r in results)  # written by this command
    elif command == "calibrate-split":
        record = json.loads((work / option["--exits"] / "split_calibration.json").read_text())
        assert record["candidates"] and ("with probability >= " in out or "no split certified" in out)
    elif command == "classify":
        assert "exit after" in out
    elif command == "train-router":
        assert json.loads((folder / "routers.json").read_text())["target_layers"] == float(option["--target-layers"])
        if "--start" in argv:  # the routed model (the start's healed layers in place) is saved beside the routers
            assert (folder / "config.json").is_file() and "plan: removes" in out
    elif command == "calibrate-router":
        record = json.loads((work / option["--routers"] / "router_calibration.json").read_text())
        assert record["table"] and ("Learn-then-Test" in out or "no threshold certified" in out)
    elif command == "generate":
        if "--routers" in argv:
            assert "layers per token" in out and out.split("->\n", 1)[1].strip()
        elif "--speculative" in argv:
            assert "accepted drafts per verification" in out
        elif "--skipdecode" in argv:
            assert "mean layers per generated token" in out
        elif "--cascade" in argv:
            assert "the little model decided" in out
        elif "--decode-plan" in argv or "--prefill-plan" in argv:
            # the random 30-layer model's greedy tokens here (id 54) lie outside the tiny tokenizer's words: no text
            assert "phases: the prompt runs layers" in out and "'Call me Ishmael.' ->" in out
        else:
            assert "mean layers per token" in out
        if "--decode-plan" not in argv and "--prefill-plan" not in argv:
            assert out.split("->\n", 1)[1].strip()
        if "--compare" in argv:
            assert "tokens/s" in out and "plain generate" in out
    else:
        raise AssertionError(f"no effect to check for README command {command!r}: add one to _effect")


def _diffusion_effect(argv: list[str], out: str, work: Path) -> None:
    sub, option = argv[1], dict(zip(argv, [*argv[1:], None], strict=True))
    model = work / (option.get("-o") or option.get("--output-dir") or argv[2])
    if sub == "train":
        assert json.loads(out)["steps"] > 0 and (model / "transformer" / "config.json").is_file()
    elif sub == "train-classifier":
        assert "test_accuracy" in json.loads(out) and (model / "classifier_config.json").is_file()
    elif sub == "train-exits":
        assert json.loads(out)["mode"] == option.get("--mode", "frozen")
        assert (model / "uem" / "uem_config.json").is_file() and (model / "transformer").is_dir()
    elif sub == "calibrate":
        (record,) = json.loads((model / "uem" / "calibration.json").read_text())
        assert record["delta"] == float(option["--delta"]) and record["settings"]["max_fid_increase"] == 0.1
        assert record["threshold"] is not None and "Learn-then-Test" in out and "fid_increase" in record["heldout"]
    elif sub == "sample":
        assert (work / option["-o"]).read_bytes()[:4] == b"\x89PNG" and json.loads(out)["policy"].startswith("unc")
    elif sub == "eval":
        rows = json.loads(out)
        assert [r["policy"] for r in rows][0] == "full" and all("fid" in r for r in rows)
    else:
        raise AssertionError(f"no effect to check for README command diffusion {sub!r}: add one to _diffusion_effect")


@pytest.mark.parametrize("section", readme_blocks())
def test_readme_block_runs(section, models, tmp_path, monkeypatch, capsys):
    """The commands of one code block, in order, in a fresh working folder."""
    block = readme_blocks()[section]
    work = tmp_path / "work"
    work.mkdir()
    _write_data(work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tmp_path / "cache"))  # the GGUF conversion's cache
    monkeypatch.setenv("DEPTHPRUNE_FASHION_MNIST", str(write_fashion_mnist(tmp_path / "fashion-mnist")))
    for command in block:
        argv = _argv(command, models)
        missing = [mod for opt, mod in NEEDS.items() if opt in argv and importlib.util.find_spec(mod) is None]
        if missing:
            print(f"skipped {command!r}: needs {missing} (an extra; make test installs it before the real tier)")
            continue
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse: an unknown or malformed option
            rc = exc.code
        out, err = capsys.readouterr()
        assert rc == 0, f"README command {command!r} failed (ran as {shlex.join(argv)}):\n{err[-3000:]}"
        _effect(argv, out, work)


def help_example(command: str) -> list[str]:
    """The `depthprune ...` example lines of a command's --help (continuation lines joined)."""
    from depthprune.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices[command].format_help().replace("\\\n", " ")
    return [" ".join(line.split()) for line in text.splitlines() if line.strip().startswith("depthprune ")]


def test_generate_help_example_runs(models, tmp_path, monkeypatch, capsys):
    """`depthprune generate --help` shows heads trained, calibrated, then generate with the calibrated threshold (no
    --exit): it runs as shown, like the README's commands."""
    example = help_example("generate")
    assert [shlex.split(c)[1] for c in example] == ["train-exits", "calibrate", "generate"]
    assert "--exit" not in example[-1]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for command in example:
        argv = _argv(command, models)
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 0, f"--help example {command!r} failed (ran as {shlex.join(argv)}):\n{err[-3000:]}"
        _effect(argv, out, work)
    assert "warning" not in err and "with probability >= " in out
