"""Binary frames for tensors between edge and cloud: a small JSON header and raw little-endian data, never pickle.

Frame layout: the magic b"DPF1", a uint32 (little-endian) header length, the UTF-8 JSON header, then the payload.
The header names the codec and the tensor's shape and carries the request's own fields (`meta`). Codecs:
- "fp32": lossless; "fp16" / "bf16": exact for values representable in that type, else rounded to nearest;
- "int8": per-row absmax scales (float32, one per row of the last dimension), values round(x / scale * 127): the error
  of every element is at most scale / 254 = absmax(row) / 254;
- "int8-outlier": LLM.int8-style: the few outlier channels (columns where some row holds a value above
  `OUTLIER_RATIO` x that row's median magnitude, at most `MAX_OUTLIERS` of them, the largest first) travel in fp16,
  listed in the header's "outliers"; the other channels are int8 with per-row absmax scales taken over them only, so
  a huge feature no longer sets the step of every other one;
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
CODECS = ("fp32", "fp16", "bf16", "int8", "int8-outlier", "ids")
STATE_CODECS = ("fp32", "fp16", "bf16", "int8", "int8-outlier")
MAX_HEADER = 16 * 1024
OUTLIER_RATIO = 8.0
MAX_OUTLIERS = 64
_ITEM = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int8-outlier": 1, "ids": 8}


def outlier_channels(rows: torch.Tensor, ratio: float = OUTLIER_RATIO, limit: int = MAX_OUTLIERS) -> list[int]:
    """The outlier channels of states [rows, hidden]: columns where some row's magnitude exceeds `ratio` x that row's
    median magnitude; at most `limit` (the largest relative magnitudes first), sorted."""
    mag = rows.abs()
    rel = (mag / mag.median(-1, keepdim=True).values.clamp_min(1e-30)).amax(0)  # [hidden]
    top = rel.argsort(descending=True)[: min(limit, rel.numel())]
    return sorted(int(c) for c in top if rel[c] > ratio)


def _absmax_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = rows.abs().amax(-1).clamp_min(1e-30) / 127.0 if rows.shape[-1] else rows.new_ones(rows.shape[0])
    q = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return scale, q


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
    elif codec == "int8":
        rows = t.to(torch.float32).reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1).float()
        scale, q = _absmax_int8(rows)  # [rows], [rows, hidden]
        data = scale.numpy().astype("<f4").tobytes() + q.numpy().tobytes()
    else:  # int8-outlier
        rows = t.to(torch.float32).reshape(-1, t.shape[-1])
        out = outlier_channels(rows) if rows.shape[0] else []
        keep = torch.ones(rows.shape[-1], dtype=torch.bool)
        keep[out] = False
        scale, q = _absmax_int8(rows[:, keep])
        header["outliers"] = out
        data = (
            scale.numpy().astype("<f4").tobytes()
            + q.numpy().tobytes()
            + rows[:, out].to(torch.float16).numpy().astype("<f2").tobytes()
        )
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + data


def payload_bytes(shape: list[int], codec: str, outliers: int = 0) -> int:
    """The payload size of a tensor of `shape` in `codec` (int8 adds one float32 scale per row; int8-outlier sends
    `outliers` channels of every row in fp16 instead of int8)."""
    n = math.prod(shape)
    size = n * _ITEM[codec]
    if codec == "int8":
        size += 4 * (n // shape[-1] if shape and shape[-1] else 1)
    if codec == "int8-outlier":
        rows = n // shape[-1] if shape[-1] else 0
        size += 4 * rows + rows * outliers  # scales; fp16 (2 bytes) instead of int8 (1) for each outlier value
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
    outliers = header.get("outliers", [])
    if codec == "int8-outlier" and (
        not isinstance(outliers, list)
        or not all(isinstance(c, int) and not isinstance(c, bool) for c in outliers)
        or outliers != sorted(set(outliers))
        or (outliers and not 0 <= outliers[0] <= outliers[-1] < shape[-1])
    ):
        raise FrameError(f"outliers must be distinct increasing channel indices in 0..{shape[-1] - 1}")
    data = frame[8 + size :]
    want = payload_bytes(shape, codec, len(outliers) if codec == "int8-outlier" else 0)
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
    elif codec == "int8":
        rows = n // shape[-1] if shape[-1] else 0
        scale = torch.from_numpy(np.frombuffer(data[: 4 * rows], dtype="<f4").astype(np.float32))
        q = torch.from_numpy(np.frombuffer(data[4 * rows :], dtype=np.int8).astype(np.float32)).reshape(rows, -1)
        tensor = (q * scale[:, None]).reshape(shape)
    else:  # int8-outlier
        rows, width = (n // shape[-1] if shape[-1] else 0), shape[-1] - len(outliers)
        scale = torch.from_numpy(np.frombuffer(data[: 4 * rows], dtype="<f4").astype(np.float32))
        body = data[4 * rows : 4 * rows + rows * width]
        q = torch.from_numpy(np.frombuffer(body, dtype=np.int8).astype(np.float32)).reshape(rows, width)
        wide = np.frombuffer(data[4 * rows + rows * width :], dtype="<f2").astype(np.float32)
        tensor = torch.empty(shape, dtype=torch.float32)
        keep = torch.ones(shape[-1], dtype=torch.bool)
        keep[outliers] = False
        tensor[:, keep] = q * scale[:, None]
        tensor[:, outliers] = torch.from_numpy(wide).reshape(rows, len(outliers))
    if not bool(torch.isfinite(tensor).all()):
        raise FrameError("the states hold NaN or infinite values")
    return tensor, codec, meta


__all__ = [
    "CODECS",
    "MAGIC",
    "MAX_OUTLIERS",
    "OUTLIER_RATIO",
    "STATE_CODECS",
    "FrameError",
    "FrameTooLarge",
    "decode",
    "encode",
    "outlier_channels",
    "payload_bytes",
]
