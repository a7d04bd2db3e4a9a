"""What the maps cost: time and peak memory of ``ask``, ``explain`` (raw attention) and ``explain`` (relevancy).

    python benchmarks/explain_cost.py                     # the embedded model and the test checkpoints, CPU
    python benchmarks/explain_cost.py --runs 1 --only-embedded   # quick (the smoke test)
    python benchmarks/explain_cost.py --checkpoint DIR    # any other checkpoint folder too (repeatable)
    python benchmarks/explain_cost.py --threads 1         # torch threads (default: torch's own)

Per model, one fixed image and question, greedy decoding; five operations:
- ``ask``; ``explain`` with method "attention" and with method "relevancy" (each generates, then maps);
- the maps alone, for the answer ``ask`` gave (``explain(..., answer=text)``: no generation), per method.
Time: median of ``--runs`` calls after a first one, wall clock and CPU time of the process (the CPU time stays
meaningful on a machine busy with other work, with ``--threads 1``). Memory: each operation runs in a fresh process;
on the CPU the peak resident memory of its first call above the loaded model (VmHWM reset through
/proc/self/clear_refs just before the call), on a GPU ``torch.cuda.max_memory_allocated`` above the loaded model.
The machine line comes first (speed.py's ``machine``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

import blipdemo  # noqa: E402
from blipdemo.tiny import EMBEDDED_MODEL, scenes  # noqa: E402

OPERATIONS = ("ask", "explain attention", "explain relevancy", "maps attention", "maps relevancy")
TEST_CHECKPOINTS = (("instructblip", "llama"), ("blip2", "opt"), ("instructblip", "t5"))


def _status_kib(field: str) -> int:
    """A VmRSS / VmHWM figure of this process, in KiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_peak(device: str) -> int:
    """Start a peak-memory window; returns the baseline in bytes."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
    return 1024 * _status_kib("VmRSS")


def _peak(device: str) -> int:
    """Peak bytes since ``_reset_peak``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return 1024 * _status_kib("VmHWM")


def scene_image():
    """A fixed three-object shapes scene (the embedded model's world; any picture does for the test checkpoints)."""
    import random

    rng = random.Random(4)
    while len((scene := scenes.sample_scene(rng)).objects) < 3:
        pass
    return scenes.render(scene, rng)


def child(spec: dict) -> dict:
    """Run one operation in this (fresh) process: its first call's peak memory, then the median time of ``runs``."""
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    vlm = blipdemo.load(spec["model"], dtype=spec["dtype"], device=device)
    image, question, decoding = scene_image(), spec["question"], spec["decoding"]
    operation = spec["operation"]
    if operation == "ask":
        call = lambda: vlm.ask(image, question, **decoding)  # noqa: E731
    elif operation.startswith("explain"):
        call = lambda: vlm.explain(image, question, method=operation.split()[1], **decoding)  # noqa: E731
    else:
        call = lambda: vlm.explain(image, question, answer=spec["answer"], method=operation.split()[1])  # noqa: E731
    base = _reset_peak(device)
    result = call()
    peak = _peak(device) - base
    times, cpu_times = [], []
    for _ in range(spec["runs"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    text = result if isinstance(result, str) else result.text
    tokens = len(vlm.generate_ids(image, question, **decoding)) if operation == "ask" else None  # EOS included
    return {
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu_times),
        "peak_bytes": peak,
        "text": text,
        "tokens": tokens,
    }


def measure(spec: dict) -> dict:
    """``child(spec)`` in a fresh Python process."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{spec['operation']} on {spec['model']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def models(args, workdir: Path) -> list[dict]:
    """What to measure: name, folder, dtype, question and decoding options."""
    found = [
        {
            "name": "embedded (shapes-instructblip)",
            "model": str(args.model),
            "dtype": args.dtype,
            "question": "Describe the image.",
            "decoding": {"num_beams": 1, "max_new_tokens": 40},
        }
    ]
    if not args.only_embedded:
        from checkpoints import make_checkpoint

        for family, lm in TEST_CHECKPOINTS:
            folder = workdir / f"{family}-{lm}"
            if not (folder / "config.json").is_file():
                make_checkpoint(folder, family, lm)
            fixed = {"num_beams": 1, "max_new_tokens": 16, "min_new_tokens": 16}
            found.append(
                {
                    "name": f"test checkpoint {family} + {lm}",
                    "model": str(folder),
                    "dtype": "float32",
                    "question": "What color is the circle?",
                    "decoding": fixed,
                }
            )
    for folder in args.checkpoint:
        found.append(
            {
                "name": Path(folder).name,
                "model": folder,
                "dtype": args.dtype,
                "question": "Describe the image in detail.",
                "decoding": {"num_beams": 1, "max_new_tokens": 32, "min_new_tokens": 32},
            }
        )
    return found


def report(rows: list[tuple[dict, dict]], runs: int) -> None:
    """The table, one row per model and operation (the answer's generated tokens, EOS included), with its CPU time's
    ratio to ``ask``."""
    print(
        f"\n| model | operation | answer tokens | time (median of {runs}) | CPU time (median) | CPU time × ask "
        "| peak memory above the model |"
    )
    print("|---|---|---|---|---|---|---|")
    for model, results in rows:
        ask = results["ask"]
        for operation in OPERATIONS:
            r = results[operation]
            print(
                f"| {model['name']} ({model['dtype']}) | {operation} | {ask['tokens']} | {1000 * r['seconds']:.1f} ms "
                f"| {1000 * r['cpu_seconds']:.1f} ms | {r['cpu_seconds'] / max(ask['cpu_seconds'], 1e-9):.2f} "
                f"| {r['peak_bytes'] / 2**20:.1f} MiB |"
            )
    print("\nrelevancy / attention, the maps alone (time; CPU time; peak memory):")
    for model, results in rows:
        a, r = results["maps attention"], results["maps relevancy"]
        cpu = r["cpu_seconds"] / max(a["cpu_seconds"], 1e-9)
        memory = r["peak_bytes"] / max(a["peak_bytes"], 1)
        print(
            f"- {model['name']}: {r['seconds'] / a['seconds']:.1f}× the time; {cpu:.1f}× the CPU time; "
            f"{memory:.1f}× the peak memory"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL))
    parser.add_argument("--dtype", default="float32", help="for the embedded model and --checkpoint folders")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--only-embedded", action="store_true", help="skip the test checkpoints")
    parser.add_argument("--checkpoint", action="append", default=[], help="another checkpoint folder (repeatable)")
    parser.add_argument("--workdir", default=None, help="where the test checkpoints are built (default: a temp dir)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from speed import describe_machine, machine

    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_machine(machine(args.device, getattr(torch, args.dtype), (256, 512))))
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(args.workdir or temporary)
        rows = []
        for model in models(args, workdir):
            spec = {**model, "device": args.device, "runs": args.runs, "threads": args.threads}
            results = {"ask": measure({**spec, "operation": "ask"})}
            for operation in OPERATIONS[1:]:
                results[operation] = measure({**spec, "operation": operation, "answer": results["ask"]["text"]})
            rows.append((model, results))
            print(f"measured {model['name']}: the answer {results['ask']['text']!r}", flush=True)
    report(rows, args.runs)


if __name__ == "__main__":
    main()
