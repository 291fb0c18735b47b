"""`depthprune report`: one page from the benchmarks' JSON files, opened in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from depthprune.bench.overview import build_report, pareto_front
from depthprune.cli.main import main

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PNG = b"\x89PNG\r\n\x1a\n"


def _results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    machine = {"platform": "Linux", "cpu_count": 2, "load_average": [1.0, 2.0, 3.0]}
    rows = [
        {"config": f"max_prob:{t}", "agreement": a, "speedup_b1": s, "extra": {"ms": 1.0}}
        for t, a, s in ((0.9, 0.99, 1.1), (0.8, 0.95, 1.4), (0.7, 0.97, 1.3), (0.6, 0.80, 1.2))
    ]
    (results / "exits.json").write_text(json.dumps({"rows": rows, "baseline_tok_s": {"1": 11.5}, "machine": machine}))
    by_n = {"4": {"ppl": 110.0, "executed_layers": 26}, "8": {"ppl": 180.0, "executed_layers": 22}}
    (results / "sub" / "prune.json").write_text(json.dumps({"untouched_heldout_ppl": 81.4, "by_n": by_n}))
    (results / "broken.json").write_text("{not json")
    return results


def test_pareto_front_keeps_the_undominated_points():
    points = [(1.1, 0.99), (1.4, 0.95), (1.3, 0.97), (1.2, 0.80)]
    assert pareto_front(points, higher_is_better=True) == [0, 2, 1]
    assert pareto_front([(1.0, 100.0), (1.2, 90.0), (1.3, 200.0)], higher_is_better=False) == [1, 2]


def test_report_has_every_table_plots_machines_and_baselines(tmp_path):
    report = build_report(_results(tmp_path), tmp_path / "out" / "r.html")  # the broken file is skipped
    assert [t.title for t in report.tables] == ["exits.json: rows", "sub/prune.json: by_n"]
    assert {(p.quality, p.x, p.measured_speed) for p in report.plots} == {
        ("agreement", "speedup_b1", True),
        ("ppl", "executed_layers", False),
    }
    for p in report.plots:
        assert p.png.read_bytes().startswith(PNG) and p.png.stat().st_size > 5000
    page = report.html.read_text()
    assert page.count("<table>") == 4  # two benchmark tables, machines, baselines
    assert "baseline_tok_s.1" in page and "untouched_heldout_ppl" in page and "max_prob:0.8" in page
    assert "extra.ms" in page  # nested records flattened one level
    md = report.markdown.read_text()
    assert "### exits.json: rows" in md and "![" in md and "| Linux |" in md


def _render(report, tmp_path: Path) -> None:
    """Open the report in headless Chromium: every plot decodes, every table is in the DOM, the screenshot shows
    plots (many colours, not a blank page)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    url = report.html.as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'data-plots-ok="true"' in dom  # every <img> decoded (the page's own load check)
    assert dom.count("<table>") == len(report.tables) + 2  # every benchmark table, machines, baselines
    assert len(re.findall(r"<img ", dom)) == len(report.plots)
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1300,1800", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (1800, 1300)
    assert pixels[..., :3].std() > 0.05  # not a blank page: the first plots are in view
    assert len({tuple(p) for p in (pixels[::7, ::7, :3] * 255).astype(int).reshape(-1, 3)}) > 50  # plot colours


def test_cli_report_renders_in_headless_chromium(tmp_path):
    results = _results(tmp_path)
    assert main(["report", str(results), "-o", str(tmp_path / "r.html")]) == 0
    _render(build_report(results, tmp_path / "r.html"), tmp_path)


@pytest.mark.real
def test_report_of_the_benchmarks_folder_renders_in_headless_chromium(tmp_path):
    """Every JSON file the benchmarks wrote (benchmarks/ in this repository): its tables all render."""
    report = build_report(BENCHMARKS, tmp_path / "report.html")
    assert len(report.plots) >= 10 and len(report.tables) >= 40
    _render(report, tmp_path)
