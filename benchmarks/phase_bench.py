"""Which generation phase tolerates fewer layers (issue 13, decoder-only part): SmolLM2-135M with different layer
plans for the prompt (prefill) and the generated tokens (decode), one run.

For each depth (default 26, 22, 18 of 30) the plan is block_influence's (ShortGPT) on calibration text (Moby-Dick before
chapter 110); modes (depthprune.generation.phases):
- deep prefill / shallow decode: the prompt runs all layers, generated tokens the plan;
- shallow prefill / deep decode: the prompt runs the plan, generated tokens all layers; the prompt's entries in the
  skipped layers by kv=propagate (CALM) or kv=recompute (EE-LLM, exact, deferred to the first decode step);
- uniform: both phases run the plan (static pruning);
and the untouched model (identity plans, the same loop). Held-out prompts (from chapter 110 on): 64 prompt tokens +
the text's own next 32 tokens. Measured: (a) greedy token agreement of 32-token continuations with plain generate's;
(b) teacher-forced perplexity of the text's own continuation (prompt by the prefill plan, continuation scored by the
decode plan reading that cache; the first token by the prefill); (c) time to first token and per-token decode time at
batch 1 and 8 (interleaved rounds, one warm-up; times are medians, speed-ups the median over rounds of the untouched
model's time / the mode's in the same round; the decode time is the mean over the 31 steps after the first
token, so recompute's deferred prompt work counts).

    nice -n 10 python benchmarks/phase_bench.py --part quality --json benchmarks/phase_bench.json
    nice -n 10 python benchmarks/phase_bench.py --part speed --speed-depths 26 22 18 \
        --json benchmarks/phase_bench_speed.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

import depthprune
from depthprune.bench.generation import interleaved_seconds
from depthprune.data import calibration_text, heldout_text, token_blocks
from depthprune.fsutil import atomic_file
from depthprune.generation.calibrate import greedy_continuations, prompt_blocks, token_consistency
from depthprune.generation.phases import phase_generate, phase_logits
from depthprune.plan import LayerPlan
from depthprune.static.scorers import get_scorer

ROOT = Path(__file__).resolve().parents[1]


def modes(plan: str | None) -> dict[str, dict]:
    if plan is None:
        return {"untouched": {}}
    return {
        "deep prefill / shallow decode": {"decode_plan": plan},
        "shallow prefill / deep decode, propagate": {"prefill_plan": plan, "kv": "propagate"},
        "shallow prefill / deep decode, recompute": {"prefill_plan": plan, "kv": "recompute"},
        "uniform (static)": {"prefill_plan": plan, "decode_plan": plan},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=str(ROOT / ".." / "shared" / "data" / "moby-dick.txt"))
    p.add_argument("--depths", nargs="+", type=int, default=[26, 22, 18])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per batch size (default 3)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--speed-depths", nargs="+", type=int, default=[18], help="depths timed (default 18)")
    p.add_argument("--part", choices=("quality", "speed", "all"), default="all")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model = depthprune.load_model("smollm2").eval()
    tok = depthprune.load_tokenizer("smollm2")
    n_layers = model.config.num_hidden_layers
    text = args.text if Path(args.text).is_file() else None
    batches = list(token_blocks(tok, calibration_text(text), 128, 16).split(4))
    scores = get_scorer("block_influence")(model, batches, n_remove=n_layers - min(args.depths), stack="decoder")
    order = sorted(range(n_layers), key=lambda i: scores.scores[i])  # least important first
    plans = {d: LayerPlan.drop({"*": n_layers}, sorted(order[: n_layers - d])).to_text() for d in args.depths}
    blocks = prompt_blocks(tok, heldout_text(text), args.prompts, args.prompt_len + args.new_tokens)
    prompts, truth = blocks[:, : args.prompt_len], blocks[:, args.prompt_len :]
    eos = ()  # every row generates new_tokens: equal work for every mode
    refs = greedy_continuations(model, prompts, args.new_tokens, eos_token_id=eos) if args.part != "speed" else []
    configs: dict[str, dict] = {"untouched": {"layers": n_layers, "settings": {}}}
    for d in args.depths:
        for name, settings in modes(plans[d]).items():
            configs[f"{d}: {name}"] = {"layers": d, "mode": name, "settings": settings}
    result: dict = {
        "settings": vars(args), "num_layers": n_layers, "plans": plans, "scores": list(scores.scores),
        "load_start": os.getloadavg(), "rows": [], "speed": [],
    }  # fmt: skip

    def save() -> None:
        if args.json:
            with atomic_file(args.json) as tmp:
                Path(tmp).write_text(json.dumps(result, indent=1))

    for key, cfg in configs.items() if args.part != "speed" else ():
        s = cfg["settings"]
        out = phase_generate(model, prompts, max_new_tokens=args.new_tokens, eos_token_id=eos, **s)
        conts = out.sequences[:, args.prompt_len :].tolist()
        agree = sum(token_consistency(c, r) for c, r in zip(conts, refs, strict=True)) / len(refs)
        prefix = statistics.mean(next((i for i, (a, b) in enumerate(zip(c, r, strict=True)) if a != b), len(r))
                                 for c, r in zip(conts, refs, strict=True))  # fmt: skip
        logits = phase_logits(model, prompts, truth, **s)  # [n, new, vocab]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), truth.flatten())
        row = {"config": key, "layers": cfg["layers"], "mode": cfg.get("mode", "untouched"),
               "plans": out.plans.to_dict(), "greedy_agreement": agree, "agreeing_prefix": prefix,
               "first_token_agreement": sum(c[0] == r[0] for c, r in zip(conts, refs, strict=True)) / len(refs),
               "ppl": math.exp(float(nll))}  # fmt: skip
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()
    timed = {k: c for k, c in configs.items() if c["layers"] in (n_layers, *args.speed_depths)}
    for batch in args.batch_sizes if args.part != "quality" else ():
        ids = prompts[:batch]
        runs, warm, parts = {}, {}, {}
        for key, cfg in timed.items():
            s = cfg["settings"]

            def run(s=s, key=key, ids=ids, parts=parts):
                out = phase_generate(model, ids, max_new_tokens=args.new_tokens, eos_token_id=eos, timing=True, **s)
                parts.setdefault(key, []).append((out.first_token_s, statistics.mean(out.decode_s)))
                return out.first_token_s + sum(out.decode_s)

            runs[key] = run
            warm[key] = lambda s=s, ids=ids: phase_generate(model, ids, max_new_tokens=4, eos_token_id=eos, **s)
        seconds = interleaved_seconds(runs, args.repeats, warmup=1, warmup_runs=warm, label=f"batch {batch}")
        entry = {"batch": batch, "new_tokens": args.new_tokens, "load": os.getloadavg(), "configs": {}}
        for key in timed:
            ttft = statistics.median(t for t, _ in parts[key])
            per_tok = statistics.median(d for _, d in parts[key])
            pairs = list(zip(parts["untouched"], parts[key], strict=True))  # same round: the same load
            entry["configs"][key] = {
                "ttft_ms": 1e3 * ttft, "decode_ms_per_token": 1e3 * per_tok,
                "ttft_speedup": statistics.median(b[0] / t[0] for b, t in pairs),
                "decode_speedup": statistics.median(b[1] / t[1] for b, t in pairs),
                "total_s": seconds[key], "rounds": parts[key],
            }  # fmt: skip
        result["speed"].append(entry)
        shown = ("ttft_ms", "decode_ms_per_token", "ttft_speedup", "decode_speedup")
        summary = {k: {kk: round(v[kk], 3) for kk in shown} for k, v in entry["configs"].items()}
        print(json.dumps({"batch": batch, **summary}), flush=True)
        save()
    result["seconds"] = time.perf_counter() - began
    result["load_end"] = os.getloadavg()
    save()
    return result


if __name__ == "__main__":
    main()
