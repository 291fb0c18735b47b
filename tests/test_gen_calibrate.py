"""Learn-then-Test calibration of token exit criteria on generated continuations: consistency measures on hand-made
sequences, known answers on a tiny random decoder (a criterion that never fires is certified with risk 0; testing
stops at the first failing threshold), and clear errors."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import VOCAB, build

from depthprune.exits.lm_heads import DecoderExitHeads
from depthprune.generation.calibrate import (
    calibrate_generation,
    check,
    early_exit_continuations,
    greedy_continuations,
    lcs_length,
    prompt_blocks,
    rouge_l,
    supported_criteria,
    token_consistency,
)
from depthprune.ltt import risk_p_value

NEVER = 1024.0  # fixed:1024 never exits before the last layer


def _prompts(n: int = 16, seq: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq), generator=g)


@pytest.fixture(scope="module")
def tiny():
    model = build("llama")
    model.generation_config.eos_token_id = None  # random models stop at random places otherwise
    return model, DecoderExitHeads.logit_lens(model).eval()


# ---- consistency measures ---------------------------------------------------------------------------------------
def test_lcs_and_rouge_l_on_hand_made_sequences():
    assert lcs_length([1, 2, 3, 4, 5], [2, 4, 5, 9]) == 3
    assert lcs_length([1, 2, 3], [4, 5]) == 0
    assert lcs_length([], [1]) == 0
    assert lcs_length([7, 1, 7, 1], [1, 7, 1, 7]) == 3
    # LCS 3, len 5 and 4: P = 3/5, R = 3/4, F1 = 2PR/(P+R) = 2*3/(5+4)
    assert rouge_l([1, 2, 3, 4, 5], [2, 4, 5, 9]) == pytest.approx(2 * 3 / 9)
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([1, 2], [3, 4]) == 0.0
    assert rouge_l([], []) == 1.0 and rouge_l([], [1]) == 0.0


def test_token_consistency_compares_positions_over_the_longer_sequence():
    assert token_consistency([1, 2, 3, 4], [1, 9, 3, 4]) == 0.75
    assert token_consistency([2, 3, 4], [1, 2, 3, 4]) == 0.0  # shifted: no position agrees (ROUGE-L would forgive it)
    assert rouge_l([2, 3, 4], [1, 2, 3, 4]) == pytest.approx(6 / 7)
    assert token_consistency([1, 2], [1, 2, 3, 4]) == 0.5  # stopped early: the missing positions count as misses
    assert token_consistency([], []) == 1.0


# ---- prompts ----------------------------------------------------------------------------------------------------
WORDS = ["the", "whale", "sea", "ship", "captain", "white", "boat", "harpoon", "deep", "wave", "sail", "storm"]


def _tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def test_prompt_blocks_spread_over_the_text():
    text = " ".join(WORDS[i % len(WORDS)] for i in range(100))
    ids = _tokenizer()(text, add_special_tokens=False)["input_ids"]
    blocks = prompt_blocks(_tokenizer(), text, 3, 10)  # 10 blocks of 10: the first, the middle and the last
    assert blocks.shape == (3, 10)
    assert blocks[0].tolist() == ids[:10] and blocks[2].tolist() == ids[90:100]
    assert blocks[1].tolist() in (ids[40:50], ids[50:60])
    with pytest.raises(ValueError, match="only 10 blocks of 10 tokens, too few for 11 prompts"):
        prompt_blocks(_tokenizer(), text, 11, 10)


# ---- known answers ----------------------------------------------------------------------------------------------
def test_continuations_without_exit_are_the_full_models(tiny):
    model, heads = tiny
    prompts = _prompts(6)
    refs = greedy_continuations(model, prompts, 5, batch_size=4)
    got = early_exit_continuations(model, heads, prompts, f"fixed:{NEVER:g}", 5, batch_size=4)
    assert got.tokens == refs and all(len(r) == 5 for r in refs)
    assert got.exit_layers == [[3] * 5] * 6 and got.mean_layers() == 4.0
    # both cut at the first end-of-sequence token, which stays
    eos = refs[0][2]
    cut = greedy_continuations(model, prompts, 5, eos_token_id=eos)
    assert cut[0] == refs[0][: refs[0].index(eos) + 1]
    assert early_exit_continuations(model, heads, prompts, f"fixed:{NEVER:g}", 5, eos_token_id=eos).tokens == cut


@pytest.mark.parametrize("consistency", ["tokens", "rouge_l"])
def test_a_criterion_that_never_fires_is_certified_with_risk_zero(tiny, consistency):
    model, heads = tiny
    # 16 prompts with no loss: p-value (1 - 0.2)^16 = 0.028 <= 0.05 (exact binomial: every loss is 0)
    result = calibrate_generation(
        model, heads, _prompts(16), "fixed", grid=[NEVER], delta=0.2, epsilon=0.05, consistency=consistency,
        max_new_tokens=4,
    )  # fmt: skip
    assert result.threshold == NEVER
    (row,) = result.table
    assert row["risk"] == 0.0 and row["consistency"] == 1.0 and row["rejected"]
    assert row["p_value"] == pytest.approx(0.8**16)
    assert row["mean_layers"] == 4.0
    assert "fixed:1024" in result.guarantee() and ">= 0.8" in result.guarantee()
    assert result.to_dict()["guarantee"] == result.guarantee()


def test_too_few_prompts_certify_nothing(tiny):
    model, heads = tiny
    result = calibrate_generation(model, heads, _prompts(8), "fixed", grid=[NEVER], delta=0.2, max_new_tokens=3)
    assert result.threshold is None  # 0.8^8 = 0.17 > 0.05, even with no loss at all
    assert "no threshold certified" in result.guarantee()


def test_fixed_sequence_testing_stops_at_the_first_failure(tiny):
    model, heads = tiny
    prompts = _prompts(16)
    refs = greedy_continuations(model, prompts, 4)
    # exiting after layer 0 of a random model rarely gives the full model's tokens; the third candidate, safe as it is,
    # is never tested: fixed-sequence testing stops at the first threshold it cannot certify
    result = calibrate_generation(
        model, heads, prompts, "fixed", grid=[NEVER, 0, NEVER - 1], delta=0.2, max_new_tokens=4, references=refs
    )
    assert [row["threshold"] for row in result.table] == [NEVER, 0]
    assert result.threshold == NEVER
    shallow = result.table[1]
    assert shallow["risk"] > 0.2 and not shallow["rejected"] and shallow["mean_layers"] == pytest.approx(1 + 3 / 4)
    # the table's risk is 1 - consistency of exactly those continuations, and its p-value risk_p_value's
    got = early_exit_continuations(model, heads, prompts, "fixed:0", 4)
    losses = torch.tensor([1 - token_consistency(c, r) for c, r in zip(got.tokens, refs, strict=True)])
    assert shallow["risk"] == pytest.approx(float(losses.mean()))
    assert shallow["p_value"] == pytest.approx(risk_p_value(losses, 0.2))


def test_check_on_held_out_prompts(tiny):
    model, heads = tiny
    full = check(model, heads, _prompts(4, seed=5), f"fixed:{NEVER:g}", max_new_tokens=4)
    assert full == {"tokens": 1.0, "rouge_l": 1.0, "identical": 1.0, "mean_layers": 4.0, "num_layers": 4, "n": 4}
    shallow = check(model, heads, _prompts(4, seed=5), "fixed:0", max_new_tokens=4, kv="recompute")
    assert shallow["mean_layers"] == pytest.approx(1.75) and shallow["tokens"] < 1.0


# ---- clear errors -----------------------------------------------------------------------------------------------
def test_clear_errors(tiny):
    model, heads = tiny
    prompts = _prompts(4)
    with pytest.raises(ValueError, match="unknown consistency measure 'bleu'; choose one of tokens, rouge_l"):
        calibrate_generation(model, heads, prompts, "max_prob", consistency="bleu")
    for delta in (0.0, 1.5):
        with pytest.raises(ValueError, match="delta and epsilon must lie in"):
            calibrate_generation(model, heads, prompts, "max_prob", delta=delta)
    with pytest.raises(ValueError, match="unknown token exit criterion 'nope'"):
        calibrate_generation(model, heads, prompts, "nope")
    with pytest.raises(ValueError, match="'learned' criterion needs exit heads with CALM's confidence"):
        calibrate_generation(model, heads, prompts, "learned")
    with pytest.raises(ValueError, match="unknown kv strategy"):
        calibrate_generation(model, heads, prompts, "max_prob", kv="cache")
    config = build("llama").config
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    shallower = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(ValueError, match="built for a 4-layer decoder, the model has 3 decoder layers"):
        calibrate_generation(shallower, heads, prompts, "max_prob")
    with pytest.raises(ValueError, match="built for a 4-layer decoder"):
        check(shallower, heads, prompts, "max_prob:0.9")


def test_supported_criteria():
    model = build("llama")
    assert "learned" not in supported_criteria(DecoderExitHeads.for_model(model))
    assert supported_criteria(DecoderExitHeads.for_model(model, confidence=True)) == [
        "max_prob", "margin", "saturation", "learned", "fixed",
    ]  # fmt: skip


# ---- what a saved calibration certifies; teacher-forced agreement of uncalibrated exits ------------------------------
def test_teacher_forced_agreement_matches_the_exits_and_the_criterion(tiny):
    from depthprune.exits.token_criteria import make_criterion
    from depthprune.exits.train.lm_exits import exit_agreement
    from depthprune.generation.calibrate import teacher_forced_agreement

    model, heads = tiny
    ids = _prompts(4, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # padding positions do not count
    never = teacher_forced_agreement(model, heads, ids, mask, make_criterion("fixed", NEVER))
    assert never["positions"] == 22 and never["agreement"] == 1.0 and never["mean_layers"] == heads.num_layers
    first = teacher_forced_agreement(model, heads, ids, mask, make_criterion("fixed", 0))
    assert first["mean_layers"] == 1.0 and first["agreement"] == pytest.approx(first["per_layer"][0])
    full = teacher_forced_agreement(model, heads, ids)  # no criterion: per-layer agreement only
    assert "agreement" not in full
    assert full["per_layer"] == pytest.approx(exit_agreement(model, heads, ids))
    # max_prob:0 exits every position at the first exit: the exit's own agreement
    assert teacher_forced_agreement(model, heads, ids, criterion=make_criterion("max_prob", 0.0))["agreement"] == (
        pytest.approx(full["per_layer"][0])
    )


def test_certifying_record_finds_the_certified_thresholds(tiny):
    from depthprune.exits.token_criteria import make_criterion
    from depthprune.generation.calibrate import calibrated_criterion, certified_thresholds, certifying_record

    model, heads = tiny
    result = calibrate_generation(
        model, heads, _prompts(5), "fixed", delta=0.5, epsilon=0.05, max_new_tokens=3, grid=[NEVER, 2, 0]
    ).to_dict()
    certified = certified_thresholds(result)
    assert certified[0] == NEVER and result["threshold"] == certified[-1]
    assert all(row["threshold"] in certified for row in result["table"] if row["rejected"])
    assert certifying_record([result], make_criterion("fixed", NEVER)) is result
    assert certifying_record([result], make_criterion("fixed", 1)) is None  # never tested
    assert certifying_record([result], make_criterion("max_prob", NEVER / 1024)) is None  # another criterion
    assert certifying_record([result], make_criterion("fixed", NEVER), kv="recompute") is None  # other settings
    assert certifying_record([result], make_criterion("fixed", NEVER), deep_prefill=False) is None
    criterion, record = calibrated_criterion([result])
    assert (criterion.name, criterion.threshold, record) == ("fixed", result["threshold"], result)
    assert calibrated_criterion([{**result, "threshold": None}]) is None and certified_thresholds({}) == []
