"""Per-sub-layer layer skipping (router kind token_sublayer: one gate for a layer's attention, one for its MLP) on tiny
random models: routers that never skip give plain greedy decoding; real skipping with a KV cache (both strategies)
gives the tokens that greedy decoding by the teacher-forced routed pass (no cache: every entry computed from the
state entering its layer) gives, at batch 1 and batched with padding; depth counts each part by its share; the static
init runs the static plan exactly; training, save/load and the clear errors."""

import pytest
import torch
from tiny_models import build, build_gemma3_sliding, input_ids, randomize_routers

from depthprune.errors import RouterError
from depthprune.registry import ROUTER_KINDS
from depthprune.runner import capture_stack
from depthprune.skipping.dense import routed_pass
from depthprune.skipping.inference import skip_generate
from depthprune.skipping.init import sublayer_plan, sublayer_scores
from depthprune.skipping.io import load_routers, save_routers
from depthprune.skipping.routers import build_routers
from depthprune.skipping.train import init_batches, train_routers
from depthprune.static.apply import apply_plan
from depthprune.sublayers import part_shares


def randomized(model, seed=0, std=2.0):
    return randomize_routers(build_routers(model, "token_sublayer"), seed, std)


def model_of(name):
    return build_gemma3_sliding() if name == "gemma3_sliding" else build(name)


def dense_greedy(model, routers, ids, n, threshold=0.5):
    """Greedy decoding by the teacher-forced routed pass over the whole sequence at each step (no KV cache)."""
    seq = ids
    for _ in range(n):
        with torch.no_grad():
            logits = routed_pass(model, routers, seq, threshold=threshold).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def test_registered_with_one_gate_per_part():
    model = build("llama")
    routers = build_routers(model, "token_sublayer")
    assert "token_sublayer" in ROUTER_KINDS and routers.parts == ("attention", "mlp")
    assert sorted(routers.gates) == sorted(f"{i}_{p}" for i in (1, 2) for p in ("attention", "mlp"))


@pytest.mark.parametrize("name", ["llama", "gemma3_sliding"])
@pytest.mark.parametrize("batch", [1, 4])
def test_never_skipping_is_plain_greedy(name, batch):
    model = model_of(name)
    routers = randomized(model)
    ids, mask = input_ids(batch=batch, seq=6)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
    for kv in ("propagate", "recompute"):
        out = skip_generate(model, routers, ids, mask, threshold=0.0, max_new_tokens=8, kv=kv)
        assert torch.equal(out.sequences, ref), kv
        assert out.mean_layers() == pytest.approx(4.0)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3_sliding"])
def test_real_skipping_equals_the_routed_pass(name):
    """Tokens skip attention and MLP apart (a random pattern); with the prompt routed too, the cached generation is
    token-identical to greedy decoding by the routed pass, under both KV strategies."""
    model = model_of(name)
    routers = randomized(model, seed={"llama": 2, "qwen2": 4, "gemma3_sliding": 0}[name])  # patterns that vary by step
    ids, _ = input_ids(batch=1, seq=5)
    ref = dense_greedy(model, routers, ids, 7)
    for kv in ("propagate", "recompute"):
        out = skip_generate(model, routers, ids, max_new_tokens=7, kv=kv, prefill="routed", eos_token_id=())
        assert torch.equal(out.sequences, ref), kv
        ex = out.executed[0, 1:]
        assert len(set(ex.tolist())) > 1 and not bool((ex == ex.round()).all())  # parts skipped alone, varying


def test_batched_equals_per_row():
    model = build("llama")
    routers = randomized(model, seed=1)
    ids, mask = input_ids(batch=4, seq=6)
    out = skip_generate(model, routers, ids, mask, max_new_tokens=6, eos_token_id=())
    assert out.mean_layers(skip_first=True) < 4.0
    for r in range(4):
        alone = skip_generate(model, routers, ids[r : r + 1, mask[r].bool()], max_new_tokens=6, eos_token_id=())
        assert torch.equal(out.sequences[r, -6:], alone.sequences[0, -6:])


def test_depth_counts_each_part_by_its_share():
    model = build("llama")
    routers = build_routers(model, "token_sublayer")
    with torch.no_grad():
        for layer in (1, 2):  # every token skips the attention of the routed layers, runs their MLP
            routers.gates[f"{layer}_attention"].bias.fill_(-9.0)
    ids, _ = input_ids(batch=1, seq=5)
    share = part_shares(model.model.layers[1])["attention"]
    with torch.no_grad():
        dense = routed_pass(model, routers, ids, threshold=0.5)
    assert torch.allclose(dense.executed, torch.full_like(dense.executed, 4 - 2 * share))
    p_attn, p_mlp = torch.sigmoid(torch.tensor(-9.0)), torch.sigmoid(torch.tensor(3.0))  # weights are 0: the biases
    want = 2 + 2 * (share * p_attn + (1 - share) * p_mlp)
    assert float(dense.expected_layers()) == pytest.approx(float(want), abs=1e-5)
    out = skip_generate(model, routers, ids, max_new_tokens=4, eos_token_id=())
    assert out.executed[0, 1:].tolist() == pytest.approx([4 - 2 * share] * 3)


