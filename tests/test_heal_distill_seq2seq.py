"""Distillation healing of an encoder-decoder with the encoder frozen and cached (static/heal/distill_seq2seq.py), on
a tiny random Whisper: neutral at zero steps, the cached loss is the uncached one, training lowers the KL, the input
is untouched, the export reloads, bad input is refused."""

import pytest
import torch
from tiny_models import build

from depthprune.static.apply import apply_plan
from depthprune.static.heal import heal
from depthprune.static.heal.distill_seq2seq import (
    decoder_logits,
    distill_seq2seq,
    encode_cache,
    seq2seq_distill_loss,
)

PLAN = "decoder=0,2"


def features(n=2, rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_features": torch.randn(rows, 8, 16, generator=g)} for _ in range(n)]


def mean_kl(student, cache):
    rows = cache.rows(torch.arange(len(cache)))
    with torch.no_grad():
        s = decoder_logits(student, rows["labels"], rows["lengths"], hidden=rows["student_hidden"])
    return float(seq2seq_distill_loss(s, rows["teacher_logits"], rows["labels"], rows["lengths"])[0])


def test_at_zero_steps_the_healer_returns_the_plan_applied():
    model = build("whisper")
    healed = heal(model, PLAN, features(), method="distill", epochs=0, max_new_tokens=6)
    pruned = apply_plan(model, PLAN)
    x = features(1, seed=5)[0]["input_features"]
    ids = torch.tensor([[1, 5, 7, 9], [1, 3, 4, 4]])
    with torch.no_grad():
        assert torch.equal(
            healed(input_features=x, decoder_input_ids=ids).logits,
            pruned(input_features=x, decoder_input_ids=ids).logits,
        )
        assert torch.equal(healed.generate(x, max_new_tokens=5), pruned.generate(x, max_new_tokens=5))
    assert healed.config.decoder_layers == 2
    assert healed.config.depthprune_healing["method"] == "distill"


def test_the_cached_encoder_loss_equals_the_uncached_one():
    model = build("whisper")
    student = apply_plan(model, PLAN)
    batches = features(1)
    cache = encode_cache(model, batches, max_new_tokens=6, logits_dtype=torch.float32)
    rows = cache.rows(torch.arange(len(cache)))
    labels, lengths = rows["labels"], rows["lengths"]
    assert lengths.min() > 2  # real pseudo-labels
    with torch.no_grad():
        cached = seq2seq_distill_loss(
            decoder_logits(student, labels, lengths, hidden=rows["student_hidden"]),
            rows["teacher_logits"],
            labels,
            lengths,
        )
        uncached = seq2seq_distill_loss(
            decoder_logits(student, labels, lengths, inputs=batches[0]),
            decoder_logits(model, labels, lengths, inputs=batches[0]),
            labels,
            lengths,
        )
    for a, b in zip(cached, uncached, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(cached[0]) > 0  # the pruned student differs from the teacher


def test_pseudo_labels_are_the_teachers_greedy_transcripts_behind_the_prompt():
    model = build("whisper")
    x = features(1)[0]["input_features"]
    cache = encode_cache(model, [{"input_features": x}], max_new_tokens=6)
    generated = model.generate(x, max_new_tokens=6, do_sample=False)
    for row, n, gen in zip(cache.labels, cache.lengths, generated, strict=True):
        gen = gen.tolist()
        gen = gen[1:] if gen[0] == model.config.decoder_start_token_id else gen
        text = gen[: gen.index(2)] if 2 in gen else gen
        assert row[:n].tolist() == [model.config.decoder_start_token_id, *text, 2]


def test_training_lowers_the_kl_and_leaves_the_input_untouched():
    model = build("whisper")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = encode_cache(model, features(), max_new_tokens=6)
    result = distill_seq2seq(model, PLAN, cache=cache, epochs=15, lr=3e-3, batch_size=4, nll_weight=0.0)
    assert mean_kl(result.model, cache) < 0.7 * mean_kl(apply_plan(model, PLAN), cache)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the encoder, embeddings and head were not trained
    for name, p in result.model.model.encoder.state_dict().items():
        assert torch.equal(p, model.model.encoder.state_dict()[name])
    assert torch.equal(result.model.model.decoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight)
    assert result.steps == 15 * 2 and result.tokens_per_epoch == cache.tokens


def test_an_encoder_plan_trains_the_decoder_on_the_pruned_encoders_outputs(tmp_path):
    from transformers import WhisperForConditionalGeneration

    model = build("whisper")
    data = features()
    result = distill_seq2seq(model, "encoder=0,2", data, epochs=10, lr=3e-3, max_new_tokens=6)
    assert result.model.config.encoder_layers == 2 and result.model.config.decoder_layers == 3
    result.model.save_pretrained(tmp_path)
    again = WhisperForConditionalGeneration.from_pretrained(tmp_path).eval()
    x = data[0]["input_features"]
    assert torch.equal(again.generate(x, max_new_tokens=5), result.model.generate(x, max_new_tokens=5))


@pytest.mark.parametrize(
    ("batches", "options", "message"),
    [
        ([], {}, "needs calibration batches"),
        ([{"input_features": torch.randn(2, 8, 10)}], {}, r"\[batch, 8, 16\]"),
        ([{"input_ids": torch.ones(2, 4, dtype=torch.long)}], {}, "holding 'input_features'"),
        ([{"input_features": torch.randn(2, 8, 16), "labels": torch.ones(2, 3)}], {}, "unexpected keys"),
        (None, {"epochs": -1}, "epochs >= 0"),
        (None, {"lora_rank": 4}, "has no option"),
    ],
)
def test_bad_input_gets_a_clear_error(batches, options, message):
    model = build("whisper")
    with pytest.raises(ValueError, match=message):
        heal(model, PLAN, features() if batches is None else batches, method="distill", **options)


def test_identity_plans_and_decoder_only_models_are_refused():
    with pytest.raises(ValueError, match="nothing to heal"):
        distill_seq2seq(build("whisper"), "encoder=0-2;decoder=0-2", features())
    with pytest.raises(ValueError, match="encoder-decoder"):
        encode_cache(build("llama"), features())
    with pytest.raises(ValueError, match="give calibration batches"):
        distill_seq2seq(build("whisper"), PLAN)


def test_block_influence_scores_whisper_decoder_layers_from_its_own_inputs():
    """A scorer on the decoder stack of a speech model: BI from dicts of Whisper's inputs equals 1 - cos of each
    layer's input and output as the model's own forward computes them (output_hidden_states, a hook on the last)."""
    from depthprune.static.prune import prune
    from depthprune.static.scorers.block_influence import block_influence

    model = build("whisper")
    batch = {**features(1)[0], "decoder_input_ids": torch.tensor([[1, 5, 7, 9]] * 4)}
    scores = block_influence(model, [batch], n_remove=1, stack="decoder")
    last = []
    handle = model.model.decoder.layers[-1].register_forward_hook(
        lambda m, a, out: last.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        states = list(model(**batch, output_hidden_states=True, use_cache=False).decoder_hidden_states[:-1])
    handle.remove()
    states.append(last[0])
    expected = [
        1 - torch.cosine_similarity(a, b, dim=-1).mean().item() for a, b in zip(states[:-1], states[1:], strict=True)
    ]
    assert scores.scores == pytest.approx(expected, abs=1e-5)
    result = prune(model, remove=2, scorer="block_influence", batches=[batch], stack="decoder")
    kept = max(range(3), key=lambda i: expected[i])  # the layer that turns its states most
    assert list(result.plan.stacks["decoder"]) == [kept]
