"""Self-speculative decoding on tiny random decoders: greedy output equals plain greedy generation token for token
(batch 1 and left-padded batches whose rows accept different numbers of drafts), the cache left behind equals the
full model's, drafted positions run the shared layers once, and sampling draws from the full model's distribution."""

import warnings

import pytest
import torch
from tiny_models import build, build_gemma3_sliding, input_ids, tiny_vocab_model

from depthprune.adapters import get_adapter
from depthprune.exits.lm_heads import DecoderExitHeads
from depthprune.generation.acceptance import greedy_accept, sampling_probs, speculative_accept
from depthprune.generation.speculative import choose_speculation, self_speculative_generate

ARCHS = ["llama", "gpt_neox"]
DRAFTS = ["logit_lens", "lens", "mlp", "skip"]


def greedy(model, ids, mask, n, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, **kw)


def random_heads(model, kind, std=0.02, seed=5):
    """Exit heads whose translators are random (not trained): their drafts are often wrong."""
    heads = DecoderExitHeads.for_model(model, kind=kind)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return heads


def draft_kwargs(model, kind):
    """(heads, keyword arguments) of one draft setting."""
    if kind == "skip":
        return None, {"draft": "skip", "skip_layers": [1, 2]}
    if kind == "logit_lens":
        return DecoderExitHeads.logit_lens(model), {"exit_layer": 1}
    return random_heads(model, kind), {"exit_layer": 2 if kind == "mlp" else 1}


def padded_batch():
    ids, mask = input_ids(batch=4, seq=6)
    ids[2, :3], mask[2, :3] = 0, 0  # rows 0 and 2 left-padded by 2 and 3
    return ids, mask


# ---- acceptance rules -----------------------------------------------------------------------------------------------
def test_greedy_accept_on_hand_made_logits():
    target = torch.full((3, 4, 5), -1.0)
    for row, tokens in enumerate([[1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0]]):
        for i, t in enumerate(tokens):
            target[row, i, t] = 1.0
    drafts = torch.tensor([[1, 2, 3], [1, 4, 3], [2, 0, 0]])
    accepted, nxt = greedy_accept(target, drafts)
    assert accepted.tolist() == [3, 1, 0]  # all, one, none (a later match after a miss does not count)
    assert nxt.tolist() == [4, 2, 0]  # bonus token; the verifier's token at the first miss


def test_speculative_accept_on_hand_made_distributions():
    n, vocab = 20000, 4
    g = torch.Generator().manual_seed(0)
    p1 = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q1 = torch.tensor([0.1, 0.1, 0.4, 0.4])
    # a draft drawn from q is kept with probability min(1, p/q): sum_x min(p, q) = 0.4 overall; the token that comes
    # out (the draft, or a draw from norm(max(0, p - q)) after a rejection) is distributed as p
    p = torch.stack([p1, torch.full((vocab,), 0.25)])[None].expand(n, 2, vocab)
    q = q1[None, None].expand(n, 1, vocab)
    d = torch.multinomial(q1, n, replacement=True, generator=g)[:, None]
    accepted, nxt = speculative_accept(p, q, d, g)
    assert abs(accepted.float().mean().item() - 0.4) < 0.015
    assert (accepted[d[:, 0] == 3] == 0).all()  # p(3) = 0: never kept
    assert (accepted[d[:, 0] == 0] == 1).all()  # p(0) >= q(0): always kept
    out = torch.where(accepted == 1, d[:, 0], nxt)
    assert 0.5 * (torch.bincount(out, minlength=vocab) / n - p1).abs().sum() < 0.015
    bonus = nxt[accepted == 1]  # after the last draft is accepted, the bonus token comes from p_k (uniform here)
    assert 0.5 * (torch.bincount(bonus, minlength=vocab) / bonus.numel() - 0.25).abs().sum() < 0.03
    # p == q: every draft is kept; a draft where p is 0 and q is one-hot: always rejected, the residual is p
    same = torch.softmax(torch.randn(50, 3, vocab, generator=g), -1)
    acc, _ = speculative_accept(same, same[:, :2], torch.multinomial(same[:, 0], 2, replacement=True, generator=g), g)
    assert (acc == 2).all()
    onehot = torch.zeros(n, 1, vocab)
    onehot[:, 0, 3] = 1.0
    acc, nxt = speculative_accept(p, onehot, torch.full((n, 1), 3), g)
    assert (acc == 0).all() and (nxt != 3).all()
    assert 0.5 * (torch.bincount(nxt, minlength=vocab) / n - p1).abs().sum() < 0.015


