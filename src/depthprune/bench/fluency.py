"""Fluency next to perplexity: greedy continuations of held-out prompts and how much they repeat themselves.

A pruned model can keep a tolerable perplexity and still loop in generation ("the day, the day, the day..."), which
teacher-forced perplexity never sees. `repeated_ngram_share` is the share of a continuation's n-grams (default 4-grams
of token ids) that already occurred earlier in it: about 0 for fluent text, towards 1 for a loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def repeated_ngram_share(tokens: Sequence[int], n: int = 4) -> float:
    """Share of the n-grams of `tokens` that are repeats of an earlier n-gram of the same sequence (0.0 when shorter
    than n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(tokens[k : k + n]) for k in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@dataclasses.dataclass
class Fluency:
    """Greedy continuations (token ids and text) of each prompt, their repeated-n-gram shares and the mean."""

    n: int
    max_new_tokens: int
    continuations: list[str]
    shares: list[float]
    mean_share: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def prompt_ids(tokenizer: Any, blocks: torch.Tensor, prompt_len: int = 32) -> list[torch.Tensor]:
    """The first `prompt_len` tokens of each held-out block [n_blocks, seq], as prompts [1, prompt_len]."""
    if blocks.dim() != 2 or blocks.shape[1] < prompt_len:
        raise ValueError(f"need blocks [n, seq >= {prompt_len}], got {tuple(blocks.shape)}")
    return [row[:prompt_len].unsqueeze(0) for row in blocks]


@torch.no_grad()
def fluency(
    model: nn.Module, tokenizer: Any, prompts: Sequence[torch.Tensor], max_new_tokens: int = 64, n: int = 4
) -> Fluency:
    """Greedy continuations of `prompts` (each LongTensor [1, len]) with the model's own `generate`, decoded, and the
    share of repeated n-grams of each continuation's tokens."""
    texts, shares = [], []
    for ids in prompts:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,  # the loop's length is what we measure: never stop early
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )[0, ids.shape[1] :].tolist()
        texts.append(tokenizer.decode(out, skip_special_tokens=True))
        shares.append(repeated_ngram_share(out, n))
    mean = sum(shares) / len(shares) if shares else 0.0
    return Fluency(n, max_new_tokens, texts, shares, mean)
