"""Batching: N concurrent requests decoded together vs the same N requests one after another, in one run.

    python benchmarks/batching.py                 # full-size checkpoint (ViT-g, Q-Former, LLaMA-7B-shaped LM cut
                                                  # to 2 layers), bfloat16, N = 1, 2, 4, 8
    python benchmarks/batching.py --tiny          # the same code paths at toy sizes (smoke test, not figures)

Two cases, each with greedy decoding of exactly ``--tokens`` new tokens per request (min = max):
(a) follow-ups: questions about images already seen (their image tokens cached) — decode-bound;
(b) first questions: every request brings a new image (cache cleared) — the ViT runs too.

"in turn" runs the N requests one after another on a model with batching off (what a queue with one generation
at a time does); "batched" sends them from N threads at once to a model loaded with ``max_batch_size=N``. Per
request, latency runs from the common start to its answer (in turn, that includes waiting for the ones before
it, as in the queue). Tokens per second = N × tokens / wall time. "same text": answers equal on both sides (bfloat16
on random weights: near-ties may differ; float32 exactness is tested in tests/test_batching.py).
The machine and its measured matmul peak come first (speed.py's ``machine``); a paper estimate for a 24 GB GPU
closes the report.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from speed import PROMPTS, build_checkpoint, describe_machine, machine  # noqa: E402

import blipdemo  # noqa: E402

GPU_24GB = {"name": "24 GB GPU (RTX 4090 / A10G class)", "bandwidth": 1.0e12, "bf16": 165e12}


def images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(n)]


def nearest_rank(values: list[float], q: float) -> float:
    return sorted(values)[max(0, math.ceil(q * len(values)) - 1)]


def run_in_turn(vlm, work: list[tuple], tokens: int) -> tuple[float, list[float], list[str]]:
    start = time.perf_counter()
    latencies, answers = [], []
    for image, prompt in work:
        answers.append(vlm.ask(image, prompt, max_new_tokens=tokens, min_new_tokens=tokens, num_beams=1))
        latencies.append(time.perf_counter() - start)
    return time.perf_counter() - start, latencies, answers


def run_batched(vlm, work: list[tuple], tokens: int) -> tuple[float, list[float], list[str]]:
    latencies, answers = [0.0] * len(work), [""] * len(work)
    ready = threading.Barrier(len(work) + 1)

    def one(i: int) -> None:
        image, prompt = work[i]
        ready.wait()
        answers[i] = vlm.ask(image, prompt, max_new_tokens=tokens, min_new_tokens=tokens, num_beams=1)
        latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    start = time.perf_counter()
    ready.wait()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies, answers


def measure(single, batched, n: int, tokens: int, case: str, seed: int) -> dict:
    pictures = images(n, seed)
    work = [(pictures[i], PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    rows, schedule = {}, {}
    for name, vlm, run in (("in turn", single, run_in_turn), ("batched", batched, run_batched)):
        vlm.clear_cache()
        if case == "follow-up":  # the pictures were seen before: their image tokens are cached
            vlm.image_tokens([vlm.question(p, PROMPTS[0]).picture for p in pictures])
        before = (vlm.scheduler.batches, vlm.scheduler.regroups)
        rows[name] = run(vlm, work, tokens)
        schedule[name] = (vlm.scheduler.batches - before[0], vlm.scheduler.regroups - before[1])
    (wall_a, lat_a, ans_a), (wall_b, lat_b, ans_b) = rows["in turn"], rows["batched"]
    # In float32 greedy rows equal their lone answers (tests/test_batching.py); in bfloat16 a random checkpoint's
    # near-ties may fall the other way once rows are padded, so here the share of equal answers is reported.
    same = sum(a == b for a, b in zip(ans_a, ans_b, strict=True))
    return {
        "case": case,
        "n": n,
        "tps_turn": n * tokens / wall_a,
        "tps_batch": n * tokens / wall_b,
        "p50_turn": statistics.median(lat_a),
        "p95_turn": nearest_rank(lat_a, 0.95),
        "p50_batch": statistics.median(lat_b),
        "p95_batch": nearest_rank(lat_b, 0.95),
        "same": f"{same}/{n}",
        # How the scheduler ran the batched side: generate calls, and how many of them came from a regroup.
        "schedule": f"{schedule['batched'][0]} ({schedule['batched'][1]})",
    }


def paper_estimate(config, tokens: int, sizes: list[int]) -> list[str]:
    """Decode step time on a 24 GB GPU ≈ max(bytes read / bandwidth, FLOPs / peak): the LM's weights are read once
    per step whatever the batch, each row adds its KV cache reads and 2 × params FLOPs per token."""
    full_layers = 32  # Vicuna-7B: the benchmark cuts the LM to 2 layers; the estimate is for the whole model
    params = 6.7e9
    weights = params * 2  # bfloat16
    kv_per_token = 2 * full_layers * 4096 * 2  # keys and values of 32 layers × 4096, bfloat16
    context = config.num_query_tokens + 40 + tokens  # queries + a typical prompt + the answer
    lines = [
        f"\nPaper estimate, full Vicuna-7B in bfloat16 ({weights / 2**30:.1f} GiB of weights) on a {GPU_24GB['name']}: "
        f"~{GPU_24GB['bandwidth'] / 1e12:.1f} TB/s, ~{GPU_24GB['bf16'] / 1e12:.0f} TFLOP/s bf16; KV cache "
        f"{kv_per_token / 2**10:.0f} KiB per token, ~{context} tokens per row.",
        "| rows | step (ms) | tokens/s | × one row |",
        "|---|---|---|---|",
    ]
    one = None
    for n in sizes:
        read = weights + n * context * kv_per_token
        step = max(read / GPU_24GB["bandwidth"], n * 2 * params / GPU_24GB["bf16"])
        tps = n / step
        one = one or tps
        lines.append(f"| {n} | {1e3 * step:.1f} | {tps:.0f} | {tps / one:.2f}× |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,2,4,8")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks the code paths in seconds")
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse a checkpoint folder (built if absent)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    dtype = "float32" if args.tiny else "bfloat16"
    print(describe_machine(machine("cpu", getattr(torch, dtype), (256, 512) if args.tiny else (1024, 2048, 4096))))
    with tempfile.TemporaryDirectory(prefix="blipdemo-batching-") as tmp:
        folder = build_checkpoint(args.checkpoint or Path(tmp) / "ckpt", lm_layers=2, tiny=args.tiny)
        # One model: requests sent one after another never overlap, so on the batching service they run alone —
        # exactly what a service without batching does (and two full-size copies would not fit beside each other).
        batched = blipdemo.load(folder, dtype=dtype, device="cpu", max_batch_size=max(sizes))
        single = batched
        print(
            f"checkpoint: InstructBLIP, {'toy' if args.tiny else 'full-size ViT-g + Q-Former, LLaMA-7B-shaped'} LM "
            f"cut to 2 layers, {dtype}; greedy, {args.tokens} new tokens per request"
        )
        results = []
        for case in ("follow-up", "first question"):
            for n in sizes:
                results.append(measure(single, batched, n, args.tokens, case, seed=n))
        print(
            "\n| case | N | tokens/s in turn | tokens/s batched | speed-up | latency p50 / p95 in turn | "
            f"latency p50 / p95 batched | same text | batches (regroups) |\n|{'---|' * 9}"
        )
        for r in results:
            print(
                f"| {r['case']} | {r['n']} | {r['tps_turn']:.1f} | {r['tps_batch']:.1f} | "
                f"{r['tps_batch'] / r['tps_turn']:.2f}× | {r['p50_turn']:.2f} / {r['p95_turn']:.2f} s | "
                f"{r['p50_batch']:.2f} / {r['p95_batch']:.2f} s | {r['same']} | {r['schedule']} |"
            )
        print("latency: from the common start to each request's answer (in turn: waiting for the ones before it)")
        print("batches (regroups): generate calls on the batched side, and how many began with a regroup")
        print("\n".join(paper_estimate(single.config, args.tokens, sizes)))


if __name__ == "__main__":
    main()
