"""Labelled text for training and measuring exit heads: loading, fixed splits, tokenized batches.

`load_labelled` reads a JSONL or CSV file with a text and a label column (or a Hugging Face dataset by name, when the
`datasets` package is installed and a hub is reachable). `spam_assassin` turns the raw e-mails of the SpamAssassin
corpus into text (Subject + decoded text parts). `split` cuts a dataset into disjoint, stratified, seeded
train / calibration / test parts: calibration picks exit thresholds, test is only for reporting.
"""

from __future__ import annotations

import csv
import dataclasses
import email
import email.policy
import html
import json
import os
import random
from collections.abc import Iterator, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import torch

SPAM_ASSASSIN = "spam-assassin.jsonl"
"""File name of the SpamAssassin corpus; found in `shared/data/` beside the checkout or the working folder."""

MAX_EMAIL_CHARS = 20_000  # a classifier reads 128 tokens; longer bodies only slow tokenization down


@dataclasses.dataclass
class LabelledTexts:
    """texts[i] has class labels[i] (an id in 0..len(label_names)-1); label_names[k] is the name of class k."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise ValueError(f"labels {sorted(set(bad))[:5]} out of range for {len(self.label_names)} label names")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], self.labels[i]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        return LabelledTexts(
            [self.texts[i] for i in indices], [self.labels[i] for i in indices], list(self.label_names)
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelledTexts:
        return cls(list(data["texts"]), [int(y) for y in data["labels"]], list(data["label_names"]))


@dataclasses.dataclass
class Splits:
    """Disjoint parts of one dataset: train (fit heads), calibration (pick thresholds), test (report only)."""

    train: LabelledTexts
    calibration: LabelledTexts
    test: LabelledTexts


# ---- loading ---------------------------------------------------------------------------------------------------------
def _read_rows(path: Path) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):  # one JSON array of rows
        rows = json.loads(path.read_text(encoding="utf-8"))
        bad = [n for n, row in enumerate(rows) if not isinstance(row, dict)]
        if bad:
            raise ValueError(f"{path}: item {bad[0]} of the JSON array is not an object")
        yield from rows
    elif suffix in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n} is not a JSON object per line (JSONL): {err}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n} holds a {type(row).__name__}, not a JSON object")
                yield row
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise ValueError(f"{path}: unknown file type {suffix!r}; pass a .jsonl or .csv (.tsv) file")


def _label_ids(raw: list[Any], source: str) -> tuple[list[int], list[str]]:
    """Whole-number labels are kept as ids (names '0'..'max'); any other labels map to ids in sorted order."""

    def as_int(v: Any) -> int | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v.strip())
        return None

    ints = [as_int(v) for v in raw]
    if all(i is not None for i in ints):
        if min(ints) < 0:
            raise ValueError(f"{source}: integer labels must be >= 0, found {min(ints)}")
        return ints, [str(k) for k in range(max(ints) + 1)]
    names = sorted({str(v) for v in raw})
    index = {name: k for k, name in enumerate(names)}
    return [index[str(v)] for v in raw], names


def from_rows(
    rows: Sequence[dict[str, Any]], text_column: str = "text", label_column: str = "label", *, source: str = "data"
) -> LabelledTexts:
    """Labelled texts from row dicts (read from any table), with the checks `load_labelled` promises."""
    if not rows:
        raise ValueError(f"{source} has no rows, so no labels")
    present = list(rows[0].keys())
    missing = [c for c in (text_column, label_column) if c not in present]
    if missing:
        raise ValueError(f"{source} has no column(s) {missing}; columns present: {present}")
    texts, raw = [], []
    for n, row in enumerate(rows):
        label = row.get(label_column)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise ValueError(f"{source}: row {n} has no label in column {label_column!r}")
        text = row.get(text_column)
        if text is None:
            raise ValueError(f"{source}: row {n} has no text in column {text_column!r}")
        texts.append(str(text))
        raw.append(label)
    labels, names = _label_ids(raw, source)
    return LabelledTexts(texts, labels, names)


def read_texts(path: str | os.PathLike, text_column: str = "text") -> list[str]:
    """The `text_column` of every row of a local .jsonl / .csv / .tsv file (no labels needed: for prediction)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a .jsonl, .csv or .tsv file")
    rows = list(_read_rows(path))
    if rows and text_column not in rows[0]:
        raise ValueError(f"{path} has no column {text_column!r}; its columns are {sorted(rows[0])}")
    return [str(row[text_column]) for row in rows]


