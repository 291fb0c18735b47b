"""Healing after pruning: the linear fold equals applying its map by hand, leaves the input alone, exports, runs from
the CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers

from depthprune.adapters.registry import get_adapter
from depthprune.cli.main import main
from depthprune.registry import HEALERS
from depthprune.static.apply import apply_plan
from depthprune.static.export import save_model
from depthprune.static.heal import heal, list_healers
from depthprune.static.heal.fold import fold, output_projection, removed_runs
from tests.tiny_models import VOCAB, build, tokenizer


def _layers(n: int = 6, name: str = "llama"):
    torch.manual_seed(0)
    case = build(name)
    config = case.config
    config.num_hidden_layers = n
    if getattr(config, "layer_types", None):
        config.layer_types = (list(config.layer_types) * n)[:n]
    return type(case)(config).eval()


def _batches(n: int = 3, seq: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (2, seq), generator=g) for _ in range(n)]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "gpt_neox", "phi3"])
def test_fold_equals_applying_T_by_hand(name):
    model = _layers(6, name)
    plan = "0,1,4,5" if name != "gpt2" else "0,3"  # gpt2: a run at the end too ([4, 6))
    result = fold(model, plan, _batches())
    hand = apply_plan(model, plan)
    adapter = get_adapter(hand)
    hooks = []
    for f in result.folds:
        spec = adapter.stack(f.stack)
        proj = output_projection(adapter.layers(hand, spec)[f.position], spec)
        T = f.T.float()
        hooks.append(proj.register_forward_hook(lambda _m, _i, out, T=T: out @ T))
    ids = _batches(1, 7)[0]
    healed, by_hand, pruned = _logits(result.model, ids), _logits(hand, ids), _logits(apply_plan(model, plan), ids)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(healed, by_hand, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(healed, pruned, atol=1e-4)  # the fold did something
    assert len(result.folds) == (2 if name == "gpt2" else 1)
    assert result.model.config.depthprune_healing["method"] == "fold"


def test_fold_brings_the_pruned_stack_closer_on_calibration_data():
    model = _layers(6)
    batches = _batches(6, 16)
    plan = "0,1,4,5"
    ref = torch.cat([_logits(model, b) for b in batches])
    pruned = torch.cat([_logits(apply_plan(model, plan), b) for b in batches])
    healed_model = heal(model, plan, batches)
    healed = torch.cat([_logits(healed_model, b) for b in batches])
    assert (healed - ref).pow(2).mean() < (pruned - ref).pow(2).mean()


def test_cosine_variant_runs_and_differs():
    model = _layers(6)
    a = fold(model, "0,1,4,5", _batches(), loss="cosine", cosine_steps=5).folds[0].T
    b = fold(model, "0,1,4,5", _batches()).folds[0].T
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_healing_never_modifies_the_input_model():
    model = _layers(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    heal(model, "0,1,4,5", _batches(), method="fold")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.to_dict() == config
    assert len(model.model.layers) == 6


def test_bad_input_gets_clear_errors():
    model = _layers(6)
    with pytest.raises(ValueError, match="no calibration batches"):
        fold(model, "0,1,4,5", [])
    with pytest.raises(ValueError, match="removes no layer"):
        fold(model, "0-5", _batches())
    with pytest.raises(ValueError, match="only remove layers"):
        fold(model, "0,2,1,5", _batches())
    with pytest.raises(ValueError, match="loss must be one of"):
        fold(model, "0,1,4,5", _batches(), loss="l1")
    gemma = _layers(4, "gemma3_text")
    with pytest.raises(ValueError, match=r"output_proj.*fold supports: .*llama"):
        fold(gemma, "0,3", _batches())


def test_a_run_at_the_start_is_skipped_with_a_warning():
    model = _layers(6)
    with pytest.warns(UserWarning, match="start the stack"):
        result = fold(model, "2,3,5", _batches())
    assert result.skipped == [("decoder", 0, 2)] and [(f.start, f.stop) for f in result.folds] == [(4, 5)]
    assert result.model.config.depthprune_healing["skipped"] == [{"stack": "decoder", "removed": [0, 2]}]


def test_removed_runs():
    assert removed_runs((0, 1, 4, 5), 6) == [(2, 4)]
    assert removed_runs((1, 3), 6) == [(0, 1), (2, 3), (4, 6)]
    assert removed_runs((0, 1, 2), 3) == []


def test_export_reloads_in_plain_transformers_with_the_same_logits(tmp_path):
    model = _layers(6)
    healed = heal(model, "0,1,4,5", _batches())
    out = save_model(healed, tmp_path / "healed")
    ids = _batches(1, 7)[0]
    # a fresh interpreter that never imports depthprune: the fold lives in ordinary weights
    from depthprune.demo import reload_plainly

    logits, facts = reload_plainly(out, ids)
    torch.testing.assert_close(logits, _logits(healed, ids))
    assert facts == {"depthprune_imported": False, "layers": 4}


def test_registry_lists_fold():
    assert "fold" in list_healers() and "fold" in HEALERS
    assert callable(HEALERS.get("fold"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    _layers(6).save_pretrained(root / "llama")
    tokenizer().save_pretrained(root / "llama")
    return root / "llama"


def test_cli_heal_with_a_plan(folder, tmp_path, capsys):
    out = tmp_path / "healed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(
            ["heal", str(folder), "--plan", "0,1,4,5", "-o", str(out), "--blocks", "2", "--seq-len", "8", "--json"]
        )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["plan"] == "0,1,4,5" and summary["method"] == "fold" and summary["folds"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 4
    # the output folder is checked before anything runs
    assert main(["heal", str(folder), "--plan", "0,1,4,5", "-o", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_cli_prune_with_heal(folder, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = main(
        ["prune", str(folder), "--remove", "2", "--scorer", "block_influence", "--heal", "fold", "-o", str(out)]
        + ["--blocks", "2", "--seq-len", "8"]
    )
    assert rc == 0
    assert "healed by fold" in capsys.readouterr().out
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_distill_is_registered_as_a_healer():
    from depthprune.registry import HEALERS
    from depthprune.static.heal import distill, list_healers

    assert HEALERS.get("distill") is distill.HEALER and "distill" in list_healers()


def test_cli_heal_with_a_chain_and_stage_options(folder, tmp_path, capsys):
    out = tmp_path / "chained"
    args = ["heal", str(folder), "--plan", "0,1,4,5", "--method", "fold+distill", "--json", "-o", str(out)]
    args += ["--blocks", "2", "--seq-len", "8", "--option", "distill.max_tokens=8", "--option", "distill.lr=0.001"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "fold+distill"
    assert [s["method"] for s in summary["stages"]] == ["fold", "distill"] and summary["stages"][1]["tokens"] == 8
    # an option that names no stage in a chain: a clear error, nothing written
    bad = tmp_path / "bad"
    assert main([*args[:8], str(bad), "--option", "lr=0.1"]) == 2
    assert "names its stage" in capsys.readouterr().err and not bad.exists()
