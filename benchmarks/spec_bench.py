r"""Fast decoding built on early exits, on SmolLM2: self-speculative decoding and SkipDecode against plain greedy
`model.generate` (and transformers' own generate(assistant_early_exit=...)) in the same run.

    OMP_NUM_THREADS=1 python benchmarks/spec_bench.py out/smollm2-lens --choose --out benchmarks/spec

(out/smollm2-lens: decoder exit heads written by `depthprune train-exits --model smollm2 --kind lens --output-dir
out/smollm2-lens`.) Every configuration decodes the same --prompts held-out Moby-Dick prompts of --prompt-len tokens
and generates exactly --max-new-tokens tokens (no stop at end of sequence, on every side). With the defaults (two
exits: about a dozen configurations) expect tens of minutes on one CPU thread (a guess from a short run).

Self-speculative (`depthprune.generation.speculative`, greedy), configurations:
- exit drafts (LayerSkip): layers 0..E and E's exit head draft, for E in --exit-layers (default: the heads' exits)
  x draft_len in --draft-lens;
- skip drafts (Draft & Verify): the model without --skip-layers drafts, x --draft-lens. Without --skip-layers, the
  --skip-count (default: half) layers with the lowest Block Influence (ShortGPT: 1 - cos(layer input, layer output))
  on 8 calibration prompts are skipped: the layers that turn their input least, found with one forward pass;
- --choose: the (E, draft_len) that `choose_speculation` picks from a timed greedy run at batch 1 on --choose-prompts
  calibration prompts (candidate draft lengths 1 2 3 4 6), added to the grid or marked in it;
- transformers' `model.generate(assistant_early_exit=E + 1, do_sample=False)` for each E, at batch 1 only (transformers
  supports nothing else): its draft runs layers 0..E (it counts layers, E counts from 0) then the model's own final
  norm and LM head, with transformers' default drafting settings (recorded in the JSON).
For each: identical_bB, the share of prompts whose continuation is token-identical to plain greedy `model.generate`
on the same batches of B prompts (the prompts are equal-length blocks, so batches need no padding; the rows of a batch
accept different numbers of drafts, so batched self-speculative decoding masks rejected columns inside the batch);
mean_accepted_bB, accepted draft tokens per verification (each verification adds one token of the verifier's own).

SkipDecode (`depthprune.generation.skipdecode`) at each --skip-speedups target s: the schedule
`SkipSchedule.for_speedup(L, s, budget=max_new_tokens - 1, min_layers=--skip-min-layers)` (the decode steps after
the first token); held-out
perplexity of the --max-new-tokens tokens after a --prompt-len prompt (`skipdecode_perplexity`, teacher forcing, on
--ppl-blocks held-out blocks) beside the untouched model's on the same tokens; token agreement and identical share with
plain greedy continuations. --adapted S=FOLDER adds a model adapted to a schedule by LoRA, measured the same way
under the schedule it was trained for (skip_schedule.json in its folder). Such a folder for SmolLM2 and target 2x:

    OMP_NUM_THREADS=1 depthprune train-skipdecode --model smollm2 --speedup 2 --output-dir out/smollm2-skip2

then `--adapted 2=out/smollm2-skip2` (its defaults --budget 31 and --seq-len 96 match the default --max-new-tokens 32:
the speed-up is aimed at over the decode steps after the first token, and blocks of 96 tokens cover a 64-token prompt
plus 32 new ones).

Speed, at each of --batch-sizes on the first B prompts: every repeat runs plain greedy generate, plain generate of
one token (the prompt's forward and the first token: "prefill") and every configuration once, in a rotating order
(interleaved, so a burst of load from other processes hits all alike), after --warmup short runs of each. Decode
seconds = seconds of the whole call - the same round's prefill seconds, on every side (self-speculative decoding
verifies even the first token, so it pays one step more than this subtracts). speedup_bB: the median over repeats of
generate's decode seconds / the configuration's; e2e_speedup_bB: the same for whole calls, prefill included.

Truncated-vocabulary drafts (`depthprune.exits.vocab_heads`, issue 17): --draft-vocab C... adds, for every exit draft,
the same draft through a head that projects onto the fewest tokens covering share C of the calibration text's tokens
(--draft-vocab-k K... for explicit counts); the verification stays on the full vocabulary, so they are token-identical
too. --head-costs adds a table: per batch size, one decoder layer (with the prompt's KV cache), the full exit head
and each truncated head (full-vocabulary logits, and the greedy top token alone), in ms and in layer-equivalents.
--no-skip-draft / --no-hf leave the Draft & Verify drafts / transformers' assistant_early_exit out.

Writes into --out: spec_bench.json (everything, with the machine), spec_table.txt and spec_table.md (the tables,
plain and markdown).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from depthprune.adapters import get_adapter
from depthprune.bench.generation import (
    add_timing_arguments,
    check_timing_arguments,
    interleaved_seconds,
    markdown_table,
    speed_ratios,
)
from depthprune.bench.report import format_table, to_jsonable
from depthprune.bench.speed import machine_info
from depthprune.data import calibration_text, heldout_text
from depthprune.exits.lm_heads import DecoderExitHeads, top_tokens
from depthprune.exits.vocab_heads import TruncatedVocabHeads
from depthprune.fsutil import write_atomic
from depthprune.generation.calibrate import prompt_blocks, token_consistency
from depthprune.generation.skipdecode import SkipSchedule, skipdecode_generate, skipdecode_perplexity
from depthprune.generation.skipdecode_train import load_schedule
from depthprune.generation.speculative import choose_speculation, self_speculative_generate
from depthprune.io import load_model, load_tokenizer

NO_EOS = ()  # generate exactly max_new_tokens tokens on every side
CHOOSE_LENS = (1, 2, 3, 4, 6)


@dataclasses.dataclass
class Method:
    """One way to generate: run(ids [b, p], n) -> (sequences [b, p + n], the library's output or None); row: what
    the table says of it."""

    name: str
    run: Callable[[torch.Tensor, int], tuple[torch.Tensor, Any]]
    row: dict[str, Any]
    batch1_only: bool = False


REFERENCE = "reference generate"


# ---- the methods ----------------------------------------------------------------------------------------------------
def greedy_config(model) -> Callable[..., Any]:
    """(max_new_tokens, **fields) -> a fresh copy of the model's generation config, greedy, with no end-of-sequence
    token (so generate makes exactly max_new_tokens tokens)."""
    base = copy.deepcopy(model.generation_config)
    if base.pad_token_id is None:
        base.pad_token_id = 0  # never used: without an end of sequence nothing is padded
    base.eos_token_id = None
    base.do_sample = False
    base.temperature = base.top_p = base.top_k = None

    def config(max_new_tokens: int, **fields: Any):
        out = copy.deepcopy(base)  # a fresh one per call: generate's candidate generators edit theirs
        out.update(max_new_tokens=max_new_tokens, **fields)
        return out

    return config


def plain(model, config) -> Method:
    def run(ids, n):
        return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config(n)), None

    return Method("generate", run, {"method": "generate"})


def hf_early_exit(model, config, exit_layer: int) -> Method:
    def run(ids, n):
        gen = config(n, assistant_early_exit=exit_layer + 1)
        return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen), None

    row = {"method": "hf generate", "draft": "exit (lm head)", "exit_layer": exit_layer}
    return Method(f"hf assistant_early_exit={exit_layer + 1}", run, row, batch1_only=True)


def speculative(model, heads, draft: str, draft_len: int, exit_layer=None, skip_layers=None, vocab=None) -> Method:
    def run(ids, n):
        out = self_speculative_generate(
            model, heads if draft == "exit" else None, ids, draft=draft, exit_layer=exit_layer,
            skip_layers=skip_layers, draft_len=draft_len, max_new_tokens=n, eos_token_id=NO_EOS,
        )  # fmt: skip
        return out.sequences, out

    row = {"method": "self-spec", "draft": draft, "exit_layer": exit_layer, "draft_len": draft_len, "chosen": False}
    if vocab is not None:
        row.update(draft_vocab=vocab, vocab_k=heads.k, vocab_coverage=heads.info["coverage"])
        return Method(f"exit {exit_layer} k={draft_len} vocab {vocab}", run, row)
    if draft == "skip":
        row.update(skipped=len(skip_layers), skip_layers=list(skip_layers))
        name = f"skip {len(skip_layers)} k={draft_len}"
    else:
        name = f"exit {exit_layer} k={draft_len}"
    return Method(name, run, row)


def skipdecode(model, schedule: SkipSchedule, target: float, which: str) -> Method:
    def run(ids, n):
        out = skipdecode_generate(model, ids, schedule=schedule, max_new_tokens=n, eos_token_id=NO_EOS)
        return out.sequences, out

    s = schedule
    row = {"model": which, "target": target, "schedule": f"{s.max_layers}->{s.min_layers} over {s.decay_tokens:.3g}"}
    return Method(f"skipdecode {target:g}x {which}", run, row)


def hf_early_exit_support() -> tuple[bool, dict[str, Any]]:
    """Whether this transformers has generate(assistant_early_exit=...), and its default drafting settings."""
    import transformers
    from transformers import GenerationConfig

    if not hasattr(GenerationConfig(), "assistant_early_exit"):
        return False, {"note": f"transformers {transformers.__version__} has no assistant_early_exit; not measured"}
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    settings = {k: v for k, v in (defaults() if defaults else {}).items() if "assistant" in k}
    note = "batch 1 only (transformers' assisted generation supports nothing else)"
    return True, {"transformers": transformers.__version__, "defaults": settings, "note": note}


def auto_skip_layers(model, tokenizer, prompt_len: int, count: int) -> tuple[list[int], list[float]]:
    """The `count` layers with the lowest Block Influence on 8 calibration prompts, and every layer's score."""
    from depthprune.static.scorers import get_scorer

    cal = prompt_blocks(tokenizer, calibration_text(), 8, prompt_len)
    result = get_scorer("block_influence")(model, [cal], n_remove=count)
    return list(result.remove), list(result.scores)


# ---- measuring ------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def agreement(methods: dict[str, Method], prompts, max_new_tokens: int, batch_size: int) -> dict[str, dict]:
    """Per method, over all prompts in batches of batch_size: identical (share of continuations equal to plain
    generate's on the same batch), agreement (token agreement), mean_accepted / acceptance_rate (speculative)."""
    p = prompts.shape[1]
    zero = {"identical": 0, "agreement": 0.0, "accepted": 0, "drafted": 0, "verifications": 0}
    zero.update(ref_identical=0, ref_agreement=0.0)
    sums = {name: dict(zero) for name in methods}
    for ids in prompts.split(batch_size):
        plain_seq = methods["generate"].run(ids, max_new_tokens)[0]
        ref = plain_seq[:, p:].tolist()
        other = methods[REFERENCE].run(ids, max_new_tokens)[0][:, p:].tolist() if REFERENCE in methods else None
        for name, method in methods.items():
            seq, out = (plain_seq, None) if name == "generate" else method.run(ids, max_new_tokens)
            if seq.shape[1] != p + max_new_tokens:
                raise RuntimeError(f"{name} made {seq.shape[1] - p} tokens, not {max_new_tokens}")
            s = sums[name]
            for i, (got, want) in enumerate(zip(seq[:, p:].tolist(), ref, strict=True)):
                s["identical"] += int(got == want)
                s["agreement"] += token_consistency(got, want)
                if other is not None:  # against the reference (untouched) model's greedy continuation
                    s["ref_identical"] += int(got == other[i])
                    s["ref_agreement"] += token_consistency(got, other[i])
            if out is None:
                continue
            if getattr(out, "verifications", None) is not None:
                s["accepted"] += int(out.accepted.sum())
                s["drafted"] += int(out.drafted.sum())
                s["verifications"] += int(out.verifications.sum())
    n = len(prompts)
    figures = {}
    for name, s in sums.items():
        figures[name] = {"identical": s["identical"] / n, "agreement": s["agreement"] / n}
        if REFERENCE in methods:
            figures[name].update(ref_identical=s["ref_identical"] / n, ref_agreement=s["ref_agreement"] / n)
        if s["verifications"]:
            figures[name]["mean_accepted"] = s["accepted"] / s["verifications"]
            figures[name]["acceptance_rate"] = s["accepted"] / max(1, s["drafted"])
    return figures


def seconds(run, ids, n) -> float:
    """Wall-clock seconds of one whole call."""
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    t0 = time.perf_counter()
    run(ids, n)
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    return time.perf_counter() - t0


@torch.inference_mode()
def speed(methods: dict[str, Method], ids, max_new_tokens, repeats, warmup) -> dict[str, dict]:
    """Interleaved rounds of every method and of the prefill (generate of one token); decode = call - prefill."""
    batch = ids.shape[0]
    runs = {name: m.run for name, m in methods.items()} | {"prefill": methods["generate"].run}
    tokens = {name: max_new_tokens for name in methods} | {"prefill": 1}
    timed = {name: functools.partial(seconds, run, ids, tokens[name]) for name, run in runs.items()}
    short = {name: functools.partial(seconds, run, ids, min(4, tokens[name])) for name, run in runs.items()}
    times = interleaved_seconds(timed, repeats, warmup=warmup, warmup_runs=short, label=f"batch {batch}")
    prefill = times.pop("prefill")
    decode = {name: [t - p for t, p in zip(ts, prefill, strict=True)] for name, ts in times.items()}
    dec = speed_ratios(decode, "generate", batch * (max_new_tokens - 1))
    e2e = speed_ratios(times, "generate", batch * max_new_tokens)
    return {
        name: {"speedup": dec[name]["ratio"], "e2e_speedup": e2e[name]["ratio"], "decode_tok_s": dec[name]["tok_s"],
               "seconds": times[name], "prefill_seconds": prefill}
        for name in times
    }  # fmt: skip


def per_call_ms(fn, *args, repeats: int = 20, reset=None) -> float:
    """Median milliseconds of fn(*args) over `repeats` calls (after one warm-up); reset() runs untimed after each."""
    import statistics

    fn(*args)
    if reset:
        reset()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t0)
        if reset:
            reset()
    return 1000 * statistics.median(out)


