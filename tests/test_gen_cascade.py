"""Big/little cascades on tiny random models: the lossless mode equals the big model's greedy output (batch 1 and a
left-padded batch whose rows keep different numbers of little tokens, two families, a sliding-window model); fallback
and rollback at their neutral settings equal it too; rollback's big tokens are the big model's own argmax and its kept
little tokens pass the check; the encoder cascade at its neutral setting equals the big classifier; bad input gets a
clear error; sampling cascades draw their first tokens from the big model's distribution (lossless always, fallback and
rollback at their neutral settings) on a tiny vocabulary."""

import pytest
import torch
from tiny_models import CASES, build, build_gemma3_sliding, input_ids, tiny_vocab_model, tokenizer

from depthprune.generation.cascade import (
    BIG,
    LITTLE,
    CascadeError,
    ClassifierRecords,
    calibrate_cascade,
    calibrate_encoder_cascade,
    cascade_generate,
    collect_classifier_records,
    encoder_cascade,
)
from depthprune.static.apply import apply_plan


def greedy(model, ids, mask, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, eos_token_id=None)


def pair(arch):
    """(big, little): the little one is the big one without layers 1 and 2 (a pruned copy, sharing its embeddings)."""
    big = build(arch)
    return big, apply_plan(big, "0,3")


def padded_batch():
    ids, mask = input_ids(batch=4, seq=6)
    ids[2, :3], mask[2, :3] = 0, 0
    return ids, mask


def run(big, little, ids, mask=None, n=10, **kw):
    return cascade_generate(big, little, ids, mask, max_new_tokens=n, eos_token_id=(), **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_lossless_equals_the_big_models_greedy_output(arch):
    big, little = pair(arch)
    ids, _ = input_ids(batch=1, seq=6)
    ref = greedy(big, ids, None, 10)
    for k in (1, 3):
        out = run(big, little, ids, draft_len=k)
        assert torch.equal(out.sequences, ref), k
        assert 0 < out.accepted < out.drafted  # some little tokens kept, some rewritten: both paths ran
    ids, mask = padded_batch()
    ref = greedy(big, ids, mask, 10)
    out = run(big, little, ids, mask, draft_len=3)
    assert torch.equal(out.sequences, ref)
    kept = (out.source == LITTLE).sum(1)
    assert len(set(kept.tolist())) > 1  # rows kept different numbers of little tokens
    separate = build(arch, seed=7)  # a separate little model (same vocabulary, other weights)
    assert torch.equal(run(big, separate, ids, mask, draft_len=2).sequences, ref)
    # an early stop of the little run (fallback threshold) stays lossless
    assert torch.equal(run(big, little, ids, mask, draft_len=3, fallback=0.0135).sequences, ref)


def test_lossless_on_a_sliding_window_model():
    big = build_gemma3_sliding()
    little = apply_plan(big, "0,1,3")
    ids, mask = padded_batch()
    assert torch.equal(run(big, little, ids, mask, n=12, draft_len=3).sequences, greedy(big, ids, mask, 12))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_neutral_fallback_and_rollback_equal_the_big_model(arch):
    big, little = pair(arch)
    ids, mask = padded_batch()
    ref = greedy(big, ids, mask, 9)
    fb = run(big, little, ids, mask, n=9, mode="fallback", fallback=1.0)
    assert torch.equal(fb.sequences, ref) and (fb.source == BIG).all()
    rb = run(big, little, ids, mask, n=9, mode="rollback", rollback=1.0, draft_len=3)
    assert torch.equal(rb.sequences, ref) and (rb.source == BIG).all() and rb.drafted > 0


def _teacher_forced(big, seq, mask, prompt_len):
    """The big model's probabilities at each new position of seq [batch, prompt + new], given the true prefix."""
    full = torch.cat([mask, torch.ones_like(seq[:, prompt_len:])], dim=1)
    with torch.no_grad():
        logits = big(seq, attention_mask=full).logits[:, prompt_len - 1 : -1]
    return torch.softmax(logits.float(), -1)  # [batch, new, vocab]


def test_fallback_keeps_confident_little_tokens_and_rollback_rewrites_with_the_big_models_tokens():
    big, little = pair("llama")
    ids, mask = padded_batch()
    fb = run(big, little, ids, mask, n=12, mode="fallback", fallback=0.0135, draft_len=3)  # confidences ~0.013-0.015
    assert (fb.source == LITTLE).any() and (fb.source == BIG).any()
    probs = _teacher_forced(big, fb.sequences, mask, ids.shape[1])
    new = fb.sequences[:, ids.shape[1] :]
    is_big = fb.source == BIG
    assert torch.equal(probs.argmax(-1)[is_big], new[is_big])  # where the big model decided: its own argmax
    assert not torch.equal(fb.sequences, greedy(big, ids, mask, 12))  # the little model's tokens changed the output

    rollback = 0.013  # a random tiny model spreads its probability thin (max ~0.013-0.015 of 99 tokens)
    rb = run(big, little, ids, mask, n=12, mode="rollback", fallback=0.0, rollback=rollback, draft_len=4)
    probs = _teacher_forced(big, rb.sequences, mask, ids.shape[1])
    new = rb.sequences[:, ids.shape[1] :]
    is_big, is_little = rb.source == BIG, rb.source == LITTLE
    assert is_little.any() and rb.accepted < rb.drafted  # little tokens kept and rolled back
    assert torch.equal(probs.argmax(-1)[is_big], new[is_big])
    p_kept = probs.gather(-1, new[..., None])[..., 0][is_little]
    assert (p_kept >= rollback - 1e-6).all()  # every little token kept passed the big model's check


def test_end_of_sequence_pads_like_generate():
    big, little = pair("llama")
    ids, mask = padded_batch()
    free = greedy(big, ids, mask, 10)
    eos = int(free[1, 6 + 2])
    with torch.no_grad():
        ref = big.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, eos_token_id=eos,
                           pad_token_id=0)  # fmt: skip
    out = cascade_generate(big, little, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0, draft_len=3)
    assert torch.equal(out.sequences, ref)
    assert (out.source[1, 3:] == -1).all()


