"""GGUF in, GGUF out: a pruned, reordered or healed model written as a GGUF file for llama.cpp, Ollama and friends.

The source GGUF is the reference. Every tensor of the output is the source tensor it came from (block `plan[i]` for
output block `i`, renumbered `blk.i.`): when the model's weight still equals the de-quantized source tensor exactly
(the plan only moved it), the source's own bytes are copied, quantized as they were (no de-quantization, no
re-quantization); a weight changed by healing or fusion is quantized again with `gguf.quants.quantize` to the source
tensor's type, or to the type the caller names (`gguf_type`). The metadata is the source's, with
`<arch>.block_count` and every per-layer array of the architecture updated and the plan recorded under `depthprune.*`.
Reading and writing go through the `gguf` package (GGUFReader, GGUFWriter), as llama.cpp's own scripts do
(gguf_new_metadata.py copies a file the same way).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from depthprune.errors import (
    DepthpruneError,
    ModelLoadError,
    OutputExistsError,
    PlanError,
    UnsupportedArchitectureError,
)
from depthprune.fsutil import atomic_file
from depthprune.plan import UNNAMED, LayerPlan
from depthprune.static.apply import source_plan

META_PREFIX = "depthprune."
"""Metadata keys this module adds: depthprune.plan (text form), depthprune.source_block_count, depthprune.source,
depthprune.requantized (names of the tensors written anew), depthprune.healing (JSON of the healing record)."""

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


class GGUFExportError(DepthpruneError, ValueError):
    """A GGUF export cannot be written as asked (type the writer cannot produce, model not made from this file)."""


def _permute_qk(name: str, data: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """HF -> GGUF layout of Llama's q/k projections (llama.cpp's convert_hf_to_gguf permutes the rotary halves;
    transformers' GGUF loader undoes it)."""
    if ".attn_q." in name:
        heads = n_head
    elif ".attn_k." in name:
        heads = n_kv
    else:
        return data
    return data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _identity(name: str, data: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    return data


ARCHITECTURES: dict[str, Callable[[str, np.ndarray, int, int], np.ndarray]] = {
    "llama": _permute_qk,
    "qwen2": _identity,
    "qwen3": _identity,
}
"""GGUF architectures whose HF -> GGUF tensor layout is known here (a changed tensor must be written in it)."""


def writable_type(name: str | None) -> Any:
    """The GGMLQuantizationType named `name` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 ...), checked to be one
    gguf's writer can produce; None stays None (each changed tensor keeps its source tensor's type)."""
    if name is None:
        return None
    from gguf import GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType[name.upper()]
    except KeyError:
        raise GGUFExportError(
            f"unknown GGUF tensor type {name!r}; choose one of {', '.join(_writable_names())}"
        ) from None
    if not _can_write(qtype):
        raise GGUFExportError(
            f"the gguf package can read {qtype.name} but cannot write it (no quantizer); choose one of "
            f"{', '.join(_writable_names())}, or quantize the output afterwards with llama.cpp's llama-quantize"
        )
    return qtype


def _can_write(qtype: Any) -> bool:
    import gguf

    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.quantize(np.zeros((1, block * 8), dtype=np.float32), qtype)
    except (NotImplementedError, gguf.quants.QuantError, ValueError, KeyError):
        return False
    return True


def _writable_names() -> list[str]:
    from gguf import GGMLQuantizationType

    return [q.name for q in GGMLQuantizationType if _can_write(q)]


def check_gguf_output(
    out: str | os.PathLike, *, source: str | os.PathLike | None = None, overwrite: bool = False
) -> Path:
    """The check before anything slow runs: `out` ends in .gguf, is not the source file, and does not exist unless
    `overwrite` (then it is replaced atomically at the end)."""
    path = Path(out).expanduser().resolve()
    if path.suffix != ".gguf":
        raise GGUFExportError(f"{out}: a GGUF output path ends in .gguf")
    if source is not None and path == Path(source).expanduser().resolve():
        raise OutputExistsError(f"{out} is the GGUF file the model was loaded from; write to a new file")
    if path.is_dir():
        raise OutputExistsError(f"{out} is a folder; pass a .gguf file path")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose a new file or pass --overwrite to replace it")
    return path


def gguf_architecture(source: str | os.PathLike) -> str:
    """The `general.architecture` of a GGUF file, refused unless its tensor layout is known here."""
    arch = _field(_reader(source), "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{source}: GGUF architecture {arch!r} is not supported for GGUF export (supported: "
            f"{', '.join(ARCHITECTURES)}); export a Hugging Face folder instead (-o FOLDER) and convert it with "
            f"llama.cpp's convert_hf_to_gguf.py"
        )
    return str(arch)


def _reader(source: str | os.PathLike) -> Any:
    path = Path(source)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {source} does not exist")
    stat = path.stat()
    return _cached_reader(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime: int) -> Any:
    # GGUFReader parses every metadata field up front (seconds for a 49k-token vocabulary): the check before loading
    # and the export read one file once.
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {err}") from err


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return field.contents() if field is not None else None


@dataclasses.dataclass
class GGUFExport:
    """What `export_gguf` wrote: the file, the plan (source block per output block), tensors copied byte for byte
    and tensors quantized anew (name -> type), and the byte counts of source and output."""

    path: Path
    plan: list[int]
    copied: list[str]
    requantized: dict[str, str]
    source_bytes: int
    output_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "path": str(self.path)}


