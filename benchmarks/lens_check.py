"""How close each decoder exit gets to the full model on held-out text: logit lens vs least-squares tuned lens.

    OMP_NUM_THREADS=2 python benchmarks/lens_check.py --layers 5 9 13 17 21 25 28 --fit-blocks 64 \
        --out benchmarks/lens_check.json [--heads out/smollm2-lens]

Fits `lens` translators in closed form (`depthprune.exits.train.lm_exits.fit_lens`) on --fit-blocks blocks of --seq-len
tokens of the calibration part of the book, then measures on --eval-blocks held-out blocks (from chapter 110 on), per
exit layer: KL(full model || exit) and top-1 agreement with the full model's next token (teacher forcing: every
position sees the true prefix). The logit lens (the model's own final norm + LM head on the layer's state) is the
untrained baseline. --heads adds a trained heads folder, measured the same way. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from depthprune.bench.report import format_table, to_jsonable
from depthprune.bench.speed import machine_info
from depthprune.data import calibration_text, heldout_text, token_blocks
from depthprune.exits.lm_heads import DecoderExitHeads
from depthprune.exits.train.lm_exits import exit_agreement, exit_kl, fit_lens
from depthprune.fsutil import write_atomic
from depthprune.io import load_model, load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default="../shared/data/moby-dick.txt", help="the book (calibration part for fitting)")
    p.add_argument("--layers", type=int, nargs="+", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--fit-blocks", type=int, default=64)
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--heads", default=None, help="a trained decoder exit heads folder to measure too")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/lens_check.json")
    args = p.parse_args()
    if not Path(args.data).is_file():
        p.error(f"--data {args.data} is not a file; pass the book (e.g. ../shared/data/moby-dick.txt)")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, task="causal-lm").eval()
    tokenizer = load_tokenizer(args.model)
    fit_blocks = token_blocks(tokenizer, calibration_text(args.data), args.seq_len, args.fit_blocks)
    held = token_blocks(tokenizer, heldout_text(args.data), args.seq_len, args.eval_blocks)
    variants = {"logit_lens": DecoderExitHeads.logit_lens(model, args.layers)}
    lens = DecoderExitHeads.for_model(model, args.layers, "lens", dtype=torch.float32)
    t0 = time.perf_counter()
    residuals = fit_lens(model, lens, fit_blocks)
    fit_seconds = time.perf_counter() - t0
    variants["lstsq_lens"] = lens
    if args.heads:
        variants[Path(args.heads).name] = DecoderExitHeads.load(args.heads, model)
    rows = []
    for name, heads in variants.items():
        kl, agree = exit_kl(model, heads, held), exit_agreement(model, heads, held)
        for layer in heads.layers:
            rows.append({"exits": name, "layer": layer, "kl": kl[layer], "top1_agreement": agree[layer],
                         "fit_residual": residuals.get(layer) if name == "lstsq_lens" else None})  # fmt: skip
    title = (
        f"{args.model}: exits vs the full model on {len(held)} held-out blocks of {args.seq_len} tokens (lens fitted "
        f"on {len(fit_blocks)} calibration blocks in {fit_seconds:.0f} s, {torch.get_num_threads()} thread(s))"
    )
    print(format_table(rows, title=title))
    report = {"rows": rows, "fit_seconds": fit_seconds, "args": vars(args), "machine": machine_info().to_dict()}
    write_atomic(Path(args.out), json.dumps(to_jsonable(report), indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
