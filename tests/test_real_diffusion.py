"""Real tier (pytest -m real): the trained DiT + UEMs and the Fashion-MNIST classifier committed under
benchmarks/artifacts/diffusion (RESULTS.md section 15). A threshold that never fires samples exactly what the full
model samples, a batch equals its samples drawn alone, and the full model's samples are recognisably of their class."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from depthprune.diffusion.classifier import accuracy, load_classifier
from depthprune.diffusion.io import load_uems
from depthprune.diffusion.sample import sample
from depthprune.diffusion.train import load_diffusion

pytestmark = pytest.mark.real
ARTIFACTS = Path(__file__).resolve().parents[1] / "benchmarks" / "artifacts" / "diffusion"


@pytest.fixture(scope="module")
def dit():
    torch.set_num_threads(1)
    model, scheduler, _ = load_diffusion(ARTIFACTS / "dit")
    return model, scheduler, load_uems(ARTIFACTS / "dit", num_layers=model.config.num_layers)


def test_a_threshold_that_never_fires_samples_exactly_what_the_full_model_samples(dit):
    model, sched, uems = dit
    labels = torch.arange(10)
    full = sample(model, sched, labels, steps=8, seed=3)
    never = sample(model, sched, labels, steps=8, seed=3, policy="uncertainty:0", uems=uems)
    assert torch.equal(never.images, full.images) and never.mean_layers == 8
    some = sample(model, sched, labels, steps=8, seed=3, policy="uncertainty:0.3", uems=uems)
    assert some.mean_layers < 8 and not torch.equal(some.images, full.images)  # it can exit, and it changes samples


def test_a_batch_equals_its_samples_drawn_alone(dit):
    model, sched, uems = dit
    labels = torch.tensor([0, 5, 9])
    batch = sample(model, sched, labels, steps=6, seed=1, policy="uncertainty:0.3", uems=uems)
    assert 1 < batch.mean_layers < 8  # rows leave the batch at different blocks
    for j in range(len(labels)):
        alone = sample(model, sched, labels[j : j + 1], steps=6, seed=1, policy="uncertainty:0.3", uems=uems,
                       first_index=j)  # fmt: skip
        assert torch.equal(alone.layers[:, 0], batch.layers[:, j])
        torch.testing.assert_close(alone.images[0], batch.images[j], rtol=0, atol=1e-4)


def test_the_full_models_samples_are_of_their_class_above_chance():
    model, sched, _ = load_diffusion(ARTIFACTS / "dit")
    classifier, _ = load_classifier(ARTIFACTS / "classifier")
    labels = torch.arange(10).repeat_interleave(3)
    images = sample(model, sched, labels, steps=20, seed=0).images
    assert accuracy(classifier, images, labels) >= 0.25  # chance is 0.1 (section 15 measured 0.40 on 100 samples)


def test_the_committed_calibration_holds_for_the_committed_uems():
    from depthprune.diffusion.calibrate import calibrated_threshold

    for name in ("dit", "dit-joint"):  # RESULTS.md section 20: both certified 0.05 (features within the FID budget)
        threshold, record = calibrated_threshold(ARTIFACTS / name)
        assert threshold == 0.05 and record["heldout"]["fid_increase"] < 0.1 and record["n"] == 100
