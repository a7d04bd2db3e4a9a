"""``cpu_linear``: float32 linear layers as (W · xᵀ)ᵀ, against ``torch.nn.functional.linear`` (the plain path)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from blipdemo import cpu_linear
from blipdemo.cpu_linear import TransposedLinear


@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (2, 5, 64), (4, 1, 64), (64,)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_transposed_product_equals_f_linear(shape, bias):
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=bias)
    x = torch.randn(shape, generator=gen)
    expected = F.linear(x, layer.weight, layer.bias)
    with TransposedLinear():
        got = layer(x)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_it_reroutes_float32_and_leaves_other_dtypes_and_threads_alone(monkeypatch):
    seen = []
    original = torch.matmul

    def spy(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", spy)
    weight = torch.randn(8, 16)
    with TransposedLinear():
        F.linear(torch.randn(2, 16), weight)  # rerouted: one matmul
        assert len(seen) == 1
        F.linear(torch.randn(2, 16, dtype=torch.bfloat16), weight.bfloat16())  # bfloat16: the plain path
        assert len(seen) == 1
        other = threading.Thread(target=lambda: F.linear(torch.randn(2, 16), weight), name="other")
        other.start()
        other.join()  # modes are per thread: the other thread's linear took the plain path
        assert seen == ["MainThread"]
    F.linear(torch.randn(2, 16), weight)  # outside the mode: plain
    assert seen == ["MainThread"]


def test_the_choice_follows_the_environment_and_only_float32_cpu_lms(monkeypatch):
    lm = torch.nn.Module()
    head = torch.nn.Linear(4, 4)
    lm.get_output_embeddings = lambda: head
    monkeypatch.setenv(cpu_linear.ENV, "transposed")
    assert cpu_linear.uses_transposed(lm)
    monkeypatch.setenv(cpu_linear.ENV, "plain")
    assert not cpu_linear.uses_transposed(lm)
    monkeypatch.setenv(cpu_linear.ENV, "transposed")
    head.to(torch.bfloat16)
    assert not cpu_linear.uses_transposed(lm)  # bfloat16 goes to oneDNN: never rerouted
    monkeypatch.setenv(cpu_linear.ENV, "fastest")
    with pytest.raises(ValueError, match="BLIPDEMO_CPU_LINEAR"):
        cpu_linear.uses_transposed(lm)
