"""Early-exit generation commands: generate and `calibrate` for decoder exit heads (thin wrappers over
depthprune.generation)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from depthprune.cli.cascade import add_cascade_options, cmd_cascade, wants_cascade
from depthprune.cli.common import (
    CALIBRATION_FILE,
    add_tokenizer_option,
    calibrate_check_write,
    encode_prompts,
    sampling_kwargs,
    sampling_label,
    sampling_options,
    tokenizer_for,
)
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
def _records(heads_dir: str | None) -> list[dict]:
    """The generation calibrations saved beside the heads (calibration.json, written by `depthprune calibrate`)."""
    path = Path(heads_dir or ".") / CALIBRATION_FILE
    if not heads_dir or not path.is_file():
        return []
    return [r for r in json.loads(path.read_text()) if isinstance(r, dict) and "consistency" in r]


def _criterion(args: argparse.Namespace):
    """(criterion, kv, deep prefill, the calibration that certifies them or None): --exit as given, else the threshold
    calibrated for --heads (with its KV strategy and prefill unless overridden). A criterion no calibration certifies is
    refused unless --uncalibrated: an untried threshold can exit every token at the first layers and print garbage."""
    from depthprune.exits.token_criteria import parse_criterion
    from depthprune.generation.calibrate import calibrated_criterion, certified_thresholds, certifying_record

    records = _records(args.heads)
    if args.exit:
        criterion, saved = parse_criterion(args.exit), {}
    else:
        found = calibrated_criterion(records)
        if found is None:
            where = (
                f"{Path(args.heads) / CALIBRATION_FILE} certifies no token criterion"
                if args.heads and (Path(args.heads) / CALIBRATION_FILE).is_file()
                else f"{args.heads} holds no {CALIBRATION_FILE}"
                if args.heads
                else "the default logit-lens heads have no calibrated threshold"
            )
            raise ValueError(f"{where}; {_how_to_calibrate(args)}, or pass --exit CRITERION:THRESHOLD --uncalibrated")
        criterion, saved = found
    kv = args.kv or saved.get("kv", "propagate")
    deep = bool(saved.get("deep_prefill", True)) and not args.shallow_prefill
    record = certifying_record(records, criterion, kv=kv, deep_prefill=deep)
    if record is None and not args.uncalibrated:
        how = _how_to_calibrate(args)
        name = f"{criterion.name}:{criterion.threshold:g}"
        setting = f"kv={kv}, {'deep' if deep else 'shallow'} prefill"
        if not args.heads:
            why = f"{name} is not calibrated for the default logit-lens heads"
        elif not records:
            why = f"{name} is not calibrated for {args.heads} (it holds no generation {CALIBRATION_FILE})"
        else:
            known = "; ".join(
                f"{r['criterion']} at {', '.join(f'{t:g}' for t in certified_thresholds(r)) or 'none'} "
                f"(kv={r.get('kv', 'propagate')}, {'deep' if r.get('deep_prefill', True) else 'shallow'} prefill)"
                for r in records
            )
            why = (
                f"{name} ({setting}) is not certified by {Path(args.heads) / CALIBRATION_FILE}, which certifies {known}"
            )
        raise ValueError(
            f"{why}. A threshold that was not calibrated for the heads in use can exit almost every token after the "
            f"first layers and print garbage (the logit lens of a tied head predicts the input token with high "
            f"confidence). {how[0].upper() + how[1:]}; or run it anyway with --uncalibrated (a warning "
            "then states how often the exits agree with the full model)"
        )
    if record is not None and args.uncalibrated:
        raise ValueError(
            f"{criterion.name}:{criterion.threshold:g} is calibrated for {args.heads}: drop --uncalibrated"
        )
    return criterion, kv, deep, record


def _how_to_calibrate(args: argparse.Namespace) -> str:
    if args.heads:
        return f"calibrate a threshold with `depthprune calibrate {args.heads} --criterion NAME` (then omit --exit)"
    model = args.model or "MODEL"
    return (
        f"train exit heads and calibrate them: `depthprune train-exits {model} --kind lens --fit --epochs 0 -o HEADS`, "
        "`depthprune calibrate HEADS --criterion NAME`, then `generate --heads HEADS`"
    )


def _uncalibrated_warning(args, model, tokenizer, heads, ids, mask, criterion) -> dict:
    """Measure (teacher forcing, one forward pass) how the uncalibrated criterion and the exits do on the prompts and
    on 2 x 64 tokens of the packaged held-out text; print a warning saying so; return the figures."""
    import torch

    from depthprune.data import heldout_text
    from depthprune.generation.calibrate import prompt_blocks, teacher_forced_agreement

    figures = {"prompt": teacher_forced_agreement(model, heads, ids, mask, criterion)}
    try:
        held = prompt_blocks(tokenizer, heldout_text(), 2, 64)
    except ValueError:  # a tokenizer that makes too few tokens of the excerpt: the prompts alone
        held = None
    if held is not None:
        figures["heldout"] = teacher_forced_agreement(model, heads, held, torch.ones_like(held), criterion)
    heads_name = args.heads or "the default logit-lens heads"
    lines = [
        f"warning: {criterion.name}:{criterion.threshold:g} is not calibrated for {heads_name}; measured by "
        "teacher forcing:"
    ]
    for what, f in figures.items():
        per_layer = f["per_layer"]
        best = max(per_layer, key=per_layer.get)
        text = "the prompt" if what == "prompt" else "2 x 64 held-out tokens"
        lines.append(
            f"  on {text} ({f['positions']} positions): it exits after {f['mean_layers']:.1f} of {f['num_layers']} "
            f"layers on average and picks the full model's next token at {f['agreement']:.0%} of positions; the exits "
            f"alone agree with the full model on {min(per_layer.values()):.0%}-{per_layer[best]:.0%} "
            f"(best: after layer {best})"
        )
    lines.append(f"  {_how_to_calibrate(args)}")
    print("\n".join(lines), file=sys.stderr)
    return figures


DEFAULT_DRAFT_LEN = 2  # what choose_speculation picked on SmolLM2 (benchmarks/RESULTS.md 4a)


def _decoder(args: argparse.Namespace) -> str:
    """Which decoder the options ask for ("exit", "speculative" or "skipdecode"), or a clear error for options that do
    not go together; checked before anything loads."""
    if not args.prompt:
        raise ValueError("give --prompt TEXT (one or more)")
    if args.speculative and args.skipdecode is not None:
        raise ValueError("--speculative and --skipdecode are two different decoders; pick one")
    phases = args.decode_plan is not None or args.prefill_plan is not None
    if phases and (args.speculative or args.skipdecode is not None):
        raise ValueError(
            "--decode-plan / --prefill-plan run a static layer plan per phase; --speculative and --skipdecode are "
            "other decoders: pick one"
        )
    decoder = (
        "phases" if phases else "speculative" if args.speculative else "skipdecode" if args.skipdecode is not None
        else "exit"
    )  # fmt: skip
    if decoder != "exit":
        flag = {"phases": "--decode-plan"}.get(decoder, f"--{decoder}")
        how = {
            "speculative": "drafts with the first layers and verifies with the full model",
            "skipdecode": "runs a fixed schedule of top layers per position",
            "phases": "runs fixed layer plans for the prompt and for the generated tokens",
        }[decoder]
        used = [
            name
            for name, value in (
                ("--exit", args.exit),
                ("--kv", args.kv if decoder != "phases" else None),  # phases: the prompt's missing KV entries
                ("--shallow-prefill", args.shallow_prefill),
                ("--uncalibrated", getattr(args, "uncalibrated", False)),
            )
            if value
        ]
        if used:
            raise ValueError(
                f"{', '.join(used)} set token-level early exit, which {flag} does not use ({flag} {how}); "
                f"drop {' '.join(used)} or {flag}"
            )
    if decoder == "skipdecode" and args.heads:
        raise ValueError(
            "--skipdecode uses no exit heads (every position runs the top layers of its schedule); drop --heads"
        )
    if decoder == "phases":
        from depthprune.generation.phases import PROMPT_KV
        from depthprune.plan import LayerPlan

        if args.heads:
            raise ValueError(
                "--decode-plan / --prefill-plan use no exit heads (each phase runs its plan); drop --heads"
            )
        for flag, plan in (("--decode-plan", args.decode_plan), ("--prefill-plan", args.prefill_plan)):
            if plan is not None:
                try:
                    LayerPlan.parse(plan)  # a malformed plan fails before the model loads
                except ValueError as err:
                    raise ValueError(f"{flag}: {err}") from None
        if args.kv is not None and args.kv not in PROMPT_KV:
            raise ValueError(f"--kv {args.kv}: phase generation fills the prompt's entries by {' or '.join(PROMPT_KV)}")
    if decoder != "speculative":
        used = [
            n
            for n, v in (
                ("--draft-layers", args.draft_layers),
                ("--draft-len", args.draft_len),
                ("--draft-vocab", args.draft_vocab),
            )
            if v is not None
        ]
        if used:
            raise ValueError(f"{' and '.join(used)} set the draft of --speculative: add --speculative or drop them")
    if decoder != "skipdecode" and args.min_layers is not None:
        raise ValueError("--min-layers is the depth floor of a --skipdecode schedule: add --skipdecode SPEEDUP")
    if decoder != "skipdecode" and args.skip_cost is not None:
        raise ValueError("--skip-cost says what a --skipdecode SPEEDUP means: add --skipdecode SPEEDUP or drop it")
    if args.draft_len is not None and args.draft_len < 1:
        raise ValueError(
            f"--draft-len is the number of tokens drafted per round and must be >= 1, got {args.draft_len}"
        )
    if args.draft_layers is not None and args.draft_layers < 1:
        raise ValueError(
            f"--draft-layers is how many of the first layers draft and must be >= 1, got {args.draft_layers}"
        )
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return decoder


def _speculative_heads(args: argparse.Namespace, model, depth: int):
    """(exit layer the draft ends at, exit heads that have it): --heads' exits, else the logit lens."""
    from depthprune.exits.lm_heads import DecoderExitHeads

    heads = DecoderExitHeads.load(args.heads, model).eval() if args.heads else None
    draft_layers = args.draft_layers
    if draft_layers is None:  # the heads' deepest exit, else about 4/5 of the depth (RESULTS 4a: 24 of 30 was best)
        draft_layers = max(heads.layers) + 1 if heads is not None else min(depth - 1, max(1, round(0.8 * depth)))
    if not 1 <= draft_layers <= depth - 1:
        raise ValueError(
            f"--draft-layers {draft_layers} out of range: the draft runs the first E layers of this {depth}-layer "
            f"model and the rest verify, so E must lie in 1..{depth - 1}"
        )
    exit_layer = draft_layers - 1
    if heads is None:
        return exit_layer, DecoderExitHeads.logit_lens(model, [exit_layer]).eval()
    if exit_layer not in heads.layers:
        raise ValueError(
            f"--draft-layers {draft_layers} needs an exit after layer {exit_layer} (0-based); the heads in "
            f"{args.heads} have exits after layers {list(heads.layers)}: pass --draft-layers as one of "
            f"{[i + 1 for i in heads.layers]}, or drop --heads to draft through the logit lens"
        )
    return exit_layer, heads


