"""Float32 ``nn.Linear`` on CPUs whose BLAS is slow for a few rows: another GEMM for the decode loop's LM calls.

A decode step feeds each ``nn.Linear`` of the LM a few rows (one per sequence in the batch) against a large weight.
Reading the weight should cost the same for 1 row as for 8: that is what batching is for. But on an AVX2-only AMD
EPYC with PyTorch 2.13's MKL (2024.2), ``F.linear`` of (M, 4096) against an (11008, 4096) float32 weight took
9.8 / 19.5 / 54.4 / 72.3 / 78.7 ms for M = 1 / 2 / 4 / 8 / 16 (``benchmarks/cpu_linear.py``) — a decode step of 8
rows took 982 ms against 159 for one, and batching gained little. Two other products give the same float32
arithmetic in another order of summation (answers equal the plain path's except on exact near-ties; the tests
compare greedy answers with transformers'):

- ``transposed``: (W · xᵀ)ᵀ, the weight as the GEMM's tall left operand and the rows as its few columns — on that
  machine 9.6 / 11.4 / 10.9 / 18.6 / 44.8 ms, and at M = 64 (a prefill) 96 against 142 ms;
- ``onednn``: oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, the op Inductor's CPU linear fusions
  call; the weight is read in place, not copied) — on a decode step of the full-size LM, 2 layers and the head,
  about a fifth faster than ``transposed`` for 1 and for 8 rows, and no faster for the many rows of a prefill.

Which pays is the machine's, so it is measured once per process (~1 s), for float32 LMs at least ``MIN_WIDTH``
wide on the CPU only (bfloat16 matmuls already go to oneDNN, left as they are; GPUs are not touched): rows beyond
``FEW_ROWS`` (prefills) take ``transposed`` where it takes at most ``PAYS`` of plain's time (4 rows against a 4096²
weight), else the plain path; up to ``FEW_ROWS`` rows (decode steps) take ``onednn`` where, on 1 and 8 rows together
against LLaMA-7B's MLP weight, it is at least 10% faster than the plain path, or no slower than ``transposed`` where
that was chosen (on that machine it took 0.76–0.96 of ``transposed``'s time, the spread of a shared machine). The
environment variable ``BLIPDEMO_CPU_LINEAR`` = ``plain`` / ``transposed`` / ``onednn`` puts every row count on one
route instead of measuring, whatever the LM's width.

``CpuLinear`` is a ``TorchFunctionMode``: entered around the decode loop's LM calls (``decode_loop.py``), in the
thread that runs them (modes are per thread), it reroutes ``F.linear`` with a float32 CPU weight and leaves every
other call — other dtypes, quantized layers (bitsandbytes' weights are not float32), other threads — alone. The LM
stays the transformers model it was; nothing is patched.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ENV = "BLIPDEMO_CPU_LINEAR"  # "auto" (default: measured), "plain", "transposed" or "onednn"
ROUTES = ("plain", "transposed", "onednn")
PAYS = 0.7  # the transposed product is used where it takes at most this share of the plain one's time
# oneDNN is used for few rows where it takes at most this share of the plain path's time, or is no slower than the
# transposed product (both leave transformers' path already: no margin for leaving it is needed between them).
ONEDNN_PAYS = {"plain": 0.9, "transposed": 1.0}
# Narrower LMs stay on the plain path under "auto": the mode's Python dispatch (every torch call of the forward passes
# through ``__torch_function__``) then costs more than any product saves — the embedded model (256 wide) answered 24
# tokens in 69-73 ms plain and 110-124 ms on either route on the AVX2 EPYC, ~2 ms more a step. The published LMs are
# 2048 (Flan-T5-XL) to 5120 wide.
MIN_WIDTH = 1024
FEW_ROWS = 32  # a decode step's rows (one per sequence in the batch); a prefill has (queries + prompt) per sequence


@dataclass(frozen=True)
class Routes:
    """How the decode loop computes a float32 linear layer of up to ``FEW_ROWS`` rows, and of more."""

    few: str = "plain"
    many: str = "plain"

    def __post_init__(self) -> None:
        if self.few not in ROUTES or self.many not in ROUTES:
            raise ValueError(f"a route is one of {ROUTES}, got {self}")

    @property
    def plain(self) -> bool:
        """Whether nothing is rerouted."""
        return self.few == self.many == "plain"

    def describe(self) -> str:
        """One line for logs and benchmark headers."""
        return self.few if self.few == self.many else f"{self.few} up to {FEW_ROWS} rows, {self.many} beyond"


PLAIN = Routes()


class CpuLinear(TorchFunctionMode):
    """While entered (in this thread): ``F.linear(x, W, b)`` with CPU float32 ``x`` and ``W`` on ``routes``."""

    def __init__(self, routes: Routes) -> None:
        super().__init__()
        self.routes = routes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (
                _plain_float32_cpu(x)
                and _plain_float32_cpu(weight)
                and weight.dim() == 2
                and x.dim() >= 1
                and x.numel() > 0
                and (bias is None or _plain_float32_cpu(bias))
            ):
                rows = x.numel() // x.shape[-1]
                route = self.routes.few if rows <= FEW_ROWS else self.routes.many
                if route == "onednn" and weight.is_contiguous():
                    return _onednn(x, weight, bias)
                if route == "transposed":
                    return _transposed(x, weight, bias)
        return func(*args, **kwargs)


def _transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])  # (M, K)
    out = torch.matmul(weight, rows.t()).t()  # (N, K) · (K, M) → (M, N), a transposed view
    if bias is not None:
        out = out + bias
    return out.contiguous().reshape(*x.shape[:-1], weight.shape[0])


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # (…, K) · (N, K)ᵀ + b → (…, N); "none": no fused activation.
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# Each route's product, (x, W, b) → x · Wᵀ + b, as the load-time measurements and the benchmark time them.
PRODUCTS = {"plain": F.linear, "transposed": _transposed, "onednn": _onednn}


def _plain_float32_cpu(t) -> bool:
    # Exactly a tensor or a Parameter: subclasses (bitsandbytes' Int8Params, Params4bit, …) keep their own path.
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32 and t.device.type == "cpu"


def _best(fn, repeats: int = 5) -> float:
    """The best of ``repeats`` timings of ``fn`` after one warm-up, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _time_route(route: str, rows: int) -> float:
    """The best of 5 timings of ``route`` for ``rows`` rows against a random 4096 × 4096 float32 weight, in
    seconds."""
    gen = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(4096, 4096, generator=gen), torch.randn(rows, 4096, generator=gen)
    with torch.inference_mode():
        return _best(lambda: PRODUCTS[route](x, weight, None))


