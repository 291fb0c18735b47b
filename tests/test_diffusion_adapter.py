"""diffusers' DiT through the core: found by class, every block run by the runner + the adapter's final step equals
the model's own forward exactly (all rows and a subset of rows), plans apply to a copy and save with their depth."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_dit, dit_inputs

from depthprune import apply_plan, get_adapter
from depthprune.adapters.registry import supported_model_types
from depthprune.runner import capture_stack


def _final(model, hidden, inputs, rows=None):
    head = get_adapter(model).image_head
    t, y = inputs["timestep"], inputs["class_labels"]
    if rows is not None:
        t, y = t[rows], y[rows]
    return head.forward(model, hidden, head.conditioning(model, t, y))


@torch.no_grad()
def test_all_blocks_equal_the_models_forward():
    model, inputs = build_dit(), dit_inputs()
    assert get_adapter(model).family == "dit" and "DiTTransformer2DModel" in supported_model_types()
    ref = model(**inputs).sample
    assert ref.abs().mean() > 0.1
    hidden, call = capture_stack(model, inputs)
    assert torch.equal(_final(model, call.run(hidden), inputs), ref)
    rows = torch.tensor([2, 0])  # a subset, out of order: the per-row timestep and label follow the rows
    assert torch.equal(_final(model, call.run(hidden[rows], rows=rows), inputs, rows), ref[rows])
    # two halves of the stack = the whole
    assert torch.equal(call.run(call.run(hidden, 0, 1), 1), call.run(hidden))


@torch.no_grad()
def test_plan_on_a_dit_is_a_copy_that_runs_the_planned_blocks(tmp_path):
    from diffusers import DiTTransformer2DModel

    model, inputs = build_dit(), dit_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = apply_plan(model, "2,0")
    hidden, call = capture_stack(model, inputs)
    assert torch.equal(pruned(**inputs).sample, _final(pruned, call.run(hidden, order=[2, 0]), inputs))
    assert pruned.config.num_layers == 2 and model.config.num_layers == 3
    assert pruned.config["depthprune"]["plan"] == {"blocks": [2, 0]}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pruned.save_pretrained(tmp_path)
    again = DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert again.config.num_layers == 2 and torch.equal(again(**inputs).sample, pruned(**inputs).sample)


def test_a_plan_out_of_range_is_refused():
    with pytest.raises(ValueError, match="3"):
        apply_plan(build_dit(), "0,3")
