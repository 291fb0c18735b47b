"""Healing a pruned model: the linear fold equals applying its map by hand, leaves the input model alone, exports to
plain transformers, and refuses what it cannot fold."""

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import VOCAB, build

from depthprune.adapters import get_adapter
from depthprune.adapters.base import get_path
from depthprune.registry import HEALERS
from depthprune.static.apply import apply_plan
from depthprune.static.export import save_model
from depthprune.static.heal import heal, list_healers
from depthprune.static.heal.fold import fit_maps, removed_runs

PLANS = {"llama": "0,3", "qwen2": "0,1,3", "gpt2": "0,2"}  # 4-layer tiny models: runs 1-2, 2, 1 and 3


def batches(n=3, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (2, seq), generator=g) for _ in range(n)]


def test_removed_runs():
    assert removed_runs((0, 3), 4) == [(1, 3)]
    assert removed_runs((0, 2), 5) == [(1, 2), (3, 5)]
    assert removed_runs((0, 1, 2), 3) == []


@pytest.mark.parametrize("name", sorted(PLANS))
def test_fold_equals_applying_the_map_by_hand(name):
    model = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal = batches()
    healed = heal(model, PLANS[name], cal, method="fold")
    spec = get_adapter(model).stacks[-1]
    kept = [int(i) for i in PLANS[name].split(",")]
    runs = removed_runs(tuple(kept), 4)
    maps = fit_maps(model, runs, cal, spec.output_proj)
    by_hand = apply_plan(model, PLANS[name])
    layers = get_path(by_hand.base_model, spec.layers)
    hooks = []
    for i, j in runs:
        t = maps[j][0].float()
        proj = get_path(layers[kept.index(i - 1)], spec.output_proj)
        hooks.append(proj.register_forward_hook(lambda _m, _a, out, t=t: out @ t))
    ids = batches(1, seed=1)[0]
    with torch.no_grad():
        expected = by_hand(input_ids=ids).logits
        got = healed(input_ids=ids).logits
        unhealed = apply_plan(model, PLANS[name])(input_ids=ids).logits
    for h in hooks:
        h.remove()
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, unhealed, atol=1e-4)  # the fold changed something
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input model is untouched
    record = healed.config.depthprune["healing"]
    assert record["method"] == "fold" and [r["removed"] for r in record["runs"]] == [[i, j - 1] for i, j in runs]


def test_fold_fits_better_than_plain_removal_on_its_calibration_data():
    model = build("llama")
    cal = batches(4)
    maps = fit_maps(model, [(1, 3)], cal, "mlp.down_proj")
    assert 0 <= maps[3][1] < 1  # relative residual against plain removal


def test_folded_export_reloads_in_plain_transformers(tmp_path):
    model = build("llama")
    healed = heal(model, "0,3", batches())
    out = save_model(healed, tmp_path / "healed")
    ids = batches(1, seed=2)[0]
    with torch.no_grad():
        ref = healed(input_ids=ids).logits
    code = (
        "import sys, json, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(m(input_ids=ids).logits.tolist()))\n"
        "assert 'depthprune' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.allclose(torch.tensor(json.loads(proc.stdout)), ref, atol=1e-5)


def test_bad_input_gets_a_clear_error():
    model = build("llama")
    with pytest.raises(ValueError, match="removes no layer"):
        heal(model, "0-3", batches())
    with pytest.raises(ValueError, match="keep layer 0"):
        heal(model, "2,3", batches())
    with pytest.raises(ValueError, match="reorders or repeats"):
        heal(model, "0,2,1", batches())
    with pytest.raises(ValueError, match="calibration batches"):
        heal(model, "0,3", [])
    with pytest.raises(ValueError, match="names no output projection"):
        heal(build("gemma3_text"), "0,3", batches())
    with pytest.raises(ValueError, match="unknown healing method 'glue'"):
        heal(model, "0,3", batches(), method="glue")


def test_healers_are_listed():
    assert "fold" in list_healers() and "fold" in HEALERS


def test_heal_and_prune_heal_on_the_command_line(tmp_path, capsys):
    from tiny_models import tokenizer

    from depthprune.cli.main import main

    folder = tmp_path / "llama"
    build("llama").save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    cal = ["--seq-len", "12", "--blocks", "3"]
    assert main(["heal", str(folder), "--plan", "0,3", *cal, "-o", str(tmp_path / "healed")]) == 0
    assert "healed by fold" in capsys.readouterr().out
    config = json.loads((tmp_path / "healed" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["depthprune"]["healing"]["method"] == "fold"
    rc = main(["prune", str(folder), "--remove", "1", "--scorer", "block_influence", "--heal", "fold", *cal,
               "-o", str(tmp_path / "pruned")])  # fmt: skip
    assert rc == 0 and json.loads((tmp_path / "pruned" / "config.json").read_text())["num_hidden_layers"] == 3
    rc = main(["prune", str(folder), "--plan", "0,3", "--heal", "glue", "-o", str(tmp_path / "x")])
    assert rc == 2 and "unknown healing method 'glue'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_distill_is_registered_as_a_healer():
    from depthprune.static.heal import distill

    assert HEALERS.get("distill") is distill.HEALER and "distill" in list_healers()
