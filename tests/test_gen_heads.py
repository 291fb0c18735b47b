"""Decoder exit heads (logit lens, tuned lens, EE-Tuning MLP, CALM confidence) and their Accelerate trainer."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tiny_models import DECODERS, VOCAB, build, input_ids

from depthprune.adapters import get_adapter
from depthprune.errors import OutputExistsError
from depthprune.exits.lm_heads import CONFIG_NAME, WEIGHTS_NAME, DecoderExitHeads, ExitHeadsLike
from depthprune.exits.train.lm_exits import exit_agreement, exit_kl, fit_confidence, fit_lens, train_decoder_exits
from depthprune.training import latest_checkpoint


def _layer_outputs(model: torch.nn.Module, **inputs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every decoder layer's raw output (forward hooks on the model's own layers) and the model's logits."""
    layers = get_adapter(model).layers(model, "decoder")
    outs: list[torch.Tensor] = [None] * len(layers)

    def keep(i):
        def hook(_module, _args, out):
            outs[i] = out[0] if isinstance(out, tuple) else out

        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return outs, logits


def _blocks(n: int = 32, seq: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq), generator=g)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- equalities -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DECODERS)
def test_logit_lens_at_the_last_layer_is_the_model_itself(name):
    model = build(name)
    ids, mask = input_ids()
    outs, logits = _layer_outputs(model, input_ids=ids, attention_mask=mask)
    heads = DecoderExitHeads.logit_lens(model)
    n = heads.num_layers
    assert isinstance(heads, ExitHeadsLike)
    assert heads.layers == tuple(range(n - 1)) and n == len(outs)
    assert torch.equal(heads.logits(n - 1, outs[-1]), logits)  # the final exit is the model's own norm + head
    assert heads.confidence(0, outs[0]) is None
    norm, head = get_adapter(model).final_norm(model), get_adapter(model).head(model)
    with torch.no_grad():
        assert torch.equal(heads.logits(1, outs[1]), head(norm(outs[1])))  # and an early exit is the logit lens


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("kind", ["lens", "mlp"])
def test_untrained_heads_are_the_logit_lens(name, kind):
    model = build(name)
    ids, mask = input_ids()
    outs, _ = _layer_outputs(model, input_ids=ids, attention_mask=mask)
    lens = DecoderExitHeads.logit_lens(model)
    heads = DecoderExitHeads.for_model(model, kind=kind, confidence=True)
    with torch.no_grad():
        for layer in heads.layers:
            assert torch.equal(heads.logits(layer, outs[layer]), lens.logits(layer, outs[layer]))
            conf = heads.confidence(layer, outs[layer])
            assert conf.shape == ids.shape and ((conf >= 0) & (conf <= 1)).all()


