"""Early exit for text generation (decoder-only models): exit heads, token-level exit criteria, a generation loop that
keeps the KV cache of skipped layers correct (state propagation, deferred recomputation), batched.

The contract between the parts (see `ExitHeadsLike`): a decoder's exit heads map the hidden state that leaves layer
`layer` (0-based) of the decoder stack to next-token logits over the model's vocabulary, and may also give CALM's
learned confidence that this exit already agrees with the full model.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ExitHeadsLike(Protocol):
    """What the generation loop needs from a decoder's exit heads.

    layers: sorted 0-based indices of the decoder layers after which an exit exists (never the last layer: the model's
    own final norm + LM head is the last exit). num_layers: depth of the decoder stack the heads were built for.
    """

    layers: tuple[int, ...]
    num_layers: int

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [batch, seq, hidden_size] leaving layer `layer` -> logits [batch, seq, vocab]."""
        ...

    def confidence(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """CALM's learned meta-classifier: P(this exit's token equals the full model's) [batch, seq], or None when
        the heads have no such classifier."""
        ...
