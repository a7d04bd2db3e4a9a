"""Speed and memory, side by side with the transformers reference, on a checkpoint at InstructBLIP scale.

    python benchmarks/speed.py                 # CPU, bfloat16
    python benchmarks/speed.py --device cuda   # same script on a GPU (float16/bfloat16)

Builds (once, under --workdir) a random checkpoint in the published layout with the full EVA ViT-g/14
(39 × 1408, 224 px), the full Q-Former (12 × 768, 32 queries) and a LLaMA-7B-shaped LM cut to a few layers
(4096 wide, 32 heads, 11008 MLP, 32001 vocab), then loads it into blipdemo and into transformers'
InstructBlipForConditionalGeneration, same dtype, same image and prompts, greedy decoding of a fixed number
of new tokens (min_new_tokens = max_new_tokens), and prints medians and ratios (ours / reference).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import blipdemo  # noqa: E402
from blipdemo.tiny.tokenizers import lm_tokenizer, wordpiece_tokenizer  # noqa: E402

PROMPTS = [
    "What is unusual about this image?",
    "Describe the image in detail, please.",
    "What color is the object on the left?",
]


# --------------------------------------------------------------------------------------------------
def build_checkpoint(folder: Path, lm_layers: int) -> Path:
    """Random weights at full InstructBLIP scale (LM cut to ``lm_layers``), saved as save_pretrained would."""
    from accelerate import init_empty_weights
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        LlamaConfig,
    )

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [" ".join(PROMPTS) + " a photo of a cat on a mat next to a dog, the man is ironing clothes."] * 50
    tok = lm_tokenizer(corpus, vocab_size=2000, style="llama")
    qtok = wordpiece_tokenizer(sorted({w.strip("?.,").lower() for p in PROMPTS for w in p.split()}))
    image_processor = BlipImageProcessor(size={"height": 224, "width": 224})
    processor = InstructBlipProcessor(image_processor, tok, qtok, num_query_tokens=32)
    tok = processor.tokenizer
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=lm_layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32001,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config = InstructBlipConfig(
        vision_config={},
        qformer_config={"vocab_size": len(qtok)},
        text_config=text.to_dict(),
        num_query_tokens=32,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    with init_empty_weights():
        skeleton = InstructBlipForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, p in skeleton.state_dict().items():
        if name.endswith("position_ids"):
            continue
        if "norm" in name.lower() and name.endswith("weight"):
            state[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            state[name] = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of the best of several large square matmuls: this machine's practical peak for the dtype."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = 0.0
    for n in (1024, 2048, 4096):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best = max(best, 2 * n**3 / median_time(lambda a=a, b=b: (torch.matmul(a, b), sync()), 5))
    return best


def layers_bytes(lm) -> int:
    """Bytes of the decoder layers' weights and buffers (what quantization shrinks; embeddings stay)."""
    layers = lm.get_decoder().layers
    return sum(t.nelement() * t.element_size() for t in [*layers.parameters(), *layers.buffers()])


def vit_flops(cfg, batch: int) -> float:
    """Multiply-adds ×2 of the ViT forward at 224 px (matmuls and attention; elementwise ops ignored)."""
    n = (cfg.image_size // cfg.patch_size) ** 2 + 1
    d, m = cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
    patch = 2 * (n - 1) * 3 * cfg.patch_size**2 * d
    return batch * (cfg.num_hidden_layers * per_layer + patch)


def _fmt(value, unit: str) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.0f}%" if unit == "×peak" else f"{value:.3f} {unit}"


def _fmt(value, unit: str) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.0f}%" if unit == "×peak" else f"{value:.3f} {unit}"


