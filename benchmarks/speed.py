"""Speed and memory, side by side with the transformers reference, on a checkpoint at InstructBLIP scale.

    python benchmarks/speed.py                           # CPU, bfloat16, eager PyTorch
    python benchmarks/speed.py --variants eager,compile  # + the compiled vision encoder, in the same run
    python benchmarks/speed.py --device cuda             # same script on a GPU (float16/bfloat16)
    python benchmarks/speed.py --tiny --new-tokens 4 --repeats 1   # a small checkpoint: checks the script runs

Builds (once, under --workdir) a random checkpoint in the published layout with the full EVA ViT-g/14
(39 × 1408, 224 px), the full Q-Former (12 × 768, 32 queries) and a LLaMA-7B-shaped LM cut to a few layers
(4096 wide, 32 heads, 11008 MLP, 32001 vocab), then loads it into blipdemo and into transformers'
InstructBlipForConditionalGeneration, same dtype, same image and prompts, greedy decoding of a fixed number
of new tokens (min_new_tokens = max_new_tokens). The reference is measured once; each blipdemo variant (eager,
compiled vision encoder) is measured against it in the same process, and must produce the reference's tokens
(the script exits non-zero where it does not). Prints the machine first, then two tables: blipdemo against
transformers, and the figures that measure blipdemo alone (overhead over the bare LM, explain / ask, 8-bit).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blipdemo  # noqa: E402
from blipdemo.batching import generate_kwargs  # noqa: E402
from blipdemo.tiny.evaluate import cpu_info  # noqa: E402
from blipdemo.tiny.tokenizers import lm_tokenizer, wordpiece_tokenizer  # noqa: E402

PROMPTS = [
    "What is unusual about this image?",
    "Describe the image in detail, please.",
    "What color is the object on the left?",
]
VARIANTS = ("eager", "compile")
# --tiny: the same layout and code paths at sizes that run in seconds (for the smoke test, not for figures).
TINY_VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=56)
TINY_QFORMER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
TINY_LM = dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4)
FULL_LM = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)


# --------------------------------------------------------------------------------------------------
def build_checkpoint(folder: Path, lm_layers: int, tiny: bool = False) -> Path:
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
    queries = 8 if tiny else 32
    side = TINY_VISION["image_size"] if tiny else 224
    image_processor = BlipImageProcessor(size={"height": side, "width": side})
    processor = InstructBlipProcessor(image_processor, tok, qtok, num_query_tokens=queries)
    tok = processor.tokenizer
    text = LlamaConfig(
        **(TINY_LM if tiny else FULL_LM),
        num_hidden_layers=lm_layers,
        vocab_size=32001,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    qformer = {"vocab_size": len(qtok)}
    if tiny:
        qformer.update(TINY_QFORMER, encoder_hidden_size=TINY_VISION["hidden_size"])
    config = InstructBlipConfig(
        vision_config=TINY_VISION if tiny else {},
        qformer_config=qformer,
        text_config=text.to_dict(),
        num_query_tokens=queries,
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


def matmul_peak(device: str, dtype: torch.dtype, sizes: tuple[int, ...]) -> float:
    """FLOP/s of the best of several large square matmuls: this machine's practical peak for the dtype."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = 0.0
    for n in sorted(sizes):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = median_time(lambda a=a, b=b: (torch.matmul(a, b), sync()), 5)
        best = max(best, 2 * n**3 / seconds)
        if seconds > 0.5:
            # A dtype the processor has no instructions for (bfloat16 on an AVX2-only CPU: 0.7 GFLOP/s at 1024²)
            # would take minutes at the next size (8× the work) and would not come nearer any peak.
            break
    return best


