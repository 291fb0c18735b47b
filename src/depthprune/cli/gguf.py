"""GGUF output of the exporting commands (prune, heal, merge, share): `-o pruned.gguf` writes a GGUF file from a
GGUF source instead of a Hugging Face folder (depthprune.static.gguf_export)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

GGUF_HELP = (
    "output folder (a plain Hugging Face model folder), or a .gguf file for a GGUF source: its kept blocks are the "
    "source's quantized tensors, copied byte for byte"
)


def add_gguf_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gguf-type",
        metavar="TYPE",
        help="with -o FILE.gguf: the type of tensors changed by healing or fusion (F32, F16, Q8_0, Q4_1 ...; "
        "default: each keeps its source tensor's type)",
    )


def check_output(args: argparse.Namespace) -> str | None:
    """Before anything loads: the output folder check, or for `-o FILE.gguf` the GGUF checks (a GGUF source of a
    known architecture, a type the writer can produce, a file that does not exist). Returns the source GGUF file."""
    from depthprune.cli.common import check_output_folder

    if not str(args.output).endswith(".gguf"):
        if getattr(args, "gguf_type", None):
            raise ValueError("--gguf-type applies to a GGUF output: -o FILE.gguf")
        check_output_folder(args.output, args.overwrite, source=args.model)
        return None
    from depthprune.io import resolve_source
    from depthprune.static.gguf_export import check_gguf_output, gguf_architecture, writable_type

    folder, gguf_file = resolve_source(args.model)
    if gguf_file is None:
        raise ValueError(
            f"-o {args.output}: a GGUF output needs a GGUF source model (a .gguf file or the smollm2 alias), "
            f"{args.model!r} is not one; export a folder and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    source = str(Path(folder) / gguf_file)
    check_gguf_output(args.output, source=source, overwrite=args.overwrite)
    writable_type(getattr(args, "gguf_type", None))
    gguf_architecture(source)
    return source


def save_output(model: Any, tokenizer: Any, args: argparse.Namespace, gguf_source: str | None) -> Path:
    """Write the result: a Hugging Face folder, or the GGUF file (the tokenizer travels in the source's metadata)."""
    if gguf_source is None:
        from depthprune.static.export import save_model

        return save_model(model, args.output, tokenizer, overwrite=args.overwrite)
    from depthprune.static.gguf_export import export_gguf

    res = export_gguf(model, gguf_source, args.output, gguf_type=args.gguf_type, overwrite=args.overwrite)
    requant = f", {len(res.requantized)} written anew ({', '.join(sorted(set(res.requantized.values())))})"
    print(
        f"GGUF: {len(res.plan)} blocks from {gguf_source}; {len(res.copied)} tensors copied byte for byte"
        + (requant if res.requantized else "")
        + f"; {res.output_bytes / 1e6:.1f} MB ({res.output_bytes / res.source_bytes:.3f} of the source)"
    )
    return res.path
