"""GGUF in -> GGUF out on SmolLM2-135M (Q4_1): file size against the layer ratio, and llama.cpp's decode speed of the
pruned GGUF against the unpruned one in the same run, next to the theoretical FLOPs ratio.

The pruned file is written by depthprune.static.gguf_export (kept blocks copied byte for byte); llama.cpp runs both
files through llama-cpp-python (batch 1, greedy, the prompt's cache kept): prefill of a held-out prompt, then
`--new-tokens` single-token decode steps, timed per step with the two models' steps interleaved (both see the same
load of a shared machine); the figure is the median step over all rounds (and the 10th percentile). The FLOPs ratio
comes from depthprune.bench.flops on the same plan at the mean decode context.

Targets (issue 16): file size ratio within 2% of the layer ratio; llama.cpp decode speedup >= 0.95 x the FLOPs ratio.

    python benchmarks/gguf_bench.py --json benchmarks/gguf_bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from depthprune import load_model, load_tokenizer
from depthprune.bench.flops import flops_ratio
from depthprune.bench.perplexity import perplexity
from depthprune.bench.report import format_table, write_json
from depthprune.bench.speed import machine_info
from depthprune.data import heldout_text, token_blocks
from depthprune.io import resolve_source
from depthprune.static.gguf_export import export_gguf
from depthprune.static.prune import prune

TARGET = 0.95  # llama.cpp decode speedup / theoretical FLOPs ratio
PLAN = "0-11,18-24,27-29"  # 8 of 30 removed (12-17, 25, 26): block_influence's choice in RESULTS 1a


def _interleaved_run(llms: dict, prompt: list[int], new_tokens: int) -> dict[str, tuple[float, list[float], list]]:
    """One round from empty caches: prefill each model, then decode greedily with the models' steps interleaved (A, B,
    A, B ...) so that both see the same load of a shared machine. Per model: (prefill s, step seconds, tokens)."""
    import llama_cpp

    out = {}
    for key, llm in llms.items():
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        out[key] = (time.perf_counter() - start, [], [])
    for _ in range(new_tokens):
        for key, llm in llms.items():
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
            out[key][2].append(int(logits.argmax()))
            start = time.perf_counter()
            llm.eval([out[key][2][-1]])
            out[key][1].append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=PLAN, help=f"layers kept (default {PLAN}: 8 of 30 removed)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1: robust on shared CPUs)")
    parser.add_argument("--ppl-blocks", type=int, default=8, help="held-out blocks of 256 tokens for perplexity")
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
    # quality of the same two models (the GGUF files' weights, de-quantized, through transformers): held-out perplexity
    blocks = token_blocks(tokenizer, heldout_text(None), 256, args.ppl_blocks)
    ppl = {"untouched": perplexity(full_hf, blocks), "pruned": perplexity(pruned_hf, blocks)}
    prompt = tokenizer(heldout_text(None))["input_ids"][: args.prompt_len]
    llms = {
        "untouched": llama_cpp.Llama(str(source), n_ctx=512, n_threads=args.threads, verbose=False),
        "pruned": llama_cpp.Llama(str(res.path), n_ctx=512, n_threads=args.threads, verbose=False),
    }
    _interleaved_run(llms, prompt, 4)  # warm-up
    prefills: dict[str, list[float]] = {k: [] for k in llms}
    steps: dict[str, list[float]] = {k: [] for k in llms}
    tokens = {}
    for _ in range(args.repeats):
        for key, (prefill, times, tokens[key]) in _interleaved_run(llms, prompt, args.new_tokens).items():
            prefills[key].append(prefill)
            steps[key] += times
    # median step time; the 10th percentile too, closer to the uncontended time on a shared machine
    med = {k: (statistics.median(prefills[k]), statistics.median(steps[k])) for k in llms}
    p10 = {k: statistics.quantiles(steps[k], n=10)[0] for k in llms}
    context = args.prompt_len + args.new_tokens // 2
    theory = flops_ratio(pruned_hf, full_hf, context_len=context, phase="decode")
    theory_prefill = flops_ratio(pruned_hf, full_hf, context_len=args.prompt_len, phase="prefill")
    decode_speedup = med["untouched"][1] / med["pruned"][1]
    prefill_speedup = med["untouched"][0] / med["pruned"][0]
    rows = [
        {"model": k, "layers": 30 if k == "untouched" else len(res.plan), "heldout_ppl": ppl[k],
         "decode_ms_per_token": 1e3 * v[1], "prefill_s": v[0], "decode_speedup": med["untouched"][1] / v[1],
         "decode_flops_ratio": 1.0 if k == "untouched" else theory}
        for k, v in med.items()
    ]  # fmt: skip
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
        "decode_speedup_p10": p10["untouched"] / p10["pruned"],
        "decode_p10_vs_theory": p10["untouched"] / p10["pruned"] / theory,
        "prefill_speedup": prefill_speedup,
        "prefill_flops_ratio": theory_prefill,
        "greedy_pruned": tokenizer.decode(tokens["pruned"][:24]),
        "greedy_untouched": tokenizer.decode(tokens["untouched"][:24]),
        "step_seconds": steps,
        "prefill_seconds": prefills,
    }
    title = f"llama.cpp, batch 1, {args.threads} thread(s), median step of {args.repeats} rounds"
    print(format_table(rows, title=title))
    print(
        f"decode speedup {decode_speedup:.3f} vs FLOPs ratio {theory:.3f}: {decode_speedup / theory:.3f} "
        f"(target >= {TARGET}); 10th-percentile steps {speed['decode_speedup_p10']:.3f} "
        f"({speed['decode_p10_vs_theory']:.3f}); prefill {prefill_speedup:.3f} vs {theory_prefill:.3f}"
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
                "machine": {**dataclasses.asdict(machine_info()), "llama_cpp_python": llama_cpp.__version__,
                            "load_average_end": list(os.getloadavg())},
                "plan": args.plan,
                "rows": rows,
                "size": size,
                "speed": speed,
            },
            args.json,
        )  # fmt: skip


if __name__ == "__main__":
    main()
