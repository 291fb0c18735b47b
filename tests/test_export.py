"""save_model: a planned model reloads with plain transformers in a process that never imports depthprune and gives the
same logits; depthprune.load_model ties repeated layers again; writes are atomic and never clobber by accident."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import CASES, build, inputs, logits
from torch import nn

from depthprune import LayerPlan, apply_plan, get_adapter, load_model, save_model
from depthprune.errors import OutputExistsError

# Every plan runs some layer twice; ALBERT's "0,2,1" makes shared group 0 run in two non-contiguous places.
PLANS = {name: "3,0,0,2" for name in CASES} | {
    "albert_2groups": "0,2,1",
    "t5": "encoder=2,0,0;decoder=2,0,0,1",
    "bart": "encoder=2,0,0;decoder=2,0,0,1",
    "whisper": "encoder=2,0,0;decoder=1,1",
}

RELOAD = textwrap.dedent(
    """
    import json, sys
    import torch, transformers

    torch.set_num_threads(1)
    results = {}
    for folder in sys.argv[1:]:
        arch = json.load(open(f"{folder}/config.json"))["architectures"][0]
        model = getattr(transformers, arch).from_pretrained(folder).eval()
        with torch.no_grad():
            results[folder] = model(**torch.load(f"{folder}.inputs.pt")).logits
    assert "depthprune" not in sys.modules, "the reload must not need depthprune"
    torch.save(results, sys.argv[1] + ".reloaded.pt")
    """
)


class Exports:
    """Every case planned and exported; a fresh interpreter reloads them all in the background while other tests run
    (starting Python with torch and transformers is most of this file's run time)."""

    def __init__(self, root: Path) -> None:
        self.planned: dict[str, tuple[nn.Module, Path]] = {}
        for name, plan in PLANS.items():
            model = apply_plan(build(name), plan)
            folder = save_model(model, root / name)
            torch.save(inputs(name), f"{folder}.inputs.pt")
            self.planned[name] = (model, folder)
        self.folders = [str(folder) for _, folder in self.planned.values()]
        args = [sys.executable, "-c", RELOAD, *self.folders]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._reloaded: dict[str, torch.Tensor] | None = None

    def reloaded(self, name: str) -> torch.Tensor:
        """Logits of the plain-transformers reload of case `name` (waits for the reloading process)."""
        if self._reloaded is None:
            _, err = self.process.communicate(timeout=300)
            assert self.process.returncode == 0, err[-3000:]
            self._reloaded = torch.load(self.folders[0] + ".reloaded.pt")
        return self._reloaded[str(self.planned[name][1])]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exports]:
    exports = Exports(tmp_path_factory.mktemp("exports"))
    yield exports
    if exports.process.poll() is None:  # a test failed before waiting for it
        exports.process.kill()
        exports.process.communicate()


@pytest.mark.parametrize("name", PLANS)
def test_export_config_describes_the_plan(exported: Exports, name: str) -> None:
    model, folder = exported.planned[name]
    config = json.loads((folder / "config.json").read_text())
    record = config["depthprune"]
    assert LayerPlan.from_dict(record["plan"]) == LayerPlan.parse(PLANS[name]).resolve(record["source_num_layers"])
    assert record["shared_layers"] or name == "albert", "every plan repeats a layer (one ALBERT group is shared anyway)"
    assert not list(folder.parent.glob(f".{folder.name}.*")), "no temporary folders left behind"


def shared_groups(model: nn.Module) -> dict[str, list[list[int]]]:
    """Per stack, the groups of positions whose parameters are the same tensor objects."""
    adapter = get_adapter(model)
    out = {}
    for stack in adapter.present_stacks(model):
        params = [{id(p) for p in layer.parameters()} for layer in adapter.layers(model, stack)]
        groups: dict[int, list[int]] = {}
        for pos in range(len(params)):
            first = next((q for q in range(pos) if params[pos] & params[q]), pos)
            groups.setdefault(first, []).append(pos)
        if any(len(g) > 1 for g in groups.values()):
            out[stack.name] = [g for g in groups.values() if len(g) > 1]
    return out