def test_static_init_runs_the_static_plan():
    """An untrained static-init sub-layer router skips both parts of the plan's removed layers: the pruned model."""
    model = build("llama")
    data = torch.randint(3, 99, (8, 8), generator=torch.Generator().manual_seed(0))
    from depthprune.skipping.init import static_init

    options = static_init(model, [data], 3.0)
    removed = options["init_removed"]
    routers = build_routers(model, "token_sublayer", **options)
    pruned = apply_plan(model, ",".join(str(i) for i in range(4) if i not in removed))
    with torch.no_grad():
        assert torch.equal(routed_pass(model, routers, data, threshold=0.5).logits, pruned(input_ids=data).logits)


def test_training_save_load_and_errors(tmp_path):
    model = build("llama")
    data = torch.randint(3, 99, (16, 8), generator=torch.Generator().manual_seed(0))
    res = train_routers(model, data, target_layers=3.0, kind="token_sublayer", epochs=2, lr=0.05, batch_size=8,
                        progress=False, output_dir=tmp_path / "o")  # fmt: skip
    assert abs(res.epoch_losses[-1]["metrics"]["expected_layers"] - 3.0) < 0.3
    back = load_routers(tmp_path / "o", model)
    assert back.config.kind == "token_sublayer" and back.parts == ("attention", "mlp")
    ids, mask = input_ids(batch=2, seq=6)
    a = skip_generate(model, res.routers, ids, mask, max_new_tokens=5)
    b = skip_generate(model, back, ids, mask, max_new_tokens=5)
    assert torch.equal(a.sequences, b.sequences)
    save_routers(back, tmp_path / "again")
    for other in ("phi3", "gpt2"):  # layers that do not split into attention + MLP here
        with pytest.raises(RouterError, match="sub-layers apart"):
            build_routers(build(other), "token_sublayer")
    with pytest.raises(RouterError):
        build_routers(build("bert"), "token_sublayer")  # an encoder: per-sample routers only


def test_sublayer_plan_takes_the_lowest_scores_within_the_budget():
    scores = {(0, "attention"): 0.1, (0, "mlp"): 0.5, (1, "attention"): 0.05, (1, "mlp"): 0.2, (2, "attention"): 0.3}
    shares = {"attention": 0.25, "mlp": 0.75}
    # one layer's worth: 4 attentions (only 3 here) or 1 attention + 1 MLP (the lowest of each: 0.05 + 0.2)
    assert sublayer_plan(scores, shares, 1.0, (0, 1, 2)) == [(1, "attention"), (1, "mlp")]
    assert sublayer_plan(scores, shares, 0.5, (0, 1, 2)) == [(0, "attention"), (1, "attention")]
    assert sublayer_plan(scores, shares, 0.5, (0, 2)) == [(0, "attention"), (2, "attention")]  # routed layers only
    assert sublayer_plan(scores, shares, 0.6, (0, 1, 2)) == [(0, "attention"), (1, "attention")]  # never past it


def test_sublayer_static_init_runs_its_sublayer_plan():
    """train_routers(kind="token_sublayer", init="static_parts", epochs=0): the gates start as the sub-layer plan
    (block influence of each part), so at threshold 0.5 the routed pass is the model with exactly those parts
    removed; init "static" starts them as the layer plan instead (the pruned model exactly)."""
    model = build("llama")
    data = torch.randint(3, 99, (8, 8), generator=torch.Generator().manual_seed(0))
    res = train_routers(model, data, target_layers=3.0, kind="token_sublayer", init="static_parts", epochs=0,
                        sink_tokens=0, progress=False)  # fmt: skip
    config = res.routers.config
    removed = {tuple(k.split("_")) for k in config.init_removed_parts}
    shares = part_shares(model.model.layers[0])
    assert sum(shares[p] for _, p in removed) == pytest.approx(1.0)  # the target's one layer, in sub-layers
    assert config.init_scorer == "block_influence (sub-layers)"
    scores = sublayer_scores(model, init_batches(data, 64))
    assert [(int(i), p) for i, p in sorted(removed)] == sublayer_plan(scores, shares, 1.0, tuple(range(4)))
    with torch.no_grad():
        hidden, call = capture_stack(model, {"input_ids": data, "use_cache": False})
        for layer in range(4):
            for part in ("attention", "mlp"):
                if (str(layer), part) not in removed:
                    hidden = call.run_part(hidden, layer, part)
        want = model.lm_head(model.model.norm(hidden))
        got = routed_pass(model, res.routers, data, threshold=0.5)
    assert torch.equal(got.logits, want)
    assert torch.allclose(got.executed, torch.full_like(got.executed, 3.0))
    with pytest.raises(RouterError, match="scores sub-layers with block_influence"):
        train_routers(model, data, target_layers=3.0, kind="token_sublayer", init="static_parts", scorer="sleb",
                      epochs=0, progress=False)  # fmt: skip
    with pytest.raises(RouterError, match="use it with --kind token_sublayer"):
        train_routers(model, data, target_layers=3.0, init="static_parts", epochs=0, progress=False)
    layer_plan = train_routers(model, data, target_layers=3.0, kind="token_sublayer", init="static", epochs=0,
                               progress=False, sink_tokens=0)  # fmt: skip
    pruned = apply_plan(model, ",".join(str(i) for i in range(4) if i not in layer_plan.init_removed))
    with torch.no_grad():
        assert torch.equal(routed_pass(model, layer_plan.routers, data, threshold=0.5).logits,
                           pruned(input_ids=data).logits)  # fmt: skip
