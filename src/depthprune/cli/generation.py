"""Early-exit generation commands: generate and `calibrate` for decoder exit heads (thin wrappers over
depthprune.generation)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from depthprune.cli.common import CALIBRATION_FILE, add_tokenizer_option, calibrate_check_write, tokenizer_for
from depthprune.registry import KV_STRATEGIES


def _model_name(model: str | None, heads_dir: str | None) -> str:
    """The base model: as given, else the heads folder when it holds a model, else the trainer's default (smollm2)."""
    if model:
        return model
    if heads_dir and (Path(heads_dir) / "config.json").is_file():
        return heads_dir
    from depthprune.io import DEFAULT_MODEL

    if heads_dir:
        print(f"no --model given and {heads_dir} holds no model: using {DEFAULT_MODEL}", file=sys.stderr)
    return DEFAULT_MODEL


def _load(args: argparse.Namespace, model_name: str, heads_dir: str | None):
    """(causal LM, its tokenizer, its exit heads: the folder's, or logit-lens exits after every layer if None)."""
    from depthprune.exits.lm_heads import DecoderExitHeads
    from depthprune.io import load_model

    model = load_model(model_name, task="causal-lm")
    tokenizer = tokenizer_for(args, model_name)
    heads = DecoderExitHeads.logit_lens(model) if heads_dir is None else DecoderExitHeads.load(heads_dir, model)
    return model, tokenizer, heads.eval()


def _check_supported(heads, name: str) -> None:
    from depthprune.generation.calibrate import supported_criteria

    if name not in supported_criteria(heads):
        raise ValueError(
            f"the {name!r} criterion needs exit heads trained with CALM's confidence classifier "
            f"(train-exits --confidence); these heads support {', '.join(supported_criteria(heads))}"
        )


# ---- calibrate (decoder exit heads) -----------------------------------------------------------------------------
def add_calibrate_options(p: argparse.ArgumentParser) -> None:
    """The `calibrate` options that only decoder exit heads use."""
    from depthprune.generation.calibrate import CONSISTENCY

    g = p.add_argument_group("decoder exit heads (a folder with decoder_exit_heads.json)")
    g.add_argument("--model", help="the base causal LM (default: the folder if it holds one, else smollm2)")
    g.add_argument("--consistency", default="tokens", help=f"consistency measure: {' | '.join(CONSISTENCY)}")
    g.add_argument("--prompts", type=int, default=100, help="calibration prompts, and as many held-out (default 100)")
    g.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (default 64)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    g.add_argument("--kv", default="propagate", choices=KV_STRATEGIES.names(), help="skipped layers' KV cache")
    g.add_argument("--shallow-prefill", action="store_true", help="the prompt's last token may exit too")
    g.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    g.add_argument(
        "--text",
        metavar="PATH",
        help="a UTF-8 book: calibration prompts from before 'CHAPTER 110.', held-out ones from it on (default: the "
        "packaged Moby-Dick excerpts)",
    )
    g.add_argument("--json", action="store_true", help="print the results as JSON")


def cmd_calibrate_decoder(args: argparse.Namespace) -> int:
    from depthprune.bench.report import format_table
    from depthprune.data import calibration_text, heldout_text
    from depthprune.exits.token_criteria import criterion_class, make_criterion
    from depthprune.generation.calibrate import (
        calibrate_generation,
        check,
        consistency_fn,
        greedy_continuations,
        prompt_blocks,
    )

    delta = 0.2 if args.delta is None else args.delta
    if not 0 < delta < 1 or not 0 < args.epsilon < 1:
        raise ValueError(f"--delta and --epsilon must lie in (0, 1); got {delta}, {args.epsilon}")
    consistency_fn(args.consistency)
    names = [n.strip() for n in args.criterion.split(",")]
    for name in names:
        criterion_class(name)
    model, tokenizer, heads = _load(args, _model_name(args.model, args.folder), args.folder)
    for name in names:
        _check_supported(heads, name)
    cal = prompt_blocks(tokenizer, calibration_text(args.text), args.prompts, args.prompt_len)
    test = prompt_blocks(tokenizer, heldout_text(args.text), args.prompts, args.prompt_len)
    settings = {"max_new_tokens": args.max_new_tokens, "kv": args.kv, "deep_prefill": not args.shallow_prefill}
    gen = {"batch_size": args.batch_size}
    cal_refs = greedy_continuations(model, cal, args.max_new_tokens, **gen)
    test_refs = greedy_continuations(model, test, args.max_new_tokens, **gen)

    def show(result) -> None:
        print(
            format_table(result.table, title=f"{result.criterion}: thresholds tested on {result.n} calibration prompts")
        )

    calibrate_check_write(
        names,
        lambda name: calibrate_generation(
            model,
            heads,
            cal,
            name,
            delta=delta,
            epsilon=args.epsilon,
            consistency=args.consistency,
            references=cal_refs,
            progress=not args.json,
            **settings,
            **gen,
        ),
        lambda name, threshold: check(
            model, heads, test, make_criterion(name, threshold), references=test_refs, **settings
        ),
        args.folder,
        title=f"held-out check ({len(test)} prompts of {args.prompt_len} tokens)",
        as_json=args.json,
        show=show,
    )
    return 0


