"""`depthprune diffusion sample` on a tiny saved DiT: a PNG grid, and clear errors for a model without exit modules,
a threshold out of range and steps < 1."""

from __future__ import annotations

from tiny_models import build_dit

from depthprune.cli.main import main
from depthprune.diffusion.train import build_scheduler, save_diffusion


def test_sample_writes_a_grid_and_refuses_bad_input(tmp_path, capsys):
    folder = tmp_path / "dit"
    folder.mkdir()
    save_diffusion(folder, build_dit(), build_scheduler(), {"shape": {}})
    grid = tmp_path / "grid.png"
    assert main(["diffusion", "sample", str(folder), "--steps", "2", "--per-class", "1", "-o", str(grid)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"
    assert main(["diffusion", "sample", str(folder), "--exit", "uncertainty:0.1", "-o", str(grid)]) == 2
    assert "has no exit modules" in capsys.readouterr().err
    assert main(["diffusion", "sample", str(folder), "--exit", "uncertainty:1.5", "-o", str(grid)]) == 2
    assert "in [0, 1]" in capsys.readouterr().err
    assert main(["diffusion", "sample", str(folder), "--steps", "0", "-o", str(grid)]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
