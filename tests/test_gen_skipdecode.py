"""SkipDecode on tiny random decoders: schedules are monotone, bounded and hit their speed-up; a full-depth schedule is
plain greedy generation; a batch equals each row alone; the skipped layers' cache entries are never read (NaN-filled,
same finite output); teacher forcing equals decoding; LoRA adaptation lowers the loss and merges into an equal plain
model, leaving the input model untouched."""

import math
import shutil
import warnings

import pytest
import torch
import transformers
from tiny_models import PAD, VOCAB, build, build_gemma3_sliding, input_ids

from depthprune.generation.skipdecode import (
    SkipSchedule,
    skipdecode_generate,
    skipdecode_logits,
    skipdecode_perplexity,
)
from depthprune.generation.skipdecode_train import (
    load_schedule,
    lora_copy,
    merged_copy,
    skip_lm_loss,
    skipdecode_loss,
    train_skipdecode,
)
from depthprune.training import latest_checkpoint

ARCHS = ["llama6", "gpt2"]
NEW = 8


def model_of(arch):
    if arch == "llama6":  # six layers: room for a real decay
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            pad_token_id=PAD,
            bos_token_id=1,
            eos_token_id=2,
            initializer_range=0.1,
        )
        return transformers.LlamaForCausalLM(config).eval()
    return build(arch)


def depth(model):
    return model.config.num_hidden_layers


def decay(model):
    """A schedule that reaches one layer within the test's tokens: most skipped entries get read-tested."""
    n = depth(model)
    return SkipSchedule.linear(n, n - 1, 1, 6)


def padded_batch():
    ids, mask = input_ids(batch=3, seq=6)
    ids[2, :3], mask[2, :3] = PAD, 0  # rows 0 and 2 left-padded by 2 and 3
    return ids, mask


def greedy(model, ids, mask, n, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, **kw)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- schedules ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "schedule",
    [
        SkipSchedule.constant(6, 6),
        SkipSchedule.constant(6, 2),
        SkipSchedule.linear(6, 6, 1, 10),
        SkipSchedule.linear(24, 20, 3, 100),
        SkipSchedule.linear(24, 24, 23, 7),
        *(SkipSchedule.for_speedup(24, s) for s in (1.5, 2, 3, 5)),
    ],
)
def test_schedule_is_non_increasing_and_bounded(schedule):
    steps = schedule.steps(300)
    assert all(a >= b for a, b in zip(steps, steps[1:], strict=False))
    assert steps[0] == schedule.max_layers and steps[-1] == schedule.min_layers
    assert all(1 <= schedule.min_layers <= n <= schedule.max_layers <= schedule.num_layers for n in steps)
    if schedule.decay_tokens:
        assert steps[math.ceil(schedule.decay_tokens)] == schedule.min_layers
        ramp = [
            schedule.max_layers - (schedule.max_layers - schedule.min_layers) * k / schedule.decay_tokens
            for k in range(math.ceil(schedule.decay_tokens))
        ]
        assert all(abs(n - r) <= 0.5 for n, r in zip(steps, ramp, strict=False))  # the linear ramp, rounded
    seq = schedule.for_sequence(4, 10)
    assert seq == [schedule.num_layers] * 4 + steps[:6]
    assert SkipSchedule.from_dict(schedule.to_dict()) == schedule


@pytest.mark.parametrize("num_layers, speedup", [(24, 2), (24, 3), (24, 5), (6, 2), (6, 3), (6, 5), (32, 1.5)])
@pytest.mark.parametrize("budget", [64, 128])
def test_for_speedup_hits_its_target_mean(num_layers, speedup, budget):
    schedule = SkipSchedule.for_speedup(num_layers, speedup, budget=budget)
    assert schedule.mean_layers(budget) == pytest.approx(num_layers / speedup, rel=0.01)
    assert schedule.speedup(budget) == pytest.approx(speedup, rel=0.01)
    assert schedule.max_layers > schedule.min_layers  # a real decay, not a constant
    given = SkipSchedule.for_speedup(num_layers, speedup, budget=budget, min_layers=1, max_layers=num_layers)
    assert (given.max_layers, given.min_layers) == (num_layers, 1)
    # with both ends forced, a steep ramp's rounding thresholds can coincide: within (max - min) / budget
    assert abs(given.mean_layers(budget) - num_layers / speedup) <= (num_layers - 1) / budget
    assert SkipSchedule.for_speedup(num_layers, 1.0) == SkipSchedule.constant(num_layers, num_layers)


