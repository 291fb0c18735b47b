"""GGUF in -> GGUF out on SmolLM2-135M (Q4_1): file size against the layer ratio, and llama.cpp's decode speed of the
pruned GGUF against the unpruned one in the same run, next to the theoretical FLOPs ratio.

The pruned file is written by depthprune.static.gguf_export (kept blocks copied byte for byte); llama.cpp runs both
files through llama-cpp-python (batch 1, greedy, the prompt's cache kept): prefill of a held-out prompt, then
`--new-tokens` single-token decode steps, timed per step; rounds interleave the two models and the figure is the median
over rounds. The FLOPs ratio comes from depthprune.bench.flops on the same plan at the mean decode context.

Targets (issue 16): file size ratio within 2% of the layer ratio; llama.cpp decode speedup >= 0.95 x the FLOPs ratio.

    python benchmarks/gguf_bench.py --json benchmarks/gguf_bench.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from depthprune import load_model, load_tokenizer
from depthprune.bench.flops import flops_ratio
from depthprune.bench.report import format_table, write_json
from depthprune.data import heldout_text
from depthprune.io import resolve_source
from depthprune.static.gguf_export import export_gguf
from depthprune.static.prune import prune

TARGET = 0.95  # llama.cpp decode speedup / theoretical FLOPs ratio
PLAN = "0-11,18-24,27-29"  # 8 of 30 removed (12-17, 25, 26): block_influence's choice in RESULTS 1a


def _decode_run(llm, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, median seconds per decode step, greedy tokens) of one run from an empty cache."""
    import llama_cpp

    n_vocab = llm.n_vocab()
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    out, steps = [], []
    for _ in range(new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))
        out.append(int(logits.argmax()))
        start = time.perf_counter()
        llm.eval([out[-1]])
        steps.append(time.perf_counter() - start)
    return prefill, statistics.median(steps), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=PLAN, help=f"layers kept (default {PLAN}: 8 of 30 removed)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1: robust on shared CPUs)")
    parser.add_argument("--out", default=None, help="folder for the pruned GGUF (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import llama_cpp

    folder, name = resolve_source("smollm2")
    source = Path(folder) / name
    work = Path(args.out or tempfile.mkdtemp(prefix="gguf_bench-"))
    full_hf = load_model("smollm2")
    pruned_hf = prune(full_hf, plan=args.plan).model
    start = time.perf_counter()
    res = export_gguf(pruned_hf, source, work / "pruned.gguf", overwrite=True)
    export_s = time.perf_counter() - start

    import gguf

    tensors = gguf.GGUFReader(source).tensors
    block = sum(t.n_bytes for t in tensors if t.name.startswith("blk."))
    header = gguf.GGUFReader(source).data_offset
    layer_ratio = len(res.plan) / 30
    predicted = source.stat().st_size - block * (1 - layer_ratio)  # header, embeddings and norms stay
    out_tensors = gguf.GGUFReader(res.path).tensors
    out_block = sum(t.n_bytes for t in out_tensors if t.name.startswith("blk."))
    size = {
        "source_bytes": res.source_bytes,
        "output_bytes": res.output_bytes,
        "file_ratio": res.output_bytes / res.source_bytes,
        "layer_ratio": layer_ratio,
        "block_bytes_ratio": out_block / block,
        "predicted_output_bytes": predicted,
        "output_vs_predicted": res.output_bytes / predicted,
        "source_block_bytes": block,
        "source_other_tensor_bytes": sum(t.n_bytes for t in tensors) - block,
        "source_header_bytes": header,
        "copied_tensors": len(res.copied),
        "requantized_tensors": len(res.requantized),
        "export_seconds": export_s,
    }

    tokenizer = load_tokenizer("smollm2")
    prompt = tokenizer(heldout_text(None))["input_ids"][: args.prompt_len]
    llms = {
        "untouched": llama_cpp.Llama(str(source), n_ctx=512, n_threads=args.threads, verbose=False),
        "pruned": llama_cpp.Llama(str(res.path), n_ctx=512, n_threads=args.threads, verbose=False),
    }
    for llm in llms.values():  # warm-up
        _decode_run(llm, prompt, 4)
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in llms}
    tokens = {}
    for _ in range(args.repeats):
        for key, llm in llms.items():
            prefill, step, tokens[key] = _decode_run(llm, prompt, args.new_tokens)
            runs[key].append((prefill, step))
    med = {k: (statistics.median(p for p, _ in v), statistics.median(s for _, s in v)) for k, v in runs.items()}
    context = args.prompt_len + args.new_tokens // 2
    theory = flops_ratio(pruned_hf, full_hf, context_len=context, phase="decode")
    theory_prefill = flops_ratio(pruned_hf, full_hf, context_len=args.prompt_len, phase="prefill")
    decode_speedup = med["untouched"][1] / med["pruned"][1]
    prefill_speedup = med["untouched"][0] / med["pruned"][0]
    speed = {
        "threads": args.threads,
        "prompt_len": len(prompt),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "decode_ms_per_token": {k: 1e3 * v[1] for k, v in med.items()},
        "decode_tokens_per_s": {k: 1 / v[1] for k, v in med.items()},
        "prefill_s": {k: v[0] for k, v in med.items()},
        "decode_speedup": decode_speedup,
        "decode_flops_ratio": theory,
        "decode_vs_theory": decode_speedup / theory,
        "prefill_speedup": prefill_speedup,
        "prefill_flops_ratio": theory_prefill,
        "greedy_pruned": tokenizer.decode(tokens["pruned"][:24]),
        "greedy_untouched": tokenizer.decode(tokens["untouched"][:24]),
        "rounds": runs,
    }
    rows = [
        {"model": k, "layers": 30 if k == "untouched" else len(res.plan), "decode ms/token": f"{1e3 * v[1]:.2f}",
         "prefill s": f"{v[0]:.3f}", "speedup": f"{med['untouched'][1] / v[1]:.3f}"}
        for k, v in med.items()
    ]  # fmt: skip
    print(format_table(rows, title=f"llama.cpp, batch 1, {args.threads} thread(s), median of {args.repeats}"))
    print(
        f"decode speedup {decode_speedup:.3f} vs FLOPs ratio {theory:.3f}: {decode_speedup / theory:.3f} "
        f"(target >= {TARGET}); prefill {prefill_speedup:.3f} vs {theory_prefill:.3f}"
    )
    print(
        f"size: {res.output_bytes / 1e6:.2f} MB / {res.source_bytes / 1e6:.2f} MB = {size['file_ratio']:.4f} (layer "
        f"ratio {layer_ratio:.4f}); block tensors {size['block_bytes_ratio']:.4f}; file / predicted "
        f"{size['output_vs_predicted']:.4f}; {len(res.copied)} tensors copied, {len(res.requantized)} re-quantized"
    )
    if args.json:
        write_json(
            {
                "benchmark": "gguf_bench",
                "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                            "llama_cpp_python": llama_cpp.__version__},
                "plan": args.plan,
                "size": size,
                "speed": speed,
            },
            args.json,
        )  # fmt: skip


if __name__ == "__main__":
    main()
