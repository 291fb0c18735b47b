"""Layer fusion: layers merged into one (LaCo's RDSC merge, `merge.py`) or positions sharing one set of weights
(`share.py`). Both return a new model of the same class, record what they fused in `config.depthprune_fusion`, and
export as ordinary Hugging Face models; `runs.py` holds what they share (runs of positions, checks, figures)."""

from __future__ import annotations

from depthprune.static.fusion.merge import Candidate, MergeResult, laco, merge_layers, merged_parameters
from depthprune.static.fusion.runs import (
    RECORD_KEY,
    format_runs,
    parse_runs,
    unique_parameters,
    weights_bytes,
)
from depthprune.static.fusion.share import MODES, averaged_parameters, share_layers

__all__ = [
    "MODES",
    "RECORD_KEY",
    "Candidate",
    "MergeResult",
    "averaged_parameters",
    "format_runs",
    "laco",
    "merge_layers",
    "merged_parameters",
    "parse_runs",
    "share_layers",
    "unique_parameters",
    "weights_bytes",
]
