"""Dynamic layer skipping on tiny random models: routers that never skip give the untouched model's output; a forced
skip pattern equals a hand computation (both KV strategies); batched equals per row; the teacher-forced routed pass
equals real skipping; save/load; training moves the depth; calibration; clear errors for bad input."""

import pytest
import torch
from tiny_models import build, build_gemma3_sliding, input_ids, inputs
from tiny_models import randomize_routers as randomize

from depthprune.errors import DepthpruneError, RouterError
from depthprune.registry import ROUTER_KINDS
from depthprune.runner import capture_stack
from depthprune.skipping.calibrate import (
    calibrate_classifier_routers,
    calibrate_generation_routers,
    check_classifier,
    check_generation,
)
from depthprune.skipping.dense import routed_pass, routed_perplexity
from depthprune.skipping.inference import RoutedClassifier, skip_generate
from depthprune.skipping.io import load_routers, save_routers
from depthprune.skipping.routers import build_routers
from depthprune.skipping.train import train_routers


class Forced:
    """Token routers that follow a fixed pattern for batch-1 generation: run[k][layer] for the k-th routed step."""

    granularity, num_layers = "token", 4

    def __init__(self, pattern):
        self.pattern, self.layers, self.step = pattern, (1, 2), -1

    def run_mask(self, layer, hidden, mask, threshold):
        if layer == 0:
            self.step += 1
        if layer not in self.layers:
            return None
        return torch.tensor([[self.pattern[self.step][layer]]])


