"""8-bit / 4-bit on a CPU through PyTorch's own weight-only kernels (blipdemo.loading.cpu_quant).

Each layer is checked against F.linear on a weight quantized and dequantized here, from the scheme's definition
(symmetric per-channel int8; min/max int4 groups), never against numbers the layer's own code produced.
"""

from __future__ import annotations

import logging
import random

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F

import blipdemo
from blipdemo.loading import Int4Linear, Int8Linear, cpu_quant
from blipdemo.tiny import scenes
from blipdemo.tiny.evaluate import DECODING, fresh_scene, question_for

EMBEDDED = "assets/shapes-instructblip"
PROMPT = "What color is the circle?"
# The kernels take bfloat16 activations and round their float32 sums to bfloat16: a relative error of 2**-8 of the
# output's scale; the reference sees the same bfloat16 activations. 4 × that leaves room for summation order.
TOLERANCE = 4 * 2**-8


def _reference_int8(w: torch.Tensor) -> torch.Tensor:
    scale = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).float()  # one bfloat16 scale per output channel
    return torch.clamp(torch.round(w / scale[:, None]), -127, 127) * scale[:, None]


def _reference_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((high - low) / 15).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()  # the value of level 8
    levels = torch.clamp(torch.round((g - zero) / scale + 8), 0, 15)
    return ((levels - 8) * scale + zero).reshape(n, k)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.float() - want.float()).abs().max().item()
    scale = want.abs().max().item()
    assert err <= TOLERANCE * scale, f"max error {err:.3g} > {TOLERANCE:.3g} × {scale:.3g}"


@pytest.mark.parametrize(
    "kind,n,k,group",
    [("int8", 96, 64, None), ("int8", 601, 192, None), ("int4", 128, 256, 64), ("int4", 80, 192, 32)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_f_linear_on_the_dequantized_weight(kind, n, k, group, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n).to(dtype)
    w = linear.weight.detach().float()
    if kind == "int8":
        layer, w_hat = Int8Linear.from_linear(linear), _reference_int8(w)
        step = w.abs().amax(1, keepdim=True) / 127  # half a step is the rounding's worst case
    else:
        layer, w_hat = Int4Linear.from_linear(linear, group), _reference_int4(w, group)
        g = w.reshape(n, k // group, group)
        step = ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15).expand_as(g).reshape(n, k)
    assert ((w_hat - w).abs() <= 0.51 * step + 1e-3 * w.abs().max()).all()  # + bfloat16 scale rounding
    torch.testing.assert_close(layer.dequantize(), w_hat, rtol=0, atol=1e-6)
    x = torch.randn(2, 5, k, dtype=dtype)  # (batch, tokens, K): any leading shape
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 5, n) and y.dtype == dtype
    _close(y, F.linear(x.to(torch.bfloat16).float(), w_hat, linear.bias.float()))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_gradients_reach_the_inputs(kind):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    layer = Int8Linear.from_linear(linear) if kind == "int8" else Int4Linear.from_linear(linear, 32)
    w_hat = _reference_int8(linear.weight.detach()) if kind == "int8" else _reference_int4(linear.weight.detach(), 32)
    x = torch.randn(3, 128, requires_grad=True)
    upstream = torch.randn(3, 64)
    (layer(x) * upstream).sum().backward()
    _close(x.grad, upstream @ w_hat)


def test_widths_the_kernels_cannot_run_are_never_given_to_them():
    # _weight_int8pack_mm (torch 2.13, AVX512) crashes or is wrong for K % 16; int4 packing needs N % 16.
    assert not cpu_quant.int8_fits(40, 64) and cpu_quant.int8_fits(48, 7)
    assert cpu_quant.int4_group(192, 64, 128) == 64  # 192 = 3 × 64: the largest group that divides K
    assert cpu_quant.int4_group(96, 64, 64) == 32
    assert cpu_quant.int4_group(256, 24, 64) is None and cpu_quant.int4_group(48, 64, 64) is None
    linears = {"a": torch.nn.Linear(40, 64), "b": torch.nn.Linear(64, 24), "c": torch.nn.Linear(64, 64)}
    model = torch.nn.ModuleDict(linears)
    assert cpu_quant.quantize_linears(model, 4) == {"a": "float", "b": "int8", "c": "int4"}
    assert type(model["a"]) is torch.nn.Linear and isinstance(model["b"], Int8Linear)


def test_a_kernel_that_answers_wrong_at_load_keeps_the_layer_float(monkeypatch):
    monkeypatch.setattr(Int8Linear, "_matmul", lambda self, x: torch.zeros(len(x), self.out_features, dtype=x.dtype))
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(64, 32)})
    assert cpu_quant.quantize_linears(model, 8) == {"a": "float"}
    assert type(model["a"]) is torch.nn.Linear


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene_questions():
    """12 fresh scene questions (evaluate()'s draw, another seed): (image, question, history, answer)."""
    rng = random.Random(7)
    out = []
    for row in ("color", "shape", "count", "where", "exists", "relation") * 2:
        scene = fresh_scene(row, rng)
        image = scenes.degrade(scenes.render(scene, rng), rng)
        d = question_for(scene, row, rng)
        out.append((image, d.question, d.history, d.answer))
    return out


@pytest.fixture(scope="module")
def float_answers(scene_questions):
    vlm = blipdemo.load(EMBEDDED, dtype="float32", device="cpu")
    return [vlm.ask(img, q, history=h, **DECODING) for img, q, h, _ in scene_questions]


