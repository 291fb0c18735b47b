"""Perplexity of a causal LM on blocks of token ids."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def mean_nll(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """Mean next-token negative log-likelihood (nats) over `blocks` [n_blocks, seq_len]; each block scored alone."""
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [n_blocks, seq_len>=2] token ids, got shape {tuple(blocks.shape)}")
    total, count = 0.0, 0
    starts = range(0, blocks.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    device = next(model.parameters()).device
    for start in starts:
        ids = blocks[start : start + batch_size].to(device)  # [b, seq]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [b, seq-1, vocab]
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return total / count


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token NLL) over `blocks` [n_blocks, seq_len]."""
    return math.exp(mean_nll(model, blocks, batch_size=batch_size, progress=progress))
