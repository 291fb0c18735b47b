"""Replacement-layer healing (static/heal/replace.py) on tiny random models: at zero steps it is the pruned plan with
the init layer in place, training lowers the MSE of that layer on the calibration activations, the input model is
left alone, the export reloads in a fresh process without depthprune, bad input gets a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import VOCAB, build, build_gemma3_sliding, tokenizer

from depthprune.adapters.registry import get_adapter
from depthprune.cli.main import main, parse_options
from depthprune.plan import LayerPlan
from depthprune.registry import HEALERS
from depthprune.static.apply import apply_plan
from depthprune.static.export import save_model
from depthprune.static.heal import heal
from depthprune.static.heal.replace import HEALER, replace_heal, replacement_plan


def deep(name: str = "llama", n: int = 6):
    case = build(name)
    config = case.config
    config.num_hidden_layers = n
    if getattr(config, "layer_types", None):
        config.layer_types = (list(config.layer_types) * n)[:n]
    torch.manual_seed(0)
    return type(case)(config).eval()


def batches(n=3, rows=2, seq=9, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (rows, seq), generator=g) for _ in range(n)]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def layer_outputs(model, ids) -> list[torch.Tensor]:
    """Each layer's output hidden state [batch, seq, hidden] in the model's own forward (hooks, not the runner)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model, adapter.present_stacks(model)[-1])
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
             for m in layers]  # fmt: skip
    try:
        logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def mse(healed, model, position: int, stop: int, data) -> float:
    """MSE of the healed model's layer at `position` against the untouched model's h_stop (output of layer stop-1)."""
    errs = [(layer_outputs(healed, b)[position] - layer_outputs(model, b)[stop - 1]).pow(2).mean() for b in data]
    return float(torch.stack(errs).mean())


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("name", "plan", "init", "executed"),
    [
        ("llama", "0,1,4,5", "first", "0,1,2,4,5"),
        ("llama", "0,4", "last", "0,3,4,5"),  # two runs: [1, 4) and [5, 6), the last layer of each
        ("gpt_neox", "0,1,4,5", 1, "0,1,3,4,5"),
        ("gpt2", "0,1", [3], "0,1,3"),  # a run at the end of the stack
    ],
)
def test_zero_steps_is_the_plan_with_the_init_layer_in_place(name, plan, init, executed):
    model = deep(name)
    result = replace_heal(model, plan, batches(), init=init, epochs=0)
    assert LayerPlan.parse(result.executed_plan) == LayerPlan({"decoder": [int(i) for i in executed.split(",")]})
    assert type(result.model) is type(model)
    ids = batches(1, seq=7, seed=5)[0]
    assert torch.equal(logits(result.model, ids), logits(apply_plan(model, executed), ids))
    assert result.layers == {"decoder": len(executed.split(","))}
    assert all(r.steps == 0 and r.mse_after == r.mse_before for r in result.replacements)
    assert result.model.config.depthprune_healing["method"] == "replace"


@pytest.mark.parametrize(("name", "plan"), [("llama", "0,1,4,5"), ("gpt2", "0,1,2,3")])
def test_training_lowers_the_mse_and_leaves_the_input_alone(name, plan):
    model = deep(name)
    before, config = state(model), model.config.to_dict()
    data = batches(4)
    result = replace_heal(model, plan, data, epochs=6, lr=3e-3, batch_size=2, progress=False)
    (rep,) = result.replacements
    start = rep.start
    untrained = apply_plan(model, result.executed_plan)
    measured = mse(result.model, model, rep.position, rep.stop, data)
    assert measured < 0.7 * mse(untrained, model, rep.position, rep.stop, data)
    assert rep.mse_after == pytest.approx(measured, rel=1e-4) and rep.mse_before > rep.mse_after
    assert rep.steps == 6 * 4 and rep.tokens == 6 * 8 * 9 and rep.init_layer == start
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.to_dict() == config
    # only the replacement layer changed
    healed, untrained_state = result.model.state_dict(), untrained.state_dict()
    changed = {k.split(f".{rep.position}.")[0] + f".{rep.position}" for k in healed
               if not torch.equal(healed[k], untrained_state[k])}  # fmt: skip
    assert len(changed) == 1


