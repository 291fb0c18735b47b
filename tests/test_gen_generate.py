"""Early-exit greedy generation with a KV cache, on tiny random decoders: equalities with plain greedy generation,
with each sequence generated alone, with hand computations of the propagated cache entries, and with uncached
reference loops."""

import warnings

import pytest
import torch
import transformers
from tiny_models import build, build_gemma3_sliding, build_opt_projected, input_ids
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from depthprune.adapters import get_adapter
from depthprune.exits.lm_heads import DecoderExitHeads, ExitHeadsLike
from depthprune.exits.token_criteria import TokenState, make_criterion
from depthprune.generation.generate import early_exit_generate
from depthprune.runner import capture_layer_inputs

ARCHS = ["llama", "gpt2"]
NEVER = "max_prob:1.0"


class Lens:
    """Logit-lens exits after every layer but the last: the model's own final norm + LM head."""

    def __init__(self, model, layers=None):
        adapter = get_adapter(model)
        self.norm, self.head = adapter.final_norm(model), adapter.head(model)
        self.num_layers = adapter.num_layers(model)["decoder"]
        self.layers = tuple(range(self.num_layers - 1)) if layers is None else tuple(layers)
        self.logit_calls: list[int] = []

    def logits(self, layer, hidden):
        self.logit_calls.append(hidden.shape[0])
        return self.head(self.norm(hidden))

    def confidence(self, layer, hidden):
        return None


class Sharp(Lens):
    """The logit lens at a low temperature: confident enough for thresholds to split a batch of a random model."""

    def logits(self, layer, hidden):
        return 40.0 * super().logits(layer, hidden)


class PerRow:
    """Row r exits after layer targets[r] (test criterion: rows leave the running set at different layers)."""

    name, threshold, needs = "per_row", 0.0, ()

    def __init__(self, targets):
        self.targets = torch.tensor(targets)

    def decide(self, state: TokenState):
        return state.layer >= self.targets[state.rows]


class Schedule:
    """Decode step k exits after layer layers[k] (for batch 1): shallow and deep tokens alternate, so deep tokens
    read the cache entries that shallow tokens skipped."""

    name, threshold, needs = "schedule", 0.0, ()

    def __init__(self, layers):
        self.layers, self.step = layers, -1

    def decide(self, state: TokenState):
        if state.layer == 0:
            self.step += 1
        return torch.full((state.batch_size,), state.layer >= self.layers[self.step])


def greedy(model, ids, mask, n, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, **kw)


def test_lens_satisfies_the_protocol():
    assert isinstance(Lens(build("llama")), ExitHeadsLike)


@pytest.mark.parametrize("arch", [*ARCHS, "gpt_neox"])
@pytest.mark.parametrize("kv", ["propagate", "recompute"])
@pytest.mark.parametrize("batch", [1, 4])
def test_no_exit_is_plain_greedy(arch, kv, batch):
    model = build(arch)
    ids, mask = input_ids(batch=batch, seq=6)
    if batch > 1:
        ids[2, :3], mask[2, :3] = 0, 0  # a second left-padded row
    ref = greedy(model, ids, mask, 8)
    out = early_exit_generate(model, Lens(model), ids, mask, criterion=NEVER, max_new_tokens=8, kv=kv)
    assert torch.equal(out.sequences, ref)
    assert (out.exit_layers[out.exit_layers >= 0] == 3).all()
    assert out.mean_layers() == 4.0


