"""The one training loop (depthprune.training): a loss and its parameters in, a record out; output folders refused
before any step; metrics reduced; the folder a model came from never written."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import build

from depthprune.errors import OutputExistsError
from depthprune.training import (
    TrainRun,
    TrainStage,
    check_output_dir,
    check_token_blocks,
    latest_checkpoint,
    train,
    train_stages,
)


def _line_data(n: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=g)
    return torch.cat([x, 3 * x + 1], dim=1)  # rows (x, y) on y = 3x + 1


def test_a_loss_function_with_parameter_groups_and_metrics():
    w, b = torch.nn.Parameter(torch.zeros(())), torch.nn.Parameter(torch.zeros(()))

    def loss(batch):
        err = w * batch[:, 0] + b - batch[:, 1]
        return {"loss": err.pow(2).mean(), "abs": err.abs().mean(), "pair": torch.stack([w, b]).detach()}

    run = train(loss, [{"params": [w], "lr": 0.1}, {"params": [b]}], _line_data(), epochs=20, lr=0.05, batch_size=8,
                warmup=0.0, progress=False)  # fmt: skip
    assert len(run.history) == 60 and run.global_step == 60 and run.num_processes == 1
    first, last = run.epoch_losses[0], run.epoch_losses[-1]
    assert last["loss"] < 0.05 * first["loss"] and last["metrics"]["abs"] < first["metrics"]["abs"]
    assert len(last["metrics"]["pair"]) == 2 and last["steps"] == last["total_steps"] == 3
    assert run.checksums == [pytest.approx(float(w + b))] and run.samples_per_rank == [24 * 20]
    assert TrainRun.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    record = run.record()  # what every method's result keeps of the run
    assert record["history"] == [h["loss"] for h in run.history] and record["num_processes"] == 1
    assert [e["steps"] for e in record["epoch_losses"]] == [3] * 20
    assert (
        record["epoch_losses"][-1]["loss"] == last["loss"]
        and record["epoch_losses"][-1]["abs"] == last["metrics"]["abs"]
    )
    assert record["train_seconds"] == run.train_seconds and record["output_dir"] is None


@pytest.mark.parametrize(
    "blocks, settings, message",
    [
        (torch.zeros(2, 4), (1, 1, 1e-3), "integer tensor"),
        (torch.zeros(4, dtype=torch.long), (1, 1, 1e-3), "integer tensor"),
        (torch.zeros(0, 4, dtype=torch.long), (1, 1, 1e-3), "at least one block of >= 2 tokens"),
        (torch.zeros(2, 1, dtype=torch.long), (1, 1, 1e-3), r"shape \(2, 1\)"),
        (torch.zeros(2, 4, dtype=torch.long), (-1, 1, 1e-3), "epochs must be >= 0"),
        (torch.zeros(2, 4, dtype=torch.long), (1, 0, 1e-3), "batch_size >= 1"),
        (torch.zeros(2, 4, dtype=torch.long), (1, 1, 0.0), "lr > 0"),
    ],
)
def test_token_blocks_and_settings_are_checked_with_what_was_given(blocks, settings, message):
    with pytest.raises(ValueError, match=message):
        check_token_blocks(blocks, *settings, min_len=2)
    check_token_blocks(torch.zeros(2, 4, dtype=torch.long), 1, 1, 1e-3, min_len=2)  # a good call passes


def test_flags_and_modes_come_back_and_stages_train_only_their_parameters():
    model = build("llama")
    model.train()
    first, second = model.model.layers[0], model.model.layers[1]
    ids = torch.randint(3, 50, (8, 6), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(batch):
        return model(input_ids=batch, labels=batch).loss

    stages = [TrainStage(loss, list(first.parameters()), epochs=1, lr=1e-2, name="a"),
              TrainStage(loss, list(second.parameters()), epochs=0, lr=1e-2, name="b")]  # fmt: skip
    run = train_stages(stages, ids, batch_size=4, frozen=[model], progress=False)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith("model.layers.0.") for k in moved)  # stage b has no epoch
    assert [e["stage"] for e in run.epoch_losses] == ["a"] and run.stages == ["a", "b"]
    assert all(p.requires_grad for p in model.parameters()) and model.training  # as they were


class _LMLoss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss


def test_output_folders_are_refused_before_any_step(tmp_path):
    calls = []
    w = torch.nn.Parameter(torch.zeros(()))

    def loss(batch):
        calls.append(1)
        return (w - batch).pow(2).mean()

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty; choose a new folder or pass overwrite=True"):
        train(loss, [w], torch.ones(4), output_dir=full, progress=False)
    with pytest.raises(OutputExistsError, match="not empty"):  # resume does not take a folder with other files
        train(loss, [w], torch.ones(4), output_dir=full, resume=True, progress=False)
    model = build("llama")
    model.save_pretrained(tmp_path / "source")
    model = type(model).from_pretrained(tmp_path / "source")
    with pytest.raises(OutputExistsError, match="loaded from"):  # never, even with overwrite
        check_output_dir(tmp_path / "source", overwrite=True, sources=[tmp_path / "source"])
    with pytest.raises(OutputExistsError, match="loaded from"):  # the loop finds the source in the loss module
        train(_LMLoss(model), list(model.parameters()), torch.ones(4, 3, dtype=torch.long),
              output_dir=tmp_path / "source", overwrite=True, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="need an output_dir"):
        train(loss, [w], torch.ones(4), checkpoint_every=1, progress=False)
    assert calls == [] and (full / "keep.txt").read_text() == "mine"
    # overwrite replaces the folder at the end, atomically, with what the savers write (default: train_log.json)
    run = train(loss, [w], torch.ones(4), batch_size=2, output_dir=full, overwrite=True, checkpoint_every=1,
                progress=False)  # fmt: skip
    assert sorted(p.name for p in full.iterdir()) == ["checkpoints", "train_log.json"]
    assert json.loads((full / "train_log.json").read_text())["global_step"] == run.global_step == 2
    assert latest_checkpoint(full).name == "step-0000002"
    with pytest.raises(ValueError, match="from a run of"):  # a checkpoint of another run is not resumed
        train(loss, [w], torch.ones(4), output_dir=full, overwrite=True, resume=True, fingerprint={"x": 1},
              progress=False)  # fmt: skip