@torch.inference_mode()
def head_costs(model, heads, truncated: dict[str, TruncatedVocabHeads], prompts, layer: int, batch_sizes) -> list[dict]:
    """Per batch size: ms of one decoder layer step (the prompt's KV cache behind it), of the full exit head and of
    each truncated head (full-vocabulary logits; greedy top token), and each head's cost in layer-equivalents."""
    from transformers.cache_utils import DynamicCache

    from depthprune.decoding import step_inputs
    from depthprune.runner import capture_stack

    rows = []
    for bs in batch_sizes:
        ids = prompts[:bs]
        cache = DynamicCache(config=model.config)
        model(**step_inputs(model, ids, None, None, cache))
        hidden, stack = capture_stack(model, step_inputs(model, ids[:, -1:], None, None, cache))
        call = stack.calls[layer]
        kv = cache.layers[layer]
        kept = (kv.keys, kv.values)  # restored after each timed call, which appends a position

        def reset(kv=kv, kept=kept):
            kv.keys, kv.values = kept

        layer_module = get_adapter(model).run_sequence(model, "decoder")[layer]
        h = call.run(layer_module, hidden)
        reset()
        row = {"batch": bs, "layer_ms": per_call_ms(call.run, layer_module, hidden, reset=reset)}
        row["full_head_ms"] = per_call_ms(heads.logits, layer, h)
        row["full_top_ms"] = per_call_ms(top_tokens, heads, layer, h)
        for name, t in truncated.items():
            row[f"{name}_logits_ms"] = per_call_ms(t.logits, layer, h)
            row[f"{name}_top_ms"] = per_call_ms(t.top_tokens, layer, h)
        for key in [k for k in row if k.endswith("_ms") and k != "layer_ms"]:
            row[key.replace("_ms", "_layers")] = row[key] / row["layer_ms"]
        rows.append(row)
    return rows