def test_hidden_states_are_the_layer_outputs_the_trainer_reads():
    # The trainer reads hidden_states[layer + 1] from output_hidden_states=True; for every exit layer (never the
    # last, whose entry the model returns after its final norm) that is the layer's own output.
    for name in DECODERS:
        model = build(name)
        ids, mask = input_ids()
        outs, _ = _layer_outputs(model, input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert all(torch.equal(states[i + 1], outs[i]) for i in range(len(outs) - 1)), name


# ---- the model's own norm and head are shared, never saved, never trained -----------------------------------------
def test_shared_norm_and_head_are_not_parameters_of_the_heads():
    model = build("gpt2")
    heads = DecoderExitHeads.for_model(model, [0, 2], kind="mlp", confidence=True)
    model_ids = {id(p) for p in model.parameters()}
    assert not model_ids & {id(p) for p in heads.parameters()}
    assert all(k.startswith(("translators.", "confidence_nets.")) for k in heads.state_dict())
    norm = get_adapter(model).final_norm(model)
    mlp_norm = heads.translators["0"].norm
    assert type(mlp_norm) is type(norm) and mlp_norm is not norm and torch.equal(mlp_norm.weight, norm.weight)
    twin = copy.deepcopy(heads)  # a copy of the heads still reads through this model's own norm and head
    assert twin._shared.head is model.lm_head and twin.translators["0"] is not heads.translators["0"]


def test_float32_heads_on_a_bfloat16_model():
    model = build("llama").to(torch.bfloat16)
    ids, mask = input_ids()
    outs, logits = _layer_outputs(model, input_ids=ids, attention_mask=mask)
    heads = DecoderExitHeads.for_model(model, [1], dtype=torch.float32, confidence=True)
    assert {p.dtype for p in heads.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(heads.logits(3, outs[3]), logits)
        assert torch.equal(heads.logits(1, outs[1]), DecoderExitHeads.logit_lens(model).logits(1, outs[1]))
        assert heads.logits(1, outs[1]).dtype == torch.bfloat16 and heads.confidence(1, outs[1]).shape == ids.shape
    train_decoder_exits(model, heads, _blocks(8), epochs=1, lr=1e-2, batch_size=4, confidence=True, progress=False)


def test_training_lowers_the_kl_and_leaves_the_model_alone(tmp_path):
    model = build("llama")
    model.lm_head.weight.requires_grad_(False)  # a caller's flags come back as they were
    before_model = _state(model)
    heads = DecoderExitHeads.for_model(model, [0, 1], kind="lens")
    blocks = _blocks()
    kl0 = exit_kl(model, heads, blocks)
    result = train_decoder_exits(
        model, heads, blocks, epochs=4, lr=1e-2, batch_size=8, seed=0, progress=False, output_dir=tmp_path / "out"
    )
    kl1 = exit_kl(model, heads, blocks)
    assert all(kl1[i] < 0.8 * kl0[i] for i in heads.layers), (kl0, kl1)
    assert result.epoch_losses[-1]["kl"] < result.epoch_losses[0]["kl"]
    assert result.num_processes == 1 and len(result.checksums) == 1 and result.layers == [0, 1]
    # the backbone, its final norm and LM head included, did not move; flags and modes are restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_model.items())
    assert not model.lm_head.weight.requires_grad and model.model.norm.weight.requires_grad
    assert not model.training and not heads.training
    # the output folder: the heads (without the model's weights) and the log
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "train_log.json"])
    saved = load_file(str(out / WEIGHTS_NAME))
    assert sorted(saved) == sorted(heads.state_dict())
    assert json.loads((out / "train_log.json").read_text())["checksums"] == result.checksums
    with pytest.raises(OutputExistsError, match="overwrite"):
        train_decoder_exits(model, heads, blocks, epochs=1, progress=False, output_dir=out)


def test_resume_after_an_interruption_gives_the_uninterrupted_result(tmp_path):
    """Checkpoints hold the heads, optimizer, scheduler and place in the data: a run resumed mid-epoch ends with the
    parameters of one that never stopped."""
    model = build("llama")
    kw = dict(epochs=2, lr=1e-2, batch_size=4, confidence=True, progress=False)

    def fresh():
        torch.manual_seed(1)
        return DecoderExitHeads.for_model(model, [0, 1], kind="mlp", mlp_dim=16, confidence=True)

    full_heads = fresh()
    full = train_decoder_exits(model, full_heads, _blocks(12), output_dir=tmp_path / "a", checkpoint_every=2, **kw)
    steps = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert steps == ["step-0000002", "step-0000004", "step-0000006"]  # 3 batches an epoch, 2 epochs
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-0000004", tmp_path / "b" / "checkpoints" / "step-0000004")
    assert latest_checkpoint(tmp_path / "b").name == "step-0000004"  # mid second epoch
    heads = fresh()
    resumed = train_decoder_exits(model, heads, _blocks(12), output_dir=tmp_path / "b", resume=True, **kw)
    assert resumed.history == pytest.approx(full.history, rel=1e-5)
    assert resumed.epoch_losses[-1]["kl"] == pytest.approx(full.epoch_losses[-1]["kl"], rel=1e-5)
    a, b = _state(full_heads), _state(heads)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in _state(fresh()).items())  # and it trained
    with pytest.raises(OutputExistsError, match="not empty"):
        train_decoder_exits(model, heads, _blocks(12), output_dir=tmp_path / "a", **kw)


def test_mlp_heads_and_confidence_train():
    model = build("gpt_neox")
    heads = DecoderExitHeads.for_model(model, [1], kind="mlp", mlp_dim=16, confidence=True)
    result = train_decoder_exits(
        model, heads, _blocks(), epochs=4, lr=1e-2, batch_size=8, confidence=True, progress=False
    )
    first, last = result.epoch_losses[0], result.epoch_losses[-1]
    assert last["kl"] < first["kl"] and last["confidence_bce"] < first["confidence_bce"]
    # without confidence=True the classifier stays as it was
    conf = _state(heads.confidence_nets)
    train_decoder_exits(model, heads, _blocks(8), epochs=1, lr=1e-2, batch_size=8, progress=False)
    assert all(torch.equal(v, heads.confidence_nets.state_dict()[k]) for k, v in conf.items())


