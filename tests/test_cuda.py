"""The same checks on a CUDA GPU, where there is one (the whole module is skipped otherwise): our answers and logits
against transformers' reference, bitsandbytes' 8-bit and 4-bit LMs (the CUDA default) against transformers' own
quantized model, relevancy through an 8-bit LM, and an LM split between the GPU and the CPU by a device map.

The references are the other test modules' (test_parity, test_quantization); only the device changes. float32 here
means float32: TF32 is switched off for this module (cuDNN's convolutions, the patch embedding, default to it).
"""

from __future__ import annotations

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from conftest import COMBOS
from reference import reference_answer
from test_parity import PROMPTS, _our_logits, _reference_logits, assert_greedy_answers_equal_reference
from test_quantization import PROMPT, _correlation_with, _reference_inputs, _transformers_quantized
from transformers import AutoConfig

import blipdemo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"


@pytest.fixture(scope="module", autouse=True)
def _exact_float32():
    """No TF32 while this module runs (cuDNN allows it by default, matmuls may be set to): float32 stays float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _on(device: str, batch) -> dict:
    """A processor's output (or a dict of tensors) with every tensor on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(batch).items()}


@pytest.mark.parametrize("family,lm", COMBOS)
def test_cuda_logits_and_answers_equal_reference(checkpoint_dir, images, family, lm):
    """Ours on the GPU in float32 against transformers' reference on the CPU: logits as test_parity's tolerance,
    greedy answers for every image and prompt, and a beam search with penalties."""
    folder = checkpoint_dir(family, lm)
    vlm = blipdemo.load(folder, dtype="float32", device=CUDA)
    assert vlm.model.vision_model.encoder.layers[0].mlp.fc1.weight.device.type == "cuda"
    assert next(vlm.language_model.parameters()).device.type == "cuda"
    for image, prompt in zip(images, PROMPTS, strict=True):
        ref, inputs, kwargs = _reference_logits(folder, image, prompt)
        ours = _our_logits(vlm, _on(CUDA, inputs), _on(CUDA, kwargs)).cpu()
        assert ours.shape == ref.shape
        diff = (ours - ref).abs().max().item()
        assert diff < 1e-4, f"max |ours on CUDA - reference| = {diff:.2e} ({family}+{lm}, {prompt!r})"
    assert_greedy_answers_equal_reference(vlm, folder, images)
    beam = dict(max_new_tokens=10, num_beams=3, repetition_penalty=1.5, length_penalty=0.8, min_new_tokens=4)
    assert vlm.ask(images[0], PROMPTS[1], **beam) == reference_answer(folder, images[0], PROMPTS[1], **beam)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("blip2", "t5")])
def test_cuda_bitsandbytes_lm_agrees_with_transformers_quantized_model(checkpoint_dir, images, bits, family, lm):
    """On CUDA ``load_in_8bit`` / ``load_in_4bit`` mean bitsandbytes (no ``quantization`` argument): its layers on the
    GPU, our vision encoder and Q-Former in bfloat16, and the logits of transformers' own quantized model."""
    folder = checkpoint_dir(family, lm, lm_width=64)
    vlm = blipdemo.load(folder, dtype="bfloat16", device=CUDA, load_in_8bit=bits == 8, load_in_4bit=bits == 4)
    assert vlm.load_info["quantization_backend"] == "bitsandbytes"
    layer = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    quantized = [m for m in vlm.language_model.modules() if isinstance(m, layer)]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
    assert vlm.model.qformer.encoder.layer[0].attention.attention.query.weight.dtype == torch.bfloat16
    assert vlm.ask(images[0], PROMPT, max_new_tokens=6, num_beams=1)
    ref = _transformers_quantized(folder, bits, device_map={"": 0})
    corr = _correlation_with(vlm, ref, _on(CUDA, _reference_inputs(folder, images[0])))
    assert corr > 0.99, f"{bits}-bit on CUDA: ours vs transformers' {bits}-bit model, corr {corr:.4f}"


def test_cuda_relevancy_through_an_8bit_lm(checkpoint_dir, images):
    """bitsandbytes' CUDA int8 matmul passes gradients to its inputs: relevancy maps, and the tokens' weights differ
    (flat maps would mean no gradient came through)."""
    folder = checkpoint_dir("instructblip", "llama", lm_width=64)
    vlm8 = blipdemo.load(folder, dtype="bfloat16", device=CUDA, load_in_8bit=True)
    assert vlm8.load_info["quantization_backend"] == "bitsandbytes"
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in vlm8.language_model.modules())
    e = vlm8.explain(images[1], PROMPT, max_new_tokens=4, num_beams=1, method="relevancy")
    assert e.text == vlm8.ask(images[1], PROMPT, max_new_tokens=4, num_beams=1)
    assert abs(e.image_map.sum() - 1) < 1e-9 and np.isfinite(e.token_maps).all()
    assert len({row.tobytes() for row in e.query_weights}) > 1, "the tokens' weights differ: gradients came through"


def _gpu_and_cpu(folder) -> dict:
    """Our vision encoder, Q-Former and the LM's first half on GPU 0; its second half, norm and head on the CPU."""
    layers = AutoConfig.from_pretrained(folder).text_config.num_hidden_layers
    return {
        "vision_model": 0,
        "language_model.model.embed_tokens": 0,
        "language_model.model.rotary_emb": 0,
        **{f"language_model.model.layers.{i}": 0 if i < layers // 2 else "cpu" for i in range(layers)},
        "language_model.model.norm": "cpu",
        "language_model.lm_head": "cpu",
    }


def test_cuda_device_map_split_between_gpu_and_cpu_answers_as_the_cpu_model(checkpoint_dir, images):
    """accelerate moves the activations across at the split: the same greedy and beam answers, and the same stream,
    as the float32 model wholly on the CPU."""
    folder = checkpoint_dir("instructblip", "llama")
    plain = blipdemo.load(folder, dtype="float32", device="cpu")
    split = blipdemo.load(folder, dtype="float32", device_map=_gpu_and_cpu(folder))
    assert split.model.qformer.encoder.layer[0].attention.attention.query.weight.device.type == "cuda"
    lm = split.language_model.model
    assert (
        lm.layers[0].mlp.up_proj.weight.device.type == "cuda" and lm.layers[-1].mlp.up_proj.weight.device.type == "cpu"
    )
    for image in images:
        for options in ({"num_beams": 1}, {"num_beams": 3}):
            expected = plain.ask(image, "Describe the image.", max_new_tokens=8, **options)
            assert split.ask(image, "Describe the image.", max_new_tokens=8, **options) == expected
    streamed = "".join(split.stream(images[0], "Describe the image.", max_new_tokens=8, num_beams=1))
    assert streamed == plain.ask(images[0], "Describe the image.", max_new_tokens=8, num_beams=1)