def test_schedule_errors():
    with pytest.raises(ValueError, match="max_layers <= num_layers"):
        SkipSchedule.linear(6, 7, 1, 4)
    with pytest.raises(ValueError, match="1 <= min_layers"):
        SkipSchedule.constant(6, 0)
    with pytest.raises(ValueError, match="min_layers <= max_layers"):
        SkipSchedule.linear(6, 2, 4, 4)
    with pytest.raises(ValueError, match="decay_tokens > 0"):
        SkipSchedule.linear(6, 6, 1, 0)
    with pytest.raises(TypeError, match="must be an int"):
        SkipSchedule.linear(6, 6.0, 1, 3)
    with pytest.raises(TypeError, match="finite number"):
        SkipSchedule.linear(6, 6, 1, float("inf"))
    with pytest.raises(ValueError, match="target_speedup"):
        SkipSchedule.for_speedup(6, 7)
    with pytest.raises(ValueError, match="cannot come from a decay"):
        SkipSchedule.for_speedup(24, 2, min_layers=14)


# ---- decoding -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_full_depth_is_plain_greedy(arch):
    model = model_of(arch)
    ids, mask = padded_batch()
    ref = greedy(model, ids, mask, NEW, eos_token_id=None, pad_token_id=PAD)
    full = SkipSchedule.constant(depth(model), depth(model))
    out = skipdecode_generate(model, ids, mask, schedule=full, max_new_tokens=NEW, eos_token_id=())
    assert torch.equal(out.sequences, ref)
    assert (out.layers == depth(model)).all() and out.speedup() == 1.0


