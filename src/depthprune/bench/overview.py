"""One report of every method: an HTML page (and Markdown) built from the benchmarks' JSON outputs, not typed by hand.

Every JSON file under a results folder is read; every list of records in it (at any depth) becomes a table. Where a
table has a quality column and a measured speed column, its points go on a Pareto plot (PNG): quality against
measured speedup over the untouched model, the frontier drawn; where it has quality and depth only, quality against
the layers executed. Overview plots put every benchmark's points that share a quality metric on one chart. The
machines the figures were measured on and the untouched baselines are listed from the same files.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from depthprune.fsutil import atomic_folder, write_atomic

QUALITY: dict[str, bool] = {
    "agreement": True,
    "agreement_b1": True,
    "test_acc": True,
    "accuracy": True,
    "heldout_ppl": False,
    "ppl": False,
    "healed.ppl": False,
    "unhealed.ppl": False,
    "healed": True,
    "unhealed": True,
}
"""Quality columns, first found wins (value: higher is better)."""

SPEED = ("speedup_b1", "decode_speedup", "speedup", "e2e_speedup_b1")
"""Measured speedup columns (over the untouched model in the same run), first found wins."""

DEPTH = ("executed_layers", "mean_layers", "layers", "n_layers", "n_remove")
LABEL = ("name", "config", "pipeline", "method", "criterion", "recipe", "scorer", "model", "exits")
MAX_ROWS = 40
BASELINE_KEY = re.compile(r"(baseline|untouched|full_acc|ppl_full|^full$)", re.I)


@dataclasses.dataclass
class Table:
    """One list of records found in a JSON file: its place (file and key path) and its rows (scalars only)."""

    file: str
    path: str
    rows: list[dict[str, Any]]

    @property
    def title(self) -> str:
        return f"{self.file}: {self.path}" if self.path else self.file

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row))
        return list(seen)

    def numeric(self, column: str) -> bool:
        values = [r.get(column) for r in self.rows if r.get(column) is not None]
        return bool(values) and all(_is_number(v) for v in values)

    def pick(self, names: Sequence[str]) -> str | None:
        return next((c for c in names if c in self.columns and self.numeric(c)), None)

    def label(self, row: Mapping[str, Any]) -> str:
        parts = [str(row[c]) for c in LABEL if isinstance(row.get(c), str) and row[c]]
        return " ".join(parts[:2]) or "?"


@dataclasses.dataclass
class Plot:
    title: str
    png: Path
    quality: str
    x: str
    measured_speed: bool


@dataclasses.dataclass
class Report:
    """What `build_report` wrote: the HTML and Markdown files, the plots, and the tables it rendered."""

    html: Path
    markdown: Path
    plots: list[Plot]
    tables: list[Table]
    files: list[str]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _scalar_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's scalar fields; nested dicts one level down as 'key.sub' (healed.ppl), lists of numbers skipped."""
    row: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            for sub, v in value.items():
                if isinstance(v, str | int | float | bool) or v is None:
                    row[f"{key}.{sub}"] = v
        elif isinstance(value, str | int | float | bool) or value is None:
            row[str(key)] = value
    return row


def find_tables(obj: Any, file: str, path: str = "", depth: int = 0) -> Iterator[Table]:
    """Every list of records (dicts) in `obj`, depth first."""
    if depth > 4:
        return
    if isinstance(obj, list) and obj and all(isinstance(x, Mapping) for x in obj):
        rows = [_scalar_row(x) for x in obj]
        if any(rows):
            yield Table(file, path, rows)
        for i, item in enumerate(obj):
            for key, value in item.items():
                if isinstance(value, list | Mapping):
                    yield from find_tables(value, file, f"{path}[{i}].{key}".lstrip("."), depth + 1)
    elif isinstance(obj, Mapping):
        records = [v for v in obj.values() if isinstance(v, Mapping)]
        if len(records) >= 2 and len(records) == len(obj) and all(_scalar_row(v) for v in records):
            yield Table(file, path, [{"key": str(k), **_scalar_row(v)} for k, v in obj.items()])  # a dict of records
        for key, value in obj.items():
            if key in ("machine", "raw_seconds", "rounds", "args"):
                continue
            if isinstance(value, list | Mapping):
                yield from find_tables(value, file, f"{path}.{key}".lstrip("."), depth + 1)


