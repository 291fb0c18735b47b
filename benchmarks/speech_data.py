"""Spoken held-out text for the Whisper benchmarks (issue 13): Debian's espeak-ng reads Moby-Dick sentences from
chapter 110 on (the held-out part, see depthprune.data) in a few voices and speeds; the WAVs are resampled to 16 kHz
mono float32. The references are the texts; `normalize` is the one text normalization both sides of a WER go
through (lower case, punctuation dropped, hyphens split), so WER counts words, not commas.

No speech data set installs offline, and a synthetic voice is far from field speech: figures on this set measure
how far a pruned model drifts from the full one, not Whisper's accuracy on people.

    from speech_data import utterances, espeak_available
    utts = utterances(16)  # [Utterance(text, audio: float32[n] at 16 kHz, voice, speed)]
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
BOOK = Path("/work/shared/data/moby-dick.txt")
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp")
SPEEDS = (140, 165, 190)  # words per minute (espeak-ng's default is 175)
ESPEAK = "espeak-ng"


@dataclass(frozen=True)
class Utterance:
    text: str
    audio: np.ndarray  # float32 [samples], 16 kHz mono, in [-1, 1]
    voice: str
    speed: int

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


def sentences(
    n: int,
    *,
    path: Path | str | None = None,
    min_words: int = 6,
    max_words: int = 22,
    split: str = "heldout",
) -> list[str]:
    """The first `n` plain sentences of the held-out part (chapter 110 on; split="calibration": the part before it,
    for healing): between min_words and max_words words, no digits, no quotes or brackets (they read badly aloud and
    are not Whisper's style either)."""
    from depthprune.data import calibration_text, heldout_text

    if split not in ("heldout", "calibration"):
        raise ValueError(f"split must be 'heldout' or 'calibration', got {split!r}")
    read = heldout_text if split == "heldout" else calibration_text
    text = read(path if path is not None else (BOOK if BOOK.is_file() else None))
    text = re.sub(r"CHAPTER \d+\.[^\n]*\n", " ", text)
    text = re.sub(r"\s+", " ", text)
    out = []
    for sent in re.split(r"(?<=[.!?])\s+", text):
        sent = sent.strip()
        if not (min_words <= len(sent.split()) <= max_words):
            continue
        if re.search(r"[0-9\"“”‘’()\[\]_*;:]|--", sent) or not sent[0].isupper():
            continue
        out.append(sent)
        if len(out) == n:
            break
    return out


def speak(text: str, voice: str = "en-us", speed: int = 165) -> np.ndarray:
    """espeak-ng's reading of `text` as float32 at 16 kHz mono."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed: apt-get install -y espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        subprocess.run([ESPEAK, "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True, capture_output=True)
        rate, data = wavfile.read(wav)
    audio = data.astype(np.float32)
    if data.dtype == np.int16:
        audio /= 32768.0
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        g = gcd(rate, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return np.clip(audio, -1.0, 1.0)


def utterances(n: int, *, offset: int = 0, voices=VOICES, speeds=SPEEDS, split: str = "heldout") -> list[Utterance]:
    """`n` held-out sentences (from the `offset`-th; split="calibration": sentences from before chapter 110), each
    read in a voice and speed taken in turn."""
    out = []
    for i, text in enumerate(sentences(offset + n, split=split)[offset:], start=offset):
        voice, speed = voices[i % len(voices)], speeds[i % len(speeds)]
        out.append(Utterance(text, speak(text, voice, speed), voice, speed))
    return out


def log_mel(processor, utts: list[Utterance]) -> np.ndarray:
    """Whisper's log-mel input features [n, mels, 3000] (float32) of the utterances, by the model's own processor."""
    feats = processor.feature_extractor([u.audio for u in utts], sampling_rate=16_000, return_tensors="np")
    return feats.input_features.astype(np.float32)


def normalize(text: str) -> str:
    """Lower case, hyphens and dashes to spaces, every other non-letter (but the apostrophe) dropped."""
    text = text.lower().replace("’", "'")
    text = re.sub(r"[-–—]", " ", text)
    text = re.sub(r"[^a-z' ]", "", text)
    return re.sub(r"\s+", " ", text).strip()


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER (jiwer) of normalized texts, in percent."""
    import jiwer

    return 100.0 * jiwer.wer([normalize(r) for r in references], [normalize(h) or "<empty>" for h in hypotheses])


def write_wavs(utts: list[Utterance], folder: Path | str) -> Path:
    """The utterances as 16 kHz mono int16 WAV files (utt0000.wav ...) and their texts (texts.json), atomically."""
    import json

    from scipy.io import wavfile

    from depthprune.fsutil import atomic_folder

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        tmp.mkdir(parents=True)
        for i, u in enumerate(utts):
            wavfile.write(tmp / f"utt{i:04d}.wav", SAMPLE_RATE, (u.audio * 32767).astype(np.int16))
        rows = [
            {"file": f"utt{i:04d}.wav", "text": u.text, "voice": u.voice, "speed": u.speed} for i, u in enumerate(utts)
        ]
        (tmp / "texts.json").write_text(json.dumps(rows, indent=1))
    return folder


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="write espeak-ng speech of Moby-Dick sentences as 16 kHz WAV files")
    parser.add_argument("--split", choices=("calibration", "heldout"), default="calibration")
    parser.add_argument("--n", type=int, default=160)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(write_wavs(utterances(args.n, split=args.split), args.out))