def greedy(model, ids, mask, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3_sliding"])
@pytest.mark.parametrize("batch", [1, 4])
def test_never_skipping_is_plain_greedy(name, batch):
    """Threshold 0 runs every layer: token-identical to model.generate (Qwen 2 and Gemma 3: sliding windows shorter
    than the sequences; a left-padded row at batch 4)."""
    model = build_gemma3_sliding() if name == "gemma3_sliding" else build(name)
    routers = randomize(build_routers(model))
    ids, mask = input_ids(batch=batch, seq=6)
    ref = greedy(model, ids, mask, 8)
    for kv in ("propagate", "recompute"):
        out = skip_generate(model, routers, ids, mask, threshold=0.0, max_new_tokens=8, kv=kv)
        assert torch.equal(out.sequences, ref)
        assert out.mean_layers() == 4.0


def test_never_skipping_encoder_is_the_model():
    model = build("bert")
    routers = randomize(build_routers(model))
    assert routers.granularity == "sample"
    kw = inputs("bert", batch=3)
    with torch.no_grad():
        ref = model(**kw).logits
    out = RoutedClassifier(model, routers, threshold=0.0)(kw["input_ids"], kw["attention_mask"])
    assert torch.equal(out.logits, ref)
    assert (out.executed == 4).all()


def hand_tokens(model, prompt, pattern, n):
    """Greedy tokens by an uncached loop over the model's own layers on the whole sequence: the prompt runs every
    layer; the k-th new position runs layer l iff pattern[k][l] (unrouted layers always), a skipped layer passing its
    input on (its keys/values, seen by later positions, come from that input)."""
    seq = prompt.clone()
    for _ in range(n):
        hidden, call = capture_stack(model, {"input_ids": seq, "use_cache": False})
        for layer in range(4):
            out = call.run(hidden, layer, layer + 1)
            run = torch.ones(seq.shape[1], dtype=torch.bool)
            for k in range(seq.shape[1] - prompt.shape[1]):
                run[prompt.shape[1] + k] = pattern[k][layer] if layer in (1, 2) else True
            hidden = torch.where(run[None, :, None], out, hidden)
        from depthprune.decoding import decoder_parts

        logits = decoder_parts(model).final_logits(hidden)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_forced_pattern_equals_a_hand_computation(name):
    """Tokens skip layers 1 and/or 2 in a fixed pattern; both KV strategies give the hand computation's tokens."""
    model = build(name)
    ids, _ = input_ids(batch=1, seq=5)
    pattern = [{1: a, 2: b} for a, b in [(0, 1), (1, 0), (0, 0), (1, 1), (0, 1), (1, 0), (0, 0)]]
    ref = hand_tokens(model, ids, pattern, 7)  # position prompt_len + k follows pattern[k]
    for kv in ("propagate", "recompute"):
        out = skip_generate(model, Forced(pattern), ids, threshold=0.5, max_new_tokens=7, kv=kv, eos_token_id=())
        assert torch.equal(out.sequences, ref), kv
        assert out.executed[0, 1:].tolist() == [2 + p[1] + p[2] for p in pattern[:6]]


def test_recompute_defers_entries_until_needed(monkeypatch):
    """kv=recompute computes a skipped entry only when a later token runs that layer (the same keys/values as
    propagate, so the same tokens); entries no later token needs are never computed."""
    import depthprune.skipping.inference as inference

    model = build("llama")
    ids, _ = input_ids(batch=1, seq=5)
    pattern = [{1: 0, 2: 1}, {1: 1, 2: 1}, {1: 0, 2: 1}]
    real, calls, outs = inference.propagate, [], {}

    def counted(*args, **kwargs):
        calls.append(args[1])  # the layer
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "propagate", counted)
    for kv in ("propagate", "recompute"):
        calls.clear()
        outs[kv] = (skip_generate(model, Forced(pattern), ids, max_new_tokens=4, kv=kv, eos_token_id=()), len(calls))
    assert torch.equal(outs["propagate"][0].sequences, outs["recompute"][0].sequences)
    # two tokens skipped layer 1: propagate computes both entries at once; recompute fills the first when the next
    # token runs layer 1, and never the last
    assert outs["propagate"][1] == 2 and outs["recompute"][1] == 1


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_batched_equals_per_row_and_dense(name):
    model = build(name)
    routers = randomize(build_routers(model), std=3.0)
    ids, mask = input_ids(batch=4, seq=6)
    out = skip_generate(model, routers, ids, mask, threshold=0.5, max_new_tokens=6, eos_token_id=())
    assert out.mean_layers(skip_first=True) < 4.0  # something was skipped
    for r in range(4):
        alone = skip_generate(
            model, routers, ids[r : r + 1, mask[r].bool()], threshold=0.5, max_new_tokens=6, eos_token_id=()
        )
        assert torch.equal(out.sequences[r, -6:], alone.sequences[0, -6:])
    # layer_rows counts, per decode step and layer, the rows that computed it: summed over layers, the executed
    # layers of that step's tokens (the token written after step s is executed[:, s + 1])
    assert len(out.layer_rows) == 5 and all(len(c) == 4 for c in out.layer_rows)
    assert [sum(c) for c in out.layer_rows] == out.executed[:, 1:].sum(0).tolist()
    assert any(0 < n < 4 for c in out.layer_rows for n in c)  # some layers ran for part of the batch
    # the teacher-forced routed pass (prompt routed too) is what real skipping computes with a routed prefill
    row = out.sequences[1:2]
    dense = routed_pass(model, routers, row, threshold=0.5)
    again = routed_pass(model, routers, row[:, :-1], threshold=0.5)
    assert torch.allclose(dense.logits[:, :-1], again.logits, atol=1e-5)  # causal: a later token changes nothing


def test_encoder_batched_equals_per_row_and_dense():
    model = build("bert")
    routers = randomize(build_routers(model), std=3.0)
    kw = inputs("bert", batch=4)
    clf = RoutedClassifier(model, routers, threshold=0.5)
    out = clf(kw["input_ids"], kw["attention_mask"])
    assert out.executed.float().mean() < 4
    dense = routed_pass(model, routers, kw["input_ids"], kw["attention_mask"], threshold=0.5)
    assert torch.allclose(out.logits, dense.logits, atol=1e-5)
    assert torch.equal(out.executed, dense.executed.long())
    for r in range(4):
        one = clf(kw["input_ids"][r : r + 1], kw["attention_mask"][r : r + 1])
        assert torch.allclose(one.logits[0], out.logits[r], atol=1e-5)


