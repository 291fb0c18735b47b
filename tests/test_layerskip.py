"""LayerSkip on tiny random decoders (llama and gpt2): at dropout 0 and exit-loss scale 0 the recipe is the plain LM
loss; layer dropout skips exactly the layers its mask says (a hand loop over the kept layers); the exit losses are the
shared head on the states after their layers; the schedules are what they say; bad options get clear errors; the
adapter saves atomically and loads back (library, `generate --speculative` and `--exit`), the input model untouched."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import build, input_ids, tokenizer

from depthprune.cli.main import main
from depthprune.exits.train.layerskip import (
    LayerSkipConfig,
    active_exits,
    dropout_rates,
    exit_agreement_with,
    exit_loss_weights,
    layerskip_hidden,
    layerskip_loss,
    load_recipe,
    sample_skip_mask,
    train_layerskip,
)
from depthprune.io import load_model, load_tokenizer
from depthprune.registry import BACKBONE_RECIPES

ARCHS = ["llama", "gpt2"]


def layers_of(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def norm_and_head(model, hidden):
    norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    return model.lm_head(norm(hidden))


def hand_loop(model, ids, kept):
    """One row [1, seq] through the kept layers, calling the model's own modules directly (no runner): the output
    after the last kept layer, before the final norm."""
    seq = ids.shape[1]
    position_ids = torch.arange(seq)[None]
    if hasattr(model, "model"):  # llama: embedding, rotary embeddings, causal mask (eager attention)
        hidden = model.model.embed_tokens(ids)
        position_embeddings = model.model.rotary_emb(hidden, position_ids)
        mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
        for i in kept:
            out = layers_of(model)[i](
                hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden
    hidden = model.transformer.wte(ids) + model.transformer.wpe(position_ids)  # gpt2
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
    for i in kept:
        out = layers_of(model)[i](hidden, attention_mask=mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@pytest.mark.parametrize("arch", ARCHS)
def test_neutral_recipe_is_the_plain_lm_loss(arch):
    model = build(arch)
    ids, _ = input_ids(3, 7, pad_first_row=0)
    n = model.config.num_hidden_layers
    config = LayerSkipConfig(num_layers=n, dropout_max=0.0, exit_scale=0.0, curriculum="none")
    skip = sample_skip_mask(config, 3)
    assert not skip.any()
    exits = active_exits(config, 0, 10)
    assert exits == []
    out = layerskip_loss(model, ids, config, skip=skip, exits=exits)
    assert torch.equal(out["loss"], model(input_ids=ids, labels=ids).loss)
    # also with exits named but weighted 0: the same loss, bit for bit
    out = layerskip_loss(model, ids, config, skip=skip, exits=list(range(n - 1)))
    assert torch.equal(out["loss"], model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_dropout_skips_exactly_the_masked_layers(arch):
    model = build(arch)
    model.config._attn_implementation = "eager"
    ids, _ = input_ids(3, 6, pad_first_row=0)
    n = model.config.num_hidden_layers
    skip = torch.zeros(3, n, dtype=torch.bool)
    skip[0, 1] = True
    skip[1, [0, 2, 3]] = True  # rows skip different layers in the same batch
    last, states = layerskip_hidden(model, ids, skip, exits=[1, 2])
    with torch.no_grad():
        for b in range(3):
            kept = [i for i in range(n) if not skip[b, i]]
            torch.testing.assert_close(last[b : b + 1], hand_loop(model, ids[b : b + 1], kept), rtol=1e-5, atol=1e-5)
            for e in (1, 2):  # the state after layer e: the kept layers up to e
                upto = [i for i in kept if i <= e]
                torch.testing.assert_close(states[e][b : b + 1], hand_loop(model, ids[b : b + 1], upto))
    # no skip at all: the model's own final hidden state
    last, _ = layerskip_hidden(model, ids)
    full = model(input_ids=ids, output_hidden_states=True).logits
    torch.testing.assert_close(norm_and_head(model, last), full, rtol=1e-5, atol=1e-5)


def test_exit_losses_are_the_shared_head_on_the_exit_states():
    model = build("llama")
    ids, _ = input_ids(2, 7, pad_first_row=0)
    config = LayerSkipConfig(num_layers=4, dropout_max=0.0, exit_scale=0.5, loss_scale="l", curriculum="none")
    out = layerskip_loss(model, ids, config, exits=[0, 2])
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    ce = [
        torch.nn.functional.cross_entropy(norm_and_head(model, hs[e + 1])[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        for e in (0, 2)
    ]
    final = model(input_ids=ids, labels=ids).loss
    w = torch.tensor([1 * 0.5, 3 * 0.5, 4.0])
    w = w / w.sum()
    torch.testing.assert_close(out["exits"], torch.stack(ce).detach())
    torch.testing.assert_close(out["loss"], w[0] * ce[0] + w[1] * ce[1] + w[2] * final)


def test_kl_term_is_the_kl_to_the_teacher_on_the_last_layer():
    model = build("llama")
    ids, _ = input_ids(2, 7, pad_first_row=0)
    config = LayerSkipConfig(num_layers=4, dropout_max=0.0, exit_scale=0.0, kl_weight=2.0, curriculum="none")
    with torch.no_grad():
        own = model(input_ids=ids).logits
    # the untouched model as its own teacher: KL 0, the loss is the plain LM loss
    out = layerskip_loss(model, ids, config, teacher_logits=own)
    assert float(out["kl"]) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(out["loss"], model(input_ids=ids, labels=ids).loss)
    # another teacher: the hand-computed KL(teacher || model) over the next-token positions, times the weight
    teacher = torch.randn_like(own)
    out = layerskip_loss(model, ids, config, teacher_logits=teacher)
    t = teacher[:, :-1].log_softmax(-1)
    kl = (t.exp() * (t - own[:, :-1].log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["loss"], model(input_ids=ids, labels=ids).loss + 2.0 * kl)
    with pytest.raises(ValueError, match="pass teacher_logits"):
        layerskip_loss(model, ids, config)


def test_kl_term_holds_the_last_layer_to_the_untouched_model():
    """The same run with and without the KL term: with it, the adapted model's output stays closer to the input
    model's (KL measured on the training blocks), and the input model is untouched."""
    model = build("llama")
    blocks = torch.randint(3, 99, (8, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=blocks).logits.log_softmax(-1)

    def kl_after(kl_weight):
        config = LayerSkipConfig(num_layers=4, dropout_max=0.0, exit_scale=1.0, kl_weight=kl_weight, curriculum="none")
        result = train_layerskip(
            model, config, blocks, lora_rank=4, lr=2e-2, batch_size=2, epochs=3, merge=True, progress=False
        )
        if kl_weight:
            assert "kl" in result.epoch_losses[0]
        with torch.no_grad():
            adapted = result.model(input_ids=blocks).logits.log_softmax(-1)
        return float((reference.exp() * (reference - adapted)).sum(-1).mean())

    free, held = kl_after(0.0), kl_after(20.0)
    assert held < 0.5 * free, (held, free)


def test_schedules_are_what_they_say():
    c = LayerSkipConfig(num_layers=5, dropout_max=0.2, dropout_scale="exp")
    rates = dropout_rates(c)
    assert rates[0] == 0 and math.isclose(float(rates[-1]), 0.2, rel_tol=1e-6)
    assert all(rates[i] < rates[i + 1] for i in range(4))  # rising with depth
    torch.testing.assert_close(rates, 0.2 * (torch.exp(torch.arange(5.0) * math.log(2) / 4) - 1))
    lin = LayerSkipConfig(num_layers=5, dropout_max=0.2, dropout_scale="linear", dropout_ramp="linear")
    assert float(dropout_rates(lin, 0, 10).abs().max()) == 0  # the ramp starts at 0
    torch.testing.assert_close(dropout_rates(lin, 5, 10), 0.1 * torch.arange(5.0) / 4)
    # the mask's skip frequency follows the rates
    mask = sample_skip_mask(c, 20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mask.float().mean(0), rates, atol=0.01, rtol=0)

    rot = LayerSkipConfig(num_layers=8, exit_layers=(1, 3, 4, 6), curriculum="rotational", rotation=2)
    assert [active_exits(rot, t) for t in range(3)] == [[1, 4], [3, 6], [1, 4]]
    every = [e for t in range(2) for e in active_exits(rot, t)]
    assert sorted(every) == [1, 3, 4, 6]  # each exit once per rotation
    assert active_exits(LayerSkipConfig(num_layers=8, curriculum="none"), 3) == list(range(7))

    grad = LayerSkipConfig(num_layers=4, curriculum="gradual", gradual_speed=2.0)
    seen = [active_exits(grad, t, 100) for t in range(0, 101, 5)]
    assert seen[0] == []  # nothing but the last layer at the start
    assert all(set(a) <= set(b) for a, b in zip(seen, seen[1:], strict=False))  # only switched on, never off
    assert active_exits(grad, 25, 100) == [2] and active_exits(grad, 50, 100) == [0, 1, 2]  # all on at half
    first_on = {e: next(t for t in range(101) if e in active_exits(grad, t, 100)) for e in range(3)}
    assert first_on[2] < first_on[1] < first_on[0]  # from the last layer downwards

    w = exit_loss_weights(LayerSkipConfig(num_layers=4, exit_scale=1.0, loss_scale="sum_l"), [0, 1])
    torch.testing.assert_close(w, torch.tensor([1.0, 3.0, 10.0]) / 14)
    assert exit_loss_weights(LayerSkipConfig(num_layers=4, exit_scale=0.0), [0, 1]).tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dropout_max": 1.0}, "dropout_max must be in [0, 1)"),
        ({"dropout_scale": "cubic"}, "dropout_scale must be one of exp, linear, uniform"),
        ({"curriculum": "random"}, "curriculum must be one of none, rotational, gradual"),
        ({"exit_layers": (1, 3)}, "the last layer 3 is the model's own output"),
        ({"exit_layers": ()}, "exit_layers must be distinct layers in 0..2"),
        ({"rotation": 0}, "rotation must be an int >= 1"),
        ({"exit_scale": -1.0}, "exit_scale must be a finite number >= 0"),
        ({"loss_scale": "square"}, "loss_scale must be one of one, l, sum_l"),
        ({"kl_weight": -0.5}, "kl_weight must be a finite number >= 0"),
        ({"kl_weight": float("inf")}, "kl_weight must be a finite number >= 0"),
    ],
)
def test_bad_options_error_clearly(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        LayerSkipConfig(num_layers=4, **options)


def test_bad_inputs_error_clearly():
    model = build("llama")
    ids, _ = input_ids(2, 5, pad_first_row=0)
    with pytest.raises(ValueError, match="built for 6 layers, the model has 4"):
        train_layerskip(model, LayerSkipConfig(num_layers=6), ids)
    with pytest.raises(ValueError, match="skip must be a bool tensor"):
        layerskip_hidden(model, ids, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be a LayerSkipConfig"):
        train_layerskip(model, {"num_layers": 4}, ids)
    with pytest.raises(ValueError, match="encoder"):
        train_layerskip(build("bert"), LayerSkipConfig(num_layers=4), ids)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny llama folder, a LayerSkip adapter trained on it (output folder), the result, the input's weights."""
    root = tmp_path_factory.mktemp("layerskip")
    model = build("llama")
    model.generation_config.eos_token_id = []
    model.save_pretrained(root / "model")
    tokenizer().save_pretrained(root / "model")
    model = load_model(root / "model", task="causal-lm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = torch.randint(3, 99, (8, 12), generator=torch.Generator().manual_seed(0))
    config = LayerSkipConfig(num_layers=4, dropout_max=0.3, exit_scale=1.0, curriculum="rotational", rotation=2)
    result = train_layerskip(
        model, config, blocks, lora_rank=4, lr=5e-3, batch_size=2, epochs=2, output_dir=root / "out", progress=False
    )
    return root, model, result, before, blocks


def test_training_lowers_the_loss_and_leaves_the_input_untouched(trained):
    _, model, result, before, blocks = trained
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert result.epoch_losses[-1]["loss"] < result.epoch_losses[0]["loss"]
    assert result.tokens == 2 * blocks.numel() and len(result.history) == 8
    assert 0 < result.epoch_losses[0]["layers_run"] < 4  # layer dropout did skip layers


def test_adapter_saves_and_loads_back(trained):
    root, model, result, _, blocks = trained
    out = root / "out"
    assert {"adapter_config.json", "adapter_model.safetensors", "layerskip.json", "train_log.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "config.json").exists()  # the adapter alone unless merge=True
    assert load_recipe(out) == LayerSkipConfig.from_dict(result.recipe)
    assert json.loads((out / "train_log.json").read_text())["recipe"] == result.recipe
    loaded = load_model(out, task="causal-lm")  # base (the folder it was trained on) + adapter, merged
    assert type(loaded) is type(model)
    lora = result.peft_model.get_base_model()
    with torch.no_grad():
        want = lora(input_ids=blocks[:2]).logits
        torch.testing.assert_close(loaded(input_ids=blocks[:2]).logits, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(input_ids=blocks[:2]).logits, want)  # training changed something
    assert load_tokenizer(out).get_vocab() == load_tokenizer(root / "model").get_vocab()  # the base's tokenizer
    agreement = exit_agreement_with(loaded, loaded, blocks[:2])
    assert agreement["agreement"][-1] == 1.0 and math.isclose(agreement["ppl"], agreement["ppl_reference"])


@pytest.mark.parametrize("decoder", [["--speculative", "--draft-layers", "2"], ["--exit", "fixed:1", "--uncalibrated"]])
def test_generate_loads_the_adapter_folder(trained, capsys, decoder):
    root, _, _, _, _ = trained
    loaded = load_model(root / "out", task="causal-lm")
    tok = load_tokenizer(root / "out")
    enc = tok(["the whale sea"], return_tensors="pt", return_token_type_ids=False)
    ref = loaded.generate(**enc, do_sample=False, max_new_tokens=5, eos_token_id=[], pad_token_id=tok.pad_token_id)
    rc = main(["generate", str(root / "out"), *decoder, "--prompt", "the whale sea", "--max-new-tokens", "5", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    tokens = report["results"][0]["tokens"]
    if decoder[0] == "--speculative":  # lossless: the adapted model's own greedy output
        assert tokens == ref[0, enc["input_ids"].shape[1] :].tolist()
    else:
        assert len(tokens) == 5


def test_cli_trains_and_refuses_bad_options(trained, capsys):
    root = trained[0]
    book = root / "book.txt"
    book.write_text(" ".join(["the whale sea ship captain white boat harpoon"] * 60))
    rc = main(
        ["train-layerskip", "--model", str(root / "model"), "--data", str(book), "--seq-len", "8", "--max-blocks",
         "4", "--batch-size", "2", "--exit-layers", "1", "2", "--eval-blocks", "1", "--no-progress", "-o",
         str(root / "cli")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "trained on 32 tokens" in out and "top-1 agreement per layer" in out
    assert load_recipe(root / "cli").exit_layers == (1, 2)
    evaluation = json.loads((root / "cli" / "layerskip_eval.json").read_text())
    assert evaluation["before"]["agreement"][-1] == 1.0 and len(evaluation["after"]["agreement"]) == 4
    assert "layerskip" in BACKBONE_RECIPES


def test_cli_bad_dropout_is_a_usage_error(trained, capsys):
    root = trained[0]
    with pytest.raises(SystemExit) as err:
        main(["train-layerskip", "--model", str(root / "model"), "--dropout-max", "1.5", "-o", str(root / "y")])
    assert err.value.code == 2
    assert "dropout-max must be in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["train-layerskip", "--model", str(root / "model"), "--kl-weight", "-2", "-o", str(root / "y")])
    assert err.value.code == 2
    assert "argument --kl-weight must be a finite number >= 0" in capsys.readouterr().err