def test_sampling_probs_follow_generate_warpers():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert torch.allclose(sampling_probs(logits, 0.5), torch.softmax(logits / 0.5, -1))
    top2 = sampling_probs(logits, 1.0, top_k=2)
    assert torch.allclose(top2, torch.tensor([[0.7311, 0.2689, 0.0, 0.0]]), atol=1e-4)


# ---- greedy: token-identical to plain greedy decoding ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", DRAFTS)
def test_greedy_equals_generate(arch, kind):
    model = build(arch)
    heads, kw = draft_kwargs(model, kind)
    ids, _ = input_ids(batch=1, seq=6)
    ref = greedy(model, ids, None, 12, eos_token_id=None)
    for k in (1, 3, 5):
        out = self_speculative_generate(model, heads, ids, draft_len=k, max_new_tokens=12, eos_token_id=(), **kw)
        assert torch.equal(out.sequences, ref), k
        assert int(out.drafted.sum()) > 0 and out.rounds == int(out.verifications[0])
    bare = self_speculative_generate(model, heads, ids, max_new_tokens=12, eos_token_id=(), return_stats=False, **kw)
    assert torch.equal(bare.sequences, ref) and bare.accepted is None
    ids, mask = padded_batch()
    ref = greedy(model, ids, mask, 12, eos_token_id=None)
    out = self_speculative_generate(model, heads, ids, mask, draft_len=3, max_new_tokens=12, eos_token_id=(), **kw)
    assert torch.equal(out.sequences, ref)
    per_round = out.round_accepted.T  # [rounds, batch]
    assert any(len(set(r[r >= 0].tolist())) > 1 for r in per_round)  # rows accepted different numbers of drafts
    assert 0.0 < out.acceptance_rate() < 1.0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_token_prompts_and_skipping_the_first_layer(arch):
    model = build(arch)
    ids, _ = input_ids(batch=3, seq=1, pad_first_row=0)  # no prefill at all
    ref = greedy(model, ids, None, 8, eos_token_id=None)
    out = self_speculative_generate(model, DecoderExitHeads.logit_lens(model), ids, exit_layer=0, draft_len=2,
                                    max_new_tokens=8, eos_token_id=())  # fmt: skip
    assert torch.equal(out.sequences, ref)
    out = self_speculative_generate(
        model, None, ids, draft="skip", skip_layers=[0], draft_len=2, max_new_tokens=8, eos_token_id=()
    )
    assert torch.equal(out.sequences, ref)  # an empty cache layer 0 is sized with holes while the draft skips it
    ids, mask = padded_batch()
    ref = greedy(model, ids, mask, 9, eos_token_id=None)
    for skip in ([0], [0, 3], [3]):  # layer 0 skipped: nothing shared, the verification recomputes every layer
        out = self_speculative_generate(
            model, None, ids, mask, draft="skip", skip_layers=skip, draft_len=4, max_new_tokens=9, eos_token_id=()
        )
        assert torch.equal(out.sequences, ref), skip


