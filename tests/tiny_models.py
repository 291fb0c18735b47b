"""Tiny random models, one per supported model_type (hidden 32, 2-4 layers, vocab 99): built in well under a second.

`build(name)` returns a fresh model in eval mode (fixed seed, so two builds are equal) and `inputs(name)` the keyword
arguments of a forward pass: token ids with a padded row, plus decoder ids for encoder-decoders and log-mel features
for Whisper. `CASES` lists every case by name; a case name is the model_type, with a suffix where one model_type is
tested in two layouts (ALBERT with one shared group and with two groups).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn

VOCAB = 99
HIDDEN = 32
HEADS = 4
SEQ = 7
PAD = 0
WORDS = ["the", "whale", "sea", "ship", "captain", "white", "boat", "harpoon", "deep", "wave", "sail", "storm"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One tiny model: how to build its config, which head class to run, what kind of inputs it takes."""

    name: str
    model_class: str
    config: Callable[[], transformers.PretrainedConfig]
    kind: str  # "decoder" (causal LM), "encoder" (sequence classification), "seq2seq", "speech"

    @property
    def model_type(self) -> str:
        return self.config().model_type


def _llama_like(cls: type, layers: int = 4, tie: bool = False, **extra: Any) -> transformers.PretrainedConfig:
    return cls(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
        **extra,
    )


def _bert_like(cls: type, **extra: Any) -> transformers.PretrainedConfig:
    return cls(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=4,
        num_attention_heads=HEADS,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        num_labels=3,
        pad_token_id=PAD,
        initializer_range=0.2,
        **extra,
    )


_QWEN2_TYPES = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
_GEMMA3_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def _gemma3_text(**extra: Any) -> transformers.PretrainedConfig:
    return _llama_like(
        transformers.Gemma3TextConfig,
        tie=True,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=3,
        layer_types=list(_GEMMA3_TYPES),
        **extra,
    )


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("llama", "LlamaForCausalLM", lambda: _llama_like(transformers.LlamaConfig), "decoder"),
        Case(
            "mistral",
            "MistralForCausalLM",
            lambda: _llama_like(transformers.MistralConfig, sliding_window=4, head_dim=8),
            "decoder",
        ),
        Case(
            "qwen2",
            "Qwen2ForCausalLM",
            lambda: _llama_like(
                transformers.Qwen2Config,
                tie=True,
                use_sliding_window=True,
                sliding_window=3,
                layer_types=list(_QWEN2_TYPES),
            ),
            "decoder",
        ),
        Case("gemma3_text", "Gemma3ForCausalLM", _gemma3_text, "decoder"),
        Case("phi3", "Phi3ForCausalLM", lambda: _llama_like(transformers.Phi3Config), "decoder"),
        Case(
            "gpt2",
            "GPT2LMHeadModel",
            lambda: transformers.GPT2Config(
                vocab_size=VOCAB,
                n_embd=HIDDEN,
                n_layer=4,
                n_head=HEADS,
                n_positions=64,
                pad_token_id=PAD,
                bos_token_id=1,
                eos_token_id=2,
                initializer_range=0.2,
            ),
            "decoder",
        ),
        Case(
            "gpt_neox",
            "GPTNeoXForCausalLM",
            lambda: transformers.GPTNeoXConfig(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_hidden_layers=4,
                num_attention_heads=HEADS,
                intermediate_size=64,
                max_position_embeddings=64,
                pad_token_id=PAD,
                tie_word_embeddings=False,
            ),
            "decoder",
        ),
        Case(
            "opt",
            "OPTForCausalLM",
            lambda: transformers.OPTConfig(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                word_embed_proj_dim=HIDDEN,
                num_hidden_layers=4,
                num_attention_heads=HEADS,
                ffn_dim=64,
                max_position_embeddings=64,
                pad_token_id=PAD,
                bos_token_id=1,
                eos_token_id=2,
                init_std=0.2,
            ),
            "decoder",
        ),
        Case("bert", "BertForSequenceClassification", lambda: _bert_like(transformers.BertConfig), "encoder"),
        Case("roberta", "RobertaForSequenceClassification", lambda: _bert_like(transformers.RobertaConfig), "encoder"),
        Case(
            "distilbert",
            "DistilBertForSequenceClassification",
            lambda: transformers.DistilBertConfig(
                vocab_size=VOCAB,
                dim=HIDDEN,
                n_layers=4,
                n_heads=HEADS,
                hidden_dim=64,
                max_position_embeddings=64,
                num_labels=3,
                pad_token_id=PAD,
                initializer_range=0.2,
            ),
            "encoder",
        ),
        Case(
            "albert",
            "AlbertForSequenceClassification",
            lambda: _bert_like(transformers.AlbertConfig, embedding_size=16, num_hidden_groups=1),
            "encoder",
        ),
        Case(
            "albert_2groups",
            "AlbertForSequenceClassification",
            lambda: _bert_like(transformers.AlbertConfig, embedding_size=16, num_hidden_groups=2),
            "encoder",
        ),
        Case(
            "t5",
            "T5ForConditionalGeneration",
            lambda: transformers.T5Config(
                vocab_size=VOCAB,
                d_model=HIDDEN,
                d_kv=8,
                d_ff=64,
                num_layers=3,
                num_decoder_layers=3,
                num_heads=HEADS,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16,
                pad_token_id=PAD,
                eos_token_id=2,
                decoder_start_token_id=PAD,
                initializer_factor=10.0,
            ),
            "seq2seq",
        ),
        Case(
            "bart",
            "BartForConditionalGeneration",
            lambda: transformers.BartConfig(
                vocab_size=VOCAB,
                d_model=HIDDEN,
                encoder_layers=3,
                decoder_layers=3,
                encoder_attention_heads=HEADS,
                decoder_attention_heads=HEADS,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=64,
                pad_token_id=PAD,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=2,
                forced_eos_token_id=None,
                init_std=0.2,
            ),
            "seq2seq",
        ),
        Case(
            "whisper",
            "WhisperForConditionalGeneration",
            lambda: transformers.WhisperConfig(
                vocab_size=VOCAB,
                d_model=HIDDEN,
                encoder_layers=3,
                decoder_layers=3,
                encoder_attention_heads=HEADS,
                decoder_attention_heads=HEADS,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                num_mel_bins=8,
                max_source_positions=8,
                max_target_positions=32,
                pad_token_id=PAD,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=1,
                begin_suppress_tokens=None,
                suppress_tokens=None,
                init_std=0.2,
            ),
            "speech",
        ),
    ]
}

