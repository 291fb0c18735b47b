"""DeeDiff's threshold by Learn-then-Test on a tiny random DiT: the feature tolerance bounds the FID increase, the
safest threshold gives the full model's samples exactly, thresholds are tested fixed-sequence from the safest, the
chosen one is written beside the UEMs and `sample --exit uncertainty:auto` uses it; bad input gets a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import build_dit, write_fashion_mnist

from depthprune.cli.main import main
from depthprune.diffusion import calibrate as cal
from depthprune.diffusion.classifier import FashionCNN, save_classifier
from depthprune.diffusion.fid import frechet_distance
from depthprune.diffusion.io import save_uems
from depthprune.diffusion.train import build_scheduler, save_diffusion
from depthprune.diffusion.uem import UEMConfig, UEMStack

LABELS = torch.arange(10).repeat_interleave(3)  # 30 samples: 0.9 ** 30 < 0.05, so zero losses certify delta 0.1


def _uems(model, seed=0, bias=0.0):
    torch.manual_seed(seed)
    uems = UEMStack(UEMConfig(num_layers=3, width=model.inner_dim, rank=8, time_dim=16)).eval()
    with torch.no_grad():
        for head in uems.heads:
            head.out.bias.fill_(bias)
    return uems


def _classifier():
    torch.manual_seed(0)
    return FashionCNN().eval()


def test_samples_within_the_tolerance_keep_the_fid_increase_within_the_budget():
    g = torch.Generator().manual_seed(0)
    reference, full = torch.randn(300, 6, generator=g), torch.randn(40, 6, generator=g) * 1.5 + 0.5
    fid = frechet_distance(full, reference)
    for budget in (0.1, 0.5):
        tol = cal.feature_tolerance(budget, fid, len(full))
        for _ in range(20):
            step = torch.randn(40, 6, generator=g)
            moved = full + step / step.norm(dim=1, keepdim=True) * tol  # every sample moved by exactly tau
            assert frechet_distance(moved, reference) <= (1 + budget) * fid + 1e-9
    # and the bound is not vacuous: moving every sample the same way by 3 tau breaks it
    shift = (full.mean(0) - reference.mean(0)) / (full.mean(0) - reference.mean(0)).norm()
    assert frechet_distance(full + 3 * cal.feature_tolerance(0.1, fid, 40) * shift, reference) > 1.1 * fid


def test_the_safest_threshold_is_the_full_model_and_testing_stops_at_the_first_failure():
    model, sched, classifier = build_dit(), build_scheduler(), _classifier()
    uems = _uems(model)  # uncertainties near 0.5: thresholds above exit early, below never
    kw = dict(steps=2, seed=0, batch_size=16)
    full = cal.draw(model, sched, uems, classifier, LABELS, None, **kw)
    never = cal.draw(model, sched, uems, classifier, LABELS, 0.0, **kw)
    assert torch.equal(never.features, full.features) and never.mean_layers == full.mean_layers == 3
    result = cal.calibrate_threshold(model, sched, uems, classifier, LABELS, delta=0.1, tolerance=1e-6,
                                     grid=[0.9, 0.0, 0.3], full=full, **kw)  # fmt: skip
    thresholds = [r["threshold"] for r in result.table]
    assert thresholds == [0.0, 0.3, 0.9][: len(thresholds)]  # ascending: the safest first
    assert result.table[0]["risk"] == 0 and result.table[0]["rejected"]
    assert not result.table[-1]["rejected"] and all(r["rejected"] for r in result.table[:-1])
    assert result.threshold == result.table[-2]["threshold"] and result.table[-1]["mean_layers"] < 3
    assert "with probability >= 0.95" in result.guarantee()
    loose = cal.calibrate_threshold(model, sched, uems, classifier, LABELS, delta=0.1, tolerance=1e9, grid=[0.0, 0.9],
                                    full=full, **kw)  # fmt: skip
    assert loose.threshold == 0.9 and loose.table[-1]["mean_layers"] == 1  # nothing moves beyond 1e9: all pass
    few = cal.calibrate_threshold(model, sched, uems, classifier, LABELS[:5], risk="class", delta=0.1, grid=[0.0],
                                  **kw)  # fmt: skip
    assert few.threshold is None and "no threshold certified" in few.guarantee()  # 5 samples cannot certify 0.1


def test_bad_settings_get_a_clear_error():
    for bad, match in [(dict(delta=0.0), "--delta"), (dict(delta=1.5), "--delta"), (dict(epsilon=1.0), "--epsilon"),
                       (dict(max_fid_increase=0.0), "--max-fid-increase"), (dict(steps=0), "--steps"),
                       (dict(grid=[0.1, 1.5]), r"in \[0, 1\]"), (dict(risk="fid"), "risk must be"),
                       (dict(tolerance=-1.0), "--tolerance")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            cal.check_settings(**{"delta": 0.1, "epsilon": 0.05, **bad})
    model = build_dit()
    with pytest.raises(ValueError, match="needs a tolerance"):
        cal.calibrate_threshold(model, build_scheduler(), _uems(model), _classifier(), LABELS)


def test_cli_calibrate_writes_the_threshold_that_sample_auto_uses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEPTHPRUNE_FASHION_MNIST", str(write_fashion_mnist(tmp_path / "fmnist")))
    model, folder = build_dit(), tmp_path / "dit"
    folder.mkdir()
    save_diffusion(folder, model, build_scheduler(), {"shape": {}})
    save_classifier(_classifier(), tmp_path / "clf")
    base = ["diffusion", "calibrate", str(folder), "--classifier", str(tmp_path / "clf"), "--steps", "2",
            "--per-class", "3", "--heldout-per-class", "2", "--reference", "32"]  # fmt: skip
    assert main(base) == 2
    assert "has no exit modules" in capsys.readouterr().err
    save_uems(_uems(model), folder)
    for bad, match in [(["--delta", "1.2"], "--delta"), (["--steps", "0"], "--steps"), (["--grid", "2"], "in [0, 1]")]:
        assert main([*base, *bad]) == 2
        assert match in capsys.readouterr().err
    grid = tmp_path / "grid.png"
    sample = ["diffusion", "sample", str(folder), "--exit", "uncertainty:auto", "--steps", "2", "--per-class", "1",
              "-o", str(grid)]  # fmt: skip
    assert main(sample) == 2
    assert "no calibrated threshold" in capsys.readouterr().err
    assert main([*base, "--grid", "0", "0.9", "--tolerance", "1e9"]) == 0
    out = capsys.readouterr().out
    assert "with probability >= 0.95" in out and "held-out check" in out
    record = json.loads(cal.calibration_path(folder).read_text())[0]
    assert record["threshold"] == 0.9 and record["heldout"]["mean_layers"] == 1 and "fid_increase" in record["heldout"]
    assert main(sample) == 0
    assert json.loads(capsys.readouterr().out)["policy"] == "uncertainty:0.9" and grid.read_bytes()[:4] == b"\x89PNG"
    assert main([*sample[:6], "3", *sample[7:]]) == 0  # another step count: the guarantee does not carry over
    assert "calibrated for 2 ddim steps" in capsys.readouterr().err
    kept = cal.calibration_path(folder).read_text()
    save_uems(_uems(model, seed=5), folder)  # retrained UEMs: the old calibration is gone with the old folder
    assert not cal.calibration_path(folder).exists()
    cal.calibration_path(folder).write_text(kept)  # and one copied back does not pass for the new weights
    assert main(sample) == 2
    assert "changed since" in capsys.readouterr().err