def load_labelled(
    source: str | os.PathLike, text_column: str = "text", label_column: str = "label", *, split: str = "train"
) -> LabelledTexts:
    """Labelled texts from a .jsonl / .csv / .tsv file, or from a Hugging Face dataset name (`split` of it).

    String labels map to ids in sorted order (kept in `label_names`); whole-number labels are used as ids."""
    path = Path(source).expanduser()
    looks_local = path.suffix.lower() in (".jsonl", ".ndjson", ".json", ".csv", ".tsv") or str(source).startswith(
        (".", "/", "~")
    )
    if path.is_file():
        return from_rows(list(_read_rows(path)), text_column, label_column, source=str(path))
    if looks_local or path.exists():
        raise FileNotFoundError(f"data file {path} does not exist; pass a .jsonl or .csv file (or a dataset name)")
    return _load_hub(str(source), text_column, label_column, split)


def _load_hub(name: str, text_column: str, label_column: str, split: str) -> LabelledTexts:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{name!r} is not a local file, and loading a Hugging Face dataset by name needs the `datasets` package "
            "(pip install datasets) and a reachable hub; or export the data to a .jsonl / .csv file"
        ) from None
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - connection and lookup errors differ between datasets releases
        raise ValueError(f"could not load the Hugging Face dataset {name!r} (split {split!r}): {err}") from err
    data = from_rows(list(table), text_column, label_column, source=f"dataset {name!r}")
    feature = getattr(table, "features", {}).get(label_column)
    if getattr(feature, "names", None):  # a ClassLabel: keep its names
        data.label_names = list(feature.names)
    return data


