"""Shared test set-up.

- One torch thread: the tests run tiny models whose ops are far too small to gain from threads, and on a busy 2-core
  machine a multi-threaded op on a tiny tensor can take 100x longer waiting for the other thread.
- Quiet transformers' advice logging (the tiny configs trigger plenty of it).
"""

from __future__ import annotations

import torch
import transformers

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
