"""Training recipes for exit heads: each loss on hand-made AllExits, the trainer in one process (freezing, resume), and
a real two-process data-parallel run through `accelerate launch` on a tiny random BERT."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from depthprune.exits.data import LabelledTexts
from depthprune.exits.heads import ExitHeads, ExitOutput
from depthprune.exits.inference import AllExits, all_exit_outputs
from depthprune.exits.train import (
    agreement,
    exit_distribution,
    jei_dnn,
    joint,
    list_recipes,
    palbert,
    recipe_stages,
    self_distill,
    two_stage,
    with_agreement,
)
from depthprune.exits.train.trainer import _bind_hyper, latest_checkpoint, train_exits

WORDS = [f"w{i}" for i in range(94)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS  # 99 ids


def _outputs(logits: list[list[list[float]]], final, layers=None, num_layers=None, **extras) -> AllExits:
    exits = []
    for j, z in enumerate(logits):
        kw = {k: torch.tensor(v[j], dtype=torch.float, requires_grad=True) for k, v in extras.items()}
        exits.append(ExitOutput(torch.tensor(z, requires_grad=True), **kw))
    return AllExits(exits, torch.tensor(final, requires_grad=True), layers, num_layers)


LOGITS = [[[2.0, 0.0], [0.0, 1.0], [0.5, 0.4]], [[1.0, -1.0], [0.3, 0.2], [-2.0, 2.0]]]  # 2 exits, batch 3
FINAL = [[3.0, -1.0], [-1.0, 1.0], [0.0, 2.0]]
LABELS = torch.tensor([0, 1, 1])


def _ce(z) -> torch.Tensor:
    return F.cross_entropy(torch.tensor(z), LABELS, reduction="none")


# ---- recipe losses on hand-made outputs -----------------------------------------------------------------------------
def test_every_recipe_has_stages_and_a_documented_loss():
    assert set(list_recipes()) == {"two_stage", "joint", "self_distill", "palbert", "jei_dnn", "agreement"}
    for name in list_recipes():
        stages = recipe_stages(name)
        assert stages and all(callable(s.loss) for s in stages)
        module = sys.modules[f"depthprune.exits.train.{name}"]
        assert module.__doc__ and "20" in module.__doc__  # cites a paper (year)


def test_two_stage_is_two_stages_final_then_heads():
    stages = recipe_stages("two_stage")
    assert [s.trainable for s in stages] == ["model", "heads"]
    out = _outputs(LOGITS, FINAL)
    assert torch.allclose(stages[0].loss(out, LABELS), _ce(FINAL).mean())
    assert torch.allclose(two_stage.loss(out, LABELS), _ce(LOGITS[0]).mean() + _ce(LOGITS[1]).mean())


def test_joint_weights_are_proportional_to_depth():
    out = _outputs(LOGITS, FINAL)  # exits after layers 0, 1 of 3
    assert joint.weights(out).tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    sparse = _outputs(LOGITS, FINAL, layers=(0, 2), num_layers=4)  # exits read layers 0 and 2 of 4
    assert joint.weights(sparse).tolist() == pytest.approx([1 / 8, 3 / 8, 4 / 8])
    want = (1 * _ce(LOGITS[0]).mean() + 3 * _ce(LOGITS[1]).mean() + 4 * _ce(FINAL).mean()) / 8
    assert torch.allclose(joint.loss(sparse, LABELS), want)


def test_self_distill_term_is_zero_when_exits_equal_the_final_layer():
    same = _outputs([FINAL, FINAL], FINAL)
    assert torch.allclose(self_distill.loss(same, LABELS), _ce(FINAL).mean())
    assert float(self_distill.distill_term(same).detach()) == pytest.approx(0.0, abs=1e-6)
    differ = _outputs(LOGITS, FINAL)
    assert float(self_distill.distill_term(differ, temperature=2.0).detach()) > 0.01
    loss = self_distill.loss(differ, LABELS)
    loss.backward()
    assert differ.exits[0].logits.grad.abs().sum() > 0
    assert differ.final.grad is not None  # from the final layer's CE, not from the (detached) teacher
    only_teacher = _outputs(LOGITS, FINAL)
    self_distill.distill_term(only_teacher).backward()
    assert only_teacher.final.grad is None


def test_exit_distribution_is_ponder_nets():
    h = torch.tensor([[0.0, 0.0], [math.log(3.0), -math.log(3.0)]])  # lambdas (0.5, 0.5) and (0.75, 0.25)
    p = exit_distribution(h.T.contiguous()).exp()  # [exits + 1, batch]
    assert p[:, 0].tolist() == pytest.approx([0.5, 0.25, 0.25])
    assert p[:, 1].tolist() == pytest.approx([0.75, 0.25 * 0.25, 0.25 * 0.75])
    big = torch.randn(11, 5) * 8
    assert exit_distribution(big).exp().sum(0).tolist() == pytest.approx([1.0] * 5)


def test_palbert_loss_is_expected_ce_plus_kl_to_the_prior():
    halting = [[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]]
    out = _outputs(LOGITS, FINAL, halting=halting)
    p = exit_distribution(torch.tensor(halting)).exp()
    ce = torch.stack([_ce(LOGITS[0]), _ce(LOGITS[1]), _ce(FINAL)])
    assert torch.allclose(palbert.loss(out, LABELS, beta=0.0), (p * ce).sum(0).mean())
    # halting logits that reproduce the prior exactly: the KL term vanishes
    prior = palbert.geometric_prior(3, 0.3).exp()
    lam = [prior[0], prior[1] / (1 - prior[0])]
    logit = [math.log(v / (1 - v)) for v in lam]
    matched = _outputs(LOGITS, FINAL, halting=[[logit[0]] * 3, [logit[1]] * 3])
    p = torch.stack([prior] * 3, 1)
    assert torch.allclose(palbert.loss(matched, LABELS, beta=5.0, lambda_p=0.3), (p * ce).sum(0).mean(), atol=1e-6)
    assert palbert.loss(out, LABELS, beta=5.0, lambda_p=0.3) > palbert.loss(out, LABELS, beta=0.0)
    palbert.loss(out, LABELS).backward()
    assert out.exits[0].halting.grad.abs().sum() > 0


def test_palbert_and_jei_dnn_need_their_extras():
    with pytest.raises(ValueError, match="'halting' extra"):
        palbert.loss(_outputs(LOGITS, FINAL), LABELS)
    with pytest.raises(ValueError, match="'gate' extra"):
        jei_dnn.loss(_outputs(LOGITS, FINAL), LABELS)


def test_jei_dnn_adds_the_expected_cost_of_computation():
    gate = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # every gate 0.5: p = (0.5, 0.25, 0.25)
    same = _outputs([FINAL, FINAL], FINAL, gate=gate)  # every classifier has the same CE
    ce = _ce(FINAL).mean()
    cost = 0.5 * 1 / 3 + 0.25 * 2 / 3 + 0.25 * 3 / 3
    assert float(jei_dnn.loss(same, LABELS, lambda_cost=0.0).detach()) == pytest.approx(float(ce), rel=1e-5)
    assert float(jei_dnn.loss(same, LABELS, lambda_cost=0.6).detach()) == pytest.approx(
        float(ce) + 0.6 * cost, rel=1e-5
    )
    jei_dnn.loss(same, LABELS, lambda_cost=0.6).backward()
    assert (same.exits[0].gate.grad < 0).all()  # with equal accuracy, opening the first gate is cheaper


def test_agreement_targets_are_argmax_agreement_with_the_final_layer():
    # exit 0 agrees with the final argmax on every row, exit 1 on none
    exits = [FINAL, [[-3.0, 1.0], [1.0, -1.0], [2.0, 0.0]]]
    right = _outputs(exits, FINAL, agreement=[[9.0] * 3, [-9.0] * 3])
    wrong = _outputs(exits, FINAL, agreement=[[-9.0] * 3, [9.0] * 3])
    assert float(agreement.loss(right).detach()) < 1e-3
    assert float(agreement.loss(wrong).detach()) > 8
    combined = with_agreement(self_distill.loss, weight=2.0)
    want = self_distill.loss(right, LABELS, temperature=3.0) + 2.0 * agreement.loss(right)
    assert torch.allclose(combined(right, LABELS, temperature=3.0), want)
    # the recipe's own hyperparameters still bind through the wrapper; unknown ones are refused
    stage = recipe_stages("self_distill")[0]
    _bind_hyper([stage.__class__(stage.name, combined, stage.trainable)], {"temperature": 3.0})
    with pytest.raises(ValueError, match=r"unknown recipe hyperparameters \['tempreature'\]"):
        _bind_hyper(recipe_stages("self_distill"), {"tempreature": 3.0})


# ---- the trainer in one process -------------------------------------------------------------------------------------
def _tiny_config(dropout: float = 0.1) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        pad_token_id=0,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def _tiny(dropout: float = 0.1) -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(_tiny_config(dropout)).eval()


def _texts(n: int, seed: int = 0) -> list[dict]:
    """Class 0 uses the first half of the vocabulary, class 1 the second: learnable by a bag of words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % 2
        words = [rng.choice(WORDS[:47] if y == 0 else WORDS[47:]) for _ in range(rng.randint(4, 10))]
        rows.append({"sentence": " ".join(words), "sentiment": ["neg", "pos"][y]})
    return rows