def machine(device: str, dtype: torch.dtype, sizes: tuple[int, ...]) -> dict:
    """What the figures depend on: the processor, whether it runs bfloat16 natively, and its measured peaks.

    A ratio taken on an AMX machine says little about one without (the README's figures name theirs)."""
    import transformers

    cpu, flags = cpu_info()
    info = {
        "date": datetime.now().isoformat(timespec="minutes"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "matmul_sizes": list(sizes),
    }
    for dt in dict.fromkeys([torch.bfloat16, torch.float32, dtype]):
        info[f"matmul_peak_{_name(dt)}"] = matmul_peak(device, dt, sizes)
    return info


def describe_machine(info: dict) -> str:
    """``machine``'s result as the lines every benchmark prints first."""
    native = f"AMX-BF16 {'yes' if info['amx_bf16'] else 'no'}, AVX512-BF16 {'yes' if info['avx512_bf16'] else 'no'}"
    lines = [f"machine: {info['cpu']}, {info['cpus']} CPUs ({info['torch_threads']} torch threads); {native}"]
    if info["gpu"]:
        lines.append(f"GPU: {info['gpu']}")
    peaks = ", ".join(
        f"{k.removeprefix('matmul_peak_')} {v / 1e12:.3f} TFLOP/s" for k, v in info.items() if "peak" in k
    )
    sizes = ", ".join(f"{s}²" for s in info["matmul_sizes"])
    lines.append(f"matmul peak (best of {sizes}, up to the first size over 0.5 s a matmul): {peaks}")
    lines.append(f"python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, {info['date']}")
    return "\n".join(lines)


def layers_bytes(lm) -> int:
    """Bytes of the decoder layers' weights and buffers (what quantization shrinks; embeddings stay)."""
    layers = lm.get_decoder().layers
    return sum(t.nelement() * t.element_size() for t in [*layers.parameters(), *layers.buffers()])


def vit_flops(cfg, batch: int) -> float:
    """Multiply-adds ×2 of the ViT forward (matmuls and attention; elementwise ops ignored)."""
    n = (cfg.image_size // cfg.patch_size) ** 2 + 1
    d, m = cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
    patch = 2 * (n - 1) * 3 * cfg.patch_size**2 * d
    return batch * (cfg.num_hidden_layers * per_layer + patch)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fmt(value, unit: str) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.0f}%" if unit == "×peak" else f"{value:.3f} {unit}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "—"


# --------------------------------------------------------------------------------------------------
class Bench:
    """The work both sides do: same images, prompts, greedy decoding of exactly ``n`` new tokens."""

    def __init__(self, args, dtype: torch.dtype) -> None:
        self.args, self.dtype, self.n, self.repeats = args, dtype, args.new_tokens, args.repeats
        self.sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        rng = np.random.default_rng(0)
        picture = lambda: Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
        self.image, self.other = picture(), picture()
        self.fresh = [picture() for _ in range(self.repeats + 1)]  # first turns: pictures never seen before
        self.greedy = dict(num_beams=1, do_sample=False)
        self.fixed = dict(max_new_tokens=self.n, min_new_tokens=self.n, **self.greedy)
        self.batch = 4  # vision encoder throughput: a batch of 4 pictures

    def time(self, fn) -> float:
        return median_time(fn, self.repeats)

    def reference(self, folder: Path) -> tuple[list[int], dict]:
        """transformers' tokens for the benchmarked request, and its timings (seconds)."""
        from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

        args, dtype, n, image = self.args, self.dtype, self.n, self.image
        processor = InstructBlipProcessor.from_pretrained(folder)
        ref = InstructBlipForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(args.device).eval()

        def generate(img, prompt, tokens):
            inputs = processor(images=img, text=prompt, return_tensors="pt").to(args.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.inference_mode():
                out = ref.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, **self.greedy)
            self.sync()
            return out

        tokens = generate(image, PROMPTS[0], n)[0, -n:].tolist()
        t = {"first": self.time(lambda: generate(image, PROMPTS[0], 1))}  # no cache: every turn is a first turn
        t["total"] = self.time(lambda: generate(self.other, PROMPTS[0], n))
        t["follow"] = self.time(lambda: generate(image, PROMPTS[1], 1))
        t["decode"] = (t["total"] - t["first"]) / (n - 1)
        pixels = self.pixels(processor.image_processor).to(args.device, dtype)
        with torch.inference_mode():
            t["vit"] = self.time(lambda: (ref.vision_model(pixel_values=pixels), self.sync()))
        return tokens, t

    def pixels(self, image_processor) -> torch.Tensor:
        return image_processor(images=self.fresh[:1] * self.batch, return_tensors="pt")["pixel_values"]

    def tokens(self, ours) -> list[int]:
        ours.clear_cache()
        return ours.generate_ids(self.image, PROMPTS[0], **self.fixed).tolist()

    def ours(self, ours) -> dict:
        """blipdemo's timings (seconds): the reference's figures, and those only blipdemo has."""
        n, image = self.n, self.image

        def generate(img, prompt, tokens):
            ours.generate_ids(img, prompt, max_new_tokens=tokens, min_new_tokens=tokens, **self.greedy)
            self.sync()

        fresh = iter(self.fresh)
        t = {"first": self.time(lambda: (ours.clear_cache(), generate(next(fresh), PROMPTS[0], 1)))}
        t["total"] = self.time(lambda: (ours.clear_cache(), generate(self.other, PROMPTS[0], n)))
        t["decode"] = (t["total"] - t["first"]) / (n - 1)
        ours.clear_cache()
        generate(image, PROMPTS[0], 1)  # the image's tokens are cached from here on: follow-up turns
        t["follow"] = self.time(lambda: generate(image, PROMPTS[1], 1))
        # Our overhead per token over the bare LM: both per-token figures from n and 1 tokens on the SAME prompt
        # (PROMPTS[0]), so the prompt's prefill cancels out (a longer prompt's first token would bias it down).
        cached_first = self.time(lambda: generate(image, PROMPTS[0], 1))
        t["cached_decode"] = (self.time(lambda: generate(image, PROMPTS[0], n)) - cached_first) / (n - 1)
        with torch.inference_mode():  # the bare LM gets exactly the embeddings our generate hands it
            request = ours._request(ours.prepare(ours.question(image, PROMPTS[0], **self.fixed)))
            kwargs = generate_kwargs(ours, [request])

        def bare(tokens):
            with torch.inference_mode():
                ours.language_model.generate(**{**kwargs, "max_new_tokens": tokens, "min_new_tokens": tokens})
            self.sync()

        t["bare_decode"] = (self.time(lambda: bare(n)) - self.time(lambda: bare(1))) / (n - 1)
        t["ask"] = self.time(lambda: ours.ask(image, PROMPTS[0], **self.fixed))
        t["explain"] = self.time(lambda: ours.explain(image, PROMPTS[0], **self.fixed))
        pixels = self.pixels(ours.image_processor)
        with torch.inference_mode():
            t["vit"] = self.time(lambda: (ours.model.encode_image(pixels), self.sync()))
        return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 (cpu), float16 (cuda)")
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/blipdemo-bench"))
    parser.add_argument("--skip-8bit", action="store_true")
    parser.add_argument(
        "--variants",
        default="eager",
        help="comma-separated blipdemo variants, each measured against the same single reference measurement: "
        "eager, compile (the vision encoder compiled, as blipdemo.load(..., compile=True))",
    )
    parser.add_argument("--compile", action="store_true", help="shorthand for --variants eager,compile")
    parser.add_argument("--tiny", action="store_true", help="a small checkpoint in the same layout (smoke test)")
    args = parser.parse_args()
    variants = list(dict.fromkeys(VARIANTS if args.compile else [v.strip() for v in args.variants.split(",")]))
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}, got {args.variants!r}")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (per-token figures divide by new_tokens - 1)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cpu" else "float16"))
    n = args.new_tokens
    size = "tiny" if args.tiny else "vitg"
    folder = build_checkpoint(args.workdir / f"instructblip-{size}-llama{args.lm_layers}", args.lm_layers, args.tiny)

    # The machine first: every figure below is relative to it (and the vision encoder's row to its measured peak).
    info = machine(args.device, dtype, (256, 512) if args.tiny else (1024, 2048, 4096))
    print(describe_machine(info))
    print(
        f"checkpoint: {'tiny (smoke-test sizes)' if args.tiny else 'ViT-g/14 + Q-Former 12 × 768'} + LLaMA-shaped LM "
        f"with {args.lm_layers} layers; device {args.device}, dtype {_name(dtype)}, {n} new tokens, "
        f"median of {args.repeats}; variants: {', '.join(variants)}\n",
        flush=True,
    )
    peak = info[f"matmul_peak_{_name(dtype)}"]
    bench = Bench(args, dtype)

    # The reference is measured once; every variant is compared with that one measurement, in this process.
    ref_tokens, theirs = bench.reference(folder)
    gc.collect()
    mine: dict[str, dict] = {}
    lm_bytes = layers = vision_config = None
    for variant in variants:
        ours = blipdemo.load(folder, dtype=dtype, device=args.device, compile=variant == "compile")
        # Same tokens first: the timings compare identical work only if both sides produce the same ids.
        tokens = bench.tokens(ours)
        if tokens != ref_tokens:
            print(f"blipdemo ({variant}) token ids: {tokens}\ntransformers token ids: {ref_tokens}")
            sys.exit(
                f"FAILED: blipdemo ({variant}) generated other token ids than transformers for the same weights, "
                f"image and prompt ({n} greedy tokens), so its timings would not measure the same work."
            )
        print(f"same tokens as transformers ({variant}): checked, all {n} greedy token ids equal", flush=True)
        mine[variant] = bench.ours(ours)
        if lm_bytes is None:
            lm_bytes, layers = ours.language_model.get_memory_footprint(), layers_bytes(ours.language_model)
            vision_config = ours.config.vision_config
        del ours
        gc.collect()

    # Memory: the LM resident in the float dtype vs 8-bit (one model loaded at a time).
    memory = None
    if not args.skip_8bit:
        ours8 = blipdemo.load(folder, dtype=dtype, device=args.device, load_in_8bit=True, quantization="bitsandbytes")
        memory = (ours8.language_model.get_memory_footprint(), layers_bytes(ours8.language_model))
        del ours8
        gc.collect()

    # ---- Table 1: blipdemo against transformers (ratios: blipdemo's time / transformers' time) --------------
    flops = vit_flops(vision_config, bench.batch)
    compared = [
        ("first turn: time to first token", "first", "s"),
        (f"first turn: total for {n} tokens", "total", "s"),
        ("follow-up turn (same image): time to first token", "follow", "s"),
        ("decode: time per token", "decode", "s"),
        (f"vision encoder (batch of {bench.batch}): fraction of the {_name(dtype)} matmul peak", "vit", "×peak"),
    ]
    heads = [f"blipdemo {v}" for v in variants] + ["transformers"] + [f"{v} / transformers (time)" for v in variants]
    table1 = []
    print("\n| measure | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    for label, key, unit in compared:
        seconds = [mine[v][key] for v in variants] + [theirs[key]]
        shown = [flops / t / peak for t in seconds] if unit == "×peak" else seconds
        ratios = [_ratio(t, theirs[key]) for t in seconds[:-1]]
        table1.append({"measure": label, "unit": unit, **dict(zip(heads, [*shown, *ratios], strict=True))})
        print(f"| {label} | " + " | ".join([*(_fmt(v, unit) for v in shown), *ratios]) + " |")

    # ---- Table 2: blipdemo alone: each row compares two of our own configurations, no transformers column ---
    own = []
    for v in variants:
        m = mine[v]
        own.append(
            (
                f"decode per token ({v}): our generate, image cached (A) vs the bare LM's generate on the same "
                "embeddings (B); A − B = our overhead per token",
                m["cached_decode"],
                m["bare_decode"],
                "s",
            )
        )
        own.append((f"`explain` (A) vs `ask` (B), {n} tokens ({v})", m["explain"], m["ask"], "s"))
    if memory:
        gib = 2**30
        own.append((f"LM resident memory: 8-bit (A) vs {_name(dtype)} (B)", memory[0] / gib, lm_bytes / gib, "GiB"))
        own.append((f"LM decoder layers: 8-bit (A) vs {_name(dtype)} (B)", memory[1] / gib, layers / gib, "GiB"))
    table2 = []
    print("\n| blipdemo alone: A vs B | A | B | A − B | A / B |\n|---|---|---|---|---|")
    for label, a, b, unit in own:
        table2.append({"measure": label, "unit": unit, "A": a, "B": b, "A - B": a - b, "A / B": a / b})
        print(f"| {label} | {_fmt(a, unit)} | {_fmt(b, unit)} | {_fmt(a - b, unit)} | {_ratio(a, b)} |")

    result = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "variants": variants}
    result.update(reference=theirs, blipdemo=mine, against_transformers=table1, blipdemo_alone=table2)
    (args.workdir / "last_result.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