DECODERS = [n for n, c in CASES.items() if c.kind == "decoder"]
ENCODER_DECODERS = [n for n, c in CASES.items() if c.kind in ("seq2seq", "speech")]


def build(name: str, seed: int = 0) -> nn.Module:
    """A fresh tiny model of case `name`, random but reproducible, in eval mode."""
    case = CASES[name]
    torch.manual_seed(seed)
    model = getattr(transformers, case.model_class)(case.config())
    model.config._name_or_path = ""
    return model.eval()


def build_gemma3_multimodal(seed: int = 0) -> nn.Module:
    """Gemma 3 with its vision tower (model_type "gemma3"; the decoder is the gemma3_text case). Kept out of CASES:
    it takes the same text inputs as gemma3_text."""
    text = CASES["gemma3_text"].config()
    vision = transformers.SiglipVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 3,
    )
    torch.manual_seed(seed)
    return transformers.Gemma3ForConditionalGeneration(config).eval()


def build_gemma3_sliding(seed: int = 0, softcap: float | None = 3.0) -> nn.Module:
    """Gemma 3 text with a sliding window of 3 (shorter than every test sequence), a sliding/full layer mix and, by
    default, a final logit soft-cap small enough to change the logits of a random model."""
    config = _gemma3_text(final_logit_softcapping=softcap)
    torch.manual_seed(seed)
    return transformers.Gemma3ForCausalLM(config).eval()


