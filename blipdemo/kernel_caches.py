"""PyTorch's per-shape matmul caches on the CPU, bounded for a long-running server.

On a CPU, a bfloat16 matmul (every ``nn.Linear`` of the ViT, the Q-Former and the LM, and the ViT's patch
convolution) goes to oneDNN through ideep, and two caches keep what was built for each *shape* of it:

- ideep's cache of primitive descriptors (``ideep::utils::computation_cache``), one per **thread**, 1,024 entries
  by default, of about 0.25 MiB each for the embedded model's shapes: a thread that runs matmuls of many shapes
  keeps up to ~256 MiB (``LRU_CACHE_CAPACITY``, read by each thread at its first matmul; must be positive);
- oneDNN's cache of primitives (the compiled kernels), one per process, 1,024 entries by default
  (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, read once, at the process's first primitive).

A server sees ever new shapes: a prefill is (rows × (queries + prompt), width), and its length and row count change
with every batch (a Stop, a request joining the batch, a new visitor), and the maps' passes add their own. Until the
caches are full every new shape stays (``benchmarks/soak.py``: the server grew by ~0.45 MiB a Stop, native memory,
at the default settings). A decoding step reuses a handful of shapes ((rows, width) against each weight), so small
caches still hit on every step after the first. The two bounds differ because the costs do: an ideep miss only
rebuilds a descriptor (~0.01–0.1 ms; the kernel comes from oneDNN's cache), and its cache is multiplied by the
threads that run matmuls (the batch thread, the maps' and looks' worker threads, which come and go with the load),
so it is kept at 16, which holds a decoding step's few shapes: at 64 the soak's server still grew with its
long-lived threads' caches (+4.8% and +9.9% after the first 10%, against +0.3% twice at 16, with no cost per token
that this machine can measure); a oneDNN miss compiles a kernel (~0.5 ms), and at 64 a batch's start missed 3 times
as often as at the default, at 256 no more often, for tens of MiB once (README, the soak section). Only the app
(``app.py``) sets these: the library leaves the caches of a process it is imported into alone.
"""

from __future__ import annotations

import os

LRU = "LRU_CACHE_CAPACITY"  # ideep's per-thread cache of primitive descriptors
ONEDNN = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"  # oneDNN's per-process cache of primitives
DESCRIPTORS = 16  # ideep's entries per thread
PRIMITIVES = 256  # oneDNN's entries per process


def bound(descriptors: int = DESCRIPTORS, primitives: int = PRIMITIVES) -> dict[str, str]:
    """Bound ideep's per-thread cache to ``descriptors`` entries and oneDNN's to ``primitives`` (where the
    environment does not set them already: an operator's own value wins); returns the values in effect. Call it
    before the process's first matmul: oneDNN reads its value once, ideep in each thread at that thread's first
    matmul."""
    for capacity in (descriptors, primitives):
        if type(capacity) is not int or capacity < 1:  # ideep refuses 0 at its first matmul: better here, at start
            raise ValueError(f"a cache capacity must be a positive whole number of entries, got {capacity!r}")
    os.environ.setdefault(LRU, str(descriptors))
    os.environ.setdefault(ONEDNN, str(primitives))
    return {name: os.environ[name] for name in (LRU, ONEDNN)}
