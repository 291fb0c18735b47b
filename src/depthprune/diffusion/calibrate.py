"""Choose DeeDiff's uncertainty threshold by Learn-then-Test (depthprune.ltt), as the exits and the routers do.

FID is a statistic of a whole set of samples, so Learn-then-Test, which needs one loss per sample, tests a per-sample
risk that controls it. Each calibration sample (a class label, a seed, its own noise) is drawn twice from the same
noise: by the full model and with early exit at threshold T; its loss is 1 when the two samples' domain-classifier
features lie farther apart than a tolerance tau (risk "features"), or when the classifier puts them in different
classes (risk "class"). Why tau bounds FID: the Frechet distance is the Wasserstein-2 distance between the Gaussians
fitted to two feature sets, so it obeys the triangle inequality, and it is at most the W2 distance of the sets
themselves (Gelbrich's bound), which pairing each sample with its full-model twin bounds by their largest distance.
Hence if every sample moved by <= tau = (sqrt(1 + e) - 1) * sqrt(FID_full * (n - 1) / n), the set's FID would rise by
at most the fraction e (`feature_tolerance`; (n - 1) / n: torch.cov's unbiased covariances). Learn-then-Test certifies
that at most a share delta of samples moves further than that; the FID increase itself is measured on held-out seeds
beside the guarantee, never promised. tau comes from the full model's FID on the held-out seeds (not the calibration
ones, so the loss is fixed before the calibration draw is seen) unless it is given.

Thresholds are tested fixed-sequence from the safest: T = 0 never exits (the full model's samples exactly), then
upwards; the chosen one is the most aggressive certified. It is written beside the UEMs (`uem/calibration.json`, with
the hash of the UEM weights it holds for) so that `sample --exit uncertainty:auto` uses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from depthprune.diffusion.fid import classifier_features, frechet_distance
from depthprune.diffusion.io import UEM_FOLDER, WEIGHTS_NAME
from depthprune.diffusion.sample import ExitPolicy, sample_batches
from depthprune.ltt import ltt_select

GRID = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
RISKS = ("features", "class")
CALIBRATION_FILE = "calibration.json"
AUTO = "uncertainty:auto"


def check_settings(
    *,
    delta: float,
    epsilon: float,
    max_fid_increase: float | None = None,
    steps: int = 1,
    grid: Sequence[float] = GRID,
    risk: str = "features",
    tolerance: float | None = None,
) -> list[float]:
    """Every setting of a calibration checked before any sampling (a clear error naming the bad one); returns the
    candidate thresholds in testing order (ascending: the safest first)."""
    if not 0 < delta < 1:
        raise ValueError(f"--delta (the share of samples allowed beyond the tolerance) must lie in (0, 1), got {delta}")
    if not 0 < epsilon < 1:
        raise ValueError(f"--epsilon (1 - the confidence of the guarantee) must lie in (0, 1), got {epsilon}")
    if max_fid_increase is not None and not max_fid_increase > 0:
        raise ValueError(f"--max-fid-increase must be > 0 (0.1: FID at most 10% above the full model's), "
                         f"got {max_fid_increase}")  # fmt: skip
    if tolerance is not None and not tolerance > 0:
        raise ValueError(f"--tolerance must be > 0 (a distance between classifier features), got {tolerance}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be a whole number >= 1, got {steps!r}")
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}, got {risk!r}")
    thresholds = sorted(float(t) for t in grid)
    bad = [t for t in thresholds if not 0.0 <= t <= 1.0]
    if not thresholds or bad:
        raise ValueError(f"candidate thresholds must lie in [0, 1] (UEM outputs are sigmoids), got {list(grid)}")
    return thresholds


def feature_tolerance(max_fid_increase: float, full_fid: float, n: int) -> float:
    """The per-sample feature distance tau such that a set of n samples each within tau of its full-model twin has
    FID <= (1 + max_fid_increase) * full_fid (see the module doc)."""
    if n < 2 or full_fid < 0:
        raise ValueError(f"the tolerance needs >= 2 samples and a FID >= 0, got n={n}, FID={full_fid}")
    return (math.sqrt(1 + max_fid_increase) - 1) * math.sqrt(full_fid * (n - 1) / n)


@dataclasses.dataclass
class Draw:
    """The samples of one set of labels and seeds under one policy: classifier features [n, d], classes [n], mean
    blocks per step."""

    features: torch.Tensor
    classes: torch.Tensor
    mean_layers: float


def draw(model, scheduler, uems, classifier, labels: torch.Tensor, threshold: float | None, *, steps: int,
         seed: int, kind: str = "ddim", batch_size: int = 64) -> Draw:  # fmt: skip
    """Sample `labels` (threshold None: the full model; else uncertainty:threshold) and describe the samples."""
    policy = ExitPolicy("full") if threshold is None else ExitPolicy("uncertainty", threshold)
    out = sample_batches(model, scheduler, labels, steps=steps, policy=policy, uems=uems, seed=seed, scheduler=kind,
                         batch_size=batch_size)  # fmt: skip
    features = classifier_features(classifier, out.images)
    with torch.no_grad():
        classes = classifier.head(features.to(next(classifier.parameters()).dtype)).argmax(-1)
    return Draw(features, classes, out.mean_layers)


def sample_losses(got: Draw, full: Draw, risk: str, tolerance: float | None) -> torch.Tensor:
    """Per-sample 0/1 losses [n] of `got` against the full model's samples from the same noise."""
    if risk == "class":
        return (got.classes != full.classes).double()
    return ((got.features - full.features).norm(dim=1) > tolerance).double()