def test_end_of_sequence_pads_like_generate():
    model = model_of("llama6")
    ids, mask = padded_batch()
    full = SkipSchedule.constant(6, 6)
    free = skipdecode_generate(model, ids, mask, schedule=full, max_new_tokens=NEW, eos_token_id=())
    eos = int(free.sequences[1, 6 + 2])  # the third token of row 1
    ref = greedy(model, ids, mask, NEW, eos_token_id=eos, pad_token_id=PAD)
    out = skipdecode_generate(model, ids, mask, schedule=full, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(out.sequences, ref)
    new = out.sequences[:, 6:]
    after_eos = torch.cumsum(new == eos, 1) - (new == eos).long() > 0
    assert torch.equal(out.layers == 0, after_eos)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_each_row_alone(arch):
    model = model_of(arch)
    ids, mask = padded_batch()
    schedule = decay(model)
    out = skipdecode_generate(
        model, ids, mask, schedule=schedule, max_new_tokens=NEW, eos_token_id=(), return_logits=True
    )
    expected = [depth(model), *schedule.steps(NEW - 1)]
    assert out.layers.tolist() == [expected] * 3
    assert out.mean_layers() == pytest.approx(sum(expected) / NEW)
    for r in range(3):
        prompt = ids[r : r + 1, mask[r].bool()]
        alone = skipdecode_generate(
            model, prompt, schedule=schedule, max_new_tokens=NEW, eos_token_id=(), return_logits=True
        )
        assert torch.equal(alone.sequences[0, prompt.shape[1] :], out.sequences[r, 6:]), r
        torch.testing.assert_close(alone.logits[0], out.logits[r], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_skipped_entries_are_never_read(arch):
    model = model_of(arch)
    ids, mask = padded_batch()
    schedule = decay(model)
    kw = {"schedule": schedule, "max_new_tokens": NEW, "eos_token_id": (), "return_logits": True, "return_cache": True}
    zeros = skipdecode_generate(model, ids, mask, **kw)
    nans = skipdecode_generate(model, ids, mask, **kw, hole_value=float("nan"))
    assert torch.isfinite(nans.logits).all()
    assert torch.equal(nans.sequences, zeros.sequences)
    assert torch.equal(nans.logits, zeros.logits)
    # the holes are really there: position 6 + k (token k fed back) skipped the lower L - layers_at(k) layers
    n = depth(model)
    for layer_idx, layer in enumerate(nans.past_key_values.layers):
        assert layer.keys.shape[-2] == 6 + NEW - 1
        for k, ran in enumerate(schedule.steps(NEW - 1)):
            keys = layer.keys[:, :, 6 + k]
            assert bool(keys.isnan().all()) == (layer_idx < n - ran), (layer_idx, k)
        assert torch.isfinite(layer.keys[:, :, :6]).all()  # the prompt ran every layer
    # and they would be noticed: one more token through every layer reads them and gets NaN logits
    full_mask = torch.cat([mask, torch.ones(3, NEW, dtype=torch.long)], dim=1)
    with torch.no_grad():
        deeper = model(
            nans.sequences[:, -1:],
            attention_mask=full_mask,
            position_ids=full_mask.sum(-1, keepdim=True) - 1,
            past_key_values=nans.past_key_values,
        ).logits
    assert deeper.isnan().all()


def test_an_explicit_list_equals_the_schedule():
    model = model_of("llama6")
    ids, mask = padded_batch()
    schedule = decay(model)
    a = skipdecode_generate(model, ids, mask, schedule=schedule, max_new_tokens=NEW, eos_token_id=())
    b = skipdecode_generate(model, ids, mask, schedule=schedule.steps(6) + [1], max_new_tokens=NEW, eos_token_id=())
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.layers, b.layers)


# ---- teacher forcing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_forcing_equals_decoding(arch):
    model = model_of(arch)
    ids, mask = padded_batch()
    schedule = decay(model)
    out = skipdecode_generate(
        model, ids, mask, schedule=schedule, max_new_tokens=NEW, eos_token_id=(), return_logits=True
    )
    full_mask = torch.cat([mask, torch.ones(3, NEW, dtype=torch.long)], dim=1)
    per_position = schedule.for_sequence(6, 6 + NEW)
    with torch.no_grad():
        logits = skipdecode_logits(model, out.sequences, per_position, full_mask)  # [3, 14, vocab]
        rows = skipdecode_logits(model, out.sequences, torch.tensor([per_position] * 3), full_mask)
    torch.testing.assert_close(logits[:, 5:-1], out.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits[:, 5:-1].argmax(-1), out.sequences[:, 6:])
    assert torch.equal(rows, logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_depth_teacher_forcing_is_the_model(arch):
    model = model_of(arch)
    ids, mask = padded_batch()
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        ref = model(ids, attention_mask=mask, position_ids=pos).logits
        got = skipdecode_logits(model, ids, [depth(model)] * 6, mask)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        blocks = input_ids(batch=4, seq=10, seed=3, pad_first_row=0)[0]
        full = SkipSchedule.constant(depth(model), depth(model))
        logp = model(blocks).logits[:, 3:-1].log_softmax(-1)
        nll = -logp.gather(-1, blocks[:, 4:, None]).mean()
    assert skipdecode_perplexity(model, blocks, full, prompt_len=4, batch_size=3) == pytest.approx(
        float(nll.exp()), rel=1e-5
    )
    assert skipdecode_perplexity(model, blocks, decay(model), prompt_len=4) != pytest.approx(float(nll.exp()))


def test_per_row_counts_differ_by_row():
    """[batch, seq] counts: each row computes what it computes alone with its own counts."""
    model = model_of("llama6")
    ids = input_ids(batch=2, seq=9, pad_first_row=0)[0]
    counts = torch.tensor([[6, 6, 6, 5, 4, 4, 2, 2, 1], [6, 6, 6, 6, 6, 3, 3, 3, 3]])
    with torch.no_grad():
        both = skipdecode_logits(model, ids, counts)
        for r in range(2):
            torch.testing.assert_close(both[r], skipdecode_logits(model, ids[r : r + 1], counts[r])[0])


# ---- errors ---------------------------------------------------------------------------------------------------------
def test_clear_errors():
    model = model_of("llama6")
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="non-increasing"):
        skipdecode_generate(model, ids, mask, schedule=[3, 4], max_new_tokens=3)
    with pytest.raises(ValueError, match="non-increasing"):
        skipdecode_logits(model, ids, [6, 6, 6, 2, 3, 1])
    with pytest.raises(ValueError, match="must lie in 1..6"):
        skipdecode_generate(model, ids, mask, schedule=[7, 6], max_new_tokens=3)
    with pytest.raises(ValueError, match="must lie in 1..6"):
        skipdecode_logits(model, ids, [6, 6, 6, 6, 6, 0])
    with pytest.raises(ValueError, match="built for 4 layers"):
        skipdecode_generate(model, ids, mask, schedule=SkipSchedule.constant(4, 2), max_new_tokens=3)
    with pytest.raises(ValueError, match=r"\[seq\] or \[batch, seq\]"):
        skipdecode_logits(model, ids, [6, 6])
    with pytest.raises(TypeError, match="for_sequence"):
        skipdecode_logits(model, ids, decay(model))
    with pytest.raises(ValueError, match="decoder-only"):
        skipdecode_generate(build("bert"), ids, schedule=[2], max_new_tokens=2)
    chunked = build("llama")  # chunked attention keeps no entry per position: refused by name
    chunked.config.layer_types = ["chunked_attention"] * 4
    chunked.config.attention_chunk_size = 4
    with pytest.raises(ValueError, match="chunked_attention"):
        skipdecode_generate(chunked, ids, schedule=[2], max_new_tokens=2)


# ---- LoRA adaptation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_starts_equal_and_merges_equal(arch):
    from peft.tuners.lora import LoraLayer

    model = model_of(arch)
    before = state(model)
    ids, mask = padded_batch()
    peft_model = lora_copy(model, rank=2)
    lora = peft_model.get_base_model()
    wrapped = [m for m in lora.modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == depth(model) * (7 if arch == "llama6" else 4)  # q k v o gate up down / c_attn c_proj x2
    assert all(p.requires_grad == (".lora_" in name) for name, p in lora.named_parameters())
    counts = decay(model).for_sequence(3, 6)
    with torch.no_grad():
        ref = skipdecode_logits(model, ids, counts, mask)
        torch.testing.assert_close(skipdecode_logits(lora, ids, counts, mask), ref)  # B = 0
        g = torch.Generator().manual_seed(0)
        for m in wrapped:
            b = m.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        adapted = skipdecode_logits(lora, ids, counts, mask)
        merged = merged_copy(peft_model)
        assert not any(isinstance(m, LoraLayer) for m in merged.modules())
        assert type(merged) is type(model)
        torch.testing.assert_close(skipdecode_logits(merged, ids, counts, mask), adapted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted, ref)
    assert any(isinstance(m, LoraLayer) for m in lora.modules())  # merging copied
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_lora_target_errors():
    from peft.tuners.lora import LoraLayer

    with pytest.raises(ValueError, match="matches targets"):
        lora_copy(model_of("llama6"), rank=2, targets=("nope",))
    with pytest.raises(TypeError, match="peft model"):
        merged_copy(model_of("llama6"))
    only = lora_copy(model_of("llama6"), rank=2, targets=("q_proj", "v_proj"))
    assert len([m for m in only.modules() if isinstance(m, LoraLayer)]) == 12


def test_training_lowers_the_loss_and_saves_a_plain_model(tmp_path):
    model = model_of("llama6")
    before = state(model)
    g = torch.Generator().manual_seed(0)
    cycle = torch.tensor([5, 17, 42, 63, 88, 30])
    blocks = cycle[(torch.randint(0, 6, (24, 1), generator=g) + torch.arange(16)) % 6]  # a cycle: learnable
    train, held_out = blocks[:16], blocks[16:]
    schedule = SkipSchedule.linear(6, 5, 2, 8)
    loss0 = skipdecode_loss(model, schedule, held_out, prompt_len=4)
    result = train_skipdecode(
        model,
        schedule,
        train,
        lora_rank=4,
        epochs=6,
        lr=2e-2,
        batch_size=4,
        min_prompt=2,
        output_dir=tmp_path / "adapted",
        progress=False,
    )
    assert len(result.history) == 24 and result.epoch_losses[-1]["loss"] < result.epoch_losses[0]["loss"]
    loss1 = skipdecode_loss(result.model, schedule, held_out, prompt_len=4)
    assert loss1 < 0.75 * loss0
    assert skipdecode_loss(result.lora_model, schedule, held_out, prompt_len=4) == pytest.approx(loss1, rel=1e-4)
    # the merged model is a plain model, saved and reloaded without depthprune, that decodes like the LoRA one
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "adapted").eval()
    assert load_schedule(reloaded) == schedule == load_schedule(tmp_path / "adapted")
    ids, mask = padded_batch()
    kw = {"schedule": schedule, "max_new_tokens": NEW, "eos_token_id": (), "return_logits": True}
    a = skipdecode_generate(result.lora_model, ids, mask, **kw)
    b = skipdecode_generate(reloaded, ids, mask, **kw)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    assert result.to_dict()["schedule"] == schedule.to_dict()
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_kl_term_is_the_kl_to_the_untouched_full_depth_model():
    """skip_lm_loss with a teacher: CE + w x KL(teacher || skipped model) by hand; the untouched model at full depth is
    its own teacher (KL 0); a trained run with the term keeps the full-depth model's distributions closer to the
    input model's than the same run without it."""
    model = model_of("llama6")
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, VOCAB, (8, 12), generator=g)
    with torch.no_grad():
        own = model(input_ids=blocks).logits
        full = skip_lm_loss(model, blocks, [6] * 12)
        assert float(skip_lm_loss(model, blocks, [6] * 12, own, 3.0)) == pytest.approx(float(full), abs=1e-5)
        depth = SkipSchedule.linear(6, 5, 2, 8).for_sequence(4, 12)
        logits = skipdecode_logits(model, blocks, depth)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten())
        t = own[:, :-1].log_softmax(-1)
        kl = (t.exp() * (t - logits[:, :-1].log_softmax(-1))).sum(-1).mean()
        torch.testing.assert_close(skip_lm_loss(model, blocks, depth, own, 0.5), ce + 0.5 * kl)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        skip_lm_loss(model, blocks, depth, None, 0.5)
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        train_skipdecode(model, SkipSchedule.linear(6, 5, 2, 8), blocks, kl_weight=-1.0)

    def drift(kl_weight):
        kw = {"lora_rank": 4, "epochs": 3, "lr": 2e-2, "batch_size": 2, "min_prompt": 2, "progress": False}
        result = train_skipdecode(model, SkipSchedule.linear(6, 5, 2, 8), blocks, kl_weight=kl_weight, **kw)
        assert result.kl_weight == kl_weight
        with torch.no_grad():
            t = own.log_softmax(-1)
            return float((t.exp() * (t - result.model(input_ids=blocks).logits.log_softmax(-1))).sum(-1).mean())

    free, held = drift(0.0), drift(20.0)
    assert held < 0.5 * free, (held, free)


