"""8-bit and 4-bit on a CPU, side by side: float32, bfloat16, our int8 / int4 (PyTorch's CPU kernels, cpu_quant) and
bitsandbytes' 8-bit / nf4, in one run on one machine.

    python benchmarks/cpu_quantization.py                                           # the README's figures
    python benchmarks/cpu_quantization.py --groups 32,64,128                        # + int4 at other group sizes
    python benchmarks/cpu_quantization.py --tiny --per-family 2 --new-tokens 3 --repeats 1   # smoke test

Two models:

- full: the LLaMA-7B-shaped LM of benchmarks/speed.py (4096 wide, 32 heads, 11008 MLP, 32001 vocab; --lm-layers of
  its 32 layers), loaded alone through blipdemo's LM loading (the vision encoder is not what quantization changes).
  Per variant: time to first token (a 64-token prompt, as 32 queries + a question make it, and its first token),
  per-token decode time (greedy, KV cache, (time for N tokens - time for 1) / (N - 1)), weight bytes (the whole
  LM, and its linear layers alone: what a 32-layer LM is made of), resident memory after loading and peak resident
  memory (loading included), and against float32's logits on two random 64-token sequences: the share of positions
  whose top-1 token agrees and the largest logit error.
- embedded: the tiny model of assets/ (blipdemo.load), same timings through ``ask``, and its answers to fresh scene
  questions (blipdemo.tiny.evaluate's rows and seed): accuracy per family, and greedy agreement with float32.

Each variant runs in a fresh process (peak memory is per process). The machine comes first: its matmul peaks and its
memory bandwidth (a 1 GiB copy), measured in the same run, since decode at batch 1 is bound by the weights' bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import build_checkpoint, describe_machine, machine, median_time  # noqa: E402

from blipdemo.loading import cpu_quant  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "assets" / "shapes-instructblip"
# variant → (dtype, bits, backend, int4 group size)
VARIANTS = {
    "float32": (torch.float32, None, None, None),
    "bfloat16": (torch.bfloat16, None, None, None),
    "int8": (torch.bfloat16, 8, "torch", None),
    "int4": (torch.bfloat16, 4, "torch", cpu_quant.INT4_GROUP_SIZE),
    "bnb 8-bit": (torch.bfloat16, 8, "bitsandbytes", None),
    "bnb nf4": (torch.bfloat16, 4, "bitsandbytes", None),
}
PROMPT_TOKENS = 64  # 32 query embeddings + a question of ~30 tokens


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: ru_maxrss would carry over the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def memory_bandwidth(gib: float = 1.0) -> float:
    """Bytes/s of the best of 5 copies of a ``gib`` GiB tensor (read + write both counted)."""
    a = torch.ones(int(gib * 2**30) // 4)
    b = torch.empty_like(a)
    best = min(median_time(lambda: b.copy_(a), 1) for _ in range(5))
    return 2 * a.numel() * 4 / best


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.nelement() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def linear_bytes(lm: torch.nn.Module) -> int:
    """Bytes of the decoder layers' linear layers (float, int8, int4 or bitsandbytes), biases and scales included."""
    kinds = (torch.nn.Linear, cpu_quant.Int8Linear, cpu_quant.Int4Linear)
    layers = lm.get_decoder().layers
    return sum(tensor_bytes(m) for m in layers.modules() if isinstance(m, kinds) or "Linear" in type(m).__name__)


def variant_kwargs(variant: str, group_sizes: dict) -> tuple[torch.dtype, int | None, str | None, int | None]:
    if variant in VARIANTS:
        return VARIANTS[variant]
    return torch.bfloat16, 4, "torch", group_sizes[variant]


