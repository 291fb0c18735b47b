"""The `depthprune` command: thin commands over the library (anything here is one import away in Python)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import types
from collections.abc import Callable, Sequence

from depthprune.cli import harness, report
from depthprune.cli.common import (
    MODEL_HELP,
    Preprocessors,
    add_calibration_options,
    add_tokenizer_option,
    calibration_from_args,
    tokenizer_for,
)
from depthprune.cli.gguf import GGUF_HELP, add_gguf_option, check_output, save_output


def _add_removal(p: argparse.ArgumentParser, scorer: str, plans: str) -> None:
    """The model, which layers go (--remove N chosen by --scorer, or --plan) and the output folder."""
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--remove", type=float, help="layers to remove: a count (8) or a fraction (0.25)")
    how.add_argument("--plan", help=f"explicit layer plan, e.g. {plans}")
    speech = " (block_influence with --audio)" if scorer == "lookahead_kl" else ""
    p.add_argument("--scorer", help=f"scorer choosing the layers (default {scorer}{speech})")
    p.set_defaults(default_scorer=scorer)
    p.add_argument("-o", "--output", required=True, help=GGUF_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    add_gguf_option(p)


def _add_healer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a healer option (repeatable), e.g. --option epochs=2 --option init=last; values are read as int, "
        "float, true/false, none, else text (see the healer's docstring)",
    )


def parse_option_value(text: str) -> object:
    """A healer option's value from the command line: int, float, true/false, none, else the text itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(items: Sequence[str]) -> dict[str, object]:
    """`--option key=value` items as keyword arguments (a clear error for a malformed or repeated key)."""
    options: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not all(part.isidentifier() for part in key.split(".")):
            raise ValueError(
                f"--option {item!r}: write KEY=VALUE, e.g. --option epochs=2 (in a chain: --option distill.epochs=2)"
            )
        if key in options:
            raise ValueError(f"--option {key} is given twice")
        options[key] = parse_option_value(value)
    return options