@functools.cache
def transposed_pays() -> bool:
    """Whether (W · xᵀ)ᵀ beats ``F.linear`` on this CPU for a decode step's shape (4 rows against a 4096 × 4096
    float32 weight): the best of 5 timings each, once per process."""
    return _time_route("transposed", 4) <= PAYS * _time_route("plain", 4)


def onednn_works() -> bool:
    """Whether this PyTorch build has oneDNN's inner product (the op is Inductor's, not a public API)."""
    try:
        x, weight = torch.ones(2, 3), torch.ones(4, 3)
        return torch.equal(_onednn(x, weight, None), F.linear(x, weight))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def onednn_pays(other: str) -> bool:
    """Whether oneDNN's inner product takes at most ``ONEDNN_PAYS[other]`` of route ``other``'s time on this CPU for
    1 and for 8 rows against an (11008, 4096) float32 weight, LLaMA-7B's MLP and larger than a CPU's caches, once per
    process: the two routes' timings interleaved (a shared machine's slow moments hit both), the best of 5 each."""
    if not onednn_works():
        return False
    products = {route: PRODUCTS[route] for route in ("onednn", other)}
    gen = torch.Generator().manual_seed(0)
    weight = torch.empty(11008, 4096).uniform_(-0.02, 0.02, generator=gen)
    best: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        for round_ in range(6):  # round 0 warms up
            for rows in (1, 8):
                x = torch.randn(rows, weight.shape[1], generator=gen)
                for route, product in products.items():
                    start = time.perf_counter()
                    product(x, weight, None)
                    spent = time.perf_counter() - start
                    if round_:
                        best[route, rows] = min(best.get((route, rows), spent), spent)
    onednn = best["onednn", 1] + best["onednn", 8]
    return onednn <= ONEDNN_PAYS[other] * (best[other, 1] + best[other, 8])


def routes_for(lm) -> Routes:
    """The routes of this LM's decode loop (see the module's docstring): plain unless its weights are float32 on
    the CPU; the environment's choice, or what this machine measures (plain for LMs narrower than ``MIN_WIDTH``)."""
    choice = os.environ.get(ENV, "auto").strip().lower()
    if choice not in ("auto", *ROUTES):
        raise ValueError(f"{ENV} must be auto, {', '.join(ROUTES)}, got {choice!r}")
    head = lm.get_output_embeddings()
    weight = head.weight if head is not None else None
    if choice == "plain" or weight is None or not _plain_float32_cpu(weight):
        return PLAIN
    if choice == "onednn" and not onednn_works():
        raise ValueError(f"{ENV}=onednn, but this PyTorch build has no oneDNN inner product")
    if choice != "auto":
        return Routes(choice, choice)
    if weight.shape[1] < MIN_WIDTH:
        return PLAIN
    many = "transposed" if transposed_pays() else "plain"
    return Routes("onednn" if onednn_pays(many) else many, many)


def linear_mode(routes: Routes) -> contextlib.AbstractContextManager:
    """A fresh ``CpuLinear`` where ``routes`` reroute anything, else a context that does nothing."""
    return contextlib.nullcontext() if routes.plain else CpuLinear(routes)