# ---- sliding-window decoders -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["gemma3_sliding", "qwen2", "mistral"])
def test_sliding_window_full_depth_schedule_is_plain_greedy(name, batch):
    model = build_gemma3_sliding() if name == "gemma3_sliding" else build(name)
    ids, mask = input_ids(batch=batch, seq=6, pad_first_row=2)
    out = skipdecode_generate(model, ids, mask, schedule=SkipSchedule.constant(4, 4), max_new_tokens=NEW)
    assert torch.equal(out.sequences, greedy(model, ids, mask, NEW))


def test_sliding_window_teacher_forcing_equals_decoding():
    model = build_gemma3_sliding()
    ids, mask = input_ids(batch=2, seq=5, pad_first_row=2)
    schedule = SkipSchedule.linear(4, 4, 2, 4)
    out = skipdecode_generate(
        model, ids, mask, schedule=schedule, max_new_tokens=NEW, eos_token_id=(), return_logits=True
    )
    full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, 5:])], dim=1)
    logits = skipdecode_logits(model, out.sequences, schedule.for_sequence(5, out.sequences.shape[1]), full_mask)
    assert torch.allclose(logits[:, 4:-1], out.logits, atol=1e-4)


def test_no_future_warning_from_depthprunes_own_calls():
    model = build("llama")
    ids, mask = input_ids(batch=2, seq=5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=FutureWarning)
        skipdecode_generate(model, ids, mask, schedule=[4, 3, 2], max_new_tokens=4)