@pytest.mark.parametrize("arch", ARCHS)
def test_shallow_prefill_without_exit_is_plain_greedy(arch):
    model = build(arch)
    ids, mask = input_ids(batch=3, seq=5)
    out = early_exit_generate(
        model, Lens(model), ids, mask, criterion=NEVER, max_new_tokens=6, kv="recompute", deep_prefill=False
    )
    assert torch.equal(out.sequences, greedy(model, ids, mask, 6))
    for kv in ("propagate", "recompute"):  # the prompt's last token may exit too
        shallow = early_exit_generate(
            model,
            Lens(model),
            ids,
            mask,
            criterion="fixed:1",
            max_new_tokens=3,
            kv=kv,
            deep_prefill=False,
            eos_token_id=(),
        )
        assert (shallow.exit_layers == 1).all()
        with torch.no_grad():
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            h1 = model(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states[2][:, -1:]
        assert torch.equal(shallow.sequences[:, 5], Lens(model).logits(1, h1)[:, -1].argmax(-1))
    one = early_exit_generate(model, Lens(model), ids[1:2, -1:], criterion=NEVER, max_new_tokens=4, deep_prefill=False)
    assert torch.equal(one.sequences, greedy(model, ids[1:2, -1:], None, 4))  # a one-token prompt: empty prefill


def test_end_of_sequence_pads_like_generate():
    model = build("llama")
    ids, mask = input_ids(batch=4, seq=6)
    free = greedy(model, ids, mask, 8, eos_token_id=None)
    eos = int(free[1, 6 + 2])  # a token row 1 produces third
    ref = greedy(model, ids, mask, 8, eos_token_id=eos, pad_token_id=0)
    for kv in ("propagate", "recompute"):
        out = early_exit_generate(
            model, Lens(model), ids, mask, criterion=NEVER, max_new_tokens=8, kv=kv, eos_token_id=eos, pad_token_id=0
        )
        assert torch.equal(out.sequences, ref)
        new = out.sequences[:, 6:]
        assert ((out.exit_layers == -1) == (new == 0) & (torch.cumsum(new == eos, 1) - (new == eos).long() > 0)).all()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_batch_equals_each_row_alone(arch, kv):
    model = build(arch)
    ids, mask = input_ids(batch=4, seq=6)
    ids[2, :3], mask[2, :3] = 0, 0
    targets = [1, 0, 3, 2]  # row 2 never exits early
    heads = Lens(model)
    out = early_exit_generate(model, heads, ids, mask, criterion=PerRow(targets), max_new_tokens=7, kv=kv)
    assert out.exit_layers[:, 1:].tolist() == [[t] * 6 for t in targets]
    for r, t in enumerate(targets):
        prompt = ids[r : r + 1, mask[r].bool()]
        alone = early_exit_generate(model, heads, prompt, criterion=f"fixed:{t}", max_new_tokens=7, kv=kv)
        assert torch.equal(alone.sequences[0, prompt.shape[1] :], out.sequences[r, 6:]), r
        assert torch.equal(alone.exit_layers[0], out.exit_layers[r])


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_batch_with_a_firing_threshold_equals_each_row_alone(kv):
    model = build("llama")
    ids, mask = input_ids(batch=4, seq=6)
    heads = Sharp(model)
    crit = make_criterion("max_prob", 0.8)
    out = early_exit_generate(model, heads, ids, mask, criterion=crit, max_new_tokens=8, kv=kv)
    assert len(set(out.exit_layers[:, 1:].flatten().tolist())) > 1  # the threshold splits tokens between layers
    for r in range(4):
        prompt = ids[r : r + 1, mask[r].bool()]
        alone = early_exit_generate(model, heads, prompt, criterion=crit, max_new_tokens=8, kv=kv)
        assert torch.equal(alone.sequences[0, prompt.shape[1] :], out.sequences[r, 6:]), r
        assert torch.equal(alone.exit_layers[0], out.exit_layers[r])


def test_propagated_entries_equal_a_hand_computation():
    model = build("llama")
    ids, _ = input_ids(batch=1, seq=5)
    out = early_exit_generate(model, Lens(model), ids, criterion="fixed:1", max_new_tokens=5, kv="propagate")
    cache, seq = out.past_key_values, out.sequences
    assert out.exit_layers[0].tolist() == [3, 1, 1, 1, 1]
    with torch.no_grad():
        full = model(seq, output_hidden_states=True, use_cache=True)
        for p in range(5, seq.shape[1] - 1):  # generated tokens fed back: each exited after layer 1
            h1 = full.hidden_states[2][:, p : p + 1]  # [1, 1, hidden] leaving layer 1 (layers 0-1 run for all)
            for layer_idx in (0, 1):
                assert torch.allclose(
                    cache.layers[layer_idx].keys[:, :, p],
                    full.past_key_values.layers[layer_idx].keys[:, :, p],
                    atol=1e-5,
                )
            for layer_idx in (2, 3):
                layer = model.model.layers[layer_idx]
                attn = layer.self_attn
                x = layer.input_layernorm(h1)
                k = attn.k_proj(x).view(1, 1, -1, attn.head_dim).transpose(1, 2)
                v = attn.v_proj(x).view(1, 1, -1, attn.head_dim).transpose(1, 2)
                cos, sin = model.model.rotary_emb(x, position_ids=torch.tensor([[p]]))
                _, k = apply_rotary_pos_emb(k, k, cos, sin)
                assert torch.allclose(cache.layers[layer_idx].keys[:, :, p], k[:, :, 0], atol=1e-5)
                assert torch.allclose(cache.layers[layer_idx].values[:, :, p], v[:, :, 0], atol=1e-5)
        # the prompt went through the full model
        for layer_idx in range(4):
            assert torch.allclose(
                cache.layers[layer_idx].keys[:, :, :5], full.past_key_values.layers[layer_idx].keys[:, :, :5], atol=1e-5
            )


def _propagate_reference(model, heads, prompt, exit_layers):
    """Uncached hand-written loop of CALM state propagation (batch 1, no padding): for each new token, run the whole
    sequence through the layers one by one; a fed-back token that exited after layer e keeps its layer-e state in every
    layer above (so those layers' keys/values come from it), and the current token exits after its own layer."""
    layers = get_adapter(model).layers(model, "decoder")
    last = len(layers) - 1
    seq = prompt
    for j, e_now in enumerate(exit_layers):
        frozen = {prompt.shape[1] + i - 1: e for i, e in enumerate(exit_layers[:j]) if i > 0}
        with torch.no_grad():
            hidden, call = capture_layer_inputs(model, {"input_ids": seq, "use_cache": False})
            for layer_idx, layer in enumerate(layers):
                out = call.run(layer, hidden)
                for p, e in frozen.items():
                    if layer_idx > e:
                        out[:, p] = hidden[:, p]
                hidden = out
                if layer_idx == e_now:
                    h = hidden[:, -1:]
                    logits = heads.logits(e_now, h) if e_now < last else heads.head(heads.norm(h))
                    seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
                    break
    return seq


@pytest.mark.parametrize("arch", ARCHS)
def test_propagate_matches_a_reference_loop(arch):
    model = build(arch)
    ids, _ = input_ids(batch=1, seq=5)
    heads = Lens(model)
    schedule = [1, 3, 0, 3, 2, 3, 0, 1, 3]
    out = early_exit_generate(model, heads, ids, criterion=Schedule(schedule), max_new_tokens=10, kv="propagate")
    assert out.exit_layers[0].tolist() == [3, *schedule]
    assert torch.equal(out.sequences, _propagate_reference(model, heads, ids, [3, *schedule]))
    fixed = early_exit_generate(model, heads, ids, criterion="fixed:1", max_new_tokens=6, kv="propagate")
    assert torch.equal(fixed.sequences, _propagate_reference(model, heads, ids, [3] + [1] * 5))


@pytest.mark.parametrize("arch", ARCHS)
def test_recompute_attends_to_the_full_models_keys_and_values(arch):
    """Deferred recomputation fills every hole before a token reads it, with what the full model computes there: each
    token equals the argmax of its exit applied to the full uncached model's state on the same tokens."""
    model = build(arch)
    ids, _ = input_ids(batch=1, seq=5)
    heads = Lens(model)
    schedule = [1, 3, 0, 0, 2, 3, 1, 2, 3, 1]
    out = early_exit_generate(model, heads, ids, criterion=Schedule(schedule), max_new_tokens=11, kv="recompute")
    assert out.exit_layers[0].tolist() == [3, *schedule]
    seq = out.sequences
    with torch.no_grad():
        full = model(seq, output_hidden_states=True)
        for j, e in enumerate(out.exit_layers[0].tolist()):
            p = 5 + j - 1  # position of the token that produced new token j
            logits = full.logits[:, p] if e == 3 else heads.logits(e, full.hidden_states[e + 1][:, p : p + 1])[:, -1]
            assert int(logits.argmax(-1)) == int(seq[0, p + 1]), j
        # every hole a deeper token needed was filled with the full model's entry
        ref_cache = model(seq[:, :-1], use_cache=True).past_key_values
    cache = out.past_key_values
    last_deep = 5 + 9 - 1  # the token at this position ran all layers after filling every earlier position's holes
    for layer_idx in range(4):
        assert torch.allclose(
            cache.layers[layer_idx].keys[:, :, : last_deep + 1],
            ref_cache.layers[layer_idx].keys[:, :, : last_deep + 1],
            atol=1e-5,
        )
    assert (cache.layers[3].keys[:, :, last_deep + 1] == 0).all()  # the last token exited after layer 1: a hole


def test_saturation_projects_only_exiting_rows():
    model = build("llama")
    ids, mask = input_ids(batch=4, seq=6)
    heads = Lens(model)
    out = early_exit_generate(model, heads, ids, mask, criterion="saturation:1.0", max_new_tokens=4)
    assert heads.logit_calls == [] and (out.exit_layers == 3).all()  # nothing exits: no exit logits at all
    heads = Lens(model)
    out = early_exit_generate(model, heads, ids, mask, criterion="saturation:0.95", max_new_tokens=5)
    exits = out.exit_layers[:, 1:]
    assert 0 < int((exits < 3).sum()) < exits.numel()  # some tokens exit, some run the whole model
    expected = [int((exits[:, s] == layer).sum()) for s in range(4) for layer in range(3)]
    assert heads.logit_calls == [n for n in expected if n]  # one projection per exit, of the exiting rows only


def test_learned_criterion_uses_the_heads_confidence():
    model = build("llama")
    ids, mask = input_ids(batch=2, seq=6)

    class Confident(Lens):
        def confidence(self, layer, hidden):
            return torch.full(hidden.shape[:2], 0.3 * (layer + 1))  # 0.3, 0.6, 0.9

    out = early_exit_generate(model, Confident(model), ids, mask, criterion="learned:0.5", max_new_tokens=4)
    assert out.exit_layers[:, 1:].eq(1).all()
    with pytest.raises(ValueError, match="confidence"):
        early_exit_generate(model, Lens(model), ids, mask, criterion="learned:0.5", max_new_tokens=2)


def test_bad_input_is_refused():
    model = build("llama")
    ids, mask = input_ids(batch=2, seq=5)
    heads = Lens(model)
    with pytest.raises(ValueError, match="unknown token exit criterion"):
        early_exit_generate(model, heads, ids, mask, criterion="patience:2", max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown kv strategy"):
        early_exit_generate(model, heads, ids, mask, criterion=NEVER, max_new_tokens=2, kv="skip")
    with pytest.raises(ValueError, match="out of range"):
        early_exit_generate(model, heads, ids, mask, criterion="max_prob:1.5", max_new_tokens=2)
    with pytest.raises(ValueError, match="built for 6 layers"):
        bad = Lens(model)
        bad.num_layers = 6
        early_exit_generate(model, bad, ids, mask, criterion=NEVER, max_new_tokens=2)
    with pytest.raises(ValueError, match="must lie in"):
        early_exit_generate(model, Lens(model, layers=(0, 3)), ids, mask, criterion=NEVER, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        early_exit_generate(model, heads, ids, mask, criterion=NEVER, max_new_tokens=0)


def test_encoders_and_unsupported_caches_are_refused():
    bert = build("bert")
    ids, mask = input_ids(batch=2, seq=5)
    with pytest.raises(ValueError, match="decoder-only"):
        early_exit_generate(bert, None, ids, mask, criterion=NEVER, max_new_tokens=2)
    t5 = build("t5")
    with pytest.raises(ValueError, match="encoder-decoder"):
        early_exit_generate(t5, None, ids, mask, criterion=NEVER, max_new_tokens=2)
    chunked = build("llama")  # chunked attention keeps no entry per position: refused by name
    chunked.config.layer_types = ["full_attention", "chunked_attention", "full_attention", "full_attention"]
    chunked.config.attention_chunk_size = 4
    with pytest.raises(ValueError, match="chunked_attention"):
        early_exit_generate(chunked, Lens(chunked), ids, mask, criterion=NEVER, max_new_tokens=2)


def test_qwen2_without_sliding_window_is_plain_greedy():
    config = transformers.Qwen2Config(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=False,
        pad_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    ids, mask = input_ids(batch=3, seq=6)
    out = early_exit_generate(model, Lens(model), ids, mask, criterion=NEVER, max_new_tokens=6, kv="recompute")
    assert torch.equal(out.sequences, greedy(model, ids, mask, 6))


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_opt_with_a_projection_after_the_final_norm_is_plain_greedy(kv):
    """OPT with word_embed_proj_dim < hidden_size: the final step is norm -> project_out -> LM head (the adapter's
    final_proj), for the last layer and for the exits alike."""
    model = build_opt_projected()
    ids, mask = input_ids(batch=3, seq=6, pad_first_row=2)
    heads = DecoderExitHeads.for_model(model, [1, 2], "logit_lens")
    out = early_exit_generate(model, heads, ids, mask, criterion=NEVER, max_new_tokens=6, kv=kv)
    assert torch.equal(out.sequences, greedy(model, ids, mask, 6))
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        decoder = model.model.decoder
        expected = model.lm_head(decoder.project_out(decoder.final_layer_norm(hidden[2])))
        assert torch.allclose(heads.logits(1, hidden[2]), expected, atol=1e-6)


# ---- sliding-window decoders -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv", ["propagate", "recompute"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["gemma3_sliding", "qwen2", "mistral"])
def test_sliding_window_decoders_with_a_never_firing_criterion_are_plain_greedy(name, batch, kv):
    """Gemma 3 (sliding window 3, soft-capped logits), Qwen 2 and Mistral: prompts and generations longer than the
    window, a padded row; every layer gets its own attention type's mask."""
    model = build_gemma3_sliding() if name == "gemma3_sliding" else build(name)
    ids, mask = input_ids(batch=batch, seq=6, pad_first_row=2)
    out = early_exit_generate(model, Lens(model), ids, mask, criterion=NEVER, max_new_tokens=8, kv=kv)
    assert torch.equal(out.sequences, greedy(model, ids, mask, 8))


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_sliding_window_exits_batched_equal_alone(kv):
    model = build_gemma3_sliding()
    ids, mask = input_ids(batch=3, seq=6, pad_first_row=2)
    crit = PerRow([0, 2, 1])
    out = early_exit_generate(model, Lens(model), ids, mask, criterion=crit, max_new_tokens=6, kv=kv, eos_token_id=())
    for r in range(3):
        real = mask[r].bool()
        one = early_exit_generate(
            model,
            Lens(model),
            ids[r : r + 1, real],
            None,
            criterion=PerRow([[0, 2, 1][r]]),
            max_new_tokens=6,
            kv=kv,
            eos_token_id=(),
        )
        assert torch.equal(out.sequences[r, -6:], one.sequences[0, -6:])


def test_no_future_warning_from_depthprunes_own_calls():
    """transformers 5.2x deprecates `past_key_values=`; depthprune passes its cache by the keyword the model takes."""
    model = build("llama")
    ids, mask = input_ids(batch=2, seq=5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=FutureWarning)
        for kv in ("propagate", "recompute"):
            early_exit_generate(model, Lens(model), ids, mask, criterion=NEVER, max_new_tokens=3, kv=kv)
