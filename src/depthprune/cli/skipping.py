"""Layer-skipping commands (thin wrappers over depthprune.skipping): `train-router`, `calibrate-router`, and the
`--routers DIR` options of `generate` (cli/generation.py) and `classify` (cli/exits.py).

    depthprune train-router smollm2 --target-layers 22 -o out/smollm2-routers
    depthprune train-router smollm2 --target-layers 22 --init static --scorer block_influence -o out/static-routers
    depthprune calibrate-router smollm2 --routers out/smollm2-routers
    depthprune generate smollm2 --routers out/smollm2-routers --prompt 'Call me Ishmael.'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from depthprune.cli.common import MODEL_HELP, add_tokenizer_option, check_output_folder, tokenizer_for

CALIBRATION = "router_calibration.json"


def _threshold(args: argparse.Namespace) -> tuple[float, dict | None]:
    """--threshold (generate: --router-threshold), else the one calibrate-router certified for the folder, else
    0.5 (the trained decision)."""
    path = Path(args.routers) / CALIBRATION
    record = json.loads(path.read_text()) if path.is_file() else None
    given = args.router_threshold if hasattr(args, "router_threshold") else args.threshold
    if given is not None:
        return given, record
    if record is not None and record.get("threshold") is not None:
        return float(record["threshold"]), record
    print(f"no calibrated threshold in {args.routers} (run calibrate-router): using 0.5, uncertified", file=sys.stderr)
    return 0.5, None


def _model_for(args: argparse.Namespace, task: str):
    """The model: as given, else the routers folder's (LoRA-trained routers save the merged model beside them)."""
    from depthprune.io import load_model

    name = args.model or (args.routers if (Path(args.routers) / "config.json").is_file() else None)
    return name, load_model(name, task=task).eval()


# ---- train-router -----------------------------------------------------------------------------------------------
def cmd_train_router(args: argparse.Namespace) -> int:
    import torch

    from depthprune.skipping.routers import check_target, default_layers, model_facts
    from depthprune.skipping.train import train_routers

    out = check_output_folder(args.output_dir, args.overwrite)
    from depthprune.io import load_model

    model = load_model(args.model).eval()
    facts = model_facts(model)
    routed = args.layers or default_layers(facts["num_layers"])  # --init static may route more (the plan's)
    check_target(args.target_layers, facts["num_layers"], len(routed))  # before any data is read
    tokenizer = tokenizer_for(args, args.model)
    if facts["granularity"] == "token":
        from depthprune.data import calibration_text, token_blocks

        data = token_blocks(tokenizer, calibration_text(args.data), args.seq_len, args.blocks)
    else:
        from depthprune.exits.data import read_texts

        if not args.data:
            raise ValueError("an encoder's routers train on texts: give --data PATH (.jsonl/.csv with a text column)")
        texts = read_texts(args.data)[: args.blocks]
        enc = tokenizer(texts, truncation=True, max_length=args.seq_len, padding=True, return_tensors="pt")
        data = (enc["input_ids"], enc["attention_mask"])
    start = load_model(args.start).eval() if args.start else None
    torch.manual_seed(args.seed)
    res = train_routers(
        model, data, target_layers=args.target_layers, kind=args.kind, layers=args.layers, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, compute_weight=args.compute_weight, compute_on=args.compute_on,
        lora_rank=args.lora_rank, lora_lr=args.lora_lr, init=args.init or ("static" if start else "uniform"),
        scorer=args.scorer, start=start, sink_tokens=args.sink_tokens, seed=args.seed, output_dir=out,
        overwrite=args.overwrite, progress=not args.quiet,
    )  # fmt: skip
    last = res.epoch_losses[-1] if res.epoch_losses else {}
    how = f"{args.start}'s plan" if start is not None else args.scorer
    init = f"{res.init} init ({how}: removes {res.init_removed})" if res.init != "uniform" else "uniform init"
    print(
        f"wrote {out}: {res.kind} routers on {len(res.layers)} of {facts['num_layers']} layers, target "
        f"{res.target_layers:g} layers, {init}; last epoch: {json.dumps(last.get('metrics', {}))}"
    )
    return 0