def _gguf_plan(model: nn.Module, n_source: int) -> list[int]:
    plan = source_plan(model)
    if plan is None:
        return list(range(n_source))
    if len(plan.stacks) != 1:
        raise PlanError(f"a GGUF decoder has one stack of blocks; the model's plan has {list(plan.stacks)}")
    ((stack, layers),) = plan.stacks.items()
    record = getattr(model.config, "depthprune", None) or {}
    recorded = (record.get("source_num_layers") or {}).get(stack, n_source)
    if recorded != n_source or max(layers) >= n_source:
        raise GGUFExportError(
            f"the model was pruned from a model of {recorded} layers but the GGUF file has {n_source} blocks: pass "
            "the GGUF file the model was loaded from"
        )
    return list(layers)


def _hf_tensors(model: nn.Module, arch_enum: Any, n_blocks: int) -> dict[str, torch.Tensor]:
    """The model's weights by GGUF tensor name (through gguf's own HF -> GGUF name map)."""
    import gguf

    names = gguf.get_tensor_name_map(arch_enum, n_blocks)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is not None:
            out.setdefault(gname, tensor)
    return out


def export_gguf(
    model: nn.Module,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    gguf_type: str | None = None,
    overwrite: bool = False,
) -> GGUFExport:
    """Write `model` (made by depthprune from the model in the GGUF file `source`) as the GGUF file `out`.

    Output block i is source block plan[i] (the plan recorded in the model's config; none = every block), its
    tensors' bytes copied as they are unless the model's weight differs from the de-quantized source tensor; those
    are quantized again to the source tensor's type, or to `gguf_type` (a name such as F16, F32 or Q8_0). Nothing is
    written unless every tensor can be; the file appears atomically.
    """
    import gguf

    path = check_gguf_output(out, source=source, overwrite=overwrite)
    forced = writable_type(gguf_type)
    arch = gguf_architecture(source)
    reader = _reader(source)
    n_source = int(_field(reader, f"{arch}.block_count"))
    plan = _gguf_plan(model, n_source)
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    hf = _hf_tensors(model, arch_enum, len(plan))
    n_head = int(_field(reader, f"{arch}.attention.head_count") or 1)
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv") or n_head)
    to_gguf = ARCHITECTURES[arch]

    by_block: dict[int, list[tuple[str, Any]]] = {}
    head, tail = [], []
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if m:
            by_block.setdefault(int(m.group(1)), []).append((m.group(2), t))
        else:
            (tail if by_block else head).append((t.name, t))
    ordered = [*head]
    for i, src in enumerate(plan):
        ordered += [(f"blk.{i}.{rest}", t) for rest, t in by_block.get(src, [])]
    ordered += tail

    # Decide every tensor before opening the output: a type the writer cannot produce fails with nothing written.
    items: list[tuple[str, np.ndarray, Any]] = []
    copied, requantized = [], {}
    for name, t in ordered:
        weight = hf.get(name)
        data, qtype = t.data, t.tensor_type
        if weight is not None:
            new = _changed(name, weight, t, to_gguf, n_head, n_kv)
            if new is not None:
                qtype = forced if forced is not None else t.tensor_type
                data = _quantize(name, new, qtype)
                requantized[name] = qtype.name
        if name not in requantized:
            copied.append(name)
        items.append((name, data, qtype))

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch, endianess=reader.endianess)
        _copy_metadata(reader, writer, arch, n_source, plan, model, source, requantized)
        for name, data, qtype in items:
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data, _ in items:
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
    return GGUFExport(path, plan, copied, requantized, Path(source).stat().st_size, path.stat().st_size)


