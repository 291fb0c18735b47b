"""Layer importance scorers on tiny random models: interface, hand-made cases, and equalities with hand computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import build, build_gemma3_sliding
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from depthprune.bench.perplexity import mean_nll
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan, layer_sizes
from depthprune.static.scorers import LayerScores, get_scorer, list_scorers
from depthprune.static.scorers.hidden import resolve_target, runner_serves, stack_states
from depthprune.static.scorers.lm_loss import plan_inputs, plan_loss, reference
from depthprune.static.scorers.lookahead_kl import split_for_search

VOCAB = 99
ALL = ("block_influence", "angular", "sleb", "lookahead_kl")


def llama(n_layers: int = 6, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def gpt2(n_layers: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=n_layers,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.2,
    )
    return GPT2LMHeadModel(config).eval()


def bert(n_layers: int = 4) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4, intermediate_size=64
    )
    return BertModel(config).eval()


def bart(n_layers: int = 4) -> BartForConditionalGeneration:
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=n_layers,
        decoder_layers=n_layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    return BartForConditionalGeneration(config).eval()


def calibration(n_batches: int = 3, batch: int = 2, seq: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n_batches)]


def make_identity(model: LlamaForCausalLM, layers: list[int]) -> LlamaForCausalLM:
    """A copy in which the given layers return their input unchanged (zero attention and MLP output projections)."""
    model = copy.deepcopy(model)
    for i in layers:
        layer = model.model.layers[i]
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    return model


def kl_by_hand(full: torch.nn.Module, model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean KL(full || model) over predicted positions, full vocabulary."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            p = torch.log_softmax(full(input_ids=ids).logits[:, :-1], -1)
            q = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
            total += (p.exp() * (p - q)).sum().item()
            count += ids[:, 1:].numel()
    return total / count


def drop(model: torch.nn.Module, removed: list[int]) -> torch.nn.Module:
    return apply_plan(model, LayerPlan.drop(layer_sizes(model), removed), share_weights=True)


# ---- interface ---------------------------------------------------------------------------------------------------


def test_registry_lists_the_builtin_scorers():
    assert set(ALL) <= set(list_scorers())
    for name in ALL:
        assert callable(get_scorer(name))


def test_unknown_scorer_lists_available_ones():
    with pytest.raises(ValueError, match="unknown scorer 'nope'.*block_influence.*angular.*sleb.*lookahead_kl"):
        get_scorer("nope")


@pytest.mark.parametrize("make", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("name", ALL)
def test_scorer_interface_on_causal_lms(make, name):
    model = make()
    n_layers = layer_sizes(model)["decoder"]
    result = get_scorer(name)(model, calibration(), n_remove=2)
    assert isinstance(result, LayerScores)
    assert result.scorer == name and result.stack == "decoder"
    assert len(result.scores) == n_layers and all(math.isfinite(s) for s in result.scores)
    assert len(result.remove) == 2 and len(set(result.remove)) == 2
    assert all(0 <= i < n_layers for i in result.remove)


@pytest.mark.parametrize("name", ["block_influence", "angular"])
def test_hidden_state_scorers_work_on_encoders_and_encoder_decoders(name):
    result = get_scorer(name)(bert(), calibration(), n_remove=1)
    assert result.stack == "encoder" and len(result.scores) == 4 and len(result.remove) == 1
    model = bart()
    assert get_scorer(name)(model, calibration(), n_remove=2).stack == "decoder"  # default: the last stack
    result = get_scorer(name)(model, calibration(), n_remove=2, stack="encoder")
    assert result.stack == "encoder" and len(result.scores) == 4
    assert all(math.isfinite(s) for s in result.scores)


@pytest.mark.parametrize("name", ["sleb", "lookahead_kl"])
@pytest.mark.parametrize("make", [bert, bart], ids=["bert", "bart"])
def test_loss_based_scorers_need_a_causal_lm(name, make):
    with pytest.raises(ValueError, match=f"{name} needs a causal language model; use block_influence or angular"):
        get_scorer(name)(make(), calibration(), n_remove=1)


@pytest.mark.parametrize("name", ALL)
def test_bad_arguments_are_reported(name):
    model = llama(4)
    with pytest.raises(ValueError, match="n_remove must be an integer from 0 to 3"):
        get_scorer(name)(model, calibration(), n_remove=4)
    with pytest.raises(ValueError, match="no stack 'encoder'"):
        get_scorer(name)(model, calibration(), n_remove=1, stack="encoder")
    with pytest.raises(ValueError, match="no calibration batches"):
        get_scorer(name)(model, [], n_remove=1)


# ---- shared machinery --------------------------------------------------------------------------------------------


def test_recorded_layer_inputs_match_the_models_hidden_states():
    model = llama()
    ids = calibration()[0]
    inputs, outputs = stack_states(model, ids, resolve_target(model, None, 0, "test"))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    for i in range(6):
        torch.testing.assert_close(inputs[i], hidden[i], rtol=0, atol=0)
    for i in range(5):
        torch.testing.assert_close(outputs[i], inputs[i + 1], rtol=0, atol=0)


@pytest.mark.parametrize("make", [llama, gpt2], ids=["llama", "gpt2"])
def test_resuming_from_cached_hidden_states_gives_the_same_loss(make):
    model = make()
    batches = calibration()
    target = resolve_target(model, None, 0, "test")
    n = target.n_layers
    ref = reference(model, batches)
    cache = plan_inputs(model, batches, target, list(range(n)))
    for keep in ([0, 1, 3], [0, 2, 3], [1, 2, 3], [0, 1, 2], list(range(n)), [3, 0]):
        plain = plan_loss(model, batches, target, keep, ref=ref)
        resumed = plan_loss(model, batches, target, keep, ref=ref, cache=cache)
        assert resumed.nll == pytest.approx(plain.nll, abs=1e-6)
        assert resumed.kl == pytest.approx(plain.kl, abs=1e-6)
    assert plan_loss(model, batches, target, list(range(n)), cache=cache).nll == pytest.approx(ref.loss.nll, abs=1e-6)
    # A plan's cache started from another plan's shared prefix equals one computed from scratch.
    for keep in ([0, 1, 3], [2, 3]):
        fresh = plan_inputs(model, batches, target, keep).states
        resumed = plan_inputs(model, batches, target, keep, cache=cache).states
        assert len(fresh) == len(resumed) == len(keep) + 1
        assert all(torch.equal(a, b) for f, r in zip(fresh, resumed, strict=True) for a, b in zip(f, r, strict=True))
    # Against the plain perplexity code on a what-if copy, and a hand-computed full-vocabulary KL.
    keep = [i for i in range(n) if i != 1]
    assert plan_loss(model, batches, target, keep).nll == pytest.approx(
        mean_nll(drop(model, [1]), torch.cat(batches)), abs=1e-5
    )
    assert plan_loss(model, batches, target, keep, ref=ref).kl == pytest.approx(
        kl_by_hand(model, drop(model, [1]), batches), abs=1e-5
    )


def test_runner_states_equal_the_models_hidden_states_on_gemma3_sliding_windows():
    model = build_gemma3_sliding()  # sliding window 3, layers sliding, sliding, full, sliding
    ids = calibration(seq=16)[0]
    target = resolve_target(model, None, 0, "test")
    assert runner_serves(model, target)
    inputs, outputs = stack_states(model, ids, target)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # the last one after the final norm
    for i in range(4):
        torch.testing.assert_close(inputs[i], hidden[i], rtol=0, atol=0)
    assert all(outputs[i] is inputs[i + 1] for i in range(3))
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(outputs[3]), hidden[4], rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_every_scorer_runs_on_gemma3_sliding_windows(name):
    model = build_gemma3_sliding()
    batches = calibration(seq=16)  # longer than the window
    result = get_scorer(name)(model, batches, n_remove=2)
    assert len(result.scores) == 4 and all(math.isfinite(s) for s in result.scores) and len(result.remove) == 2
    if name == "sleb":  # candidates resumed on the runner equal what-if copies run by the model's own forward
        blocks = torch.cat(batches)
        full = mean_nll(model, blocks)
        assert result.scores == pytest.approx([mean_nll(drop(model, [i]), blocks) - full for i in range(4)], abs=1e-5)


def test_t5_stacks_are_recorded_through_the_models_own_forward():
    model = build("t5")  # the stack hands its relative position bias from the first block to the others
    ids = calibration()[0]
    target = resolve_target(model, "encoder", 0, "test")
    assert not runner_serves(model, target)
    inputs, outputs = stack_states(model, ids, target)
    with torch.no_grad():
        hidden = model(input_ids=ids, decoder_input_ids=ids, output_hidden_states=True).encoder_hidden_states
    for i in range(len(inputs)):
        torch.testing.assert_close(inputs[i], hidden[i], rtol=0, atol=0)
    assert get_scorer("block_influence")(model, calibration(), n_remove=1).stack == "decoder"


# ---- hand-made cases ---------------------------------------------------------------------------------------------


def test_block_influence_finds_an_identity_layer():
    model = make_identity(llama(), [3])
    result = get_scorer("block_influence")(model, calibration(), n_remove=1)
    assert result.scores[3] == pytest.approx(0.0, abs=1e-5)
    assert min(s for i, s in enumerate(result.scores) if i != 3) > 1e-3
    assert result.remove == (3,)


def test_angular_finds_a_block_of_identity_layers():
    model = make_identity(llama(), [2, 3])
    result = get_scorer("angular")(model, calibration(), n_remove=2)
    assert result.remove == (2, 3)
    assert result.details["block_distance"][2] == pytest.approx(0.0, abs=1e-3)
    assert get_scorer("angular")(model, calibration(), n_remove=2, last_token=True).remove == (2, 3)


def test_sleb_first_removal_is_the_best_single_removal_by_hand():
    model = llama()
    batches = calibration()
    blocks = torch.cat(batches)
    full = mean_nll(model, blocks)
    by_hand = [mean_nll(drop(model, [i]), blocks) - full for i in range(6)]
    result = get_scorer("sleb")(model, batches, n_remove=2)
    assert result.scores == pytest.approx(by_hand, abs=1e-5)
    assert result.details["order"][0] == min(range(6), key=lambda i: by_hand[i])
    # The second removal is the best one given the first.
    first = result.details["order"][0]
    rest = [i for i in range(6) if i != first]
    second = min(rest, key=lambda i: mean_nll(drop(model, [first, i]), blocks))
    assert result.details["order"][1] == second


def test_sleb_scores_an_identity_layer_zero():
    model = make_identity(llama(), [1, 4])
    result = get_scorer("sleb")(model, calibration(), n_remove=1)
    assert result.scores[1] == pytest.approx(0.0, abs=1e-6) and result.scores[4] == pytest.approx(0.0, abs=1e-6)


# ---- lookahead_kl ------------------------------------------------------------------------------------------------


def test_lookahead_kl_is_no_worse_than_greedy_by_kl_and_leaves_the_model_unchanged():
    model = llama(6, seed=3)
    model.train()  # the scorer must run in eval mode and give the flags back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = calibration()
    result = get_scorer("lookahead_kl")(model, batches, n_remove=3, beam=3, search_fraction=1.0, nll_weight=0.0)
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    model.eval()
    removed: list[int] = []
    for _ in range(3):  # greedy removal by KL, by hand
        rest = [i for i in range(6) if i not in removed]
        removed.append(min(rest, key=lambda i: kl_by_hand(model, drop(model, removed + [i]), batches)))
    greedy_kl = kl_by_hand(model, drop(model, removed), batches)
    chosen_kl = kl_by_hand(model, drop(model, list(result.remove)), batches)
    assert result.details["kl"] == pytest.approx(chosen_kl, abs=1e-5)
    assert chosen_kl <= greedy_kl + 1e-6
    width_one = get_scorer("lookahead_kl")(
        model, batches, n_remove=3, beam=1, refine=False, search_fraction=1.0, nll_weight=0.0
    )
    assert width_one.remove == tuple(sorted(removed))

    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6


def test_lookahead_kl_default_objective_is_no_worse_than_its_greedy_path():
    model = llama(6, seed=3)
    batches = calibration()
    beam = get_scorer("lookahead_kl")(model, batches, n_remove=3, search_fraction=1.0)
    greedy = get_scorer("lookahead_kl")(model, batches, n_remove=3, beam=1, refine=False, search_fraction=1.0)
    assert beam.details["objective"] <= greedy.details["objective"] + 1e-9
    full = mean_nll(model, torch.cat(batches))
    chosen = drop(model, list(beam.remove))
    by_hand = kl_by_hand(model, chosen, batches) + mean_nll(chosen, torch.cat(batches)) - full
    assert beam.details["objective"] == pytest.approx(by_hand, abs=1e-5)


def test_lookahead_kl_scores_are_single_removal_kl():
    model = llama()
    batches = calibration()
    result = get_scorer("lookahead_kl")(model, batches, n_remove=1, search_fraction=1.0, nll_weight=0.0)
    by_hand = [kl_by_hand(model, drop(model, [i]), batches) for i in range(6)]
    assert result.scores == pytest.approx(by_hand, abs=1e-5)
    assert result.remove == (min(range(6), key=lambda i: by_hand[i]),)


def test_lookahead_kl_on_a_search_subset_removes_identity_layers():
    model = make_identity(llama(), [2, 5])
    batches = calibration(n_batches=4)  # 8 rows in 4 batches of 2
    result = get_scorer("lookahead_kl")(model, batches, n_remove=2, search_fraction=0.25, nll_weight=0.0)
    assert result.remove == (2, 5)
    assert result.details["search_rows"] == [2, 6]
    assert result.details["kl"] == pytest.approx(0.0, abs=1e-6)


def test_search_rows_are_spread_over_the_calibration_data():
    batches = [torch.arange(8).view(4, 2), torch.arange(8, 16).view(4, 2)]  # rows 0-3, then rows 4-7
    regrouped, k, rows = split_for_search(batches, 0.25)
    assert rows == [2, 6] and k == 2  # centred in two equal parts
    assert [b.tolist() for b in regrouped[:2]] == [[[4, 5]], [[12, 13]]]
    assert sorted(map(tuple, torch.cat(regrouped).tolist())) == sorted(map(tuple, torch.cat(batches).tolist()))
    assert split_for_search(batches, 1.0)[1:] == (2, list(range(8)))
    assert split_for_search([torch.zeros(1, 4, dtype=torch.long)], 0.1)[1:] == (1, [0])
    with pytest.raises(ValueError, match="search_fraction"):
        split_for_search(batches, 0.0)
