"""DeeDiff on a tiny random DiT: a threshold that never fires samples exactly what the model's own forward samples,
batched sampling equals each sample alone, UEMs save and load, exit training runs through the loop, bad input fails
clearly, and the Frechet distance is zero on equal sets."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_dit

from depthprune.diffusion.exit_train import train_uems
from depthprune.diffusion.fid import frechet_distance
from depthprune.diffusion.io import load_uems, save_uems
from depthprune.diffusion.sample import parse_exit, sample
from depthprune.diffusion.train import build_scheduler
from depthprune.diffusion.uem import UEMConfig, UEMStack

LABELS = torch.tensor([0, 3, 7, 10])


def _uems(model, seed=0):
    torch.manual_seed(seed)
    return UEMStack(UEMConfig(num_layers=3, width=model.inner_dim, rank=8, time_dim=16)).eval()


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_a_threshold_that_never_fires_gives_the_full_models_samples(kind):
    model, sched = build_dit(), build_scheduler()
    full = sample(model, sched, LABELS, steps=3, scheduler=kind, seed=1)
    never = sample(model, sched, LABELS, steps=3, scheduler=kind, seed=1, policy="uncertainty:0", uems=_uems(model))
    assert torch.equal(full.images, never.images) and full.mean_layers == never.mean_layers == 3
    always = sample(model, sched, LABELS, steps=3, scheduler=kind, seed=1, policy="uncertainty:1", uems=_uems(model))
    assert always.mean_layers == 1 and not torch.equal(always.images, full.images)


@pytest.mark.parametrize("policy", ["uncertainty:0.5", "fixed:2", "late:1", "full"])
def test_batched_sampling_equals_each_sample_alone(policy):
    model, sched = build_dit(), build_scheduler()
    uems = _uems(model)
    with torch.no_grad():
        uems.heads[0].out.bias.fill_(0.0)  # an uncertainty near 0.5 at layer 1: some rows exit, some go on
    batch = sample(model, sched, LABELS, steps=3, seed=4, policy=policy, uems=uems, scheduler="ddpm")
    for j in range(len(LABELS)):
        alone = sample(model, sched, LABELS[j : j + 1], steps=3, seed=4, policy=policy, uems=uems, scheduler="ddpm",
                       first_index=j)  # fmt: skip
        torch.testing.assert_close(alone.images[0], batch.images[j], rtol=0, atol=1e-5)
        assert torch.equal(alone.layers[:, 0], batch.layers[:, j])


def test_static_schedules_run_their_depths():
    model, sched = build_dit(), build_scheduler()
    assert sample(model, sched, LABELS, steps=3, policy="fixed:2").layers.unique().tolist() == [2]
    assert sample(model, sched, LABELS, steps=3, policy="late:1").layers[:, 0].tolist() == [1, 2, 3]
    assert sample(model, sched, LABELS, steps=3, policy="early:1").layers[:, 0].tolist() == [3, 2, 1]


def test_uems_save_and_load(tmp_path):
    model = build_dit()
    uems = _uems(model, seed=3)
    save_uems(uems, tmp_path, extra={"mode": "frozen"})
    again = load_uems(tmp_path, num_layers=3)
    h, f = torch.randn(2, 49, 32), uems.time_features(torch.tensor([3, 900]))
    assert torch.equal(again(1, h, f), uems(1, h, f))
    with pytest.raises(ValueError, match="the model has 5"):
        load_uems(tmp_path, num_layers=5)
    with pytest.raises(FileNotFoundError, match="no exit modules.*train-exits"):
        load_uems(tmp_path / "elsewhere")


@pytest.mark.parametrize("mode", ["frozen", "joint"])
def test_exit_training_runs_through_the_loop_and_leaves_the_model_alone(mode):
    model, sched = build_dit(), build_scheduler()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.rand(16, 1, 28, 28) * 2 - 1, torch.arange(16) % 10
    config = UEMConfig(num_layers=3, width=32, rank=8, time_dim=16)
    trained, uems, run = train_uems(model, sched, images, labels, mode=mode, config=config, batch_size=8,
                                    progress=False)  # fmt: skip
    assert run.global_step == 2 and "uem_mse" in run.epoch_losses[0]["metrics"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    changed = any(not torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert changed == (mode == "joint")


def test_bad_input_gets_a_clear_error():
    model, sched = build_dit(), build_scheduler()
    with pytest.raises(ValueError, match="needs the model's UEMs"):
        sample(model, sched, LABELS, steps=2, policy="uncertainty:0.1")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        parse_exit("uncertainty:1.5")
    with pytest.raises(ValueError, match="steps must be"):
        sample(model, sched, LABELS, steps=0)
    with pytest.raises(ValueError, match="3 blocks"):
        parse_exit("fixed:4", 3)
    with pytest.raises(ValueError, match="cannot read exit policy"):
        parse_exit("sometimes")
    with pytest.raises(ValueError, match="mode must be"):
        train_uems(model, sched, torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), mode="both")


def test_frechet_distance():
    a = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, a + 1) == pytest.approx(4.0, rel=1e-6)


def test_training_can_go_on_from_a_trained_dit_and_leaves_it_alone():
    from depthprune.diffusion.train import shape_of, train_dit

    model = build_dit(depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8) % 10
    same, _, _ = train_dit(images, labels, init=model, epochs=0, batch_size=8, progress=False)  # no step: the init
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in before.items()) and shape_of(same) == shape_of(model)
    moved, _, _ = train_dit(images, labels, init=model, epochs=3, lr=1e-3, batch_size=4, progress=False)
    assert any(not torch.equal(v, moved.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input model is untouched


def test_the_x0_target_is_small_where_the_clean_image_is_predicted_well():
    from depthprune.diffusion.exit_train import exit_loss

    model, sched = build_dit(), build_scheduler()
    uems = UEMStack(UEMConfig(num_layers=3, width=32, rank=8, time_dim=16, target="x0"))
    images, labels = torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8) % 10
    torch.manual_seed(0)
    out = exit_loss(model, sched, uems, mode="frozen")((images, labels))
    assert out["loss"].requires_grad and out["exit_mae"].shape == (3,)
    assert float(out["exit_mae"].max()) <= float(torch.tanh(torch.tensor(2.0)))  # clamped images differ by <= 2
