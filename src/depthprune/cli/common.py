"""Pieces several commands share: the output-folder check that runs before anything loads, the tokenizer and calibration
options, and calibrate -> check -> write calibration.json (classifier and decoder exit heads alike)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CALIBRATION_FILE = "calibration.json"
"""Written beside the exit heads it calibrates (classifier or decoder ones)."""


def check_output_folder(
    out: str | os.PathLike, overwrite: bool, *, resume: bool = False, source: str | None = None
) -> Path:
    """Refuse, before any model loads, an output folder that exists and is not empty (unless `overwrite` or, with
    `resume`, it holds only checkpoints), a path that is a file, or the folder the model comes from."""
    from depthprune.fsutil import check_output_folder as check
    from depthprune.training import CHECKPOINTS

    return check(
        out, overwrite=overwrite, sources=(source,), keep=(CHECKPOINTS,) if resume else (), overwrite_hint="--overwrite"
    )


MODEL_HELP = "Hugging Face model id, local folder, .gguf file, or an embedded alias (smollm2, minilm); default smollm2"


def add_tokenizer_option(p: argparse.ArgumentParser | Any) -> None:
    p.add_argument(
        "--tokenizer",
        metavar="NAME",
        help="tokenizer folder, hub id or alias, for a model folder saved without one (default: the model's)",
    )


def add_calibration_options(p: argparse.ArgumentParser | Any) -> None:
    """--calibration, --seq-len, --blocks, --stack: the calibration text of every command that reads one."""
    p.add_argument(
        "--calibration",
        metavar="PATH",
        help="calibration text file (the part before 'CHAPTER 110.' is "
        "used if present, else the first 80%%); default: the Moby-Dick excerpt shipped with depthprune",
    )
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration block (default 256)")
    p.add_argument("--blocks", type=int, default=8, help="number of calibration blocks (default 8)")
    p.add_argument("--stack", help="which stack to prune (encoder/decoder) on encoder-decoder models; default: last")


def add_training_text_options(p: argparse.ArgumentParser | Any) -> None:
    """--model and --data of the LoRA trainers (train-skipdecode, train-layerskip): the model and its training text."""
    p.add_argument("--model", default="smollm2", help="model folder, hub id or embedded alias (default: smollm2)")
    p.add_argument(
        "--data",
        default=None,
        help="a UTF-8 text file, e.g. the whole book: only its calibration part is used (before 'CHAPTER 110.', else "
        "the first 80%%), the rest stays held out (default: the packaged Moby-Dick calibration excerpt)",
    )


def add_lora_training_options(p: argparse.ArgumentParser | Any, *, lr: float = 1e-3) -> None:
    """--lora-rank, --lora-alpha, --targets, --epochs, --lr, --batch-size, --seed: what every LoRA trainer takes
    (`lora_training_kwargs` hands them on)."""
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha / rank (default alpha = rank)")
    p.add_argument(
        "--targets", nargs="+", default=None, help="projections to adapt, e.g. q_proj v_proj (default: every linear)"
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--seed", type=int, default=0)


def add_kl_weight_option(p: argparse.ArgumentParser | Any) -> None:
    """--kl-weight: a LoRA trainer's KL term to the untouched model (its adapter disabled), 0 by default."""
    p.add_argument(
        "--kl-weight",
        type=float,
        default=0.0,
        help="weight of a KL term holding the adapted model to the untouched one's distributions (default 0: none)",
    )


def lora_training_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of a LoRA trainer (train_skipdecode, train_layerskip, ...) from
    `add_lora_training_options`' options."""
    names = ("lora_rank", "lora_alpha", "targets", "epochs", "lr", "batch_size", "seed")
    return {name: getattr(args, name) for name in names}


def training_blocks(args: argparse.Namespace, tokenizer: Any, p: argparse.ArgumentParser) -> Any:
    """The training token blocks [n, --seq-len] of --data's calibration part, the first --max-blocks of them; a bad
    value is reported through `p` (exit status 2)."""
    from depthprune.data import calibration_text, token_blocks

    if args.max_blocks is not None and args.max_blocks < 1:
        p.error(f"argument --max-blocks: must be >= 1, got {args.max_blocks}")
    try:
        blocks = token_blocks(tokenizer, calibration_text(args.data), args.seq_len)
    except ValueError as err:
        p.error(f"argument --data/--seq-len: {err}")
    return blocks if args.max_blocks is None else blocks[: args.max_blocks]


