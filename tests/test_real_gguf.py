"""Real tier: SmolLM2-135M (Q4_1 GGUF) with 8 layers removed, written as GGUF and read back by transformers' GGUF
loader and by llama.cpp (llama-cpp-python, the `llama` extra)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import depthprune
from depthprune.io import resolve_source
from depthprune.static.gguf_export import export_gguf
from depthprune.static.prune import prune

pytestmark = pytest.mark.real

PLAN = "0-11,18-24,27-29"  # 12-17, 25, 26 removed: block_influence's choice (RESULTS 1a)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder, name = resolve_source("smollm2")
    source = Path(folder) / name
    model = depthprune.load_model("smollm2")
    pruned = prune(model, plan=PLAN).model
    out = tmp_path_factory.mktemp("gguf") / "pruned.gguf"
    return source, pruned, export_gguf(pruned, source, out)


def test_smollm2_gguf_size_bytes_and_transformers_logits(exported):
    source, pruned, res = exported
    src = gguf.GGUFReader(source)
    block = sum(t.n_bytes for t in src.tensors if t.name.startswith("blk."))
    out_block = sum(t.n_bytes for t in gguf.GGUFReader(res.path).tensors if t.name.startswith("blk."))
    assert out_block / block == pytest.approx(22 / 30, abs=1e-12)  # the layer ratio, exactly
    predicted = res.source_bytes - block * 8 / 30  # header, Q8_0 embedding (tied head) and norms stay
    assert abs(res.output_bytes / predicted - 1) < 0.02
    assert len(res.copied) == 272 - 8 * 9 and not res.requantized

    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    loaded = AutoModelForCausalLM.from_pretrained(str(res.path.parent), gguf_file=res.path.name, dtype=torch.float32)
    assert loaded.config.num_hidden_layers == 22
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned(ids).logits)  # tolerance 0: same bytes, same de-quantization


def test_smollm2_gguf_runs_in_llama_cpp(exported):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install '.[llama]')")
    _, pruned, res = exported
    llm = llama_cpp.Llama(str(res.path), n_ctx=128, n_threads=2, verbose=False, logits_all=True)
    text = llm("The whale", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert text.strip()
    tok = depthprune.load_tokenizer("smollm2")
    ids = tok("Call me Ishmael. Some years ago, never mind how long precisely", return_tensors="pt").input_ids
    llm.reset()
    llm.eval(ids[0].tolist())
    ours = np.array(llm.scores[: ids.shape[1]])
    with torch.no_grad():
        theirs = pruned(ids).logits[0].numpy()
    # llama.cpp quantizes activations to 8 bits for its Q4_1 matmuls: compare the argmax, not the logits
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9
