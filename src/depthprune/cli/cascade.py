"""`depthprune generate MODEL --little MODEL --cascade fallback|rollback|lossless`: big/little cascade decoding (a
thin wrapper over depthprune.generation.cascade), with --compare (tokens/s beside plain generate of the big model)."""

from __future__ import annotations

import argparse
import json
import sys

MODES = ("fallback", "rollback", "lossless")  # depthprune.generation.cascade.MODES, without importing torch


def add_cascade_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("big/little cascades (BiLD; the big model is MODEL, the little one --little)")
    g.add_argument(
        "--little", metavar="MODEL", help="the little causal LM (same tokenizer), e.g. a pruned + healed copy"
    )
    g.add_argument(
        "--cascade",
        choices=MODES,
        help="fallback: the little model decides, the big one takes the tokens it is unsure of; rollback: also "
        "rewrites from the first little token the big one finds unlikely; lossless: the little one drafts, the big "
        "one verifies (token-identical to plain generate)",
    )
    g.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="fallback: the little confidence (max probability) at or below which the big model decides; rollback: "
        "the big model's probability of a little token below which it rewrites; lossless: optional, stops drafting "
        "early (default 0)",
    )
    g.add_argument("--fallback", type=float, metavar="T", help="rollback: the fallback threshold too (default 0)")
    g.add_argument("--run-len", type=int, default=None, metavar="K", help="the longest little run per round")
    g.add_argument(
        "--little-vocab",
        type=float,
        metavar="COVERAGE",
        help="the little model's head projects onto the fewest tokens covering this share of the calibration text "
        "(e.g. 0.95); the big model reads the full vocabulary",
    )


def wants_cascade(args: argparse.Namespace) -> bool:
    """Whether the options ask for a cascade (--little or --cascade), after checking they go together."""
    little, mode = getattr(args, "little", None), getattr(args, "cascade", None)
    if not little and not mode:
        given = (("--threshold", args.threshold), ("--fallback", args.fallback), ("--run-len", args.run_len),
                 ("--little-vocab", args.little_vocab))  # fmt: skip
        extra = [f for f, v in given if v is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)} set a cascade: add --little MODEL --cascade MODE or drop them")
        return False
    if not little or not mode:
        raise ValueError("a cascade needs both --little MODEL and --cascade fallback|rollback|lossless")
    others = [f for f, v in (("--speculative", args.speculative), ("--skipdecode", args.skipdecode),
                             ("--exit", args.exit), ("--heads", args.heads), ("--kv", args.kv),
                             ("--draft-len", args.draft_len), ("--draft-layers", args.draft_layers),
                             ("--draft-vocab", args.draft_vocab),
                             ("--routers", getattr(args, "routers", None))) if v]  # fmt: skip
    if others:
        raise ValueError(f"{', '.join(others)} belong to other decoders; a --cascade uses --little and its options")
    if not args.prompt:
        raise ValueError("give --prompt TEXT (one or more)")
    if args.run_len is not None and args.run_len < 1:
        raise ValueError(f"--run-len is the longest little run per round and must be >= 1, got {args.run_len}")
    if mode in ("fallback", "rollback") and args.threshold is None:
        what = "the little confidence" if mode == "fallback" else "the big model's probability of a little token"
        raise ValueError(
            f"--cascade {mode} needs --threshold T in [0, 1] ({what}); calibrate one with "
            "depthprune.generation.cascade.calibrate_cascade (benchmarks/cascade_bench.py does it for SmolLM2)"
        )
    if args.fallback is not None and mode != "rollback":
        raise ValueError("--fallback is rollback's second threshold; with --cascade fallback, use --threshold")
    if args.max_new_tokens < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--max-new-tokens and --repeats must be >= 1, --warmup >= 0")
    return True


