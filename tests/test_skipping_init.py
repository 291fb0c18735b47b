"""Static-importance router init (`train-router --init static`): untrained routers run exactly the static plan of the
same depth (teacher forced, decoders and encoders, batch 1 and 4 with padding); the rank map of scores to biases;
save/load keeps the init; clear errors."""

import pytest
import torch
from tiny_models import build, input_ids, inputs

from depthprune.errors import RouterError
from depthprune.plan import LayerPlan
from depthprune.skipping.dense import routed_pass
from depthprune.skipping.inference import skip_generate
from depthprune.skipping.init import rank_biases, static_init
from depthprune.skipping.io import load_routers, save_routers
from depthprune.skipping.routers import build_routers
from depthprune.skipping.train import init_batches, train_routers
from depthprune.static.apply import apply_plan
from depthprune.static.scorers import get_scorer

ALL = (0, 1, 2, 3)
DATA = torch.randint(3, 99, (8, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("target", [3.0, 2.0])
@pytest.mark.parametrize("batch", [1, 4])
def test_untrained_static_init_is_the_static_plan(target, batch):
    model = build("llama")
    res = train_routers(model, DATA, target_layers=target, layers=ALL, init="static", epochs=0, progress=False,
                        sink_tokens=0)  # fmt: skip
    removed = get_scorer("block_influence")(model, init_batches(DATA, 64), n_remove=round(4 - target)).remove
    assert res.init_removed == list(removed) and res.routers.config.init == "static"
    pruned = apply_plan(model, LayerPlan.drop({"decoder": 4}, list(removed)))
    ids, mask = input_ids(batch=batch, seq=7)
    out = routed_pass(model, res.routers, ids, mask, threshold=0.5)
    with torch.no_grad():
        want = pruned(input_ids=ids, attention_mask=mask, use_cache=False).logits
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(out.logits, want)
    assert not torch.equal(out.logits, full)  # the plan changes the output: the equality says something
    assert torch.equal(out.executed, torch.full_like(out.executed, target))


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
@pytest.mark.parametrize("batch", [1, 4])
def test_untrained_static_init_generates_the_static_plan(batch, kv):
    """With a routed prefill, routed generation is the pruned model's greedy generation, token for token (a
    left-padded row at batch 4); threshold 0 with a routed prefill is still plain greedy."""
    model = build("llama")
    res = train_routers(model, DATA, target_layers=2.0, layers=ALL, init="static", epochs=0, progress=False,
                        sink_tokens=0)  # fmt: skip
    pruned = apply_plan(model, LayerPlan.drop({"decoder": 4}, res.init_removed))
    ids, mask = input_ids(batch=batch, seq=6)
    for m, t in ((pruned, 0.5), (model, 0.0)):
        with torch.no_grad():
            want = m.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, eos_token_id=None)
        out = skip_generate(model, res.routers, ids, mask, threshold=t, max_new_tokens=6, kv=kv, prefill="routed",
                            eos_token_id=())  # fmt: skip
        assert torch.equal(out.sequences, want)
        assert torch.equal(out.executed, torch.full_like(out.executed, 2 if t else 4))
    with pytest.raises(RouterError, match="unknown prefill"):
        skip_generate(model, res.routers, ids, mask, max_new_tokens=2, prefill="half")


@pytest.mark.parametrize("batch", [1, 4])
def test_encoder_static_init_is_the_static_plan(batch):
    model = build("bert")
    kw = inputs("bert", batch=4)
    data = (kw["input_ids"], kw["attention_mask"])
    opts = static_init(model, init_batches(data, 64), 2.0, layers=ALL)
    routers = build_routers(model, target_layers=2.0, **opts)
    pruned = apply_plan(model, LayerPlan.drop({"encoder": 4}, list(opts["init_removed"])))
    ids, mask = kw["input_ids"][:batch], kw["attention_mask"][:batch]
    out = routed_pass(model, routers, ids, mask, threshold=0.5)
    with torch.no_grad():
        want = pruned(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out.logits, want)


def test_rank_map_and_save_load(tmp_path):
    assert rank_biases([5, 2, 9]) == {5: 1.0, 2: 2.5, 9: 4.0}
    model = build("llama")
    opts = static_init(model, init_batches(DATA, 64), 2.0, layers=ALL)
    scores = get_scorer("block_influence")(model, init_batches(DATA, 64), n_remove=2).scores
    biases = dict(zip(ALL, opts["init_biases"], strict=True))
    kept = [i for i in ALL if i not in opts["init_removed"]]
    # kept layers positive, removed negative; the nearer a layer's score is to the cut, the smaller |bias|
    assert all(biases[i] > 0 for i in kept) and all(biases[i] < 0 for i in opts["init_removed"])
    lo, hi = sorted(kept, key=lambda i: scores[i])
    assert biases[lo] == 1.0 and biases[hi] == 4.0
    routers = build_routers(model, target_layers=2.0, **opts)
    save_routers(routers, tmp_path / "r")
    back = load_routers(tmp_path / "r", model)
    assert back.config == routers.config
    pairs = zip(routers.state_dict().values(), back.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_static_init_errors():
    model = build("llama")
    batches = init_batches(DATA, 64)
    removed = static_init(model, batches, 3.0, layers=ALL)["init_removed"]
    others = tuple(i for i in ALL if i not in removed)
    with pytest.raises(RouterError, match="which have no router"):
        static_init(model, batches, 3.0, layers=others)
    # layers not given: the default ones (1, 2 of 4) and whatever the plan removes
    assert set(static_init(model, batches, 3.0)["layers"]) == {1, 2, *removed}
    with pytest.raises(RouterError, match="removes no layer"):
        static_init(model, batches, 4.0, layers=ALL)
    with pytest.raises(RouterError, match="unknown router init"):
        train_routers(model, DATA, target_layers=3.0, init="nope", epochs=0, progress=False)
    with pytest.raises(RouterError, match="needs init_biases"):
        build_routers(model, init="static")


def healed(model, removed=(1,)):
    """A pruned model of `model` whose kept layers, final norm and head moved as healing moves them."""
    pruned = apply_plan(model, LayerPlan.drop({"decoder": 4}, list(removed)))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pruned.named_parameters():
            if "layers." in name or "norm" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return pruned


@pytest.mark.parametrize("batch", [1, 4])
def test_healed_start_untrained_routers_compute_the_pruned_model(batch, tmp_path):
    """--start: untrained routers on the start's routed model compute exactly what the (healed) pruned model
    computes, teacher forced and in generation; neither given model is modified; the routed model is saved."""
    model = build("llama")
    pruned = healed(model)
    before = [[p.clone() for p in m.parameters()] for m in (model, pruned)]
    res = train_routers(model, DATA, target_layers=3.0, layers=ALL, start=pruned, epochs=0, progress=False,
                        sink_tokens=0, output_dir=tmp_path / "o")  # fmt: skip
    for m, b in zip((model, pruned), before, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(b, m.parameters(), strict=True))
    assert res.init_removed == [1] and res.routers.config.init == "static" and res.start is not None
    ids, mask = input_ids(batch=batch, seq=7)
    out = routed_pass(res.model, res.routers, ids, mask, threshold=0.5)
    with torch.no_grad():
        want = pruned(input_ids=ids, attention_mask=mask, use_cache=False).logits
        unhealed = apply_plan(model, LayerPlan.drop({"decoder": 4}, [1]))(input_ids=ids, attention_mask=mask,
                                                                           use_cache=False).logits  # fmt: skip
        gen = pruned.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=5, eos_token_id=None)
    assert torch.equal(out.logits, want) and not torch.equal(want, unhealed)
    got = skip_generate(res.model, res.routers, ids, mask, threshold=0.5, max_new_tokens=5, prefill="routed",
                        eos_token_id=())  # fmt: skip
    assert torch.equal(got.sequences, gen)
    back = type(model).from_pretrained(tmp_path / "o")  # the routed model beside the routers
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), res.model.parameters(), strict=True))
    assert load_routers(tmp_path / "o", back).config.init_removed == (1,)
    layers = res.model.model.layers  # the removed layer keeps the untouched model's weights
    assert all(torch.equal(a, b) for a, b in zip(layers[1].parameters(), model.model.layers[1].parameters(),
                                                  strict=True))  # fmt: skip


