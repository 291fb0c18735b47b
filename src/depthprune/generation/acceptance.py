"""Which drafted tokens a verifier keeps: the acceptance rules of speculative decoding, as pure batched functions.

A round drafted k tokens d_1..d_k after the row's newest token d_0; the verifier (the full model) gave its next-token
distribution after each of d_0..d_k, k + 1 in all. Both rules return (a, y): the number of leading drafts accepted
(0..k) and the verifier's own token that follows them (a correction when a < k, a bonus token when a = k), so a round
always yields a + 1 tokens.

- Greedy: d_i is accepted while it equals the verifier's argmax; y is the verifier's argmax after the accepted prefix.
  The kept tokens are exactly what greedy decoding with the verifier alone produces.
- Sampling (Leviathan et al. 2023; Chen et al. 2023): d_i, drawn from the draft's q_i, is accepted with probability
  min(1, p_i(d_i) / q_i(d_i)); at the first rejection y is drawn from norm(max(0, p_i - q_i)); after k acceptances y
  is drawn from p_k. Every kept token is then distributed exactly as sampling from the verifier's p.
"""

from __future__ import annotations

import torch


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """The distribution sampling draws from, as transformers' generate builds it (temperature, then top-k):
    logits [..., vocab] -> float32 probabilities [..., vocab]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.softmax(scores, dim=-1)


def greedy_accept(target_logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """target_logits [n, k+1, vocab] (the verifier's logits after d_0..d_k), drafts [n, k] ->
    (accepted [n] in 0..k, next token [n])."""
    target = target_logits.argmax(-1)  # [n, k+1]
    k = drafts.shape[1]
    accepted = (drafts == target[:, :k]).long().cumprod(1).sum(1)  # leading matches
    return accepted, target.gather(1, accepted[:, None])[:, 0]


def speculative_accept(
    p: torch.Tensor,
    q: torch.Tensor,
    drafts: torch.Tensor,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling.

    p [n, k+1, vocab]: the verifier's distributions after d_0..d_k; q [n, k, vocab]: the draft distributions d_1..d_k
    were drawn from; drafts [n, k]. Returns (accepted [n] in 0..k, next token [n]), the next token drawn from the
    residual norm(max(0, p - q)) at the first rejection, or from p after the last draft when all are accepted.
    valid [n, k] (optional, a leading run of True per row): rows that drafted fewer than k tokens; a row's drafts end
    at its first False, so it accepts at most its own run and draws its next token from p after it.
    """
    n, k = drafts.shape
    vocab = p.shape[-1]
    if p.shape != (n, k + 1, vocab) or q.shape != (n, k, vocab):
        raise ValueError(f"p {tuple(p.shape)} and q {tuple(q.shape)} do not fit {k} drafts for {n} rows")
    if valid is not None:
        if valid.shape != (n, k):
            raise ValueError(f"valid {tuple(valid.shape)} does not fit {k} drafts for {n} rows")
        q = q * valid[..., None]  # no draft there: nothing to take away from p
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # [n, k]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand((n, k), generator=generator, device=p.device, dtype=p.dtype)
    ok = u * q_d < p_d  # u < p/q without dividing: P(accept) = min(1, p/q)
    if valid is not None:
        ok &= valid
    accepted = ok.long().cumprod(1).sum(1)  # [n]
    at = accepted[:, None, None].expand(n, 1, vocab)
    p_a = p.gather(1, at)[:, 0]  # [n, vocab]
    q_a = torch.cat([q, q.new_zeros((n, 1, vocab))], 1).gather(1, at)[:, 0]  # zero after the last draft: p itself
    residual = (p_a - q_a).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    dist = torch.where(total > 0, residual / total.clamp_min(torch.finfo(residual.dtype).tiny), p_a)
    return accepted, torch.multinomial(dist, 1, generator=generator)[:, 0]


__all__ = ["greedy_accept", "sampling_probs", "speculative_accept"]