def cmd_cascade(args: argparse.Namespace) -> int:
    import torch

    from depthprune.bench.generation import compare_tokens_per_s, new_tokens, plain_greedy, plain_sample
    from depthprune.cli.common import encode_prompts, sampling_kwargs, sampling_label, sampling_options, tokenizer_for
    from depthprune.decoding import special_tokens
    from depthprune.generation.cascade import LITTLE, cascade_generate, cascade_settings
    from depthprune.io import DEFAULT_MODEL, load_model, load_tokenizer

    mode = args.cascade
    run_len = args.run_len or (4 if mode == "lossless" else 8)
    settings = {"fallback": args.fallback, "rollback": None}
    if mode == "fallback" or (mode == "lossless" and args.threshold is not None):
        settings["fallback"] = args.threshold
    elif mode == "rollback":
        settings["rollback"] = args.threshold
    cascade_settings(mode, settings["fallback"], settings["rollback"], run_len)  # bad settings: before any load
    sampling = sampling_options(args, "cascade")
    name = args.model or DEFAULT_MODEL
    big, little = load_model(name, task="causal-lm").eval(), load_model(args.little, task="causal-lm").eval()
    tokenizer = tokenizer_for(args, name)
    little_tokenizer = load_tokenizer(args.little) if not args.tokenizer else tokenizer
    vocab = None
    if args.little_vocab is not None:
        from depthprune.data import calibration_text
        from depthprune.exits.vocab_heads import frequent_tokens

        if not 0 < args.little_vocab <= 1:
            raise ValueError(f"--little-vocab is a share of the calibration tokens, in (0, 1]; got {args.little_vocab}")
        tokens = torch.tensor(tokenizer(calibration_text())["input_ids"])
        eos_ids, _ = special_tokens(big, None, None)
        vocab, _ = frequent_tokens(tokens, big.config.vocab_size, coverage=args.little_vocab, always=eos_ids)
    ids, mask = encode_prompts(tokenizer, args.prompt)
    eos, pad = special_tokens(big, None, tokenizer.pad_token_id)
    p, n = ids.shape[1], args.max_new_tokens

    def run():
        return cascade_generate(
            big, little, ids, mask, mode=mode, draft_len=run_len, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad,
            big_tokenizer=tokenizer, little_tokenizer=little_tokenizer, little_vocab=vocab, **settings,
            **sampling_kwargs(sampling),
        )  # fmt: skip

    out = run()
    new = out.sequences[:, p:]
    rows = []
    for r, prompt in enumerate(args.prompt):
        keep = [i for i, s in enumerate(out.source[r].tolist()) if s >= 0]
        tokens = [int(new[r, i]) for i in keep]
        rows.append({
            "prompt": prompt, "text": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": tokens,
            "little": [int(out.source[r, i]) == LITTLE for i in keep],
        })  # fmt: skip
    label = f"cascade {mode}" + (f" ({args.threshold:g})" if args.threshold is not None else "")
    report = {"decoder": "cascade", "little": args.little, "decoding": sampling_label(sampling), **out.summary(),
              "results": rows}  # fmt: skip

    def base() -> int:
        if sampling is None:
            return new_tokens(plain_greedy(big, ids, mask, n, eos, pad)[:, p:], eos)
        torch.manual_seed(sampling["seed"])
        sampled = plain_sample(big, ids, mask, n, eos, pad, sampling["temperature"], sampling["top_k"])
        return new_tokens(sampled[:, p:], eos)

    if args.compare:
        timing = compare_tokens_per_s(
            {"generate": base, label: lambda: new_tokens(run().sequences[:, p:], eos)},
            "generate", repeats=args.repeats, warmup=args.warmup,
        )  # fmt: skip
        report["compare"] = {"batch": ids.shape[0], "repeats": args.repeats, "warmup": args.warmup,
                             "generate": timing["generate"], "decoder": {"name": label, **timing[label]}}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{label}: big {name}, little {args.little}; the little model decided {out.little_share():.0%} of the tokens "
        f"({out.accepted} of {out.drafted} little tokens kept, {out.rounds} big-model passes; @big: the big model's)"
        + (f"; {sampling_label(sampling)}" if sampling else "")
        + (
            "; token-identical to plain generate of the big model"
            if mode == "lossless" and sampling is None
            else "; distributed as sampling from the big model alone"
            if mode == "lossless"
            else ""
        )
    )
    for row in rows:
        print(f"\n{row['prompt']!r} ->\n{row['text']}")
        pieces = [tokenizer.decode([t]) for t in row["tokens"]]
        print(
            " ".join(
                f"{piece!r}{'' if little else '@big'}" for piece, little in zip(pieces, row["little"], strict=True)
            )
        )
    if args.compare:
        c = report["compare"]
        print(
            f"\ntokens/s (batch of {c['batch']}, whole calls with prefill, median of {c['repeats']} interleaved rounds "
            f"after {c['warmup']} warm-up): plain generate {c['generate']['tok_s']:.1f}, {label} "
            f"{c['decoder']['tok_s']:.1f} ({c['decoder']['ratio']:.2f}x)",
            file=sys.stdout,
        )
    return 0