def test_healed_start_trains_and_errors(tmp_path):
    model = build("llama")
    pruned = healed(model, (1, 2))
    res = train_routers(model, DATA, target_layers=2.0, layers=ALL, start=pruned, epochs=1, lr=0.05, batch_size=4,
                        lora_rank=2, progress=False)  # fmt: skip
    assert res.init_removed == [1, 2] and type(res.model) is type(model)
    with pytest.raises(RouterError, match="records no layer plan"):
        train_routers(model, DATA, target_layers=3.0, start=model, epochs=0, progress=False)
    with pytest.raises(RouterError, match="use init static"):
        train_routers(model, DATA, target_layers=3.0, start=pruned, init="uniform", epochs=0, progress=False)
    with pytest.raises(RouterError, match="kept ones once, in order"):
        train_routers(model, DATA, target_layers=3.0, start=apply_plan(model, LayerPlan({"decoder": (0, 2, 1, 3)})),
                      epochs=0, progress=False)  # fmt: skip
    with pytest.raises(RouterError, match="must be a LlamaForCausalLM"):
        other = build("qwen2")
        train_routers(model, DATA, target_layers=3.0, start=apply_plan(other, LayerPlan.drop({"decoder": 4}, [1])),
                      epochs=0, progress=False)  # fmt: skip