def input_ids(batch: int = 2, seq: int = SEQ, seed: int = 1, pad_first_row: int = 2) -> tuple[torch.Tensor, ...]:
    """Token ids [batch, seq] in 3..VOCAB-1, and a mask with `pad_first_row` left-padded positions in row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and pad_first_row:
        ids[0, :pad_first_row] = PAD
        mask[0, :pad_first_row] = 0
    return ids, mask


def inputs(name: str, batch: int = 2) -> dict[str, torch.Tensor]:
    """Forward-pass keyword arguments for case `name` (padding on the left for decoders, right for encoders)."""
    kind = CASES[name].kind
    ids, mask = input_ids(batch)
    if kind == "encoder":
        return {"input_ids": ids.flip(-1), "attention_mask": mask.flip(-1)}
    if kind == "decoder":
        return {"input_ids": ids, "attention_mask": mask}
    dec_ids, _ = input_ids(batch, seq=4, seed=2, pad_first_row=0)
    if kind == "seq2seq":
        return {"input_ids": ids.flip(-1), "attention_mask": mask.flip(-1), "decoder_input_ids": dec_ids}
    config = CASES[name].config()
    g = torch.Generator().manual_seed(3)
    features = torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions, generator=g)
    return {"input_features": features, "decoder_input_ids": dec_ids}


def logits(model: nn.Module, kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).logits


def tokenizer(words: list[str] = WORDS) -> transformers.PreTrainedTokenizerBase:
    """A word-level BertTokenizer over `words` (ids 0-4 are its special tokens, [PAD] = PAD), for the commands that
    tokenize text; every other word reads as [UNK]."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def build_opt_projected(seed: int = 0) -> nn.Module:
    """OPT whose word embeddings are narrower than its hidden size (word_embed_proj_dim < hidden_size, as opt-350m):
    project_in after the embedding, project_out after the final norm, before the LM head."""
    config = CASES["opt"].config()
    config.word_embed_proj_dim = HIDDEN // 2
    torch.manual_seed(seed)
    return transformers.OPTForCausalLM(config).eval()


def tiny_vocab_model(seed: int = 3) -> nn.Module:
    """A 4-layer Llama over 8 tokens with a peaked head: sampling tests compare empirical token frequencies with
    exact distributions (few tokens: few samples suffice)."""
    config = transformers.LlamaConfig(
        vocab_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked next-token distribution, far from the drafts'
    return model


def save_speech_model(folder, decoder_layers: int = 3, seed: int = 0) -> nn.Module:
    """A tiny random Whisper saved as a speech model folder: weights, a word tokenizer and a feature extractor of its
    size (8 mel bins, 16 frames: 1 s of 16 kHz audio, hop 1000), as `prune --audio` reads it. Returns the model."""
    config = CASES["whisper"].config()
    config.decoder_layers = decoder_layers
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer(WORDS).save_pretrained(folder)
    transformers.WhisperFeatureExtractor(feature_size=8, chunk_length=1, hop_length=1000).save_pretrained(folder)
    return model


def write_wavs(folder, n: int = 4, seconds: float = 0.6, rate: int = 16_000, seed: int = 0) -> list:
    """`n` WAV files of noise bursts (int16, mono, `rate` Hz) in `folder`: calibration speech for the tiny Whisper."""
    from pathlib import Path

    import numpy as np
    from scipy.io import wavfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        samples = (rng.standard_normal(int(seconds * rate)) * 3000 * (1 + i)).astype(np.int16)
        paths.append(folder / f"utt{i:02d}.wav")
        wavfile.write(paths[-1], rate, samples)
    return paths


def build_dit(seed: int = 0, depth: int = 3, width: int = 32) -> nn.Module:
    """A tiny class-conditional diffusers DiT (28x28 grey images, patch 4, 2 heads), random but reproducible, in eval
    mode; every weight nudged off its init so that no modulation is exactly zero."""
    from depthprune.diffusion.train import DiTShape
    from depthprune.diffusion.train import build_dit as build

    model = build(DiTShape(width=width, heads=2, depth=depth), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def dit_inputs(batch: int = 3, seed: int = 2) -> dict[str, torch.Tensor]:
    """Noisy images, timesteps and class labels (the null class 10 included) for a tiny DiT."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 1, 28, 28, generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
        "class_labels": torch.arange(batch) % 11,
    }


def write_fashion_mnist(folder, train: int = 64, test: int = 32, seed: int = 0):
    """Tiny Fashion-MNIST IDX .gz files (random 28x28 bytes, labels cycling over the 10 classes) in `folder`, named as
    Debian's package names them; point $DEPTHPRUNE_FASHION_MNIST at it."""
    import gzip
    from pathlib import Path

    import numpy as np

    from depthprune.diffusion.data import FILES

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        images, labels = FILES[split]
        pixels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()
        header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        (folder / images).write_bytes(gzip.compress(header + pixels))
        classes = (np.arange(n) % 10).astype(np.uint8).tobytes()
        (folder / labels).write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + classes))
    return folder


def randomize_routers(routers, seed=0, std=2.0):
    """Linear-gate routers (depthprune.skipping) with random weights and zero biases, in place: they skip about
    half of the routed layers (sub-layers) at threshold 0.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in routers.gates.values():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * std)
            gate.bias.zero_()
    return routers
