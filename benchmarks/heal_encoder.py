"""Static pruning of an encoder classifier, unhealed and healed: all-MiniLM-L6-v2 fine-tuned on SpamAssassin, 2 and 3
of its 6 layers removed by each scorer, test accuracy before and after healing, beside the untouched classifier, in
one run on one CPU thread.

    python benchmarks/heal_encoder.py --json benchmarks/heal_encoder.json

The classifier: MiniLM + its classification head fine-tuned for one epoch on 1,536 training messages (the stage 1 of
DeeBERT's two-stage recipe through `depthprune.exits.train.train_exits`, as in RESULTS section 2). Splits as there
(60/20/20, seed 0): scorers see 128-token blocks of the calibration split's text (no labels); accuracy is on the
1,209 test messages. Healing: the linear fold has no exact form for post-norm BERT blocks (refused, see fold.py), so
the pruned classifier is healed by the same task fine-tuning the untouched one had (one epoch on the same 1,536
messages): what a user with labelled data would do, and the encoder counterpart of ShortGPT's fine-tuning heal.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import depthprune
from depthprune.data import token_blocks
from depthprune.exits.data import load_data, split, tokenize_batches
from depthprune.exits.heads import ExitHeads
from depthprune.exits.train.trainer import train_exits
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan, layer_sizes
from depthprune.static.scorers import get_scorer

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def accuracy(model, batches) -> float:
    model.eval()
    right = total = 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        right += int((logits.argmax(-1) == b["labels"]).sum())
        total += len(b["labels"])
    return right / total


def fine_tune(model, tokenizer, train, args) -> float:
    """One epoch of stage 1 (backbone + final head) on `train`, in place; the seconds it took."""
    heads = ExitHeads.for_model(model, layers=[0])
    start = time.perf_counter()
    train_exits(
        model, heads, train, tokenizer=tokenizer, recipe="two_stage", epochs=[args.epochs, 0], lr=[args.lr, 1e-3],
        batch_size=16, max_length=args.max_length, seed=0, progress=False,
    )  # fmt: skip
    return time.perf_counter() - start


def minilm_classifier(names):
    """The embedded MiniLM with a fresh classification head over the label `names` (in their order)."""
    return depthprune.load_model(
        "minilm", task="seq-cls", num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )  # fmt: skip


def fine_tuned_classifier(args):
    """(splits, training subset, tokenizer, MiniLM fine-tuned on it in eval mode, seconds it took): the classifier
    sections 2 and 6.2 measure, from --data, --limit-train, --epochs, --lr, --max-length."""
    data = load_data(args.data, progress=False)
    parts = split(data, 0.6, 0.2, seed=0)
    train = split(parts.train, args.limit_train, 0, seed=0).train
    names = data.label_names
    tokenizer = depthprune.load_tokenizer("minilm")
    model = minilm_classifier(names)
    torch.manual_seed(0)
    seconds = fine_tune(model, tokenizer, train, args)
    return parts, train, tokenizer, model.eval(), seconds


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "spam-assassin.jsonl"))
    p.add_argument("--limit-train", type=int, default=1536)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--n-remove", nargs="*", type=int, default=[2, 3])
    p.add_argument("--scorers", nargs="+", default=["block_influence", "angular"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--extra-epoch-baseline", action="store_true",
        help="also give the untouched classifier the healing's extra epoch (the fair baseline for healed accuracy)",
    )  # fmt: skip
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts, train, tokenizer, model, base_seconds = fine_tuned_classifier(args)
    test = tokenize_batches(tokenizer, parts.test, 32, args.max_length)
    calib = list(token_blocks(tokenizer, "\n\n".join(parts.calibration.texts), args.max_length, 64).split(8))
    rows = [{"n_remove": 0, "scorer": "", "plan": "", "unhealed": accuracy(model, test), "healed": None}]
    print(f"untouched: accuracy {rows[0]['unhealed']:.4f} (fine-tuned in {base_seconds:.0f} s)", flush=True)
    sizes = layer_sizes(model)
    stack = list(sizes)[-1]
    if args.extra_epoch_baseline:
        again = copy.deepcopy(model)
        torch.manual_seed(0)
        seconds = fine_tune(again, tokenizer, train, args)
        rows[0]["healed"] = accuracy(again, test)
        rows[0]["heal_seconds"] = seconds
        print(f"untouched + the extra epoch: accuracy {rows[0]['healed']:.4f}", flush=True)
        del again
    for n in args.n_remove:
        for scorer in args.scorers:
            remove = get_scorer(scorer)(model, calib, n_remove=n, stack=stack).remove
            plan = LayerPlan.drop(sizes, {stack: remove})
            pruned = apply_plan(model, plan)
            row = {"n_remove": n, "scorer": scorer, "plan": plan.to_text(), "removed": sorted(remove)}
            row["unhealed"] = accuracy(pruned, test)
            torch.manual_seed(0)
            row["heal_seconds"] = fine_tune(pruned, tokenizer, train, args)
            row["healed"] = accuracy(pruned, test)
            rows.append(row)
            print(f"{n} removed by {scorer} {sorted(remove)}: {row['unhealed']:.4f} -> healed {row['healed']:.4f}")
    result = {
        "model": "minilm",
        "data": "spam-assassin",
        "train_messages": len(train),
        "test_messages": len(parts.test),
        "threads": args.threads,
        "base_fine_tune_seconds": base_seconds,
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
