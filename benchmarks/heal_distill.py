"""Trained healing on SmolLM2-135M: selection + healing pipelines at one token budget, side by side with the untouched
and the unhealed model, in one run on one CPU thread.

A pipeline is `label=SELECTION:METHOD`: SELECTION is a scorer (`block_influence` = ShortGPT's selection) or an
explicit removal (`5,13-18,26`), METHOD a healer or a chain (`distill`, `fold+distill`). Every trained stage gets the
same `--max-tokens` training tokens. For each pipeline: held-out perplexity unhealed and after each stage, the
stages' wall time, greedy continuations of held-out prompts with their repeated-4-gram share, and the decode speed
of the healed model against the unhealed one (same layer count: healing must not change it).

    python benchmarks/heal_distill.py --max-tokens 65536 \\
        --pipeline shortgpt+lora=block_influence:distill --pipeline ours=5,13-18,26:fold+distill \\
        --json benchmarks/heal_distill.json

Calibration: Moby-Dick before chapter 110 (96 x 256 tokens, as benchmarks/heal_bench.py); held-out: from chapter
110 on (16 x 256 tokens for perplexity, the first 32 tokens of 8 further blocks as prompts).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from heal_bench import book_data

import depthprune
from depthprune.bench.fluency import fluency, prompt_ids
from depthprune.bench.perplexity import perplexity
from depthprune.bench.speed import compare_speed, machine_info
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan, layer_sizes
from depthprune.static.heal import RECORD_KEY, get_healer, stage_options
from depthprune.static.scorers import list_scorers

ROOT = Path(__file__).resolve().parents[1]
TRAINED = {"distill"}  # stages that take a token budget


def parse_pipeline(text: str) -> tuple[str, str, str]:
    label, eq, rest = text.partition("=")
    selection, colon, method = rest.rpartition(":")
    if not eq or not colon or not selection or not method:
        raise SystemExit(f"--pipeline {text!r}: write label=SELECTION:METHOD, e.g. ours=5,13-18,26:fold+distill")
    return label, selection, method


def removal(model, batches, selection: str, n_remove: int, stack: str) -> list[int]:
    if selection in list_scorers():
        return depthprune.static.scorers.get_scorer(selection)(model, batches, n_remove=n_remove, stack=stack).remove
    return list(LayerPlan.parse(selection).stacks.values())[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", action="append", required=True, help="label=SELECTION:METHOD (repeatable)")
    p.add_argument("--max-tokens", type=int, default=65536, help="training tokens per trained stage")
    p.add_argument("--remove", type=int, default=8, help="layers a scorer removes")
    p.add_argument("--calib-blocks", type=int, default=96)
    p.add_argument("--heldout-blocks", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank of the trained stages")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text", default=str(ROOT / ".." / "shared" / "data" / "moby-dick.txt"), help="the book")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    pipelines = [parse_pipeline(t) for t in args.pipeline]
    for _, _, method in pipelines:
        stage_options(method, {})
    torch.set_num_threads(args.threads)
    model, tokenizer = depthprune.load_model("smollm2").eval(), depthprune.load_tokenizer("smollm2")
    batches, held = book_data(tokenizer, args.text, args.seq_len, args.calib_blocks, args.heldout_blocks + args.prompts)
    heldout, prompts = held[: args.heldout_blocks], prompt_ids(tokenizer, held[args.heldout_blocks :])
    sizes = layer_sizes(model)
    stack = list(sizes)[-1]

    def measure(m) -> dict:
        flu = fluency(m, tokenizer, prompts, args.new_tokens)
        return {"ppl": perplexity(m, heldout), "repeat4": flu.mean_share, "continuations": flu.continuations[:3]}

    untouched = measure(model)
    print(f"untouched: ppl {untouched['ppl']:.2f}, repeated 4-grams {untouched['repeat4']:.3f}", flush=True)
    rows = []
    for label, selection, method in pipelines:
        remove = removal(model, batches, selection, args.remove, stack)
        plan = LayerPlan.drop(sizes, {stack: remove})
        pruned = apply_plan(model, plan)
        row = {"pipeline": label, "selection": selection, "method": method, "plan": plan.to_text()}
        row["unhealed"] = measure(pruned)
        print(f"{label}: removed {sorted(remove)}, unhealed ppl {row['unhealed']['ppl']:.2f}", flush=True)
        healed, row["stages"] = None, []
        for name, _ in stage_options(method, {}):
            opts = {"max_tokens": args.max_tokens, "epochs": 100, "lr": args.lr, "lora_rank": args.lora_rank}
            opts = opts if name in TRAINED else {}
            if healed is not None:
                opts["start"] = healed
            start = time.perf_counter()
            healed = get_healer(name)(model, plan, batches, **opts)
            seconds = time.perf_counter() - start
            stage = {"stage": name, "seconds": seconds, **measure(healed)}
            if name in TRAINED:
                stage["train_tokens"] = args.max_tokens
                # the loop's loss per pass over the calibration blocks (recorded in the healed config)
                stage["epoch_losses"] = (getattr(healed.config, RECORD_KEY, None) or {}).get("epoch_losses")
            row["stages"].append(stage)
            print(f"{label}: after {name} ppl {stage['ppl']:.2f} ({seconds:.0f} s)", flush=True)
        speed = compare_speed(
            {"unhealed": pruned, "healed": healed}, tokenizer, batch_sizes=(1, 8), prompt_len=128, new_tokens=32,
            repeats=3, baseline="unhealed", threads=args.threads,
        )  # fmt: skip
        row["decode_healed_over_unhealed"] = {str(b): speed.result("healed", b).decode_ratio for b in (1, 8)}
        print(f"{label}: decode healed/unhealed {row['decode_healed_over_unhealed']}", flush=True)
        rows.append(row)
        del pruned, healed
        write(args.json, untouched, rows, args, heldout)
    return write(args.json, untouched, rows, args, heldout)


def write(path, untouched, rows, args, heldout) -> dict:
    """The result so far (written after every pipeline, so a long run that is stopped keeps what it finished)."""
    result = {
        "model": "smollm2",
        "machine": machine_info().to_dict(),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "lr": args.lr,
        "lora_rank": args.lora_rank,
        "calibration_tokens": args.calib_blocks * args.seq_len,
        "heldout_tokens": int(heldout.numel()),
        "untouched": untouched,
        "rows": rows,
    }
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(path)
    return result


if __name__ == "__main__":
    main()