def test_save_load_round_trip_and_other_model(tmp_path):
    model = build("llama")
    routers = randomize(build_routers(model))
    save_routers(routers, tmp_path / "r")
    back = load_routers(tmp_path / "r", model)
    ids, mask = input_ids(batch=2, seq=6)
    a = skip_generate(model, routers, ids, mask, max_new_tokens=5)
    b = skip_generate(model, back, ids, mask, max_new_tokens=5)
    assert torch.equal(a.sequences, b.sequences)
    with pytest.raises(DepthpruneError):
        save_routers(routers, tmp_path / "r")  # no overwrite
    with pytest.raises(RouterError, match="another llama checkpoint"):
        load_routers(tmp_path / "r", build("llama", seed=1))
    with pytest.raises(RouterError, match="built for a llama"):
        load_routers(tmp_path / "r", build("qwen2"))


def test_bad_input_gets_clear_errors():
    model = build("llama")
    routers = build_routers(model)
    ids, mask = input_ids(batch=1, seq=4)
    for t in (-0.1, 1.5):
        with pytest.raises(RouterError, match=r"outside \[0, 1\]"):
            skip_generate(model, routers, ids, threshold=t, max_new_tokens=2)
    with pytest.raises(RouterError, match="target depth 1.0 out of range"):
        train_routers(model, ids, target_layers=1.0)
    with pytest.raises(RouterError, match="target depth 5.0 out of range"):
        train_routers(model, ids, target_layers=5.0)
    with pytest.raises(RouterError, match="out of range"):
        build_routers(model, layers=[4])
    with pytest.raises(RouterError, match="per-token"):
        skip_generate(model, build_routers(build("bert")), ids, max_new_tokens=2)
    assert set(ROUTER_KINDS) >= {"token_linear", "sample_linear"}


def test_training_moves_the_depth_to_the_target(tmp_path):
    model = build("llama")
    before = [p.clone() for p in model.parameters()]
    data = torch.randint(3, 99, (16, 8), generator=torch.Generator().manual_seed(0))
    res = train_routers(
        model, data, target_layers=3.0, epochs=2, lr=0.05, batch_size=8, progress=False, output_dir=tmp_path / "o"
    )
    last = res.epoch_losses[-1]["metrics"]
    assert abs(last["executed"] - 3.0) < 0.3  # the compute term counts the gates the forward ran (compute_on="gates")
    with pytest.raises(RouterError, match="compute_on must be one of gates, probs"):
        train_routers(model, data, target_layers=3.0, compute_on="expected", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # the model is untouched
    back = load_routers(tmp_path / "o", model)
    assert back.config.target_layers == 3.0 and back.config.sink_tokens == 1  # the sink guard is on by default
    assert (tmp_path / "o" / "router_train_log.json").is_file()


def test_lora_training_adapts_a_copy_and_saves_it_beside_the_routers(tmp_path):
    """lora_rank > 0: the routers train with LoRA on a copy, merged into res.model (a plain model of the same class,
    saved beside the routers); the given model is untouched; routed_perplexity's agreement is against `reference`."""
    model = build("llama")
    before = [p.clone() for p in model.parameters()]
    data = torch.randint(3, 99, (16, 8), generator=torch.Generator().manual_seed(0))
    res = train_routers(model, data, target_layers=3.0, epochs=2, lr=0.05, batch_size=8, lora_rank=2, lora_lr=0.3,
                        progress=False, output_dir=tmp_path / "o")  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert type(res.model) is type(model) and res.lora_rank == 2
    changed = [n for (n, a), b in zip(res.model.named_parameters(), model.parameters(), strict=True)
               if not torch.equal(a, b)]  # fmt: skip
    assert changed and all("proj" in n for n in changed)  # LoRA merged into the projections, nothing else moved
    back = type(model).from_pretrained(tmp_path / "o")
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), res.model.parameters(), strict=True))
    blocks = data[:4]
    own = routed_perplexity(res.model, res.routers, blocks, 0.0)  # threshold 0: every layer runs
    vs_original = routed_perplexity(res.model, res.routers, blocks, 0.0, reference=model)
    assert own["agreement"] == 1.0 and own["ppl"] == vs_original["ppl"]
    with torch.no_grad():
        want = (res.model(input_ids=blocks).logits.argmax(-1) == model(input_ids=blocks).logits.argmax(-1)).float()
    assert vs_original["agreement"] == pytest.approx(float(want.mean()))
    assert vs_original["agreement"] < 1.0  # the copy's greedy tokens moved: the reference matters