def _tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def _data(n: int = 48) -> LabelledTexts:
    rows = _texts(n)
    return LabelledTexts([r["sentence"] for r in rows], [int(r["sentiment"] == "pos") for r in rows], ["neg", "pos"])


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> bool:
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def test_two_stage_trains_the_model_then_only_the_heads():
    model = _tiny()
    heads = ExitHeads.for_model(model)
    m0, h0 = _params(model), _params(heads)
    train_exits(model, heads, _data(), tokenizer=_tokenizer(), epochs=[1, 0], lr=1e-3, batch_size=16, progress=False)
    m1, h1 = _params(model), _params(heads)
    assert not _same(m0, m1) and _same(h0, h1)  # stage 1 alone: backbone + final head moved, exits did not
    train_exits(model, heads, _data(), tokenizer=_tokenizer(), epochs=[0, 1], lr=1e-3, batch_size=16, progress=False)
    assert _same(m1, _params(model)) and not _same(h1, _params(heads))  # stage 2 alone: the backbone is frozen
    assert all(p.requires_grad for p in [*model.parameters(), *heads.parameters()])  # flags restored
    assert not model.training and not heads.training


def test_joint_training_lowers_the_loss_and_exits_learn():
    model = _tiny()
    heads = ExitHeads.for_model(model, extras=("agreement",))
    result = train_exits(
        model, heads, _data(64), tokenizer=_tokenizer(), recipe="joint", epochs=[10, 1], lr=3e-3, batch_size=16,
        fit_agreement=True, progress=False,
    )  # fmt: skip
    losses = [e["mean_loss"] for e in result.epoch_losses if e["stage"] == "joint"]
    assert result.stages == ["joint", "agreement"]
    assert losses[-1] < 0.5 * losses[0]
    batch = {k: v for k, v in _tokenizer()([r["sentence"] for r in _texts(32, seed=1)], return_tensors="pt",
                                          padding=True).items()}  # fmt: skip
    out = all_exit_outputs(model, heads, **batch)
    truth = torch.tensor([i % 2 for i in range(32)])
    assert (out.exits[0].logits.argmax(-1) == truth).float().mean() > 0.8  # held-out texts, first exit


