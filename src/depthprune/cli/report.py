"""`depthprune report RESULTS_DIR -o report.html`: one page (and Markdown) of every benchmark's tables and Pareto
plots, built from their JSON files (depthprune.bench.overview)."""

from __future__ import annotations

import argparse


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="one HTML page (+ Markdown) of every benchmark JSON under a folder: tables, Pareto plots of quality vs "
        "measured speed, machines, untouched baselines",
    )
    p.add_argument("results", help="folder of benchmark JSON files, searched recursively (e.g. benchmarks)")
    p.add_argument("-o", "--output", required=True, help="the .html file; NAME.md and NAME_files/ go beside it")
    p.add_argument("--title", help="page title")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from depthprune.bench.overview import build_report

    report = build_report(args.results, args.output, title=args.title)
    print(
        f"{report.html} (+ {report.markdown.name}): {len(report.files)} JSON files, {len(report.tables)} tables, "
        f"{len(report.plots)} plots in {report.plots[0].png.parent if report.plots else '-'}"
    )
    return 0
