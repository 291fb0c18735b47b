"""Starting point of the shallow-decoder work (issue 13): Whisper tiny.en (converted, benchmarks/whisper_ct2_to_hf.py)
on the espeak-ng held-out set (benchmarks/speech_data.py), untouched and with plans over its stacks applied by
`depthprune.static.apply.apply_plan`, unhealed. For each plan: WER against the texts and against the full model's
transcripts (the pseudo-labels), generated tokens, and wall-clock time split into encoder and decoding (end-to-end
`generate` minus a separate timed encoder pass on the same batch), at each batch size.

    python benchmarks/whisper_shallow.py --n 16 --batch 1 8 --plans full decoder=0,3 \
        --json benchmarks/whisper_shallow.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speech_data import log_mel, utterances, wer  # noqa: E402
from whisper_ct2_to_hf import load_whisper  # noqa: E402


def run(model, processor, features: np.ndarray, batch: int, max_new_tokens: int, fixed: bool = False) -> dict:
    texts, enc_s, e2e_s, tokens, capped, steps = [], 0.0, 0.0, 0, 0, 0
    with torch.inference_mode():
        for i in range(0, len(features), batch):
            x = torch.from_numpy(features[i : i + batch])
            t0 = time.perf_counter()
            model.get_encoder()(x)
            t1 = time.perf_counter()
            budget = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens if fixed else 0}
            ids = model.generate(x, do_sample=False, num_beams=1, **budget)
            t2 = time.perf_counter()
            enc_s, e2e_s = enc_s + (t1 - t0), e2e_s + (t2 - t1)
            lengths = (ids != model.generation_config.pad_token_id).sum(dim=1)
            tokens += int(lengths.sum())
            steps += ids.shape[1]  # decoder steps of this batch (its longest row)
            capped += int((lengths >= max_new_tokens - 3).sum())  # ran into the cap (a loop), not an end of text
            texts += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    return {
        "texts": texts,
        "encoder_s": enc_s,
        "end_to_end_s": e2e_s,
        "decode_s": e2e_s - enc_s,
        "tokens": tokens,
        "capped": capped,
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--plans", nargs="+", default=["full", "decoder=0,3"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--max-new-tokens", type=int, default=96, help="cap (the full model needs under 50 on these sentences)"
    )
    parser.add_argument(
        "--fixed-steps",
        action="store_true",
        help="every row decodes exactly --max-new-tokens steps (EOS suppressed): "
        "per-step cost without the confound of different output lengths; WERs are then meaningless",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from depthprune.static.apply import apply_plan

    full, processor = load_whisper()
    utts = utterances(args.n)
    features = log_mel(processor, utts)
    refs = [u.text for u in utts]
    rows, pseudo = [], None
    run(full, processor, features[:1], 1, args.max_new_tokens)  # warm-up: first calls pay for lazy set-up
    for plan in args.plans:
        model = full if plan == "full" else apply_plan(full, plan)
        for batch in args.batch:
            r = run(model, processor, features, batch, args.max_new_tokens, args.fixed_steps)
            if plan == "full" and pseudo is None:
                pseudo = r["texts"]
            row = {
                "plan": plan,
                "batch": batch,
                "wer_text": round(wer(refs, r["texts"]), 2),
                "tokens": r["tokens"],
                "capped": r["capped"],
                "decode_ms_per_step": round(1000 * r["decode_s"] / max(r["steps"], 1), 2),
                "steps": r["steps"],
                **{k: round(v, 2) for k, v in r.items() if k.endswith("_s")},
                "texts": r["texts"],
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "texts"}), flush=True)
    for row in rows:  # against the full model's transcripts (wherever it ran in the order) and its speed
        row["wer_full"] = round(wer(pseudo, row["texts"]), 2) if pseudo is not None else None
    for row in rows:  # speedups against the full model at the same batch size
        base = next(r for r in rows if r["plan"] == "full" and r["batch"] == row["batch"])
        row["end_to_end_speedup"] = round(base["end_to_end_s"] / row["end_to_end_s"], 2)
        row["decode_speedup"] = round(base["decode_s"] / row["decode_s"], 2)
    report = {
        "n": len(utts),
        "audio_seconds": round(sum(u.seconds for u in utts), 1),
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "fixed_steps": args.fixed_steps,
        "references": refs,
        "rows": rows,
    }
    cols = ("plan", "batch", "wer_text", "wer_full", "tokens", "steps", "encoder_s", "decode_s")
    cols += ("decode_ms_per_step", "end_to_end_s", "end_to_end_speedup", "decode_speedup")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    if args.json:
        from depthprune.fsutil import write_atomic

        write_atomic(args.json, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