def test_head_lr_gives_the_exit_heads_their_own_learning_rate():
    model = _tiny()
    heads = ExitHeads.for_model(model)
    m0, h0 = _params(model), _params(heads)
    result = train_exits(
        model, heads, _data(), tokenizer=_tokenizer(), recipe="joint", epochs=1, lr=1e-12, head_lr=1e-2,
        batch_size=16, progress=False,
    )  # fmt: skip
    assert _same(m0, _params(model), atol=1e-9)  # the backbone barely moves at lr 1e-12 ...
    moved = max((h0[k] - v).abs().max().item() for k, v in _params(heads).items())
    assert moved > 1e-3  # ... while the heads take steps of about 1e-2
    assert result.head_lr == 1e-2
    with pytest.raises(ValueError, match="head_lr must be positive"):
        train_exits(model, heads, _data(), tokenizer=_tokenizer(), head_lr=0.0, progress=False)


def test_recipe_needing_an_extra_refuses_heads_without_it():
    model = _tiny()
    with pytest.raises(ValueError, match=r"needs exit heads with the extras \['halting'\]"):
        train_exits(model, ExitHeads.for_model(model), _data(), tokenizer=_tokenizer(), recipe="palbert")


def test_resume_from_a_checkpoint_gives_the_uninterrupted_result(tmp_path):
    kwargs = dict(recipe="palbert", epochs=2, lr=2e-3, batch_size=16, progress=False, hyper={"beta": 0.05})

    def fresh():
        model = _tiny(dropout=0.0)  # no dropout: the only randomness is the data order, which checkpoints replay
        torch.manual_seed(1)
        return model, ExitHeads.for_model(model, extras=("halting",))

    model, heads = fresh()
    full = train_exits(model, heads, _data(), tokenizer=_tokenizer(), output_dir=tmp_path / "a", checkpoint_every=2,
                       **kwargs)  # fmt: skip
    steps = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert steps == ["step-0000002", "step-0000004", "step-0000006"]  # 3 batches an epoch, 2 epochs
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-0000004", tmp_path / "b" / "checkpoints" / "step-0000004")
    assert latest_checkpoint(tmp_path / "b").name == "step-0000004"  # mid second epoch
    model2, heads2 = fresh()
    resumed = train_exits(model2, heads2, _data(), tokenizer=_tokenizer(), output_dir=tmp_path / "b", resume=True,
                          **kwargs)  # fmt: skip
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-4)
    assert _same(_params(model), _params(model2), atol=1e-5) and _same(_params(heads), _params(heads2), atol=1e-5)
    with pytest.raises(FileExistsError, match="not empty"):
        train_exits(model, heads, _data(), tokenizer=_tokenizer(), output_dir=tmp_path / "a", **kwargs)


