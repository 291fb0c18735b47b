"""Truncated-vocabulary exit heads (exits/vocab_heads.py): the kept tokens chosen by coverage or count, logits equal
to the full head's on the kept tokens (-inf elsewhere; all tokens kept: the full head exactly), and self-speculative
greedy decoding with truncated drafts token-identical to plain greedy decoding (two families, batch 1 and a padded
batch whose rows accept different numbers of drafts), the model untouched."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, build, build_gemma3_sliding, build_opt_projected, input_ids

from depthprune.exits.lm_heads import DecoderExitHeads, top_tokens
from depthprune.exits.vocab_heads import VOCAB_NAME, TruncatedVocabHeads, frequent_tokens
from depthprune.generation.generate import early_exit_generate
from depthprune.generation.speculative import self_speculative_generate
from depthprune.registry import HEAD_KINDS


def test_frequent_tokens_by_coverage_and_by_count():
    tokens = torch.tensor([5] * 6 + [2] * 3 + [7] * 1)  # 60%, 30%, 10%
    ids, covered = frequent_tokens(tokens, 10, coverage=0.6)
    assert ids.tolist() == [5] and covered == pytest.approx(0.6)
    ids, covered = frequent_tokens(tokens, 10, coverage=0.61)
    assert ids.tolist() == [5, 2] and covered == pytest.approx(0.9)
    ids, covered = frequent_tokens(tokens, 10, coverage=1.0)
    assert ids.tolist() == [5, 2, 7] and covered == 1.0
    ids, _ = frequent_tokens(tokens, 10, k=4)  # past the seen tokens: ties by lower id
    assert ids.tolist() == [5, 2, 7, 0]
    ids, covered = frequent_tokens(tokens, 10, k=1, always=[9, 5])
    assert ids.tolist() == [5, 9] and covered == pytest.approx(0.6)
    for kwargs, message in [
        ({}, "give exactly one of coverage"),
        ({"coverage": 0.5, "k": 2}, "give exactly one of coverage"),
        ({"coverage": 1.5}, "coverage must lie in (0, 1]"),
        ({"k": 0}, "k must lie in 1..10"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            frequent_tokens(tokens, 10, **kwargs)
    with pytest.raises(ValueError, match="token ids must lie in 0..9"):
        frequent_tokens(torch.tensor([12]), 10, k=1)


def _trunc(model, kind="logit_lens", k=12, layers=None, seed=3, tokens=None):
    base = DecoderExitHeads.for_model(model, layers, kind=kind)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random translators, so the exits differ from the logit lens
        for p in base.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    if tokens is None:
        tokens = torch.randint(0, VOCAB, (400,), generator=g) % 40  # a "calibration text" over the first 40 ids
    return TruncatedVocabHeads.from_tokens(base, tokens, k=k), base


def _model_text(model, seed=7):
    """A calibration text the model itself writes: greedy continuations of random prompts."""
    ids, _ = input_ids(batch=8, seq=4, seed=seed, pad_first_row=0)
    return _greedy(model, ids, None, 16)


@pytest.mark.parametrize("case", ["llama", "gpt2", "opt_projected", "gemma3_softcap"])
def test_logits_equal_the_full_head_on_the_kept_tokens(case):
    model = {"opt_projected": build_opt_projected, "gemma3_softcap": build_gemma3_sliding}.get(case, build)
    model = model() if case in ("opt_projected", "gemma3_softcap") else model(case)
    heads, base = _trunc(model, "lens")
    layer = heads.layers[0]
    hidden = torch.randn(3, 2, model.config.hidden_size)
    full = base.logits(layer, hidden)
    mine = heads.logits(layer, hidden)
    kept = heads.token_ids
    torch.testing.assert_close(mine[..., kept], full[..., kept])
    outside = torch.ones(full.shape[-1], dtype=torch.bool)
    outside[kept] = False
    assert torch.isinf(mine[..., outside]).all() and (mine[..., outside] < 0).all()
    assert torch.equal(heads.top_tokens(layer, hidden), mine.argmax(-1))
    assert torch.equal(top_tokens(heads, layer, hidden), mine.argmax(-1))
    assert torch.equal(top_tokens(base, layer, hidden), full.argmax(-1))  # heads without a fast path
    # every token kept: exactly the full head
    every = TruncatedVocabHeads(base, torch.arange(full.shape[-1]))
    torch.testing.assert_close(every.logits(layer, hidden), full)
    last = heads.num_layers - 1  # the last layer is the model's own full head
    torch.testing.assert_close(heads.logits(last, hidden), base.logits(last, hidden))


def test_registered_save_load_and_errors(tmp_path):
    model = build("llama")
    heads, base = _trunc(model, "lens", k=7)
    assert HEAD_KINDS.get("truncated") is TruncatedVocabHeads and heads.k == 7
    assert heads.info["k"] == 7 and heads.info["calibration_tokens"] == 400
    heads.save(tmp_path / "h")
    again = TruncatedVocabHeads.load(tmp_path / "h", model)
    assert torch.equal(again.token_ids, heads.token_ids) and again.info == heads.info
    hidden = torch.randn(2, 1, model.config.hidden_size)
    torch.testing.assert_close(again.logits(1, hidden), heads.logits(1, hidden))
    assert (tmp_path / "h" / VOCAB_NAME).is_file()
    with pytest.raises(FileNotFoundError, match=VOCAB_NAME):
        TruncatedVocabHeads.load(tmp_path / "nothing", model)
    with pytest.raises(ValueError, match="token_ids must be a non-empty list of ids in 0..98"):
        TruncatedVocabHeads(base, [VOCAB])
    with pytest.raises(ValueError, match="repeated ids"):
        TruncatedVocabHeads(base, [1, 1])
    with pytest.raises(ValueError, match="truncated-vocabulary heads wrap one"):
        DecoderExitHeads.for_model(model, kind="truncated")


def _greedy(model, ids, mask, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, eos_token_id=None)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("k", [8, 40])
def test_self_speculative_with_truncated_drafts_equals_plain_greedy(arch, k):
    model = build(arch)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    heads, _ = _trunc(model, "logit_lens", k=k, layers=[2], tokens=_model_text(model))
    ids, _ = input_ids(batch=1, seq=6)
    ref = _greedy(model, ids, None, 12)
    for draft_len in (1, 3):
        out = self_speculative_generate(
            model, heads, ids, exit_layer=2, draft_len=draft_len, max_new_tokens=12, eos_token_id=()
        )
        assert torch.equal(out.sequences, ref), draft_len
    ids, mask = input_ids(batch=4, seq=6)
    ids[2, :3], mask[2, :3] = 0, 0  # rows 0 and 2 left-padded
    ref = _greedy(model, ids, mask, 12)
    out = self_speculative_generate(model, heads, ids, mask, exit_layer=2, draft_len=3, max_new_tokens=12,
                                    eos_token_id=())  # fmt: skip
    assert torch.equal(out.sequences, ref)
    per_round = out.round_accepted.T  # [rounds, batch]
    assert any(len(set(r[r >= 0].tolist())) > 1 for r in per_round)  # rows accepted different numbers of drafts
    # sampling drafts from the truncated distribution also runs (drafts only ever propose kept tokens)
    g = torch.Generator().manual_seed(0)
    sampled = self_speculative_generate(model, heads, ids, mask, exit_layer=2, draft_len=2, max_new_tokens=6,
                                        eos_token_id=(), do_sample=True, generator=g)  # fmt: skip
    assert sampled.sequences.shape == (4, 12)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # the model is untouched


def test_early_exit_with_truncated_heads():
    model = build("llama")
    heads, _ = _trunc(model, "logit_lens", k=6)
    ids, mask = input_ids(batch=2, seq=5)
    never = early_exit_generate(model, heads, ids, mask, criterion="max_prob:1.0", max_new_tokens=6, eos_token_id=())
    assert torch.equal(never.sequences, _greedy(model, ids, mask, 6))
    always = early_exit_generate(model, heads, ids, mask, criterion="fixed:0", max_new_tokens=6, eos_token_id=())
    new = always.sequences[:, ids.shape[1] + 1 :]  # the first new token comes from the full prefill
    assert torch.isin(new, heads.token_ids).all()