@pytest.mark.parametrize("name", PLANS)
def test_load_model_ties_repeated_layers_again(exported: Exports, name: str) -> None:
    model, folder = exported.planned[name]
    loaded = load_model(folder)
    assert type(loaded) is type(model)
    assert shared_groups(loaded) == shared_groups(model) == model.config.depthprune["shared_layers"]
    adapter = get_adapter(loaded)
    for stack, groups in shared_groups(loaded).items():
        layers = adapter.layers(loaded, stack)
        for group in groups:
            first = dict(layers[group[0]].named_parameters())
            for pos in group[1:]:
                assert all(first[k] is p for k, p in layers[pos].named_parameters())
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert torch.equal(logits(loaded, inputs(name)), logits(model, inputs(name)))


def test_load_model_of_a_plain_model_changes_nothing(tmp_path: Path) -> None:
    model = build("llama")
    save_model(model, tmp_path / "plain")
    loaded = load_model(tmp_path / "plain")
    assert shared_groups(loaded) == {}
    assert torch.equal(logits(loaded, inputs("llama")), logits(model, inputs("llama")))


def test_planned_twice_export_round_trip(tmp_path: Path) -> None:
    model = apply_plan(apply_plan(build("gemma3_text"), "0,1,1,2,3"), "4,2,1,2")  # source layers 3, 1, 1, 1
    folder = save_model(model, tmp_path / "twice")
    loaded = load_model(folder)
    assert loaded.config.depthprune["plan"] == {"decoder": [3, 1, 1, 1]}
    assert shared_groups(loaded) == {"decoder": [[1, 2, 3]]}
    assert loaded.config.layer_types == ["sliding_attention"] * 4
    assert torch.equal(logits(loaded, inputs("gemma3_text")), logits(model, inputs("gemma3_text")))


# ---- refusing to clobber -------------------------------------------------------------------------------------------
def test_occupied_folder_is_refused(tmp_path: Path) -> None:
    model = build("bert")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not empty.*overwrite=True"):
        save_model(model, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        save_model(model, tmp_path / "file", overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert save_model(model, empty) == empty.resolve()  # an empty folder is fine
    assert (empty / "config.json").exists()


def test_source_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = save_model(build("llama"), tmp_path / "source")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    model = load_model(source)
    planned = apply_plan(model, "0,2")
    monkeypatch.chdir(tmp_path)
    for candidate, target in [(model, source), (planned, source), (planned, Path("source")), (planned, "./source/")]:
        with pytest.raises(OutputExistsError, match="loaded from"):
            save_model(candidate, target)
    # the record keeps naming the source after an export and reload
    again = load_model(save_model(planned, tmp_path / "pruned"))
    with pytest.raises(OutputExistsError, match="loaded from"):
        save_model(apply_plan(again, "0"), source)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_overwrite_replaces_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    save_model(build("llama"), out)
    (out / "stale.txt").write_text("from the old export")
    planned = apply_plan(build("llama"), "0,0,1")
    save_model(planned, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert leftovers(out) == []
    assert torch.equal(logits(load_model(out), inputs("llama")), logits(planned, inputs("llama")))


def test_overwrite_may_replace_the_source_folder(tmp_path: Path) -> None:
    source = save_model(build("llama"), tmp_path / "source")
    planned = apply_plan(load_model(source), "1,3")
    save_model(planned, source, overwrite=True)
    assert json.loads((source / "config.json").read_text())["num_hidden_layers"] == 2
    assert leftovers(source) == []


def test_failed_write_keeps_the_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    save_model(build("llama"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    model = apply_plan(build("llama"), "0")

    def half_written(folder: str | Path, **kwargs: object) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out) == []
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "new")
    assert not (tmp_path / "new").exists() and leftovers(tmp_path / "new") == []


def test_save_model_leaves_the_model_alone(tmp_path: Path) -> None:
    model = apply_plan(build("t5"), PLANS["t5"])
    x = inputs("t5")
    before_logits = logits(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    record = json.dumps(model.config.depthprune)
    groups = shared_groups(model)
    save_model(model, tmp_path / "t5")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert json.dumps(model.config.depthprune) == record and shared_groups(model) == groups
    assert torch.equal(logits(model, x), before_logits)


# Last in the file, so that the tests above run while the fresh interpreter reloads the exports.
@pytest.mark.parametrize("name", PLANS)
def test_plain_transformers_reload_gives_same_logits(exported: Exports, name: str) -> None:
    model, _ = exported.planned[name]
    assert torch.equal(exported.reloaded(name), logits(model, inputs(name)))