def find_machines(obj: Any, depth: int = 0) -> Iterator[dict[str, Any]]:
    if depth > 4:
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if key == "machine" and isinstance(value, Mapping):
                yield {k: (", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in value.items()}
            elif isinstance(value, list | Mapping):
                yield from find_machines(value, depth + 1)
    elif isinstance(obj, list):
        for item in obj[:4]:
            yield from find_machines(item, depth + 1)


def find_baselines(obj: Any, path: str = "", depth: int = 0) -> Iterator[tuple[str, float]]:
    """(key path, value) of the untouched model's figures: numbers whose key names it (baseline_tok_s,
    untouched_heldout_ppl, full_acc ...) and the quality columns of rows whose method is 'untouched'."""
    if depth > 5:
        return
    if isinstance(obj, Mapping):
        untouched_row = str(obj.get("method", "")).lower() == "untouched"
        for key, value in obj.items():
            here = f"{path}.{key}".lstrip(".")
            if key in ("machine", "raw_seconds", "rounds", "args"):
                continue
            if _is_number(value) and (BASELINE_KEY.search(str(key)) or (untouched_row and key in QUALITY)):
                yield here, float(value)
            elif isinstance(value, Mapping) and BASELINE_KEY.search(str(key)):
                yield from ((f"{here}.{sub}", float(v)) for sub, v in value.items() if _is_number(v))
            elif isinstance(value, list | Mapping):
                yield from find_baselines(value, here, depth + 1)
    elif isinstance(obj, list):
        for i, item in enumerate(obj[:64]):
            yield from find_baselines(item, f"{path}[{i}]", depth + 1)


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points (speed, quality) no other point beats on both, by increasing speed."""
    sign = 1 if higher_is_better else -1
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -sign * points[i][1]))
    front, best = [], -math.inf
    for i in order:
        q = sign * points[i][1]
        if q > best:
            front.append(i)
            best = q
    return sorted(front, key=lambda i: points[i][0])


def _plot(series: list[tuple[str, list[tuple[float, float, str]]]], quality: str, x: str, measured: bool, path: Path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    higher = QUALITY[quality]
    fig = Figure(figsize=(8, 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (name, pts) in enumerate(series):
        color = f"C{i % 10}"
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.scatter(xs, ys, s=18, alpha=0.55, color=color, label=name[:60])
        if measured:
            front = pareto_front([(p[0], p[1]) for p in pts], higher)
            ax.plot([xs[j] for j in front], [ys[j] for j in front], color=color, lw=1.2)
            for j in front[-3:]:
                ax.annotate(pts[j][2][:28], (xs[j], ys[j]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if measured:
        ax.axvline(1.0, color="0.6", lw=0.8, ls="--")
    if not higher and all(p[1] > 0 for _, pts in series for p in pts):
        ax.set_yscale("log")
    ax.set_xlabel(
        f"{x}: measured speedup over the untouched model" if measured else f"{x} (speed not measured in this file)"
    )
    ax.set_ylabel(f"{quality} ({'higher' if higher else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:80] or "plot"


def _points(table: Table, x: str, quality: str) -> list[tuple[float, float, str]]:
    return [
        (float(r[x]), float(r[quality]), table.label(r))
        for r in table.rows
        if _is_number(r.get(x)) and _is_number(r.get(quality))
    ]


def build_report(results_dir: str | os.PathLike, out: str | os.PathLike, *, title: str | None = None) -> Report:
    """Read every JSON file under `results_dir`, write `out` (.html), the same report as Markdown beside it (.md) and
    its PNG plots in `<stem>_files/`; returns what was written."""
    results = Path(results_dir)
    if not results.is_dir():
        raise FileNotFoundError(f"{results_dir} is not a folder of benchmark JSON files")
    out = Path(out)
    if out.suffix not in (".html", ".htm"):
        raise ValueError(f"{out}: the report is an .html file (the Markdown copy is written beside it)")
    files = sorted(p for p in results.rglob("*.json") if not any(part.startswith(".") for part in p.parts))
    tables: list[Table] = []
    machines: list[tuple[str, dict[str, Any]]] = []
    baselines: list[tuple[str, str, float]] = []
    for f in files:
        rel = str(f.relative_to(results))
        try:
            obj = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        tables += list(find_tables(obj, rel))
        machines += [(rel, m) for m in find_machines(obj)][:1]
        seen = set()
        for k, v in find_baselines(obj):
            if (re.sub(r"\[\d+\]", "", k), v) not in seen:
                seen.add((re.sub(r"\[\d+\]", "", k), v))
                baselines.append((rel, k, v))

    assets = out.parent / f"{out.stem}_files"
    plots: list[Plot] = []
    overview: dict[tuple[str, str, bool], list[tuple[str, list[tuple[float, float, str]]]]] = {}
    with atomic_folder(assets) as tmp:
        tmp.mkdir(parents=True)
        for t in tables:
            quality, speed = t.pick(list(QUALITY)), t.pick(SPEED)
            x = speed or t.pick(DEPTH)
            if quality is None or x is None:
                continue
            pts = _points(t, x, quality)
            if len(pts) < 2:
                continue
            name = f"{_slug(t.title)}.png"
            _plot([(t.title, pts)], quality, x, speed is not None, tmp / name)
            plots.append(Plot(t.title, assets / name, quality, x, speed is not None))
            group = quality.removesuffix("_b1")  # agreement at batch 1 and agreement are one metric
            overview.setdefault((group, "speedup" if speed else x, speed is not None), []).append((t.title, pts))
        for (quality, x, measured), series in overview.items():
            if len(series) < 2:
                continue
            name = f"overview_{_slug(quality)}_{_slug(x)}.png"
            _plot(series, quality if quality in QUALITY else quality + "_b1", x, measured, tmp / name)
            plots.insert(0, Plot(f"every benchmark: {quality} vs {x}", assets / name, quality, x, measured))

    title = title or f"depthprune: every method's quality against measured speed ({results.name})"
    page = _html(title, files, results, tables, plots, machines, baselines, out)
    md = _markdown(title, files, results, tables, plots, machines, baselines, out)
    write_atomic(out, page)
    md_path = write_atomic(out.with_suffix(".md"), md)
    return Report(out, md_path, plots, tables, [str(f.relative_to(results)) for f in files])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if _is_number(value) and isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _html_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;font-size:12px;
margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}
img{max-width:100%;border:1px solid #ddd}.note{color:#666;font-size:12px}h2{border-bottom:1px solid #aaa}"""


def _html(title, files, results, tables, plots, machines, baselines, out) -> str:
    rel = lambda p: html.escape(os.path.relpath(p, out.parent))  # noqa: E731
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>Generated by <code>depthprune report</code> from {len(files)} JSON files under "
             f"<code>{html.escape(str(results))}</code>; {len(tables)} tables, {len(plots)} plots. Speedups are "
             "measured against the untouched model in the same run.</p>"]  # fmt: skip
    parts.append("<h2>Pareto plots</h2>")
    for p in plots:
        parts.append(f"<figure><img src='{rel(p.png)}' alt='{html.escape(p.title)}'><figcaption class='note'>")
        parts.append(f"{html.escape(p.title)}</figcaption></figure>")
    parts.append("<h2>Machines</h2>")
    cols = sorted({k for _, m in machines for k in m})
    parts.append(_html_table(["file", *cols], [{"file": f, **m} for f, m in machines]))
    parts.append("<h2>Untouched baselines</h2>")
    parts.append(_html_table(["file", "key", "value"], [{"file": f, "key": k, "value": v} for f, k, v in baselines]))
    parts.append("<h2>Every table</h2>")
    for t in tables:
        more = f" (first {MAX_ROWS} of {len(t.rows)} rows; all in the JSON)" if len(t.rows) > MAX_ROWS else ""
        parts.append(f"<h3>{html.escape(t.title)}</h3><p class='note'>{len(t.rows)} rows{more}</p>")
        parts.append(_html_table(t.columns, t.rows[:MAX_ROWS]))
    # lets a headless browser (tests/test_overview.py) report whether every plot decoded
    parts.append("<script>addEventListener('load',()=>{document.body.dataset.plotsOk=[...document.images]"
                 ".every(i=>i.complete&&i.naturalWidth>0)})</script></body></html>")  # fmt: skip
    return "\n".join(parts)


def _md_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    esc = lambda s: _cell(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(title, files, results, tables, plots, machines, baselines, out) -> str:
    parts = [f"# {title}", "", f"Generated by `depthprune report` from {len(files)} JSON files under `{results}`.", ""]
    parts += ["## Pareto plots", ""]
    parts += [f"![{p.title}]({os.path.relpath(p.png, out.parent)})" for p in plots]
    cols = sorted({k for _, m in machines for k in m})
    parts += ["", "## Machines", "", _md_table(["file", *cols], [{"file": f, **m} for f, m in machines])]
    parts += ["", "## Untouched baselines", ""]
    parts.append(_md_table(["file", "key", "value"], [{"file": f, "key": k, "value": v} for f, k, v in baselines]))
    parts += ["", "## Every table"]
    for t in tables:
        parts += ["", f"### {t.title}", "", _md_table(t.columns, t.rows[:MAX_ROWS])]
    return "\n".join(parts) + "\n"
