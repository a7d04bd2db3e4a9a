"""bitsandbytes 8-bit / 4-bit LMs on CPU, chosen with ``quantization="bitsandbytes"`` (the CPU default is PyTorch's own
kernels: tests/test_cpu_quantization.py): LM linears are bnb layers, our modules keep the float dtype."""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import pytest
import torch
from checkpoints import make_checkpoint
from safetensors import safe_open
from transformers import (
    BitsAndBytesConfig,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
)

import blipdemo
from blipdemo.loading import cpu_4bit_misfits

PROMPT = "What color is the circle?"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("blip2", "t5")])
def test_quantized_lm(checkpoint_dir, images, bits, family, lm):
    # bitsandbytes' CPU 4-bit kernel packs output features in blocks of 32: widths as real LMs have them.
    folder = checkpoint_dir(family, lm, lm_width=64)
    vlm = blipdemo.load(
        folder,
        dtype="bfloat16",
        device="cpu",
        load_in_8bit=bits == 8,
        load_in_4bit=bits == 4,
        quantization="bitsandbytes",
    )
    layer = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    quantized = [m for m in vlm.language_model.modules() if isinstance(m, layer)]
    assert quantized, "the LM's linear layers should be bitsandbytes layers"
    assert not any(isinstance(m, layer) for m in vlm.model.vision_model.modules())
    assert vlm.model.vision_model.encoder.layers[0].self_attn.qkv.weight.dtype == torch.bfloat16
    assert vlm.model.qformer.encoder.layer[0].attention.attention.query.weight.dtype == torch.bfloat16
    assert vlm.load_info["quantization"] == f"{bits}-bit"
    assert vlm.load_info["quantization_backend"] == "bitsandbytes"
    assert vlm.load_info["unquantized"] == []  # every width fits bitsandbytes' kernels: nothing kept in float
    if bits == 4:
        kept = [n for n, m in vlm.language_model.named_modules() if type(m) is torch.nn.Linear]
        assert all(n == "lm_head" or n.endswith(".wo") for n in kept), kept  # transformers' own float modules
    assert vlm.ask(images[0], PROMPT, max_new_tokens=6, num_beams=1)
    # Same bitsandbytes kernels as transformers' own quantized reference: the logits must agree closely.
    corr = _correlation_with(vlm, _transformers_quantized(folder, bits), _reference_inputs(folder, images[0]))
    assert corr > 0.99, f"{bits}-bit: ours vs transformers' {bits}-bit reference, corr {corr:.4f}"


@pytest.mark.parametrize("quantization", [None, "bitsandbytes"])
def test_8bit_lm_memory_smaller(checkpoint_dir, quantization):
    folder = checkpoint_dir("instructblip", "llama")
    full = blipdemo.load(folder, dtype="bfloat16").language_model.get_memory_footprint()
    vlm = blipdemo.load(folder, dtype="bfloat16", load_in_8bit=True, quantization=quantization)
    assert vlm.language_model.get_memory_footprint() < full


# bitsandbytes' packed CPU 4-bit kernel (used on AVX512-BF16 CPUs) runs a layer only when out_features % 32 == 0
# and in_features % 64 == 0, and fails at the layer's first forward otherwise. A 192-wide LLaMA with 8 heads of 24
# and one key/value head has k_proj / v_proj only 24 wide; everything else (192, 384) fits.
# Both of bitsandbytes' CPU paths are tested: the packed kernel where the CPU has it (``packed_cpu_kernel``), and the
# dequantizing fallback on every machine (``dequantizing_4bit``: the real path on CPUs without AVX512-BF16, forced
# on those with it). Each test checks which path its layers took, so neither can pass on the other path.
NARROW_KV = {"num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 24}
NARROW_KV_LAYERS = [f"language_model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj")]
packed_cpu_kernel = pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes runs 4-bit through its packed kernel on AVX512-BF16 CPUs"
)


@pytest.fixture
def dequantizing_4bit(monkeypatch):
    """bitsandbytes as on a CPU without AVX512-BF16 for the 4-bit layers built in this test: they dequantize and take
    any width. ``Linear4bit`` reads the capability once, when built (``support_avx512bf16_for_cpu``); our loader
    reads it through ``bitsandbytes.functional``."""
    monkeypatch.setattr(bnb.functional, "has_avx512bf16", lambda: False)
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)


@pytest.fixture(scope="module")
def narrow_kv(tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("narrow-kv"), "instructblip", "llama", lm_width=192, lm_config=NARROW_KV
    )


