"""Order search (depthprune.static.search) on tiny random models: the loss it reports is the applied plan's own, every
plan it scores has the requested depth, it never ends worse than it starts, leaves the model alone, is deterministic,
and refuses bad input clearly; and the `search-order` command exports the best plan's model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny_models import CASES, VOCAB, build, build_gemma3_sliding, tokenizer

from depthprune.bench.perplexity import mean_nll
from depthprune.cli.main import main
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan
from depthprune.static.scorers.hidden import check_arguments
from depthprune.static.scorers.lm_loss import cache_loss, plan_inputs, plan_loss
from depthprune.static.search import MOVES, OrderSearchResult, is_pure_removal, neighbours, search_order


def decoder(name: str = "llama", layers: int = 6, seed: int = 0) -> torch.nn.Module:
    """A tiny causal LM of case `name` with `layers` layers, weights large enough that layers matter."""
    config = CASES[name].config()
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(layers)]
    if hasattr(config, "initializer_range"):
        config.initializer_range = 0.2
    torch.manual_seed(seed)
    return getattr(transformers, CASES[name].model_class)(config).eval()


def batches(n: int = 2, rows: int = 2, seq: int = 12, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (rows, seq), generator=g) for _ in range(n)]


def direct_nll(model: torch.nn.Module, plan: LayerPlan, data: list[torch.Tensor]) -> float:
    """The calibration NLL of the plan applied to a copy of the model, by the copy's own forward pass."""
    return mean_nll(apply_plan(model, plan), torch.cat(data))


# ---- the loss is the applied plan's ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3_text"])
def test_the_loss_of_every_scored_plan_is_the_applied_plans_own(name):
    model, data = decoder(name), batches()
    result = search_order(model, data, n_remove=2, start="block_influence", budget=40, seed=1)
    assert result.evaluations == len(result.history) > 10
    kinds = {e.move for e in result.history}
    assert {"start", "swap", "repeat", "move", "exchange"} <= kinds  # every move kind was scored, so checked below
    for e in result.history:
        assert e.loss == pytest.approx(direct_nll(model, e.plan, data), abs=1e-5), (e.plan, e.move)


def test_the_loss_on_a_sliding_window_model_with_a_soft_cap_is_the_applied_plans_own():
    model, data = build_gemma3_sliding(), batches(seq=9)
    result = search_order(model, data, depth=3, start="0,2,3", budget=25, strategy="best")
    for e in result.history:
        assert e.loss == pytest.approx(direct_nll(model, e.plan, data), abs=1e-5), (e.plan, e.move)


def test_cached_states_give_the_same_loss_as_a_plain_run():
    model, data = decoder(), batches()
    target, data = check_arguments(model, data, 0, None, "test", loss=True)
    cache = plan_inputs(model, data, target, [0, 1, 2, 4])
    for keep in ([0, 1, 3, 2], [0, 1, 1, 4, 5], [5, 4, 3]):
        resumed = plan_inputs(model, data, target, keep, cache=cache)  # from the states after the shared prefix
        assert cache_loss(model, data, target, resumed).nll == plan_loss(model, data, target, keep).nll
    assert cache_loss(model, data, target, cache) == plan_loss(model, data, target, [0, 1, 2, 4])


# ---- what the search returns ---------------------------------------------------------------------------------------
def test_every_scored_plan_runs_the_requested_depth_and_the_best_is_the_lowest():
    model, data = decoder(layers=7), batches()
    for strategy in ("first", "best"):
        result = search_order(model, data, depth=4, start="sleb", budget=60, strategy=strategy)
        assert isinstance(result, OrderSearchResult) and result.depth == 4
        assert result.history[0].plan == result.start and result.history[0].move == "start"
        assert len({e.plan for e in result.history}) == len(result.history)  # no plan scored twice
        for e in result.history:
            (keep,) = e.plan.stacks.values()
            assert len(keep) == 4 and all(0 <= i < 7 for i in keep)
        assert result.best_loss <= result.start_loss
        assert result.best_loss == min(e.loss for e in result.history)
        assert result.best_loss == next(e.loss for e in result.history if e.plan == result.best)
        assert result.non_monotone == (not is_pure_removal(result.best.stacks["decoder"]))
        assert result.stopped in ("local optimum", "budget") and result.evaluations <= 60


def test_the_start_plan_is_the_scorers_pure_removal_and_is_kept_when_nothing_beats_it():
    from depthprune.static.scorers import get_scorer

    model, data = decoder(), batches()
    chosen = get_scorer("block_influence")(model, data, n_remove=2).remove
    result = search_order(model, data, n_remove=2, start="block_influence", budget=1)
    assert result.start.stacks["decoder"] == tuple(i for i in range(6) if i not in chosen)
    assert result.best == result.start and result.evaluations == 1 and result.stopped == "budget"


def test_best_improvement_takes_the_best_neighbour():
    model, data = decoder(), batches()
    start = (0, 1, 2, 4)
    around = [c for group in neighbours(start, 6, MOVES).values() for c in group]
    result = search_order(model, data, start=start, budget=1 + len(around), strategy="best")
    losses = {e.plan.stacks["decoder"]: e.loss for e in result.history}
    assert set(losses) == {start, *around}
    best = min(around, key=losses.get)
    assert result.best.stacks["decoder"] == (best if losses[best] < losses[start] else start)


