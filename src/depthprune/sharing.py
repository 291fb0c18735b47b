"""Copies of a model's own modules that share its weights: what a plan's repeated layers and ALBERT's shared groups
are made of. (Re-tying them after a reload, from the record in the config, is `depthprune.io.tie_repeated_layers`.)
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from transformers import PreTrainedConfig


def share_clone(module: nn.Module, *, share_config: bool = False) -> nn.Module:
    """A structural copy of `module` that shares every parameter and buffer with it (no weight memory).

    share_config=True also shares the config objects its submodules hold (a repeated layer belongs to the same model
    as its original, so it must see that model's config, not a private stale copy of it).
    """
    memo: dict[int, Any] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    if share_config:
        configs = (getattr(m, "config", None) for m in module.modules())
        memo.update({id(c): c for c in configs if isinstance(c, PreTrainedConfig)})
    return copy.deepcopy(module, memo)
