"""Each exit criterion decides what its definition says, on hand-made inputs."""

import math

import pytest
import torch

from depthprune.exits.criteria import ExitState, criterion_class, list_criteria, make_criterion, parse_criterion


def state(logits, history=None, layer=0, num_layers=6, **extra):
    logits = torch.tensor(logits, dtype=torch.float)
    hist = [torch.tensor(h, dtype=torch.float) for h in history] if history else [logits]
    return ExitState(layer, num_layers, logits, hist, **extra)


def logit_of(p):
    return math.log(p) - math.log1p(-p)


def test_max_prob():
    # probabilities: row 0 -> 0.88, row 1 -> 0.5
    s = state([[2.0, 0.0], [0.0, 0.0]])
    assert make_criterion("max_prob", 0.85).decide(s).tolist() == [True, False]
    assert make_criterion("max_prob", 0.9).decide(s).tolist() == [False, False]
    assert make_criterion("max_prob", 0.5).decide(s).tolist() == [True, True]


def test_margin():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.45, 0.45, 0.1]])
    s = state(p.log().tolist())
    assert make_criterion("margin", 0.5).decide(s).tolist() == [True, False]
    assert make_criterion("margin", 0.0).decide(s).tolist() == [True, True]


def test_entropy_normalized():
    uniform = [[0.0, 0.0, 0.0, 0.0]]
    peaked = [[20.0, 0.0, 0.0, 0.0]]
    assert make_criterion("entropy", 0.99).decide(state(uniform)).tolist() == [False]
    assert make_criterion("entropy", 1.0).decide(state(uniform)).tolist() == [True]
    assert make_criterion("entropy", 0.01).decide(state(peaked)).tolist() == [True]


def test_patience_counts_consecutive_agreeing_exits():
    a, b = [1.0, 0.0], [0.0, 1.0]
    # row 0 predicts class 0 three times in a row; row 1 switches at the last exit
    history = [[a, a], [a, a], [a, b]]
    s = state([a, b], history=history, layer=2)
    assert make_criterion("patience", 2).decide(s).tolist() == [True, False]
    assert make_criterion("patience", 3).decide(s).tolist() == [False, False]  # only 3 exits so far
    assert make_criterion("patience", 0).decide(s).tolist() == [True, True]


def test_voting_majority_and_prediction():
    a, b = [1.0, 0.0], [0.0, 1.0]
    history = [[a, a], [b, b], [b, a]]  # row 0 votes a,b,b ; row 1 votes a,b,a
    s = state([b, a], history=history, layer=2)
    crit = make_criterion("voting", 0.66)
    assert crit.decide(s).tolist() == [True, True]
    assert crit.predict(s).argmax(-1).tolist() == [1, 0]
    assert make_criterion("voting", 0.7).decide(s).tolist() == [False, False]
    one = state([a], history=[[a]])
    assert make_criterion("voting", 0.5).decide(one).tolist() == [False]  # needs two votes


def test_learned_gate_and_q_exit():
    s = state(
        [[0.0, 0.0], [0.0, 0.0]],
        agreement=torch.tensor([logit_of(0.9), logit_of(0.2)]),
        gate=torch.tensor([logit_of(0.3), logit_of(0.7)]),
    )
    assert make_criterion("learned", 0.8).decide(s).tolist() == [True, False]
    assert make_criterion("gate", 0.5).decide(s).tolist() == [False, True]
    # lambdas 0.5 then 0.5: stopped by now = 1 - 0.25 = 0.75; row 1: 0.1, 0.1 -> 0.19
    halting = [torch.tensor([logit_of(0.5), logit_of(0.1)]), torch.tensor([logit_of(0.5), logit_of(0.1)])]
    s = state([[0.0, 0.0], [0.0, 0.0]], halting=halting, layer=1)
    assert make_criterion("q_exit", 0.7).decide(s).tolist() == [True, False]
    assert make_criterion("q_exit", 0.8).decide(s).tolist() == [False, False]
    assert make_criterion("q_exit", 0.19).decide(s).tolist() == [True, True]


def test_learned_criteria_need_their_outputs():
    s = state([[0.0, 0.0]])
    for name in ("learned", "gate", "q_exit"):
        with pytest.raises(ValueError, match="needs exit heads"):
            make_criterion(name, 0.5).decide(s)


def test_static():
    s = state([[0.0, 1.0]], layer=2)
    assert make_criterion("static", 3).decide(s).tolist() == [True]
    assert make_criterion("static", 4).decide(s).tolist() == [False]


@pytest.mark.parametrize(
    "text,match",
    [
        ("nope:0.5", "unknown exit criterion"),
        ("max_prob", "give a threshold"),
        ("max_prob:abc", "not a number"),
        ("max_prob:1.5", "out of range"),
        ("entropy:-0.1", "out of range"),
        ("patience:1.5", "whole number"),
        ("static:0", "out of range"),
    ],
)
def test_bad_criteria(text, match):
    with pytest.raises(ValueError, match=match):
        parse_criterion(text)


def test_every_grid_value_is_a_valid_threshold():
    for name in list_criteria():
        grid = criterion_class(name).grid()
        assert len(grid) >= 5
        for t in grid:
            make_criterion(name, t)