def test_end_of_sequence_pads_like_generate():
    model = build("llama")
    ids, mask = padded_batch()
    free = greedy(model, ids, mask, 10, eos_token_id=None)
    eos = int(free[1, 6 + 2])  # a token row 1 produces third
    ref = greedy(model, ids, mask, 10, eos_token_id=eos, pad_token_id=0)
    assert (ref[1, 6 + 3 :] == 0).all()  # row 1 stopped, padded
    for kind in ("logit_lens", "skip"):
        heads, kw = draft_kwargs(model, kind)
        out = self_speculative_generate(
            model, heads, ids, mask, draft_len=4, max_new_tokens=10, eos_token_id=eos, pad_token_id=0, **kw
        )
        assert torch.equal(out.sequences, ref), kind
    # every row ends early, at a different step: rows leave the batch in different rounds, the output is as short as
    # generate's
    ends = [int(free[r, 6 + r + 1]) for r in range(4)]
    ref = greedy(model, ids, mask, 10, eos_token_id=ends, pad_token_id=0)
    assert ref.shape[1] <= 6 + 4
    out = self_speculative_generate(
        model, DecoderExitHeads.logit_lens(model), ids, mask, exit_layer=2, draft_len=3, max_new_tokens=10,
        eos_token_id=ends, pad_token_id=0,
    )  # fmt: skip
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("kind", ["logit_lens", "skip"])
def test_cache_holds_the_full_models_keys_and_values(kind):
    """After the run, each row's real cache entries are the full model's keys/values of its tokens (all but the last),
    computed by the untouched model on that row alone; masked entries are exactly the rows' rejected drafts."""
    model = build("llama")
    heads, kw = draft_kwargs(model, kind)
    ids, mask = padded_batch()
    out = self_speculative_generate(
        model, heads, ids, mask, draft_len=3, max_new_tokens=10, eos_token_id=(), return_cache=True, **kw
    )
    cache, cmask = out.past_key_values, out.cache_mask
    assert cmask.shape[0] == 4
    before, after = cmask.cumsum(1) > 0, cmask.flip(1).cumsum(1).flip(1) > 0
    assert ((cmask == 0) & before & after).any()  # rejected drafts masked mid-sequence (not padding)
    for r in range(4):
        tokens = out.sequences[r, mask[r].bool().tolist() + [True] * 10]
        with torch.no_grad():
            full = model(tokens[None, :-1], use_cache=True).past_key_values
        real = cmask[r].bool()
        assert int(real.sum()) == tokens.numel() - 1
        for i in range(4):
            assert torch.allclose(cache.layers[i].keys[r][:, real], full.layers[i].keys[0], atol=1e-5), (r, i)
            assert torch.allclose(cache.layers[i].values[r][:, real], full.layers[i].values[0], atol=1e-5), (r, i)


def test_shared_layers_run_once_per_position():
    """The draft's layers are not recomputed for drafted tokens: every layer, shared or not, processes each fed
    position exactly once (the verification runs only the layers above the exit)."""
    model = build("llama")
    seen = [0] * 4

    def count(i):
        def hook(_module, args, kwargs, _output):  # after the layer ran (captures stop before layer 0 runs)
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i] += hidden.shape[0] * hidden.shape[1]  # positions this call processed

        return hook

    layers = get_adapter(model).layers(model, "decoder")
    handles = [layer.register_forward_hook(count(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        ids, _ = input_ids(batch=1, seq=6)
        out = self_speculative_generate(
            model, DecoderExitHeads.logit_lens(model), ids, exit_layer=1, draft_len=3, max_new_tokens=12,
            eos_token_id=(),
        )  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    fed = 5 + int(out.verifications.sum()) + int(out.drafted.sum())  # prefill + (d_0 .. d_k) per round
    assert seen == [fed] * 4


# ---- sampling: the full model's distribution ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["logit_lens", "skip"])
def test_sampling_draws_from_the_full_models_distribution(kind):
    model = tiny_vocab_model()
    heads, kw = draft_kwargs(model, kind)
    prompt = torch.tensor([[3, 1, 5, 2]])
    n, temperature = 4000, 0.8
    out = self_speculative_generate(
        model, heads, prompt.expand(n, 4), draft_len=2, max_new_tokens=3, do_sample=True, temperature=temperature,
        generator=torch.Generator().manual_seed(0), eos_token_id=(), **kw,
    )  # fmt: skip
    assert 0.1 < out.acceptance_rate() < 0.9  # drafts are often rejected: the residual draws matter
    with torch.no_grad():
        p1 = torch.softmax(model(prompt).logits[0, -1] / temperature, -1)  # [8]
        after = torch.cat([prompt.expand(8, 4), torch.arange(8)[:, None]], 1)
        p2 = p1 @ torch.softmax(model(after).logits[:, -1] / temperature, -1)  # marginal of the second token
        draft_state = model(prompt, output_hidden_states=True).hidden_states[2]
    if kind == "logit_lens":  # the draft's own distribution is far from the model's: the test is not trivial
        q1 = torch.softmax(heads.logits(1, draft_state)[0, -1] / temperature, -1)
        assert 0.5 * (q1 - p1).abs().sum() > 0.15
    for j, p in ((4, p1), (5, p2)):
        empirical = torch.bincount(out.sequences[:, j], minlength=8) / n
        assert 0.5 * (empirical - p).abs().sum() < 0.04, (j, empirical, p)


def test_sampling_with_top_k_never_leaves_the_top_k():
    model = tiny_vocab_model()
    prompt = torch.tensor([[3, 1, 5, 2]])
    out = self_speculative_generate(
        model, DecoderExitHeads.logit_lens(model), prompt.expand(200, 4), exit_layer=1, draft_len=2, max_new_tokens=1,
        do_sample=True, top_k=2, generator=torch.Generator().manual_seed(1), eos_token_id=(),
    )  # fmt: skip
    with torch.no_grad():
        top = model(prompt).logits[0, -1].topk(2).indices
    assert torch.isin(out.sequences[:, 4], top).all()


# ---- choosing the settings, errors ----------------------------------------------------------------------------------
def test_choose_speculation_returns_the_fastest_candidate():
    model = build("llama")
    heads = DecoderExitHeads.logit_lens(model)
    prompts = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10])]
    choice = choose_speculation(model, heads, prompts, [0, 2], [1, 3], max_new_tokens=6, eos_token_id=())
    assert [(r["exit_layer"], r["draft_len"]) for r in choice.table] == [(0, 1), (0, 3), (2, 1), (2, 3)]
    best = max(choice.table, key=lambda r: r["tokens_per_s"])
    assert (choice.exit_layer, choice.draft_len) == (best["exit_layer"], best["draft_len"])
    assert all(0 <= r["acceptance_rate"] <= 1 and r["tokens_per_s"] > 0 for r in choice.table)
    assert choice.to_dict()["baseline_tokens_per_s"] > 0


