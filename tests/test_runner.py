"""The runner: a stack run layer by layer from the captured per-layer arguments equals the untouched model, on tiny
random decoders whose layers get different masks per attention type (Gemma 3, Qwen 2 with sliding windows shorter
than the sequence) and on plain ones."""

import pytest
import torch
from tiny_models import build, build_gemma3_sliding, build_opt_projected, input_ids

from depthprune.adapters import get_adapter
from depthprune.runner import capture_layer_inputs, capture_stack

SEQ = 9  # longer than every tiny sliding window (3 or 4)


def model_of(name):
    special = {"gemma3_sliding": build_gemma3_sliding, "opt_projected": build_opt_projected}
    return special[name]() if name in special else build(name)


@pytest.mark.parametrize("name", ["gemma3_sliding", "qwen2", "mistral", "llama", "gpt2", "opt", "opt_projected"])
def test_full_depth_run_equals_the_models_logits(name):
    model = model_of(name)
    ids, mask = input_ids(batch=3, seq=SEQ, pad_first_row=3)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        hidden, call = capture_stack(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False})
        out = get_adapter(model).final_logits(model, call.run(hidden))
    assert torch.allclose(out, ref, atol=1e-5)


def test_sliding_layers_get_their_own_arguments_and_no_layer_runs():
    model = build_gemma3_sliding()
    ran = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *_a, i=i: ran.append(i))
    ids, mask = input_ids(batch=2, seq=SEQ)
    _, call = capture_stack(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False})
    assert ran == []
    types = model.config.layer_types  # sliding, sliding, full, sliding
    assert call.calls[0] is call.calls[1] is call.calls[3] and call.calls[2] is not call.calls[0]
    assert types[2] == "full_attention"
    assert list(model.model.layers) == call.layers  # the layer modules are back in place
    with pytest.raises(ValueError, match="capture_stack"):
        capture_layer_inputs(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False})


@pytest.mark.parametrize("name", ["gemma3_sliding", "llama"])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_two_runs_equal_one(name, split):
    model = model_of(name)
    ids, mask = input_ids(batch=2, seq=SEQ)
    with torch.no_grad():
        hidden, call = capture_stack(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False})
        whole = call.run(hidden)
        parts = call.run(call.run(hidden, 0, split), split, len(call))
        ordered = call.run(hidden, order=range(len(call)))
    assert torch.equal(parts, whole) and torch.equal(ordered, whole)


@pytest.mark.parametrize("name", ["gemma3_sliding", "llama"])
def test_a_row_subset_equals_those_rows_alone(name):
    model = model_of(name)
    ids, mask = input_ids(batch=4, seq=SEQ, pad_first_row=4)
    rows = torch.tensor([0, 2])
    with torch.no_grad():
        hidden, call = capture_stack(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False})
        sub = call.run(hidden[rows], rows=rows)
        alone_h, alone = capture_stack(
            model, {"input_ids": ids[rows], "attention_mask": mask[rows], "use_cache": False}
        )
        ref = alone.run(alone_h)
    assert torch.allclose(sub, ref, atol=1e-6)
    reordered = torch.tensor([2, 0])  # rows in any order
    with torch.no_grad():
        out = call.run(hidden[reordered], rows=reordered)
    assert torch.allclose(out, ref.flip(0), atol=1e-6)
