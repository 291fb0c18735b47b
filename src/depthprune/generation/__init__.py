"""Decoding loops for decoder-only models: early-exit generation (`generate.py`), lossless self-speculative decoding
(`speculative.py`, `acceptance.py`), SkipDecode (`skipdecode.py`, adapted by `skipdecode_train.py`) and the calibration
of exit thresholds on generated continuations (`calibrate.py`).

Exit heads and token criteria are in `depthprune.exits` (`lm_heads.py`, `token_criteria/`); the KV-cache strategies
for skipped layers in `depthprune.kv`; running layers by hand in `depthprune.runner`.
"""
