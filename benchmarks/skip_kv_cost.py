"""Where the routers' extra decode cost goes (issue 12): skip_generate with kv=propagate and kv=recompute, the same
loop with every layer (threshold 0) and plain generate, interleaved (median of 5 rounds after a warm-up), batch 1 and
8, each with 32 new tokens and with 1 (decode time = the difference, free of the shared deep prefill); then cProfile
shares of one batch-1 propagate run (propagate, the routers' run_mask, the head). At each batch size the cost of one
layer's projections on 1..batch rows is timed too, and the routed steps' layer calls (SkipOutput.layer_rows) are priced
by it: the cost-weighted layer ratio, the speedup the routers' decisions allow on this hardware, where a layer run for
5 of 8 rows need not cost 5/8 of one run for all 8. The propagate row runs twice: with
the stack's kv_layout (keys/values alone, no query projection) and with the layer's own forward up to its cache write
("propagate_forward", the path before kv_layout existed).

    python benchmarks/skip_kv_cost.py ROUTERS_DIR OUT.json   # ROUTERS_DIR: a skip_bench --routers-dir target folder
    python benchmarks/skip_kv_cost.py --static-init 22 OUT.json   # untrained routers that run block_influence's plan
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

import depthprune.kv
from depthprune.data import calibration_text, heldout_text, token_blocks
from depthprune.io import load_model, load_tokenizer
from depthprune.skipping.inference import skip_generate
from depthprune.skipping.init import static_init
from depthprune.skipping.io import load_routers
from depthprune.skipping.routers import build_routers

NEW = 32
ROUNDS = 5


def _forward_kv(fn):
    """`fn` with depthprune.kv's keys/values-alone path off (every propagation runs the layer's forward)."""

    def run():
        saved = depthprune.kv._kv_alone
        depthprune.kv._kv_alone = lambda *_: False
        try:
            return fn()
        finally:
            depthprune.kv._kv_alone = saved

    return run


def row_costs(model, batch: int, repeats: int = 200) -> dict[int, float]:
    """Seconds of one decoder layer's projections (attention q/k/v/o and the MLP, most of a decode step's time) on
    n = 1..batch rows of one token: the cost curve that decides what skipping a layer for some rows saves."""
    layer = model.model.layers[len(model.model.layers) // 2]
    attn = layer.self_attn
    costs = {}
    with torch.no_grad():
        for n in range(1, batch + 1):
            x = torch.randn(n, 1, model.config.hidden_size)
            o = torch.randn(n, 1, attn.o_proj.in_features)

            def step(x=x, o=o):
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj(x)
                attn.o_proj(o)
                layer.mlp(x)

            for _ in range(10):
                step()
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(repeats // 5):
                    step()
                runs.append((time.perf_counter() - start) / (repeats // 5))
            costs[n] = statistics.median(runs)
    return costs


def cost_weighted_ratio(layer_rows: list[list[int]], costs: dict[int, float], batch: int) -> float:
    """Every layer for every row over what the routed steps cost, each layer call priced by how many rows ran it."""
    full = len(layer_rows) * len(layer_rows[0]) * costs[batch]
    routed = sum(costs[n] for counts in layer_rows for n in counts if n)
    return full / routed


def main(source: str, out_path: Path) -> None:
    torch.set_num_threads(1)
    merged = not source.startswith("static:") and (Path(source) / "config.json").is_file()
    # LoRA-trained routers decide on their merged model's states (saved beside them)
    model = load_model(source if merged else "smollm2", task="causal-lm").eval()
    tok = load_tokenizer("smollm2")
    ids = tok(heldout_text(None), return_tensors="pt").input_ids[:, : 64 * 8].reshape(8, 64)
    if source.startswith("static:"):  # block_influence's plan on 16 calibration blocks of 128, as skip_bench scores
        target = float(source.split(":", 1)[1])
        batches = list(token_blocks(tok, calibration_text(None), 128, 16).split(4))
        routers, thr = build_routers(model, target_layers=target, **static_init(model, batches, target)), 0.5
        print("static plan removes", routers.config.init_removed, flush=True)
    else:
        folder = Path(source)
        routers = load_routers(folder, model)
        thr = json.loads((folder / "threshold.json").read_text())["threshold"]
    out: dict = {"static_removed": list(getattr(routers.config, "init_removed", ()))}
    for b in (1, 8):
        x = ids[:b]

        def runs(new: int, x: torch.Tensor = x) -> dict:
            skip = partial(skip_generate, model, routers, x, max_new_tokens=new, eos_token_id=[])
            return {
                "generate": partial(
                    model.generate, x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                    do_sample=False,
                ),
                "loop_all_layers": partial(skip, threshold=0.0),
                "propagate": partial(skip, threshold=thr),
                "propagate_forward": _forward_kv(partial(skip, threshold=thr)),
                "recompute": partial(skip, threshold=thr, kv="recompute"),
            }  # fmt: skip

        # each entry with NEW tokens and with 1 (the prompt's pass alone, the same deep prefill for every entry):
        # decode seconds = the difference, so the per-token decode speedup is not diluted by the prefill
        timed = {**runs(NEW), **{f"{k}@prefill": f for k, f in runs(1).items()}}
        for f in timed.values():
            f()
        times: dict[str, list[float]] = {k: [] for k in timed}
        for _ in range(ROUNDS):
            for k, f in timed.items():
                start = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        total = {k: v for k, v in med.items() if "@" not in k}
        decode = {k: med[k] - med[f"{k}@prefill"] for k in total}
        mean_layers = skip_generate(model, routers, x, max_new_tokens=NEW, eos_token_id=[], threshold=thr)
        layers = mean_layers.mean_layers(skip_first=True)
        costs = row_costs(model, b)
        calls = [n for counts in mean_layers.layer_rows for n in counts]
        out[b] = {
            "row_costs_ms": {n: c * 1e3 for n, c in costs.items()},
            "layer_calls_by_rows": {n: calls.count(n) for n in range(b + 1)},
            "cost_weighted_ratio": cost_weighted_ratio(mean_layers.layer_rows, costs, b),
            "seconds": total,
            "decode_seconds": decode,
            "speedup_vs_generate": {k: total["generate"] / v for k, v in total.items()},
            "decode_speedup_vs_generate": {k: decode["generate"] / v for k, v in decode.items()},
            "mean_layers": layers,
            "layer_ratio": 30 / layers,
            "decode_speedup_over_layer_ratio": {k: decode["generate"] / v / (30 / layers) for k, v in decode.items()},
            "decode_speedup_over_cost_weighted_ratio": {
                k: decode["generate"] / v / cost_weighted_ratio(mean_layers.layer_rows, costs, b)
                for k, v in decode.items()
            },
        }
        print(b, json.dumps(out[b]), flush=True)
    skip = partial(skip_generate, model, routers, max_new_tokens=NEW, eos_token_id=[])
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
    if sys.argv[1] == "--static-init":
        main(f"static:{sys.argv[2]}", Path(sys.argv[3]))
    else:
        main(sys.argv[1], Path(sys.argv[2]))