# ---- the run --------------------------------------------------------------------------------------------------------
def parse_adapted(items: list[str], p: argparse.ArgumentParser) -> dict[float, str]:
    out = {}
    for item in items:
        speedup, sep, folder = item.partition("=")
        try:
            out[float(speedup)] = folder
        except ValueError:
            sep = ""
        if not sep or not folder:
            p.error(f"--adapted takes SPEEDUP=FOLDER (e.g. 2=out/smollm2-skip2), got {item!r}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("heads", nargs="?", help="folder of decoder exit heads (train-exits on the model)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (>= the largest batch size)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--exit-layers", type=int, nargs="+", default=None, help="exit drafts (default: the heads' exits)")
    p.add_argument("--draft-lens", type=int, nargs="+", default=[3, 5])
    p.add_argument("--skip-layers", type=int, nargs="+", default=None, help="layers a skip draft leaves out")
    p.add_argument("--skip-count", type=int, default=None, help="without --skip-layers: how many (default: half)")
    p.add_argument("--choose", action="store_true", help="add the configuration choose_speculation picks")
    p.add_argument("--choose-prompts", type=int, default=1, help="calibration prompts for --choose (one batch)")
    p.add_argument("--skip-speedups", type=float, nargs="+", default=[2.0, 3.0, 5.0])
    p.add_argument(
        "--skip-min-layers",
        type=int,
        default=None,
        help="floor of every SkipDecode schedule (for_speedup's min_layers; default: its centred ramp, which ends at "
        "1 layer for 2x-5x on 30 layers)",
    )
    p.add_argument("--adapted", nargs="+", default=[], metavar="SPEEDUP=FOLDER", help="LoRA-adapted SkipDecode models")
    p.add_argument("--ppl-blocks", type=int, default=16, help="held-out blocks for SkipDecode perplexity")
    add_timing_arguments(p)
    p.add_argument(
        "--draft-vocab",
        type=float,
        nargs="+",
        default=[],
        metavar="COVERAGE",
        help="truncated-vocabulary exit drafts covering these shares of the calibration tokens",
    )
    p.add_argument(
        "--draft-vocab-k",
        type=int,
        nargs="+",
        default=[],
        metavar="K",
        help="truncated-vocabulary exit drafts of K tokens each",
    )
    p.add_argument("--head-costs", action="store_true", help="time the full and truncated heads against a layer")
    p.add_argument("--no-skip-draft", action="store_true", help="leave the Draft & Verify skip drafts out")
    p.add_argument("--no-hf", action="store_true", help="leave transformers' assistant_early_exit out")
    p.add_argument("--no-speculative", action="store_true")
    p.add_argument("--no-skipdecode", action="store_true")
    p.add_argument("--out", default="benchmarks/spec")
    p.add_argument(
        "--reference",
        default=None,
        help="a second model (e.g. the untouched one beside an adapted --model): its plain generate is timed in the "
        "same interleaved rounds and every configuration's agreement with its greedy output is reported (ref_*)",
    )
    p.add_argument("--data", default=None, help="the book whose held-out part gives the prompts (default: packaged)")
    args = p.parse_args()
    check_timing_arguments(p, args)
    if args.no_speculative and args.no_skipdecode:
        p.error("--no-speculative and --no-skipdecode leave nothing to measure")
    if not args.no_speculative and args.heads is None:
        p.error("give the folder of exit heads (or --no-speculative)")
    adapted = parse_adapted(args.adapted, p)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    n_new = args.max_new_tokens

    model = load_model(args.model, task="causal-lm").eval()
    tokenizer = load_tokenizer(args.model)
    num_layers = len(get_adapter(model).run_sequence(model, "decoder"))
    prompts = prompt_blocks(tokenizer, heldout_text(args.data), args.prompts, args.prompt_len)
    config = greedy_config(model)
    methods = {"generate": plain(model, config)}
    if args.reference:  # e.g. the untouched model beside a LayerSkip-adapted one: timed and compared in the same run
        reference = load_model(args.reference, task="causal-lm").eval()
        methods[REFERENCE] = dataclasses.replace(plain(reference, greedy_config(reference)), name=REFERENCE)
        methods[REFERENCE].row.update(method="reference", model=args.reference)
    report: dict[str, Any] = {}

    if not args.no_speculative:
        heads = DecoderExitHeads.load(args.heads, model).eval()
        exits = args.exit_layers or [int(e) for e in heads.layers if e < num_layers - 1]
        for e in exits:
            for k in args.draft_lens:
                m = speculative(model, heads, "exit", k, exit_layer=e)
                methods[m.name] = m
        truncated = {}
        if args.draft_vocab or args.draft_vocab_k:
            cal_tokens = torch.tensor(tokenizer(calibration_text())["input_ids"])
            held_tokens = torch.tensor(tokenizer(heldout_text())["input_ids"])
            eos = model.generation_config.eos_token_id
            always = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
            for c in args.draft_vocab:
                truncated[f"cov{c:g}"] = TruncatedVocabHeads.from_tokens(heads, cal_tokens, coverage=c, always=always)
            for kk in args.draft_vocab_k:
                truncated[f"k{kk}"] = TruncatedVocabHeads.from_tokens(heads, cal_tokens, k=kk, always=always)
            report["draft_vocab"] = {
                name: {**t.info, "heldout_coverage": float(torch.isin(held_tokens, t.token_ids).float().mean())}
                for name, t in truncated.items()
            }
            for name, t in truncated.items():
                for e in exits:
                    for k in args.draft_lens:
                        m = speculative(model, t, "exit", k, exit_layer=e, vocab=name)
                        methods[m.name] = m
        if args.head_costs:
            print("timing heads against a layer ...", flush=True)
            report["head_costs"] = head_costs(model, heads, truncated, prompts, exits[-1], args.batch_sizes)
            print(format_table(report["head_costs"], title=f"head cost at exit {exits[-1]} (ms; *_layers: in layers)"))
        skip_rule = {"rule": "--skip-layers"}
        skip = args.skip_layers
        if args.no_skip_draft:
            skip_rule, skip = {"rule": "--no-skip-draft"}, []
        elif skip is None:
            count = args.skip_count or num_layers // 2
            skip, scores = auto_skip_layers(model, tokenizer, args.prompt_len, count)
            skip_rule = {"rule": f"the {count} layers with the lowest Block Influence", "block_influence": scores}
        report["skip_draft"] = {**skip_rule, "skip_layers": sorted(skip)}
        for k in args.draft_lens if skip else []:
            m = speculative(model, None, "skip", k, skip_layers=sorted(skip))
            methods[m.name] = m
        if args.choose:
            print(f"choosing (exit layer, draft length) on {args.choose_prompts} calibration prompt(s) ...", flush=True)
            cal = prompt_blocks(tokenizer, calibration_text(), args.choose_prompts, args.prompt_len)
            choice = choose_speculation(
                model, heads, cal, exits, CHOOSE_LENS, max_new_tokens=n_new, eos_token_id=NO_EOS
            )
            report["choice"] = choice.to_dict()
            m = speculative(model, heads, "exit", choice.draft_len, exit_layer=choice.exit_layer)
            methods.setdefault(m.name, m).row["chosen"] = True
        supported, report["hf_early_exit"] = hf_early_exit_support()
        if args.no_hf:
            supported, report["hf_early_exit"] = False, {"note": "--no-hf: not measured"}
        if supported:
            for e in exits:
                m = hf_early_exit(model, config, e)
                methods[m.name] = m
        print(f"speculative: {report['hf_early_exit']['note']}", flush=True)

    if not args.no_skipdecode:
        blocks = prompt_blocks(tokenizer, heldout_text(), args.ppl_blocks, args.prompt_len + n_new)
        full = SkipSchedule.constant(num_layers, num_layers)
        print(f"SkipDecode perplexity on {len(blocks)} held-out blocks ...", flush=True)
        ppl_full = skipdecode_perplexity(model, blocks, full, prompt_len=args.prompt_len)
        models = {"unadapted": {s: (model, SkipSchedule.for_speedup(num_layers, s, budget=n_new - 1,
                                                                      min_layers=args.skip_min_layers)) for s in
                                args.skip_speedups}}  # fmt: skip
        models["adapted"] = {s: (load_model(f, task="causal-lm").eval(), load_schedule(f)) for s, f in adapted.items()}
        report["skipdecode"] = {"ppl_full": ppl_full, "ppl_blocks": list(blocks.shape), "schedules": {}}
        for which, targets in models.items():
            for s, (lm, schedule) in targets.items():
                m = skipdecode(lm, schedule, s, which)
                m.row.update(
                    mean_layers=schedule.mean_layers(n_new - 1),
                    ideal_speedup=schedule.speedup(n_new - 1),
                    ppl=skipdecode_perplexity(lm, blocks, schedule, prompt_len=args.prompt_len),
                    ppl_full=ppl_full,
                )
                if which == "adapted":
                    m.row["folder"] = adapted[s]
                methods[m.name] = m
                report["skipdecode"]["schedules"][m.name] = schedule.to_dict()

    results: dict[str, dict[str, Any]] = {name: {} for name in methods}
    base_tok_s = {}
    for bs in args.batch_sizes:
        here = {name: m for name, m in methods.items() if bs == 1 or not m.batch1_only}
        print(f"agreement of {len(here) - 1} configurations at batch {bs} on {len(prompts)} prompts ...", flush=True)
        for name, figs in agreement(here, prompts, n_new, bs).items():
            results[name].update({f"{k}_b{bs}": v for k, v in figs.items()})
        print(f"timing at batch {bs} ...", flush=True)
        timing = speed(here, prompts[:bs], n_new, args.repeats, args.warmup)
        base_tok_s[bs] = timing["generate"]["decode_tok_s"]
        for name, t in timing.items():
            results[name].update({f"{k}_b{bs}": v for k, v in t.items()})

    rows = {name: {"name": name, **m.row, **results[name]} for name, m in methods.items() if name != "generate"}
    figs = ("identical", "mean_accepted", "speedup", "e2e_speedup") + (("ref_agreement",) if args.reference else ())
    per_b = [f"{c}_b{bs}" for bs in args.batch_sizes for c in figs]
    spec_cols = ["name", "draft", "exit_layer", "skipped", "draft_len", "vocab_k", "vocab_coverage", "chosen", *per_b]
    per_b = [f"{c}_b{bs}" for bs in args.batch_sizes for c in ("agreement", "identical", "speedup", "e2e_speedup")]
    skip_cols = ["model", "target", "schedule", "mean_layers", "ideal_speedup", "ppl", "ppl_full", *per_b]
    spec_rows = [r for r in rows.values() if r.get("method") in ("self-spec", "hf generate")]
    skip_rows = [r for r in rows.values() if "target" in r]
    heads_desc = "" if args.no_speculative else f" + {Path(args.heads).name} ({heads.config.kind} exits {heads.layers})"
    base_desc = ", ".join(
        f"{v:.1f} tok/s at batch {bs}" if v else f"no decode time at batch {bs}" for bs, v in base_tok_s.items()
    )
    setting = (
        f"{args.model}{heads_desc}, {num_layers} layers: {len(prompts)} held-out prompts of {args.prompt_len} tokens, "
        f"{n_new} new tokens; speedup = decode speed / plain greedy generate in the same run (median of "
        f"{args.repeats}; generate: {base_desc}"
        + f"); {torch.get_num_threads()} thread(s)"
    )  # fmt: skip
    tables, mds = [], []
    for title, part_rows, cols in (
        ("self-speculative decoding (greedy)", spec_rows, spec_cols),
        ("SkipDecode", skip_rows, skip_cols),
    ):
        if part_rows:
            tables.append(format_table(part_rows, columns=cols, title=f"{title}: {setting}"))
            mds.append(f"{title}: {setting}\n\n{markdown_table(part_rows, cols)}\n")
    text = "\n\n".join(tables)
    print(text)
    write_atomic(out / "spec_table.txt", text + "\n")
    write_atomic(out / "spec_table.md", "\n".join(mds))
    if args.reference:
        report["reference"] = {
            "model": args.reference,
            "generate_vs_reference": {k: v for k, v in results["generate"].items() if k.startswith("ref_")},
            "reference_speedup": {k: v for k, v in results[REFERENCE].items() if "speedup" in k or "tok_s" in k},
        }
    report = {
        "speculative": spec_rows,
        "skipdecode_rows": skip_rows,
        **report,
        "baseline_decode_tok_s": base_tok_s,
        "num_layers": num_layers,
        "heads": None if args.no_speculative else heads.config.to_dict(),
        "machine": machine_info().to_dict(),
        "args": vars(args),
        "wall_seconds": time.perf_counter() - t_start,
    }
    write_atomic(out / "spec_bench.json", json.dumps(to_jsonable(report), indent=2) + "\n")
    print(f"wrote {out}/spec_bench.json, spec_table.txt/.md in {report['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
