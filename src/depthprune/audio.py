"""Calibration speech: a folder of WAV files (16 kHz, mono or downmixed) read into a speech model's encoder inputs,
with clear errors for what is not usable (wrong sample rate, empty, not a WAV file, longer than the model's window).

    batches = speech_batches(feature_extractor, "out/speech", batch_size=8)  # [{"input_features": [b, mels, frames]}]

Core: imports no method.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depthprune.errors import DepthpruneError

SAMPLE_RATE = 16_000
EXTENSIONS = (".wav",)


class AudioError(DepthpruneError, ValueError):
    """A calibration audio file or folder that cannot be used, with what was wrong and what to do."""


def read_wav(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The samples of a WAV file as float32 [samples] in [-1, 1] (several channels averaged); a file at another
    sample rate, an empty one or one that is not WAV is refused, saying how to convert it."""
    from scipy.io import wavfile

    path = Path(path)
    convert = f"convert it with e.g. `ffmpeg -i {path.name} -ar {sample_rate} -ac 1 out.wav`"
    try:
        rate, data = wavfile.read(path)
    except (ValueError, OSError, EOFError) as err:
        raise AudioError(f"{path}: not a readable WAV file ({err}); {convert}") from None
    if rate != sample_rate:
        raise AudioError(
            f"{path}: sampled at {rate} Hz, the model's feature extractor needs {sample_rate} Hz; {convert}"
        )
    if data.size == 0 or data.shape[0] == 0:
        raise AudioError(f"{path}: holds no samples; remove it or record it again")
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        audio = (data.astype(np.float32) - (info.max + info.min + 1) / 2) / ((info.max - info.min + 1) / 2)
    else:
        audio = data.astype(np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if not np.isfinite(audio).all():
        raise AudioError(f"{path}: holds NaN or infinite samples")
    return np.clip(audio, -1.0, 1.0)


def audio_files(folder: str | os.PathLike) -> list[Path]:
    """The WAV files of `folder`, sorted by name (a clear error for a missing folder or one without any)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AudioError(f"--audio {folder}: not a folder; give a folder of 16 kHz WAV files")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise AudioError(f"--audio {folder}: no .wav files in it; give a folder of 16 kHz WAV files")
    return files


def speech_batches(
    feature_extractor: Any, folder: str | os.PathLike, *, batch_size: int = 8, limit: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """The WAV files of `folder` (the first `limit` by name) as encoder inputs of the feature extractor's model, in
    batches: [{"input_features": FloatTensor [b, mels, frames]}]. Files longer than the model's window (30 s for
    Whisper) are refused: the encoder would see only their start, and the transcript would not match it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rate = int(getattr(feature_extractor, "sampling_rate", SAMPLE_RATE))
    window = getattr(feature_extractor, "n_samples", None)
    files = audio_files(folder)[:limit]
    audio = []
    for path in files:
        samples = read_wav(path, rate)
        if window is not None and len(samples) > window:
            raise AudioError(
                f"{path}: {len(samples) / rate:.1f} s is longer than the model's {window / rate:.0f} s window; cut it "
                "into shorter utterances"
            )
        audio.append(samples)
    out = []
    for i in range(0, len(audio), batch_size):
        feats = feature_extractor(audio[i : i + batch_size], sampling_rate=rate, return_tensors="pt")
        out.append({"input_features": feats["input_features"].float()})
    return out


__all__ = ["SAMPLE_RATE", "AudioError", "audio_files", "read_wav", "speech_batches"]