def test_bad_input_is_refused():
    big, little = pair("llama")
    ids, _ = input_ids(batch=1, seq=4)
    other_vocab = CASES["llama"].config()
    other_vocab.vocab_size = 98
    import transformers

    cases = [
        (dict(little=transformers.LlamaForCausalLM(other_vocab).eval()), "predicts 99 tokens and the little one 98"),
        (dict(little=build("bert")), "must be a decoder-only causal LM"),
        (dict(draft_len=0), "draft_len"),
        (dict(mode="fallback", fallback=1.5), r"in \[0, 1\]"),
        (dict(mode="rollback", rollback=-0.1), r"in \[0, 1\]"),
        (dict(mode="fallback"), "needs fallback="),
        (dict(mode="rollback"), "needs rollback="),
        (dict(mode="lossless", rollback=0.5), "applies to mode='rollback'"),
        (dict(mode="beam"), "unknown cascade mode"),
    ]
    for kw, msg in cases:
        kw = {"little": little, **kw}
        with pytest.raises(CascadeError, match=msg):
            cascade_generate(big, kw.pop("little"), ids, max_new_tokens=3, **kw)
    eos_differs = build("llama")
    eos_differs.generation_config.eos_token_id = 5
    with pytest.raises(CascadeError, match="eos_token_id differ"):
        cascade_generate(big, eos_differs, ids, max_new_tokens=3)
    with pytest.raises(CascadeError, match="tokenizers differ"):
        cascade_generate(big, little, ids, max_new_tokens=3, big_tokenizer=tokenizer(),
                         little_tokenizer=tokenizer(["the", "whale", "moby"]))  # fmt: skip
    cascade_generate(big, little, ids, max_new_tokens=2, big_tokenizer=tokenizer(), little_tokenizer=tokenizer())


def test_calibration_certifies_the_conservative_end_and_stops_where_agreement_drops():
    big, little = pair("llama")
    prompts, _ = input_ids(batch=12, seq=5, pad_first_row=0)
    cal = calibrate_cascade(big, little, prompts, "fallback", delta=0.3, epsilon=0.2, grid=(1.0, 0.05, 0.0),
                            max_new_tokens=6)  # fmt: skip
    first = cal.table[0]
    assert first["threshold"] == 1.0 and first["agreement"] == 1.0 and first["rejected"]
    assert cal.table[-1]["little_share"] > 0 or len(cal.table) < 3
    assert cal.threshold in (1.0, 0.05, 0.0) and "fallback=" in cal.guarantee()
    with pytest.raises(CascadeError, match="'lossless' is exact"):
        calibrate_cascade(big, little, prompts, "lossless")


# ---- encoder cascades -----------------------------------------------------------------------------------------------
def test_encoder_cascade_neutral_equals_the_big_classifier_and_only_unsure_rows_go_big():
    big = build("bert")
    little = apply_plan(big, "0,1")
    ids, mask = input_ids(batch=6, seq=7)
    ids, mask = ids.flip(-1), mask.flip(-1)  # right padding
    with torch.no_grad():
        ref = big(input_ids=ids, attention_mask=mask).logits
    out = encoder_cascade(big, little, ids, mask, threshold=1.0)
    assert out.big.all() and torch.equal(out.predictions, ref.argmax(-1))
    assert torch.allclose(out.logits, ref, atol=1e-5)
    middle = float(out.confidence.median())
    part = encoder_cascade(big, little, ids, mask, threshold=middle)
    assert 0 < int(part.big.sum()) < 6
    assert torch.allclose(part.logits[part.big], ref[part.big], atol=1e-5)  # the unsure rows: the big model's logits
    assert (encoder_cascade(big, little, ids, mask, threshold=0.0).big == 0).all()
    with pytest.raises(CascadeError, match="num_labels differ"):
        other = CASES["bert"].config()
        other.num_labels = 2
        import transformers

        encoder_cascade(big, transformers.BertForSequenceClassification(other).eval(), ids, mask, threshold=0.5)
    labels = ref.argmax(-1)
    records = collect_classifier_records(big, little, [{"input_ids": ids, "attention_mask": mask, "labels": labels}])
    pred, unsure = records.predict(middle)
    assert torch.equal(pred, part.predictions) and torch.equal(unsure, part.big)
    many = ClassifierRecords(records.little.repeat(50, 1), records.big.repeat(50, 1), labels.repeat(50))
    cal = calibrate_encoder_cascade(many, delta=0.1, grid=(1.0, middle, 0.0))
    assert cal.table[0]["big_share"] == 1.0 and cal.table[0]["risk"] == 0.0 and cal.threshold is not None


