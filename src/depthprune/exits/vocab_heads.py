"""Truncated-vocabulary exit heads: exits that project onto the K most frequent tokens of a calibration text only.

An exit head of a small LM is mostly its vocabulary projection (SmolLM2: 49,152 x 576, worth ~5.4 decoder layers at
batch 1, benchmarks/RESULTS.md 3b). FR-Spec / EAGLE-3 / SGLang's `--speculative-token-map` draft over a few thousand
frequent tokens instead; here any `DecoderExitHeads` (logit lens, tuned lens, mlp) keeps its translator and the
model's final norm, and its last step multiplies by the K rows of the model's own LM head that belong to the kept
tokens (copied once; bias and logit soft-capping as the model applies them). K is given, or the fewest tokens that
cover `coverage` of the calibration text's tokens (plus the end-of-sequence ids, always kept).

- `logits(layer, h)`: full-vocabulary logits [b, s, vocab], -inf outside the kept tokens: every consumer of exit heads
  (early-exit criteria, calibration, sampling drafts) works unchanged, and a softmax over them is the softmax over K.
- `top_tokens(layer, h)`: the argmax token ids [b, s] from the K logits, without building the full row: what a greedy
  draft needs (`depthprune.exits.lm_heads.top_tokens` uses it where heads have it).
The last layer is always the model's own full head, and self-speculative decoding verifies with the full model, so
its greedy output stays token-identical to plain greedy decoding whatever K is (drafts are just accepted less often).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthprune.exits.lm_heads import DecoderExitHeads
from depthprune.fsutil import write_atomic

VOCAB_NAME = "vocab_subset.json"


def frequent_tokens(
    tokens: torch.Tensor,
    vocab_size: int,
    *,
    coverage: float | None = None,
    k: int | None = None,
    always: Sequence[int] = (),
) -> tuple[torch.Tensor, float]:
    """The most frequent token ids of `tokens` (any shape) and the share of `tokens` they cover.

    Give exactly one of coverage (in (0, 1]: the fewest tokens whose counts reach that share) or k (that many).
    `always` ids (e.g. end of sequence) are added when missing. Ids come sorted by frequency (ties: lower id first)."""
    if (coverage is None) == (k is None):
        raise ValueError("give exactly one of coverage (share of calibration tokens to cover) or k (tokens to keep)")
    flat = tokens.reshape(-1).long()
    if flat.numel() == 0:
        raise ValueError("no calibration tokens to count")
    if int(flat.min()) < 0 or int(flat.max()) >= vocab_size:
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1}, got {int(flat.min())}..{int(flat.max())}")
    counts = torch.bincount(flat, minlength=vocab_size).double()  # [vocab]
    order = torch.argsort(-counts, stable=True)
    if coverage is not None:
        if not 0 < coverage <= 1:
            raise ValueError(f"coverage must lie in (0, 1], got {coverage}")
        cum = counts[order].cumsum(0) / counts.sum()
        k = int(torch.searchsorted(cum, torch.tensor(coverage - 1e-12, dtype=cum.dtype))) + 1
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must lie in 1..{vocab_size}, got {k}")
    ids = order[:k]
    extra = [int(i) for i in always if 0 <= int(i) < vocab_size and int(i) not in set(ids.tolist())]
    if extra:
        ids = torch.cat([ids, torch.tensor(extra, dtype=ids.dtype)])
    covered = float(counts[ids].sum() / counts.sum())
    return ids, covered


class TruncatedVocabHeads(nn.Module):
    """Exit heads whose exits project onto `token_ids` only (see the module docstring); satisfies `ExitHeadsLike`.

    base: the exits' translators and the model's final norm; token_ids [K]: the kept vocabulary. `info` is kept as
    metadata (coverage, where the ids came from) and saved beside the heads."""

    kind = "truncated"

    def __init__(self, base: DecoderExitHeads, token_ids: torch.Tensor | Sequence[int], info: dict | None = None):
        super().__init__()
        shared = base.head_parts()
        vocab = base.config.vocab_size
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token_ids must be a non-empty list of ids in 0..{vocab - 1}")
        if ids.unique().numel() != ids.numel():
            raise ValueError("token_ids holds repeated ids")
        self.base = base
        self.layers = base.layers
        self.num_layers = base.num_layers
        self.config = base.config
        self.info = dict(info or {})
        head, proj, cap = shared
        weight = head.weight  # [vocab, head width]
        self.register_buffer("token_ids", ids.to(weight.device), persistent=False)
        # the kept rows of the model's own head, copied once: [K, head width] (and [K] bias)
        self.register_buffer("weight", weight.detach().index_select(0, self.token_ids).clone(), persistent=False)
        bias = getattr(head, "bias", None)
        self.register_buffer(
            "bias", None if bias is None else bias.detach().index_select(0, self.token_ids).clone(), persistent=False
        )
        self._proj, self._cap = proj, cap
        self.vocab_size = vocab

    # ---- construction -----------------------------------------------------------------------------------------------
    @classmethod
    def from_tokens(
        cls,
        base: DecoderExitHeads,
        tokens: torch.Tensor,
        *,
        coverage: float | None = None,
        k: int | None = None,
        always: Sequence[int] = (),
    ) -> TruncatedVocabHeads:
        """Keep the tokens most frequent in `tokens` (calibration text, tokenized), by coverage or count."""
        ids, covered = frequent_tokens(tokens, base.config.vocab_size, coverage=coverage, k=k, always=always)
        info = {"coverage_target": coverage, "k_given": k, "coverage": covered, "k": int(ids.numel())}
        info["calibration_tokens"] = int(tokens.numel())
        return cls(base, ids, info)

    @property
    def k(self) -> int:
        return int(self.token_ids.numel())

    # ---- the ExitHeadsLike contract ---------------------------------------------------------------------------------
    def subset_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [b, s, hidden] leaving exit `layer` -> logits over the kept tokens [b, s, K] (token_ids order)."""
        if layer == self.num_layers - 1:
            raise ValueError("the last layer exits through the model's full head; use logits()")
        state = self.base.state(layer, hidden)  # translator + the model's final norm
        if self._proj is not None:
            state = self._proj(state)
        out = nn.functional.linear(state.to(self.weight.dtype), self.weight, self.bias)
        if self._cap:
            out = torch.tanh(out / self._cap) * self._cap
        return out

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [b, s, vocab]: the kept tokens' logits, -inf elsewhere (the last layer: the model's
        own full head)."""
        if layer == self.num_layers - 1:
            return self.base.logits(layer, hidden)
        sub = self.subset_logits(layer, hidden)
        full = sub.new_full((*sub.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.token_ids, sub)

    def top_tokens(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy next-token ids [b, s] of exit `layer`, from the K kept logits only."""
        if layer == self.num_layers - 1:
            return self.base.logits(layer, hidden).argmax(-1)
        return self.token_ids[self.subset_logits(layer, hidden).argmax(-1)]

    def confidence(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.base.confidence(layer, hidden)

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(layer, hidden)

    # ---- persistence ------------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """The base heads' files plus vocab_subset.json (the kept ids and how they were chosen), each atomically."""
        path = self.base.save(folder, overwrite=overwrite)
        data = {"token_ids": self.token_ids.tolist(), **self.info}
        write_atomic(Path(folder) / VOCAB_NAME, json.dumps(data) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike, model: nn.Module, dtype: torch.dtype | None = None) -> TruncatedVocabHeads:
        path = Path(folder) / VOCAB_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: save truncated-vocabulary heads there first")
        data: dict[str, Any] = json.loads(path.read_text())
        base = DecoderExitHeads.load(folder, model, dtype)
        return cls(base, data.pop("token_ids"), data)


__all__ = ["VOCAB_NAME", "TruncatedVocabHeads", "frequent_tokens"]
