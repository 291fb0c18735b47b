"""Calibration loss of a causal LM running a subset of one stack's layers: next-token NLL, and KL from the full model.

Candidates are what-if copies made by `apply_plan(..., share_weights=True)`, so no weights are copied and the model is
never changed. Two things keep the many evaluations a search makes affordable, both exact:

- `PrefixCache`: the hidden states entering each layer of a plan, per batch. A candidate that shares its first `p`
  layers with the cached plan resumes from the cached input of position `p` (a forward pre-hook hands it to the first
  layer of a copy that holds only the remaining layers; the model's own forward pass supplies masks and positions).
- `Reference`: the full model's next-token distribution, kept as its top-k tokens plus one bucket for the rest of the
  vocabulary, so the KL needs no second copy of the full logits. KL between distributions coarsened that way is a
  lower bound of the full KL, and exact when k covers the vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from depthprune.adapters.base import backbone
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan
from depthprune.static.scorers.hidden import Target, feed_stack, model_inputs, record_stack


@dataclasses.dataclass(frozen=True)
class Loss:
    """Mean next-token NLL (nats) and mean KL(full || candidate) per predicted token (None without a reference)."""

    nll: float
    kl: float | None
    tokens: int


@dataclasses.dataclass(frozen=True)
class Reference:
    """The full model's next-token log-probabilities, per batch: top-k token ids and log-probs [batch, seq-1, k], and
    the log-probability of all other tokens together [batch, seq-1] (-inf where the top k hold everything)."""

    top_ids: tuple[torch.Tensor, ...]
    top_logp: tuple[torch.Tensor, ...]
    rest_logp: tuple[torch.Tensor, ...]
    loss: Loss


@dataclasses.dataclass(frozen=True)
class PrefixCache:
    """Hidden states [batch, seq, hidden] entering each position of the plan `keep`: inputs[position][j] is for
    calibration batch batch_ids[j]."""

    keep: tuple[int, ...]
    batch_ids: tuple[int, ...]
    inputs: tuple[tuple[torch.Tensor, ...], ...]


def _plan(target: Target, keep: Sequence[int]) -> LayerPlan:
    return LayerPlan({target.name: tuple(keep)})


def _resume_position(cache: PrefixCache | None, keep: Sequence[int]) -> int:
    """How many leading layers of `keep` can be skipped by starting from a cached input (0 = none)."""
    if cache is None:
        return 0
    p = 0
    limit = min(len(keep), len(cache.keep)) - 1  # leave at least one layer to run; inputs exist up to len-1
    while p < limit and keep[p] == cache.keep[p]:
        p += 1
    return p


def _token_losses(
    logits: torch.Tensor, ids: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
) -> tuple[float, float]:
    """Summed NLL and summed KL(reference || model) over the predicted tokens of one batch."""
    logq = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [b, seq-1, vocab]
    nll = -logq.gather(-1, ids[:, 1:, None]).sum().item()
    if ref is None:
        return nll, 0.0
    top_ids, top_logp, rest_logp = ref
    logq_top = logq.gather(-1, top_ids)  # [b, seq-1, k]
    kl = (top_logp.exp() * (top_logp - logq_top)).sum(-1)  # [b, seq-1]
    q_rest = (1.0 - logq_top.exp().sum(-1)).clamp_min(1e-12)
    p_rest = rest_logp.exp()
    kl = kl + torch.where(p_rest > 0, p_rest * (rest_logp - q_rest.log()), torch.zeros_like(kl))
    return nll, kl.sum().item()


@torch.no_grad()
def reference(model: nn.Module, batches: Sequence[torch.Tensor], top_k: int = 256) -> Reference:
    """The full model's next-token distribution on every batch (top-k truncated) and its own loss."""
    ids_out, logp_out, rest_out = [], [], []
    nll, count = 0.0, 0
    for ids in batches:
        inputs = model_inputs(model, ids)
        ids = inputs["input_ids"]
        logp = torch.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)  # [b, seq-1, vocab]
        nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
        count += ids[:, 1:].numel()
        k = min(top_k, logp.shape[-1])
        top_logp, top_ids = logp.topk(k, dim=-1)  # [b, seq-1, k]
        if k == logp.shape[-1]:
            rest = torch.full(top_logp.shape[:-1], float("-inf"), device=logp.device)
        else:
            rest = (1.0 - top_logp.exp().sum(-1)).clamp_min(0.0).log()  # [b, seq-1]
        ids_out.append(top_ids)
        logp_out.append(top_logp)
        rest_out.append(rest)
    return Reference(tuple(ids_out), tuple(logp_out), tuple(rest_out), Loss(nll / count, 0.0, count))


@torch.no_grad()
def plan_inputs(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    target: Target,
    keep: Sequence[int],
    batch_ids: Sequence[int] | None = None,
) -> PrefixCache:
    """Run the plan `keep` (backbone only) and record the hidden states entering each of its layers."""
    batch_ids = tuple(range(len(batches)) if batch_ids is None else batch_ids)
    run = apply_plan(model, _plan(target, keep), share_weights=True)
    per_position: list[list[torch.Tensor]] = [[] for _ in keep]
    for b in batch_ids:
        with record_stack(run, target, outputs=False) as calls:
            backbone(run)(**model_inputs(run, batches[b]))
        if len(calls) != len(keep):
            raise RuntimeError(f"expected {len(keep)} layer calls in stack {target.name!r}, saw {len(calls)}")
        for pos, (hidden, _) in enumerate(calls):
            per_position[pos].append(hidden)
    return PrefixCache(tuple(keep), batch_ids, tuple(tuple(p) for p in per_position))


@torch.no_grad()
def plan_loss(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    target: Target,
    keep: Sequence[int],
    *,
    ref: Reference | None = None,
    cache: PrefixCache | None = None,
    batch_ids: Sequence[int] | None = None,
) -> Loss:
    """NLL (and KL from `ref`) of the model running only the source layers `keep` of the target stack, in order.

    With `cache`, the layers `keep` shares with the cached plan are skipped (same result, less work); `batch_ids`
    picks which calibration batches to use (all by default; the cache must hold them).
    """
    batch_ids = tuple(range(len(batches)) if batch_ids is None else batch_ids)
    p = _resume_position(cache, keep)
    run = apply_plan(model, _plan(target, keep[p:]), share_weights=True)
    nll, kl, count = 0.0, 0.0, 0
    with feed_stack(run, target) as feed:
        for b in batch_ids:
            inputs = model_inputs(run, batches[b])
            if p > 0:
                feed(cache.inputs[p][cache.batch_ids.index(b)])
            batch_ref = None if ref is None else (ref.top_ids[b], ref.top_logp[b], ref.rest_logp[b])
            n, k = _token_losses(run(**inputs).logits, inputs["input_ids"], batch_ref)
            nll += n
            kl += k
            count += inputs["input_ids"][:, 1:].numel()
    return Loss(nll / count, None if ref is None else kl / count, count)