@dataclasses.dataclass
class DiffusionCalibration:
    """The chosen threshold (None: not even the safest candidate was certified) and one row per tested threshold
    (threshold, risk, p_value, rejected, mean_layers, class_agreement, mean_distance)."""

    risk: str
    threshold: float | None
    delta: float
    epsilon: float
    n: int
    tolerance: float | None
    table: list[dict[str, Any]]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def _what(self) -> str:
        if self.risk == "class":
            return "the share of samples whose class (by the domain classifier) differs from the full model's sample"
        return (f"the share of samples whose classifier features lie farther than {self.tolerance:.4g} from the full "
                "model's sample from the same noise")  # fmt: skip

    def guarantee(self) -> str:
        if self.threshold is None:
            return (f"DeeDiff: no threshold certified: even the safest candidate could not be shown to keep "
                    f"{self._what()} <= {self.delta:g} at confidence {1 - self.epsilon:g} on {self.n} calibration "
                    "samples; use more samples or a larger delta")  # fmt: skip
        row = next(r for r in self.table if r["threshold"] == self.threshold)
        return (f"DeeDiff at uncertainty threshold {self.threshold:g} (mean {row['mean_layers']:.2f} blocks per step): "
                f"with probability >= {1 - self.epsilon:g} over the calibration draw ({self.n} samples), on new seeds "
                f"and labels from the same distribution {self._what()} is <= {self.delta:g} (Learn-then-Test, "
                "fixed-sequence testing)")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "guarantee": self.guarantee()}


def calibrate_threshold(
    model,
    scheduler,
    uems,
    classifier,
    labels: torch.Tensor,
    *,
    delta: float = 0.1,
    epsilon: float = 0.05,
    risk: str = "features",
    tolerance: float | None = None,
    steps: int = 20,
    seed: int = 0,
    kind: str = "ddim",
    batch_size: int = 64,
    grid: Sequence[float] = GRID,
    full: Draw | None = None,
) -> DiffusionCalibration:
    """The most aggressive uncertainty threshold certified to keep `risk` (see the module doc) <= delta with
    probability >= 1 - epsilon, on calibration samples of `labels` [n] drawn with `seed`. `full`: the full model's
    draw of the same labels and seed, when already made."""
    thresholds = check_settings(delta=delta, epsilon=epsilon, steps=steps, grid=grid, risk=risk, tolerance=tolerance)
    if risk == "features" and tolerance is None:
        raise ValueError("risk 'features' needs a tolerance (see feature_tolerance, or give --tolerance)")
    if uems is None:
        raise ValueError("calibration needs the model's UEMs (train them with `diffusion train-exits`)")
    kw = dict(steps=steps, seed=seed, kind=kind, batch_size=batch_size)
    full = full or draw(model, scheduler, uems, classifier, labels, None, **kw)
    draws: dict[float, Draw] = {}

    def run(t: float) -> Draw:
        if t not in draws:
            # T = 0 never exits (uncertainties are sigmoids, > 0): the full model's samples, proven in the tests
            draws[t] = full if t == 0 else draw(model, scheduler, uems, classifier, labels, t, **kw)
        return draws[t]

    def extra(t: float) -> dict[str, Any]:
        d = run(t)
        return {"mean_layers": d.mean_layers, "class_agreement": float((d.classes == full.classes).double().mean()),
                "mean_distance": float((d.features - full.features).norm(dim=1).mean())}  # fmt: skip

    chosen, table = ltt_select(thresholds, lambda t: sample_losses(run(t), full, risk, tolerance), delta, epsilon,
                               extra)  # fmt: skip
    settings = {"steps": steps, "scheduler": kind, "seed": seed, "num_layers": uems.config.num_layers}
    return DiffusionCalibration(risk, chosen, delta, epsilon, len(labels), tolerance, table, settings)


