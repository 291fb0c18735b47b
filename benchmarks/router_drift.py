"""How far trained routers moved from their static start (issue 12, RESULTS 29): on held-out blocks, with the gates
reading the states the start's plan computes, the trained weights' share of each gate logit (|w . rms(h)|), the share
of decisions off the plan and how many of them are at the first position; with --force-layer L, the routed held-out
perplexity at threshold 0.5 with layer L's gate forced on (bias + 20), beside the routers as trained.

    python benchmarks/router_drift.py ROUTERS_DIR [--force-layer 11]   # ROUTERS_DIR: a skip_bench target folder
"""

from __future__ import annotations

import argparse

import torch

from depthprune.data import heldout_text, token_blocks
from depthprune.io import load_model, load_tokenizer
from depthprune.runner import capture_stack
from depthprune.skipping.dense import routed_perplexity
from depthprune.skipping.io import load_routers
from depthprune.skipping.routers import gate_key


def drift(model, routers, blocks: torch.Tensor) -> dict:
    """Gate statistics along the start's plan (the layers the routers' init removed are skipped)."""
    removed = set(routers.config.init_removed)
    weight_part, off, total, first, where = [], 0, 0, 0, {}
    with torch.no_grad():
        hidden, call = capture_stack(model, {"input_ids": blocks, "use_cache": False})
        for layer in range(len(call)):
            if layer in routers.layers:
                logits = routers.logits(layer, hidden)
                weight_part.append(float((logits - routers.gates[gate_key(layer, None)].bias).abs().mean()))
                moved = (logits > 0) != (layer not in removed)
                off, total, first = off + int(moved.sum()), total + moved.numel(), first + int(moved[:, 0].sum())
                if moved.any():
                    where[layer] = [int(moved.sum()), int(moved[:, 0].sum())]
            if layer not in removed:
                hidden = call.run(hidden, layer, layer + 1)
    return {"mean_abs_weight_part": sum(weight_part) / len(weight_part), "max_abs_weight_part": max(weight_part),
            "off_plan": off / total, "off_plan_count": off, "off_plan_first_position": first,
            "off_plan_by_layer": where}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("routers_dir")
    p.add_argument("--force-layer", type=int, default=None)
    p.add_argument("--blocks", type=int, default=2, help="held-out blocks of 128 tokens for the drift (default 2)")
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer("smollm2")
    model = load_model(args.routers_dir, task="causal-lm").eval()  # the routed model saved beside the routers
    routers = load_routers(args.routers_dir, model)
    held = token_blocks(tok, heldout_text(None), 128, 8)
    print(drift(model, routers, held[: args.blocks]))
    if args.force_layer is not None:
        print("as trained: ppl", round(routed_perplexity(model, routers, held, 0.5, batch_size=4)["ppl"], 2))
        with torch.no_grad():
            routers.gates[gate_key(args.force_layer, None)].bias += 20
        tf = routed_perplexity(model, routers, held, 0.5, batch_size=4)
        print(f"layer {args.force_layer} forced on: ppl {tf['ppl']:.2f} at {float(tf['mean_layers']):.2f} layers")


if __name__ == "__main__":
    main()