# ---- calibrate-router -------------------------------------------------------------------------------------------
def cmd_calibrate_router(args: argparse.Namespace) -> int:
    from depthprune.data import calibration_text, heldout_text
    from depthprune.fsutil import write_atomic
    from depthprune.skipping import calibrate as cal
    from depthprune.skipping.io import load_routers

    name, model = _model_for(args, "auto")
    routers = load_routers(args.routers, model)
    tokenizer = tokenizer_for(args, name)
    if routers.granularity == "token":
        from depthprune.generation.calibrate import prompt_blocks

        calib = prompt_blocks(tokenizer, calibration_text(args.text), args.prompts, args.prompt_len)
        held = prompt_blocks(tokenizer, heldout_text(args.text), args.prompts, args.prompt_len)
        gen = {"max_new_tokens": args.max_new_tokens, "kv": args.kv, "batch_size": args.batch_size}
        result = cal.calibrate_generation_routers(model, routers, calib, delta=args.delta, epsilon=args.epsilon, **gen)
        check = cal.check_generation(model, routers, held, result.threshold, **gen) if result.threshold else {}
        ok = check and check["tokens"] >= 1 - args.delta
    else:
        from depthprune.exits.data import load_labelled, split, tokenize_batch

        if not args.data:
            raise ValueError("an encoder's routers calibrate on labelled texts: give --data PATH (text, label)")
        parts = split(load_labelled(args.data), train=0.0, calibration=0.5)
        c_ids, c_mask, c_lab = _tensors(tokenize_batch(tokenizer, parts.calibration.texts, parts.calibration.labels))
        h_ids, h_mask, h_lab = _tensors(tokenize_batch(tokenizer, parts.test.texts, parts.test.labels))
        result = cal.calibrate_classifier_routers(
            model, routers, c_ids, c_mask, c_lab, delta=args.delta, epsilon=args.epsilon
        )
        check = cal.check_classifier(model, routers, h_ids, h_mask, h_lab, result.threshold) if result.threshold else {}
        ok = check and check["accuracy_drop"] <= args.delta
    record = {**result.to_dict(), "heldout": check, "heldout_within_guarantee": bool(ok)}
    write_atomic(Path(args.routers) / CALIBRATION, json.dumps(record, indent=2, default=float))
    if args.json:
        print(json.dumps(record, indent=2, default=float))
        return 0
    for row in result.table:
        verdict = "certified" if row["rejected"] else "not certified"
        print(f"threshold {row['threshold']:.2f}: risk {row['risk']:.4f}  p {row['p_value']:.3g}  "
              f"mean layers {row['mean_layers']:.2f}  {verdict}")  # fmt: skip
    print(result.guarantee())
    if check:
        print(f"held-out: {json.dumps(check)} -> {'within' if ok else 'OUTSIDE'} the guaranteed bound")
    print(f"wrote {Path(args.routers) / CALIBRATION}")
    return 0


def _tensors(batch):
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


# ---- generate --routers / classify --routers --------------------------------------------------------------------
def add_generate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("layer skipping (learned routers: train-router)")
    g.add_argument("--routers", metavar="DIR", help="generate with the routers in DIR (each token skips layers)")
    g.add_argument(  # --threshold on generate belongs to the cascades (depthprune.cli.cascade)
        "--router-threshold", type=float, help="router threshold in [0, 1] (default: the calibrated one)"
    )
    g.add_argument(
        "--router-prefill", choices=("full", "routed"), default="full",
        help="full: the prompt runs every layer (default); routed: the prompt's tokens follow the routers too",
    )  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> int:
    """`generate MODEL --routers DIR`: greedy decoding with layer skipping; prints the layers each token ran."""
    import torch

    from depthprune.skipping.inference import skip_generate
    from depthprune.skipping.io import load_routers

    if not args.prompt:
        raise ValueError("give --prompt TEXT (one or more)")
    threshold, record = _threshold(args)
    name, model = _model_for(args, "causal-lm")
    routers = load_routers(args.routers, model)
    tokenizer = tokenizer_for(args, name)
    if len(args.prompt) > 1 and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    enc = tokenizer(args.prompt, return_tensors="pt", padding=True)
    kv = args.kv or "propagate"
    out = skip_generate(model, routers, enc["input_ids"], enc["attention_mask"], threshold=threshold,
                        max_new_tokens=args.max_new_tokens, kv=kv, prefill=args.router_prefill,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    new = out.sequences[:, enc["input_ids"].shape[1] :]
    rows = []
    for prompt, seq, ran in zip(args.prompt, new.tolist(), out.executed.tolist(), strict=True):
        keep = [i for i, e in enumerate(ran) if e > 0]
        tokens = [seq[i] for i in keep]
        rows.append({"prompt": prompt, "text": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": tokens,
                     "layers": [ran[i] for i in keep]})  # fmt: skip
    report = {"decoder": "routers", "threshold": threshold, "kv": kv, "num_layers": out.num_layers,
              "calibrated": record is not None and record.get("threshold") == threshold,
              "mean_layers": out.mean_layers(skip_first=True), "results": rows}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"layer skipping: routers {args.routers} at threshold {threshold:g}, kv={kv}")
    if report["calibrated"]:
        print(f"calibrated: {record['guarantee']}")
    for row in rows:
        print(f"\n{row['prompt']!r} ->\n{row['text']}")
        print(f"layers per token: {row['layers']}")
    if not torch.isnan(torch.tensor(report["mean_layers"])):
        print(f"\nmean layers per generated token (after the first): {report['mean_layers']:.2f} of {out.num_layers}")
    return 0


def add_classify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routers", metavar="DIR", help="classify with the per-sample routers in DIR (skip layers)")
    p.add_argument("--threshold", type=float, help="router threshold in [0, 1] (default: the calibrated one)")


