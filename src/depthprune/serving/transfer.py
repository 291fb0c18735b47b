"""Binary frames for tensors between edge and cloud: a small JSON header and raw little-endian data, never pickle.

Frame layout: the magic b"DPF1", a uint32 (little-endian) header length, the UTF-8 JSON header, then the payload.
The header names the codec and the tensor's shape and carries the request's own fields (`meta`). Codecs:
- "fp32": lossless; "fp16" / "bf16": exact for values representable in that type, else rounded to nearest;
- "int8": per-row absmax scales (float32, one per row of the last dimension), values round(x / scale * 127): the error
  of every element is at most scale / 254 = absmax(row) / 254;
- "ids": int64 token ids (the cloud-only mode sends tokens, not states).
Decoding checks everything a sender controls (magic, header size and JSON, codec, shape, byte count, finite values) and
raises `FrameError` with what was wrong, which the server answers with a 4xx.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import torch

from depthprune.errors import DepthpruneError

MAGIC = b"DPF1"
CODECS = ("fp32", "fp16", "bf16", "int8", "ids")
STATE_CODECS = ("fp32", "fp16", "bf16", "int8")
MAX_HEADER = 16 * 1024
_ITEM = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "ids": 8}


class FrameError(DepthpruneError, ValueError):
    """A frame is malformed (the server answers 400 with this message)."""


class FrameTooLarge(FrameError):
    """A frame holds more elements than allowed (the server answers 413)."""


def encode(tensor: torch.Tensor, codec: str, meta: dict[str, Any] | None = None) -> bytes:
    """One frame holding `tensor` (states [rows, hidden] in a float codec, or ids [n] with "ids") and `meta`."""
    if codec not in CODECS:
        raise FrameError(f"unknown codec {codec!r}; choose one of {CODECS}")
    t = tensor.detach().to("cpu")
    header: dict[str, Any] = {"codec": codec, "shape": list(t.shape), "meta": meta or {}}
    if codec == "ids":
        data = t.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()
    elif codec == "fp32":
        data = t.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
    elif codec == "fp16":
        data = t.to(torch.float16).contiguous().numpy().astype("<f2").tobytes()
    elif codec == "bf16":  # numpy has no bfloat16: send its bits as int16
        data = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
    else:
        rows = t.to(torch.float32).reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1).float()
        scale = rows.abs().amax(-1).clamp_min(1e-30) / 127.0  # [rows]
        q = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
        data = scale.numpy().astype("<f4").tobytes() + q.numpy().tobytes()
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + data


def payload_bytes(shape: list[int], codec: str) -> int:
    """The payload size of a tensor of `shape` in `codec` (int8 adds one float32 scale per row)."""
    n = math.prod(shape)
    size = n * _ITEM[codec]
    if codec == "int8":
        size += 4 * (n // shape[-1] if shape and shape[-1] else 1)
    return size


def decode(frame: bytes, *, max_elements: int | None = None) -> tuple[torch.Tensor, str, dict[str, Any]]:
    """(tensor: float32 states or int64 ids, codec, meta) from a frame; FrameError when anything is off."""
    if len(frame) < 8 or frame[:4] != MAGIC:
        raise FrameError("not a depthprune frame: the body must start with b'DPF1' (see depthprune.serving.transfer)")
    (size,) = struct.unpack("<I", frame[4:8])
    if size > MAX_HEADER or 8 + size > len(frame):
        raise FrameError(f"frame header of {size} bytes is larger than the frame or the {MAX_HEADER}-byte limit")
    try:
        header = json.loads(frame[8 : 8 + size].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FrameError(f"frame header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise FrameError("frame header must be a JSON object")
    codec, shape, meta = header.get("codec"), header.get("shape"), header.get("meta", {})
    if codec not in CODECS:
        raise FrameError(f"unknown codec {codec!r}; choose one of {CODECS}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise FrameError(f"shape must be a list of non-negative integers, got {shape!r}")
    if codec == "ids" and len(shape) != 1:
        raise FrameError(f"token ids must have shape [n], got {shape}")
    if codec != "ids" and len(shape) != 2:
        raise FrameError(f"states must have shape [positions, hidden], got {shape}")
    if not isinstance(meta, dict):
        raise FrameError("meta must be a JSON object")
    n = math.prod(shape)
    if max_elements is not None and n > max_elements:
        raise FrameTooLarge(f"the tensor holds {n} elements, more than the {max_elements} allowed")
    data = frame[8 + size :]
    want = payload_bytes(shape, codec)
    if len(data) != want:
        raise FrameError(f"a {codec} tensor of shape {shape} needs {want} payload bytes, the frame has {len(data)}")
    if codec == "ids":
        tensor = torch.from_numpy(np.frombuffer(data, dtype="<i8").astype(np.int64)).reshape(shape)
        return tensor, codec, meta
    if codec == "fp32":
        tensor = torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32)).reshape(shape)
    elif codec == "fp16":
        tensor = torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32)).reshape(shape)
    elif codec == "bf16":
        bits = torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.int16))
        tensor = bits.view(torch.bfloat16).to(torch.float32).reshape(shape)
    else:
        rows = n // shape[-1] if shape[-1] else 0
        scale = torch.from_numpy(np.frombuffer(data[: 4 * rows], dtype="<f4").astype(np.float32))
        q = torch.from_numpy(np.frombuffer(data[4 * rows :], dtype=np.int8).astype(np.float32)).reshape(rows, -1)
        tensor = (q * scale[:, None]).reshape(shape)
    if not bool(torch.isfinite(tensor).all()):
        raise FrameError("the states hold NaN or infinite values")
    return tensor, codec, meta


__all__ = ["CODECS", "MAGIC", "STATE_CODECS", "FrameError", "FrameTooLarge", "decode", "encode", "payload_bytes"]