def test_a_truncated_little_vocabulary_stays_lossless_and_drafts_only_its_tokens():
    big, little = pair("llama")
    ids, mask = padded_batch()
    ref = greedy(big, ids, mask, 10)
    keep = torch.arange(3, 60)
    out = run(big, little, ids, mask, draft_len=3, little_vocab=keep)
    assert torch.equal(out.sequences, ref) and out.accepted > 0
    fb = run(big, little, ids, mask, mode="fallback", fallback=0.0, draft_len=2, little_vocab=keep)
    new = fb.sequences[:, ids.shape[1] :]
    assert torch.isin(new[fb.source == LITTLE], keep).all() and (fb.source == LITTLE).any()
    with pytest.raises(CascadeError, match="little_vocab"):
        run(big, little, ids, mask, little_vocab=[5, 5])


# ---- sampling ------------------------------------------------------------------------------------------------------
SAMPLED = [
    ("lossless", {}),  # speculative rejection sampling: the big model's distribution at any setting
    ("lossless", {"little_vocab": [1, 2, 4, 6]}),  # the little model drafts only these: q is zero elsewhere
    ("fallback", {"fallback": 1.0}),  # neutral: the big model decides (and samples) every token
    ("rollback", {"rollback": 1.0}),
]


@pytest.mark.parametrize("mode,kw", SAMPLED, ids=["lossless", "lossless-vocab", "fallback", "rollback"])
def test_sampling_cascades_draw_from_the_big_models_distribution(mode, kw):
    big = tiny_vocab_model()
    little = apply_plan(big, "0")  # one layer of four: its distribution is far from the big model's
    prompt = torch.tensor([[3, 1, 5, 2]])
    n, temperature = 4000, 0.8
    out = cascade_generate(
        big, little, prompt.expand(n, 4), mode=mode, draft_len=2, max_new_tokens=2, eos_token_id=(), do_sample=True,
        temperature=temperature, generator=torch.Generator().manual_seed(0), **kw,
    )  # fmt: skip
    with torch.no_grad():
        p1 = torch.softmax(big(prompt).logits[0, -1] / temperature, -1)  # [8]
        after = torch.cat([prompt.expand(8, 4), torch.arange(8)[:, None]], 1)
        p2 = p1 @ torch.softmax(big(after).logits[:, -1] / temperature, -1)  # marginal of the second token
        q1 = torch.softmax(little(prompt).logits[0, -1] / temperature, -1)
    assert 0.5 * (q1 - p1).abs().sum() > 0.15  # the little model alone would fail the check below
    if mode == "lossless":
        assert 0.1 < out.accepted / out.drafted < 0.9  # little tokens often rejected: the residual draws matter
    for j, p in ((4, p1), (5, p2)):
        empirical = torch.bincount(out.sequences[:, j], minlength=8) / n
        assert 0.5 * (empirical - p).abs().sum() < 0.04, (j, empirical, p)
    if "little_vocab" in kw:
        assert torch.isin(out.sequences[:, 4:][out.source == LITTLE], torch.tensor(kw["little_vocab"])).all()


def test_sampling_fallback_keeps_the_little_models_draws_and_is_reproducible():
    big = tiny_vocab_model()
    little = apply_plan(big, "0")
    prompt = torch.tensor([[3, 1, 5, 2]]).expand(64, 4)
    kw = dict(mode="fallback", fallback=0.0, draft_len=3, max_new_tokens=6, eos_token_id=(), do_sample=True)
    a = cascade_generate(big, little, prompt, generator=torch.Generator().manual_seed(5), **kw)
    b = cascade_generate(big, little, prompt, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a.sequences, b.sequences) and a.accepted == a.drafted > 0  # fallback keeps every little token
    assert len({tuple(r) for r in a.sequences[:, 4:].tolist()}) > 1  # sampled, not greedy
    for bad, msg in ((dict(temperature=0.0), "temperature"), (dict(top_k=0), "top_k")):
        with pytest.raises(CascadeError, match=msg):
            cascade_generate(big, little, prompt[:1], **{**kw, **bad})
