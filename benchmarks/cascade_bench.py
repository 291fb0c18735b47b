r"""Big/little cascades on SmolLM2 (issue 17): big = SmolLM2-135M, little = the same model with --remove layers removed
by Block Influence and healed by the training-free fold; lossless, fallback and rollback beside plain greedy
`generate` of the big model, timed in the same interleaved rounds.

    OMP_NUM_THREADS=1 python benchmarks/cascade_bench.py --out benchmarks/cascade

Steps (all on one thread by default):
1. the little model: `block_influence` on --score-blocks x 256 calibration tokens (Moby-Dick before chapter 110)
   chooses --remove layers; `depthprune.static.heal.heal(big, plan, batches, "fold")` folds each removed run into the
   layer before it, fitted on --calib-blocks x 256 calibration tokens. Held-out perplexity of both on --ppl-blocks
   x 256 tokens from chapter 110 on.
2. the little model's head: with --little-vocab C, it projects onto the fewest tokens covering share C of the
   calibration text (`frequent_tokens`), end-of-sequence kept; the big model always reads the full vocabulary.
3. Learn-then-Test (`calibrate_cascade`) of the fallback threshold, then of the rollback threshold at --rollback-
   fallback, on --cal-prompts calibration prompts: expected token agreement with the big model's greedy continuation
   >= 1 - --delta with probability >= 1 - --epsilon (Hoeffding's bound on per-prompt agreement).
4. Held-out: --prompts prompts of --prompt-len tokens from chapter 110 on, --max-new-tokens new tokens, no stop at
   the end of sequence on any side. Per configuration: token agreement with plain greedy generate and the share of
   prompts continued identically (batches of 8; lossless also one prompt at a time), the share of tokens the little
   model decided. Speed: at each of --batch-sizes on the first B prompts, whole calls (prefill included) of plain
   generate and every configuration, --repeats interleaved rounds after --warmup short runs; speedup = the median
   over rounds of generate's seconds / the configuration's.

Writes --out/cascade_bench.json (everything, with the machine) and --out/cascade_table.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from depthprune.bench.generation import add_timing_arguments, interleaved_seconds, markdown_table, speed_ratios
from depthprune.bench.perplexity import perplexity
from depthprune.bench.report import to_jsonable
from depthprune.bench.speed import machine_info
from depthprune.data import calibration_text, heldout_text, token_blocks
from depthprune.exits.vocab_heads import frequent_tokens
from depthprune.fsutil import write_atomic
from depthprune.generation.calibrate import prompt_blocks, token_consistency
from depthprune.generation.cascade import LITTLE, calibrate_cascade, cascade_generate
from depthprune.io import load_model, load_tokenizer
from depthprune.plan import LayerPlan
from depthprune.static.apply import layer_sizes
from depthprune.static.heal import heal
from depthprune.static.prune import calibration_batches
from depthprune.static.scorers import get_scorer

ROOT = Path(__file__).resolve().parents[1]
NO_EOS = ()


def plain_run(model):
    config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    config.update(do_sample=False, eos_token_id=None, temperature=None, top_p=None, top_k=None)
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0

    def run(ids, n):
        config.max_new_tokens = n
        return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config), None

    return run


def cascade_run(big, little, **settings):
    def run(ids, n):
        out = cascade_generate(big, little, ids, max_new_tokens=n, eos_token_id=NO_EOS, pad_token_id=0, **settings)
        return out.sequences, out

    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=str(ROOT / ".." / "shared" / "data" / "moby-dick.txt"))
    p.add_argument("--model", default="smollm2")
    p.add_argument("--remove", type=int, default=12, help="layers the little model loses (default 12 of 30)")
    p.add_argument("--score-blocks", type=int, default=8)
    p.add_argument("--calib-blocks", type=int, default=64)
    p.add_argument("--ppl-blocks", type=int, default=8)
    p.add_argument("--little-vocab", type=float, default=0.95, help="coverage of the little head's vocabulary; 0: all")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--cal-prompts", type=int, default=32)
    p.add_argument("--delta", type=float, default=0.3)
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--grid", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], help="fallback")
    p.add_argument("--rollback-grid", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02])
    p.add_argument("--draft-lens", type=int, nargs="+", default=[3], help="lossless: little tokens per round")
    p.add_argument("--run-len", type=int, default=8, help="fallback / rollback: the longest little run per round")
    p.add_argument("--fallbacks", type=float, nargs="+", default=[0.7], help="uncalibrated sweep too")
    p.add_argument("--rollback-fallback", type=float, default=0.3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "cascade"))
    add_timing_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    out_dir = Path(args.out)

    big = load_model(args.model, task="causal-lm").eval()
    tok = load_tokenizer(args.model)
    sizes = layer_sizes(big)
    stack = list(sizes)[-1]
    score = calibration_batches(tok, path=args.text, seq_len=256, n_blocks=args.score_blocks)
    remove = sorted(get_scorer("block_influence")(big, score, n_remove=args.remove, stack=stack).remove)
    plan = LayerPlan.drop(sizes, {stack: remove})
    t0 = time.perf_counter()
    fold_data = calibration_batches(tok, path=args.text, seq_len=256, n_blocks=args.calib_blocks)
    little = heal(big, plan, fold_data, "fold").eval()
    fold_s = time.perf_counter() - t0
    held = token_blocks(tok, heldout_text(args.text), 256, args.ppl_blocks)
    ppl = {"big": perplexity(big, held), "little": perplexity(little, held)}
    print(f"removed {remove}; fold {fold_s:.0f} s; held-out ppl big {ppl['big']:.1f}, little {ppl['little']:.1f}")

    little_vocab, vocab_info = None, None
    if args.little_vocab:
        cal_tokens = torch.tensor(tok(calibration_text(args.text))["input_ids"])
        eos = big.generation_config.eos_token_id
        little_vocab, covered = frequent_tokens(
            cal_tokens, big.config.vocab_size, coverage=args.little_vocab, always=[eos] if isinstance(eos, int) else ()
        )
        vocab_info = {"coverage_target": args.little_vocab, "k": int(little_vocab.numel()), "coverage": covered}
        print(f"little head: {little_vocab.numel()} tokens ({covered:.3f} of the calibration text)")

    # ---- Learn-then-Test on calibration prompts
    n = args.max_new_tokens
    cal = prompt_blocks(tok, calibration_text(args.text), args.cal_prompts, args.prompt_len)
    common = {"max_new_tokens": n, "eos_token_id": NO_EOS, "pad_token_id": 0}
    t0 = time.perf_counter()
    from depthprune.generation.calibrate import greedy_continuations

    refs = greedy_continuations(big, cal, n, eos_token_id=NO_EOS, pad_token_id=0)
    vocab_kw = {"little_vocab": little_vocab} if little_vocab is not None else {}
    fb_cal = calibrate_cascade(big, little, cal, "fallback", delta=args.delta, epsilon=args.epsilon,
                               draft_len=args.run_len, references=refs, grid=args.grid, **common,
                               **vocab_kw)  # fmt: skip
    rb_cal = calibrate_cascade(big, little, cal, "rollback", delta=args.delta, epsilon=args.epsilon,
                               fallback=args.rollback_fallback, draft_len=args.run_len, references=refs, **common,
                               grid=args.rollback_grid,
                               **vocab_kw)  # fmt: skip
    cal_s = time.perf_counter() - t0
    for c in (fb_cal, rb_cal):
        print(c.guarantee())
        for row in c.table:
            print(f"  {c.parameter}={row['threshold']:g}: agreement {row['agreement']:.3f}, little share "
                  f"{row['little_share']:.2f}, p={row['p_value']:.3g}")  # fmt: skip

    # ---- the configurations
    configs: dict[str, tuple[Any, dict]] = {"generate": (plain_run(big), {"mode": "generate"})}
    for k in args.draft_lens:
        configs[f"lossless k={k}"] = (cascade_run(big, little, mode="lossless", draft_len=k, **vocab_kw),
                                      {"mode": "lossless", "draft_len": k})  # fmt: skip
    fallbacks = sorted({*args.fallbacks, *([fb_cal.threshold] if fb_cal.threshold is not None else [])}, reverse=True)
    for t in fallbacks:
        tag = " (calibrated)" if t == fb_cal.threshold else ""
        configs[f"fallback {t:g}{tag}"] = (
            cascade_run(big, little, mode="fallback", fallback=t, draft_len=args.run_len, **vocab_kw),
            {"mode": "fallback", "fallback": t, "calibrated": bool(tag), "draft_len": args.run_len},
        )
    if rb_cal.threshold is not None:
        t = rb_cal.threshold
        configs[f"rollback {t:g} at fallback {args.rollback_fallback:g} (calibrated)"] = (
            cascade_run(big, little, mode="rollback", fallback=args.rollback_fallback, rollback=t,
                        draft_len=args.run_len, **vocab_kw),
            {"mode": "rollback", "fallback": args.rollback_fallback, "rollback": t, "calibrated": True,
             "draft_len": args.run_len},
        )  # fmt: skip

    # ---- agreement on held-out prompts
    prompts = prompt_blocks(tok, heldout_text(args.text), args.prompts, args.prompt_len)
    rows: dict[str, dict] = {name: dict(meta) for name, (_, meta) in configs.items()}
    with torch.inference_mode():
        ref = torch.cat([configs["generate"][0](b, n)[0] for b in prompts.split(8)])
        for name, (run, meta) in configs.items():
            if name == "generate":
                continue
            seqs, little_tokens = [], 0
            for b in prompts.split(8):
                seq, res = run(b, n)
                seqs.append(seq)
                little_tokens += int((res.source == LITTLE).sum())
            seq = torch.cat(seqs)
            new, ref_new = seq[:, args.prompt_len :].tolist(), ref[:, args.prompt_len :].tolist()
            rows[name]["agreement"] = sum(map(token_consistency, new, ref_new)) / len(new)
            rows[name]["identical_b8"] = sum(int(a == b) for a, b in zip(new, ref_new, strict=True)) / len(new)
            rows[name]["little_share"] = little_tokens / (len(new) * n)
            if meta["mode"] == "lossless":
                one = [run(prompts[i : i + 1], n)[0] for i in range(len(prompts))]
                rows[name]["identical_b1"] = sum(int(torch.equal(o, ref[i : i + 1])) for i, o in enumerate(one)) / len(
                    one
                )
            print(f"{name}: agreement {rows[name]['agreement']:.3f}, little share {rows[name]['little_share']:.2f}")

    # ---- speed
    speed: dict[int, dict] = {}
    with torch.inference_mode():
        for b in args.batch_sizes:
            ids = prompts[:b]

            def timed(run, ids=ids):
                def go():
                    start = time.perf_counter()
                    run(ids, n)
                    return time.perf_counter() - start

                return go

            runs = {name: timed(run) for name, (run, _) in configs.items()}
            warm = {name: (lambda run=run, ids=ids: run(ids, 4)) for name, (run, _) in configs.items()}
            times = interleaved_seconds(runs, args.repeats, warmup=args.warmup, warmup_runs=warm, label=f"b{b}")
            speed[b] = speed_ratios(times, "generate", b * n)
            for name in configs:
                rows[name][f"speedup_b{b}"] = speed[b][name]["ratio"]
                rows[name][f"tok_s_b{b}"] = speed[b][name]["tok_s"]
            print(f"b{b}: " + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in speed[b].items()), flush=True)

    table = [{"config": name, **row} for name, row in rows.items()]
    columns = ["config", "agreement", "identical_b8", "identical_b1", "little_share"]
    columns += [f"{c}_b{b}" for b in args.batch_sizes for c in ("speedup", "tok_s")]
    result = {
        "args": vars(args),
        "machine": machine_info(),
        "removed": remove,
        "fold_seconds": fold_s,
        "perplexity": ppl,
        "little_vocab": vocab_info,
        "calibration": {"fallback": fb_cal.to_dict(), "rollback": rb_cal.to_dict(), "seconds": cal_s},
        "table": table,
        "speed": speed,
        "wall_s": time.perf_counter() - began,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "cascade_bench.json", json.dumps(to_jsonable(result), indent=2) + "\n")
    write_atomic(out_dir / "cascade_table.md", markdown_table(table, columns) + "\n")
    print(markdown_table(table, columns))
    print(f"wall {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