def test_least_squares_lens_recovers_layers_that_do_nothing():
    """Upper layers whose output projections are zero pass the state through: the fit must find the identity, and
    the exit then gives the full model's logits (and every top token)."""
    model = build("llama")
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    heads = DecoderExitHeads.for_model(model, [0, 1], kind="lens", dtype=torch.float32)
    blocks = _blocks()
    residuals = fit_lens(model, heads, blocks, ridge=0.0)
    assert residuals[1] < 1e-8 < residuals[0]
    lin = heads.translators["1"].linear
    assert lin.weight.abs().max() < 1e-4 and lin.bias.abs().max() < 1e-4
    ids = _blocks(4, seed=5)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(heads.logits(1, out.hidden_states[2]), out.logits, atol=1e-4, rtol=1e-4)
    assert exit_agreement(model, heads, ids)[1] == 1.0


@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
def test_least_squares_lens_beats_the_logit_lens_on_held_out_tokens(name):
    model = build(name)
    before = _state(model)
    lens = DecoderExitHeads.logit_lens(model, [0, 1])
    heads = DecoderExitHeads.for_model(model, [0, 1], kind="lens")
    fit_lens(model, heads, _blocks(64), batch_size=16)
    held = _blocks(16, seed=9)
    kl_lens, kl_fit = exit_kl(model, lens, held), exit_kl(model, heads, held)
    assert all(kl_fit[i] < 0.9 * kl_lens[i] for i in heads.layers), (kl_lens, kl_fit)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_fit_lens_bad_input_and_training_only_the_classifier():
    model = build("llama")
    with pytest.raises(ValueError, match="kind='lens'"):
        fit_lens(model, DecoderExitHeads.for_model(model, [0], kind="mlp"), _blocks())
    heads = DecoderExitHeads.for_model(model, [0, 1], kind="lens", confidence=True)
    with pytest.raises(ValueError, match="seq_len > skip_first"):
        fit_lens(model, heads, _blocks(seq=1))
    with pytest.raises(ValueError, match="nothing to train"):
        train_decoder_exits(model, heads, _blocks(), train_translators=False, progress=False)
    fit_lens(model, heads, _blocks())
    translators, conf = _state(heads.translators), _state(heads.confidence_nets)
    result = train_decoder_exits(
        model, heads, _blocks(), epochs=3, lr=1e-2, confidence=True, train_translators=False, progress=False
    )
    assert all(torch.equal(v, heads.translators.state_dict()[k]) for k, v in translators.items())
    assert any(not torch.equal(v, heads.confidence_nets.state_dict()[k]) for k, v in conf.items())
    assert result.epoch_losses[-1]["confidence_bce"] < result.epoch_losses[0]["confidence_bce"]


def test_confidence_fitted_on_cached_features():
    """An exit that always agrees (the layers above it do nothing) gets a confident classifier; one that often
    disagrees gets a classifier better than the base rate on the positions it was fitted on. Nothing else moves."""
    model = build("llama")
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    heads = DecoderExitHeads.for_model(model, [0, 1], kind="lens", confidence=True, dtype=torch.float32)
    fit_lens(model, heads, _blocks(), ridge=0.0)
    before_model, before_lens = _state(model), _state(heads.translators)
    report = fit_confidence(model, heads, _blocks(40), steps=200, lr=1e-2)
    assert report[1]["positive_rate"] == 1.0 and report[1]["heldout_accuracy"] == 1.0
    ids = _blocks(2, seed=3)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        assert heads.confidence(1, out.hidden_states[2]).min() > 0.9
    rate = report[0]["positive_rate"]
    assert 0 < rate < 1
    base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))  # BCE of always predicting the rate
    assert report[0]["train_bce"] < base, (report[0], base)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_model.items())
    assert all(torch.equal(v, heads.translators.state_dict()[k]) for k, v in before_lens.items())
    with pytest.raises(ValueError, match="confidence=True"):
        fit_confidence(model, DecoderExitHeads.for_model(model, [0]), _blocks())


def test_training_on_texts_needs_a_tokenizer():
    model = build("llama")
    heads = DecoderExitHeads.for_model(model, [0])
    with pytest.raises(ValueError, match="tokenizer"):
        train_decoder_exits(model, heads, ["some text"], progress=False)
    with pytest.raises(ValueError, match="nothing to train"):
        train_decoder_exits(model, DecoderExitHeads.logit_lens(model), _blocks(), progress=False)
    with pytest.raises(ValueError, match="confidence=True"):
        train_decoder_exits(model, heads, _blocks(), confidence=True, progress=False)


