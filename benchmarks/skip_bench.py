"""Dynamic layer skipping on SmolLM2 beside static pruning at the same mean depth (issue 12), one run.

For each target depth (default 26 and 22 of 30): routers are trained (frozen backbone, KL to the untouched model +
the compute term, straight-through Gumbel-sigmoid; a small budget: see --train-blocks/--seq-len), their threshold set
so that the teacher-forced mean depth on calibration blocks meets the target, then measured on held-out text:
perplexity (teacher forced, under the routers) and the share of positions whose greedy next token is the untouched
model's; greedy continuations' token agreement with the untouched model's; decode tokens/s at batch 1 and 8 beside
plain `model.generate` (and our loop with every layer running, to show the loop's own cost). Static pruning at the
same depth: the block_influence (ShortGPT) plan, unhealed and fold-healed (depthprune.static.heal), same figures.
Calibration text: Moby-Dick before chapter 110; held-out: from chapter 110 on (depthprune.data).

    python benchmarks/skip_bench.py --json benchmarks/skip_bench.json
    # or in two runs, each under its own timeout: train + quality, then speed from the saved routers
    python benchmarks/skip_bench.py --phase quality --routers-dir out/skip --json benchmarks/skip_bench_q.json
    python benchmarks/skip_bench.py --phase speed --routers-dir out/skip --json benchmarks/skip_bench_speed.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import depthprune
from depthprune.bench.generation import compare_tokens_per_s, new_tokens, plain_greedy
from depthprune.bench.perplexity import perplexity
from depthprune.bench.speed import machine_info
from depthprune.data import calibration_text, heldout_text, token_blocks
from depthprune.fsutil import write_atomic
from depthprune.generation.calibrate import greedy_continuations, prompt_blocks, token_consistency
from depthprune.plan import LayerPlan
from depthprune.skipping.calibrate import routed_continuations
from depthprune.skipping.dense import routed_perplexity, threshold_for_depth
from depthprune.skipping.inference import skip_generate
from depthprune.skipping.io import load_routers, save_routers
from depthprune.skipping.train import train_routers
from depthprune.static.apply import apply_plan, layer_sizes
from depthprune.static.heal import heal
from depthprune.static.scorers import get_scorer

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def teacher_forced(model, reference, blocks) -> dict:
    """Perplexity of a (static) model on blocks and the share of next tokens equal to the reference model's."""
    agree = 0
    for ids in blocks.split(4):
        agree += int((model(input_ids=ids, use_cache=False).logits.argmax(-1)
                      == reference(input_ids=ids, use_cache=False).logits.argmax(-1)).sum())  # fmt: skip
    return {"ppl": perplexity(model, blocks), "agreement": agree / blocks.numel()}


