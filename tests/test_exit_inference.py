"""Batched early-exit inference on tiny random encoder classifiers."""

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from depthprune.exits.criteria import make_criterion
from depthprune.exits.heads import ExitHeads
from depthprune.exits.inference import EarlyExitClassifier, all_exit_outputs

COMMON = dict(vocab_size=99, num_attention_heads=4, num_labels=3)


def tiny(kind):
    torch.manual_seed(0)
    if kind == "bert":
        m = BertForSequenceClassification(
            BertConfig(hidden_size=32, num_hidden_layers=4, intermediate_size=64, **COMMON)
        )
    elif kind == "roberta":
        m = RobertaForSequenceClassification(
            RobertaConfig(hidden_size=32, num_hidden_layers=4, intermediate_size=64, pad_token_id=1, **COMMON)
        )
    elif kind == "distilbert":
        m = DistilBertForSequenceClassification(
            DistilBertConfig(vocab_size=99, dim=32, n_layers=4, n_heads=4, hidden_dim=64, num_labels=3)
        )
    else:
        m = AlbertForSequenceClassification(
            AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=4, intermediate_size=64, **COMMON)
        )
    return m.eval()


def batch(n=32, seq=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, int(torch.randint(3, seq + 1, (1,), generator=g)) :] = 0
    return ids, mask


def confident_heads(model, extras=()):
    """Exit heads whose confidence varies a lot between samples, so thresholds split a batch."""
    heads = ExitHeads.for_model(model, extras=extras)
    with torch.no_grad():
        for p in heads.parameters():
            p.mul_(30.0)
    return heads.eval()


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "albert"])
def test_exits_disabled_equal_untouched_logits(kind):
    model = tiny(kind)
    ids, mask = batch()
    ref = model(input_ids=ids, attention_mask=mask).logits
    heads = confident_heads(model)
    for clf in (EarlyExitClassifier(model), EarlyExitClassifier(model, heads, None)):
        out = clf(ids, mask)
        assert torch.equal(out.logits, ref)
        assert out.exit_layer.tolist() == [3] * 32
    assert torch.equal(all_exit_outputs(model, heads, ids, mask).final, ref)


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "albert"])
@pytest.mark.parametrize("criterion", ["max_prob:0.9", "patience:1", "entropy:0.3", "voting:0.6"])
def test_batched_equals_alone(kind, criterion):
    name, t = criterion.split(":")
    model = tiny(kind)
    heads = confident_heads(model)
    clf = EarlyExitClassifier(model, heads, make_criterion(name, float(t)))
    ids, mask = batch()
    out = clf(ids, mask)
    alone = [clf(ids[i : i + 1], mask[i : i + 1]) for i in range(32)]
    assert out.exit_layer.tolist() == [a.exit_layer.item() for a in alone]
    torch.testing.assert_close(out.logits, torch.cat([a.logits for a in alone]), atol=1e-5, rtol=1e-5)


def test_exits_split_the_batch_and_match_the_exit_heads():
    model = tiny("bert")
    heads = confident_heads(model)
    ids, mask = batch()
    clf = EarlyExitClassifier(model, heads, make_criterion("max_prob", 0.9))
    out = clf(ids, mask)
    layers = set(out.exit_layer.tolist())
    assert len(layers) >= 2, f"threshold should split the batch, got exit layers {layers}"
    every = all_exit_outputs(model, heads, ids, mask)
    for i, layer in enumerate(out.exit_layer.tolist()):
        expected = every.final[i] if layer == 3 else every.exits[heads.position(layer)].logits[i]
        torch.testing.assert_close(out.logits[i], expected, atol=1e-5, rtol=1e-5)
        if layer < 3:  # it exited at the first exit whose confidence reached 0.9
            assert expected.softmax(-1).max() >= 0.9


def test_static_exit_runs_that_many_layers():
    model = tiny("bert")
    clf = EarlyExitClassifier(model, confident_heads(model), make_criterion("static", 2))
    ids, mask = batch(4)
    assert clf(ids, mask).layers_used.tolist() == [2, 2, 2, 2]


def test_criterion_needing_missing_extra_is_rejected():
    model = tiny("bert")
    with pytest.raises(ValueError, match="'halting' extra"):
        EarlyExitClassifier(model, confident_heads(model), make_criterion("q_exit", 0.5))


def test_unsupported_model_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match="supports model types"):
        EarlyExitClassifier(model)


def test_heads_save_load_round_trip(tmp_path):
    model = tiny("distilbert")
    heads = confident_heads(model, extras=("halting", "gate", "agreement"))
    heads.save(tmp_path)
    loaded = ExitHeads.load(tmp_path, model)
    assert loaded.config == heads.config
    ids, mask = batch(4)
    a, b = all_exit_outputs(model, heads, ids, mask), all_exit_outputs(model, loaded, ids, mask)
    for x, y in zip(a.exits, b.exits, strict=True):
        assert torch.equal(x.logits, y.logits) and torch.equal(x.halting, y.halting)
        assert torch.equal(x.gate, y.gate) and torch.equal(x.agreement, y.agreement)
    with pytest.raises(FileExistsError):
        heads.save(tmp_path)
    with pytest.raises(ValueError, match="made for a distilbert"):
        ExitHeads.load(tmp_path, tiny("bert"))


def test_exit_layer_validation():
    model = tiny("bert")
    with pytest.raises(ValueError, match="out of range"):
        ExitHeads.for_model(model, layers=[0, 3])
    with pytest.raises(ValueError, match="increasing"):
        ExitHeads.for_model(model, layers=[1, 0])
    with pytest.raises(ValueError, match="unknown exit extras"):
        ExitHeads.for_model(model, extras=("nope",))


def test_mean_pooling_ignores_padding_and_first_pooling_reads_the_first_token():
    model = tiny("bert")
    heads = ExitHeads.for_model(model).eval()
    ids, mask = batch(4)
    hidden = torch.randn(4, ids.shape[1], 32)
    n = int(mask[0].sum())
    with torch.no_grad():
        padded = heads(0, hidden[:1], mask[:1]).logits
        trimmed = heads(0, hidden[:1, :n], None).logits
        torch.testing.assert_close(padded, trimmed)
        first = ExitHeads.for_model(model, pooling="first").eval()
        changed = hidden.clone()
        changed[:, 1:] += 5.0  # only the first token matters to 'first' pooling
        torch.testing.assert_close(first(0, hidden, mask).logits, first(0, changed, mask).logits)
    with pytest.raises(ValueError, match="pooling"):
        ExitHeads.for_model(model, pooling="max")
