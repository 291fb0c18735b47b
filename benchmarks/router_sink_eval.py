"""Saved routers with and without the sink guard at inference (issue 12, RESULTS 30): for each sink_tokens value, the
threshold is searched again for the routers' target depth (skip_bench's depth blocks and search), then held-out
perplexity, token agreement with the untouched model and the depth are measured on skip_bench's held-out blocks. The
routers' weights are not changed; only RouterConfig.sink_tokens is set.

    python benchmarks/router_sink_eval.py ROUTERS_DIR [ROUTERS_DIR ...] --json OUT.json   # skip_bench target folders
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import depthprune
from depthprune.data import calibration_text, heldout_text, token_blocks
from depthprune.fsutil import write_atomic
from depthprune.skipping.dense import routed_perplexity, threshold_for_depth
from depthprune.skipping.io import load_routers

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("routers_dirs", nargs="+")
    p.add_argument("--text", default=str(ROOT / ".." / "shared" / "data" / "moby-dick.txt"))
    p.add_argument("--sink-tokens", type=int, nargs="+", default=[0, 1])
    p.add_argument("--heldout-blocks", type=int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = depthprune.load_tokenizer("smollm2")
    reference = depthprune.load_model("smollm2").eval()
    depth_blocks = token_blocks(tok, calibration_text(args.text), 128, 40)[-2:]  # as skip_bench: not trained on
    held = token_blocks(tok, heldout_text(args.text), 128, args.heldout_blocks)
    rows = []
    for folder in args.routers_dirs:
        model = depthprune.load_model(folder).eval() if (Path(folder) / "config.json").is_file() else reference
        routers = load_routers(folder, model)
        target = routers.config.target_layers
        for n in args.sink_tokens:
            routers.config = dataclasses.replace(routers.config, sink_tokens=n)
            threshold = threshold_for_depth(model, routers, depth_blocks, target, steps=8)
            tf = routed_perplexity(model, routers, held, threshold, batch_size=4, reference=reference)
            row = {"routers": folder, "target": target, "sink_tokens": n, "threshold": threshold,
                   "layers": float(tf["mean_layers"]), "ppl": tf["ppl"], "agreement": tf["agreement"]}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                write_atomic(args.json, json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