@pytest.fixture(scope="module")
def narrow_t5(tmp_path_factory):
    """T5 with 4 heads of 10: q/k/v are 40 wide (out) and o reads 40 (in), in the encoder's self-attention and the
    decoder's self- and cross-attention; the feed-forward (64 → 128 → 64) fits, and "wo" stays float anyway."""
    return make_checkpoint(tmp_path_factory.mktemp("t5-narrow"), "blip2", "t5", lm_width=64, lm_config={"d_kv": 10})


NARROW_T5_LAYERS = [
    f"language_model.{a}.{p}"
    for a in [f"encoder.block.{i}.layer.0.SelfAttention" for i in range(2)]
    + [
        f"decoder.block.{i}.layer.{j}.{kind}"
        for i in range(2)
        for j, kind in ((0, "SelfAttention"), (1, "EncDecAttention"))
    ]
    for p in "qkvo"
]


def _lm_linears(vlm) -> dict[str, torch.nn.Module]:
    return {
        f"language_model.{name}": m
        for name, m in vlm.language_model.named_modules()
        if isinstance(m, torch.nn.Linear | bnb.nn.Linear4bit)
    }


def _transformers_quantized(folder, bits: int = 4, keep=(), **kwargs):
    """transformers' own bitsandbytes model of ``folder`` (8-bit, or NF4 with bfloat16 compute), only the LM
    quantized as ours is, the LM layers matching ``keep`` left in bfloat16; ``kwargs`` to ``from_pretrained``
    (``device_map``)."""
    instruct = '"instructblip"' in (folder / "config.json").read_text()
    cls = InstructBlipForConditionalGeneration if instruct else Blip2ForConditionalGeneration
    config = BitsAndBytesConfig(
        load_in_8bit=bits == 8,
        load_in_4bit=bits == 4,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        # like ours: only the LM is quantized; vision encoder, Q-Former and projection stay bfloat16
        llm_int8_skip_modules=["vision_model", "qformer", "language_projection", "lm_head", *keep],
    )
    return cls.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=config, **kwargs).eval()