# --------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 (cpu), float16 (cuda)")
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/blipdemo-bench"))
    parser.add_argument("--skip-8bit", action="store_true")
    parser.add_argument("--compile", action="store_true", help="blipdemo.load(..., compile=True)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cpu" else "float16"))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    folder = build_checkpoint(args.workdir / f"instructblip-vitg-llama{args.lm_layers}", args.lm_layers)

    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    other = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    n = args.new_tokens
    greedy = dict(num_beams=1, do_sample=False)

    ours = blipdemo.load(folder, dtype=dtype, device=args.device, compile=args.compile)
    ref = InstructBlipForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    processor = InstructBlipProcessor.from_pretrained(folder)

    def ref_generate(img, prompt, tokens):
        inputs = processor(images=img, text=prompt, return_tensors="pt").to(args.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = ref.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, **greedy)
        sync()
        return out

    def our_generate(img, prompt, tokens):
        ours.generate_ids(img, prompt, max_new_tokens=tokens, min_new_tokens=tokens, **greedy)
        sync()

    # Same answers first: the comparison is only meaningful on identical work.
    ours.clear_cache()
    a = ours.generate_ids(image, PROMPTS[0], max_new_tokens=8, min_new_tokens=8, **greedy).tolist()
    b = ref_generate(image, PROMPTS[0], 8)[0, -8:].tolist()
    print(f"same tokens as the reference: {a == b}")

    rows = []

    def row(name, mine, theirs, unit="s"):
        rows.append((name, mine, theirs, mine / theirs if theirs else float("nan"), unit))

    # First turn (a new image each time): time to first token, and total for n tokens.
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(2 + args.repeats)]
    it = iter(images)
    t_ours_first = median_time(lambda: (ours.clear_cache(), our_generate(next(it), PROMPTS[0], 1)), args.repeats)
    t_ref_first = median_time(lambda: ref_generate(image, PROMPTS[0], 1), args.repeats)
    row("first turn: time to first token", t_ours_first, t_ref_first)
    t_ours_total = median_time(lambda: (ours.clear_cache(), our_generate(other, PROMPTS[0], n)), args.repeats)
    t_ref_total = median_time(lambda: ref_generate(other, PROMPTS[0], n), args.repeats)
    row(f"first turn: total for {n} tokens", t_ours_total, t_ref_total)
    # Follow-up question about the same image.
    ours.clear_cache()
    our_generate(image, PROMPTS[0], 1)
    t_ours_follow = median_time(lambda: our_generate(image, PROMPTS[1], 1), args.repeats)
    t_ref_follow = median_time(lambda: ref_generate(image, PROMPTS[1], 1), args.repeats)
    row("follow-up turn: time to first token", t_ours_follow, t_ref_follow)
    # Decode per token, and our overhead over the bare LM's generate on the same embeddings.
    ours_decode = (t_ours_total - t_ours_first) / (n - 1)
    ref_decode = (t_ref_total - t_ref_first) / (n - 1)
    row("decode: time per token", ours_decode, ref_decode)
    with torch.inference_mode():  # the bare LM gets exactly the embeddings our generate hands it
        inputs = ours.prepare(image, PROMPTS[0], max_new_tokens=n)
        kwargs = ours._generate_kwargs(inputs, dict(max_new_tokens=n, min_new_tokens=n, **greedy))

    def bare(tokens):
        with torch.inference_mode():
            ours.language_model.generate(**{**kwargs, "max_new_tokens": tokens, "min_new_tokens": tokens})
        sync()

    bare_decode = (median_time(lambda: bare(n), args.repeats) - median_time(lambda: bare(1), args.repeats)) / (n - 1)
    cached_decode = (median_time(lambda: our_generate(image, PROMPTS[0], n), args.repeats) - t_ours_follow) / (n - 1)
    rows.append(
        (
            "decode: our overhead per token over the bare LM",
            cached_decode - bare_decode,
            None,
            (cached_decode - bare_decode) / bare_decode,
            "s",
        )
    )
    # explain over ask.
    t_ask = median_time(lambda: ours.ask(image, PROMPTS[0], max_new_tokens=n, min_new_tokens=n, **greedy), args.repeats)
    t_explain = median_time(
        lambda: ours.explain(image, PROMPTS[0], max_new_tokens=n, min_new_tokens=n, **greedy), args.repeats
    )
    rows.append(("explain time / ask time", t_explain, t_ask, t_explain / t_ask, "s"))

    # Vision encoder throughput against this machine's matmul peak.
    batch = 4
    pixels = torch.cat([ours.preprocess(img) for img in images[:batch]])
    with torch.inference_mode():
        t_vit_ours = median_time(lambda: (ours.encode_image(pixels), sync()), args.repeats)
        ref_pixels = pixels.to(args.device, dtype)
        t_vit_ref = median_time(lambda: (ref.vision_model(pixel_values=ref_pixels), sync()), args.repeats)
    peak = matmul_peak(args.device, dtype)
    flops = vit_flops(ours.config.vision_config, batch)
    rows.append(
        (
            "vision encoder: fraction of bf16 matmul peak",
            flops / t_vit_ours / peak,
            flops / t_vit_ref / peak,
            (flops / t_vit_ours) / (flops / t_vit_ref),
            "×peak",
        )
    )

    # Memory: the LM resident in bfloat16 vs 8-bit.
    lm_bf16 = ours.language_model.get_memory_footprint()
    layers_bf16 = layers_bytes(ours.language_model)
    ref = None  # free the reference before loading the 8-bit model
    gc.collect()
    if not args.skip_8bit:
        ours = None
        gc.collect()
        ours8 = blipdemo.load(folder, dtype=dtype, device=args.device, load_in_8bit=True)
        lm_int8 = ours8.language_model.get_memory_footprint()
        layers_int8 = layers_bytes(ours8.language_model)
        # These two rows hold 8-bit in the first column and bfloat16 in the second.
        rows.append(("LM resident memory (8-bit, bf16)", lm_int8 / 2**30, lm_bf16 / 2**30, lm_int8 / lm_bf16, "GiB"))
        rows.append(
            (
                "LM decoder layers (8-bit, bf16)",
                layers_int8 / 2**30,
                layers_bf16 / 2**30,
                layers_int8 / layers_bf16,
                "GiB",
            )
        )

    print(
        f"\ndevice {args.device}, dtype {str(dtype).removeprefix('torch.')}, LM layers {args.lm_layers}, "
        f"{n} new tokens, median of {args.repeats}; matmul peak {peak / 1e12:.2f} TFLOP/s\n"
    )
    print("| measure | blipdemo | transformers | ratio |\n|---|---|---|---|")
    for name, mine, theirs, ratio, unit in rows:
        print(f"| {name} | {_fmt(mine, unit)} | {_fmt(theirs, unit)} | {ratio:.2f}× |")
    (args.workdir / "last_result.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