def test_runs_are_fitted_in_order_and_streaming_gives_the_cached_result():
    model = deep("llama")
    kw = dict(epochs=2, lr=3e-3, batch_size=2, progress=False)
    cached = replace_heal(model, "0,3,5", batches(), **kw)
    streamed = replace_heal(model, "0,3,5", batches(), cache_mb=0, **kw)
    a, b = state(cached.model), state(streamed.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert [(r.start, r.stop, r.position) for r in cached.replacements] == [(1, 3, 1), (4, 5, 3)]
    # sequential: the second run's input comes from the model healed so far, so its starting error differs from the
    # one measured on the untouched model's inputs
    apart = replace_heal(model, "0,3,5", batches(), sequential=False, **kw)
    assert apart.replacements[0].mse_before == pytest.approx(cached.replacements[0].mse_before)
    assert apart.replacements[1].mse_before != pytest.approx(cached.replacements[1].mse_before, rel=1e-6)


def test_the_cosine_loss_trains_towards_the_direction():
    model = deep("llama")
    kw = dict(epochs=3, lr=3e-3, batch_size=2, progress=False)
    cosine = replace_heal(model, "0,1,4,5", batches(), loss="cosine", **kw)
    plain = replace_heal(model, "0,1,4,5", batches(), **kw)
    assert cosine.loss == "cosine" and cosine.model.config.depthprune_healing["loss"] == "cosine"
    assert cosine.replacements[0].history[0] < 1 and cosine.replacements[0].history != plain.replacements[0].history
    a, b = state(cosine.model), state(plain.model)
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_the_position_keeps_the_init_layers_attention_type():
    model = build_gemma3_sliding()
    types = list(model.config.get_text_config().layer_types)
    n = len(types)
    first_full = types.index("full_attention")
    assert 0 < first_full < n - 1  # a run across a sliding -> full boundary
    plan = ",".join(str(i) for i in range(n) if i not in (first_full - 1, first_full))
    for init, k in (("first", first_full - 1), ("last", first_full)):
        result = replace_heal(model, plan, batches(seq=12), init=init, epochs=0)
        (rep,) = result.replacements
        assert rep.init_layer == k and rep.layer_type == types[k]
        assert result.model.config.get_text_config().layer_types[rep.position] == types[k]
        ids = batches(1, seq=12, seed=5)[0]
        executed = apply_plan(model, result.executed_plan)
        assert torch.equal(logits(result.model, ids), logits(executed, ids))


FRESH = r"""
import sys, torch, transformers
for folder in sys.argv[1:]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.load(folder + "/ids.pt")
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, folder + "/fresh.pt")
    print(folder, "depthprune" in sys.modules)
"""


def test_export_reloads_in_a_fresh_process_without_depthprune(tmp_path):
    folders, expected = [], []
    ids = batches(1, seq=7, seed=5)[0]
    for name in ("llama", "gpt2"):
        model = deep(name)
        healed = HEALER(model, "0,1,4,5", batches(), epochs=2, lr=3e-3)
        out = save_model(healed, tmp_path / name)
        torch.save(ids, out / "ids.pt")
        folders.append(str(out))
        expected.append(logits(healed, ids))
        assert json.loads((out / "config.json").read_text())["depthprune_healing"]["method"] == "replace"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", FRESH, *folders], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split().count("False") == 2  # depthprune never imported there
    for folder, want in zip(folders, expected, strict=True):
        torch.testing.assert_close(torch.load(f"{folder}/fresh.pt"), want, rtol=1e-5, atol=1e-5)


def test_bad_input_gets_a_clear_error_and_writes_nothing(tmp_path):
    model = deep("llama")
    out = tmp_path / "never"
    cases = [
        ("0,1,4,5", [], {}, "no calibration batches"),
        ("0-5", batches(), {}, "removes no layer"),
        ("0,2,1,5", batches(), {}, "only remove layers"),
        ("0,1,1,5", batches(), {}, "only remove layers"),
        ("0,1,4,5", batches(), {"init": "middle"}, "init must be one of"),
        ("0,1,4,5", batches(), {"init": 2}, "position inside each run"),
        ("0,4", batches(), {"init": [2]}, "one source layer index per run"),
        ("0,1,4,5", batches(), {"init": [5]}, "not in the removed run"),
        ("0,1,4,5", batches(), {"loss": "l1"}, "loss must be one of"),
        ("0,1,4,5", batches(), {"max_tokens": 3}, "less than one calibration block"),
        ("0,1,4,5", [torch.ones(2, 5, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)], {}, "one seq length"),
    ]
    for plan, data, options, message in cases:
        with pytest.raises(ValueError, match=message):
            replace_heal(model, plan, data, output_dir=out, **options)
        assert not out.exists()
    with pytest.raises(ValueError, match=r"no option\(s\) \['bogus'\].*init"):
        heal(model, "0,1,4,5", batches(), method="replace", bogus=1)
    with pytest.raises(ValueError, match="relative position bias"):
        replacement_plan(build("t5"), "encoder=0;decoder=0")


def test_resume_loads_finished_runs_and_trains_the_rest(tmp_path):
    model = deep("llama")
    kw = dict(epochs=2, lr=3e-3, batch_size=2, progress=False, output_dir=tmp_path / "a")
    full = replace_heal(model, "0,3,5", batches(), **kw)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["run-decoder-1-3", "run-decoder-4-5"]
    import shutil

    shutil.rmtree(tmp_path / "a" / "run-decoder-4-5")
    again = replace_heal(model, "0,3,5", batches(), resume=True, **kw)
    assert again.replacements[0].history == [] and len(again.replacements[1].history) == 6  # loaded, then trained
    a, b = state(full.model), state(again.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    with pytest.raises(FileExistsError, match="not empty"):
        replace_heal(model, "0,3,5", batches(), **kw)


def test_registered_and_reachable_from_the_cli(tmp_path, capsys):
    assert HEALERS.get("replace") is HEALER
    folder = tmp_path / "tiny"
    deep("llama").save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    out = tmp_path / "healed"
    base = ["heal", str(folder), "--method", "replace", "--plan", "0,1,4,5", "--blocks", "2", "--seq-len", "8"]
    assert main([*base, "-o", str(out), "--option", "bogus=1"]) == 2
    assert "no option(s) ['bogus']" in capsys.readouterr().err and not out.exists()
    rc = main([*base, "-o", str(out), "--json", "--option", "epochs=1", "--option", "init=last", "--option", "lr=1e-3"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "replace" and summary["init"] == "last"
    assert [r["init_layer"] for r in summary["replacements"]] == [3] and summary["replacements"][0]["steps"] == 1
    assert parse_options(["a=1", "b=0.5", "c=true", "d=none", "e=last"]) == {
        "a": 1, "b": 0.5, "c": True, "d": None, "e": "last"
    }  # fmt: skip
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["epochs"])
    assert main(["prune", str(folder), "--plan", "0,1,4,5", "-o", str(tmp_path / "p"), "--option", "epochs=1"]) == 2
    assert "needs --heal" in capsys.readouterr().err
