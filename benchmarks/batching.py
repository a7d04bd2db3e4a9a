"""Continuous batching against its ideal schedule and against one request after another, in one run.

    python benchmarks/batching.py                    # full-size ViT-g + Q-Former + LLaMA-7B-shaped LM cut to 2 layers,
                                                     # bfloat16, N = 1, 2, 4, 8, 16, 3 repetitions
    python benchmarks/batching.py --dtype float32    # the same in float32
    python benchmarks/batching.py --tiny             # the same code paths at toy sizes (smoke test, not figures)

Every request is a follow-up question (its picture's image tokens cached, as in a chat), greedy, exactly ``--tokens``
new tokens (min = max). For each N and two arrival patterns — all at once, and staggered (request j arrives once
the running batch has made j × ``--stagger`` steps) — three schedules are timed, wall clock from the first arrival
to the last answer:

- **ours**: the N requests sent from N threads to a model loaded with ``max_batch_size=N`` (the scheduler admits
  newcomers between two steps, each prompt prefilled once);
- **ideal**: what the same arrivals cost with no overhead at all: each request's prefill *alone* plus one decode step
  per step at the live batch size, every step time measured on this model beforehand (the mean of several steps of
  a batch of b rows, for every b from 1 to N; the prefill of each prompt alone). The simulation admits request j
  after j × stagger steps, exactly as the staggered run does;
- **in turn** (arrivals at once only): the N requests one after another on a model with batching off.

Each cell is repeated ``--repeats`` times after a warm-up, alternating which of ours and in-turn goes first; the table
shows min and median. Goals (issue "Every prompt computed once"): ours within 1.15× of ideal in every cell;
8 concurrent follow-ups ≥ 3× faster than in turn (float32 on an AVX2 CPU) and ≥ 5× where bfloat16 is native; N = 1
within 5% of in turn. "same": answers equal to in turn (bfloat16 on random weights: a near-tie may fall the other
way once rows are padded; float32 exactness is tested in tests/test_batching.py).
The machine and its matmul peak come first (speed.py's ``machine``).
"""

from __future__ import annotations

import argparse
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
from blipdemo.decode_loop import RunningBatch  # noqa: E402


def pictures(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(n)]