# ---- persistence ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["logit_lens", "lens", "mlp"])
def test_save_load_round_trip(tmp_path, kind):
    model = build("qwen2")
    heads = DecoderExitHeads.for_model(model, [0, 2], kind=kind, confidence=kind != "logit_lens")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in heads.parameters():  # as if trained
            p.add_(0.1 * torch.randn_like(p))
    heads.save(tmp_path)
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        heads.save(tmp_path)
    heads.save(tmp_path, overwrite=True)
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert not any("lm_head" in k or "embed" in k for k in saved) and sorted(saved) == sorted(heads.state_dict())
    again = DecoderExitHeads.load(tmp_path, build("qwen2"))
    assert again.config == heads.config and again.layers == (0, 2)
    ids, mask = input_ids()
    outs, _ = _layer_outputs(model, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        for layer in (0, 2):
            assert torch.equal(again.logits(layer, outs[layer]), heads.logits(layer, outs[layer]))
            if kind != "logit_lens":
                assert torch.equal(again.confidence(layer, outs[layer]), heads.confidence(layer, outs[layer]))


def test_load_onto_another_model_says_so(tmp_path):
    DecoderExitHeads.for_model(build("llama")).save(tmp_path)
    with pytest.raises(ValueError, match="built for a llama with 4 layers.*not this gpt2"):
        DecoderExitHeads.load(tmp_path, build("gpt2"))
    config = transformers.LlamaConfig(**{**build("llama").config.to_dict(), "num_hidden_layers": 3})
    with pytest.raises(ValueError, match="with 4 layers.*with 3 layers"):
        DecoderExitHeads.load(tmp_path, transformers.LlamaForCausalLM(config))
    with pytest.raises(FileNotFoundError, match="train decoder exit heads first"):
        DecoderExitHeads.load(tmp_path / "nowhere", build("llama"))


# ---- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input_gets_a_clear_error():
    model = build("llama")
    with pytest.raises(ValueError, match=r"out of range: exits go after layers 0-2.*last layer, 3"):
        DecoderExitHeads.for_model(model, [3])
    with pytest.raises(ValueError, match="out of range"):
        DecoderExitHeads.for_model(model, [-1, 7])
    with pytest.raises(ValueError, match="unknown exit head kind 'tuned'; choose one of"):
        DecoderExitHeads.for_model(model, kind="tuned")
    with pytest.raises(ValueError, match="at least one layer"):
        DecoderExitHeads.for_model(model, [])
    with pytest.raises(ValueError, match=r"decoder-only causal LMs.*ExitHeads.*task='causal-lm'"):
        DecoderExitHeads.for_model(build("bert"))
    with pytest.raises(ValueError, match="decoder-only"):
        DecoderExitHeads.for_model(build("t5"))
    torch.manual_seed(0)
    classifier = transformers.LlamaForSequenceClassification(build("llama").config)
    with pytest.raises(ValueError, match="load the model as a causal LM"):
        DecoderExitHeads.for_model(classifier)
    heads = DecoderExitHeads.for_model(model, [0, 2])
    with pytest.raises(ValueError, match=r"no exit after layer 1: these heads have exits after layers \[0, 2\]"):
        heads.logits(1, torch.zeros(1, 2, 32))


# ---- two processes through accelerate launch ------------------------------------------------------------------------
WORDS = ["the", "whale", "sea", "ship", "captain", "white", "boat", "harpoon", "deep", "wave", "sail", "storm"]


def test_two_process_training_with_accelerate_launch(tmp_path):
    folder = tmp_path / "tiny"
    build("llama").save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(len(WORDS), (16 * 16 * 2,), generator=g)]
    data = tmp_path / "text.txt"
    data.write_text(" ".join(words) + "\n\nCHAPTER 110.\n\n" + " ".join(words[:64]))  # --data trains before ch. 110
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "depthprune", "train-exits", "--model", str(folder), "--data", str(data), "--kind", "lens",
        "--layers", "0", "2", "--epochs", "2", "--lr", "1e-2", "--batch-size", "4", "--seq-len", "16",
        "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["num_processes"] == 2 and log["num_blocks"] == 32 and log["layers"] == [0, 2]
    assert log["checksums"][0] == pytest.approx(log["checksums"][1], rel=0, abs=1e-9)  # replicas stayed in sync
    assert log["checksums"][0] != 0.0  # and trained
    assert log["epoch_losses"][-1]["kl"] < log["epoch_losses"][0]["kl"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    heads = DecoderExitHeads.load(out, model)
    with torch.no_grad():
        total = sum(float(p.double().sum()) for p in heads.parameters())
    assert heads.layers == (0, 2) and total == pytest.approx(log["checksums"][0], abs=1e-9)
