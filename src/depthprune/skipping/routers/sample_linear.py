"""Per-sample linear routers for encoders: P(layer l runs for this input) = sigmoid(w_l . rms(mean h) + b_l), the
mean over the input's real tokens of the state entering layer l (the whole sequence runs a layer or skips it: an
encoder's tokens attend to each other, so a per-token skip saves nothing a batch can use)."""

from __future__ import annotations

import torch

from depthprune.skipping.routers import LinearGates, rms


class SampleLinearRouters(LinearGates):
    """One decision per sample and layer."""

    granularity = "sample"

    def features(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            pooled = hidden.float().mean(1)
        else:
            m = mask.to(hidden.device, torch.float32)[..., None]  # [batch, seq, 1]
            pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        return rms(pooled)  # [batch, hidden]
