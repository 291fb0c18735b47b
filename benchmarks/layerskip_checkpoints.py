"""Held-out agreement and final-layer perplexity of the checkpoints of a `train-layerskip` run (RESULTS 12).

    python benchmarks/layerskip_checkpoints.py out/smollm2-layerskip --steps 8 16 --eval-blocks 4 \
        --json benchmarks/layerskip/checkpoints.json [--export STEP=FOLDER]

Each checkpoint's trained LoRA weights go into a fresh `lora_copy` of the base model (the run's settings from its
train_log.json); measured as `train-layerskip --eval-blocks` measures (exit_agreement_with on the held-out part of the
--data book, against the untouched model). --export writes one checkpoint as a peft adapter folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from depthprune.data import heldout_text, token_blocks
from depthprune.exits.train.layerskip import LOG_NAME, RECIPE_NAME, exit_agreement_with
from depthprune.fsutil import atomic_folder, write_atomic
from depthprune.io import load_model, load_tokenizer
from depthprune.lora import lora_copy
from depthprune.training import CHECKPOINTS, PARAMS_NAME


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--steps", type=int, nargs="+", required=True)
    p.add_argument("--data", default="../shared/data/moby-dick.txt")
    p.add_argument("--eval-blocks", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--export", default=None, metavar="STEP=FOLDER")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    log = json.loads((folder / LOG_NAME).read_text())
    base = load_model(log["base_model"], task="causal-lm")
    tok = load_tokenizer(log["base_model"])
    held = token_blocks(tok, heldout_text(args.data), log["seq_len"], args.eval_blocks)
    export_step, _, export_to = (args.export or "").partition("=")
    results = {}
    for step in args.steps:
        peft_model = lora_copy(base, log["lora_rank"], log["lora_alpha"], log["targets"])
        peft_model.peft_config["default"].base_model_name_or_path = log["base_model"]
        trained = [q for q in peft_model.parameters() if q.requires_grad]
        saved = load_file(str(folder / CHECKPOINTS / f"step-{step:07d}" / PARAMS_NAME))
        with torch.no_grad():
            for i, q in enumerate(trained):
                q.copy_(saved[str(i)])
        figures = exit_agreement_with(peft_model.get_base_model().eval(), base, held)
        results[step] = figures
        agree = " ".join(f"{a:.2f}" for a in figures["agreement"])
        print(f"step {step}: ppl {figures['ppl']:.2f} (untouched {figures['ppl_reference']:.2f}); agreement {agree}")
        if export_step and int(export_step) == step:
            with atomic_folder(Path(export_to)) as tmp:
                peft_model.save_pretrained(tmp)
                shutil.copy(folder / RECIPE_NAME, tmp / RECIPE_NAME)
                (tmp / "checkpoint.json").write_text(json.dumps({"from": str(folder), "step": step}))
    if args.json:
        write_atomic(args.json, json.dumps({"run": log | {"history": None}, "steps": results}, indent=1))


if __name__ == "__main__":
    main()
