"""Healed shallow decoders (issue 13): Whisper tiny.en with plans over its decoder (or encoder) stack, healed by
distillation with the encoder frozen and cached (`depthprune.static.heal.distill_seq2seq`), on espeak-ng speech of
*calibration* text (Moby-Dick before chapter 110, four voices, three speeds), measured on speech of *held-out* text
(chapter 110 on): WER against the texts and against the full model's transcripts, and wall-clock encoder / decode /
end-to-end time at each batch size, interleaved rounds (every model once per round), medians over rounds, the full
model in the same run.

    python benchmarks/whisper_heal.py --cal 256 --epochs 6 --n 24 --batch 1 8 --rounds 3 \
        --plans decoder=0,3 decoder=0 decoder:block_influence:2 encoder=0,1,3 encoder=0,3 \
        --json benchmarks/whisper_heal.json

A plan `STACK:SCORER:K` keeps the K layers of STACK the scorer ranks highest (`depthprune.static.prune` on the
calibration speech with the full model's transcripts as decoder inputs). Healed models are saved under --models
(one folder each, with the processor; reused when present, so a stopped run goes on); the teacher's cache is saved
there too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speech_data import log_mel, utterances, wer  # noqa: E402
from whisper_ct2_to_hf import load_whisper  # noqa: E402
from whisper_shallow import run  # noqa: E402


def feature_batches(processor, utts, batch: int) -> list[dict[str, torch.Tensor]]:
    x = torch.from_numpy(log_mel(processor, utts))
    return [{"input_features": x[i : i + batch]} for i in range(0, len(x), batch)]


def scorer_plan(full, spec: str, batches, cache) -> str:
    """'decoder:block_influence:2' -> the plan text keeping the 2 decoder layers the scorer ranks highest."""
    from depthprune.static.prune import prune

    stack, scorer, keep = spec.split(":")
    n = full.config.decoder_layers if stack == "decoder" else full.config.encoder_layers
    scored = []
    for i, b in enumerate(batches[:4]):  # 32 utterances: scores of 4 layers settle long before
        rows = slice(i * len(b["input_features"]), (i + 1) * len(b["input_features"]))
        t = int(cache.lengths[rows].max())
        scored.append({**b, "decoder_input_ids": cache.labels[rows, :t]})
    result = prune(full, remove=n - int(keep), scorer=scorer, batches=scored, stack=stack)
    print(f"{spec}: scores {[round(s, 4) for s in result.scores.scores]} -> {result.plan.to_text()}", flush=True)
    return result.plan.to_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cal", type=int, default=256, help="calibration utterances")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--n", type=int, default=24, help="held-out utterances")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plans", nargs="+", default=["decoder=0,3", "decoder=0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--models", type=Path, default=Path("out/whisper_heal"))
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import WhisperForConditionalGeneration

    from depthprune.plan import LayerPlan
    from depthprune.static.apply import layer_sizes
    from depthprune.static.export import save_model
    from depthprune.static.heal.distill_seq2seq import EncoderCache, distill_seq2seq, encode_cache

    full, processor = load_whisper()
    args.models.mkdir(parents=True, exist_ok=True)
    sizes = layer_sizes(full)

    cal, cal_batches, cache, trained = None, None, None, {}
    cache_file = args.models / f"cache-{args.cal}.pt"

    def calibration():
        nonlocal cal, cal_batches, cache
        if cache is None:
            t0 = time.perf_counter()
            cal = utterances(args.cal, split="calibration")
            cal_batches = feature_batches(processor, cal, 8)
            print(f"calibration speech: {len(cal)} utterances, {sum(u.seconds for u in cal):.1f} s, "
                  f"{time.perf_counter() - t0:.0f} s to synthesize", flush=True)  # fmt: skip
            if cache_file.is_file():
                cache = EncoderCache(**torch.load(cache_file))
            else:
                t0 = time.perf_counter()
                cache = encode_cache(full, cal_batches, max_new_tokens=args.max_new_tokens, progress=True)
                print(f"teacher cache: {time.perf_counter() - t0:.0f} s", flush=True)
                tmp = cache_file.with_suffix(".tmp")
                torch.save({k: getattr(cache, k) for k in ("hidden", "labels", "lengths", "logits")}, tmp)
                os.replace(tmp, cache_file)
        return cal, cal_batches, cache

    def folder_name(plan: str) -> str:
        return plan.replace("=", "-").replace(",", "_").replace(";", "+")

    names, chosen = [], {}
    for spec in args.plans:
        plan = spec
        if spec.count(":") == 2:  # chosen by a scorer: trained under the plan it picks (shared with a named one)
            cal, cal_batches, cache = calibration()
            plan = scorer_plan(full, spec, cal_batches, cache)
            plan = next(
                (
                    p
                    for p in args.plans
                    if p.count(":") < 2 and LayerPlan.parse(p).resolve(sizes) == LayerPlan.parse(plan).resolve(sizes)
                ),
                plan,
            )
            chosen.setdefault(folder_name(plan), []).append(spec.split(":")[1])
        name = folder_name(plan)
        out = args.models / name
        if name in names:
            continue
        if not (out / "config.json").is_file():
            cal, cal_batches, cache = calibration()
            encoder_plan = plan.startswith("encoder") or "encoder=" in plan
            result = distill_seq2seq(
                full,
                plan,
                cal_batches if encoder_plan else None,
                cache=cache,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=args.train_batch,
                progress=True,
            )
            info = {k: v for k, v in result.to_dict().items() if k != "history"}
            info["spec"] = spec
            info["audio_seconds"] = round(sum(u.seconds for u in cal), 1)
            info["loss_first_last_10"] = [
                round(sum(result.history[:10]) / 10, 4), round(sum(result.history[-10:]) / 10, 4)
            ]  # fmt: skip
            save_model(result.model, out, processor, overwrite=True)
            (out / "heal_log.json").write_text(json.dumps(info, indent=1))
            print(json.dumps(info), flush=True)
        trained[name] = json.loads((out / "heal_log.json").read_text())
        names.append(name)
    for name, scorers in chosen.items():
        trained[name]["chosen_by"] = scorers
    if args.train_only:
        return 0

    utts = utterances(args.n)
    refs = [u.text for u in utts]
    features = log_mel(processor, utts)
    models = {"full": full}
    for name in names:
        models[name] = WhisperForConditionalGeneration.from_pretrained(args.models / name).eval()
    run(full, processor, features[:1], 1, args.max_new_tokens)  # warm-up
    times: dict[tuple[str, int], list[dict]] = {}
    texts: dict[tuple[str, int], list[str]] = {}
    loads = []
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]  # alternate the order: drift hits all alike
        for name in order:
            for batch in args.batch:
                out = run(models[name], processor, features, batch, args.max_new_tokens)
                times.setdefault((name, batch), []).append(out)
                texts.setdefault((name, batch), out["texts"])
                print(f"round {r} {name} b{batch}: e2e {out['end_to_end_s']:.2f} s", flush=True)
        loads.append(open("/proc/loadavg").read().split()[:3])
    pseudo = texts[("full", args.batch[0])]
    rows = []
    for (name, batch), outs in times.items():
        med = {k: statistics.median(o[k] for o in outs) for k in ("encoder_s", "decode_s", "end_to_end_s")}
        rows.append(
            {
                "model": name,
                "plan": trained[name]["plan"] if name in trained else "full",
                "batch": batch,
                "wer_text": round(wer(refs, texts[(name, batch)]), 2),
                "wer_full": round(wer(pseudo, texts[(name, batch)]), 2),
                "tokens": outs[0]["tokens"],
                "capped": outs[0]["capped"],
                **{k: round(v, 3) for k, v in med.items()},
                "end_to_end_rounds": [round(o["end_to_end_s"], 3) for o in outs],
                "texts": texts[(name, batch)],
            }
        )
    for row in rows:
        base = next(r for r in rows if r["model"] == "full" and r["batch"] == row["batch"])
        row["end_to_end_speedup"] = round(base["end_to_end_s"] / row["end_to_end_s"], 3)
        row["decode_speedup"] = round(base["decode_s"] / row["decode_s"], 3)
    report = {
        "n": len(utts),
        "audio_seconds": round(sum(u.seconds for u in utts), 1),
        "threads": args.threads,
        "rounds": args.rounds,
        "loadavg_after_each_round": loads,
        "references": refs,
        "healing": trained,
        "rows": rows,
    }
    cols = ("model", "plan", "batch", "wer_text", "wer_full", "tokens", "capped", "encoder_s", "decode_s")
    cols += ("end_to_end_s", "end_to_end_speedup", "decode_speedup")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    if args.json:
        from depthprune.fsutil import write_atomic

        write_atomic(args.json, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
