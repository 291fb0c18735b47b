"""Distillation healing (static/heal/distill.py) on tiny random Llamas: neutral at the start, lowers the KL, leaves
the input alone, returns a plain HF model that reloads, refuses bad input, resumes exactly."""

import shutil

import pytest
import torch
import transformers
from tiny_models import VOCAB, build

from depthprune.static.apply import apply_plan
from depthprune.static.heal.distill import HEALER, distill_heal, distill_kl
from depthprune.training import latest_checkpoint

PLAN = "0,1,3"


def batches(n=3, rows=4, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (rows, seq), generator=g) for _ in range(n)]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_before_any_step_the_healed_model_is_the_pruned_model():
    model = build("llama")
    healed = HEALER(model, PLAN, batches(), epochs=0)
    ids = batches(1)[0]
    assert torch.allclose(healed(input_ids=ids).logits, apply_plan(model, PLAN)(input_ids=ids).logits, atol=1e-6)


def test_a_few_steps_lower_the_kl_and_leave_the_input_untouched():
    model = build("llama")
    before = state(model)
    data = batches()
    result = distill_heal(model, PLAN, data, epochs=8, lr=1e-2, nll_weight=0.0, lora_rank=4)
    assert distill_kl(result.model, model, data) < 0.7 * distill_kl(apply_plan(model, PLAN), model, data)
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert result.tokens == 8 * 12 * 8 and result.steps == 8 * 3
    assert set(result.epoch_losses[0]) >= {"loss", "kl", "nll"}


def test_token_budget_stops_early():
    result = distill_heal(build("llama"), PLAN, batches(), epochs=10, lr=1e-3, batch_size=2, max_tokens=5 * 8)
    assert result.tokens == 5 * 8 and result.steps == 3
    with pytest.raises(ValueError, match="less than one calibration block"):
        distill_heal(build("llama"), PLAN, batches(), max_tokens=3)


def test_the_result_is_a_plain_hf_model_that_reloads(tmp_path):
    model = build("llama")
    healed = HEALER(model, PLAN, batches(), epochs=2, lr=1e-2)
    assert type(healed) is type(model)
    assert not any("lora" in name for name, _ in healed.named_modules())
    assert healed.config.num_hidden_layers == 3
    healed.save_pretrained(tmp_path / "m")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = batches(1)[0]
    assert torch.allclose(again(input_ids=ids).logits, healed(input_ids=ids).logits, atol=1e-5)


def test_bad_input_gets_a_clear_error():
    model = build("llama")
    with pytest.raises(ValueError, match="calibration batches"):
        HEALER(model, PLAN, [])
    with pytest.raises(ValueError, match="one seq length"):
        HEALER(model, PLAN, [torch.ones(2, 5, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)])
    with pytest.raises(ValueError, match="targets"):
        HEALER(model, PLAN, batches(), targets=("nope",))
    with pytest.raises(ValueError, match="nothing to heal"):
        HEALER(model, "0-3", batches())
    with pytest.raises(ValueError, match="repeats a layer"):
        HEALER(model, "0,1,1,3", batches())


def test_resume_after_an_interruption_gives_the_uninterrupted_result(tmp_path):
    kw = dict(lora_rank=2, epochs=2, lr=1e-2, batch_size=4, progress=False)
    full = distill_heal(build("llama"), PLAN, batches(), output_dir=tmp_path / "a", checkpoint_every=2, **kw)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-0000004", tmp_path / "b" / "checkpoints" / "step-0000004")
    assert latest_checkpoint(tmp_path / "b").name == "step-0000004"  # mid second epoch (3 batches an epoch)
    resumed = distill_heal(build("llama"), PLAN, batches(), output_dir=tmp_path / "b", resume=True, **kw)
    assert resumed.history == pytest.approx(full.history, rel=1e-5)
    a, b = state(full.model), state(resumed.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_fold_then_distill_starts_from_the_fold():
    from depthprune.static.heal import heal
    from depthprune.static.heal.fold import fold

    model = build("llama")
    data = batches()
    folded = fold(model, PLAN, data).model
    ids = batches(1)[0]
    chained = heal(model, PLAN, data, "fold+distill", **{"distill.epochs": 0})
    assert torch.allclose(chained(input_ids=ids).logits, folded(input_ids=ids).logits, atol=1e-6)
    options = {"distill.epochs": 4, "distill.lr": 1e-3, "distill.nll_weight": 0.0}
    trained = heal(model, PLAN, data, "fold+distill", **options)
    assert distill_kl(trained, model, data) < distill_kl(folded, model, data)
    record = trained.config.depthprune_healing
    assert record["method"] == "fold+distill" and [s["method"] for s in record["stages"]] == ["fold", "distill"]


def test_a_chain_names_each_option_and_every_stage_must_exist():
    from depthprune.static.heal import stage_options

    assert stage_options("fold+distill", {"distill.lr": 1e-3}) == [("fold", {}), ("distill", {"lr": 1e-3})]
    with pytest.raises(ValueError, match="names its stage"):
        stage_options("fold+distill", {"lr": 1e-3})
    with pytest.raises(ValueError, match="unknown healing method 'nope'"):
        stage_options("fold+nope", {})
    with pytest.raises(ValueError, match="cannot follow another stage"):
        stage_options("distill+fold", {})  # refused before any work
    with pytest.raises(ValueError, match="'replace' cannot follow another stage"):
        stage_options("fold+replace", {})
    with pytest.raises(ValueError, match="start must be a"):
        distill_heal(build("llama"), PLAN, batches(), start=build("llama"))
