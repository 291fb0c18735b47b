"""A tiny Llama written as a GGUF file by hand (GGUFWriter), as llama.cpp's convert_hf_to_gguf.py would write it:
block weights quantized (Q4_1 by default), norms in F32, q/k permuted, a byte-level tokenizer of the tiny vocab."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from depthprune.static.gguf_export import ARCHITECTURES


def write_tiny_gguf(model: nn.Module, path: Path, *, qtype: str = "Q4_1", arch: str = "llama") -> Path:
    """Write the tiny HF Llama `model` to `path` (GGUF) and return the path."""
    cfg = model.config
    qt = gguf.GGMLQuantizationType[qtype]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    # a per-layer array, as some architectures carry: the export must reorder it with the blocks
    w.add_array(f"{arch}.depthprune_test_layer_ids", list(range(cfg.num_hidden_layers)))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    letters = [chr(ord("a") + i) for i in range(26)]
    w.add_token_list([*letters, "ab", *(f"t{i}" for i in range(27, cfg.vocab_size))])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    permute = ARCHITECTURES.get(arch, ARCHITECTURES["llama"])
    for key, tensor in model.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            continue
        data = permute(
            name, tensor.detach().to(torch.float32).numpy(), cfg.num_attention_heads, cfg.num_key_value_heads
        )
        kind = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else qt
        w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