# ---- two processes through accelerate launch ------------------------------------------------------------------------
def test_two_process_training_with_accelerate_launch(tmp_path):
    folder = tmp_path / "tiny"
    _tiny().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _texts(128)))
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "depthprune", "train-exits", "--model", str(folder), "--data", str(data),
        "--text-column", "sentence", "--label-column", "sentiment", "--train", "96", "--calibration", "0",
        "--recipe", "two_stage", "--epochs", "6", "3", "--lr", "3e-3", "--batch-size", "8", "--max-length", "16",
        "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["num_processes"] == 2
    assert len(log["samples_per_rank"]) == 2 and min(log["samples_per_rank"]) > 0  # both ranks trained
    assert log["checksums"][0] == pytest.approx(log["checksums"][1], rel=0, abs=1e-9)  # gradients were synchronized
    stage1 = [e["mean_loss"] for e in log["epoch_losses"] if e["stage"] == "fine-tune"]
    stage2 = [e["mean_loss"] for e in log["epoch_losses"] if e["stage"] == "exit heads"]
    assert stage1[-1] < 0.7 * stage1[0] and stage2[-1] < stage2[0]
    # the output is an ordinary HF model + tokenizer, with the exit heads beside it
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.id2label == {0: "neg", 1: "pos"}
    heads = ExitHeads.load(out, model)
    assert heads.config.layers == (0, 1)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    rows = _texts(32, seed=1)
    batch = dict(tok([r["sentence"] for r in rows], return_tensors="pt", padding=True))
    with torch.no_grad():
        final = all_exit_outputs(model, heads, **batch).final
    truth = torch.tensor([int(r["sentiment"] == "pos") for r in rows])
    assert (final.argmax(-1) == truth).float().mean() > 0.8
    report = json.loads((out / "eval_test.json").read_text())
    assert report["num_examples"] == 32 and len(report["exits"]) == 2
    assert latest_checkpoint(out) is None  # no checkpoints asked for
    assert Path(out / "exit_heads.safetensors").is_file()
