"""Check the converted Whisper tiny.en against CTranslate2 itself (issue 13): the same log-mel features (transformers'
WhisperFeatureExtractor) go to the HF folder's `generate` (greedy) and to `ctranslate2.models.Whisper` on the
package's own model.bin (greedy, float32, prompt <|startoftranscript|><|notimestamps|>); the script reports the share
of identical transcripts and both WERs against the texts. Needs `pip install ctranslate2 jiwer` and espeak-ng.

    python benchmarks/whisper_verify.py [--n 16] [--batch 8] [--json benchmarks/whisper_verify.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speech_data import log_mel, normalize, utterances, wer  # noqa: E402
from whisper_ct2_to_hf import convert, source_folder  # noqa: E402


def hf_transcribe(folder: Path, features: np.ndarray, batch: int) -> list[str]:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperProcessor.from_pretrained(folder)
    out = []
    with torch.inference_mode():
        for i in range(0, len(features), batch):
            ids = model.generate(torch.from_numpy(features[i : i + batch]), do_sample=False, num_beams=1)
            out += processor.batch_decode(ids, skip_special_tokens=True)
    return [t.strip() for t in out]


def ct2_transcribe(features: np.ndarray, batch: int, tokenizer) -> list[str]:
    import ctranslate2

    model = ctranslate2.models.Whisper(str(source_folder()), device="cpu", compute_type="float32")
    prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    out = []
    for i in range(0, len(features), batch):
        chunk = features[i : i + batch]
        results = model.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(chunk)),
            [prompt] * len(chunk),
            beam_size=1,
            max_length=448,
        )
        out += [tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in results]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from transformers import WhisperProcessor

    folder = convert()
    processor = WhisperProcessor.from_pretrained(folder)
    utts = utterances(args.n)
    features = log_mel(processor, utts)
    texts = [u.text for u in utts]
    t0 = time.perf_counter()
    hf = hf_transcribe(folder, features, args.batch)
    t1 = time.perf_counter()
    ct2 = ct2_transcribe(features, args.batch, processor.tokenizer)
    t2 = time.perf_counter()
    same = [a == b for a, b in zip(hf, ct2, strict=True)]
    same_norm = [normalize(a) == normalize(b) for a, b in zip(hf, ct2, strict=True)]
    report = {
        "n": len(utts),
        "audio_seconds": round(sum(u.seconds for u in utts), 1),
        "identical": sum(same) / len(same),
        "identical_normalized": sum(same_norm) / len(same_norm),
        "wer_hf": round(wer(texts, hf), 2),
        "wer_ct2": round(wer(texts, ct2), 2),
        "wer_hf_vs_ct2": round(wer(ct2, hf), 2),
        "seconds_hf": round(t1 - t0, 1),
        "seconds_ct2": round(t2 - t1, 1),
        "rows": [
            {"voice": u.voice, "speed": u.speed, "text": u.text, "hf": a, "ct2": b}
            for u, a, b in zip(utts, hf, ct2, strict=True)
        ],
    }
    for row, s in zip(report["rows"], same, strict=True):
        if not s:
            print(f"DIFF [{row['voice']} {row['speed']}]\n  hf : {row['hf']}\n  ct2: {row['ct2']}")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
    if args.json:
        from depthprune.fsutil import write_atomic

        write_atomic(args.json, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
