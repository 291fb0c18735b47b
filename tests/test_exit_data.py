"""Labelled text for exit heads: file loading and its errors, e-mail parsing, splits, batches."""

from __future__ import annotations

import base64
import json
from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest
import transformers

from depthprune.exits.data import (
    LabelledTexts,
    email_text,
    html_to_text,
    load_data,
    load_labelled,
    spam_assassin,
    split,
    tokenize_batches,
)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_string_labels_map_in_sorted_order(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"t": "a", "y": "spam"}, {"t": "b", "y": "ham"}, {"t": "c", "y": "spam"}])
    data = load_labelled(f, "t", "y")
    assert data.label_names == ["ham", "spam"]
    assert data.labels == [1, 0, 1]
    assert data.texts == ["a", "b", "c"]


def test_csv_integer_labels_are_kept_as_ids(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('sentence,label\n"hello, world",2\nbye,0\n', encoding="utf-8")
    data = load_labelled(f, "sentence")
    assert data.labels == [2, 0]
    assert data.label_names == ["0", "1", "2"]
    assert data.texts == ["hello, world", "bye"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_labelled(tmp_path / "nope.jsonl")


def test_missing_columns_lists_the_columns_present(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"body": "a", "class": 1}])
    with pytest.raises(ValueError, match=r"no column\(s\) \['text', 'label'\].*\['body', 'class'\]"):
        load_labelled(f)


def test_no_labels_is_a_clear_error(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        load_labelled(empty)
    f = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": None}])
    with pytest.raises(ValueError, match="row 1 has no label"):
        load_labelled(f)


def test_hub_name_without_datasets_or_hub_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="datasets"):
            load_labelled("someone/some-dataset")
    else:  # installed but no hub here: still a ValueError naming the dataset
        with pytest.raises(ValueError, match="someone/some-dataset-that-does-not-exist"):
            load_labelled("someone/some-dataset-that-does-not-exist")


def test_labelled_texts_validate():
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        LabelledTexts(["a", "b"], [0], ["x"])
    with pytest.raises(ValueError, match="out of range"):
        LabelledTexts(["a"], [3], ["x", "y"])
    data = LabelledTexts(["a"], [1], ["x", "y"])
    assert LabelledTexts.from_dict(data.to_dict()) == data


# ---- e-mail ------------------------------------------------------------------------------------------------------
def test_email_prefers_plain_parts_and_decodes_transfer_encodings():
    msg = MIMEMultipart("alternative")
    msg["Subject"] = "Cheap watches"
    msg.attach(MIMEText("Buy now, only \u20ac5!", "plain", "utf-8"))  # base64 in utf-8
    msg.attach(MIMEText("<p>HTML <b>version</b></p>", "html"))
    text = email_text(msg.as_string())
    assert text == "Cheap watches Buy now, only \u20ac5!"


def test_email_falls_back_to_html_without_a_plain_part():
    msg = EmailMessage()
    msg["Subject"] = "Hi"
    msg.set_content(
        "<html><head><style>p {color: red}</style><script>var x;</script></head>"
        "<body><p>Hello&nbsp;<i>there</i> &amp; bye</p></body></html>",
        subtype="html",
    )
    assert email_text(msg.as_string()) == "Hi Hello there & bye"


def test_email_with_broken_charset_and_base64_does_not_fail():
    raw = (
        "Subject: =?unknown-8bit?q?caf=E9?=\n"
        "MIME-Version: 1.0\n"
        'Content-Type: text/plain; charset="x-no-such-charset"\n'
        "Content-Transfer-Encoding: base64\n\n"
        + base64.b64encode("d\xe9j\xe0 vu".encode("latin-1")).decode()[:-2]
        + "\n"
    )
    text = email_text(raw)
    assert isinstance(text, str) and text.startswith("caf")
    assert "j" in text  # the body was decoded (with replacement characters), not dropped


def test_email_quoted_printable_and_attachments():
    raw = (
        "Subject: report\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="XX"\n\n'
        "--XX\n"
        "Content-Type: text/plain; charset=iso-8859-1\n"
        "Content-Transfer-Encoding: quoted-printable\n\n"
        "Gr=FC=DFe aus K=F6ln\n"
        "--XX\n"
        "Content-Type: text/plain\n"
        'Content-Disposition: attachment; filename="data.txt"\n\n'
        "attached numbers 1 2 3\n"
        "--XX--\n"
    )
    assert email_text(raw) == "report Gr\xfc\xdfe aus K\xf6ln"


def test_html_to_text_survives_broken_markup():
    assert "text" in html_to_text("<div><p>text <b>unclosed <")


# ---- splits and batches -------------------------------------------------------------------------------------------
def _toy(n_a: int = 60, n_b: int = 40) -> LabelledTexts:
    return LabelledTexts([f"t{i}" for i in range(n_a + n_b)], [0] * n_a + [1] * n_b, ["a", "b"])


def test_split_is_disjoint_stratified_and_seeded():
    data = _toy()
    parts = split(data, seed=3)
    sets = [set(p.texts) for p in (parts.train, parts.calibration, parts.test)]
    assert [len(s) for s in sets] == [60, 20, 20]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(data.texts)
    assert [p.labels.count(1) for p in (parts.train, parts.calibration, parts.test)] == [24, 8, 8]
    assert split(data, seed=3) == parts
    assert split(data, seed=4).train.texts != parts.train.texts
    assert parts.train.labels[:10] != sorted(parts.train.labels[:10]) or parts.train.labels[10:20] != sorted(
        parts.train.labels[10:20]
    )  # classes are interleaved, not in file order


def test_split_counts_and_errors():
    parts = split(_toy(), 50, 10)
    assert (len(parts.train), len(parts.calibration), len(parts.test)) == (50, 10, 40)
    assert parts.train.labels.count(1) == 20
    with pytest.raises(ValueError, match="exceed"):
        split(_toy(), 90, 20)
    with pytest.raises(ValueError, match="fraction"):
        split(_toy(), 1.5)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(20)]
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def test_tokenize_batches_pads_truncates_and_keeps_labels(tokenizer):
    data = LabelledTexts(["w1 w2", "w3 " * 50, "w4", "w5 w6 w7"], [0, 1, 1, 0], ["a", "b"])
    batches = tokenize_batches(tokenizer, data, batch_size=3, max_length=8)
    assert [b["input_ids"].shape for b in batches] == [(3, 8), (1, 5)]
    assert batches[0]["labels"].tolist() == [0, 1, 1]
    assert batches[0]["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert batches[1]["input_ids"][0].tolist() == [2, 10, 11, 12, 3]


@pytest.mark.real
def test_spam_assassin_loads_every_message():
    try:
        data = spam_assassin()
    except FileNotFoundError:
        pytest.skip("shared/data/spam-assassin.jsonl is not beside this checkout")
    assert len(data) == 6046 and data.label_names == ["ham", "spam"]
    assert data.labels.count(1) == 1896
    assert sum(len(t) < 5 for t in data.texts) < 10
    # headers other than Subject are gone (one spam, id 00403, pastes a whole header block into its body)
    assert sum("Return-Path:" in t[:200] for t in data.texts) <= 1
    assert load_data("spam-assassin").texts[:3] == data.texts[:3]
