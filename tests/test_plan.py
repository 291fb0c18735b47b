"""LayerPlan: text form, round trips, checks against a model's stacks, composition. Pure data, no models."""

from __future__ import annotations

import dataclasses

import pytest

from depthprune.errors import PlanError
from depthprune.plan import UNNAMED, LayerPlan, compose


@pytest.mark.parametrize(
    ("text", "layers"),
    [
        ("0-3", (0, 1, 2, 3)),
        ("0-19,22", (*range(20), 22)),
        ("0,1,2,2,3", (0, 1, 2, 2, 3)),
        ("5-0", (5, 4, 3, 2, 1, 0)),
        ("3*4", (3, 3, 3, 3)),
        ("2-2", (2,)),
        (" 0 - 2 , 7 ", (0, 1, 2, 7)),
        ("3,1-2,0*2", (3, 1, 2, 0, 0)),
    ],
)
def test_parse_one_stack(text: str, layers: tuple[int, ...]) -> None:
    assert LayerPlan.parse(text) == LayerPlan({UNNAMED: layers})


def test_parse_named_stacks() -> None:
    plan = LayerPlan.parse("encoder=0-2;decoder=0,2,2")
    assert plan.stacks == {"encoder": (0, 1, 2), "decoder": (0, 2, 2)}
    assert LayerPlan.parse(" encoder = 0-2 ; decoder = 0,2,2 ;") == plan


ROUND_TRIP = [
    {UNNAMED: (0,)},
    {UNNAMED: tuple(range(12))},
    {UNNAMED: (0, 1, 2, 2, 3)},
    {UNNAMED: (0, 1, 1)},
    {UNNAMED: (2, 2, 2, 3, 4, 5, 5)},
    {UNNAMED: (0, 1, 2, 2, 3, 4, 5)},
    {UNNAMED: (5, 4, 3, 2, 1, 0)},
    {UNNAMED: (9, 8, 8, 1, 2, 3, 0, 0, 0)},
    {UNNAMED: (0, 2, 4, 6, 7, 8, 30, 31)},
    {UNNAMED: (3, 1, 2, 0)},
    {"decoder": (0, 1, 2, 3)},
    {"encoder": (0, 0, 1), "decoder": (3, 2, 1)},
    {"encoder": (0, 1, 2, 3, 4, 5), "decoder": (0, 2, 4)},
]


@pytest.mark.parametrize("stacks", ROUND_TRIP, ids=lambda s: LayerPlan(s).to_text())
def test_text_round_trip(stacks: dict[str, tuple[int, ...]]) -> None:
    plan = LayerPlan(stacks)
    assert LayerPlan.parse(plan.to_text()) == plan
    assert LayerPlan.parse(str(plan)) == plan
    assert LayerPlan.from_dict(plan.to_dict()) == plan


def test_plans_are_hashable_values() -> None:
    a, b = LayerPlan.parse("encoder=0,1;decoder=2"), LayerPlan({"decoder": [2], "encoder": (0, 1)})
    assert a == b and hash(a) == hash(b) and len({a, b, LayerPlan.parse("decoder=2")}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.stacks = {}  # type: ignore[misc]


def test_text_is_compact() -> None:
    assert LayerPlan.parse("0-19,22,24-29").to_text() == "0-19,22,24-29"
    assert LayerPlan({UNNAMED: (0, 1, 2, 2, 3)}).to_text() == "0-2,2,3"
    assert LayerPlan({UNNAMED: (3, 3, 3, 3)}).to_text() == "3*4"
    assert LayerPlan({"encoder": (0, 1), "decoder": (2,)}).to_text() == "encoder=0,1;decoder=2"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        ";",
        "a-b",
        "1-",
        "-1",
        "3*0",
        "1*",
        "0,,1",
        "1.5",
        "x=",
        "encoder=0;encoder=1",
        "0-2;1-3",
        "0;decoder=1",
    ],
)
def test_bad_text_raises(text: str) -> None:
    with pytest.raises(PlanError):
        LayerPlan.parse(text)


def test_bad_text_message_says_how_to_write_a_plan() -> None:
    with pytest.raises(PlanError, match="'N', a range 'A-B', or a repeat 'N\\*K'"):
        LayerPlan.parse("a-b")
    with pytest.raises(PlanError, match="empty layer plan"):
        LayerPlan.parse("")


@pytest.mark.parametrize(
    "stacks",
    [{}, {"decoder": ()}, {"decoder": (0, -1)}, {"decoder": (0, 1.0)}, {"decoder": (True,)}, {"": (0,)}],
    ids=["no-stacks", "empty-stack", "negative", "float", "bool", "unnamed-empty-string"],
)
def test_invalid_plan_data_raises(stacks: dict) -> None:
    with pytest.raises(PlanError):
        LayerPlan(stacks)


def test_resolve_fills_the_only_stack_and_unmentioned_stacks() -> None:
    assert LayerPlan.parse("2,0").resolve({"decoder": 4}) == LayerPlan({"decoder": (2, 0)})
    sizes = {"encoder": 3, "decoder": 2}
    assert LayerPlan.parse("decoder=1").resolve(sizes) == LayerPlan({"encoder": (0, 1, 2), "decoder": (1,)})


def test_resolve_errors() -> None:
    with pytest.raises(PlanError, match=r"layer\(s\) \[4, 7\]"):
        LayerPlan.parse("0,4,7").resolve({"decoder": 4})
    with pytest.raises(PlanError, match="name the stack"):
        LayerPlan.parse("0,1").resolve({"encoder": 2, "decoder": 2})
    with pytest.raises(PlanError, match=r"\['encoder'\]"):
        LayerPlan.parse("encoder=0").resolve({"decoder": 2})


def test_identity_drop_removed() -> None:
    sizes = {"encoder": 3, "decoder": 4}
    assert LayerPlan.identity(sizes).is_identity(sizes)
    assert not LayerPlan.parse("decoder=0,1,3,2").is_identity(sizes)
    assert LayerPlan.drop({"decoder": 4}, [1, 2]) == LayerPlan({"decoder": (0, 3)})
    assert LayerPlan.drop(sizes, {"decoder": [0]}).stacks == {"encoder": (0, 1, 2), "decoder": (1, 2, 3)}
    assert LayerPlan.parse("decoder=0,0,3").removed(sizes) == {"encoder": [], "decoder": [1, 2]}
    assert LayerPlan.parse("3,2").num_layers() == {UNNAMED: 2}
    with pytest.raises(PlanError):
        LayerPlan.drop(sizes, [0])
    with pytest.raises(PlanError):
        LayerPlan.drop({"decoder": 4}, [4])
    with pytest.raises(PlanError):
        LayerPlan.drop({"decoder": 4}, {"encoder": [0]})
    with pytest.raises(PlanError):
        LayerPlan.drop({"decoder": 2}, [0, 1])


def test_compose() -> None:
    inner = LayerPlan({"encoder": (0, 2, 2, 5), "decoder": (1, 0)})
    outer = LayerPlan({"encoder": (3, 0, 2), "decoder": (1, 0)})
    assert compose(outer, inner) == LayerPlan({"encoder": (5, 0, 2), "decoder": (0, 1)})
    assert compose(LayerPlan({"encoder": (0,)}), inner).stacks["decoder"] == (1, 0)
