"""Per-sample layer skipping vs early exit on MiniLM, at the same mean depth (issue 12): the 3-way SpamAssassin task
(easy ham / hard ham / spam, from each record's `group`), accuracy and wall-clock at batch 1 and 32 beside the
untouched classifier, in one run on one CPU thread.

    OMP_NUM_THREADS=1 python benchmarks/skip_encoder_bench.py --json benchmarks/skip_encoder_bench.json

The classifier and its exits: all-MiniLM-L6-v2 + a 3-way head fine-tuned one epoch (DeeBERT's stage 1), then exit
heads after layers 0-4 on the frozen backbone (stage 2, mean pooling: section 2's best recipe), both through
`train_exits` (recipe two_stage). Splits 60/20/20 stratified, seed 0; --limit-train messages of the train split.
For each target depth: `sample_linear` routers, initialised from the block_influence plan of that depth
(`--init static`) and trained with the backbone frozen (KL to the classifier + the depth term); their threshold set
by bisection on calibration messages so that the mean depth meets the target. Early exit at the same depth: the
max_prob threshold whose calibration mean depth is the nearest at or below the routers' measured test depth; also
the cheapest max_prob threshold within 0.5 points of the full classifier on the calibration split. Static pruning
(the same block_influence plan, unhealed: what the routers compute untrained, tests/test_skipping_init.py) beside.
Speed: the first --speed-messages test messages at each batch size, tokenized beforehand, interleaved rounds after a
warm-up; speedup = median of full seconds / entry seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from heal_encoder import accuracy, minilm_classifier

import depthprune
from depthprune.bench.generation import interleaved_seconds, speed_ratios
from depthprune.bench.speed import machine_info
from depthprune.exits.calibrate import check, collect_records
from depthprune.exits.criteria import make_criterion
from depthprune.exits.data import email_text, from_rows, split, tokenize_batches
from depthprune.exits.heads import ExitHeads
from depthprune.exits.inference import EarlyExitClassifier
from depthprune.exits.train.trainer import train_exits
from depthprune.fsutil import write_atomic
from depthprune.plan import LayerPlan
from depthprune.skipping.inference import RoutedClassifier
from depthprune.skipping.train import train_routers
from depthprune.static.apply import apply_plan, layer_sizes

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {"easy": "easy_ham", "hard": "hard_ham", "spam": "spam"}
MAX_PROB = [
    1.0,
    0.9999,
    0.999,
    0.995,
    0.99,
    0.98,
    0.97,
    0.95,
    0.93,
    0.9,
    0.85,
    0.8,
    0.75,
    0.7,
    0.6,
    0.5,
    0.45,
    0.4,
    0.35,
    0.0,
]


def three_way(path: str):
    """SpamAssassin as easy ham / hard ham / spam (the `group` field: easy-ham-1, hard-ham-1, spam-2 ...)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return from_rows([{"text": email_text(r["raw"]), "label": GROUPS[r["group"].split("-")[0]]} for r in rows])


def timer(batches, fn):
    def call() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for x in batches:
                fn(x["input_ids"], x["attention_mask"])
        return time.perf_counter() - start

    return call


def routed_accuracy(clf: RoutedClassifier, batches) -> tuple[float, float]:
    """(accuracy, mean executed layers) with real skipping."""
    right = total = 0
    layers = 0.0
    for b in batches:
        out = clf(b["input_ids"], b["attention_mask"])
        right += int((out.predictions == b["labels"]).sum())
        layers += float(out.executed.sum())
        total += len(b["labels"])
    return right / total, layers / total