# ---- generate ---------------------------------------------------------------------------------------------------
def _criterion(args: argparse.Namespace):
    from depthprune.exits.token_criteria import make_criterion, parse_criterion

    if args.exit:
        return parse_criterion(args.exit)
    path = Path(args.heads or ".") / CALIBRATION_FILE
    if not args.heads or not path.is_file():
        raise ValueError("pass --exit CRITERION:THRESHOLD (e.g. max_prob:0.9), or calibrate the heads folder first")
    chosen = [r for r in json.loads(path.read_text()) if r.get("threshold") is not None and "consistency" in r]
    if not chosen:
        raise ValueError(f"{path} certifies no token criterion; pass --exit CRITERION:THRESHOLD")
    return make_criterion(chosen[0]["criterion"], chosen[0]["threshold"])


def _encode(tokenizer, prompts: list[str]):
    """(input_ids, attention_mask) of the prompts, left-padded so that every row's last token is a real one."""
    if len(prompts) > 1 and tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no padding or end-of-sequence token: give one --prompt at a time")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    if enc["input_ids"].shape[1] == 0:
        raise ValueError("the prompt is empty")
    return enc["input_ids"], enc["attention_mask"]


def cmd_generate(args: argparse.Namespace) -> int:
    from depthprune.generation.generate import early_exit_generate

    if not args.prompt:
        raise ValueError("give --prompt TEXT (one or more)")
    criterion = _criterion(args)
    model, tokenizer, heads = _load(args, _model_name(args.model, args.heads), args.heads)
    _check_supported(heads, criterion.name)
    ids, mask = _encode(tokenizer, args.prompt)
    out = early_exit_generate(
        model,
        heads,
        ids,
        mask,
        criterion=criterion,
        max_new_tokens=args.max_new_tokens,
        kv=args.kv,
        deep_prefill=not args.shallow_prefill,
        pad_token_id=tokenizer.pad_token_id,
    )
    rows = []
    for prompt, seq, exits in zip(args.prompt, out.sequences[:, ids.shape[1] :], out.exit_layers, strict=True):
        keep = exits >= 0  # -1: padding after the end of sequence
        tokens, layers = seq[keep].tolist(), exits[keep].tolist()
        rows.append(
            {
                "prompt": prompt,
                "text": tokenizer.decode(tokens, skip_special_tokens=True),
                "tokens": tokens,
                "pieces": [tokenizer.decode([t]) for t in tokens],
                "exit_layers": layers,
                "mean_layers": sum(e + 1 for e in layers) / len(layers) if layers else None,
            }
        )
    if args.json:
        report = {
            "criterion": f"{criterion.name}:{criterion.threshold:g}",
            "kv": args.kv,
            "deep_prefill": not args.shallow_prefill,
            "num_layers": out.num_layers,
            "results": rows,
        }
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{criterion.name}:{criterion.threshold:g}, kv={args.kv}, {'shallow' if args.shallow_prefill else 'deep'} "
        f"prefill; exit layers are 0-based, {out.num_layers - 1} = all {out.num_layers} layers"
    )
    for row in rows:
        print(f"\n{row['prompt']!r} ->")
        print(row["text"])
        print(" ".join(f"{piece!r}@{layer}" for piece, layer in zip(row["pieces"], row["exit_layers"], strict=True)))
        if row["mean_layers"] is not None:
            print(f"mean layers per token: {row['mean_layers']:.2f} of {out.num_layers}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="greedy text generation with token-level early exit; prints the exit layers")
    p.add_argument("model", nargs="?", default=None, help="the causal LM (default: the heads folder's, else smollm2)")
    p.add_argument("--heads", help="folder of decoder exit heads (train-exits on a causal LM); default: logit lens")
    p.add_argument("--exit", help="CRITERION:THRESHOLD, e.g. max_prob:0.9 (default: the calibrated one in --heads)")
    p.add_argument("--kv", default="propagate", choices=KV_STRATEGIES.names(), help="skipped layers' KV cache")
    p.add_argument("--shallow-prefill", action="store_true", help="the prompt's last token may exit too")
    p.add_argument("--prompt", nargs="+", action="extend", help="prompt text(s), generated as one batch")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true")
    add_tokenizer_option(p)
    p.set_defaults(func=cmd_generate)