@pytest.mark.parametrize("bits", [8, 4])
def test_embedded_model_in_int8_and_int4_answers_scene_questions(bits, scene_questions, float_answers):
    vlm = blipdemo.load(EMBEDDED, device="cpu", load_in_8bit=bits == 8, load_in_4bit=bits == 4)
    assert vlm.load_info["quantization"] == f"{bits}-bit" and vlm.load_info["quantization_backend"] == "torch"
    assert vlm.load_info["unquantized"] == []
    kinds = {type(m) for m in vlm.language_model.modules()}
    assert torch.nn.Linear not in kinds  # every LM linear layer quantized (lm_head int8 also in 4-bit)
    assert (Int4Linear if bits == 4 else Int8Linear) in kinds
    assert type(vlm.model.vision_model.encoder.layers[0].self_attn.qkv) is torch.nn.Linear  # ours: untouched
    answers = [vlm.ask(img, q, history=h, **DECODING) for img, q, h, _ in scene_questions]
    truth = [scenes.normalize_answer(a) for *_, a in scene_questions]
    right = [scenes.normalize_answer(a) == t for a, t in zip(answers, truth, strict=True)]
    float_right = [scenes.normalize_answer(a) == t for a, t in zip(float_answers, truth, strict=True)]
    assert sum(right) >= sum(float_right) - 1, (answers, float_answers, truth)
    assert sum(a == b for a, b in zip(answers, float_answers, strict=True)) >= len(answers) - 1


def test_int4_lm_explains_with_relevancy(checkpoint_dir, images):
    """The int4 layers pass gradients (bitsandbytes' CPU 4-bit does not): relevancy maps work on a 4-bit LM."""
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama", lm_width=64), dtype="bfloat16", load_in_4bit=True)
    assert any(isinstance(m, Int4Linear) for m in vlm.language_model.modules())
    e = vlm.explain(images[1], PROMPT, max_new_tokens=4, num_beams=1, method="relevancy")
    assert len({row.tobytes() for row in e.query_weights}) > 1, "the tokens' weights differ: gradients came through"


def test_narrow_layers_stay_float_with_one_log_line(checkpoint_dir, images, caplog):
    # LLaMA 40 wide: every layer reading 40 columns (K % 16 != 0) stays float; only down_proj (reads 80) is int8.
    folder = checkpoint_dir("instructblip", "llama", lm_width=40)
    with caplog.at_level(logging.WARNING, logger="blipdemo.loading"):
        vlm = blipdemo.load(folder, dtype="bfloat16", device="cpu", load_in_8bit=True)
    layers = [f"language_model.model.layers.{i}." for i in range(2)]
    narrow = [p + m for p in layers for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    narrow += [p + m for p in layers for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")]
    narrow = sorted([*narrow, "language_model.lm_head"])
    assert sorted(vlm.load_info["unquantized"]) == narrow
    assert all(isinstance(vlm.language_model.model.layers[i].mlp.down_proj, Int8Linear) for i in range(2))
    lines = [r for r in caplog.records if "cannot run" in r.getMessage()]
    assert len(lines) == 1 and all(name in lines[0].getMessage() for name in narrow)
    assert isinstance(vlm.ask(images[0], PROMPT, max_new_tokens=6, num_beams=1), str)


def test_missing_kernels_fall_back_to_bitsandbytes(checkpoint_dir, images, monkeypatch, caplog):
    from blipdemo.loading import language_model

    monkeypatch.setattr(language_model, "missing_kernels", lambda bits: ["_weight_int8pack_mm"])
    with caplog.at_level(logging.WARNING, logger="blipdemo.loading"):
        vlm = blipdemo.load(checkpoint_dir("instructblip", "llama", lm_width=64), dtype="bfloat16", load_in_8bit=True)
    assert vlm.load_info["quantization_backend"] == "bitsandbytes"
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in vlm.language_model.modules())
    assert "torch.ops.aten._weight_int8pack_mm" in caplog.text and "bitsandbytes" in caplog.text
    assert isinstance(vlm.ask(images[0], PROMPT, max_new_tokens=4, num_beams=1), str)


def test_bad_combinations_are_refused(checkpoint_dir):
    folder = checkpoint_dir("instructblip", "llama")
    with pytest.raises(ValueError, match="one of load_in_8bit and load_in_4bit"):
        blipdemo.load(folder, load_in_8bit=True, load_in_4bit=True)
    gpu_map = {"vision_model": "cpu", "language_model.model": 0, "language_model.lm_head": 0}
    with pytest.raises(ValueError, match="quantization='torch' runs on PyTorch's CPU kernels.*language model"):
        blipdemo.load(folder, load_in_4bit=True, quantization="torch", device_map=gpu_map)
    with pytest.raises(ValueError, match="give load_in_8bit or load_in_4bit"):
        blipdemo.load(folder, quantization="torch")
    with pytest.raises(ValueError, match="quantization must be None, 'torch' or 'bitsandbytes'"):
        blipdemo.load(folder, load_in_8bit=True, quantization="int8")


def test_backend_choice_follows_the_device_map():
    from blipdemo.loading import quantization_backend

    assert quantization_backend(None, 8, {"": "cpu"}) == "torch"
    assert quantization_backend(None, 4, {"model": "cpu", "lm_head": "cpu"}) == "torch"
    assert quantization_backend(None, 8, {"": 0}) == "bitsandbytes"
    assert quantization_backend(None, 8, {"model": "cpu", "lm_head": "disk"}) == "bitsandbytes"
    assert quantization_backend("bitsandbytes", 4, {"": "cpu"}) == "bitsandbytes"
    assert quantization_backend(None, None, {"": "cpu"}) is None
