"""Every `depthprune ...` command in README.md's code blocks is parsed by the real argument parser (the train-exits
command by the trainer its model selects) and those that need no model are run, so the README cannot drift from the
command line again. (The commands that need a model are run on tiny models in test_cli.py and test_gen_cli.py.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from depthprune.cli import exits as cli_exits
from depthprune.cli.main import DELEGATED, build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
CAUSAL_LMS = {"smollm2"}  # the README's aliases that are causal LMs (read without loading them)


def readme_commands() -> list[str]:
    """The `depthprune` commands of README.md's code blocks, continuation lines joined, comments removed."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("depthprune "):
                commands.append(line)
    return commands


def test_the_readme_has_commands_to_check():
    names = {shlex.split(c)[1] for c in readme_commands()}
    assert {"list", "prune", "train-exits", "calibrate", "generate", "train-skipdecode"} <= names


def _parse_train_exits(argv: list[str]):
    model = cli_exits._model_option(argv)
    if model in CAUSAL_LMS:
        from depthprune.cli.train_lm_exits import parser
    else:
        from depthprune.cli.train_exits import parser
    from depthprune.cli.train_exits import resolve_model

    p = parser()
    return resolve_model(p, p.parse_args(argv))


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command, capsys):
    argv = [a for a in shlex.split(command)[1:] if a != "[MODEL]"]  # [MODEL]: optional, written for people
    try:
        if argv[0] in DELEGATED:
            assert argv[0] == "train-exits"
            args = _parse_train_exits(argv[1:])
            assert args.model and args.output_dir
        else:
            args = build_parser().parse_args(argv)
            assert callable(args.func)
            if argv[0] == "list":  # needs no model: run it as shown
                assert args.func(args) == 0 and capsys.readouterr().out
    except SystemExit as exc:
        pytest.fail(f"README command {command!r} does not parse: {capsys.readouterr().err}")
        raise AssertionError from exc
