"""The app bounds PyTorch's per-shape matmul caches (``blipdemo/kernel_caches.py``) before its first matmul, and the
bound holds: new matmul shapes stop adding memory once the caches are full."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import app as app_module
from blipdemo import kernel_caches

ROOT = Path(__file__).resolve().parent.parent
NAMES = (kernel_caches.LRU, kernel_caches.ONEDNN)

# A fresh process: fill the caches with 64 matmul shapes, then its RSS growth (MiB, the C heap trimmed) over 192
# more — (M, 192) @ (192, 512) in bfloat16, a new M each time, as a prefill of a new length is.
GROWTH = textwrap.dedent(
    """
    import ctypes, gc, sys
    import psutil, torch
    from blipdemo import kernel_caches
    if sys.argv[1] == "bounded":
        kernel_caches.bound(16, 16)
    libc = ctypes.CDLL("libc.so.6")
    def rss():
        gc.collect(); libc.malloc_trim(0)
        return psutil.Process().memory_info().rss / 2**20
    layer = torch.nn.Linear(192, 512).to(torch.bfloat16)
    with torch.inference_mode():
        for m in range(1, 65):
            layer(torch.zeros(m, 192, dtype=torch.bfloat16))
        before = rss()
        for m in range(65, 257):
            layer(torch.zeros(m, 192, dtype=torch.bfloat16))
    print(rss() - before)
    """
)


@pytest.fixture
def unset(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)


def test_bound_sets_both_caches_where_the_environment_does_not(unset, monkeypatch):
    assert kernel_caches.bound(32, 128) == {kernel_caches.LRU: "32", kernel_caches.ONEDNN: "128"}
    monkeypatch.setenv(kernel_caches.ONEDNN, "512")  # an operator's own value wins
    monkeypatch.delenv(kernel_caches.LRU)
    assert kernel_caches.bound() == {kernel_caches.LRU: str(kernel_caches.DESCRIPTORS), kernel_caches.ONEDNN: "512"}


@pytest.mark.parametrize("capacity", [0, -1, 1.5, "64"])
def test_bound_refuses_what_is_not_a_positive_count(unset, capacity):
    with pytest.raises(ValueError, match="capacity"):
        kernel_caches.bound(capacity)
    with pytest.raises(ValueError, match="capacity"):
        kernel_caches.bound(primitives=capacity)


def test_app_main_bounds_the_caches_before_the_model_is_built(unset, monkeypatch):
    seen = {}

    def build_demo(args):
        seen.update({name: os.environ.get(name) for name in NAMES})
        raise SystemExit  # the model is not needed: what counts is the order

    monkeypatch.setattr(app_module.allocator, "limit_arenas", lambda *a: True)
    monkeypatch.setattr(app_module.allocator, "keep_trimmed", lambda *a: None)
    monkeypatch.setattr(app_module, "build_demo", build_demo)
    with pytest.raises(SystemExit):
        app_module.main([])
    assert seen == {kernel_caches.LRU: "16", kernel_caches.ONEDNN: "256"}


def _growth(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in NAMES}
    out = subprocess.run(
        [sys.executable, "-c", GROWTH, mode], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def test_new_shapes_stop_adding_memory_once_the_bounded_caches_are_full():
    unbounded = _growth("unbounded")
    if unbounded < 20:  # ~0.5 MiB a shape where bfloat16 matmuls go to oneDNN (AVX512-BF16 / AMX CPUs)
        pytest.skip(f"bfloat16 matmuls keep no per-shape state here ({unbounded:.1f} MiB over 192 shapes)")
    bounded = _growth("bounded")
    assert bounded < unbounded / 4, (bounded, unbounded)
