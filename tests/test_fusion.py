"""Layer fusion: LaCo's merge equals its formula by hand, LaCo's search follows the paper's algorithm and leaves the
input alone, shared positions share one tensor, merged and shared exports reload in plain transformers in a fresh
process with the same logits, depthprune's loader ties shared positions again, bad input is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import VOCAB, build, inputs, logits, tokenizer
from torch import nn

from depthprune import apply_plan, get_adapter, load_model, save_model
from depthprune.cli.main import main
from depthprune.static.fusion import (
    laco,
    merge_layers,
    share_layers,
    unique_parameters,
    weights_bytes,
)


def _deep(name: str = "llama", n: int = 6, types: list[str] | None = None) -> nn.Module:
    """Case `name` with `n` layers (and the given layer_types), random, reproducible."""
    model = build(name)
    config = model.config
    setattr(config, "n_layer" if name == "gpt2" else "num_hidden_layers", n)
    if types is not None:
        config.layer_types = types
    elif getattr(config, "layer_types", None):
        config.layer_types = (list(config.layer_types) * n)[:n]
    torch.manual_seed(0)
    model = type(model)(config).eval()
    with torch.no_grad():  # norms start at exactly 1 (and biases at 0): make every parameter differ between layers
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _layers(model: nn.Module) -> list[nn.Module]:
    adapter = get_adapter(model)
    return list(adapter.layers(model, adapter.present_stacks(model)[-1]))


def _batches(n: int = 3, seq: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (2, seq), generator=g) for _ in range(n)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


# ---- the merge formula -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merged_weights_equal_the_formula_by_hand(name):
    model = _deep(name, 6)
    before = _state(model)
    merged = merge_layers(model, [(1, 3), (4, 5)])
    src, out = _layers(model), _layers(merged)
    assert len(out) == 3 and _same_state(model, before)
    names = [k for k, _ in src[1].named_parameters()]
    assert len(names) >= 8  # attention, MLP and norms: every parameter is merged
    for pos, run in ((1, (1, 2, 3)), (2, (4, 5))):
        got = dict(out[pos].named_parameters())
        for key in names:
            theta = [dict(src[i].named_parameters())[key].detach().double() for i in run]
            hand = theta[0] + sum(t - theta[0] for t in theta[1:])  # theta_l + sum_k (theta_{l+k} - theta_l)
            torch.testing.assert_close(got[key].double(), hand, rtol=0, atol=1e-6)
        assert all(not torch.equal(got[k], dict(src[run[0]].named_parameters())[k]) for k in names)
    for key, p in out[0].named_parameters():  # an untouched layer keeps its weights
        assert torch.equal(p, dict(src[0].named_parameters())[key])
    adapter = get_adapter(merged)
    attr = adapter.present_stacks(merged)[-1].index_attrs[0]
    assert [layer.get_submodule(attr.rsplit(".", 1)[0]).layer_idx for layer in out] == [0, 1, 2]
    assert adapter.num_layers(merged) == {adapter.present_stacks(merged)[-1].name: 3}
    record = merged.config.depthprune_fusion
    assert record["steps"] == [{"method": "merge", "stack": "decoder", "runs": [[1, 3], [4, 5]]}]
    assert record["merged_layers"] == {"decoder": {"1": [1, 2, 3], "2": [4, 5]}}
    assert merged.config.depthprune["plan"] == {"decoder": [0, 1, 4]}
    logits(merged, inputs(name))  # runs through the model's own forward


def test_merging_a_run_of_one_layer_is_the_identity():
    model = _deep("llama", 4)
    merged = merge_layers(model, [(2, 2)])
    assert torch.equal(logits(merged, inputs("llama")), logits(model, inputs("llama")))
    assert _same_state(merged, model.state_dict())


def test_merging_two_layers_gives_the_second_ones_weights():
    model = _deep("llama", 4)  # theta_1 + (theta_2 - theta_1) = theta_2: the merge removes layer 1, keeps layer 2
    merged, removed = merge_layers(model, [(1, 2)]), apply_plan(model, "0,2,3")
    assert torch.equal(logits(merged, inputs("llama")), logits(removed, inputs("llama")))


def test_merges_compose_on_the_source_layers():
    model = _deep("llama", 6)
    twice = merge_layers(merge_layers(model, [(3, 5)]), [(2, 3)])  # the merged layer 3 is merged again, into 2
    assert twice.config.depthprune_fusion["merged_layers"] == {"decoder": {"2": [2, 3, 4, 5]}}
    assert twice.config.depthprune["plan"] == {"decoder": [0, 1, 2]}
    assert [s["runs"] for s in twice.config.depthprune_fusion["steps"]] == [[[3, 5]], [[2, 3]]]


def test_merging_keeps_layer_types_and_refuses_mixed_runs():
    types = ["sliding_attention", "sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    model = _deep("gemma3_text", 5, types)
    merged = merge_layers(model, [(0, 1), (2, 3)])
    assert merged.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_type for layer in _layers(merged)] == merged.config.layer_types
    logits(merged, inputs("gemma3_text"))
    with pytest.raises(ValueError, match="mixes attention types"):
        merge_layers(model, [(1, 2)])
    with pytest.raises(ValueError, match="mixes attention types"):
        share_layers(model, [(3, 4)])


# ---- LaCo's search -----------------------------------------------------------------------------------------------


def test_laco_follows_the_papers_algorithm_and_leaves_the_model_alone():
    model = _deep("llama", 8)
    before = _state(model)
    batches = _batches()
    # threshold -1 keeps every merge: from l = H - C = 5 down by I = 2, the last merge cut to the target
    result = laco(model, batches, 3, merge_count=3, low=2, high=8, interval=2, threshold=-1.0)
    assert _same_state(model, before)
    assert result.runs == [(5, 7), (3, 4)] and result.n_removed == 3 and result.reached
    assert result.merged_layers == {"3": [3, 4], "4": [5, 6, 7]}
    by_hand = merge_layers(merge_layers(model, [(5, 7)]), [(3, 4)])
    assert torch.equal(logits(result.model, inputs("llama")), logits(by_hand, inputs("llama")))
    assert all(p.data_ptr() not in {q.data_ptr() for q in model.parameters()} for p in result.model.parameters())
    assert result.model.config.depthprune_fusion["steps"][0]["method"] == "laco"

    # the similarity is the mean cosine of the final (normed) hidden states, the merged model's vs the untouched one's
    first = merge_layers(model, [(5, 7)])
    with torch.no_grad():
        cos = [
            nn.functional.cosine_similarity(first.model(b).last_hidden_state, model.model(b).last_hidden_state, -1)
            for b in batches
        ]
    assert result.candidates[0].similarity == pytest.approx(float(torch.cat(cos).mean()), abs=1e-5)

    # a threshold between two candidates' similarities: rejected ones step down one position, the search goes on
    top = laco(model, batches, 1, merge_count=2, low=1, threshold=-1.0).candidates[0]  # 6-7
    low = laco(model, batches, 1, merge_count=2, low=1, high=4, threshold=-1.0).candidates[0]  # 2-3
    assert (top.first, low.first) == (6, 2) and low.similarity > top.similarity  # this seed's set-up
    threshold = (top.similarity + low.similarity) / 2
    picky = laco(model, batches, 1, merge_count=2, low=1, threshold=threshold)
    tried = picky.candidates
    assert [c.first for c in tried] == list(range(6, 6 - len(tried), -1)) and not tried[0].accepted
    assert all(c.accepted == (c.similarity > threshold) for c in tried) and tried[-1].accepted
    assert picky.runs == [(tried[-1].first, tried[-1].last)] and picky.similarities == [tried[-1].similarity]
    assert _same_state(model, before)


def test_laco_stops_short_with_a_warning_and_refuses_when_nothing_passes():
    model = _deep("llama", 6)
    with pytest.warns(UserWarning, match="removed 2 of the 3"):
        result = laco(model, _batches(), 3, merge_count=2, low=2, high=6, interval=2, threshold=-1.0)
    assert result.runs == [(4, 5), (2, 3)] and not result.reached
    with pytest.raises(ValueError, match="no merge of 2 layers"):
        laco(model, _batches(), 1, merge_count=2, threshold=1.0)


# ---- sharing -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_shared_positions_hold_one_tensor(name):
    model = _deep(name, 6)
    before = _state(model)
    avg = share_layers(model, [(1, 3), (4, 5)], mode="average")
    first = share_layers(model, "1-3,4-5", mode="first")
    assert _same_state(model, before)
    src, out = _layers(model), _layers(avg)
    assert len(out) == 6
    per_layer = sum(p.numel() for p in src[0].parameters())
    assert unique_parameters(avg) == unique_parameters(model) - 3 * per_layer
    for group in ((1, 2, 3), (4, 5)):
        for key, p in out[group[0]].named_parameters():
            hand = sum(dict(src[i].named_parameters())[key].detach().double() for i in group) / len(group)
            torch.testing.assert_close(p.double(), hand, rtol=0, atol=1e-6)
            for i in group[1:]:
                assert dict(out[i].named_parameters())[key] is p
    plan = apply_plan(model, "0,1,1,1,4,4")  # "first" is the plan that repeats each group's first layer
    assert torch.equal(logits(first, inputs(name)), logits(plan, inputs(name)))
    assert avg.config.depthprune["shared_layers"] == {"decoder": [[1, 2, 3], [4, 5]]}
    assert avg.config.depthprune_fusion["steps"][0] == {
        "method": "share",
        "mode": "average",
        "stack": "decoder",
        "groups": [[1, 3], [4, 5]],
    }


# ---- exports: plain transformers in a fresh process, depthprune's loader -----------------------------------------

RELOAD = textwrap.dedent(
    """
    import json, sys
    import torch, transformers

    results = {}
    for folder in sys.argv[1:]:
        arch = json.load(open(f"{folder}/config.json"))["architectures"][0]
        model = getattr(transformers, arch).from_pretrained(folder).eval()
        with torch.no_grad():
            results[folder] = model(**torch.load(f"{folder}.inputs.pt")).logits
        results[folder + ":params"] = sum(p.numel() for p in model.parameters())
    assert "depthprune" not in sys.modules, "the reload must not need depthprune"
    torch.save(results, sys.argv[1] + ".reloaded.pt")
    """
)


def _fused(name: str, kind: str) -> nn.Module:
    if name == "gemma3_text":
        types = ["sliding_attention"] * 3 + ["full_attention"] * 3
        model = _deep(name, 6, types)
    else:
        model = _deep(name, 6)
    return merge_layers(model, [(0, 2), (3, 4)]) if kind == "merged" else share_layers(model, [(0, 2), (3, 4)])


EXPORTS = [(n, k) for n in ("llama", "gpt2", "gemma3_text") for k in ("merged", "shared")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion_exports")
    models, folders = {}, []
    for name, kind in EXPORTS:
        model = _fused(name, kind)
        folder = save_model(model, root / f"{name}-{kind}")
        torch.save(inputs(name), f"{folder}.inputs.pt")
        models[(name, kind)] = (model, folder)
        folders.append(str(folder))
    process = subprocess.Popen(
        [sys.executable, "-c", RELOAD, *folders], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    yield models, folders, process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3_text"])
def test_depthprune_loader_ties_shared_positions_again(exported, name):
    models, _, _ = exported
    model, folder = models[(name, "shared")]
    loaded = load_model(folder)
    out = _layers(loaded)
    for group in ((0, 1, 2), (3, 4)):
        for key, p in out[group[0]].named_parameters():
            assert all(dict(out[i].named_parameters())[key] is p for i in group[1:])
    assert unique_parameters(loaded) == unique_parameters(model) < unique_parameters(_deep(name, 6))
    assert torch.equal(logits(loaded, inputs(name)), logits(model, inputs(name)))
    # the file stores every position: as large as the untouched model's
    untouched = save_model(_deep(name, 6), folder.parent / f"{name}-untouched")
    assert weights_bytes(folder) == pytest.approx(weights_bytes(untouched), rel=0.01)
    merged_model, merged_folder = models[(name, "merged")]
    assert torch.equal(logits(load_model(merged_folder), inputs(name)), logits(merged_model, inputs(name)))
    assert weights_bytes(merged_folder) < weights_bytes(folder)


# Last among the export tests, so the tests above run while the fresh interpreter reloads the exports.
@pytest.mark.parametrize("case", EXPORTS, ids=lambda c: "-".join(c))
def test_plain_transformers_reload_gives_same_logits(exported, case):
    models, folders, process = exported
    if not hasattr(process, "results"):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        process.results = torch.load(folders[0] + ".reloaded.pt")
    model, folder = models[case]
    assert torch.equal(process.results[str(folder)], logits(model, inputs(case[0])))
    config = json.loads((folder / "config.json").read_text())
    assert config["depthprune_fusion"]["steps"][0]["method"] == ("merge" if case[1] == "merged" else "share")
    n = config.get("num_hidden_layers", config.get("n_layer"))
    assert n == (3 if case[1] == "merged" else 6)
    if case[1] == "shared":  # plain transformers holds every position on its own
        assert process.results[f"{folder}:params"] == unique_parameters(_deep(case[0], 6))


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ([(1, 3), (3, 4)], "overlap"),
        ([(4, 6)], "outside stack"),
        ([(3, 2)], "outside stack"),
        ([], "no runs"),
        ([(1,)], "pair"),
        ("2-1", "downwards"),
        ("a-b", "cannot read"),
    ],
)
def test_bad_runs_are_refused(runs, message):
    model = _deep("llama", 6)
    with pytest.raises(ValueError, match=message):
        merge_layers(model, runs)
    with pytest.raises(ValueError, match=message):
        share_layers(model, runs)


def test_repeated_layers_and_bad_options_are_refused():
    model = apply_plan(_deep("llama", 4), "0,1,2,1,3")  # position 1 and 3 share weights
    with pytest.raises(ValueError, match="shares its weights with position"):
        merge_layers(model, [(0, 1)])
    assert merge_layers(model, [(1, 3)]).config.depthprune_fusion["merged_layers"] == {"decoder": {"1": [1, 2]}}
    with pytest.raises(ValueError, match="mode must be one of"):
        share_layers(_deep("llama", 4), [(0, 1)], mode="mean")
    with pytest.raises(ValueError, match="no calibration batches"):
        laco(_deep("llama", 6), [], 2)
    with pytest.raises(ValueError, match="at most"):
        laco(_deep("llama", 6), _batches(), 4, low=3)
    with pytest.raises(ValueError, match="shared layer groups"):
        merge_layers(build("albert"), [(0, 1)])


# ---- command line ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fusion_cli") / "tiny"
    model = _deep("llama", 6)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def test_cli_merge_and_share(folder, tmp_path, capsys):
    assert main(["merge", str(folder), "--runs", "1-3", "-o", str(tmp_path / "m"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers_after"] == {"decoder": 4} and summary["runs"] == [[1, 3]]
    assert transformers.AutoConfig.from_pretrained(tmp_path / "m").num_hidden_layers == 4
    assert (tmp_path / "m" / "tokenizer_config.json").is_file()

    argv = ["merge", str(folder), "--remove", "2", "--threshold", "-1", "--blocks", "2", "--seq-len", "8"]
    assert main([*argv, "-o", str(tmp_path / "l"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "laco" and summary["n_removed"] == 2 and summary["layers_after"] == {"decoder": 4}

    assert main(["share", str(folder), "--groups", "1-3", "--mode", "first", "-o", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "share one layer each" in out and "layers 6 -> 6" in out
    loaded = load_model(tmp_path / "s")
    assert unique_parameters(loaded) < unique_parameters(_deep("llama", 6))


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "{m}", "--runs", "1-3,3-4"],  # overlapping
        ["merge", "{m}", "--runs", "4-9"],  # out of range
        ["merge", "{m}", "--remove", "2", "--threshold", "1.0", "--blocks", "2", "--seq-len", "8"],  # nothing passes
        ["share", "{m}", "--groups", "0-9"],
    ],
)
def test_cli_bad_input_writes_nothing(folder, tmp_path, capsys, argv):
    out = tmp_path / "out"
    assert main([a.format(m=folder) for a in argv] + ["-o", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_refuses_an_occupied_folder_before_loading(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["merge", str(tmp_path / "missing"), "--runs", "1-2", "-o", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