def test_resume_after_an_interruption_gives_the_uninterrupted_result(tmp_path):
    """Checkpoints hold the LoRA weights, optimizer, scheduler and place in the data; the prompt lengths each step
    draws are seeded per step, so a run resumed mid-epoch ends with the parameters of one that never stopped."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, VOCAB, (12, 8), generator=g)
    schedule = SkipSchedule.linear(6, 5, 2, 8)
    kw = dict(lora_rank=2, epochs=2, lr=1e-2, batch_size=4, min_prompt=2, progress=False)
    torch.manual_seed(3)
    full = train_skipdecode(model_of("llama6"), schedule, blocks, output_dir=tmp_path / "a", checkpoint_every=2, **kw)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-0000004", tmp_path / "b" / "checkpoints" / "step-0000004")
    assert latest_checkpoint(tmp_path / "b").name == "step-0000004"  # mid second epoch (3 batches an epoch)
    torch.manual_seed(3)
    resumed = train_skipdecode(model_of("llama6"), schedule, blocks, output_dir=tmp_path / "b", resume=True, **kw)
    assert resumed.history == pytest.approx(full.history, rel=1e-5)
    a, b = state(full.model), state(resumed.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], state(model_of("llama6"))[
        "model.layers.0.self_attn.q_proj.weight"])  # fmt: skip


def test_floored_schedule_keeps_a_quarter_of_the_layers_by_default():
    """What both commands build: for_speedup with min_layers = default_floor (8 of 30) unless given, and a target
    whose mean depth lies under the floor refused with the largest speed-up the floor allows."""
    from depthprune.generation.skipdecode import default_floor, floored_schedule

    assert default_floor(30) == 8 and default_floor(4) == 1
    schedule = floored_schedule(30, 2, budget=63)
    assert schedule == SkipSchedule.for_speedup(30, 2, budget=63, min_layers=8)
    assert schedule.min_layers == 8 and schedule.speedup(63) == pytest.approx(2, abs=0.1)
    assert SkipSchedule.for_speedup(30, 2, budget=63).min_layers < 8  # the unfloored ramp goes lower
    assert floored_schedule(30, 2, budget=63, min_layers=4).min_layers == 4
    with pytest.raises(ValueError, match=r"below the depth floor of 8 layers \(the default.*at most 3.75x"):
        floored_schedule(30, 5, budget=63)
    with pytest.raises(ValueError, match="out of range"):
        floored_schedule(30, 31, budget=63)


def test_a_measured_step_cost_aims_the_schedule_at_measured_seconds():
    from depthprune.generation.skipdecode import StepCost, floored_schedule

    # 30 ms of embedding + head + loop and 10 ms per layer: the full step costs 330 ms, 2x is 165 ms = 13.5 layers
    cost = StepCost(fixed_s=0.03, per_layer_s=0.01, num_layers=30, batch_size=1)
    assert cost.mean_layers_for(2.0) == pytest.approx(13.5) and cost.speedup(13.5) == pytest.approx(2.0)
    schedule = floored_schedule(30, 2, budget=63, cost=cost)
    assert schedule.mean_layers(63) == pytest.approx(13.5, abs=0.05)  # not 15 = the layer ratio's
    assert floored_schedule(30, 2, budget=63).mean_layers(63) == pytest.approx(15.0, abs=0.05)
    with pytest.raises(ValueError, match=r"speed-up of 3 means 8 layers.*at most 2.75x measured.*min_layers=8"):
        floored_schedule(30, 3, budget=63, min_layers=9, cost=cost)
    with pytest.raises(ValueError, match="fixed cost per token"):
        floored_schedule(30, 12, budget=63, min_layers=1, cost=cost)
    with pytest.raises(ValueError, match="measured on 30 layers"):
        floored_schedule(4, 2, budget=8, cost=cost)
    with pytest.raises(ValueError, match="too noisy|per_layer_s > 0"):
        StepCost(fixed_s=0.01, per_layer_s=-0.001, num_layers=30, batch_size=1)


def test_measure_step_cost_separates_the_layers_cost_from_the_fixed_cost():
    """Every layer of a tiny model made to take 20 ms (a sleep in a forward hook): the measured per-layer cost is those
    20 ms plus the layer's own small time, the fixed cost far below a layer's."""
    import time

    from depthprune.generation.skipdecode import measure_step_cost

    model = build("llama")
    handles = [layer.register_forward_hook(lambda *_: time.sleep(0.02)) for layer in model.model.layers]
    try:
        ids, mask = input_ids(batch=2, seq=5)
        cost = measure_step_cost(model, ids, mask, new_tokens=3, repeats=3, low_layers=1)
    finally:
        for h in handles:
            h.remove()
    assert 0.019 < cost.per_layer_s < 0.04 and cost.fixed_s < 0.02 and cost.batch_size == 2
    assert cost.speedup(1) > 2.0  # 1 of 4 layers, with the fixed cost small
    with pytest.raises(ValueError, match="low_layers must lie in 1..3"):
        measure_step_cost(model, ids, mask, low_layers=4)