# ---- SpamAssassin ----------------------------------------------------------------------------------------------------
class _TextOfHtml(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """The visible text of an HTML document (tags, scripts and styles removed, entities decoded)."""
    parser = _TextOfHtml()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # noqa: BLE001 - broken markup: fall back to a crude tag strip
        import re

        return html.unescape(re.sub(r"<[^>]*>", " ", markup))
    return " ".join(parser.parts)


def _part_text(part: email.message.Message) -> str:
    try:
        content = part.get_content()
        if isinstance(content, str):
            return content
    except (LookupError, UnicodeError, ValueError, AssertionError, AttributeError, KeyError):
        pass
    payload = part.get_payload(decode=True)
    if payload is None:
        payload = str(part.get_payload()).encode("utf-8", "replace")
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name
        return payload.decode("latin-1", errors="replace")


def email_text(raw: str) -> str:
    """Subject + the decoded text/plain parts of a raw e-mail (text/html stripped of tags when there is no plain
    part), whitespace collapsed. Broken headers, encodings and charsets give replacement characters, not errors."""
    msg = email.message_from_string(raw, policy=email.policy.default)
    try:
        subject = str(msg.get("subject", "") or "")
    except Exception:  # noqa: BLE001 - a malformed header
        subject = ""
    plain: list[str] = []
    markup: list[str] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        try:
            ctype = part.get_content_type()
            attachment = part.get_content_disposition() == "attachment"
        except Exception:  # noqa: BLE001
            continue
        if attachment or ctype not in ("text/plain", "text/html"):
            continue
        (plain if ctype == "text/plain" else markup).append(_part_text(part))
    body = "\n".join(plain) if plain else "\n".join(html_to_text(m) for m in markup)
    text = " ".join(f"{subject}\n{body}".split())
    return text[:MAX_EMAIL_CHARS]


def _find_shared(name: str) -> Path | None:
    for base in (Path(__file__).resolve().parents[3], Path.cwd()):  # the checkout (src layout), the working folder
        for folder in (base / "shared" / "data", base.parent / "shared" / "data"):
            if (folder / name).is_file():
                return folder / name
    return None


def spam_assassin(path: str | os.PathLike | None = None, *, progress: bool = True) -> LabelledTexts:
    """The SpamAssassin corpus (JSONL with fields id, group, label ham/spam, raw) as texts from `email_text`; label
    names ['ham', 'spam'] (ids 0, 1). Without `path`, looks for shared/data/spam-assassin.jsonl near the checkout."""
    found = Path(path).expanduser() if path is not None else _find_shared(SPAM_ASSASSIN)
    if found is None or not found.is_file():
        raise FileNotFoundError(
            f"SpamAssassin data {found or SPAM_ASSASSIN!s} not found; pass the path of spam-assassin.jsonl"
        )
    rows = list(_read_rows(found))
    for n, row in enumerate(rows):
        if "raw" not in row or "label" not in row:
            raise ValueError(f"{found}: row {n} lacks 'raw' or 'label'; columns present: {list(row)}")
    from tqdm.auto import tqdm

    texts = [email_text(r["raw"]) for r in tqdm(rows, desc="parsing e-mails", disable=not progress)]
    return from_rows([{"text": t, "label": r["label"]} for t, r in zip(texts, rows, strict=True)], source=str(found))


# ---- splits and batches ----------------------------------------------------------------------------------------------
def _shares(total: int, sizes: list[int]) -> list[int]:
    """`total` spread over groups of `sizes` in proportion (largest remainder), never more than a group holds."""
    n = sum(sizes)
    quotas = [total * s / n for s in sizes] if n else [0.0] * len(sizes)
    out = [int(q) for q in quotas]
    for k in sorted(range(len(sizes)), key=lambda k: out[k] - quotas[k])[: total - sum(out)]:
        out[k] += 1
    return [min(o, s) for o, s in zip(out, sizes, strict=True)]


def split(data: LabelledTexts, train: float | int = 0.6, calibration: float | int = 0.2, *, seed: int = 0) -> Splits:
    """Disjoint train / calibration / test parts, stratified by label and fixed by `seed`; test gets the rest.

    `train` and `calibration` are fractions (floats in [0, 1]) or counts (ints); each class is split in the same
    proportions (largest remainder), so the default 60 / 20 / 20 of SpamAssassin's 6,046 messages gives
    3,628 / 1,209 / 1,209. Order within a part is shuffled (seeded), so it does not follow the file's order."""
    n = len(data)
    counts = []
    for name, value in (("train", train), ("calibration", calibration)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a fraction (float) or a count (int), got {value!r}")
        if isinstance(value, float):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} fraction must be in [0, 1], got {value}")
            value = round(value * n)
        if value < 0:
            raise ValueError(f"{name} count must be >= 0, got {value}")
        counts.append(int(value))
    if sum(counts) > n:
        raise ValueError(f"train ({counts[0]}) and calibration ({counts[1]}) together exceed the {n} examples")
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(data.labels):
        by_class.setdefault(y, []).append(i)
    classes = sorted(by_class)
    sizes = [len(by_class[y]) for y in classes]
    n_train = _shares(counts[0], sizes)
    n_cal = _shares(counts[1], sizes)
    parts: list[list[int]] = [[], [], []]
    for y, a, b in zip(classes, n_train, n_cal, strict=True):
        idx = by_class[y]
        rng.shuffle(idx)
        b = min(b, len(idx) - a)
        parts[0] += idx[:a]
        parts[1] += idx[a : a + b]
        parts[2] += idx[a + b :]
    for p in parts:
        rng.shuffle(p)
    return Splits(*(data.subset(p) for p in parts))


def tokenize_batch(tokenizer: Any, texts: Sequence[str], labels: Sequence[int] | None = None, max_length: int = 128):
    """One padded batch: input_ids / attention_mask [batch, seq] (+ labels [batch]), truncated to `max_length`."""
    batch = dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    if labels is not None:
        batch["labels"] = torch.tensor(list(labels), dtype=torch.long)  # [batch]
    return batch


def tokenize_batches(
    tokenizer: Any,
    data: LabelledTexts,
    batch_size: int = 32,
    max_length: int = 128,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """`data` as a list of padded batches (dicts of input_ids, attention_mask, labels), in order unless `shuffle`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(len(data)))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [
        tokenize_batch(
            tokenizer, [data.texts[i] for i in chunk], [data.labels[i] for i in chunk], max_length=max_length
        )
        for chunk in (order[k : k + batch_size] for k in range(0, len(order), batch_size))
    ]


FORMATS = {
    "auto": "raw e-mails for 'spam-assassin' or a file named spam-assassin.jsonl, else a table",
    "table": "a .jsonl / .csv / .tsv table (or a Hugging Face dataset) with a text and a label column",
    "email": "JSONL of raw e-mails (fields raw, label), turned into text by email_text (SpamAssassin's layout)",
}


def load_data(
    source: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    *,
    format: str = "auto",
    progress: bool = True,
) -> LabelledTexts:
    """Labelled texts in one of FORMATS: 'email' (`spam_assassin`), 'table' (`load_labelled`) or 'auto' (e-mails for
    'spam-assassin' or a file named spam-assassin.jsonl, else a table)."""
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "email":
        return spam_assassin(None if str(source) == "spam-assassin" else source, progress=progress)
    if format == "table":
        return load_labelled(source, text_column, label_column)
    if str(source) == "spam-assassin":
        return spam_assassin(progress=progress)
    if Path(source).name == SPAM_ASSASSIN:
        return spam_assassin(source, progress=progress)
    return load_labelled(source, text_column, label_column)