# --------------------------------------------------------------------------------------------------
def full_worker(args, variant: str) -> dict:
    """One variant of the LLaMA-7B-shaped LM: load, time, compare logits with float32's (saved by that variant)."""
    from blipdemo.loading import core_keys, cpu_4bit_misfits, load_language_model, read_config, weight_files

    dtype, bits, backend, group = variant_kwargs(variant, args.group_map)
    folder = Path(args.folder)
    config, files = read_config(folder), weight_files(folder)
    bnb = backend == "bitsandbytes"
    start = time.perf_counter()
    lm = load_language_model(
        folder,
        config,
        core_keys(files),
        dtype=dtype,
        device_map={"": "cpu"},
        load_in_8bit=bnb and bits == 8,
        load_in_4bit=bnb and bits == 4,
        offload_folder=None,
        keep_float=cpu_4bit_misfits(config, {"": "cpu"}) if bnb and bits == 4 else [],
    )
    if backend == "torch":
        cpu_quant.quantize_linears(lm, bits, group_size=group)
    load_s = time.perf_counter() - start
    result = {"load_s": load_s, "weights": tensor_bytes(lm), "linears": linear_bytes(lm), "layers": args.lm_layers}
    gen = torch.Generator().manual_seed(0)
    vocab = config.text_config.vocab_size
    prompt = torch.randint(3, vocab, (1, PROMPT_TOKENS), generator=gen)
    n = args.new_tokens

    def generate(tokens: int) -> None:
        lm.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        result["ttft"] = median_time(lambda: generate(1), args.repeats)
        result["per_token"] = (median_time(lambda: generate(n), args.repeats) - result["ttft"]) / (n - 1)
        sequences = torch.randint(3, vocab, (2, PROMPT_TOKENS), generator=gen)
        logits = lm(sequences).logits.float()  # (2, 64, vocab)
    ref_file = Path(args.workdir) / f"logits-llama{args.lm_layers}-float32.pt"
    if variant == "float32":
        torch.save(logits, ref_file)
    ref = torch.load(ref_file)
    result["top1"] = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    result["max_logit_error"] = (logits - ref).abs().max().item()
    result["logit_range"] = ref.abs().max().item()
    result["rss"], result["peak_rss"] = rss_bytes(), peak_rss_bytes()
    return result


def embedded_worker(args, variant: str) -> dict:
    """One variant of the embedded model: load, time ``ask``, answer the scene questions."""
    import blipdemo
    from blipdemo.tiny import scenes
    from blipdemo.tiny.evaluate import DECODING, EVAL_SEED, ROWS, fresh_scene, question_for

    dtype, bits, backend, group = variant_kwargs(variant, args.group_map)
    if group is not None:
        cpu_quant.INT4_GROUP_SIZE = group  # what quantize_linears uses when blipdemo.load calls it
    start = time.perf_counter()
    vlm = blipdemo.load(
        EMBEDDED,
        dtype=dtype,
        device="cpu",
        load_in_8bit=bits == 8,
        load_in_4bit=bits == 4,
        quantization=backend,
    )
    load_s = time.perf_counter() - start
    lm = vlm.language_model
    result = {"load_s": load_s, "weights": tensor_bytes(lm), "linears": linear_bytes(lm)}
    rng = random.Random(EVAL_SEED)
    image = scenes.degrade(scenes.render(fresh_scene("color", rng), rng), rng)
    n = args.new_tokens

    def ask(tokens: int) -> None:
        vlm.ask(image, "Describe the image.", max_new_tokens=tokens, min_new_tokens=tokens, num_beams=1)

    result["ttft"] = median_time(lambda: ask(1), args.repeats)  # the image's features are cached after the warm-up
    result["per_token"] = (median_time(lambda: ask(n), args.repeats) - result["ttft"]) / (n - 1)
    answers = {}
    rng = random.Random(EVAL_SEED)  # evaluate()'s draw: the same scenes and questions for every variant
    for row in ROWS:
        answers[row] = []
        for _ in range(args.per_family):
            scene = fresh_scene(row, rng)
            picture = scenes.degrade(scenes.render(scene, rng), rng)
            d = question_for(scene, row, rng)
            got = vlm.ask(picture, d.question, history=d.history, **DECODING)
            answers[row].append((scenes.normalize_answer(got), scenes.normalize_answer(d.answer)))
    result["answers"] = answers
    result["rss"], result["peak_rss"] = rss_bytes(), peak_rss_bytes()
    return result


# --------------------------------------------------------------------------------------------------
def run_variant(args, model: str, variant: str) -> dict:
    """The variant in a fresh process; its result as JSON on the last line of its output."""
    cmd = [sys.executable, __file__, "--worker", model, "--variant", variant, *args.passthrough]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"{model} / {variant} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(b: float) -> str:
    return f"{b / 2**30:.3f}"


def print_speed_table(title: str, results: dict, bandwidth: float) -> None:
    bf16 = results["bfloat16"]
    fastest_float = min(results["float32"]["per_token"], bf16["per_token"])
    print(f"\n{title}")
    print(
        "| variant | per token (ms) | vs fastest float | floor: weights / bandwidth (ms) | first token (ms) | "
        "weights (GiB) | vs bf16 | linear layers (GiB) | vs bf16 | weights at 32 layers (GiB) | vs bf16 | "
        "RSS after the run (GiB) | peak RSS (GiB) | load (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['per_token'] * 1e3:.1f} | {r['per_token'] / fastest_float:.2f}× | "
            f"{r['weights'] / bandwidth * 1e3:.1f} | {r['ttft'] * 1e3:.1f} | {gib(r['weights'])} | "
            f"{r['weights'] / bf16['weights']:.2f}× | {gib(r['linears'])} | {r['linears'] / bf16['linears']:.2f}× | "
            f"{at_32(r)} | {at_32(r, bf16)} | {gib(r['rss'])} | {gib(r['peak_rss'])} | {r['load_s']:.1f} |"
        )