def _changed(name: str, weight: torch.Tensor, t: Any, to_gguf: Callable, n_head: int, n_kv: int) -> np.ndarray | None:
    """The model's weight in GGUF layout (float32) when it differs from the de-quantized source tensor, else None."""
    import gguf

    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF stores ne (innermost first); numpy order is reversed
    ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
    new = to_gguf(name, weight.detach().to(torch.float32).cpu().numpy(), n_head, n_kv)
    if new.size != ref.size:
        raise GGUFExportError(
            f"{name}: the model's weight has {tuple(weight.shape)} but the GGUF tensor has {shape}; pass the GGUF "
            "file the model was loaded from"
        )
    new = new.reshape(shape)
    new = np.ascontiguousarray(new, dtype=np.float32)
    # Compare in the model's dtype: a float32 model loaded from this file holds exactly the de-quantized values.
    ref = torch.from_numpy(np.array(ref, dtype=np.float32)).to(weight.dtype).to(torch.float32)
    return None if torch.equal(ref, torch.from_numpy(new)) else new


def _quantize(name: str, data: np.ndarray, qtype: Any) -> np.ndarray:
    import gguf

    if not _can_write(qtype):
        raise GGUFExportError(
            f"{name} was changed (healing or fusion) and must be written anew, but the gguf package cannot write its "
            f"source type {qtype.name}; pass --gguf-type with one of {', '.join(_writable_names())}"
        )
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block:
        raise GGUFExportError(f"{name}: rows of {data.shape[-1]} values do not fit {qtype.name} blocks of {block}")
    return gguf.quants.quantize(data, qtype)


def _copy_metadata(
    reader: Any,
    writer: Any,
    arch: str,
    n_source: int,
    plan: list[int],
    model: nn.Module,
    source: str | os.PathLike,
    requantized: dict[str, str],
) -> None:
    import gguf

    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith(("GGUF.", META_PREFIX)):
            continue
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(field.contents()))
            continue
        value = field.contents()
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if field.name == f"{arch}.block_count":
            value = len(plan)
        elif field.name.startswith(f"{arch}.") and sub_type is not None and len(value) == n_source:
            value = [value[i] for i in plan]  # a per-layer array (head counts, sliding-window pattern ...)
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    writer.add_string(META_PREFIX + "plan", LayerPlan({UNNAMED: tuple(plan)}).to_text())
    writer.add_uint32(META_PREFIX + "source_block_count", n_source)
    writer.add_string(META_PREFIX + "source", Path(source).name)
    if requantized:
        writer.add_array(META_PREFIX + "requantized", sorted(requantized))
    healing = getattr(model.config, "depthprune_healing", None) or getattr(model.config, "depthprune_fusion", None)
    if healing:
        writer.add_string(META_PREFIX + "healing", json.dumps(healing, default=str))
