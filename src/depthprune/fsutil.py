"""Atomic writes of output folders and files: fill a temporary sibling, then swap it in; the old one survives any
failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out` to write into; when the block succeeds it replaces `out` (an existing
    `out` is removed only after the swap); when it fails, `out` is left as it was and the temporary folder removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if out.exists():
            os.replace(out, backup)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if backup.exists():
            if out.exists():
                shutil.rmtree(backup, ignore_errors=True)
            else:  # the swap failed half-way: put the old folder back
                os.replace(backup, out)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (text as UTF-8) to `path` through a temporary sibling and a rename: readers see the old file or
    the new one, never half of it. Returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
