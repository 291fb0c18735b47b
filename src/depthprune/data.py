"""Calibration and evaluation text.

The default text is Moby-Dick (public domain). Calibration comes from the first chapters, held-out evaluation from
chapter 110 onward, so no figure is measured on the text a layer choice was tuned on. depthprune ships a small
excerpt of each inside the package; pass a path (e.g. the whole book) to use more.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

HELDOUT_MARKER = "CHAPTER 110."


def _packaged(name: str) -> str:
    return resources.files("depthprune").joinpath("data", name).read_text(encoding="utf-8")


def read_text(path: str | os.PathLike) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist; pass a UTF-8 text file")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file {p} is empty; pass a UTF-8 text file with text in it")
    return text


def split_book(text: str, marker: str = HELDOUT_MARKER) -> tuple[str, str]:
    """(calibration part, held-out part) of a book: everything before `marker`, and from it on.

    A text without the marker is split 80/20 at a line break."""
    i = text.find(marker)
    if i < 0:
        i = text.rfind("\n", 0, int(len(text) * 0.8))
        i = int(len(text) * 0.8) if i < 0 else i
    return text[:i], text[i:]


def calibration_text(path: str | os.PathLike | None = None) -> str:
    """Text for choosing layers: the part of `path` before chapter 110, or the packaged excerpt."""
    return split_book(read_text(path))[0] if path else _packaged("moby_dick_calibration.txt")


def heldout_text(path: str | os.PathLike | None = None) -> str:
    """Text for measuring: the part of `path` from chapter 110 on, or the packaged excerpt."""
    return split_book(read_text(path))[1] if path else _packaged("moby_dick_heldout.txt")


def token_blocks(tokenizer: Any, text: str, seq_len: int, n_blocks: int | None = None) -> torch.Tensor:
    """Cut `text` into non-overlapping blocks of `seq_len` token ids: LongTensor [n_blocks, seq_len].

    Raises ValueError if the text is too short for even one block (or for `n_blocks`)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    available = ids.numel() // seq_len
    if available == 0 or (n_blocks is not None and available < n_blocks):
        want = n_blocks or 1
        raise ValueError(
            f"the text has {ids.numel()} tokens, too few for {want} block(s) of {seq_len}; "
            "pass a longer text, a smaller seq_len or fewer blocks"
        )
    n = available if n_blocks is None else n_blocks
    return ids[: n * seq_len].view(n, seq_len)  # [n_blocks, seq_len]
