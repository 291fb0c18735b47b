"""Speech models judged on a folder of WAV files: word error rate (jiwer) against the references and against the
untouched model's own transcripts, and end-to-end transcription speed (log-mel features to text, encoder and greedy
decoder together) at several batch sizes, side by side in interleaved rounds. What `depthprune eval MODEL --audio
DIR` prints.

References are optional: a `texts.json` in the folder ([{"file": "a.wav", "text": "..."}], what
benchmarks/speech_data.py writes) or a `NAME.txt` beside each `NAME.wav`. Both sides of a WER are normalised by
jiwer's own transformations (lower case, punctuation and extra spaces removed), as the Whisper benchmarks do.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthprune.audio import AudioError, audio_files


def references(folder: str | os.PathLike) -> list[str] | None:
    """The reference text of every WAV file of `folder` (in `audio_files` order), from texts.json or NAME.txt files;
    None when the folder has neither. A folder with references for some files only is refused (a WER over part of
    the speech would be quietly wrong)."""
    files = audio_files(folder)
    table = Path(folder) / "texts.json"
    if table.is_file():
        try:
            rows = json.loads(table.read_text(encoding="utf-8"))
            texts = {str(r["file"]): str(r["text"]) for r in rows}
        except (ValueError, TypeError, KeyError) as err:
            raise AudioError(f"{table}: expected a JSON list of {{'file': ..., 'text': ...}} rows ({err})") from None
    else:
        texts = {
            f.name: f.with_suffix(".txt").read_text(encoding="utf-8") for f in files if f.with_suffix(".txt").is_file()
        }
        if not texts:
            return None
    missing = [f.name for f in files if f.name not in texts]
    if missing:
        raise AudioError(
            f"{folder}: no reference text for {len(missing)} of {len(files)} WAV files (e.g. {missing[0]}); give every "
            "file one (texts.json or NAME.txt), or none to compare with the untouched model's transcripts only"
        )
    return [texts[f.name].strip() for f in files]


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """WER in percent (jiwer), both sides lower-cased with punctuation and extra spaces removed."""
    try:
        import jiwer
    except ImportError:
        raise ImportError("word error rates need jiwer: pip install 'depthprune[speech]'") from None
    if len(refs) != len(hyps) or not refs:
        raise ValueError(f"need as many hypotheses as references (> 0), got {len(hyps)} and {len(refs)}")
    norm = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip()])
    pairs = [(norm(r), norm(h)) for r, h in zip(refs, hyps, strict=True)]
    kept = [(r, h if h else "<empty>") for r, h in pairs if r]  # jiwer refuses empty references
    if not kept:
        raise ValueError("every reference is empty after normalisation: nothing to score")
    return 100.0 * float(jiwer.wer([r for r, _ in kept], [h for _, h in kept]))


@torch.no_grad()
def transcribe(
    model: nn.Module, tokenizer: Any, features: torch.Tensor, batch_size: int, *, max_new_tokens: int = 96
) -> tuple[list[str], float]:
    """Greedy transcripts (the model's own `generate`) of features [n, mels, frames], `batch_size` at a time, and the
    seconds it took. max_new_tokens is capped by the decoder's positions behind its prompt."""
    from depthprune.static.heal.distill_seq2seq import transcript_budget

    max_new_tokens = transcript_budget(model, max_new_tokens)
    t0 = time.perf_counter()
    texts: list[str] = []
    for i in range(0, len(features), batch_size):
        ids = model.generate(features[i : i + batch_size], do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        texts += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return texts, time.perf_counter() - t0


def evaluate_speech(
    models: Mapping[str, nn.Module],
    tokenizer: Any,
    features: torch.Tensor,
    refs: Sequence[str] | None,
    *,
    baseline: str,
    batch_sizes: Sequence[int] = (1, 8),
    repeats: int = 3,
    max_new_tokens: int = 96,
) -> dict[str, Any]:
    """Per model: decoder / encoder layers, WER vs `refs` (when given) and vs the baseline's transcripts, and per
    batch size the median seconds per utterance and the speedup over the baseline (the median of per-round ratios,
    interleaved rounds after a warm-up)."""
    from depthprune.bench.generation import interleaved_seconds, speed_ratios

    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {list(models)}")
    if any(b < 1 for b in batch_sizes) or repeats < 1:
        raise ValueError(f"batch sizes and repeats must be >= 1, got {list(batch_sizes)} and {repeats}")
    for m in models.values():
        m.eval()
    texts = {name: transcribe(m, tokenizer, features, max(batch_sizes), max_new_tokens=max_new_tokens)[0]
             for name, m in models.items()}  # fmt: skip
    rows = []
    for name, m in models.items():
        row: dict[str, Any] = {"model": name}
        for key in ("encoder_layers", "decoder_layers"):
            row[key] = getattr(m.config, key, None)
        if refs is not None:
            row["wer_refs"] = round(word_error_rate(refs, texts[name]), 2)
        # None where the baseline wrote nothing at all (no word to score against)
        scored = any(t.strip() for t in texts[baseline])
        row[f"wer_vs_{baseline}"] = round(word_error_rate(texts[baseline], texts[name]), 2) if scored else None
        rows.append(row)
    n = len(features)
    for b in batch_sizes:
        runs = {name: (lambda m=m, b=b: transcribe(m, tokenizer, features, b, max_new_tokens=max_new_tokens)[1])
                for name, m in models.items()}  # fmt: skip
        warm = {name: (lambda m=m, b=b: transcribe(m, tokenizer, features[:b], b, max_new_tokens=max_new_tokens))
                for name, m in models.items()}  # fmt: skip
        ratios = speed_ratios(interleaved_seconds(runs, repeats, warmup_runs=warm), baseline, n)
        for row in rows:
            r = ratios[row["model"]]
            row[f"s_per_utt_b{b}"] = round(1 / r["tok_s"], 4)
            row[f"speedup_b{b}"] = round(r["ratio"], 3)
    settings = {"batch_sizes": list(batch_sizes), "repeats": repeats, "max_new_tokens": max_new_tokens}
    return {"baseline": baseline, "utterances": n, "rows": rows, "transcripts": texts, "settings": settings}


__all__ = ["evaluate_speech", "references", "transcribe", "word_error_rate"]
