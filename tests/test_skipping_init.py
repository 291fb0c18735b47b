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
    res = train_routers(model, DATA, target_layers=target, layers=ALL, init="static", epochs=0, progress=False)
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
    res = train_routers(model, DATA, target_layers=2.0, layers=ALL, init="static", epochs=0, progress=False)
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