def test_the_best_is_reached_by_accepted_moves_that_each_improve():
    model, data = decoder(), batches()
    result = search_order(model, data, n_remove=2, start="block_influence", budget=80)
    losses = [e.loss for e in result.history]
    running = [min(losses[: i + 1]) for i in range(len(losses))]
    assert result.steps == len(set(running)) - 1  # an accepted move is a strict improvement on the current plan


def test_the_model_is_left_unchanged():
    model, data = decoder(), batches()
    model.train()  # a flag the search must give back, besides every weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    search_order(model, data, n_remove=2, start="sleb", budget=30)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.to_dict() == config and len(model.model.layers) == 6


def test_monotone_search_yields_pure_removals_only():
    model, data = decoder(layers=7), batches()
    result = search_order(model, data, n_remove=3, start="block_influence", budget=40, monotone=True)
    assert result.monotone_only and result.moves == ("exchange",) and not result.non_monotone
    assert all(is_pure_removal(e.plan.stacks["decoder"]) for e in result.history)
    assert result.evaluations > 5


def test_the_search_is_deterministic_with_a_seed():
    model, data = decoder(), batches()
    runs = [search_order(model, data, n_remove=2, start="block_influence", budget=30, seed=s) for s in (3, 3, 4)]
    history = [[(e.plan, e.loss) for e in r.history] for r in runs]
    assert history[0] == history[1]
    assert history[0] != history[2]  # another seed tries the neighbours in another order


def test_neighbours_keep_the_depth_and_exchange_keeps_a_pure_removal_pure():
    groups = neighbours((0, 2, 3, 5), 7, MOVES, max_shift=3)
    assert groups["swap"] == [(2, 0, 3, 5), (0, 3, 2, 5), (0, 2, 5, 3)]
    assert (0, 0, 3, 5) in groups["repeat"] and (0, 2, 2, 5) in groups["repeat"] and len(groups["repeat"]) == 6
    assert set(groups["move"]) == {(2, 3, 0, 5), (2, 3, 5, 0), (3, 0, 2, 5), (5, 0, 2, 3), (0, 3, 5, 2), (0, 5, 2, 3)}
    assert all(is_pure_removal(c) for c in groups["exchange"]) and len(groups["exchange"]) == 4 * 3
    plans = [c for g in groups.values() for c in g]
    assert len(set(plans)) == len(plans) and (0, 2, 3, 5) not in plans and all(len(c) == 4 for c in plans)
    # in a plan that is no pure removal, the newcomer takes the slot of the layer it replaces
    assert neighbours((3, 1), 4, ["exchange"])["exchange"] == [(0, 1), (2, 1), (3, 0), (3, 2)]


# ---- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 6}, "executed depth must be an integer from 1 to 5"),
        ({"depth": 0}, "executed depth must be an integer from 1 to 5"),
        ({"n_remove": 6}, "n_remove must be an integer from 1 to 5"),
        ({"depth": 3, "n_remove": 3}, "not both"),
        ({"depth": 4, "moves": "swap,jump"}, r"unknown move\(s\) \['jump'\]; the moves are swap, repeat, move"),
        ({"depth": 4, "moves": ""}, "no move given"),
        ({"depth": 4, "moves": "swap", "monotone": True}, "needs the 'exchange' move"),
        ({"start": "0,2,1,4", "monotone": True}, "needs a pure-removal start plan, got 0,2,1,4"),
        ({"start": "0-3", "depth": 3}, "runs 4 layers, not the requested depth 3"),
        ({"start": "0-9"}, "has layers 0-5"),
        ({"start": "bogus", "depth": 3}, "neither a scorer"),
        ({"start": "sleb"}, r"say how many layers run"),
        ({"depth": 4, "budget": 0}, "budget is the number of plans to score, at least 1"),
        ({"depth": 4, "strategy": "random"}, "unknown strategy 'random'"),
        ({"depth": 4, "max_seconds": 0}, "max_seconds must be positive"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        search_order(decoder(), batches(), **{"start": "block_influence", **kwargs})


def test_no_calibration_batches_and_non_causal_models_are_refused():
    with pytest.raises(ValueError, match="no calibration batches given"):
        search_order(decoder(), [], depth=4)
    with pytest.raises(ValueError, match="needs a causal language model"):
        search_order(build("bert"), batches(), depth=1)


# ---- the command -----------------------------------------------------------------------------------------------------
def test_search_order_command_prints_json_and_exports_the_best_plan(tmp_path, capsys):
    folder = tmp_path / "llama"
    decoder(layers=6).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    out = tmp_path / "searched"
    argv = ["search-order", str(folder), "--remove", "2", "--start", "block_influence", "--budget", "15"]
    argv += ["--seq-len", "16", "--blocks", "4", "--json", "-o", str(out)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["evaluations"] == len(summary["history"]) <= 15 and summary["depth"] == 4
    best = LayerPlan.parse(summary["best"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 4
    assert reloaded.config.depthprune["plan"] == {"decoder": list(best.stacks["decoder"])}
    # an occupied output folder is refused before anything loads
    assert main([*argv[:-2], "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["search-order", str(folder), "--depth", "9", "--blocks", "2", "--seq-len", "16"]) == 2
    assert "executed depth must be an integer from 1 to 5" in capsys.readouterr().err
