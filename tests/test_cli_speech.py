"""`depthprune prune SPEECH_MODEL --plan ... --heal distill --audio DIR` on a tiny random Whisper: the export is a
plain transformers folder (weights, tokenizer, feature extractor) running the plan, and unusable audio gets a clear
error before any training."""

import json

import numpy as np
import pytest
import torch
import transformers
from scipy.io import wavfile
from tiny_models import build, save_speech_model, write_wavs

from depthprune.audio import AudioError, read_wav, speech_batches
from depthprune.cli.main import main

HEAL = ["--heal", "distill", "--option", "epochs=1", "--option", "max_new_tokens=4"]


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    save_speech_model(root / "whisper")
    write_wavs(root / "wavs")
    return root


def test_prune_heals_a_speech_model_on_a_folder_of_wavs(speech, tmp_path, capsys):
    out = tmp_path / "healed"
    argv = ["prune", str(speech / "whisper"), "--plan", "decoder=0,2", *HEAL, "--audio", str(speech / "wavs")]
    rc = main([*argv, "-o", str(out)])
    assert rc == 0 and "healed by distill on 4 utterances" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["decoder_layers"] == 2 and config["depthprune_healing"]["examples"] == 4
    model = transformers.WhisperForConditionalGeneration.from_pretrained(out).eval()
    extractor = transformers.AutoFeatureExtractor.from_pretrained(out)
    assert transformers.AutoTokenizer.from_pretrained(out) is not None
    x = speech_batches(extractor, speech / "wavs")[0]["input_features"]
    with torch.no_grad():
        assert model.generate(x, max_new_tokens=3).shape[0] == 4


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda d: wavfile.write(d / "a.wav", 8000, np.zeros(800, np.int16)), HEAL, "8000 Hz"),
        (lambda d: wavfile.write(d / "a.wav", 16000, np.zeros(0, np.int16)), HEAL, "no samples"),
        (lambda d: (d / "a.wav").write_text("not audio"), HEAL, "not a readable WAV"),
        (lambda d: (d / "a.txt").write_text("x"), HEAL, "no .wav files"),
        (lambda d: wavfile.write(d / "a.wav", 16000, np.zeros(20000, np.int16)), HEAL, "longer than"),
        (lambda d: write_wavs(d, 1), [], "add --heal distill"),
    ],
)
def test_unusable_audio_gets_a_clear_error(speech, tmp_path, capsys, make, args, message):
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    make(wavs)
    argv = ["prune", str(speech / "whisper"), "--plan", "decoder=0,2", *args, "--audio", str(wavs)]
    assert main([*argv, "-o", str(tmp_path / "out")]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_audio_needs_a_speech_model_and_a_plan(speech, tmp_path, capsys):
    llama = tmp_path / "llama"
    build("llama").save_pretrained(llama)
    wavs = ["--audio", str(speech / "wavs"), "-o", str(tmp_path / "o")]
    assert main(["prune", str(llama), "--plan", "0,1", *HEAL, *wavs]) != 0
    assert "speech encoder-decoder" in capsys.readouterr().err
    assert main(["prune", str(speech / "whisper"), "--remove", "1", *HEAL, *wavs]) != 0
    assert "give --plan" in capsys.readouterr().err


def test_read_wav_scales_integers_and_downmixes_channels(tmp_path):
    stereo = np.stack([np.full(100, 16384, np.int16), np.full(100, -16384, np.int16)], axis=1)
    wavfile.write(tmp_path / "s.wav", 16000, stereo)
    assert np.allclose(read_wav(tmp_path / "s.wav"), 0.0, atol=1e-4)
    wavfile.write(tmp_path / "m.wav", 16000, np.full(10, 16384, np.int16))
    assert np.allclose(read_wav(tmp_path / "m.wav"), 0.5, atol=1e-4)
    assert issubclass(AudioError, ValueError)