def calibration_from_args(args: argparse.Namespace, tokenizer: Any) -> list:
    """The calibration batches the options of `add_calibration_options` ask for (a clear error naming them)."""
    from depthprune.static.prune import calibration_batches

    try:
        return calibration_batches(tokenizer, path=args.calibration, seq_len=args.seq_len, n_blocks=args.blocks)
    except ValueError as err:
        where = f"--calibration {args.calibration}" if args.calibration else "the packaged calibration text"
        raise ValueError(f"{where}: {err} (--seq-len {args.seq_len}, --blocks {args.blocks})") from None


def tokenizer_for(args: argparse.Namespace, model_name: Any) -> Any:
    """The --tokenizer given, else the model's own (a clear error naming the folder when it has none)."""
    from depthprune.io import load_tokenizer

    return load_tokenizer(getattr(args, "tokenizer", None) or model_name)


SAMPLING_DECODERS = ("speculative", "cascade")
"""generate's decoders that can sample (the others decode greedily)."""


def sampling_options(args: argparse.Namespace, decoder: str) -> dict[str, Any] | None:
    """generate's --sample / --temperature / --top-k / --seed checked for `decoder`: None for greedy decoding, else
    {"temperature", "top_k", "seed"} (a clear error for settings that do not fit, before anything loads)."""
    given = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--seed", args.seed))
             if v is not None]  # fmt: skip
    if not args.sample:
        if given:
            raise ValueError(f"{', '.join(given)} set sampling: add --sample, or drop them for greedy decoding")
        return None
    if decoder not in SAMPLING_DECODERS:
        raise ValueError(
            f"--sample works with --speculative and --cascade (they keep the full model's distribution); {decoder} "
            "decoding is greedy here: drop --sample"
        )
    temperature = 1.0 if args.temperature is None else args.temperature
    if not temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    return {"temperature": temperature, "top_k": args.top_k, "seed": 0 if args.seed is None else args.seed}


def sampling_kwargs(sampling: dict[str, Any] | None) -> dict[str, Any]:
    """The decoders' keyword arguments for `sampling_options`' result (a fresh seeded generator per call, so repeated
    runs draw the same tokens); {} for greedy decoding."""
    if sampling is None:
        return {}
    import torch

    generator = torch.Generator().manual_seed(sampling["seed"])
    return {"do_sample": True, "generator": generator, **{k: sampling[k] for k in ("temperature", "top_k")}}


def sampling_label(sampling: dict[str, Any] | None) -> str:
    if sampling is None:
        return "greedy"
    top = f", top-k {sampling['top_k']}" if sampling["top_k"] else ""
    return f"sampling (temperature {sampling['temperature']:g}{top}, seed {sampling['seed']})"


class Preprocessors:
    """What saves beside a model: its tokenizer and, for a speech model, its feature extractor (each may be None),
    saved as one `save_pretrained(folder)`, so the export loads in a transformers `pipeline`."""

    def __init__(self, *parts: Any):
        self.parts = [p for p in parts if p is not None]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        for part in self.parts:
            part.save_pretrained(folder)


def calibrate_check_write(
    names: Sequence[str],
    calibrate_one: Callable[[str], Any],
    check_one: Callable[[str, float], dict[str, Any]],
    folder: str | os.PathLike,
    *,
    title: str,
    as_json: bool = False,
    show: Callable[[Any], None] | None = None,
) -> list[dict[str, Any]]:
    """For each criterion name: calibrate it (`calibrate_one(name)` -> a result with threshold, to_dict() and
    guarantee()), check a certified threshold on held-out data (`check_one(name, threshold)` -> figures), then write
    every result to folder/calibration.json atomically and print a table (or JSON)."""
    from depthprune.bench.report import format_table
    from depthprune.fsutil import write_atomic

    results, rows = [], []
    for name in names:
        result = calibrate_one(name)
        held = check_one(name, result.threshold) if result.threshold is not None else {}
        results.append({**result.to_dict(), "heldout": held})
        rows.append({"criterion": name, "threshold": result.threshold, **held})
        if not as_json:
            if show is not None:
                show(result)
            print(result.guarantee())
    path = write_atomic(Path(folder) / CALIBRATION_FILE, json.dumps(results, indent=2, default=float))
    if as_json:
        print(json.dumps(results, indent=2, default=float))
    else:
        print(format_table(rows, title=title))
        print(f"wrote {path}")
    return results


def encode_prompts(tokenizer, prompts: list[str]):
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
