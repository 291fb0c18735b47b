"""Train routers with the backbone frozen (optionally LoRA on a copy of it), through the one training loop
(depthprune.training): the loss is the KL divergence from the untouched model's output distribution (next-token
distributions for decoders, label distributions for encoders) to the routed model's, plus a compute term
`compute_weight * (E[executed layers] - target)^2 / num_layers` that drives the mean number of executed layers per
token (per sample) to `target_layers`.

The relaxation: straight-through Gumbel-sigmoid (Bengio et al. 2013; Jang et al. 2017, the binary case). Each gate
draws logistic noise, g_soft = sigmoid((logit + noise) / tau), and the forward pass uses the HARD decision
(g_soft > 0.5: the layer runs fully or is skipped, exactly the computation inference makes, so there is no
train/test gap of a soft mixture h + g (f(h) - h) that inference never computes); the backward pass takes the
gradient of g_soft. The noise makes the router explore both choices near its boundary. We chose it over hard-concrete
(Louizos et al. 2018) because hard-concrete's stretched, clipped distribution is built to reach exact zeros in a
*soft* forward pass for L0 sparsity of weights, which we do not need: our forward is hard already, and the
straight-through estimator is the one router-skipping work uses (SkipGPT, MindSkip: Gumbel-softmax with straight-
through). The compute term (`compute_on="gates"`, the default) counts the layers the forward pass executed, through
the same straight-through gates (hard count forward, the sigmoid's gradient backward); being a batch mean, it lets
the routers give some tokens more layers than others. `compute_on="probs"` (the first form) counts the expected
layers, sum of P(run): measured on SmolLM2 with LoRA (benchmarks/RESULTS.md section 26), the probabilities gathered
just above 0.5, so expected depth sat at the target while the hard gates ran 4.8 / 1.5 layers more than it (26.8 at
target 22, 27.5 at 26), and the routers met the target only after the threshold was recalibrated to decisions
training never saw.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from depthprune.errors import RouterError
from depthprune.skipping.dense import routed_pass
from depthprune.skipping.io import save_routers
from depthprune.skipping.routers import build_routers
from depthprune.training import TrainRun, train

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from depthprune.training import RunKwargs

LOG_NAME = "router_train_log.json"
COMPUTE_ON = ("gates", "probs")


def straight_through_gate(logits: torch.Tensor, temperature: float = 1.0, noise: float = 1.0) -> torch.Tensor:
    """Hard 0/1 gates in the forward pass, the gradient of the noisy sigmoid in the backward pass. noise scales the
    logistic noise (0: the deterministic decision, e.g. to train on top of a static init without flipping it)."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + noise * (torch.log(u) - torch.log1p(-u))) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def router_loss(
    model: nn.Module,
    teacher: nn.Module,
    routers: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    target: float,
    compute_weight: float = 10.0,
    temperature: float = 1.0,
    kd_temperature: float = 1.0,
    noise: float = 1.0,
    compute_on: str = "gates",
) -> dict[str, torch.Tensor]:
    """KL(teacher || routed student) + the compute term, for one batch ids [batch, seq] (mask: encoders' padding).
    Returns loss, kl, expected and executed layers (per token or sample)."""
    if compute_on not in COMPUTE_ON:
        raise RouterError(f"compute_on must be one of {', '.join(COMPUTE_ON)}, got {compute_on!r}")
    with torch.no_grad():
        inputs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
        if routers.granularity == "token":
            inputs["use_cache"] = False
        teacher_logits = teacher(**inputs).logits.float()
    out = routed_pass(model, routers, ids, mask, gate=lambda layer, lg: straight_through_gate(lg, temperature, noise))
    t = kd_temperature
    log_p = nn.functional.log_softmax(teacher_logits / t, -1)
    log_q = nn.functional.log_softmax(out.logits.float() / t, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * t * t  # [batch, seq] or [batch]
    weights = torch.ones_like(kl) if (mask is None or kl.dim() == 1) else mask.to(kl.dtype)
    kl = (kl * weights).sum() / weights.sum()
    expected = out.expected_layers(weights)
    executed = (out.executed * weights).sum() / weights.sum()  # the straight-through gates: hard, with gradients
    counted = executed if compute_on == "gates" else expected
    compute = compute_weight * (counted - target) ** 2 / out.num_layers
    executed = executed.detach()
    return {"loss": kl + compute, "kl": kl.detach(), "expected_layers": expected.detach(), "executed": executed}


def init_batches(data: torch.Tensor | tuple[torch.Tensor, torch.Tensor], n: int, batch_size: int = 8):
    """The first `n` training examples as a scorer's batches: token blocks in batches of `batch_size`; an encoder's
    texts one at a time, cut to their real tokens (a scorer's batches carry no padding mask)."""
    if isinstance(data, (tuple, list)):
        ids, mask = data
        return [i[m.bool()][None] for i, m in zip(ids[:n], mask[:n], strict=True)]
    return list(data[:n].long().split(batch_size))


@dataclasses.dataclass
class RouterTrainResult:
    """What a run did; routers (and with LoRA the merged model) are not in to_dict."""

    kind: str
    target_layers: float
    layers: list[int]
    init: str
    init_removed: list[int]
    epochs: int
    lr: float
    batch_size: int
    compute_weight: float
    temperature: float
    lora_rank: int
    num_examples: int
    epoch_losses: list[dict[str, Any]]
    history: list[float]
    train_seconds: float
    output_dir: str | None = None
    start: str | None = None  # the pruned model the routed model started from
    routers: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        skip = {"routers", "model"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


def train_routers(
    model: nn.Module,
    data: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    *,
    target_layers: float,
    kind: str | None = None,
    layers: tuple[int, ...] | list[int] | None = None,
    epochs: int = 1,
    lr: float = 1e-2,
    batch_size: int = 4,
    compute_weight: float = 10.0,
    temperature: float = 1.0,
    kd_temperature: float = 1.0,
    noise: float = 1.0,
    compute_on: str = "gates",
    lora_rank: int = 0,
    lora_lr: float = 1e-4,
    init: str | None = None,
    scorer: str = "block_influence",
    init_examples: int = 64,
    score_batches: list[torch.Tensor] | None = None,
    start: nn.Module | None = None,
    sink_tokens: int = 1,
    seed: int = 0,
    progress: bool = True,
    **run_kwargs: Unpack[RunKwargs],
) -> RouterTrainResult:
    """Train routers for `model` on `data`: token blocks [n, seq] (decoders) or (input_ids, attention_mask) [n, seq]
    (encoders). target_layers: mean executed layers per token (sample) wanted. lora_rank > 0 also trains LoRA on a
    copy of the decoder (depthprune.lora), merged into the result's model (saved beside the routers). init "static":
    the gates start as `scorer`'s static plan of the target depth, scored on `score_batches` (token ids [batch, seq]),
    default the first `init_examples` examples (depthprune.skipping.init). start: a model `depthprune prune` made
    from `model` (healed or not): the routed model starts as `model` with its kept layers' weights and the routers as
    its plan (`init` "static", the default with a start; depthprune.skipping.init.healed_start); the teacher stays
    `model`; the routed model is saved beside the routers. `model` is never modified; output_dir (RunKwargs) gets
    routers.json + routers.safetensors (+ the routed model, with LoRA or a start) + the log. sink_tokens: each
    sequence's first real positions that always run every layer (RouterConfig.sink_tokens, saved with the routers;
    default 1: the attention sink, whose skipped layers cost most of the routers' perplexity in benchmarks/RESULTS.md
    sections 29-30; 0 for decisions on every position, e.g. to reproduce a static plan exactly)."""
    target = float(target_layers)
    if isinstance(data, (tuple, list)):
        ids, mask = data
        dataset: Any = torch.utils.data.TensorDataset(ids.long(), mask.long())
    else:
        if data.dim() != 2 or data.is_floating_point():
            raise RouterError("decoder training data must be an integer tensor of token blocks [n_blocks, seq_len]")
        dataset = data.long()
    if len(dataset) == 0:
        raise RouterError("no training examples")
    if compute_on not in COMPUTE_ON:  # before any scoring or copying
        raise RouterError(f"compute_on must be one of {', '.join(COMPUTE_ON)}, got {compute_on!r}")
    options: dict[str, Any] = {}
    init = init or ("static" if start is not None else "uniform")
    base, removed = model, None
    start_name = None if start is None else str(getattr(start.config, "_name_or_path", "") or "a model")
    if start is not None:
        from depthprune.skipping.init import healed_start

        if init != "static":
            raise RouterError(f"a start model gives the routers its plan: use init static with it, not {init!r}")
        base, removed = healed_start(model, start)
    if init in ("static", "static_parts"):
        from depthprune.registry import ROUTER_KINDS
        from depthprune.skipping.init import static_init

        batches = score_batches if score_batches is not None else init_batches(data, init_examples)
        parts = getattr(ROUTER_KINDS.get(kind), "parts", ()) if kind else ()
        if init == "static_parts" and not parts:
            raise RouterError(
                "init static_parts starts sub-layer routers as a plan of sub-layers; use it with --kind token_sublayer "
                "(or init static: the layer plan)"
            )
        options = static_init(base, batches, target, layers=layers, scorer=scorer, removed=removed,
                              parts=parts if init == "static_parts" else ())  # fmt: skip
        layers = options.pop("layers")  # the default layers and any other the plan removes
    elif init != "uniform":
        raise RouterError(f"unknown router init {init!r}; choose uniform, static or static_parts")
    if sink_tokens:
        options["sink_tokens"] = sink_tokens
    routers = build_routers(base, kind, layers, target_layers=target, **options)  # checks the target's range
    student, peft_model = base, None
    groups: list[dict[str, Any]] = [{"params": list(routers.parameters()), "lr": lr}]
    if lora_rank:
        from depthprune.lora import lora_copy

        peft_model = lora_copy(base, lora_rank)
        student = peft_model.get_base_model()
        groups.append({"params": [p for p in peft_model.parameters() if p.requires_grad], "lr": lora_lr})
    settings = {"target": target, "compute_weight": compute_weight, "temperature": temperature, "noise": noise,
                "compute_on": compute_on}  # fmt: skip

    class _Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.routers = routers
            if peft_model is not None:
                self.lora = peft_model  # its LoRA weights train too (registered, so a DDP wrapper syncs them)

        def forward(self, batch: Any) -> dict[str, torch.Tensor]:
            ids, mask = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
            return router_loss(student, model, self.routers, ids, mask, kd_temperature=kd_temperature, **settings)

    merged: nn.Module | None = None

    def make_result(run: TrainRun) -> RouterTrainResult:
        return RouterTrainResult(
            kind=routers.config.kind, target_layers=target, layers=list(routers.layers), init=routers.config.init,
            init_removed=list(routers.config.init_removed), epochs=epochs, lr=lr,
            batch_size=batch_size, compute_weight=compute_weight, temperature=temperature, lora_rank=lora_rank,
            num_examples=len(dataset), epoch_losses=run.epoch_losses, history=[h["loss"] for h in run.history],
            train_seconds=run.train_seconds, output_dir=run.output_dir, start=start_name, routers=routers,
            model=merged,
        )  # fmt: skip

    def merge() -> nn.Module | None:
        if peft_model is None:
            return None if base is model else base  # a start's routed model
        from depthprune.lora import merged_copy

        return merged_copy(peft_model).eval()

    def save(folder: Path, run: TrainRun) -> None:
        nonlocal merged
        merged = merge()
        if merged is not None:
            merged.save_pretrained(folder)
        save_routers(routers, folder, overwrite=True)
        (folder / LOG_NAME).write_text(json.dumps(make_result(run).to_dict(), indent=1))

    frozen = [model] if base is model else [model, base]
    run = train(
        _Loss(),
        groups,
        dataset,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        save=save,
        frozen=frozen,
        train_mode=False,
        fingerprint={
            "router": routers.config.to_dict(),
            **settings,
            "lora_rank": lora_rank,
            **({} if start is None else {"start": start_name}),
        },  # fmt: skip
        desc="routers",
        progress=progress,
        **run_kwargs,
    )
    routers.eval()
    for p in routers.parameters():
        p.requires_grad_(False)
    if merged is None:
        merged = merge()
    return make_result(run)


__all__ = ["RouterTrainResult", "init_batches", "router_loss", "straight_through_gate", "train_routers"]