class Bench:
    def __init__(self, single, batched, tokens: int, stagger: int, n_max: int) -> None:
        self.single, self.batched, self.tokens, self.stagger = single, batched, tokens, stagger
        self.images = pictures(n_max, seed=1)
        self.work = [(self.images[i], PROMPTS[i % len(PROMPTS)]) for i in range(n_max)]
        for vlm in (single, batched):  # follow-ups: every picture's image tokens are cached
            vlm.image_tokens([vlm.question(image, PROMPTS[0]).picture for image in self.images])
        self.options = dict(max_new_tokens=tokens, min_new_tokens=tokens, num_beams=1, do_sample=False)

    # ----------------------------------------------------------------------------------------------
    def step_times(self, n_max: int, steps: int = 6) -> tuple[dict[int, float], list[float]]:
        """Seconds per decode step at every batch size 1..n_max, and per prompt prefilled alone (min of 3)."""
        vlm = self.batched

        def requests(rows: list[int]):
            return [vlm._request(vlm.prepare(vlm.question(*self.work[i], **self.options))) for i in rows]

        step = {}
        for b in range(1, n_max + 1):
            samples = []
            for _ in range(3):
                batch = RunningBatch(vlm)
                batch.admit(requests(list(range(b))))
                start = time.perf_counter()
                for _ in range(steps):
                    batch.step()
                samples.append((time.perf_counter() - start) / steps)
                batch.fail(RuntimeError("measured"))  # drops the rows
            step[b] = min(samples)
        prefill = []
        for i in range(min(len(PROMPTS), len(self.work))):  # request j asks PROMPTS[j % len(PROMPTS)]
            samples = []
            for _ in range(3):
                batch = RunningBatch(vlm)
                rows = requests([i])
                start = time.perf_counter()
                batch.admit(rows)
                samples.append(time.perf_counter() - start)
                batch.fail(RuntimeError("measured"))
            prefill.append(min(samples))
        return step, prefill

    def ideal(self, n: int, stagger: int | None, step: dict[int, float], prefill: list[float]) -> float:
        """The schedule's cost with no overhead: prefills alone + steps at the live batch size."""
        remaining: list[int] = []  # steps left per live row (a row's first token comes from its prefill)
        t, steps_done, j = 0.0, 0, 0
        while j < n or remaining:
            while j < n and (stagger is None or j * stagger <= steps_done):
                t += prefill[j % len(prefill)]
                remaining.append(self.tokens - 1)
                j += 1
            remaining = [r for r in remaining if r > 0]
            if remaining:
                t += step[len(remaining)]
                steps_done += 1
                remaining = [r - 1 for r in remaining]
            elif j < n:
                steps_done = j * stagger  # idle until the next arrival (not reached when stagger < tokens)
        return t

    def in_turn(self, n: int) -> tuple[float, list[str]]:
        start = time.perf_counter()
        answers = [self.single.ask(*self.work[i], **self.options) for i in range(n)]
        return time.perf_counter() - start, answers

    def ours(self, n: int, stagger: int | None) -> tuple[float, list[str]]:
        vlm = self.batched
        answers = [""] * n
        scheduler = vlm.scheduler

        def one(i: int) -> None:
            answers[i] = vlm.ask(*self.work[i], **self.options)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        start = time.perf_counter()
        if stagger is None:
            for t in threads:
                t.start()
        else:
            before = scheduler.batch  # the scheduler thread's batch (its step count runs on across runs)
            steps0 = before.steps if before is not None else 0
            threads[0].start()
            while scheduler.batch is None:
                time.sleep(0.001)
            for j in range(1, n):  # request j once the batch has made j × stagger steps since the first arrival
                while scheduler.batch.steps - steps0 < j * stagger and threads[j - 1].is_alive():
                    time.sleep(0.002)
                threads[j].start()
        for t in threads:
            t.join()
        return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,2,4,8,16")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--stagger", type=int, default=4, help="staggered arrivals: one every this many steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 (float32 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks the code paths in seconds")
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse a checkpoint folder (built if absent)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    print(describe_machine(machine("cpu", getattr(torch, dtype), (256, 512) if args.tiny else (1024, 2048, 4096))))
    print(time.strftime("run: %Y-%m-%d %H:%M UTC", time.gmtime()))
    with tempfile.TemporaryDirectory(prefix="blipdemo-batching-") as tmp:
        folder = build_checkpoint(args.checkpoint or Path(tmp) / "ckpt", lm_layers=2, tiny=args.tiny)
        single = blipdemo.load(folder, dtype=dtype, device="cpu")
        batched = blipdemo.load(folder, dtype=dtype, device="cpu", max_batch_size=max(sizes))
        print(
            f"checkpoint: InstructBLIP, {'toy' if args.tiny else 'full-size ViT-g + Q-Former, LLaMA-7B-shaped'} LM "
            f"cut to 2 layers, {dtype}; follow-up questions, greedy, {args.tokens} new tokens each; "
            f"{args.repeats} repetitions after a warm-up; the decode loop's float32 linear layers: "
            f"{batched.cpu_linear.describe()} (blipdemo/cpu_linear.py)"
        )
        bench = Bench(single, batched, args.tokens, args.stagger, max(sizes))
        bench.in_turn(1), bench.ours(min(2, max(sizes)), None)  # warm-up
        step, prefill = bench.step_times(max(sizes))
        print(
            "step time (ms) by live rows: "
            + ", ".join(f"{b}: {1e3 * step[b]:.1f}" for b in sorted(step))
            + "; prefill alone (ms): "
            + ", ".join(f"{1e3 * p:.1f}" for p in prefill)
        )
        rows = []
        for n in sizes:
            for stagger in (None, args.stagger):
                if stagger is not None and n == 1:
                    continue
                ours, turn, same = [], [], []
                for rep in range(args.repeats):
                    order = ("ours", "turn") if rep % 2 == 0 else ("turn", "ours")
                    for side in order:
                        if side == "ours":
                            wall, answers_ours = bench.ours(n, stagger)
                            ours.append(wall)
                        elif stagger is None:
                            wall, answers_turn = bench.in_turn(n)
                            turn.append(wall)
                    if stagger is None:
                        same.append(sum(a == b for a, b in zip(answers_ours, answers_turn, strict=True)))
                ideal = bench.ideal(n, stagger, step, prefill)
                rows.append((n, stagger, ours, turn, ideal, min(same) if same else None))
                print(f"  N={n} {'at once' if stagger is None else f'every {stagger} steps'}: done", flush=True)
        print(
            "\n| N | arrivals | ours min / median (s) | ideal (s) | ours / ideal | in turn min / median (s) | "
            f"speed-up vs in turn | same |\n|{'---|' * 8}"
        )
        for n, stagger, ours, turn, ideal, same in rows:
            arrivals = "at once" if stagger is None else f"every {stagger} steps"
            o_min, o_med = min(ours), statistics.median(ours)
            turn_cell = f"{min(turn):.2f} / {statistics.median(turn):.2f}" if turn else "–"
            speedup = f"{statistics.median(turn) / o_med:.2f}×" if turn else "–"
            print(
                f"| {n} | {arrivals} | {o_min:.2f} / {o_med:.2f} | {ideal:.2f} | {o_med / ideal:.2f}× | {turn_cell} | "
                f"{speedup} | {'–' if same is None else f'{same}/{n}'} |"
            )
        print("speed-up: median in turn / median ours; ours / ideal: median ours over the ideal schedule")


if __name__ == "__main__":
    main()