def _truncated(args: argparse.Namespace, heads, tokenizer, eos: list[int]):
    """The draft head projecting onto the tokens that cover --draft-vocab of the packaged calibration text."""
    import torch

    from depthprune.data import calibration_text
    from depthprune.exits.vocab_heads import TruncatedVocabHeads

    if not 0 < args.draft_vocab <= 1:
        raise ValueError(f"--draft-vocab is a share of the calibration tokens, in (0, 1]; got {args.draft_vocab}")
    tokens = torch.tensor(tokenizer(calibration_text())["input_ids"])
    return TruncatedVocabHeads.from_tokens(heads, tokens, coverage=args.draft_vocab, always=eos).eval()


def _skip_schedule(args: argparse.Namespace, model_name: str, depth: int, model, ids, mask):
    """(the SkipDecode schedule, the measured StepCost or None): 'saved' reads the model folder's skip_schedule.json
    (train-skipdecode); a number is floored_schedule over the decode steps (a depth floor, by default a quarter of the
    layers), aimed at measured seconds per token (`measure_step_cost` on these prompts) unless --skip-cost nominal."""
    from depthprune.generation.skipdecode import floored_schedule, measure_step_cost
    from depthprune.generation.skipdecode_train import load_schedule

    if args.skipdecode == "saved":
        if args.min_layers is not None or args.skip_cost is not None:
            raise ValueError(
                "--min-layers and --skip-cost shape a new schedule; --skipdecode saved uses the folder's own"
            )
        return load_schedule(model_name), None
    try:
        speedup = float(args.skipdecode)
    except ValueError:
        raise ValueError(
            f"--skipdecode takes a target speed-up (e.g. 2) or 'saved' (the model folder's skip_schedule.json), "
            f"got {args.skipdecode!r}"
        ) from None
    budget = max(1, args.max_new_tokens - 1)  # the decode steps after the prompt's token
    cost = None
    try:
        floored_schedule(depth, speedup, budget=budget, min_layers=args.min_layers)  # out of reach: before timing
        if args.skip_cost != "nominal":
            cost = measure_step_cost(model, ids, mask, low_layers=args.min_layers)
        return floored_schedule(depth, speedup, budget=budget, min_layers=args.min_layers, cost=cost), cost
    except ValueError as err:
        raise ValueError(f"--skipdecode: {str(err).replace('min_layers=', '--min-layers ')}") from None


