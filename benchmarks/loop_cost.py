"""The early-exit decoding loop's own cost: early exit at full depth (a criterion that never fires) against plain
greedy `generate`, token-identical, timed side by side (issue 17's target: >= 0.97x at batch 1 and 8).

The loop (`depthprune.generation.generate.early_exit_generate`) runs each decoder layer itself, with the arguments the
model's own forward gives it (`runner.capture_stack` once per token), through a row view of the KV cache
(`kv.RowView`), asking the criterion at every exit layer. With a criterion that never fires every token runs all
layers, so whatever it costs beyond `generate` is the loop's bookkeeping:

- `never (fixed)`: exits after --exit-layers, criterion `fixed:1000` (a constant decision: no head, no arithmetic);
- `never (saturation)`: the same exits asking CALM's saturation at threshold 1.0 (a cosine per exit and row: the
  cheapest real decision; it fires only on an exactly unchanged state, which never happens here).

Every round runs plain `generate` of --max-new-tokens, plain `generate` of one token (the prompt's forward and the
first token: "prefill"), and each loop once, in a rotating order (`bench.generation.interleaved_seconds`); decode time
= a call's seconds minus the same round's prefill; ratio = the median over rounds of plain's decode time / the
loop's (> 1: faster). Prompts: equal-length held-out Moby-Dick blocks (chapter 110 on), so batches need no padding.

    python benchmarks/loop_cost.py --threads 1 --repeats 7 --json benchmarks/loop_cost.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from depthprune.bench.generation import (
    add_timing_arguments,
    check_timing_arguments,
    interleaved_seconds,
    plain_greedy,
    speed_ratios,
)
from depthprune.bench.report import format_table, write_json
from depthprune.data import heldout_text, token_blocks
from depthprune.exits.lm_heads import DecoderExitConfig, DecoderExitHeads
from depthprune.generation.generate import early_exit_generate
from depthprune.io import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.97
CRITERIA = {"never (fixed)": "fixed:1000", "never (saturation)": "saturation:1.0"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--text", default=str(ROOT / ".." / "shared" / "data" / "moby-dick.txt"))
    p.add_argument("--exit-layers", type=int, nargs="+", default=[15, 23])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    add_timing_arguments(p)
    args = p.parse_args(argv)
    check_timing_arguments(p, args)
    torch.set_num_threads(args.threads)

    model = load_model(args.model, task="causal-lm").eval()
    tokenizer = load_tokenizer(args.model)
    cfg = model.config
    heads = DecoderExitHeads(
        DecoderExitConfig(cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, args.exit_layers),
        model,
    ).eval()  # never read: no criterion fires
    prompts = token_blocks(tokenizer, heldout_text(args.text), args.prompt_len, args.prompts)
    n = args.max_new_tokens
    never_stop = ()  # no end-of-sequence: every row generates n tokens, as plain generate below

    def plain(ids, tokens):
        return plain_greedy(model, ids, torch.ones_like(ids), tokens, never_stop, pad_token_id=0)

    def loop(ids, criterion, tokens):
        with torch.no_grad():
            return early_exit_generate(
                model, heads, ids, criterion=criterion, max_new_tokens=tokens, eos_token_id=never_stop
            ).sequences

    rows, report = [], {"args": vars(args), "batches": {}}
    for bs in args.batch_sizes:
        ids = prompts[:bs]
        reference = plain(ids, n)[:, args.prompt_len :]
        identical = {}
        for name, crit in CRITERIA.items():
            out = loop(ids, crit, n)[:, args.prompt_len :]
            identical[name] = bool(torch.equal(out, reference))

        def timed(fn):
            def run():
                start = time.perf_counter()
                fn()
                return time.perf_counter() - start

            return run

        runs = {"plain": timed(lambda ids=ids: plain(ids, n)), "prefill": timed(lambda ids=ids: plain(ids, 1))}
        for name, crit in CRITERIA.items():
            runs[name] = timed(lambda crit=crit, ids=ids: loop(ids, crit, n))
        warm = {"plain": lambda ids=ids: plain(ids, 4)}
        warm.update({k: (lambda c=c, ids=ids: loop(ids, c, 4)) for k, c in CRITERIA.items()})
        times = interleaved_seconds(runs, args.repeats, warmup=args.warmup, warmup_runs=warm, label=f"batch {bs}")
        prefill = times.pop("prefill")
        decode = {k: [t - p0 for t, p0 in zip(v, prefill, strict=True)] for k, v in times.items()}
        ratios = speed_ratios(decode, "plain", bs * (n - 1))
        whole = speed_ratios(times, "plain", bs * n)
        report["batches"][bs] = {"prefill_s": prefill, "decode": ratios, "whole": whole, "identical": identical}
        for name in ["plain", *CRITERIA]:
            rows.append(
                {
                    "batch": bs,
                    "decoder": name,
                    "decode tok/s": ratios[name]["tok_s"],
                    "decode ratio": ratios[name]["ratio"],
                    "whole-call ratio": whole[name]["ratio"],
                    "identical": identical.get(name, True),
                    "target met": None if name == "plain" else (ratios[name]["ratio"] or 0) >= TARGET,
                }
            )
    print(format_table(rows, title=f"early exit at full depth vs plain generate (target >= {TARGET}x)"))
    if args.json:
        write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
