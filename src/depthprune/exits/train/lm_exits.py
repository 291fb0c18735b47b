"""Train decoder exit heads on a frozen causal LM with Hugging Face Accelerate (the tuned-lens objective).

Per batch, the model runs once under no_grad with output_hidden_states=True; every exit then learns to match the full
model's next-token distribution at every position: loss = mean over exits of KL(p_final || p_exit), averaged over
positions. With `confidence=True`, CALM's meta-classifier is trained beside it with a BCE loss against "the exit's top
token equals the full model's", reading the exit's state detached (it does not steer the translators).

The same call runs on one CPU, one GPU, or many processes: `accelerate launch --multi_gpu --num_processes N -m
depthprune train-exits --model smollm2 --output-dir out/smollm2-lens` (on a machine without GPUs the processes use CPU
and gloo; `--cpu --num_processes N` starts one process unless an MPI launcher is configured).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from depthprune.exits.lm_heads import DecoderExitHeads
from depthprune.training import TrainRun, train

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from depthprune.training import RunKwargs

LOG_NAME = "train_log.json"


@dataclasses.dataclass
class DecoderExitTrainResult:
    """What a training run did. epoch_losses: per epoch, means over all processes of the loss, the KL (overall and
    per exit layer) and the confidence BCE. history: this process's loss per optimizer step. checksums: the sum of the
    heads' parameters on every process; equal values show that the data-parallel replicas stayed in sync."""

    kind: str
    layers: list[int]
    epochs: int
    lr: float
    batch_size: int
    seq_len: int
    seed: int
    confidence: bool
    num_blocks: int
    num_processes: int
    epoch_losses: list[dict[str, Any]]
    history: list[float]
    checksums: list[float]
    train_seconds: float
    output_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderExitTrainResult:
        return cls(**data)


def kl_to_final(exit_logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_final || p_exit) per position [batch, seq]; target_logp: the full model's log-probs [b, s, vocab]."""
    logq = exit_logits.float().log_softmax(-1)  # [batch, seq, vocab]
    return (target_logp.exp() * (target_logp - logq)).sum(-1)