def depth_threshold(model, routers, batches, target: float, steps: int = 7) -> float:
    """The router threshold whose mean depth on `batches` is the nearest at or above `target` (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        if routed_accuracy(RoutedClassifier(model, routers, mid), batches)[1] >= target:
            low = mid
        else:
            high = mid
    return low


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "spam-assassin.jsonl"))
    p.add_argument("--limit-train", type=int, default=1536)
    p.add_argument("--lr", type=float, default=1e-4, help="stage 1 (backbone + head) learning rate")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--targets", type=float, nargs="+", default=[3.0, 4.0])
    p.add_argument("--router-examples", type=int, default=768, help="training messages for the routers")
    p.add_argument("--router-lr", type=float, default=1e-2)
    p.add_argument("--router-epochs", type=int, default=1)
    p.add_argument("--depth-messages", type=int, default=256, help="calibration messages for the router threshold")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--speed-messages", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit-eval", type=int, default=None, help="first N calibration / test messages (smoke runs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    result: dict = {"settings": vars(args), "machine": machine_info().to_dict(), "rows": [], "speed": {}}

    def dump() -> None:
        if args.json:
            write_atomic(args.json, json.dumps(result, indent=1, default=float))

    data = three_way(args.data)
    parts = split(data, 0.6, 0.2, seed=0)
    train = split(parts.train, args.limit_train, 0, seed=0).train
    if args.limit_eval:
        n = args.limit_eval
        parts.calibration, parts.test = parts.calibration.subset(range(n)), parts.test.subset(range(n))
    names = data.label_names
    tok = depthprune.load_tokenizer("minilm")
    model = minilm_classifier(names)
    heads = ExitHeads.for_model(model)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    train_exits(
        model, heads, train, tokenizer=tok, recipe="two_stage", epochs=[1, 1], lr=[args.lr, 1e-3], batch_size=16,
        max_length=args.max_length, seed=0, progress=False,
    )  # fmt: skip
    model.eval(), heads.eval()
    result["train_seconds"] = time.perf_counter() - t0
    counts = {n: sum(1 for y in parts.test.labels if y == k) for k, n in enumerate(names)}
    result.update(labels=names, test_counts=counts, train_messages=len(train), test_messages=len(parts.test))
    cal_b = tokenize_batches(tok, parts.calibration, 32, args.max_length)
    test_b = tokenize_batches(tok, parts.test, 32, args.max_length)
    n_layers = layer_sizes(model)["encoder"]
    full_acc = accuracy(model, test_b)
    result["rows"].append({"method": "untouched", "layers": n_layers, "accuracy": full_acc})
    print(f"untouched: accuracy {full_acc:.4f} (trained in {result['train_seconds']:.0f} s), test {counts}", flush=True)
    dump()
    cal_rec, test_rec = collect_records(model, heads, cal_b), collect_records(model, heads, test_b)
    sweep = []
    for t in MAX_PROB:
        c, h = check(make_criterion("max_prob", t), cal_rec), check(make_criterion("max_prob", t), test_rec)
        sweep.append({"threshold": t, "cal_layers": c["mean_layers"], "cal_accuracy": c["accuracy"],
                      "layers": h["mean_layers"], "accuracy": h["accuracy"]})  # fmt: skip
    result["exit_sweep"] = sweep
    cal_full = check(make_criterion("max_prob", 1.0), cal_rec)["full_accuracy"]
    ok = [s for s in sweep if s["cal_accuracy"] >= cal_full - 0.005]
    best = min(ok, key=lambda s: s["cal_layers"]) if ok else sweep[0]
    result["rows"].append({"method": "early exit, cheapest within 0.5 pt (calibration)", **best})
    print(json.dumps(result["rows"][-1]), flush=True)
    configs = {"exit within 0.5": best["threshold"]}
    dump()

    enc = tok(train.texts[: args.router_examples], truncation=True, max_length=args.max_length, padding=True,
              return_tensors="pt")  # fmt: skip
    depth_b = cal_b[: max(1, args.depth_messages // 32)]
    routed, static = {}, {}
    for target in args.targets:
        t0 = time.perf_counter()
        res = train_routers(
            model, (enc["input_ids"], enc["attention_mask"]), target_layers=target, init="static",
            epochs=args.router_epochs, lr=args.router_lr, batch_size=16, progress=False, seed=0,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        threshold = depth_threshold(model, res.routers, depth_b, target)
        acc, depth = routed_accuracy(RoutedClassifier(model, res.routers, threshold), test_b)
        pruned = apply_plan(model, LayerPlan.drop({"encoder": n_layers}, list(res.init_removed)))
        static[target] = pruned
        routed[target] = (res.routers, threshold)
        st_acc = accuracy(pruned, test_b)
        ee = [s for s in sweep if s["cal_layers"] <= depth + 1e-9]
        ee = max(ee, key=lambda s: s["cal_layers"]) if ee else sweep[-1]
        configs[f"exit at {target:g}"] = ee["threshold"]
        rows = [
            {"method": f"routers {target:g} (static init, trained)", "layers": depth, "accuracy": acc,
             "threshold": threshold, "train_seconds": seconds, "removed_at_init": res.init_removed,
             "train_log": res.epoch_losses},
            {"method": f"static block_influence {target:g} (unhealed)", "layers": n_layers - len(res.init_removed),
             "accuracy": st_acc, "removed": res.init_removed},
            {"method": f"early exit at the routers' depth {target:g}", **ee},
        ]  # fmt: skip
        for row in rows:
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "train_log"}), flush=True)
        dump()

    first = parts.test.subset(range(min(args.speed_messages, len(parts.test))))
    for b in args.batch_sizes:
        batches = tokenize_batches(tok, first, b, args.max_length)
        runs = {"full": timer(batches, lambda i, m: model(input_ids=i, attention_mask=m))}
        for name, t in configs.items():
            clf = EarlyExitClassifier(model, heads, make_criterion("max_prob", t))
            runs[f"{name} (max_prob {t:g})"] = timer(batches, clf)
        for target, (r, t) in routed.items():
            runs[f"routers {target:g}"] = timer(batches, RoutedClassifier(model, r, t))
            runs[f"static {target:g}"] = timer(batches, lambda i, m, s=static[target]: s(input_ids=i, attention_mask=m))
        times = interleaved_seconds(runs, args.repeats, warmup=1, label=f"b{b}")
        ratios = speed_ratios(times, "full", len(first))
        result["speed"][str(b)] = {k: {"speedup": v["ratio"], "messages_per_s": v["tok_s"]} for k, v in ratios.items()}
        print(f"b{b}: " + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in ratios.items()), flush=True)
        dump()
    result["seconds"] = time.perf_counter() - began
    dump()
    return result


if __name__ == "__main__":
    main()
