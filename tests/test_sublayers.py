"""A decoder layer split into attention and MLP sub-layers (depthprune.sublayers): the two parts, run in order with
the arguments the model's forward gave the layer, are bit for bit the layer's forward; the split is refused with a
clear error where the adapter names no layout."""

import pytest
import torch
from tiny_models import build, inputs

from depthprune.runner import capture_stack
from depthprune.sublayers import part_shares

SPLIT = ["llama", "qwen2", "mistral", "gemma3_text"]


@pytest.mark.parametrize("name", SPLIT)
def test_attention_then_mlp_is_the_layer(name):
    model = build(name).eval()
    x = inputs(name)
    with torch.no_grad():
        hidden, call = capture_stack(model, {**x, "use_cache": False})
        for layer in range(len(call)):
            whole = call.run(hidden, layer, layer + 1)
            parts = call.run_part(call.run_part(hidden, layer, "attention"), layer, "mlp")
            assert torch.equal(parts, whole), (name, layer)
            hidden = whole
        # a row subset: the parts slice the layer's arguments as the whole layer does
        rows = torch.tensor([1])
        sub = call.run_part(call.run_part(hidden[1:], 0, "attention", rows=rows), 0, "mlp", rows=rows)
        assert torch.equal(sub, call.run(hidden[1:], 0, 1, rows=rows))


def test_shares_sum_to_one_and_follow_the_parameters():
    layer = build("llama").model.layers[0]
    shares = part_shares(layer)
    assert abs(sum(shares.values()) - 1) < 1e-9
    attn = sum(p.numel() for p in layer.self_attn.parameters())
    assert shares["attention"] == pytest.approx(attn / (attn + sum(p.numel() for p in layer.mlp.parameters())))


def test_unsplittable_stacks_are_refused():
    model = build("gpt2")
    with torch.no_grad():
        hidden, call = capture_stack(model, {**inputs("gpt2"), "use_cache": False})
    with pytest.raises(ValueError, match="does not split its layers into attention and MLP"):
        call.run_part(hidden, 0, "attention")
    hidden, call = capture_stack(build("llama"), {**inputs("llama"), "use_cache": False})
    with pytest.raises(ValueError, match="unknown sub-layer"):
        call.run_part(hidden, 0, "ffn")