def test_calibration_certifies_and_checks():
    model = build("llama")
    routers = randomize(build_routers(model), std=3.0)
    prompts = torch.randint(3, 99, (12, 5), generator=torch.Generator().manual_seed(2))
    cal = calibrate_generation_routers(
        model, routers, prompts, delta=0.3, epsilon=0.2, max_new_tokens=4, grid=[0.0, 0.5, 0.99], eos_token_id=()
    )
    assert cal.table[0]["threshold"] == 0.0 and cal.table[0]["risk"] == 0.0  # every layer: the untouched model
    assert cal.threshold is not None and "Learn-then-Test" in cal.guarantee()
    held = check_generation(model, routers, prompts, cal.threshold, max_new_tokens=4, eos_token_id=())
    assert held["tokens"] == 1.0 if cal.threshold == 0.0 else 0.0 <= held["tokens"] <= 1.0
    enc = build("bert")
    er = randomize(build_routers(enc), std=3.0)
    ids, mask = input_ids(batch=16, seq=6, pad_first_row=0)
    labels = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(3))
    ec = calibrate_classifier_routers(enc, er, ids, mask, labels, delta=0.5, epsilon=0.2, grid=[0.0, 0.5])
    assert ec.table[0]["risk"] == 0.0 and ec.threshold is not None
    ch = check_classifier(enc, er, ids, mask, labels, ec.threshold)
    assert ch["accuracy_drop"] <= 1.0 and ch["mean_layers"] <= 4


def test_sink_tokens_always_run_every_layer(tmp_path):
    """sink_tokens=1: each row's first real position runs every layer (teacher forced: its logits are the full
    model's, left padding included; in a routed prefill: a one-token prompt's first new token ran every layer), the
    other positions follow their routers; saved and loaded with the routers; a negative count is refused."""
    from depthprune.skipping.routers import sink_positions

    model = build("llama")
    never = build_routers(model, init_bias=-20.0, sink_tokens=1)  # every routed layer skipped, but the sink
    ids, mask = input_ids(batch=4, seq=7)
    assert mask[:, 0].min() == 0 and mask.all(-1).any()  # left padding in some rows, none in others
    sinks = sink_positions(never, tuple(ids.shape), mask)
    first = mask.long().argmax(-1)
    assert torch.equal(sinks, torch.nn.functional.one_hot(first, 7).bool())
    out = routed_pass(model, never, ids, mask, threshold=0.5)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    rows = torch.arange(4)
    assert torch.allclose(out.logits[rows, first], full[rows, first], atol=1e-5)
    assert not torch.allclose(out.logits[:, -1], full[:, -1], atol=1e-3)  # the rest skipped: the guard says something
    assert torch.equal(out.executed[rows, first], torch.full((4,), 4.0))
    one = ids[:, -1:]
    for n, want in ((1, 4), (0, 2)):
        routers = build_routers(model, init_bias=-20.0, sink_tokens=n)
        got = skip_generate(model, routers, one, threshold=0.5, max_new_tokens=3, prefill="routed", eos_token_id=())
        assert got.executed[:, 0].tolist() == [want] * 4 and got.executed[:, 1:].eq(2).all()
    save_routers(never, tmp_path / "r")
    assert load_routers(tmp_path / "r", model).config.sink_tokens == 1
    with pytest.raises(RouterError, match="sink_tokens must be a whole number"):
        build_routers(model, sink_tokens=-1)