def at_32(r: dict, bf16: dict | None = None) -> str:
    """The full 32-layer LM's weights: the measured layers' linear bytes scaled to 32 layers, the rest as measured
    (embeddings, norms, LM head); against bfloat16's where ``bf16`` is given. "-" for the embedded model."""
    if "layers" not in r:
        return "-"
    size = lambda x: x["weights"] + x["linears"] * (32 / x["layers"] - 1)
    return f"{size(r) / size(bf16):.2f}×" if bf16 else gib(size(r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm-layers", type=int, default=4, help="layers of the LLaMA-7B-shaped LM (of 32)")
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-family", type=int, default=20, help="scene questions per row (10 rows) per variant")
    parser.add_argument("--groups", default="", help="extra int4 group sizes to compare, e.g. 32,128")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/blipdemo-bench"))
    parser.add_argument("--tiny", action="store_true", help="speed.py's tiny checkpoint instead of the full LM")
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--worker", choices=["full", "embedded"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    extra = [int(g) for g in args.groups.split(",") if g and int(g) != cpu_quant.INT4_GROUP_SIZE]
    args.group_map = {f"int4 g{g}": g for g in extra}
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (per-token figures divide by new_tokens - 1)")
    if args.worker:
        work = full_worker if args.worker == "full" else embedded_worker
        print(json.dumps(work(args, args.variant)))
        return

    size = "tiny" if args.tiny else "vitg"
    folder = build_checkpoint(args.workdir / f"instructblip-{size}-llama{args.lm_layers}", args.lm_layers, args.tiny)
    args.passthrough = [
        *("--lm-layers", str(args.lm_layers), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)),
        *("--per-family", str(args.per_family), "--groups", args.groups, "--workdir", str(args.workdir)),
        *("--folder", str(folder)),
    ]
    info = machine("cpu", torch.bfloat16, (256, 512) if args.tiny else (1024, 2048, 4096))
    bandwidth = memory_bandwidth(0.25 if args.tiny else 1.0)
    print(describe_machine(info))
    print(f"memory bandwidth (best of 5 copies of 1 GiB, read + write): {bandwidth / 1e9:.1f} GB/s")
    print(
        f"int4 group size {cpu_quant.INT4_GROUP_SIZE} (extra: {', '.join(args.group_map) or 'none'}); "
        f"{args.new_tokens} new tokens, median of {args.repeats}; every variant in its own process\n",
        flush=True,
    )
    variants = [*VARIANTS, *args.group_map]
    if not args.skip_full:
        full = {v: run_variant(args, "full", v) for v in variants}  # float32 first: the others compare with it
        print_speed_table(
            f"LLaMA-7B-shaped LM ({'tiny sizes' if args.tiny else '4096 wide, 11008 MLP, 32001 vocab'}, "
            f"{args.lm_layers} of 32 layers), prompt {PROMPT_TOKENS} tokens, batch 1",
            full,
            bandwidth,
        )
        print("\n| variant | top-1 agrees with float32 | max logit error | (largest float32 logit) |")
        print("|---|---|---|---|")
        for name, r in full.items():
            print(f"| {name} | {r['top1']:.4f} | {r['max_logit_error']:.4f} | {r['logit_range']:.2f} |")
    embedded = {v: run_variant(args, "embedded", v) for v in variants}
    print_speed_table("Embedded model (assets/shapes-instructblip), through ask", embedded, bandwidth)
    from blipdemo.tiny.evaluate import ROWS

    ref = embedded["float32"]["answers"]
    total = sum(len(ref[row]) for row in ROWS)
    print(f"\nEmbedded model: accuracy per family over {args.per_family} fresh questions each, and greedy agreement")
    print(f"with float32's answers over all {total} questions")
    print(f"| variant | {' | '.join(ROWS)} | agreement |")
    print(f"|---|{'---|' * len(ROWS)}---|")
    for name, r in embedded.items():
        acc = [sum(got == want for got, want in r["answers"][row]) / len(r["answers"][row]) for row in ROWS]
        same = sum(a[0] == b[0] for row in ROWS for a, b in zip(r["answers"][row], ref[row], strict=True))
        print(f"| {name} | {' | '.join(f'{100 * a:.1f}' for a in acc)} | {same}/{total} |")


if __name__ == "__main__":
    main()