@torch.no_grad()
def _mean_over_positions(
    model: nn.Module,
    heads: DecoderExitHeads,
    token_blocks: torch.Tensor,
    batch_size: int,
    target: Callable[[torch.Tensor], torch.Tensor],
    per_position: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[int, float]:
    """Per exit layer: mean over all positions of `token_blocks` of per_position(exit logits, target) [b, s], where
    target = target(full model's logits) is computed once per batch."""
    device = next(model.parameters()).device
    sums = dict.fromkeys(heads.layers, 0.0)
    for ids in token_blocks.split(batch_size):
        out = model(input_ids=ids.to(device), output_hidden_states=True, use_cache=False)
        wanted = target(out.logits)
        for layer in heads.layers:
            sums[layer] += float(per_position(heads.logits(layer, out.hidden_states[layer + 1]), wanted).sum())
    return {layer: v / token_blocks.numel() for layer, v in sums.items()}


def exit_kl(
    model: nn.Module, heads: DecoderExitHeads, token_blocks: torch.Tensor, batch_size: int = 8
) -> dict[int, float]:
    """Mean KL(full model || exit) over all positions of `token_blocks` [n, seq], per exit layer (lower is better)."""
    return _mean_over_positions(
        model, heads, token_blocks, batch_size, lambda full: full.float().log_softmax(-1), kl_to_final
    )


def exit_agreement(
    model: nn.Module, heads: DecoderExitHeads, token_blocks: torch.Tensor, batch_size: int = 8
) -> dict[int, float]:
    """Share of positions of `token_blocks` [n, seq] where each exit's top token equals the full model's."""
    return _mean_over_positions(
        model, heads, token_blocks, batch_size, lambda full: full.argmax(-1), lambda mine, top: mine.argmax(-1) == top
    )


@torch.no_grad()
def fit_lens(
    model: nn.Module,
    heads: DecoderExitHeads,
    token_blocks: torch.Tensor,
    *,
    batch_size: int = 8,
    ridge: float = 1e-3,
    skip_first: int = 1,
) -> dict[int, float]:
    """Closed-form tuned lens: set each "lens" translator (h -> A h + b) by least squares, no gradient steps.

    Every norm a decoder ends in (RMSNorm, LayerNorm, Gemma's) is scale-invariant, so an exit reproduces the final
    layer's normed state when its translated state is any positive multiple of the final hidden state h_L. The fit
    regresses h_L / rms(h_L) on [h_l / rms(h_l), 1 / rms(h_l)] (so every position weighs the same whatever its
    scale), i.e. translator(h_l) ~ rms(h_l) * h_L / rms(h_L). Full-matrix least squares is the same in any output
    metric, hence also the fit of the logits through the shared LM head. `ridge`: Tikhonov term as a fraction of the
    mean diagonal of the regressors' Gram matrix. The first `skip_first` positions of every block are left out (the
    first token's outlier activations, an attention sink, would dominate). One forward pass over the data, float64
    sums. Returns the relative residual |error|^2 / |target|^2 per layer.
    """
    if heads.config.kind != "lens":
        raise ValueError(
            f"fit_lens sets affine translators in closed form; these heads are {heads.config.kind!r}. Build them with "
            "DecoderExitHeads.for_model(model, layers, kind='lens')"
        )
    if token_blocks.dim() != 2 or token_blocks.shape[1] <= skip_first:
        raise ValueError(
            f"token blocks must be [n_blocks, seq_len] with seq_len > skip_first={skip_first}, got "
            f"{tuple(token_blocks.shape)}"
        )
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    device = next(model.parameters()).device
    norm = heads._shared.norm
    width = heads.config.hidden_size + 1
    gram = {layer: torch.zeros(width, width, dtype=torch.float64) for layer in heads.layers}
    cross = {layer: torch.zeros(width, width - 1, dtype=torch.float64) for layer in heads.layers}
    target_sq = dict.fromkeys(heads.layers, 0.0)
    captured: list[torch.Tensor] = []
    hook = norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))

    def unit(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = h[:, skip_first:].reshape(-1, h.shape[-1]).double()
        r = h.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        return h / r, r

    try:
        for ids in token_blocks.split(batch_size):
            captured.clear()
            out = model(input_ids=ids.to(device), output_hidden_states=True, use_cache=False)
            target, _ = unit(captured[-1])  # the last call of the final norm: the final hidden state, pre-norm
            for layer in heads.layers:
                x, r = unit(out.hidden_states[layer + 1])
                z = torch.cat([x, 1.0 / r], dim=-1).cpu()
                gram[layer] += z.T @ z
                cross[layer] += z.T @ target.cpu()
                target_sq[layer] += float(target.pow(2).sum())
    finally:
        hook.remove()
    residuals = {}
    for layer in heads.layers:
        g = gram[layer]
        reg = ridge * float(g.diagonal().mean()) * torch.eye(width, dtype=torch.float64)
        w = torch.linalg.solve(g + reg, cross[layer])  # [hidden + 1, hidden]
        # residual sum of squares = |Y|^2 - 2 tr(W'Z'Y) + tr(W'Z'ZW)
        rss = target_sq[layer] - 2 * float((w * cross[layer]).sum()) + float((w * (g @ w)).sum())
        residuals[layer] = rss / max(target_sq[layer], 1e-12)
        linear = heads.translators[str(layer)].linear  # translator(h) = h + linear(h): linear = A - I
        eye = torch.eye(width - 1, dtype=torch.float64)
        linear.weight.copy_((w[:-1].T - eye).to(linear.weight))
        linear.bias.copy_(w[-1].to(linear.bias))
    return residuals


@torch.no_grad()
def _bce(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(nn.functional.binary_cross_entropy_with_logits(net(x).squeeze(-1).float(), y))


def fit_confidence(
    model: nn.Module,
    heads: DecoderExitHeads,
    token_blocks: torch.Tensor,
    *,
    batch_size: int = 8,
    steps: int = 300,
    lr: float = 3e-3,
    holdout: float = 0.1,
    skip_first: int = 1,
    seed: int = 0,
    eval_every: int = 10,
) -> dict[int, dict[str, float]]:
    """Train CALM's classifiers on cached features: one forward pass over `token_blocks` collects, per exit, the
    exit's normed state and whether its top token equals the full model's; each classifier then takes up to `steps`
    full-batch AdamW steps on BCE (seconds: a classifier is a 2-layer MLP on the hidden size). A `holdout` share of
    the blocks is kept out of training for early stopping: every `eval_every` steps the BCE on them is measured and the
    classifier keeps its best state (a small MLP on a few ten thousand positions overfits within a few hundred full-
    batch steps). Returns per layer: positive rate (share of positions where the exit agrees), the step kept, and BCE
    and accuracy at 0.5 on the held-out positions (which chose the step, so slightly optimistic) and the training ones.
    """
    if not heads.config.confidence:
        raise ValueError(
            "these heads have no confidence classifier; build them with DecoderExitHeads.for_model(model, ..., "
            "confidence=True)"
        )
    if token_blocks.dim() != 2 or token_blocks.shape[1] <= skip_first or len(token_blocks) < 2:
        raise ValueError(
            f"token blocks must be [n_blocks >= 2, seq_len > skip_first={skip_first}], got {tuple(token_blocks.shape)}"
        )
    if not 0 < holdout < 1 or steps < 1:
        raise ValueError(f"holdout must be in (0, 1) and steps >= 1, got {holdout}, {steps}")
    device = next(model.parameters()).device
    states: dict[int, list[torch.Tensor]] = {layer: [] for layer in heads.layers}
    labels: dict[int, list[torch.Tensor]] = {layer: [] for layer in heads.layers}
    with torch.no_grad():
        for ids in token_blocks.split(batch_size):
            out = model(input_ids=ids.to(device), output_hidden_states=True, use_cache=False)
            top = out.logits[:, skip_first:].argmax(-1)
            for layer in heads.layers:
                state = heads.state(layer, out.hidden_states[layer + 1][:, skip_first:])
                labels[layer].append((heads.logits_from_state(state).argmax(-1) == top).float().cpu())
                states[layer].append(state.to(heads.dtype).cpu())
    n_held = max(1, round(holdout * len(token_blocks)))
    generator = torch.Generator().manual_seed(seed)
    held = torch.randperm(len(token_blocks), generator=generator)[:n_held]
    is_held = torch.zeros(len(token_blocks), dtype=torch.bool)
    is_held[held] = True
    report = {}
    for layer in heads.layers:
        x, y = torch.cat(states[layer]), torch.cat(labels[layer])  # [blocks, seq - skip_first, hidden], [blocks, ...]
        x_fit, y_fit = x[~is_held].flatten(0, 1), y[~is_held].flatten()
        x_val, y_val = x[is_held].flatten(0, 1), y[is_held].flatten()
        net = heads.confidence_nets[str(layer)]
        flags = [p.requires_grad for p in net.parameters()]
        net.train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
        x_dev, y_dev = x_fit.to(device), y_fit.to(device)
        xv_dev, yv_dev = x_val.to(device), y_val.to(device)

        best, best_step = _bce(net, xv_dev, yv_dev), 0
        best_state = copy.deepcopy(net.state_dict())
        with torch.enable_grad():
            for p in net.parameters():
                p.requires_grad_(True)
            for step in range(1, steps + 1):
                loss = nn.functional.binary_cross_entropy_with_logits(net(x_dev).squeeze(-1).float(), y_dev)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if step % eval_every == 0 or step == steps:
                    value = _bce(net, xv_dev, yv_dev)
                    if value < best:
                        best, best_step, best_state = value, step, copy.deepcopy(net.state_dict())
        net.load_state_dict(best_state)
        for p, flag in zip(net.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        net.eval()
        figures = {"positive_rate": float(y.mean()), "step": best_step}
        with torch.no_grad():
            for name, xs, ys in (("train", x_dev, y_dev), ("heldout", xv_dev, yv_dev)):
                z = net(xs).squeeze(-1).float()
                figures[f"{name}_bce"] = float(nn.functional.binary_cross_entropy_with_logits(z, ys))
                figures[f"{name}_accuracy"] = float(((z > 0).float() == ys).float().mean())
        report[layer] = figures
    return report


class _ExitLoss(nn.Module):
    """The heads plus the loss, as one module whose forward DDP can wrap (gradients then synchronize). The frozen
    model (the teacher) is held in a tuple, not as a submodule: DDP then neither broadcasts nor watches its weights."""

    def __init__(
        self, model: nn.Module, heads: DecoderExitHeads, confidence: bool, confidence_weight: float, recompute: bool
    ):
        super().__init__()
        self.teacher = (model,)
        self.heads = heads
        self.confidence = confidence
        self.confidence_weight = confidence_weight
        self.recompute = recompute

    def _one_exit(self, layer: int, hidden: torch.Tensor, target_logp: torch.Tensor, target_top: torch.Tensor):
        state = self.heads.state(layer, hidden)
        logits = self.heads.logits_from_state(state)  # [batch, seq, vocab]
        kl = kl_to_final(logits, target_logp).mean()
        if not self.confidence:
            return kl, torch.zeros((), device=kl.device)
        agree = (logits.argmax(-1) == target_top).float()  # [batch, seq]
        conf = self.heads.confidence_logits(layer, state.detach()).float()
        return kl, nn.functional.binary_cross_entropy_with_logits(conf, agree)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            outputs = self.teacher[0](input_ids=ids, output_hidden_states=True, use_cache=False)
        hidden_states, final_logits = outputs.hidden_states, outputs.logits
        target_logp = final_logits.float().log_softmax(-1)  # [batch, seq, vocab]
        target_top = final_logits.argmax(-1)  # [batch, seq]
        kls, bces = [], []
        for layer in self.heads.layers:
            hidden = hidden_states[layer + 1]  # hidden_states[0] is the embedding output
            if self.recompute:  # recompute each exit's [batch, seq, vocab] activations in backward, not keep them all
                kl, bce = checkpoint(self._one_exit, layer, hidden, target_logp, target_top, use_reentrant=False)
            else:  # translators frozen: nothing of size vocab is kept for backward
                kl, bce = self._one_exit(layer, hidden, target_logp, target_top)
            kls.append(kl)
            bces.append(bce)
        kl, bce = torch.stack(kls), torch.stack(bces)
        loss = kl.mean() + (self.confidence_weight * bce.mean() if self.confidence else 0.0)
        return {"loss": loss, "kl": kl.detach(), "bce": bce.detach()}


def _blocks(data: Any, tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Training token blocks [n, seq_len'] from texts (cut into seq_len tokens) or given token blocks (as they are)."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.long, torch.int32, torch.int64) or data.shape[1] < 1:
            raise ValueError(
                f"token blocks must be an integer tensor [n_blocks, seq_len], got {data.dtype} {tuple(data.shape)}"
            )
        return data.long()
    if isinstance(data, str):
        data = [data]
    if isinstance(data, Sequence) and all(isinstance(t, str) for t in data):
        if tokenizer is None:
            raise ValueError("training on texts needs the model's tokenizer (tokenizer=...), or pass token blocks")
        from depthprune.data import token_blocks

        return token_blocks(tokenizer, "\n\n".join(data), seq_len)
    raise TypeError(
        f"train_decoder_exits takes a text, a list of texts (with tokenizer=...) or a LongTensor of token blocks "
        f"[n_blocks, seq_len], got {type(data).__name__}"
    )


def train_decoder_exits(
    model: nn.Module,
    heads: DecoderExitHeads,
    texts_or_token_blocks: str | Sequence[str] | torch.Tensor,
    *,
    tokenizer: Any = None,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 8,
    seq_len: int = 128,
    seed: int = 0,
    confidence: bool = False,
    confidence_weight: float = 1.0,
    train_translators: bool = True,
    warmup: float = 0.1,
    weight_decay: float = 0.0,
    **run_kwargs: Unpack[RunKwargs],
) -> DecoderExitTrainResult:
    """Train `heads` in place on a frozen `model` (its weights, the shared final norm and LM head included, do not
    change), through Accelerate; returns what happened.

    Data: texts (joined, tokenized with `tokenizer`, cut into blocks of `seq_len` tokens) or token blocks
    [n_blocks, seq_len] used as given. batch_size is per process. AdamW with linear warm-up (`warmup` of the steps)
    and decay. confidence: also train CALM's classifier (heads built with confidence=True).
    train_translators=False keeps the translators as they are (e.g. set by `fit_lens`) and trains only the classifier.
    output_dir: the main process writes the heads + train_log.json there, atomically, at the end; checkpoints go to
    output_dir/checkpoints/step-N every `checkpoint_every` optimizer steps (0: none) and `resume=True` goes on from
    the newest one. The loop is `depthprune.training.train`; this function brings the loss and the parameters.
    """
    if not isinstance(heads, DecoderExitHeads):
        raise TypeError(f"heads must be DecoderExitHeads, got {type(heads).__name__}")
    if (heads.config.kind == "logit_lens" or not train_translators) and not confidence:
        raise ValueError(
            "nothing to train: logit_lens heads (or train_translators=False) without confidence=True; build "
            "trainable ones with DecoderExitHeads.for_model(model, kind='lens') (or 'mlp'), or pass confidence=True "
            "with heads that have a confidence classifier"
        )
    if confidence and not heads.config.confidence:
        raise ValueError(
            "confidence=True needs heads with CALM's classifier: build them with "
            "DecoderExitHeads.for_model(model, ..., confidence=True)"
        )
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"epochs must be >= 0, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    blocks = _blocks(texts_or_token_blocks, tokenizer, seq_len)
    if len(blocks) == 0:
        raise ValueError("no training blocks")

    def trains(name: str) -> bool:
        is_conf = name.startswith("confidence_nets.")
        return (confidence and is_conf) or (train_translators and not is_conf)

    trainable = [p for name, p in heads.named_parameters() if trains(name)]
    loss = _ExitLoss(model, heads, confidence, confidence_weight, recompute=train_translators)

    def make_result(run: TrainRun) -> DecoderExitTrainResult:
        return DecoderExitTrainResult(
            kind=heads.config.kind,
            layers=list(heads.layers),
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seq_len=int(blocks.shape[1]),
            seed=seed,
            confidence=confidence,
            num_blocks=len(blocks),
            num_processes=run.num_processes,
            epoch_losses=[_epoch_entry(e, heads.layers, confidence) for e in run.epoch_losses],
            history=[h["loss"] for h in run.history],
            checksums=run.checksums,
            train_seconds=run.train_seconds,
            output_dir=run.output_dir,
        )

    def save(folder: Path, run: TrainRun) -> None:
        heads.save(folder)
        (folder / LOG_NAME).write_text(json.dumps(make_result(run).to_dict(), indent=1))

    try:
        run = train(
            loss,
            trainable,
            blocks,
            epochs=epochs,
            lr=lr,
            warmup=warmup,
            weight_decay=weight_decay,
            frozen=[model],  # the teacher: eval mode, no gradients, not wrapped by DDP
            batch_size=batch_size,
            seed=seed,
            save=save,
            fingerprint={"kind": heads.config.kind, "layers": list(heads.layers), "confidence": confidence},
            desc=f"decoder exits ({heads.config.kind})",
            **run_kwargs,
        )
    finally:
        heads.eval()
    return make_result(run)


def _epoch_entry(entry: dict[str, Any], layers: Sequence[int], confidence: bool) -> dict[str, Any]:
    """The loop's epoch record as this trainer reports it: mean loss, KL (overall and per exit), confidence BCE."""
    kl = entry["metrics"]["kl"]
    out = {
        "epoch": entry["epoch"],
        "steps": entry["total_steps"],
        "loss": entry["loss"],
        "kl": sum(kl) / len(kl),
        "kl_per_layer": {str(layer): v for layer, v in zip(layers, kl, strict=True)},
    }
    if confidence:
        out["confidence_bce"] = sum(entry["metrics"]["bce"]) / len(entry["metrics"]["bce"])
    return out