def cmd_analyze(args: argparse.Namespace) -> int:
    from depthprune.bench.report import format_table
    from depthprune.io import load_model
    from depthprune.static.analyze import analyze, score_rows, write_analysis

    model, tokenizer = load_model(args.model), tokenizer_for(args, args.model)
    scorers = args.scorers.split(",") if args.scorers else None
    results = analyze(
        model,
        calibration_from_args(args, tokenizer),
        scorers=scorers,
        n_remove=args.remove,
        stack=args.stack,
        progress=not args.json,
    )
    files = write_analysis(results, args.out)
    if args.json:
        print(json.dumps({name: r.to_dict() for name, r in results.items()}, indent=2))
    else:
        rows = score_rows(results)
        print(format_table(rows, columns=["layer", *results], title="per-layer importance (higher = more important)"))
        for name, r in results.items():
            print(f"{name}: would remove {list(r.remove)}  ({r.details.get('seconds', 0):.1f} s)")
        print(f"plot: {files['png']}  table: {files['csv']}  json: {files['json']}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from depthprune.io import has_tokenizer, load_model
    from depthprune.plan import LayerPlan
    from depthprune.static.prune import prune

    gguf_source = check_output(args)  # before minutes of loading and scoring
    if args.scorer is None:  # lookahead_kl reads a causal LM head: speech models are scored by block influence
        args.scorer = "block_influence" if args.audio is not None else args.default_scorer
    if args.plan is not None:
        LayerPlan.parse(args.plan)  # a malformed plan fails before the model loads
    options = parse_options(args.option)
    if args.heal:
        from depthprune.static.heal import stage_options

        stage_options(args.heal, options)  # an unknown method or a chain's unnamed option fails before loading
    if options and not args.heal:
        raise ValueError("--option sets a healer's options; it needs --heal METHOD")
    if args.audio is not None:
        return _prune_speech(args, options, gguf_source)
    model = load_model(args.model)
    if args.plan is not None:  # a plan tokenizes nothing: the tokenizer is only copied along when there is one
        source = args.tokenizer or args.model
        tokenizer = tokenizer_for(args, source) if args.tokenizer or has_tokenizer(source) else None
        result = prune(model, plan=args.plan)
    else:
        tokenizer = tokenizer_for(args, args.model)
        result = prune(
            model,
            remove=args.remove,
            scorer=args.scorer,
            batches=calibration_from_args(args, tokenizer),
            stack=args.stack,
            progress=True,
        )
    healed = ""
    if args.heal:
        from depthprune.static.heal import heal

        if tokenizer is None:
            tokenizer = tokenizer_for(args, args.model)
        batches = calibration_from_args(args, tokenizer)
        result.model = heal(model, result.plan, batches, method=args.heal, progress=True, **options)
        healed = f", healed by {args.heal}"
    out = save_output(result.model, tokenizer, args, gguf_source)
    print(f"plan {result.plan.to_text()}" + (f" (chosen by {args.scorer})" if result.scores else "") + healed)
    if tokenizer is None:
        print(f"{args.model} has no tokenizer: saved the model alone (add one with --tokenizer)")
    loader = f"llama.cpp, or from_pretrained(folder, gguf_file={out.name!r})" if gguf_source else "from_pretrained"
    print(f"saved to {out}; load it with {loader}" + ("" if gguf_source else f"({str(out)!r})"))
    return 0


def _speech_model(name: str, otherwise: str) -> tuple:
    """(model, feature extractor) of the speech encoder-decoder `name` for `--audio`, or a clear error: `otherwise`
    says what to do with a model that is not one."""
    from transformers import AutoFeatureExtractor

    from depthprune.io import load_model, local_folder

    model = load_model(name)
    if not getattr(model.config, "is_encoder_decoder", False) or model.main_input_name != "input_features":
        kind = type(model).__name__
        raise ValueError(f"--audio needs a speech encoder-decoder (Whisper); {name} is a {kind}: {otherwise}")
    try:
        return model, AutoFeatureExtractor.from_pretrained(local_folder(name))
    except (OSError, ValueError) as err:
        raise ValueError(f"{name} has no feature extractor (preprocessor_config.json): {err}") from None


def _prune_speech(args: argparse.Namespace, options: dict[str, object], gguf_source: str | None) -> int:
    """`prune SPEECH_MODEL --plan ... --heal distill --audio DIR`: heal on the WAV files of DIR, the encoder frozen;
    `--remove N [--scorer S] [--stack decoder|encoder]`: the plan chosen by the scorer on DIR's speech and the model's
    own transcripts of it (healed too with --heal)."""

    from depthprune.audio import audio_files, speech_batches
    from depthprune.io import has_tokenizer
    from depthprune.plan import LayerPlan
    from depthprune.static.heal import heal

    if not args.heal and args.plan is not None:
        raise ValueError(
            "--audio is the calibration speech of a healer or a scorer: add --heal distill, or choose the layers on it "
            "with --remove N instead of --plan (or drop --audio)"
        )
    if gguf_source is not None:
        raise ValueError("a speech model exports to a folder, not GGUF: give -o FOLDER")
    audio_files(args.audio)  # a missing or empty folder fails before the model loads
    model, extractor = _speech_model(args.model, "heal or score it on calibration text (drop --audio)")
    batches = speech_batches(extractor, args.audio, batch_size=8)
    source = args.tokenizer or args.model
    tokenizer = tokenizer_for(args, source) if args.tokenizer or has_tokenizer(source) else None
    utterances = sum(len(b["input_features"]) for b in batches)
    if args.plan is not None:
        plan, chosen = LayerPlan.parse(args.plan), ""
    else:
        from depthprune.static.heal.distill_seq2seq import with_transcripts
        from depthprune.static.prune import prune

        scored = with_transcripts(model, batches)  # the decoder runs on the model's own transcripts
        plan = prune(model, remove=args.remove, scorer=args.scorer, batches=scored, stack=args.stack).plan
        chosen = f" (chosen by {args.scorer} on {utterances} utterances)"
    if args.heal:
        pruned = heal(model, plan, batches, method=args.heal, progress=True, **options)
        healed = f", healed by {args.heal} on {utterances} utterances of {args.audio}"
    else:
        from depthprune.static.apply import apply_plan

        pruned, healed = apply_plan(model, plan), ""
    out = save_output(pruned, Preprocessors(tokenizer, extractor), args, None)
    print(f"plan {plan.to_text()}{chosen}{healed}")
    print(f"saved to {out}; load it with from_pretrained({str(out)!r}) or pipeline('automatic-speech-recognition')")
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    from depthprune.io import load_model
    from depthprune.plan import LayerPlan
    from depthprune.static.heal import heal, stage_options
    from depthprune.static.prune import prune

    gguf_source = check_output(args)
    args.scorer = args.scorer or args.default_scorer
    options = parse_options(args.option)
    stage_options(args.method, options)
    if args.plan is not None:
        LayerPlan.parse(args.plan)
    model = load_model(args.model)
    tokenizer = tokenizer_for(args, args.model)
    batches = calibration_from_args(args, tokenizer)
    if args.plan is not None:
        plan = LayerPlan.parse(args.plan)
    else:
        plan = prune(model, remove=args.remove, scorer=args.scorer, batches=batches, stack=args.stack).plan
    healed = heal(model, plan, batches, method=args.method, progress=not args.json, **options)
    out = save_output(healed, tokenizer, args, gguf_source)
    record = getattr(healed.config, "depthprune_healing", None) or {}
    summary = {"plan": plan.to_text(), "method": args.method, "output": str(out), **record}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"plan {plan.to_text()} healed by {args.method}; saved to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.lm_eval:
        return harness.run(args)
    if args.audio is not None:
        return _eval_speech(args)
    from depthprune.bench.evaluate import evaluate_models
    from depthprune.data import heldout_text, token_blocks
    from depthprune.io import load_model

    model, tokenizer = load_model(args.model), tokenizer_for(args, args.model)
    models = {"model": model}
    baseline_name = args.baseline or (getattr(model.config, "depthprune", None) or {}).get("source")
    if baseline_name and not args.no_baseline:
        models = {"untouched": load_model(baseline_name), "model": model}
    try:
        blocks = token_blocks(tokenizer, heldout_text(args.heldout), args.seq_len, args.blocks)
    except ValueError as err:
        where = f"--heldout {args.heldout}" if args.heldout else "the packaged held-out text"
        raise ValueError(f"{where}: {err} (--seq-len {args.seq_len}, --blocks {args.blocks})") from None
    report = evaluate_models(
        models,
        tokenizer,
        blocks,
        baseline=next(iter(models)),
        speed=not args.no_speed,
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        repeats=args.repeats,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.table(title=f"held-out perplexity ({blocks.numel()} tokens) and speed vs {next(iter(models))!r}"))
    return 0


def _eval_speech(args: argparse.Namespace) -> int:
    """`eval SPEECH_MODEL --audio DIR`: WER and end-to-end transcription speed beside the baseline."""
    import torch

    from depthprune.audio import audio_files, speech_batches
    from depthprune.bench.report import format_table
    from depthprune.bench.speech import evaluate_speech, references
    from depthprune.io import load_model

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.max_new_tokens < 1 or args.repeats < 1 or any(b < 1 for b in sizes):
        raise ValueError("--max-new-tokens, --repeats and every --batch-sizes entry must be >= 1")
    audio_files(args.audio)  # a missing or empty folder fails before the model loads
    refs = references(args.audio)
    model, extractor = _speech_model(args.model, "evaluate it on held-out text (drop --audio)")
    tokenizer = tokenizer_for(args, args.model)
    features = torch.cat([b["input_features"] for b in speech_batches(extractor, args.audio)])
    models = {"model": model}
    baseline_name = args.baseline or (getattr(model.config, "depthprune", None) or {}).get("source")
    if baseline_name and not args.no_baseline:
        models = {"untouched": load_model(baseline_name), "model": model}
    report = evaluate_speech(models, tokenizer, features, refs, baseline=next(iter(models)), batch_sizes=sizes,
                             repeats=args.repeats, max_new_tokens=args.max_new_tokens)  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        title = (
            f"{len(features)} utterances of {args.audio}: WER (%) and seconds per utterance vs {report['baseline']!r}"
        )
        print(format_table(report["rows"], title=title))
        if refs is None:
            print("no reference texts in the folder (texts.json or NAME.txt): WER against the baseline only")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from depthprune.demo import run_demo

    run_demo(args.out, model_name=args.model, overwrite=args.overwrite, speed_repeats=args.repeats)
    return 0


def list_registries() -> dict[str, list[dict[str, str]]]:
    """Every registry (scorers, both kinds of exit criteria, recipes, KV strategies, decoder head kinds) and the
    supported model types, as {key: [{name, description, ...}]}: what `depthprune list` prints."""
    from depthprune.adapters.registry import get_adapter, supported_model_types
    from depthprune.registry import REGISTRIES

    out = {key: registry.describe() for key, registry in REGISTRIES.items()}
    out["model_types"] = []
    for model_type in supported_model_types():
        adapter = get_adapter(types.SimpleNamespace(model_type=model_type))
        stacks = ", ".join(s.name for s in adapter.stacks)
        extra = "; classifier early exit" if adapter.classification_head is not None else ""
        out["model_types"].append({"name": model_type, "description": f"{adapter.family} ({stacks}){extra}"})
    return out


def cmd_list(args: argparse.Namespace) -> int:
    from depthprune.registry import REGISTRIES

    listing = list_registries()
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    from depthprune.bench.report import format_table

    titles = {key: registry.plural for key, registry in REGISTRIES.items()} | {"model_types": "model types"}
    for key, rows in listing.items():
        print(f"{titles[key]}: {', '.join(r['name'] for r in rows)}")
    for key, rows in listing.items():
        print()
        print(format_table([{"name": r["name"], "description": r["description"]} for r in rows], title=titles[key]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depthprune", description="Make Transformer models shallower, measured.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="score every layer with every scorer: table, CSV/JSON and a PNG plot")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--scorers", help="comma-separated scorer names (default: all; see `depthprune list`)")
    p.add_argument("--remove", type=int, default=1, help="layers each scorer should choose to remove (default 1)")
    p.add_argument("-o", "--out", default="out/analyze", help="folder for scores.csv/json and layer_scores.png")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_calibration_options(p)
    add_tokenizer_option(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("prune", help="remove layers (chosen by a scorer, or an explicit plan) and export the model")
    _add_removal(p, "lookahead_kl", "'0-19,22,24-29', '0,1,2,2,3', 'encoder=0-5;decoder=0-2'")
    add_calibration_options(p)
    p.add_argument(
        "--heal", help="heal the pruned model with this method on the calibration text (e.g. fold, or fold+distill)"
    )
    _add_healer_options(p)
    p.add_argument(
        "--audio",
        metavar="DIR",
        help="speech models (Whisper): a folder of 16 kHz WAV files to heal (--heal distill) and score (--remove N) "
        "on, instead of calibration text; the full model's transcripts are the targets",
    )
    add_tokenizer_option(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("heal", help="remove layers and heal the damage (e.g. a training-free linear fold), then export")
    _add_removal(p, "block_influence", "'0-19,22,24-29' (pure removals)")
    p.add_argument(
        "--method",
        default="fold",
        help="healing method, or a chain such as fold+distill (default fold; `depthprune list`)",
    )
    _add_healer_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_calibration_options(p)
    add_tokenizer_option(p)
    p.set_defaults(func=cmd_heal)

    p = sub.add_parser("eval", help="held-out perplexity and speed, side by side with the untouched model")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP + " (or a folder written by `prune`)")
    p.add_argument("--baseline", help="model to compare with (default: the source recorded by `prune`)")
    p.add_argument("--no-baseline", action="store_true", help="measure the model alone")
    p.add_argument(
        "--heldout",
        metavar="PATH",
        help="evaluation text (the part from 'CHAPTER 110.' on, else the last "
        "20%%); default: the held-out Moby-Dick excerpt shipped with depthprune",
    )
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--batch-sizes", default="1,8", help="decode batch sizes (default 1,8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-speed", action="store_true", help="perplexity only")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--audio",
        metavar="DIR",
        help="speech models (Whisper): WER and transcription speed on the 16 kHz WAV files of DIR, against their "
        "references (texts.json or NAME.txt, if any) and the baseline's transcripts",
    )
    p.add_argument("--max-new-tokens", type=int, default=96, help="--audio: transcript length cap (default 96)")
    add_tokenizer_option(p)
    harness.add_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "demo", help="the main job on the embedded SmolLM2: every scorer, 25%% pruned, measured, exported"
    )
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--out", default="out/demo")
    p.add_argument("--repeats", type=int, default=3, help="speed measurement repeats (default 3)")
    p.add_argument("--overwrite", action="store_true", help="replace the exported model from an earlier run")
    p.set_defaults(func=cmd_demo)

    from depthprune.cli import train_layerskip, train_skipdecode
    from depthprune.cli.diffusion import add_commands as add_diffusion_commands
    from depthprune.cli.exits import add_commands
    from depthprune.cli.fusion import add_commands as add_fusion_commands
    from depthprune.cli.generation import add_commands as add_generation_commands
    from depthprune.cli.search import add_commands as add_search_commands
    from depthprune.cli.serving import add_commands as add_serving_commands
    from depthprune.cli.skipping import add_commands as add_skipping_commands

    add_diffusion_commands(sub)
    add_fusion_commands(sub)
    add_commands(sub)
    add_generation_commands(sub)
    add_search_commands(sub)
    add_serving_commands(sub)
    report.add_command(sub)
    add_skipping_commands(sub)

    p = sub.add_parser(
        "train-skipdecode",
        help="adapt a causal LM to a SkipDecode schedule (--speedup S) with LoRA, through Accelerate; writes the "
        "merged model; multi-process: accelerate launch -m depthprune train-skipdecode ...",
        description=train_skipdecode.DESCRIPTION,
    )
    train_skipdecode.add_arguments(p)
    p.set_defaults(func=functools.partial(train_skipdecode.run, parser=p))

    p = sub.add_parser(
        "train-layerskip",
        help="train a causal LM's backbone for early exits (LayerSkip: layer dropout + early-exit loss, curriculum) "
        "with LoRA; writes the adapter; multi-process: accelerate launch -m depthprune train-layerskip ...",
        description=train_layerskip.DESCRIPTION,
    )
    train_layerskip.add_arguments(p)
    p.set_defaults(func=functools.partial(train_layerskip.run, parser=p))

    p = sub.add_parser(
        "list",
        help="list every registry: scorers, exit criteria (classifiers and generation), training recipes, KV "
        "strategies, decoder exit-head kinds, supported model types",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_list)
    return parser


def _train_exits(argv: list[str]) -> int:
    from depthprune.cli.exits import train_exits_main

    return train_exits_main(argv)


DELEGATED: dict[str, Callable[[list[str]], int]] = {"train-exits": _train_exits}
"""Commands whose options depend on their arguments and so are parsed by their own parser: train-exits trains a
classifier's exits or a causal LM's (depthprune.cli.train_exits / train_lm_exits), chosen by the model."""


def main(argv: Sequence[str] | None = None) -> int:
    from depthprune.errors import DepthpruneError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command in DELEGATED:
            return DELEGATED[command](argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (DepthpruneError, ValueError, FileNotFoundError) as err:
        print(f"depthprune {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