def cmd_classify(args: argparse.Namespace) -> int:
    """`classify DIR --routers RDIR`: the classifier in DIR with per-sample layer skipping."""
    from depthprune.exits.data import read_texts
    from depthprune.io import load_model
    from depthprune.skipping.inference import RoutedClassifier
    from depthprune.skipping.io import load_routers

    texts = args.text or (read_texts(args.file, args.text_column) if args.file else None)
    if not texts:
        raise ValueError("give --text TEXT (repeatable) or --file PATH")
    threshold, _ = _threshold(args)
    model = load_model(args.folder, task="seq-cls").eval()
    clf = RoutedClassifier(model, load_routers(args.routers, model), threshold)
    tokenizer = tokenizer_for(args, args.folder)
    names = getattr(model.config, "id2label", None) or {}
    rows = []
    for i in range(0, len(texts), args.batch_size):
        chunk = texts[i : i + args.batch_size]
        enc = tokenizer(chunk, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
        out = clf(enc["input_ids"], enc["attention_mask"])
        probs = out.logits.softmax(-1)
        for text, p, ran in zip(chunk, probs.tolist(), out.executed.tolist(), strict=True):
            label = max(range(len(p)), key=p.__getitem__)
            rows.append({"label": label, "label_name": names.get(label, str(label)), "probability": p[label],
                         "layers": ran, "of_layers": out.num_layers, "text": text[:80]})  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['label_name']:>10}  p={row['probability']:.3f}  ran {row['layers']}/{row['of_layers']} layers  "
              f"{row['text']!r}")  # fmt: skip
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from depthprune.registry import ROUTER_KINDS

    p = sub.add_parser("train-router", help="train layer-skipping routers (frozen model, KL + a depth target)")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--target-layers", type=float, required=True, help="mean executed layers per token (sample)")
    p.add_argument("-o", "--output-dir", required=True, help="folder for routers.json + routers.safetensors")
    p.add_argument("--kind", choices=ROUTER_KINDS.names(), help="router kind (default: by model)")
    p.add_argument("--layers", type=int, nargs="+", help="0-based routed layers (default: all but first and last)")
    p.add_argument("--data", metavar="PATH", help="training text (decoders: a book; encoders: .jsonl/.csv texts)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per training block / max length (default 64)")
    p.add_argument("--blocks", type=int, default=64, help="training blocks (texts) (default 64)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--compute-weight", type=float, default=10.0, help="weight of the depth term (default 10)")
    p.add_argument(
        "--compute-on", choices=("gates", "probs"), default="gates",
        help="the depth term counts the layers the gates executed (default) or the expected layers, sum of P(run)",
    )  # fmt: skip
    p.add_argument("--lora-rank", type=int, default=0, help="also train LoRA of this rank (decoders; default off)")
    p.add_argument("--lora-lr", type=float, default=1e-4, help="LoRA learning rate (default 1e-4)")
    p.add_argument(
        "--init", choices=("uniform", "static", "static_parts"), default=None,
        help="uniform (the default): every gate starts at the target's keep share; static: the gates start as the "
        "static plan of the target depth (removed layers P(run) low, kept high, by rank of --scorer's score; with "
        "--start, the default: that model's plan); static_parts (--kind token_sublayer): as the plan of attention / "
        "MLP sub-layers by their own block influence",
    )  # fmt: skip
    p.add_argument(
        "--start", metavar="PRUNED", default=None,
        help="a model `depthprune prune MODEL --remove N [--heal ...]` wrote: the routed model starts as MODEL with "
        "its kept (healed) layers and the routers as its plan, so training starts from that pruned model's quality "
        "(saved beside the routers)",
    )  # fmt: skip
    p.add_argument("--scorer", default="block_influence", help="importance scorer for --init static (default "
                   "block_influence; see depthprune list)")  # fmt: skip
    p.add_argument(
        "--sink-tokens", type=int, default=1,
        help="decoders: each sequence's first N real positions always run every layer (the attention sink; default 1; "
        "0: routers decide there too)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tokenizer_option(p)
    p.set_defaults(func=cmd_train_router)

    p = sub.add_parser("calibrate-router", help="router threshold by Learn-then-Test, checked on held-out data")
    p.add_argument("model", nargs="?", default=None, help="the model (default: the routers folder's, else smollm2)")
    p.add_argument("--routers", required=True, metavar="DIR")
    p.add_argument("--delta", type=float, default=0.2, help="risk bound (default 0.2)")
    p.add_argument("--epsilon", type=float, default=0.05, help="error level (default 0.05)")
    p.add_argument("--text", metavar="PATH", help="decoders: a book (default: the packaged Moby-Dick excerpts)")
    p.add_argument("--data", metavar="PATH", help="encoders: labelled texts (.jsonl/.csv)")
    p.add_argument("--prompts", type=int, default=50, help="decoders: calibration prompts, as many held out")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--kv", default="propagate", choices=("propagate", "recompute"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    add_tokenizer_option(p)
    p.set_defaults(func=cmd_calibrate_router)