def _rows(tokenizer, prompts: list[str], new, layers=None, keep=None) -> list[dict]:
    """One result per prompt: text, tokens and pieces (up to the end of sequence), and the layers behind each token."""
    rows = []
    for r, (prompt, seq) in enumerate(zip(prompts, new.tolist(), strict=True)):
        n = len(seq) if keep is None else int(keep[r])
        tokens = seq[:n]
        row = {
            "prompt": prompt,
            "text": tokenizer.decode(tokens, skip_special_tokens=True),
            "tokens": tokens,
            "pieces": [tokenizer.decode([t]) for t in tokens],
        }
        if layers is not None:
            row["layers"] = layers[r][:n]
        rows.append(row)
    return rows


def _kept(new, eos: list[int]):
    """Per row: new tokens up to and including its first end-of-sequence token."""
    import torch

    if not eos:
        return [new.shape[1]] * new.shape[0]
    hit = torch.isin(new, torch.tensor(eos))
    first = torch.where(
        hit.any(1), hit.float().argmax(1) + 1, torch.full_like(hit[:, 0], new.shape[1], dtype=torch.long)
    )
    return first.tolist()


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from depthprune.bench.generation import compare_tokens_per_s, new_tokens, plain_greedy, plain_sample
    from depthprune.decoding import decoder_parts, special_tokens

    if wants_cascade(args):  # --little MODEL --cascade MODE: depthprune.cli.cascade
        return cmd_cascade(args)
    if args.routers:  # layer skipping (depthprune.cli.skipping)
        from depthprune.cli.skipping import cmd_generate as cmd_generate_routed

        sampling_options(args, "routed")  # greedy only: a clear error for --sample

        return cmd_generate_routed(args)
    decoder = _decoder(args)
    sampling = sampling_options(args, {"exit": "early-exit"}.get(decoder, decoder))
    if decoder == "exit":
        criterion, kv, deep, record = _criterion(args)
    model_name = _model_name(args.model, args.heads)
    if decoder == "exit":
        model, tokenizer, heads = _load(args, model_name, args.heads)
        _check_supported(heads, criterion.name)
    else:
        from depthprune.io import load_model

        model, tokenizer = load_model(model_name, task="causal-lm").eval(), tokenizer_for(args, model_name)
    ids, mask = encode_prompts(tokenizer, args.prompt)
    eos, pad = special_tokens(model, None, tokenizer.pad_token_id)
    depth = len(decoder_parts(model, "generate").layers)
    p, n = ids.shape[1], args.max_new_tokens
    report: dict = {"decoder": decoder, "num_layers": depth, "decoding": sampling_label(sampling)}

    if decoder == "exit":
        from depthprune.generation.generate import early_exit_generate

        report["calibrated"] = record is not None
        if record is None:
            report["uncalibrated_check"] = _uncalibrated_warning(args, model, tokenizer, heads, ids, mask, criterion)
        settings = {"criterion": criterion, "max_new_tokens": n, "kv": kv, "deep_prefill": deep}

        def run():
            return early_exit_generate(model, heads, ids, mask, pad_token_id=pad, **settings)

        out = run()
        exits = out.exit_layers
        keep = (exits >= 0).sum(1).tolist()
        rows = _rows(tokenizer, args.prompt, out.sequences[:, p:], exits.tolist(), keep)
        for row in rows:
            row["exit_layers"] = row.pop("layers")
            layers = row["exit_layers"]
            row["mean_layers"] = sum(e + 1 for e in layers) / len(layers) if layers else None
        report.update(criterion=f"{criterion.name}:{criterion.threshold:g}", kv=kv, deep_prefill=deep)
        header = (
            f"{criterion.name}:{criterion.threshold:g}, kv={kv}, {'deep' if deep else 'shallow'} "
            f"prefill; exit layers are 0-based, {depth - 1} = all {depth} layers"
        )
        if record is not None and record.get("guarantee"):
            header += f"\ncalibrated: {record['guarantee']}"
        name = f"early exit ({criterion.name}:{criterion.threshold:g})"
    elif decoder == "speculative":
        from depthprune.generation.speculative import self_speculative_generate

        exit_layer, heads = _speculative_heads(args, model, depth)
        if args.draft_vocab is not None:
            heads = _truncated(args, heads, tokenizer, eos)
        k = args.draft_len or DEFAULT_DRAFT_LEN

        def run():
            return self_speculative_generate(
                model, heads, ids, mask, exit_layer=exit_layer, draft_len=k, max_new_tokens=n, eos_token_id=eos,
                pad_token_id=pad, **sampling_kwargs(sampling),
            )  # fmt: skip

        out = run()
        rows = _rows(tokenizer, args.prompt, out.sequences[:, p:], keep=_kept(out.sequences[:, p:], eos))
        kind = getattr(heads, "kind", heads.config.kind)
        if kind == "truncated":
            kind = f"{heads.config.kind} on {heads.k} tokens ({heads.info['coverage']:.0%} of calibration text)"
        report.update(
            draft_layers=exit_layer + 1, exit_layer=exit_layer, draft_len=k, heads=args.heads or "logit_lens",
            head_kind=getattr(heads, "kind", heads.config.kind),
            **{key: out.summary()[key] for key in ("rounds", "acceptance_rate", "mean_accepted")},
        )  # fmt: skip
        header = (
            f"self-speculative (LayerSkip exit drafts): layers 0-{exit_layer} + {kind} exit draft {k} token(s) a "
            f"round, the other {depth - exit_layer - 1} of {depth} layers verify; "
            + (
                "greedy, token-identical to plain generate"
                if sampling is None
                else f"{sampling_label(sampling)}, distributed as plain sampling from the full model"
            )
            + f"\naccepted drafts per verification: {out.mean_accepted():.2f} (acceptance rate "
            f"{out.acceptance_rate():.2f}, {out.rounds} rounds)"
        )
        name = f"self-speculative (E={exit_layer + 1}, k={k})"
    elif decoder == "phases":
        from depthprune.generation.phases import DEFAULT_KV, phase_generate, phase_plans

        plans = phase_plans(depth, args.decode_plan, args.prefill_plan, args.kv or DEFAULT_KV)
        settings = {"decode_plan": plans.decode, "prefill_plan": plans.prefill, "kv": plans.kv}

        def run():
            return phase_generate(model, ids, mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad, **settings)

        out = run()
        rows = _rows(tokenizer, args.prompt, out.sequences[:, p:], keep=_kept(out.sequences[:, p:], eos))
        report.update(plans.to_dict())
        shown = plans.to_dict()
        header = (
            f"phases: the prompt runs layers {shown['prefill']} ({len(plans.prefill)} of {depth}), generated tokens "
            f"{shown['decode']} ({len(plans.decode)} of {depth})"
            + (f"; the prompt's entries in layers {list(plans.missing)} by {plans.kv}" if plans.missing else "")
        )
        name = f"phases ({len(plans.prefill)}/{len(plans.decode)} layers)"
    else:
        from depthprune.generation.skipdecode import skipdecode_generate

        schedule, cost = _skip_schedule(args, model_name, depth, model, ids, mask)

        def run():
            return skipdecode_generate(
                model, ids, mask, schedule=schedule, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad
            )

        out = run()
        used = out.layers.tolist()
        keep = (out.layers > 0).sum(1).tolist()
        rows = _rows(tokenizer, args.prompt, out.sequences[:, p:], used, keep)
        s = schedule
        report.update(schedule=s.to_dict(), mean_layers=out.mean_layers(), ideal_speedup=out.speedup())
        header = (
            f"SkipDecode: the top {s.max_layers} -> {s.min_layers} layers (floor) of {depth} per generated token, "
            f"decaying over {s.decay_tokens:.3g} tokens; the first token comes from the full prompt\n"
            f"mean layers per generated token: {out.mean_layers():.2f} of {depth} (layer ratio {out.speedup():.2f}x)"
        )
        if cost is not None:
            predicted = cost.speedup(out.mean_layers())
            report.update(step_cost=cost.to_dict(), predicted_speedup=predicted)
            header += (
                f"\nmeasured step cost: {cost.fixed_s * 1e3:.3g} ms + {cost.per_layer_s * 1e3:.3g} ms per layer at "
                f"batch {cost.batch_size}: predicted decode speed-up {predicted:.2f}x"
            )
        name = f"skipdecode ({s.max_layers}->{s.min_layers})"

    if args.compare:

        def ours() -> int:
            return new_tokens(run().sequences[:, p:], eos)

        def base() -> int:
            if sampling is None:
                return new_tokens(plain_greedy(model, ids, mask, n, eos, pad)[:, p:], eos)
            torch.manual_seed(sampling["seed"])
            sampled = plain_sample(model, ids, mask, n, eos, pad, sampling["temperature"], sampling["top_k"])
            return new_tokens(sampled[:, p:], eos)

        timing = compare_tokens_per_s(
            {"generate": base, name: ours}, "generate", repeats=args.repeats, warmup=args.warmup
        )
        report["compare"] = {
            "batch": ids.shape[0], "repeats": args.repeats, "warmup": args.warmup, "generate": timing["generate"],
            "decoder": {"name": name, **timing[name]},
        }  # fmt: skip
    report["results"] = rows
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(header)
    for row in rows:
        print(f"\n{row['prompt']!r} ->")
        print(row["text"])
        if decoder == "exit":
            print(
                " ".join(f"{piece!r}@{layer}" for piece, layer in zip(row["pieces"], row["exit_layers"], strict=True))
            )
            if row["mean_layers"] is not None:
                print(f"mean layers per token: {row['mean_layers']:.2f} of {depth}")
    if args.compare:
        c = report["compare"]
        print(
            f"\ntokens/s (batch of {c['batch']}, whole calls with prefill, median of {c['repeats']} interleaved rounds "
            f"after {c['warmup']} warm-up): plain generate {c['generate']['tok_s']:.1f}, {name} "
            f"{c['decoder']['tok_s']:.1f} ({c['decoder']['ratio']:.2f}x)"
        )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="greedy generation by early exit (default), self-speculative decoding or SkipDecode",
        description="Greedy text generation with one of four decoders: token-level early exit (--exit, or the\n"
        "threshold calibrated for --heads; prints the exit layers), LayerSkip-style self-speculative decoding\n"
        "(--speculative: token-identical to plain generate), SkipDecode (--skipdecode SPEEDUP), or a layer plan per\n"
        "phase (--decode-plan / --prefill-plan, e.g. --decode-plan 0-19,22,24-29). --compare times it\n"
        "against plain greedy generate on the same prompts. Early exit runs thresholds calibrated for the heads:\n\n"
        "  depthprune train-exits smollm2 --kind lens --layers 7 11 15 19 23 --fit --epochs 0 --fit-blocks 64 \\\n"
        "      -o out/smollm2-lens\n"
        "  depthprune calibrate out/smollm2-lens --criterion max_prob\n"
        "  depthprune generate smollm2 --heads out/smollm2-lens --prompt 'Call me Ishmael.'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None, help="the causal LM (default: the heads folder's, else smollm2)")
    p.add_argument("--heads", help="folder of decoder exit heads (train-exits on a causal LM); default: logit lens")
    p.add_argument(
        "--exit",
        metavar="CRITERION:THRESHOLD",
        help="a threshold `depthprune calibrate HEADS` certified for --heads (default: the calibrated one there); "
        "any other needs --uncalibrated",
    )
    p.add_argument(
        "--uncalibrated",
        action="store_true",
        help="run an --exit threshold no calibration certified, with a warning stating the exits' measured agreement",
    )
    p.add_argument(
        "--kv",
        default=None,
        choices=KV_STRATEGIES.names(),
        help="skipped layers' KV cache (propagate); with --prefill-plan: the prompt's entries in the layers it skipped",
    )
    p.add_argument("--shallow-prefill", action="store_true", help="the prompt's last token may exit too")
    g = p.add_argument_group("self-speculative decoding (LayerSkip exit drafts, verified by the full model)")
    g.add_argument("--speculative", action="store_true", help="draft with the first layers + an exit head, verify")
    g.add_argument(
        "--draft-layers",
        type=int,
        metavar="E",
        help="the draft runs the first E layers (default: the heads' deepest exit + 1, else 4/5 of the depth)",
    )
    g.add_argument("--draft-len", type=int, metavar="K", help=f"tokens drafted per round (default {DEFAULT_DRAFT_LEN})")
    g.add_argument(
        "--draft-vocab",
        type=float,
        metavar="COVERAGE",
        help="draft over the fewest tokens covering this share of the calibration text (e.g. 0.95; verification "
        "stays on the full vocabulary)",
    )
    g = p.add_argument_group("SkipDecode (every generated position runs the top layers of a decaying schedule)")
    g.add_argument(
        "--skipdecode",
        metavar="SPEEDUP",
        help="target mean layer speed-up (e.g. 2), or 'saved': the model folder's skip_schedule.json "
        "(train-skipdecode)",
    )
    g.add_argument("--min-layers", type=int, help="depth floor of the schedule (default: a quarter of the layers)")
    g.add_argument(
        "--skip-cost",
        choices=("measured", "nominal"),
        default=None,
        help="what SPEEDUP means: measured (default) times decode steps at two depths on these prompts first and "
        "aims at SPEEDUP in seconds per token (the embedding and LM head do not shrink); nominal: the layer ratio",
    )
    add_cascade_options(p)
    g = p.add_argument_group("sampling (--speculative and --cascade; the other decoders are greedy)")
    g.add_argument(
        "--sample",
        action="store_true",
        help="sample instead of greedy decoding; --speculative and --cascade lossless keep the full model's "
        "distribution exactly (speculative rejection sampling)",
    )
    g.add_argument("--temperature", type=float, default=None, metavar="T", help="sampling temperature (default 1)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling generator (default 0)")
    g = p.add_argument_group("timing")
    g.add_argument(
        "--compare", action="store_true", help="print tokens/s beside plain generate (same prompts, greedy or --sample)"
    )
    g.add_argument("--repeats", type=int, default=3, help="timed rounds of each, interleaved (default 3)")
    g.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    g = p.add_argument_group("different depths per phase (depthprune.generation.phases)")
    g.add_argument(
        "--decode-plan",
        metavar="PLAN",
        help="layers the generated tokens run, in order, e.g. 0-19,22,24-29 (default all)",
    )
    g.add_argument("--prefill-plan", metavar="PLAN", help="layers the prompt runs (default all)")
    p.add_argument("--prompt", nargs="+", action="extend", help="prompt text(s), generated as one batch")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true")
    add_tokenizer_option(p)
    from depthprune.cli.skipping import add_generate_options

    add_generate_options(p)
    p.set_defaults(func=cmd_generate)