def _reference_inputs(folder, image) -> dict:
    """The processor's inputs for PROMPT in the family's template (T5: two decoder positions), pixels in bfloat16."""
    instruct = '"instructblip"' in (folder / "config.json").read_text()
    proc = (InstructBlipProcessor if instruct else Blip2Processor).from_pretrained(folder)
    inputs = proc(images=image, text=PROMPT if instruct else f"Question: {PROMPT} Answer:", return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    if '"t5"' in (folder / "config.json").read_text():
        inputs["decoder_input_ids"] = torch.tensor([[0, 3]])
    return dict(inputs)


def _correlation_with(vlm, ref, inputs: dict) -> float:
    """Correlation of the last position's logits, ours against ``ref`` on the same ``inputs``."""
    q = vlm.config.num_query_tokens
    with torch.no_grad():
        expected = ref(**inputs).logits[0, -1].float()
        ours = vlm(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"][:, q:],  # ours takes the prompt without the <image> placeholders
            qformer_input_ids=inputs.get("qformer_input_ids"),
            decoder_input_ids=inputs.get("decoder_input_ids"),
        ).logits[0, -1]
    return torch.corrcoef(torch.stack([expected, ours.float()]))[0, 1].item()


def _packed(layers) -> list[bool]:
    """Per bitsandbytes 4-bit layer: whether its weight is in the packed kernel's layout (it ran that kernel)."""
    return [bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers]


@packed_cpu_kernel
def test_4bit_cpu_keeps_the_layers_the_kernel_cannot_run(narrow_kv, images, caplog):
    folder = narrow_kv
    inputs = _reference_inputs(folder, images[0])

    # The failure itself, in transformers' own 4-bit model: the first forward through k_proj.
    with pytest.raises(AssertionError, match="N must be divisible by block_n"), torch.no_grad():
        _transformers_quantized(folder)(**inputs)

    with caplog.at_level(logging.WARNING, logger="blipdemo.loading"):
        vlm = blipdemo.load(folder, dtype="bfloat16", device="cpu", load_in_4bit=True, quantization="bitsandbytes")
    assert sorted(vlm.load_info["unquantized"]) == sorted(NARROW_KV_LAYERS)
    assert all(name in caplog.text for name in NARROW_KV_LAYERS), caplog.text
    linears = _lm_linears(vlm)
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        for name in NARROW_KV_LAYERS:  # kept: plain float layers holding the checkpoint's own weights
            assert type(linears[name]) is torch.nn.Linear
            assert torch.equal(linears[name].weight, f.get_tensor(name + ".weight").to(torch.bfloat16))
    quantized = [n for n, m in linears.items() if isinstance(m, bnb.nn.Linear4bit)]
    assert sorted(quantized) == sorted(set(linears) - {*NARROW_KV_LAYERS, "language_model.lm_head"})
    assert len(quantized) == 2 * 5  # q_proj, o_proj, gate_proj, up_proj, down_proj in both layers
    assert type(linears["language_model.lm_head"]) is torch.nn.Linear  # transformers' own default, still kept

    vlm.ask(images[0], PROMPT, max_new_tokens=6, num_beams=1)  # used to raise the AssertionError
    assert all(_packed(linears[n] for n in quantized)), "every 4-bit layer ran the packed kernel"
    # transformers' 4-bit model with the same layers kept in bfloat16 agrees with ours.
    corr = _correlation_with(
        vlm, _transformers_quantized(folder, keep=["self_attn.k_proj", "self_attn.v_proj"]), inputs
    )
    assert corr > 0.99, f"ours vs transformers' 4-bit reference with the same layers kept: corr {corr:.4f}"


@packed_cpu_kernel
def test_4bit_cpu_t5_attention_widths(narrow_t5, images):
    vlm = blipdemo.load(narrow_t5, dtype="bfloat16", device="cpu", load_in_4bit=True, quantization="bitsandbytes")
    assert sorted(vlm.load_info["unquantized"]) == sorted(NARROW_T5_LAYERS)
    linears = _lm_linears(vlm)
    assert all(type(linears[name]) is torch.nn.Linear for name in NARROW_T5_LAYERS)
    quantized = [m for m in linears.values() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 4 * 2  # wi_0, wi_1 of 4 blocks
    vlm.ask(images[0], PROMPT, max_new_tokens=6, num_beams=1)
    assert all(_packed(quantized)), "every 4-bit layer ran the packed kernel"
    keep = [r".*\.SelfAttention", r".*\.EncDecAttention"]  # regexes: transformers matches from the start or a suffix
    corr = _correlation_with(
        vlm, _transformers_quantized(narrow_t5, keep=keep), _reference_inputs(narrow_t5, images[0])
    )
    assert corr > 0.99, f"ours vs transformers' 4-bit reference with the same layers kept: corr {corr:.4f}"


@pytest.mark.parametrize("checkpoint", ["narrow_kv", "narrow_t5"])
def test_4bit_keeps_nothing_where_the_packed_kernel_is_not_used(request, checkpoint, images, dequantizing_4bit):
    """The dequantizing path takes any width: every LM linear is 4-bit (the narrow ones too), it runs, and agrees
    with transformers' own 4-bit model on the same path — which runs these widths too (the kernel path cannot)."""
    folder = request.getfixturevalue(checkpoint)
    vlm = blipdemo.load(folder, dtype="bfloat16", device="cpu", load_in_4bit=True, quantization="bitsandbytes")
    assert vlm.load_info["unquantized"] == []
    linears = _lm_linears(vlm)
    quantized = [m for n, m in linears.items() if isinstance(m, bnb.nn.Linear4bit)]
    floats = {n for n, m in linears.items() if type(m) is torch.nn.Linear}
    assert all(n == "language_model.lm_head" or n.endswith(".wo") for n in floats), floats  # transformers' own
    narrow = NARROW_KV_LAYERS if checkpoint == "narrow_kv" else NARROW_T5_LAYERS
    assert all(isinstance(linears[n], bnb.nn.Linear4bit) for n in narrow)
    assert vlm.ask(images[0], PROMPT, max_new_tokens=6, num_beams=1)
    assert not any(_packed(quantized)), "no 4-bit layer may have taken the packed kernel"
    corr = _correlation_with(vlm, _transformers_quantized(folder), _reference_inputs(folder, images[0]))
    assert corr > 0.99, f"ours vs transformers' 4-bit reference, both dequantizing: corr {corr:.4f}"


@pytest.mark.parametrize("kernel", [True, False])
def test_4bit_misfits_only_on_cpu_and_only_with_the_packed_kernel(narrow_kv, monkeypatch, kernel):
    """The plan alone (no layer is built or run, so the kernel's presence can be pretended on any CPU)."""
    monkeypatch.setattr(bnb.functional, "has_avx512bf16", lambda: kernel)
    config = blipdemo.loading.read_config(narrow_kv)
    on_cpu = ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    split = {"model.embed_tokens": 0, "model.layers.0": "cpu", "model.layers.1": 0, "model.norm": 0, "lm_head": 0}
    assert cpu_4bit_misfits(config, {"": 0}) == []
    assert cpu_4bit_misfits(config, {"": "cuda:1"}) == []
    assert cpu_4bit_misfits(config, split) == (on_cpu if kernel else [])
    everything = [n.removeprefix("language_model.") for n in NARROW_KV_LAYERS]
    assert cpu_4bit_misfits(config, {"": "cpu"}) == (everything if kernel else [])
