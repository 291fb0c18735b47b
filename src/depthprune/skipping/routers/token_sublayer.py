"""Per-token linear routers for each sub-layer of a decoder layer (the seed's "skip attention or MLP", in the manner of
FlexiDepth and Router-Tuning's attention-only skipping, without adapters): P(sub-layer runs for this token) =
sigmoid(w . rms(h) + b), h the token's state entering the sub-layer (the attention reads the state entering the
layer, the MLP the state after the attention's residual add). Depth counts each sub-layer by its share of the layer's
parameters (depthprune.sublayers.part_shares: SmolLM2's attention is a quarter of a layer)."""

from __future__ import annotations

from depthprune.skipping.routers.token_linear import TokenLinearRouters
from depthprune.sublayers import PARTS


class TokenSublayerRouters(TokenLinearRouters):
    """One decision per token, layer and sub-layer; a token that skips a layer's attention still writes its key/value
    entry there (from the state it enters the layer with), as a token that skips the whole layer does."""

    parts = PARTS
