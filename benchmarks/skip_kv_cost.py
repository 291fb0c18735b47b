"""Where the routers' extra decode cost goes (issue 12): skip_generate with kv=propagate and kv=recompute, the same
loop with every layer (threshold 0) and plain generate, interleaved (median of 3 rounds after a warm-up), batch 1 and
8; then cProfile shares of one batch-1 propagate run (propagate, the routers' run_mask, the head).

    python benchmarks/skip_kv_cost.py ROUTERS_DIR OUT.json   # ROUTERS_DIR: a skip_bench --routers-dir target folder
"""

from __future__ import annotations

import cProfile
import json
import pstats
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from depthprune.data import heldout_text
from depthprune.io import load_model, load_tokenizer
from depthprune.skipping.inference import skip_generate
from depthprune.skipping.io import load_routers

NEW = 32


def main(folder: Path, out_path: Path) -> None:
    torch.set_num_threads(1)
    model = load_model("smollm2", task="causal-lm").eval()
    ids = load_tokenizer("smollm2")(heldout_text(None), return_tensors="pt").input_ids[:, : 64 * 8].reshape(8, 64)
    routers = load_routers(folder, model)
    thr = json.loads((folder / "threshold.json").read_text())["threshold"]
    skip = partial(skip_generate, model, routers, max_new_tokens=NEW, eos_token_id=[])
    out: dict = {}
    for b in (1, 8):
        x = ids[:b]
        runs = {
            "generate": partial(
                model.generate, x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, min_new_tokens=NEW,
                do_sample=False,
            ),
            "loop_all_layers": partial(skip, x, threshold=0.0),
            "propagate": partial(skip, x, threshold=thr),
            "recompute": partial(skip, x, threshold=thr, kv="recompute"),
        }  # fmt: skip
        for f in runs.values():
            f()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(3):
            for k, f in runs.items():
                start = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[b] = {
            "seconds": med,
            "speedup_vs_generate": {k: med["generate"] / v for k, v in med.items()},
            "mean_layers": skip(x, threshold=thr).mean_layers(skip_first=True),
        }
        print(b, json.dumps(out[b]), flush=True)
    prof = cProfile.Profile()
    prof.enable()
    skip(ids[:1], threshold=thr)
    prof.disable()
    stats = pstats.Stats(prof)
    names = ("propagate", "run_mask", "final_logits")
    out["profile_b1"] = {n: sum(v[3] for k, v in stats.stats.items() if k[2] == n) / stats.total_tt for n in names}
    print("profile shares (cumulative / total):", json.dumps(out["profile_b1"]))
    out_path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
