"""GGUF in -> GGUF out on a tiny Llama written as GGUF in the test (tests/gguf_files.py): kept blocks are the source's
own quantized bytes, renumbered, the depth metadata updated, and transformers' own GGUF loader reads the output back
to the in-memory pruned model's logits."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_files import write_tiny_gguf
from tiny_models import build
from transformers import AutoModelForCausalLM

import depthprune
from depthprune.cli.main import main
from depthprune.errors import OutputExistsError, UnsupportedArchitectureError
from depthprune.static.export import save_model
from depthprune.static.gguf_export import GGUFExportError, export_gguf
from depthprune.static.heal import heal
from depthprune.static.prune import prune

IDS = torch.tensor([[1, 5, 7, 9, 11, 3, 40, 41], [2, 60, 61, 62, 63, 64, 65, 66]])


@pytest.fixture
def source(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tmp_path / "cache"))
    return write_tiny_gguf(build("llama"), tmp_path / "tiny.gguf")


def _gguf_logits(path):
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(IDS).logits


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_plan_copies_the_source_bytes_renumbers_and_reloads_to_the_same_logits(source, tmp_path):
    plan = [0, 2, 2, 1]  # drop block 3, repeat 2, reorder
    pruned = prune(depthprune.load_model(source), plan="0,2,2,1").model
    res = export_gguf(pruned, source, tmp_path / "out.gguf")
    assert res.plan == plan and not res.requantized

    src, out = _tensors(source), _tensors(res.path)
    assert sorted(n for n in out if not n.startswith("blk.")) == sorted(n for n in src if not n.startswith("blk."))
    assert {n.split(".")[1] for n in out if n.startswith("blk.")} == {"0", "1", "2", "3"}
    for name, t in out.items():
        origin = f"blk.{plan[int(name.split('.')[1])]}.{name.split('.', 2)[2]}" if name.startswith("blk.") else name
        assert t.tensor_type == src[origin].tensor_type
        assert t.data.tobytes() == src[origin].data.tobytes(), name
    assert out["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1

    reader = gguf.GGUFReader(res.path)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("llama.block_count") == 4
    assert field("llama.depthprune_test_layer_ids") == plan  # a per-layer array follows the blocks
    assert field("depthprune.plan") == "0,2*2,1" and field("depthprune.source_block_count") == 4
    assert len(field("tokenizer.ggml.tokens")) == 99

    # tolerance 0: the same bytes de-quantized the same way (depthprune loaded its model through this loader too)
    with torch.no_grad():
        expected = pruned(IDS).logits
    assert torch.equal(_gguf_logits(res.path), expected)


def test_healed_tensors_are_quantized_again_to_the_source_type_or_the_type_named(source, tmp_path):
    model = depthprune.load_model(source)
    batches = [torch.randint(3, 99, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    healed = heal(model, "0,1,3", batches, method="fold")
    res = export_gguf(healed, source, tmp_path / "q.gguf")
    assert res.requantized and set(res.requantized.values()) == {"Q4_1"}
    assert all(".attn_output." in n or ".ffn_down." in n for n in res.requantized)  # the fold's output projection
    out, src = _tensors(res.path), _tensors(source)
    assert out["blk.2.attn_q.weight"].data.tobytes() == src["blk.3.attn_q.weight"].data.tobytes()
    name = next(iter(res.requantized))
    assert out[name].data.tobytes() != src[name].data.tobytes()
    reader = gguf.GGUFReader(res.path)
    assert reader.get_field("depthprune.requantized").contents() == sorted(res.requantized)

    with torch.no_grad():
        expected = healed(IDS).logits
    exact = export_gguf(healed, source, tmp_path / "f32.gguf", gguf_type="F32")
    assert set(exact.requantized.values()) == {"F32"}
    torch.testing.assert_close(_gguf_logits(exact.path), expected, rtol=0, atol=1e-5)  # F32 is lossless
    # Q4_1 again: one more rounding of the changed tensors only; logits of a random tiny model are O(1)
    print("Q4_1 re-quantized max logit diff", (_gguf_logits(res.path) - expected).abs().max(), expected.std())
    assert (_gguf_logits(res.path) - expected).abs().max() < 0.5


def test_bad_input_fails_clearly_and_writes_nothing(source, tmp_path):
    pruned = prune(depthprune.load_model(source), plan="0,1").model
    foreign = write_tiny_gguf(build("llama"), tmp_path / "foreign.gguf", arch="mamba")
    with pytest.raises(UnsupportedArchitectureError, match="'mamba' is not supported.*llama"):
        export_gguf(pruned, foreign, tmp_path / "a.gguf")
    with pytest.raises(GGUFExportError, match="cannot write it.*Q8_0"):
        export_gguf(pruned, source, tmp_path / "b.gguf", gguf_type="Q4_K")
    with pytest.raises(GGUFExportError, match="unknown GGUF tensor type 'Q9'"):
        export_gguf(pruned, source, tmp_path / "b.gguf", gguf_type="Q9")
    (tmp_path / "c.gguf").write_bytes(b"keep")
    with pytest.raises(OutputExistsError, match="already exists"):
        export_gguf(pruned, source, tmp_path / "c.gguf")
    with pytest.raises(OutputExistsError, match="loaded from"):
        export_gguf(pruned, source, source, overwrite=True)
    assert (tmp_path / "c.gguf").read_bytes() == b"keep"
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left behind


def test_cli_prune_writes_gguf_and_refuses_bad_requests_before_loading(source, tmp_path, capsys):
    out = tmp_path / "p.gguf"
    assert main(["prune", str(source), "--plan", "0,2,3", "-o", str(out)]) == 0
    assert "copied byte for byte" in capsys.readouterr().out
    assert gguf.GGUFReader(out).get_field("llama.block_count").contents() == 3
    before = out.read_bytes()
    assert main(["prune", str(source), "--plan", "0,1", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["prune", str(source), "--plan", "0,1", "-o", str(tmp_path / "t.gguf"), "--gguf-type", "IQ2_XS"]) == 2
    assert "cannot write" in capsys.readouterr().err
    folder = tmp_path / "hf"
    save_model(depthprune.load_model(source), folder)
    assert main(["prune", str(folder), "--plan", "0,1", "-o", str(tmp_path / "u.gguf")]) == 2
    assert "needs a GGUF source" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("t.gguf", "u.gguf"))
    np.testing.assert_array_equal(np.frombuffer(before[:4], np.uint8), np.frombuffer(b"GGUF", np.uint8))
