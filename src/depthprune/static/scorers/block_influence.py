"""ShortGPT's Block Influence (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than
You Expect").

BI_i = 1 - E_tokens[cos(x_i, x_{i+1})], where x_i enters layer i and x_{i+1} leaves it: a layer that barely turns
the hidden states it is given matters little. The n layers with the lowest BI are removed. One forward pass over
the calibration batches; works on any stack (encoder, decoder) of any model type (for an encoder-decoder also on
dicts of its own inputs: Whisper's log-mel features with the decoder ids of their transcripts).
"""

from __future__ import annotations

import torch
from torch import nn

from depthprune.static.scorers import LayerScores
from depthprune.static.scorers.hidden import batch_states, check_arguments

NAME = "block_influence"


@torch.no_grad()
def block_influence(
    model: nn.Module,
    batches: list[torch.Tensor],
    n_remove: int = 1,
    *,
    stack: str | None = None,
    progress: bool = False,
) -> LayerScores:
    """Score each layer by 1 - mean cosine similarity of its input and output hidden states over all tokens."""
    target, batches = check_arguments(model, batches, n_remove, stack, NAME)
    sums = torch.zeros(target.n_layers, dtype=torch.float64)
    count = 0
    for _, inputs, outputs in batch_states(model, batches, target, NAME, progress):
        for i, (x_in, x_out) in enumerate(zip(inputs, outputs, strict=True)):
            cos = nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # [batch, seq]
            sums[i] += cos.sum().double().cpu()
        count += inputs[0].shape[0] * inputs[0].shape[1]  # positions (frames, for an encoder's dict batch)
    bi = (1.0 - sums / count).tolist()
    remove = sorted(range(target.n_layers), key=lambda i: (bi[i], i))[:n_remove]
    return LayerScores(NAME, target.name, tuple(bi), tuple(remove), {"tokens": count})


SCORER = block_influence
