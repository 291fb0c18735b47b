"""Token-level exit criteria on hand-made states: each decides what its definition says."""

import math

import pytest
import torch

from depthprune.exits.token_criteria import (
    TokenState,
    criterion_class,
    list_criteria,
    make_criterion,
    parse_criterion,
)


def state(layer=1, logits=None, hidden=None, prev=None, confidence=None, **kw):
    if hidden is None:
        n = logits.shape[0] if logits is not None else 2
        hidden = torch.zeros(n, 4)
    return TokenState(layer, 4, hidden, prev, logits=logits, confidence=confidence, **kw)


def test_registry_lists_the_five():
    assert list_criteria() == ["max_prob", "margin", "saturation", "learned", "fixed"]
    assert parse_criterion("max_prob:0.9") == make_criterion("max_prob", 0.9)
    assert parse_criterion(" fixed:2").threshold == 2


def test_max_prob():
    # row 0: p = (e^2 / (e^2 + 2)) = 0.787; row 1: uniform 1/3
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    p0 = math.exp(2) / (math.exp(2) + 2)
    assert make_criterion("max_prob", p0 - 1e-4).decide(state(logits=logits)).tolist() == [True, False]
    assert make_criterion("max_prob", p0 + 1e-4).decide(state(logits=logits)).tolist() == [False, False]
    assert make_criterion("max_prob", 1 / 3).decide(state(logits=logits)).tolist() == [True, True]


def test_margin():
    # probabilities (0.5, 0.3, 0.2) and (0.4, 0.4, 0.2): margins 0.2 and 0
    logits = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]]).log()
    assert make_criterion("margin", 0.19).decide(state(logits=logits)).tolist() == [True, False]
    assert make_criterion("margin", 0.21).decide(state(logits=logits)).tolist() == [False, False]
    assert make_criterion("margin", 0.0).decide(state(logits=logits)).tolist() == [True, True]


def test_saturation_reads_hidden_states_only():
    prev = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    hidden = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # cosines 1, 0.707, 0

    def no_logits():
        raise AssertionError("saturation must not project to the vocabulary")

    s = TokenState(1, 4, hidden, prev, logits_fn=no_logits)
    assert make_criterion("saturation", 0.99).decide(s).tolist() == [True, False, False]
    assert make_criterion("saturation", 0.7).decide(s).tolist() == [True, True, False]
    assert make_criterion("saturation", -1.0).decide(s).tolist() == [True, True, True]
    assert not s.has_logits
    with pytest.raises(ValueError, match="prev_hidden"):
        make_criterion("saturation", 0.9).decide(TokenState(1, 4, hidden))


def test_learned_reads_the_confidence():
    s = state(hidden=torch.zeros(3, 4), confidence=torch.tensor([0.2, 0.5, 0.9]))
    assert make_criterion("learned", 0.5).decide(s).tolist() == [False, True, True]
    no_conf = TokenState(1, 4, torch.zeros(2, 4), confidence_fn=lambda: None)
    with pytest.raises(ValueError, match="confidence"):
        make_criterion("learned", 0.5).decide(no_conf)


def test_fixed_exits_at_its_layer():
    c = make_criterion("fixed", 2)
    assert c.decide(state(layer=1)).tolist() == [False, False]
    assert c.decide(state(layer=2)).tolist() == [True, True]
    assert c.decide(state(layer=3)).tolist() == [True, True]


def test_logits_are_computed_once_and_lazily():
    calls = []

    def fn():
        calls.append(1)
        return torch.tensor([[5.0, 0.0], [0.0, 0.0]])

    s = TokenState(0, 4, torch.zeros(2, 3), logits_fn=fn)
    assert not calls and not s.has_logits
    make_criterion("max_prob", 0.9).decide(s)
    make_criterion("margin", 0.9).decide(s)
    assert len(calls) == 1 and s.has_logits


@pytest.mark.parametrize("name", ["max_prob", "margin", "saturation", "learned", "fixed"])
def test_grid_runs_from_conservative_to_aggressive(name):
    grid = criterion_class(name).grid()
    assert grid == sorted(grid, reverse=True) and len(set(grid)) == len(grid)
    for t in grid:
        make_criterion(name, t)  # every grid value is a valid threshold


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_prob:1.5", "out of range"),
        ("margin:-0.1", "out of range"),
        ("saturation:1.2", "out of range"),
        ("learned:2", "out of range"),
        ("fixed:1.5", "whole number"),
        ("fixed:-1", "out of range"),
        ("max_prob", "give a threshold"),
        ("max_prob:high", "not a number"),
        ("entropy:0.1", "unknown token exit criterion"),
    ],
)
def test_bad_criteria_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_criterion(text)
