"""Calibration loss of a causal LM running a subset of one stack's layers: next-token NLL, and KL from the full model.

A candidate plan runs on the runner (`depthprune.runner`): the model's own layer modules, in the plan's order, each
with the arguments the model's own forward gives it (per attention type on Gemma 3), then the adapter's final step
(final norm, head, soft-cap). The model is never changed and no what-if copy is built. Two things keep the many
evaluations a search makes affordable, both exact:

- `PrefixCache`: per calibration batch, each layer's captured arguments (`StackCall`) and the hidden states after
  each leading part of a plan. A candidate that shares its first `p` layers with the cached plan resumes from the
  cached state after `p` layers and runs only the rest.
- `Reference`: the full model's next-token distribution, kept as its top-k tokens plus one bucket for the rest of the
  vocabulary, so the KL needs no second copy of the full logits. KL between distributions coarsened that way is a
  lower bound of the full KL, and exact when k covers the vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from depthprune.runner import StackCall
from depthprune.static.scorers.hidden import Target, model_inputs, stack_call


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
    """The plan `keep` run on calibration batches batch_ids: calls[j] holds each layer's arguments for batch
    batch_ids[j], and states[p][j] [batch, seq, hidden] its hidden states after the first p layers of the plan
    (states[0] enters the stack, states[len(keep)] leaves it)."""

    keep: tuple[int, ...]
    batch_ids: tuple[int, ...]
    calls: tuple[StackCall, ...]
    states: tuple[tuple[torch.Tensor, ...], ...]

    def __post_init__(self) -> None:
        if len(self.states) != len(self.keep) + 1 or any(len(s) != len(self.batch_ids) for s in self.states):
            raise ValueError("PrefixCache needs one state per batch after each of the 0..len(keep) leading layers")

    def shared(self, keep: Sequence[int]) -> int:
        """How many leading layers `keep` shares with the cached plan (those a run of `keep` can skip)."""
        p = 0
        while p < min(len(keep), len(self.keep)) and keep[p] == self.keep[p]:
            p += 1
        return p

    def index(self, batch: int) -> int:
        if batch not in self.batch_ids:
            raise ValueError(f"calibration batch {batch} is not in the cache (it holds batches {self.batch_ids})")
        return self.batch_ids.index(batch)


def capture(
    model: nn.Module, batches: Sequence[torch.Tensor], target: Target, batch_ids: Sequence[int] | None = None
) -> PrefixCache:
    """The empty plan's cache: each batch's hidden states entering the stack and its layers' arguments (no layer
    runs)."""
    batch_ids = tuple(range(len(batches)) if batch_ids is None else batch_ids)
    captured = [stack_call(model, batches[b], target) for b in batch_ids]
    return PrefixCache((), batch_ids, tuple(c[1] for c in captured), (tuple(c[0] for c in captured),))


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


def _reference(logits: Iterable[torch.Tensor], batches: Sequence[torch.Tensor], top_k: int) -> Reference:
    """The Reference of the full model's logits [b, seq, vocab] on each of `batches` (token ids [b, seq])."""
    ids_out, logp_out, rest_out = [], [], []
    nll, count = 0.0, 0
    for batch_logits, ids in zip(logits, batches, strict=True):
        ids = ids.to(batch_logits.device)
        logp = torch.log_softmax(batch_logits[:, :-1].float(), dim=-1)  # [b, seq-1, vocab]
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
def reference(model: nn.Module, batches: Sequence[torch.Tensor], top_k: int = 256) -> Reference:
    """The full model's next-token distribution on every batch (top-k truncated) and its own loss, from the model's
    own forward pass (`full_pass` gets it from the runner together with a PrefixCache)."""
    logits = (model(**model_inputs(model, ids)).logits for ids in batches)
    return _reference(logits, batches, top_k)


@torch.no_grad()
def plan_inputs(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    target: Target,
    keep: Sequence[int],
    batch_ids: Sequence[int] | None = None,
    *,
    cache: PrefixCache | None = None,
) -> PrefixCache:
    """Run the plan `keep` and cache the hidden states after each of its leading layers; from the shared prefix of
    `cache` when given (it must hold the batches), else from a fresh capture."""
    keep = tuple(keep)
    batch_ids = tuple(range(len(batches)) if batch_ids is None else batch_ids)
    cache = capture(model, batches, target, batch_ids) if cache is None else cache
    p = cache.shared(keep)
    rows = [cache.index(b) for b in batch_ids]
    calls = tuple(cache.calls[j] for j in rows)
    states = [tuple(cache.states[q][j] for j in rows) for q in range(p + 1)]
    for layer in keep[p:]:
        states.append(tuple(call.run(h, order=(layer,)) for call, h in zip(calls, states[-1], strict=True)))
    return PrefixCache(keep, batch_ids, calls, tuple(states))


def _logits(model: nn.Module, target: Target, hidden: torch.Tensor) -> torch.Tensor:
    return target.adapter.final_logits(model, hidden, target.name)  # [batch, seq, vocab]


@torch.no_grad()
def full_pass(
    model: nn.Module, batches: Sequence[torch.Tensor], target: Target, top_k: int = 256
) -> tuple[Reference, PrefixCache]:
    """The full model's reference distribution and the cache of its full plan, from one run of every layer."""
    cache = plan_inputs(model, batches, target, range(target.n_layers))
    logits = (_logits(model, target, h) for h in cache.states[-1])
    return _reference(logits, [batches[b] for b in cache.batch_ids], top_k), cache


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

    With `cache`, the leading layers `keep` shares with the cached plan are skipped (same result, less work);
    `batch_ids` picks which calibration batches to use (all by default; the cache must hold them).
    """
    keep = tuple(keep)
    batch_ids = tuple(range(len(batches)) if batch_ids is None else batch_ids)
    cache = capture(model, batches, target, batch_ids) if cache is None else cache
    p = cache.shared(keep)
    rows = [(b, cache.index(b)) for b in batch_ids]
    final = ((b, cache.calls[j].run(cache.states[p][j], order=keep[p:])) for b, j in rows)  # one batch at a time
    return _loss(model, batches, target, final, ref)


@torch.no_grad()
def cache_loss(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    target: Target,
    cache: PrefixCache,
    *,
    ref: Reference | None = None,
) -> Loss:
    """The loss of the cached plan (`cache.keep`) on the cache's batches, from the hidden states leaving its last
    layer: no layer runs. `plan_inputs` then `cache_loss` gives what `plan_loss` gives, and keeps the states for
    the next candidate to resume from."""
    final = [(b, cache.states[-1][j]) for j, b in enumerate(cache.batch_ids)]
    return _loss(model, batches, target, final, ref)


def _loss(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    target: Target,
    final: Iterable[tuple[int, torch.Tensor]],
    ref: Reference | None,
) -> Loss:
    """Mean NLL (and KL from `ref`) over (batch id, hidden states leaving the stack [batch, seq, hidden]) pairs."""
    nll, kl, count = 0.0, 0.0, 0
    for b, hidden in final:
        ids = batches[b].to(hidden.device)
        batch_ref = None if ref is None else (ref.top_ids[b], ref.top_logp[b], ref.rest_logp[b])
        n, k = _token_losses(_logits(model, target, hidden), ids, batch_ref)
        nll += n
        kl += k
        count += ids[:, 1:].numel()
    return Loss(nll / count, None if ref is None else kl / count, count)
