"""Float32 ``nn.Linear`` on CPUs whose BLAS is slow for a few rows: y = (W · xᵀ)ᵀ instead of x · Wᵀ.

A decode step feeds each ``nn.Linear`` of the LM a few rows (one per sequence in the batch) against a large weight.
Reading the weight should cost the same for 1 row as for 8: that is what batching is for. But on an AVX2-only AMD
EPYC with PyTorch 2.13's MKL (2024.2), ``F.linear`` of (M, 4096) against an (11008, 4096) float32 weight took
9.8 / 19.5 / 54.4 / 72.3 / 78.7 ms for M = 1 / 2 / 4 / 8 / 16 (``benchmarks/cpu_linear.py``) — a decode step of 8
rows took 982 ms against 159 for one, and batching gained little — while the same product computed as W · xᵀ (the
weight as the GEMM's tall left operand, the rows as its few columns) took 9.6 / 11.4 / 10.9 / 18.6 / 44.8 ms, and
at M = 64 (a prefill) 96 against 142 ms. Same float32 arithmetic, another order of summation: answers equal the
plain path's except on exact near-ties (the tests compare greedy answers with transformers').

Whether it pays is the machine's: ``transposed_pays`` times both on an LM-sized product once per process (~0.3 s),
for float32 LMs on the CPU only (bfloat16 matmuls go to oneDNN, another path, left as it is; GPUs are not touched). The
environment variable ``BLIPDEMO_CPU_LINEAR`` = ``transposed`` / ``plain`` overrides the measurement.

``TransposedLinear`` is a ``TorchFunctionMode``: entered around the decode loop's LM calls (``decode_loop.py``), in
the thread that runs them (modes are per thread), it reroutes ``F.linear`` with a float32 CPU weight and leaves
every other call — other dtypes, quantized layers (bitsandbytes' weights are not float32), other threads — alone.
The LM stays the transformers model it was; nothing is patched.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ENV = "BLIPDEMO_CPU_LINEAR"  # "auto" (default: measured), "transposed" or "plain"
PAYS = 0.7  # the transposed product is used where it takes at most this share of the plain one's time


class TransposedLinear(TorchFunctionMode):
    """While entered (in this thread): ``F.linear(x, W, b)`` with CPU float32 ``x`` and ``W`` as ``(W · xᵀ)ᵀ + b``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _plain_float32_cpu(x) and _plain_float32_cpu(weight) and weight.dim() == 2 and x.dim() >= 1:
                rows = x.reshape(-1, x.shape[-1])  # (M, K)
                out = torch.matmul(weight, rows.t()).t()  # (N, K) · (K, M) → (M, N), a transposed view
                if bias is not None:
                    out = out + bias
                return out.contiguous().reshape(*x.shape[:-1], weight.shape[0])
        return func(*args, **kwargs)


def _plain_float32_cpu(t) -> bool:
    # Exactly a tensor or a Parameter: subclasses (bitsandbytes' Int8Params, Params4bit, …) keep their own path.
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32 and t.device.type == "cpu"


@functools.cache
def transposed_pays() -> bool:
    """Whether (W · xᵀ)ᵀ beats ``F.linear`` on this CPU for a decode step's shape (4 rows against a 4096 × 4096
    float32 weight): the best of 5 timings each, once per process."""
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(4096, 4096, generator=gen), torch.randn(4, 4096, generator=gen)

    def best(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        plain = best(lambda: F.linear(x, weight))
        transposed = best(lambda: torch.matmul(weight, x.t()).t().contiguous())
    return transposed <= PAYS * plain


def uses_transposed(lm) -> bool:
    """Whether this LM's decode loop should run under ``TransposedLinear`` (see the module's docstring)."""
    choice = os.environ.get(ENV, "auto").strip().lower()
    if choice not in ("auto", "transposed", "plain"):
        raise ValueError(f"{ENV} must be auto, transposed or plain, got {choice!r}")
    if choice == "plain":
        return False
    weight = lm.get_output_embeddings().weight if lm.get_output_embeddings() is not None else None
    if weight is None or not _plain_float32_cpu(weight):
        return False
    return choice == "transposed" or transposed_pays()


def linear_mode(enabled: bool) -> contextlib.AbstractContextManager:
    """A fresh ``TransposedLinear`` where ``enabled``, else a context that does nothing."""
    return TransposedLinear() if enabled else contextlib.nullcontext()
