"""PyTorch's per-shape matmul caches on the CPU, bounded for a long-running server.

On a CPU, a bfloat16 matmul (every ``nn.Linear`` of the ViT, the Q-Former and the LM, and the ViT's patch
convolution) goes to oneDNN through ideep, and two caches keep what was built for each *shape* of it:

- ideep's cache of primitive descriptors (``ideep::utils::computation_cache``), one per **thread**, 1,024 entries
  by default, of about 0.25 MiB each for the embedded model's shapes: a thread that runs matmuls of many shapes
  keeps up to ~256 MiB (``LRU_CACHE_CAPACITY``, read by each thread at its first matmul; must be positive);
- oneDNN's cache of primitives (the compiled kernels), one per process, 1,024 entries by default
  (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, read once, at the process's first primitive).

A server sees ever new shapes: a prefill is (rows × (queries + prompt + answer so far), width), and its length and
row count change with every batch (a Stop, a regroup, a new visitor), and the maps' passes add their own. Until the
caches are full every new shape stays (``benchmarks/soak.py``: the server grew by ~0.45 MiB a Stop, native memory,
at its default settings). A decoding step reuses a handful of shapes ((rows, width) against each weight), so a
small cache still hits on every step: 64 entries bound the memory to a few tens of MiB and cost no measurable time
per token (README, the soak section). Only the app (``app.py``) sets this: the library leaves the caches of a
process it is imported into alone.
"""

from __future__ import annotations

import os

LRU = "LRU_CACHE_CAPACITY"  # ideep's per-thread cache of primitive descriptors
ONEDNN = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"  # oneDNN's per-process cache of primitives
DEFAULT_CAPACITY = 64


def bound(capacity: int = DEFAULT_CAPACITY) -> dict[str, str]:
    """Bound both caches to ``capacity`` entries (where the environment does not set them already: an operator's
    own value wins); returns the values in effect. Call it before the process's first matmul: oneDNN reads its
    value once, ideep in each thread at that thread's first matmul."""
    if type(capacity) is not int or capacity < 1:
        raise ValueError(f"capacity must be a positive whole number of cache entries, got {capacity!r}")
    for name in (LRU, ONEDNN):
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in (LRU, ONEDNN)}
