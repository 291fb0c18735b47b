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
        (lambda d: write_wavs(d, 1), [], "add --heal distill, or choose the layers on it with --remove N"),
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


def test_audio_needs_a_speech_model(speech, tmp_path, capsys):
    llama = tmp_path / "llama"
    build("llama").save_pretrained(llama)
    wavs = ["--audio", str(speech / "wavs"), "-o", str(tmp_path / "o")]
    assert main(["prune", str(llama), "--plan", "0,1", *HEAL, *wavs]) != 0
    assert "speech encoder-decoder" in capsys.readouterr().err


def test_read_wav_scales_integers_and_downmixes_channels(tmp_path):
    stereo = np.stack([np.full(100, 16384, np.int16), np.full(100, -16384, np.int16)], axis=1)
    wavfile.write(tmp_path / "s.wav", 16000, stereo)
    assert np.allclose(read_wav(tmp_path / "s.wav"), 0.0, atol=1e-4)
    wavfile.write(tmp_path / "m.wav", 16000, np.full(10, 16384, np.int16))
    assert np.allclose(read_wav(tmp_path / "m.wav"), 0.5, atol=1e-4)
    assert issubclass(AudioError, ValueError)


@pytest.mark.parametrize("scorer", [None, "angular"])  # None: the default with --audio, block_influence
def test_prune_chooses_decoder_layers_on_speech_and_the_models_own_transcripts(speech, tmp_path, capsys, scorer):
    out = tmp_path / "scored"
    argv = ["prune", str(speech / "whisper"), "--remove", "1", "--audio", str(speech / "wavs")]
    assert main([*argv, *(["--scorer", scorer] if scorer else []), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"chosen by {scorer or 'block_influence'} on 4 utterances" in printed and "healed" not in printed
    config = json.loads((out / "config.json").read_text())
    assert config["decoder_layers"] == 2 and config["encoder_layers"] == 3  # the decoder: the last stack by default
    assert transformers.AutoFeatureExtractor.from_pretrained(out) is not None


def test_with_transcripts_gives_the_models_greedy_transcripts_as_decoder_inputs(speech):
    from depthprune.static.heal.distill_seq2seq import with_transcripts

    model = transformers.WhisperForConditionalGeneration.from_pretrained(speech / "whisper").eval()
    extractor = transformers.AutoFeatureExtractor.from_pretrained(speech / "whisper")
    (batch,) = speech_batches(extractor, speech / "wavs")
    (scored,) = with_transcripts(model, [batch], max_new_tokens=4)
    ids = scored["decoder_input_ids"]
    assert torch.equal(scored["input_features"], batch["input_features"]) and ids.shape[0] == 4
    with torch.no_grad():
        greedy = model.generate(batch["input_features"], do_sample=False, max_new_tokens=4)
    start = model.generation_config.decoder_start_token_id
    assert (ids[:, 0] == start).all()
    for row, g in zip(ids.tolist(), greedy.tolist(), strict=True):  # each row: the prompt, then generate's tokens
        text = [t for t in g if t not in (start, model.generation_config.eos_token_id)]
        assert all(t in row for t in text)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        with_transcripts(model, [batch], max_new_tokens=0)


def test_a_scorer_that_needs_a_causal_lm_head_is_refused_on_speech(speech, tmp_path, capsys):
    argv = ["prune", str(speech / "whisper"), "--remove", "1", "--scorer", "lookahead_kl"]
    assert main([*argv, "--audio", str(speech / "wavs"), "-o", str(tmp_path / "o")]) != 0
    assert "use block_influence or angular" in capsys.readouterr().err


def test_eval_audio_gives_wer_and_speed_beside_the_untouched_model(speech, tmp_path, capsys):
    from depthprune.bench.speech import transcribe

    pruned = tmp_path / "pruned"
    argv = ["prune", str(speech / "whisper"), "--remove", "1", "--audio", str(speech / "wavs"), "-o", str(pruned)]
    assert main(argv) == 0
    wavs = tmp_path / "wavs"
    write_wavs(wavs)
    (wavs / "texts.json").write_text(json.dumps([{"file": f"utt{i:02d}.wav", "text": "w1 w2 w3"} for i in range(4)]))
    capsys.readouterr()
    argv = ["eval", str(pruned), "--audio", str(wavs), "--batch-sizes", "1,2", "--repeats", "1", "--json"]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    untouched, mine = report["rows"]
    assert report["baseline"] == "untouched" and report["utterances"] == 4
    assert untouched["decoder_layers"] == 3 and mine["decoder_layers"] == 2
    assert untouched["speedup_b1"] == 1 and untouched["speedup_b2"] == 1
    # the tiny random Whisper writes tokens its word tokenizer decodes to nothing: every reference word is missed
    assert report["transcripts"]["untouched"] == [""] * 4 and untouched["wer_vs_untouched"] is None
    assert untouched["wer_refs"] == mine["wer_refs"] == 100.0
    assert {"wer_refs", "s_per_utt_b1", "s_per_utt_b2", "speedup_b2"} <= set(mine) and mine["s_per_utt_b1"] > 0
    model = transformers.WhisperForConditionalGeneration.from_pretrained(pruned).eval()
    extractor = transformers.AutoFeatureExtractor.from_pretrained(pruned)
    tok = transformers.AutoTokenizer.from_pretrained(pruned)
    x = torch.cat([b["input_features"] for b in speech_batches(extractor, wavs)])
    assert report["transcripts"]["model"] == transcribe(model, tok, x, 4, max_new_tokens=4)[0]
    (wavs / "texts.json").write_text(json.dumps([{"file": "utt00.wav", "text": "w1"}]))
    assert main(["eval", str(pruned), "--audio", str(wavs)]) != 0
    assert "no reference text for 3 of 4 WAV files" in capsys.readouterr().err


def test_word_error_rate_normalises_both_sides():
    from depthprune.bench.speech import word_error_rate

    assert word_error_rate(["The cat sat."], ["the  cat, sat"]) == 0
    assert word_error_rate(["a b c d"], ["a x c"]) == 50.0  # one substitution, one deletion
    with pytest.raises(ValueError, match="as many hypotheses"):
        word_error_rate(["a"], [])
