"""Per-token linear routers for decoders (in the manner of FlexiDepth's and MindSkip's routers, without adapters):
P(layer l runs for this token) = sigmoid(w_l . rms(h) + b_l), h the token's state entering layer l."""

from __future__ import annotations

import torch

from depthprune.skipping.routers import LinearGates, rms


class TokenLinearRouters(LinearGates):
    """One decision per token and layer; reads the token's own state, so a cached decoding step decides alone."""

    granularity = "token"

    def features(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return rms(hidden)  # [batch, seq, hidden]
