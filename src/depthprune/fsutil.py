"""Atomic writes of output folders and files: fill a temporary sibling, then swap it in; the old one survives any
failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from depthprune.errors import OutputExistsError


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


def check_output_folder(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    sources: Iterable[str | os.PathLike | None] = (),
    keep: Iterable[str] = (),
    what: str = "the output",
    replace_source: bool = False,
    overwrite_hint: str = "overwrite=True (--overwrite)",
) -> Path:
    """The one check before anything is written (and before anything slow runs): refuse a path that is a file, a
    folder a model was loaded from (`sources`: never written, unless `replace_source` and `overwrite`, as an export
    may replace its source atomically), or a folder that is not empty unless `overwrite` (entries named in `keep`,
    e.g. a resumable run's checkpoints, do not count). Returns the resolved path."""
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{out} exists and is a file; pass a folder for {what}")
    if not (overwrite and replace_source):
        for source in sources:
            if source and Path(source).expanduser().is_dir() and Path(source).expanduser().resolve() == path:
                hint = f" (or pass {overwrite_hint} to replace the source)" if replace_source else ""
                raise OutputExistsError(f"{path} is the folder this model was loaded from; write to a new folder{hint}")
    if overwrite:
        return path
    keep = set(keep)
    others = sorted(p.name for p in path.iterdir() if p.name not in keep) if path.is_dir() else []
    if others:
        resume = ", or resume=True (--resume) to go on from its checkpoints" if keep else ""
        raise OutputExistsError(
            f"{path} already exists and is not empty; choose a new folder or pass {overwrite_hint} to replace it at "
            f"the end{resume} (found {others[:4]})"
        )
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a large file, by a writer that wants a path); when the block
    succeeds it replaces `path` with one rename, when it fails `path` is left as it was and the temporary removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