def agreement(conts, refs) -> float:
    return sum(token_consistency(c, r) for c, r in zip(conts, refs, strict=True)) / len(refs)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=str(ROOT / ".." / "shared" / "data" / "moby-dick.txt"))
    p.add_argument("--targets", nargs="+", type=float, default=[26.0, 22.0])
    p.add_argument("--train-blocks", type=int, default=48, help="training blocks (default 48)")
    p.add_argument("--seq-len", type=int, default=64, help="training block length (default 64)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--compute-weight", type=float, default=10.0)
    p.add_argument("--noise", type=float, default=1.0, help="scale of the gates' logistic noise in training")
    p.add_argument(
        "--compute-on",
        choices=("gates", "probs"),
        default="gates",
        help="the compute term counts the executed gates (default) or the expected layers (P(run))",
    )
    p.add_argument(
        "--kind",
        default=None,
        help="router kind (default token_linear: whole layers; token_sublayer: attention and MLP apart)",
    )
    p.add_argument(
        "--init",
        choices=("uniform", "static", "static_parts"),
        default="static",
        help="router init (static: block_influence's plan of each target, scored as static pruning's)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="also train LoRA of this rank with the routers (merged, saved beside them); adds a static row healed by "
        "--static-heal on the same blocks, epochs, rank and lr (default 0: frozen backbone)",
    )
    p.add_argument("--lora-lr", type=float, default=2e-4)
    p.add_argument(
        "--start",
        choices=("untouched", "healed"),
        default="untouched",
        help="healed: the routers start from the static plan healed by --static-heal (train-router --start), "
        "its row measured beside them; saved as ROUTERS_DIR/healed_TARGET and read from there by later runs",
    )
    p.add_argument("--sink-tokens", type=int, default=0, help="first positions that always run (train-router's "
                   "--sink-tokens; default 0 here, so the commands in RESULTS.md reproduce their figures)")  # fmt: skip
    p.add_argument("--heal-rank", type=int, default=None, help="LoRA rank of the static healing (default "
                   "--lora-rank, else 8)")  # fmt: skip
    p.add_argument("--static-heal", default="fold+distill", help="the healing of the static row beside LoRA routers")
    p.add_argument("--heldout-blocks", type=int, default=8, help="held-out blocks of 128 tokens (default 8)")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts for greedy agreement (default 8)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per batch size (default 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--phase",
        choices=("all", "quality", "speed"),
        default="all",
        help="quality: train and measure (saving routers in --routers-dir); speed: time the saved ones",
    )
    p.add_argument(
        "--routers-only",
        action="store_true",
        help="quality phase: only the trained routers' row (the static rows come from an earlier run)",
    )
    p.add_argument("--routers-dir", default=None, help="where each target's routers and threshold are saved / read")
    args = p.parse_args(argv)
    if args.phase != "all" and not args.routers_dir:
        p.error("--phase quality/speed hands routers over through --routers-dir: give one")
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model = depthprune.load_model("smollm2").eval()
    tok = depthprune.load_tokenizer("smollm2")
    calib = calibration_text(args.text)
    train_blocks = token_blocks(tok, calib, args.seq_len, args.train_blocks)
    depth_blocks = token_blocks(tok, calib, 128, 40)[-2:]  # for the threshold (not trained on: from the end)
    held = token_blocks(tok, heldout_text(args.text), 128, args.heldout_blocks)
    prompts = prompt_blocks(tok, heldout_text(args.text), args.prompts, 32)
    eos = ()  # no early stop: every row generates new_tokens (equal work for every decoder)
    n_layers = layer_sizes(model)["decoder"]
    result: dict = {"settings": vars(args), "machine": machine_info().to_dict(), "num_layers": n_layers, "rows": [],
                    "speed": []}  # fmt: skip
    fold_batches = list(token_blocks(tok, calib, 128, 16).split(4))
    routed: dict[float, tuple] = {}
    static: dict[float, torch.nn.Module] = {}
    quality = args.phase != "speed"
    if quality:
        refs = greedy_continuations(model, prompts, args.new_tokens, eos_token_id=eos)
        base = teacher_forced(model, model, held)
        result["rows"].append({"method": "untouched", "layers": n_layers, **base, "greedy_agreement": 1.0})
        print(f"untouched: ppl {base['ppl']:.2f}", flush=True)
        dump(args.json, result)
    for target in args.targets:
        n_remove = round(n_layers - target)
        remove = sorted(get_scorer("block_influence")(model, fold_batches, n_remove=n_remove, stack="decoder").remove)
        plan = LayerPlan.drop({"decoder": n_layers}, {"decoder": remove})
        saved = Path(args.routers_dir or ".") / f"target_{target:g}"
        if not quality:
            static[target] = apply_plan(model, plan)
            threshold = json.loads((saved / "threshold.json").read_text())["threshold"]
            adapted = (depthprune.load_model(str(saved)).eval() if (saved / "config.json").is_file()
                       else model)  # fmt: skip
            routed[target] = (load_routers(saved, adapted), threshold, None, adapted)
            continue
        methods = () if args.routers_only else ("unhealed", "fold")
        if args.lora_rank or args.start == "healed":  # the static plan healed with the routers' LoRA budget
            methods += (args.static_heal,)
        start = None
        kept = saved.parent / f"healed_{target:g}"  # the healed start, kept for later runs (--routers-dir)
        for method in methods:
            reuse = method == args.static_heal and args.start == "healed" and (kept / "config.json").is_file()
            if reuse:
                pruned = depthprune.load_model(str(kept)).eval()
            else:
                pruned = static_row_model(model, plan, method, fold_batches, train_blocks, args)
            if method == args.static_heal and args.start == "healed":
                start = pruned
                if args.routers_dir and not reuse:
                    pruned.save_pretrained(kept)
            tf = teacher_forced(pruned, model, held)
            conts = greedy_continuations(pruned, prompts, args.new_tokens, eos_token_id=eos)
            row = {"method": f"block_influence {method}", "target": target, "layers": n_layers - n_remove,
                   "removed": remove, **tf, "greedy_agreement": agreement(conts, refs)}  # fmt: skip
            result["rows"].append(row)
            static.setdefault(target, pruned)
            print(json.dumps(row), flush=True)
            dump(args.json, result)
        init = {"init": args.init, "score_batches": fold_batches, "kind": args.kind}  # the static init: the same plan
        if (
            args.init != "uniform" and not args.routers_only
        ):  # untrained (0 steps): the static plan exactly, at threshold 0.5
            zero = train_routers(model, train_blocks, target_layers=target, epochs=0, progress=False, sink_tokens=0,
                                 **init)  # fmt: skip
            tf = routed_perplexity(model, zero.routers, held, 0.5, batch_size=4)
            row = {
                "method": "routers, static init, 0 steps",
                "target": target,
                "layers": tf["mean_layers"],
                "ppl": tf["ppl"],
                "agreement": tf["agreement"],
                "threshold": 0.5,
                "removed": zero.init_removed,
            }
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            dump(args.json, result)
        if start is not None:  # 0 steps on the healed start: the healed static plan exactly, at threshold 0.5
            zero = train_routers(model, train_blocks, target_layers=target, epochs=0, progress=False, start=start,
                                 sink_tokens=0, **init)  # fmt: skip
            tf = routed_perplexity(zero.model, zero.routers, held, 0.5, batch_size=4, reference=model)
            row = {"method": f"routers, {args.static_heal} start, 0 steps", "target": target,
                   "layers": tf["mean_layers"], "ppl": tf["ppl"], "agreement": tf["agreement"],
                   "threshold": 0.5}  # fmt: skip
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            dump(args.json, result)
        t0 = time.perf_counter()
        res = train_routers(
            model, train_blocks, target_layers=target, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
            compute_weight=args.compute_weight, noise=args.noise, compute_on=args.compute_on, lora_rank=args.lora_rank,
            lora_lr=args.lora_lr, start=start, sink_tokens=args.sink_tokens,
            progress=False, **init,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        adapted = res.model if res.model is not None else model  # LoRA: the merged copy runs under the routers
        threshold = threshold_for_depth(adapted, res.routers, depth_blocks, target, steps=8)
        tf = routed_perplexity(adapted, res.routers, held, threshold, batch_size=4, reference=model)
        conts, gen_depth = routed_continuations(adapted, res.routers, prompts, threshold, args.new_tokens,
                                                eos_token_id=eos)  # fmt: skip
        lora = f" + LoRA r{args.lora_rank}" if args.lora_rank else ""
        kind = f" ({args.kind})" if args.kind else ""
        how = f"{args.static_heal} start" if start is not None else f"{args.init} init"
        row = {
            "method": f"routers{kind}, {how}{lora}", "target": target, "layers": tf["mean_layers"],
            "ppl": tf["ppl"],
            "agreement": tf["agreement"], "greedy_agreement": agreement(conts, refs), "gen_layers": gen_depth,
            "threshold": threshold, "train_seconds": seconds, "train_steps": len(res.history),
            "train_tokens": int(train_blocks.numel()) * args.epochs, "train_log": res.epoch_losses,
        }  # fmt: skip
        result["rows"].append(row)
        routed[target] = (res.routers, threshold, gen_depth, adapted)
        print(json.dumps({k: v for k, v in row.items() if k != "train_log"}), flush=True)
        dump(args.json, result)
        if args.routers_dir:
            if res.model is not None:  # the merged model beside the routers, as `depthprune train-router` saves it
                res.model.save_pretrained(saved)
            save_routers(res.routers, saved, overwrite=True)
            write_atomic(saved / "threshold.json", json.dumps({"threshold": threshold, "row": row}, default=float))
    if args.phase == "quality":
        result["seconds"] = time.perf_counter() - began
        dump(args.json, result)
        return result
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for batch in (1, 8):
        ids = prompts[:batch]
        mask = torch.ones_like(ids)
        runs = {"generate": lambda ids=ids, mask=mask: new_tokens(
            plain_greedy(model, ids, mask, args.new_tokens, eos, pad)[:, ids.shape[1]:], eos)}  # fmt: skip
        some = next(iter(routed.values()))[0]
        runs["loop, every layer"] = lambda ids=ids, r=some: new_tokens(
            skip_generate(model, r, ids, threshold=0.0, max_new_tokens=args.new_tokens, eos_token_id=eos)
            .sequences[:, ids.shape[1]:], eos)  # fmt: skip
        for target, (r, t, _, m) in routed.items():
            runs[f"routers {target:g}"] = lambda ids=ids, r=r, t=t, m=m: new_tokens(
                skip_generate(m, r, ids, threshold=t, max_new_tokens=args.new_tokens, eos_token_id=eos)
                .sequences[:, ids.shape[1]:], eos)  # fmt: skip
            runs[f"static {target:g}"] = lambda ids=ids, mask=mask, m=static[target]: new_tokens(
                plain_greedy(m, ids, mask, args.new_tokens, eos, pad)[:, ids.shape[1]:], eos)  # fmt: skip
        timing = compare_tokens_per_s(runs, "generate", repeats=args.repeats, warmup=1)
        for target, (r, t, _, m) in routed.items():
            out = skip_generate(m, r, ids, threshold=t, max_new_tokens=args.new_tokens, eos_token_id=eos)
            depth = out.mean_layers()  # every new token, the first (full prefill) included, as the timing counts
            entry = timing[f"routers {target:g}"]
            entry.update(mean_layers=depth, layer_ratio=n_layers / depth, vs_ratio=entry["ratio"] * depth / n_layers)
        for target in routed:
            entry = timing[f"static {target:g}"]
            entry.update(layer_ratio=n_layers / round(target), vs_ratio=entry["ratio"] * round(target) / n_layers)
        result["speed"].append({"batch": batch, "new_tokens": args.new_tokens, **timing})
        dump(args.json, result)
        print(json.dumps({"batch": batch, **{k: {kk: vv for kk, vv in v.items() if kk != "seconds"}
                                             for k, v in timing.items()}}), flush=True)  # fmt: skip
    result["seconds"] = time.perf_counter() - began
    dump(args.json, result)
    return result


def static_row_model(model, plan, method: str, fold_batches, train_blocks, args) -> torch.nn.Module:
    """The static plan's model for a row: "unhealed", "fold", "distill" or "fold+distill". Distillation gets the
    routers' LoRA budget: the same training blocks, epochs, batch size, rank and lr; the fold its own calibration
    blocks, as in the fold row."""
    if method == "unhealed":
        return apply_plan(model, plan)
    if method not in ("fold", "distill", "fold+distill"):
        raise SystemExit(f"--static-heal {method!r}: choose distill or fold+distill")
    folded = heal(model, plan, fold_batches, "fold") if method.startswith("fold") else None
    if method == "fold":
        return folded
    rank = args.heal_rank if args.heal_rank is not None else (args.lora_rank or 8)
    options = {"lora_rank": rank, "lr": args.lora_lr, "epochs": args.epochs, "batch_size": args.batch_size}
    return heal(model, plan, list(train_blocks.split(args.batch_size)), "distill", start=folded, **options)


def dump(path: str | None, result: dict) -> None:
    """Write the results so far (atomically: a timeout loses only the row in progress)."""
    if path:
        write_atomic(path, json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