def check_threshold(
    model,
    scheduler,
    uems,
    classifier,
    labels: torch.Tensor,
    threshold: float,
    *,
    full: Draw,
    risk: str = "features",
    tolerance: float | None = None,
    reference: torch.Tensor | None = None,
    steps: int = 20,
    seed: int = 1,
    kind: str = "ddim",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Held-out figures at `threshold` beside the full model's draw `full` of the same labels and seed: the risk,
    class agreement, mean blocks, and (with `reference` images) FID of both and the relative FID increase."""
    got = draw(model, scheduler, uems, classifier, labels, threshold, steps=steps, seed=seed, kind=kind,
               batch_size=batch_size)  # fmt: skip
    row = {
        "threshold": threshold,
        "n": len(labels),
        "risk": float(sample_losses(got, full, risk, tolerance).mean()),
        "class_agreement": float((got.classes == full.classes).double().mean()),
        "mean_layers": got.mean_layers,
    }
    if reference is not None:
        ref = classifier_features(classifier, reference)
        fid_full, fid = frechet_distance(full.features, ref), frechet_distance(got.features, ref)
        row.update({"fid_full": fid_full, "fid": fid, "fid_increase": fid / fid_full - 1})
    return row


def uem_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of the UEM weights saved beside the model at `path` (a calibration holds for those weights only)."""
    return hashlib.sha256((Path(path).expanduser() / UEM_FOLDER / WEIGHTS_NAME).read_bytes()).hexdigest()


def calibration_path(path: str | os.PathLike) -> Path:
    return Path(path).expanduser() / UEM_FOLDER / CALIBRATION_FILE


def calibrated_threshold(path: str | os.PathLike) -> tuple[float, dict[str, Any]]:
    """(threshold, calibration record) written beside the UEMs of the model at `path` by `diffusion calibrate`; a
    clear error when there is none, none was certified, or the UEMs changed since."""
    file = calibration_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{Path(path)} has no calibrated threshold ({UEM_FOLDER}/{CALIBRATION_FILE}): run "
                                f"`depthprune diffusion calibrate {path} --classifier DIR` first, or give "
                                "--exit uncertainty:T")  # fmt: skip
    record = json.loads(file.read_text())[0]
    if record.get("settings", {}).get("uems_sha256") != uem_fingerprint(path):
        raise ValueError(f"the UEMs in {Path(path) / UEM_FOLDER} changed since {file} was written: calibrate again")
    if record["threshold"] is None:
        raise ValueError(f"{file} certified no threshold ({record['guarantee']}); give --exit uncertainty:T or "
                         "calibrate again with more samples or a larger --delta")  # fmt: skip
    return float(record["threshold"]), record


__all__ = ["AUTO", "CALIBRATION_FILE", "GRID", "RISKS", "DiffusionCalibration", "Draw", "calibrate_threshold",
           "calibrated_threshold", "calibration_path", "check_settings", "check_threshold", "draw",
           "feature_tolerance", "sample_losses", "uem_fingerprint"]  # fmt: skip
