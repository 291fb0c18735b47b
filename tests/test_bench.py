"""Measuring library: speed reports (shape, not speed), theoretical FLOPs, plots, tables."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from tiny_models import CASES, build
from transformers import LlamaConfig, LlamaForCausalLM

from depthprune import LayerPlan, apply_plan, get_adapter
from depthprune.bench.flops import _mean_context, estimate_flops, flops_ratio
from depthprune.bench.plots import normalize, plot_layer_scores, plot_ppl_curves
from depthprune.bench.report import format_table, write_csv, write_json
from depthprune.bench.speed import compare_speed, random_prompts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HIDDEN, LAYERS, VOCAB, HEADS = 32, 4, 99, 4


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def layer_params(model: LlamaForCausalLM, i: int = 0) -> int:
    return sum(p.numel() for p in model.model.layers[i].parameters())


# ---- speed -------------------------------------------------------------------------------------------------------


def test_speed_report_has_positive_figures_and_baseline_ratios(llama):
    pruned = apply_plan(llama, LayerPlan.drop({"decoder": LAYERS}, [1, 2]))
    identity = apply_plan(llama, LayerPlan.identity({"decoder": LAYERS}))
    models = {"full": llama, "pruned": pruned, "identity": identity}
    threads_before = torch.get_num_threads()
    report = compare_speed(models, VOCAB, batch_sizes=(1, 2), prompt_len=6, new_tokens=3, repeats=2, threads=1)

    assert torch.get_num_threads() == threads_before  # restored
    assert len(report.results) == len(models) * 2
    for r in report.results:
        assert r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0
        assert len(r.prefill_seconds) == len(r.decode_seconds) == 2
        assert math.isfinite(r.prefill_ratio) and r.prefill_ratio > 0
        assert math.isfinite(r.decode_ratio) and r.decode_ratio > 0
    for b in (1, 2):
        base = report.result("full", b)
        assert base.prefill_ratio == 1.0 and base.decode_ratio == 1.0
    assert report.machine.torch_threads == 1 and report.settings["threads"] == 1
    assert report.machine.cpu_count and report.machine.torch_version and report.machine.transformers_version
    data = json.loads(json.dumps(report.to_dict()))
    assert data["baseline"] == "full" and len(data["results"]) == 6
    table = report.table()
    assert "pruned" in table and "decode_ratio" in table


def test_speed_generate_method_times_decode_steps(llama):
    report = compare_speed(
        {"full": llama},
        VOCAB,
        batch_sizes=(1,),
        prompt_len=5,
        new_tokens=3,
        repeats=1,
        warmup=0,
        method="generate",
        threads=1,
    )
    (r,) = report.results
    assert r.decode_steps == 2 and r.decode_tokens_per_s > 0 and r.decode_ratio == 1.0


def test_speed_rejects_unknown_baseline(llama):
    with pytest.raises(ValueError, match="baseline"):
        compare_speed({"a": llama}, VOCAB, baseline="full")


def test_random_prompts_are_fixed_and_avoid_special_tokens():
    class Tok:
        all_special_ids = [0, 1, 2]

        def __len__(self) -> int:
            return 10

    a = random_prompts(Tok(), 4, 50, seed=3)
    assert a.shape == (4, 50) and torch.equal(a, random_prompts(Tok(), 4, 50, seed=3))
    assert a.min() >= 3 and a.max() <= 9
    assert random_prompts(VOCAB, 2, 50, vocab_limit=7).max() < 7


# ---- FLOPs -------------------------------------------------------------------------------------------------------


def by_hand(model: LlamaForCausalLM, layers_run: int, context: int) -> float:
    """Decode FLOPs per token: 2 x layer params + attention (QK and AV over the context) per layer run, + head."""
    attention = 4 * HIDDEN * context  # 4 heads x head dim 8 = hidden 32
    head = 2 * model.lm_head.weight.numel()
    return layers_run * (2 * layer_params(model) + attention) + head


def test_flops_identity_plan_equals_full_model(llama):
    identity = apply_plan(llama, LayerPlan.identity({"decoder": LAYERS}))
    full, same = estimate_flops(llama, 64), estimate_flops(identity, 64)
    assert same.prefill_per_token == full.prefill_per_token
    assert same.decode_per_token == full.decode_per_token
    assert flops_ratio(identity, llama, 64) == 1.0
    assert full.decode_per_token == by_hand(llama, LAYERS, 64)


def test_flops_half_the_layers_ratio_matches_hand_count(llama):
    pruned = apply_plan(llama, LayerPlan.drop({"decoder": LAYERS}, [1, 2]))
    expected = by_hand(llama, LAYERS, 32) / by_hand(llama, LAYERS // 2, 32)
    ratio = flops_ratio(pruned, llama, 32)
    assert ratio == pytest.approx(expected, rel=1e-12)
    assert 1.5 < ratio < 2.0  # the head does not shrink, so dropping half the layers gives less than 2x
    assert estimate_flops(pruned, 32).layers_run == LAYERS // 2


def test_flops_count_repeated_layers_every_run(llama):
    repeated = apply_plan(llama, LayerPlan({"decoder": (0, 1, 1, 2, 3)}))
    unique = {id(p) for p in repeated.parameters()}
    assert len(unique) == len({id(p) for p in llama.parameters()})  # the repeat shares its weights
    est = estimate_flops(repeated, 16)
    assert est.layers_run == 5
    assert est.stacks[0].layer_params_run == 5 * layer_params(llama)
    assert est.decode_per_token == by_hand(llama, 5, 16)
    assert flops_ratio(repeated, llama, 16) == pytest.approx(by_hand(llama, 4, 16) / by_hand(llama, 5, 16))


def test_flops_prefill_uses_causal_mean_context_and_last_position_head(llama):
    context = 10
    est = estimate_flops(llama, context)
    layer = 2 * layer_params(llama) + 4 * HIDDEN * (context + 1) / 2
    head = 2 * llama.lm_head.weight.numel()
    assert est.prefill_per_token == pytest.approx(LAYERS * layer + head / context)
    assert estimate_flops(llama, context, logits="all").prefill_per_token == pytest.approx(LAYERS * layer + head)


def test_mean_context_with_sliding_window():
    assert _mean_context(4, causal=True, window=None) == 2.5
    assert _mean_context(4, causal=True, window=2) == (1 + 2 + 2 + 2) / 4
    assert _mean_context(4, causal=False, window=None) == 4


@pytest.mark.parametrize("name", list(CASES))
def test_flops_work_for_every_family(name):
    model = build(name)
    sizes = get_adapter(model).num_layers(model)
    est = estimate_flops(model, 16)
    assert {s.name: s.layers_run for s in est.stacks} == sizes
    assert est.decode_per_token > 0 and est.prefill_per_token > 0
    dropped = apply_plan(model, LayerPlan.drop(sizes, {stack: [0] for stack in sizes}))
    assert flops_ratio(dropped, model, 16) > 1.0 and flops_ratio(dropped, model, 16, phase="prefill") > 1.0
    assert flops_ratio(apply_plan(model, LayerPlan.identity(sizes)), model, 16) == pytest.approx(1.0)


def test_flops_decode_of_encoder_decoder_counts_the_decoder_only():
    model = build("t5")
    sizes = get_adapter(model).num_layers(model)
    encoder_dropped = apply_plan(model, LayerPlan.drop(sizes, {"encoder": [0]}))
    assert flops_ratio(encoder_dropped, model, 16) == 1.0
    assert flops_ratio(encoder_dropped, model, 16, phase="prefill") > 1.0


def test_flops_albert_shared_group_counted_per_run():
    model = build("albert")
    est = estimate_flops(model, 8)
    group = sum(p.numel() for p in model.albert.encoder.albert_layer_groups[0].parameters())
    assert len(model.albert.encoder.albert_layer_groups) == 1
    assert est.stacks[0].layers_run == 4 and est.stacks[0].layer_params_run == 4 * group


def test_flops_sliding_window_layers_see_the_window_only():
    model = build("gemma3_text")  # layer types sliding, sliding, full, sliding; window 3; 4 heads x head dim 8
    est = estimate_flops(model, 16)
    assert est.stacks[0].attention_decode == 4 * 32 * (3 + 3 + 16 + 3)
    mistral = build("mistral")  # a sliding window on every layer, no layer_types
    assert estimate_flops(mistral, 16).stacks[0].attention_decode == 4 * 32 * 4 * 4


# ---- plots -------------------------------------------------------------------------------------------------------


def assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE


def test_plot_layer_scores_writes_png(tmp_path):
    scores = {"block_influence": [0.9, 0.1, 0.3, 0.5], "angular": [10.0, 2.0, 3.0, 8.0], "flat": [1.0] * 4}
    path = plot_layer_scores(scores, tmp_path / "sub" / "scores.png", removed={"angular": [1, 2]})
    assert_png(path)


def test_plot_ppl_curves_writes_png(tmp_path):
    curves = {"block_influence": {0: 12.0, 2: 15.0, 4: 40.0}, "sleb": [(0, 12.0), (2, 13.5), (4, 25.0)]}
    assert_png(plot_ppl_curves(curves, tmp_path / "ppl.png", baseline=12.0))
    with pytest.raises(ValueError, match="positive"):
        plot_ppl_curves({"bad": {0: 0.0}}, tmp_path / "bad.png")


def test_normalize():
    assert normalize([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert normalize([5.0, 5.0]) == [0.5, 0.5]
    assert math.isnan(normalize([1.0, float("nan"), 3.0])[1])


# ---- tables ------------------------------------------------------------------------------------------------------


def test_format_table_aligns_columns():
    rows = [{"model": "full", "batch": 1, "ratio": 1.0}, {"model": "pruned-long-name", "batch": 8, "ratio": 1.23456}]
    text = format_table(rows, title="speed")
    lines = text.splitlines()
    assert lines[0] == "speed"
    assert lines[1].split() == ["model", "batch", "ratio"]
    assert set(lines[2]) <= {"-", " "}
    assert lines[3].split() == ["full", "1", "1.00"] and lines[4].split() == ["pruned-long-name", "8", "1.23"]
    # numbers right-aligned: the last characters of the number column line up
    assert lines[3].index("1.00") + 4 == lines[4].index("1.23") + 4 == len(lines[1])
    assert lines[3].startswith("full ")  # text left-aligned
    assert format_table([{"a": 1}, {"b": 2.5}], columns=["a", "b"]).splitlines()[2].split() == ["1", "-"]


def test_write_json_and_csv(tmp_path):
    rows = [{"model": "full", "ratio": 1.0, "layers": [1, 2]}, {"model": "pruned", "ratio": float("nan")}]
    data = json.loads(write_json(rows, tmp_path / "out.json").read_text())
    assert data[0]["layers"] == [1, 2] and data[1]["ratio"] is None
    with write_csv(rows, tmp_path / "out.csv").open() as f:
        read = list(csv.DictReader(f))
    assert read[0] == {"model": "full", "ratio": "1.0", "layers": "[1, 2]"}
    assert read[1]["layers"] == "" and read[1]["ratio"] == ""


def test_interleaved_seconds_rotates_the_order_and_ratios_pair_the_rounds():
    from depthprune.bench.generation import interleaved_seconds, speed_ratios

    calls, given = [], {"base": [2.0, 4.0], "fast": [1.0, 1.0]}

    def timer(name):
        it = iter(given[name])
        return lambda: calls.append(name) or next(it)

    warm = {"base": lambda: calls.append("warm base"), "fast": lambda: calls.append("warm fast")}
    times = interleaved_seconds({n: timer(n) for n in given}, 2, warmup=1, warmup_runs=warm)
    assert calls == ["warm base", "warm fast", "base", "fast", "fast", "base"]
    assert times == given
    ratios = speed_ratios(times, "base", tokens=12)
    assert ratios["fast"]["ratio"] == 3.0  # median of 2/1 and 4/1, round by round
    assert ratios["base"]["ratio"] == 1.0 and ratios["fast"]["tok_s"] == 12.0


def test_write_atomic_replaces_whole_files(tmp_path):
    from depthprune.fsutil import write_atomic

    path = write_atomic(tmp_path / "a.txt", "old")
    assert write_atomic(path, b"\x89new") == path and path.read_bytes() == b"\x89new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_repeated_ngram_share_counts_repeats_of_earlier_ngrams():
    from depthprune.bench.fluency import repeated_ngram_share

    assert repeated_ngram_share([1, 2, 3, 4, 5, 6]) == 0.0
    # "a b a b a b a b": 5 four-grams, 2 distinct -> 3 of 5 are repeats
    assert repeated_ngram_share([1, 2] * 4) == pytest.approx(3 / 5)
    assert repeated_ngram_share([7] * 10, n=1) == pytest.approx(0.9)
    assert repeated_ngram_share([1, 2, 3]) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        repeated_ngram_share([1, 2], n=0)


def test_fluency_runs_greedy_generate_and_measures_each_continuation(llama):
    from depthprune.bench.fluency import fluency, prompt_ids, repeated_ngram_share

    class Ids:  # decodes ids as text, as a tokenizer would
        pad_token_id, eos_token_id = 0, 0

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    blocks = torch.randint(3, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    prompts = prompt_ids(Ids(), blocks, prompt_len=8)
    result = fluency(llama, Ids(), prompts, max_new_tokens=12)
    assert len(result.continuations) == 3 and all(len(t.split()) == 12 for t in result.continuations)
    first = llama.generate(input_ids=prompts[0], max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert result.shares[0] == repeated_ngram_share(first[0, 8:].tolist())
    assert result.mean_share == pytest.approx(sum(result.shares) / 3)
    with pytest.raises(ValueError, match="need blocks"):
        prompt_ids(Ids(), blocks, prompt_len=32)