def test_bad_settings_are_refused():
    model = build("llama")
    ids, mask = padded_batch()
    lens = DecoderExitHeads.logit_lens(model, [1])

    def run(heads=lens, **kw):
        kw = {"exit_layer": 1, "draft_len": 2, "max_new_tokens": 2, **kw}
        return self_speculative_generate(model, heads, ids, mask, **kw)

    with pytest.raises(ValueError, match="out of range"):
        run(exit_layer=3)
    with pytest.raises(ValueError, match="no exit head after layer 2"):
        run(exit_layer=2)
    with pytest.raises(ValueError, match="needs exit heads"):
        run(heads=None)
    with pytest.raises(ValueError, match="needs exit_layer"):
        run(exit_layer=None)
    with pytest.raises(ValueError, match="draft_len"):
        run(draft_len=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown draft"):
        run(draft="medusa")
    with pytest.raises(ValueError, match="temperature"):
        run(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="skip_layers"):
        run(exit_layer=None, draft="skip")
    with pytest.raises(ValueError, match="out of range"):
        run(exit_layer=None, draft="skip", skip_layers=[4])
    with pytest.raises(ValueError, match="no layer for the draft"):
        run(exit_layer=None, draft="skip", skip_layers=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="left-padded"):
        self_speculative_generate(model, lens, ids, mask.flip(-1), exit_layer=1, max_new_tokens=2)
    bert = build("bert")
    with pytest.raises(ValueError, match="decoder-only"):
        self_speculative_generate(bert, None, ids, mask, draft="skip", skip_layers=[1], max_new_tokens=2)
    linear = build("llama")  # linear (recurrent) attention keeps no entry per position: refused by name
    linear.config.layer_types = ["full_attention", "linear_attention"] * 2
    with pytest.raises(ValueError, match="linear_attention"):
        self_speculative_generate(linear, None, ids, mask, draft="skip", skip_layers=[1], max_new_tokens=2)


# ---- sliding-window decoders -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DRAFTS)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", ["gemma3_sliding", "qwen2"])
def test_sliding_window_decoders_are_token_identical_to_greedy(name, batch, kind):
    """Sliding window 3, prompts and generations longer than it; in the padded batch rows accept different numbers
    of drafts, so their rejected columns are moved left to keep each row's window on its latest real tokens."""
    model = build_gemma3_sliding() if name == "gemma3_sliding" else build(name)
    heads, kw = draft_kwargs(model, kind)
    ids, mask = padded_batch()
    ids, mask = ids[:batch], mask[:batch]
    out = self_speculative_generate(model, heads, ids, mask, draft_len=3, max_new_tokens=12, **kw)
    assert torch.equal(out.sequences, greedy(model, ids, mask, 12))
    if batch > 1:
        assert len(set(out.accepted.tolist())) > 1  # the rows really kept different numbers of tokens


def test_no_future_warning_from_depthprunes_own_calls():
    model = build("llama")
    ids, mask = padded_batch()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=FutureWarning)
        for kind in ("logit_lens", "skip"):
            heads, kw = draft_kwargs(model, kind)
            self_speculative_generate(model, heads, ids, mask, draft_len=2, max_new_tokens=4, return_cache=True, **kw)
