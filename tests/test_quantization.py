"""bitsandbytes 8-bit / 4-bit LMs on CPU: LM linears are bnb layers, our modules keep the float dtype."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from transformers import (
    BitsAndBytesConfig,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
)

import blipdemo

PROMPT = "What color is the circle?"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("blip2", "t5")])
def test_quantized_lm(checkpoint_dir, images, bits, family, lm):
    # bitsandbytes' CPU 4-bit kernel packs output features in blocks of 32: widths as real LMs have them.
    folder = checkpoint_dir(family, lm, lm_width=64)
    vlm = blipdemo.load(folder, dtype="bfloat16", device="cpu", load_in_8bit=bits == 8, load_in_4bit=bits == 4)
    layer = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    quantized = [m for m in vlm.language_model.modules() if isinstance(m, layer)]
    assert quantized, "the LM's linear layers should be bitsandbytes layers"
    assert not any(isinstance(m, layer) for m in vlm.vision_model.modules())
    assert vlm.vision_model.encoder.layers[0].self_attn.qkv.weight.dtype == torch.bfloat16
    assert vlm.qformer.encoder.layer[0].attention.attention.query.weight.dtype == torch.bfloat16
    assert vlm.load_info["quantization"] == f"{bits}-bit"
    answer = vlm.ask(images[0], PROMPT, max_new_tokens=6, num_beams=1)
    assert isinstance(answer, str)
    # Same bitsandbytes kernels as transformers' own quantized reference: the logits must agree closely.
    cls = InstructBlipForConditionalGeneration if family == "instructblip" else Blip2ForConditionalGeneration
    proc = (InstructBlipProcessor if family == "instructblip" else Blip2Processor).from_pretrained(folder)
    ref = cls.from_pretrained(
        folder,
        dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(
            load_in_8bit=bits == 8,
            load_in_4bit=bits == 4,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            # like ours: only the LM is quantized; vision encoder, Q-Former and projection stay bfloat16
            llm_int8_skip_modules=["vision_model", "qformer", "language_projection", "lm_head"],
        ),
    ).eval()
    text = PROMPT if family == "instructblip" else f"Question: {PROMPT} Answer:"
    inputs = proc(images=images[0], text=text, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    q = vlm.config.num_query_tokens
    kw = {} if not vlm.is_encoder_decoder else {"decoder_input_ids": torch.tensor([[0, 3]])}
    with torch.no_grad():
        expected = ref(**inputs, **kw).logits[0, -1].float()
        ours = (
            vlm(
                pixel_values=inputs["pixel_values"],
                input_ids=inputs["input_ids"][:, q:],
                qformer_input_ids=inputs.get("qformer_input_ids"),
                **kw,
            )
            .logits[0, -1]
            .float()
        )
    corr = torch.corrcoef(torch.stack([expected, ours]))[0, 1].item()
    assert corr > 0.99, f"{bits}-bit: ours vs transformers' {bits}-bit reference, corr {corr:.4f}"


def test_8bit_lm_memory_smaller(checkpoint_dir):
    folder = checkpoint_dir("instructblip", "llama")
    full = blipdemo.load(folder, dtype="bfloat16").language_model.get_memory_footprint()
    int8 = blipdemo.load(folder, dtype="bfloat16", load_in_8bit=True).language_model.get_memory_footprint()
    assert int8 < full
