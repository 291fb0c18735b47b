"""depthprune.kv: the full-length cache of a sliding-window decoder gives the model's own masks the right shape."""

import torch
from tiny_models import build_gemma3_sliding, input_ids

from depthprune.decoding import positions_from_mask, step_inputs
from depthprune.kv import check_cache, decoder_cache, left_align


def test_full_length_cache_decodes_like_the_uncached_model():
    """Token-by-token decoding through the model's own forward with `decoder_cache` (every layer full length, the
    model's sliding mask hiding old columns) gives the uncached model's logits, also for a padded row."""
    model = build_gemma3_sliding()
    ids, mask = input_ids(batch=2, seq=10, pad_first_row=3)
    positions = positions_from_mask(mask)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        cache = decoder_cache(model, 4)
        out = [model(**step_inputs(model, ids[:, :2], mask[:, :2], positions[:, :2], cache)).logits]
        for p in range(2, 10):
            out.append(
                model(**step_inputs(model, ids[:, p : p + 1], mask[:, : p + 1], positions[:, p : p + 1], cache)).logits
            )
    check_cache(cache, 4)
    assert cache.layers[0].keys.shape[-2] == 10  # sliding layers keep every column
    real = mask.bool()
    assert torch.allclose(torch.cat(out, 1)[real], ref[real], atol=1e-5)


def test_left_align_moves_masked_columns_left():
    model = build_gemma3_sliding()
    cache = decoder_cache(model, 4)
    keys = torch.arange(2 * 5, dtype=torch.float).reshape(2, 1, 5, 1)
    for i in range(4):
        cache.update(keys.clone(), keys.clone(), i)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = left_align(cache, mask, torch.tensor([2, 0]))
    assert out.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert cache.layers[3].keys[0, 0, :, 0].tolist() == [3, 4, 0, 1, 2]
    assert cache.layers[3].values[1, 0, :, 0].tolist() == [5, 6, 7, 8, 9]


def test_a_registered_kv_strategy_drives_the_decoding_loop():
    """A third party's strategy (here: CALM's propagation, counting the rows it propagates) registered by name runs in
    early_exit_generate: the same tokens and exit layers as the built-in "propagate", and it really was called."""
    from tiny_models import build

    from depthprune.exits.lm_heads import DecoderExitHeads
    from depthprune.generation.generate import early_exit_generate
    from depthprune.kv import Propagate
    from depthprune.registry import KV_STRATEGIES, register_kv_strategy

    calls = []

    class Counting(Propagate):
        name = "counting"

        def left(self, rows, layer_idx, hidden):
            calls.append(int(rows.numel()))
            super().left(rows, layer_idx, hidden)

    register_kv_strategy("counting", Counting)
    try:
        model = build("llama")
        heads = DecoderExitHeads.for_model(model, [0, 1, 2], "logit_lens")
        ids, mask = input_ids(batch=3, seq=5, pad_first_row=2)
        kw = dict(criterion="fixed:1", max_new_tokens=5, eos_token_id=())
        ours = early_exit_generate(model, heads, ids, mask, kv="counting", **kw)
        ref = early_exit_generate(model, heads, ids, mask, kv="propagate", **kw)
    finally:
        KV_STRATEGIES.unregister("counting")
    assert torch.equal(ours.sequences, ref.sequences) and torch.equal(ours.exit_layers, ref.exit_layers)
    assert sum(calls) == 3 * 4  # every row left after layer 1 at each of the 4 steps after the deep prefill
    try:
        early_exit_generate(model, heads, ids, mask, kv="counting", **kw)
    except ValueError as err:
        assert "unknown kv strategy 'counting'" in str(err) and "propagate" in str(err)
    else:
        raise AssertionError("an unregistered strategy was accepted")


def _propagated_entries(model, layer_kv_alone: bool):
    """The keys/values `propagate` writes at position 6 for rows [2, 0] of a batch of 3 (padded), layer by layer, with
    the stack's kv_layout fast path on or off (off: the layer's own forward up to its cache write)."""
    import dataclasses

    from depthprune.kv import propagate
    from depthprune.runner import capture_stack

    torch.manual_seed(0)
    ids, mask = input_ids(batch=3, seq=7, pad_first_row=2)
    positions = positions_from_mask(mask)
    layers = len(model.model.layers)
    with torch.no_grad():
        cache = decoder_cache(model, layers)
        model(**step_inputs(model, ids[:, :6], mask[:, :6], positions[:, :6], cache))
        inputs = step_inputs(model, ids[:, 6:], mask, positions[:, 6:], cache)
        hidden, call = capture_stack(model, inputs)
        if not layer_kv_alone:
            call = dataclasses.replace(call, kv_layout=None)
        rows = torch.tensor([2, 0])
        states = torch.randn(2, 1, hidden.shape[-1]) * 3
        queries = []  # query projections run while propagating
        hooks = [
            m.self_attn.q_proj.register_forward_hook(lambda *_: queries.append(1))
            for m in model.model.layers
            if hasattr(m.self_attn, "q_proj")
        ]
        for layer in range(layers):
            propagate(call, layer, cache, rows, states, 6)
        for h in hooks:
            h.remove()
    return len(queries), [(cache.layers[i].keys[:, :, 6].clone(), cache.layers[i].values[:, :, 6].clone())
                            for i in range(layers)]  # fmt: skip


def test_keys_values_alone_equal_the_layer_forward_bit_for_bit():
    """The "rotary" kv_layout (Llama, Qwen2 with sliding layers, Gemma 3 with its key norm and per-type rotary)
    computes a skipped token's cache entry without the query projection: exactly (torch.equal) what the layer's own
    forward writes; Phi3 (fused q/k/v) and GPT-2 keep the forward."""
    import pytest
    from tiny_models import build

    from depthprune.adapters.registry import get_adapter

    for name in ("llama", "qwen2", "gemma3_text"):
        model = build(name)
        queries, fast = _propagated_entries(model, True)
        assert queries == 0, name  # the fast path ran
        queries, slow = _propagated_entries(model, False)
        assert queries == len(model.model.layers), name
        for (k1, v1), (k2, v2) in zip(fast, slow, strict=True):
            assert torch.equal(k1, k2) and torch.equal(v1, v2), name
        assert not torch.equal(fast[0][0][0], fast[0][0][1])  # rows 0 and 2 got their own entries
    assert torch.equal(*[e[0][0] for e in (_propagated_entries(build_gemma3_sliding(), f)[1] for f in (True, False))])
    for name in ("phi3", "gpt2"):
        spec = get_adapter(build(name)).present_stacks(build(name))[-1]
        assert spec.kv_layout is None, name
    with pytest.raises(ValueError, match="unknown kv_layout"):
        from depthprune.kv import _kv_alone
        from depthprune.runner import StackCall

        _kv_alone(StackCall([], [], 1, kv_layout="fused"), 0)
