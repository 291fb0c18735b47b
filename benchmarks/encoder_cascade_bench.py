"""The encoder cascade on MiniLM (issue 17): a pruned, healed classifier first, the full one for the messages it is
unsure of, its threshold certified by Learn-then-Test on the accuracy drop; accuracy and wall-clock beside the full
classifier, batch 1 and 32, in one run on one CPU thread.

    OMP_NUM_THREADS=1 python benchmarks/encoder_cascade_bench.py --json benchmarks/encoder_cascade.json

The big classifier: all-MiniLM-L6-v2 + its classification head fine-tuned one epoch on 1,536 SpamAssassin training
messages (DeeBERT's stage 1 through `train_exits`, as RESULTS sections 2 and 6.2). The little ones: the big one with
--n-remove of its 6 layers removed by --scorer and healed by the same one-epoch fine-tuning (6.2's heal). Splits as
there (60/20/20, seed 0). Learn-then-Test (`calibrate_encoder_cascade`, exact binomial, fixed-sequence) on the
calibration split: the expected accuracy drop against the big classifier <= --delta with probability >= 1 -
--epsilon. Test split: accuracy, the share of messages the big classifier decided, agreement with it. Speed: the
first --speed-messages test messages at each batch size, whole batches (tokenized beforehand), the big classifier
alone vs the cascade (`encoder_cascade`: the little model on the batch, the big one on its unsure rows as one smaller
batch), --repeats rounds interleaved after a warm-up; speedup = median over rounds of big seconds / cascade seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from heal_encoder import accuracy, fine_tune, fine_tuned_classifier

from depthprune.bench.generation import interleaved_seconds, speed_ratios
from depthprune.bench.speed import machine_info
from depthprune.data import token_blocks
from depthprune.exits.data import tokenize_batches
from depthprune.generation.cascade import calibrate_encoder_cascade, collect_classifier_records, encoder_cascade
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan, layer_sizes
from depthprune.static.scorers import get_scorer

ROOT = Path(__file__).resolve().parents[1]


def batches_of(tokenizer, data, size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    return tokenize_batches(tokenizer, data, size, max_length)


def timer(batches: list[dict[str, torch.Tensor]], fn):
    """A callable that runs `fn` on every batch and returns the seconds it took."""

    def call() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for x in batches:
                fn(x)
        return time.perf_counter() - start

    return call


def classify(model):
    return lambda x: model(input_ids=x["input_ids"], attention_mask=x["attention_mask"])


def cascade_of(big, little, threshold: float):
    return lambda x: encoder_cascade(big, little, x["input_ids"], x["attention_mask"], threshold=threshold)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "spam-assassin.jsonl"))
    p.add_argument("--limit-train", type=int, default=1536)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--n-remove", nargs="+", type=int, default=[3, 4])
    p.add_argument("--scorer", default="block_influence")
    p.add_argument("--delta", type=float, default=0.01, help="the accuracy drop Learn-then-Test certifies")
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--speed-messages", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts, train, tokenizer, big, seconds = fine_tuned_classifier(args)
    calibration = batches_of(tokenizer, parts.calibration, 32, args.max_length)
    test = batches_of(tokenizer, parts.test, 32, args.max_length)
    result: dict = {
        "model": "minilm", "data": "spam-assassin", "machine": machine_info().to_dict(), "threads": args.threads,
        "train_messages": len(train), "calibration_messages": len(parts.calibration), "test_messages": len(parts.test),
        "delta": args.delta, "epsilon": args.epsilon, "big_fine_tune_seconds": seconds,
        "big": {"layers": 6, "accuracy": accuracy(big, test)}, "rows": [],
    }  # fmt: skip
    print(f"big: accuracy {result['big']['accuracy']:.4f} (fine-tuned in {seconds:.0f} s)", flush=True)
    blocks = list(token_blocks(tokenizer, "\n\n".join(parts.calibration.texts), args.max_length, 64).split(8))
    sizes = layer_sizes(big)
    stack = list(sizes)[-1]
    first = parts.test.subset(range(min(args.speed_messages, len(parts.test))))
    speed_set = {b: batches_of(tokenizer, first, b, args.max_length) for b in args.batch_sizes}
    for n in args.n_remove:
        remove = get_scorer(args.scorer)(big, blocks, n_remove=n, stack=stack).remove
        plan = LayerPlan.drop(sizes, {stack: remove})
        little = apply_plan(big, plan)
        torch.manual_seed(0)
        heal_seconds = fine_tune(little, tokenizer, train, args)
        little.eval()
        cal = calibrate_encoder_cascade(
            collect_classifier_records(big, little, calibration), delta=args.delta, epsilon=args.epsilon
        )
        threshold = 1.0 if cal.threshold is None else cal.threshold
        records = collect_classifier_records(big, little, test)
        pred, unsure = records.predict(threshold)
        reference = records.big.argmax(-1)
        row = {
            "n_remove": n, "plan": plan.to_text(), "removed": sorted(remove), "little_layers": 6 - n,
            "heal_seconds": heal_seconds, "little_accuracy": accuracy(little, test), "threshold": threshold,
            "certified": cal.threshold is not None, "guarantee": cal.guarantee(), "ltt": cal.table,
            "cascade_accuracy": float((pred == records.labels).float().mean()),
            "big_share": float(unsure.float().mean()), "agreement": float((pred == reference).float().mean()),
            "speed": {},
        }  # fmt: skip
        print(
            f"{n} removed {sorted(remove)}: little {row['little_accuracy']:.4f}, cascade at {threshold:g} "
            f"{row['cascade_accuracy']:.4f} (big decides {row['big_share']:.1%}); {cal.guarantee()}", flush=True
        )  # fmt: skip
        for b, batches in speed_set.items():
            runs = {
                "big": timer(batches, classify(big)),
                "cascade": timer(batches, cascade_of(big, little, threshold)),
                "little": timer(batches, classify(little)),
            }
            times = interleaved_seconds(runs, args.repeats, warmup=1, label=f"b{b} n_remove {n}")
            ratios = speed_ratios(times, "big", sum(len(x["labels"]) for x in batches))
            row["speed"][str(b)] = {k: {"speedup": v["ratio"], "messages_per_s": v["tok_s"]} for k, v in ratios.items()}
            print(f"  b{b}: cascade {ratios['cascade']['ratio']:.2f}x, little alone {ratios['little']['ratio']:.2f}x")
        result["rows"].append(row)
        if args.json:
            tmp = Path(f"{args.json}.tmp")
            tmp.write_text(json.dumps(result, indent=2))
            tmp.replace(args.json)
    return result


if __name__ == "__main__":
    main()
