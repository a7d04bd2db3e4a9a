"""``cpu_linear``: float32 linear layers as (W · xᵀ)ᵀ and through oneDNN, against ``torch.nn.functional.linear``."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from blipdemo import cpu_linear
from blipdemo.cpu_linear import FEW_ROWS, CpuLinear, Routes

needs_onednn = pytest.mark.skipif(not cpu_linear.onednn_works(), reason="this PyTorch build has no oneDNN")


@pytest.mark.parametrize("route", ["transposed", pytest.param("onednn", marks=needs_onednn)])
@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (2, 5, 64), (4, 1, 64), (64,), (FEW_ROWS + 1, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_each_route_equals_f_linear(route, shape, bias):
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=bias)
    x = torch.randn(shape, generator=gen)
    expected = F.linear(x, layer.weight, layer.bias)
    with CpuLinear(Routes(route, route)):
        got = layer(x)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class _Spy:
    """Counts the calls of each route's product (the GEMMs it hands to torch), by thread."""

    def __init__(self, monkeypatch) -> None:
        self.seen: list[tuple[str, str]] = []
        for name in ("_transposed", "_onednn"):
            original = getattr(cpu_linear, name)

            def spy(*args, _name=name, _original=original):
                self.seen.append((_name.strip("_"), threading.current_thread().name))
                return _original(*args)

            monkeypatch.setattr(cpu_linear, name, spy)


def test_few_rows_and_many_take_their_own_routes(monkeypatch):
    spy = _Spy(monkeypatch)
    weight = torch.randn(8, 16)
    with CpuLinear(Routes(few="onednn", many="transposed")):
        F.linear(torch.randn(FEW_ROWS, 16), weight)  # a decode step's rows
        F.linear(torch.randn(2, FEW_ROWS, 16), weight)  # a prefill's
    assert [route for route, _ in spy.seen] == ["onednn", "transposed"]
    spy.seen.clear()
    with CpuLinear(Routes(few="transposed", many="plain")):
        F.linear(torch.randn(3, 16), weight)
        F.linear(torch.randn(FEW_ROWS + 1, 16), weight)  # plain: no route's product
    assert [route for route, _ in spy.seen] == ["transposed"]


@pytest.mark.parametrize("route", ["transposed", pytest.param("onednn", marks=needs_onednn)])
def test_it_reroutes_float32_and_leaves_other_dtypes_and_threads_alone(route, monkeypatch):
    spy = _Spy(monkeypatch)
    weight = torch.randn(8, 16)
    with CpuLinear(Routes(route, route)):
        F.linear(torch.randn(2, 16), weight)  # rerouted
        assert spy.seen == [(route, "MainThread")]
        F.linear(torch.randn(2, 16, dtype=torch.bfloat16), weight.bfloat16())  # bfloat16: the plain path
        other = threading.Thread(target=lambda: F.linear(torch.randn(2, 16), weight), name="other")
        other.start()
        other.join()  # modes are per thread: the other thread's linear took the plain path
        assert spy.seen == [(route, "MainThread")]
    F.linear(torch.randn(2, 16), weight)  # outside the mode: plain
    assert spy.seen == [(route, "MainThread")]


def test_the_choice_follows_the_environment_and_only_float32_cpu_lms(monkeypatch):
    lm = torch.nn.Module()
    head = torch.nn.Linear(4, 4)
    lm.get_output_embeddings = lambda: head
    monkeypatch.setenv(cpu_linear.ENV, "transposed")
    assert cpu_linear.routes_for(lm) == Routes("transposed", "transposed")
    monkeypatch.setenv(cpu_linear.ENV, "plain")
    assert cpu_linear.routes_for(lm).plain
    monkeypatch.setenv(cpu_linear.ENV, "auto")
    assert cpu_linear.routes_for(lm).plain  # 4 wide: the mode's dispatch would cost more than it saves
    wide = torch.nn.Linear(cpu_linear.MIN_WIDTH, 4)
    lm.get_output_embeddings = lambda: wide
    measured = cpu_linear.routes_for(lm)
    assert measured.many in ("plain", "transposed") and measured.few in (measured.many, "onednn")
    lm.get_output_embeddings = lambda: head
    monkeypatch.setenv(cpu_linear.ENV, "transposed")
    head.to(torch.bfloat16)
    assert cpu_linear.routes_for(lm).plain  # bfloat16 goes to oneDNN already: never rerouted
    monkeypatch.setenv(cpu_linear.ENV, "fastest")
    with pytest.raises(ValueError, match="BLIPDEMO_CPU_LINEAR"):
        cpu_linear.routes_for(lm)
    with pytest.raises(ValueError, match="route"):
        Routes("fast", "plain")


def test_the_mode_does_nothing_where_every_route_is_plain():
    assert not isinstance(cpu_linear.linear_mode(Routes()), CpuLinear)
    assert isinstance(cpu_linear.linear_mode(Routes("onednn", "plain")), CpuLinear)
