"""Load test: many simultaneous clients against the app, on loopback only; bounded in count and time.

    python benchmarks/load_test.py [--clients 30] [--queue-size 16] [--model assets/shapes-instructblip]

Starts the app in this process as `python app.py` does, fires N clients at /ask at once (each with its own
scene and question, so a mixed-up answer would show), and reports served / told "queue full" / failed and
the p50/p95 latency of the served ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gradio_client import Client, handle_file  # noqa: E402
from served import serve  # noqa: E402

EXAMPLES = ROOT / "assets" / "examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--model", default=str(ROOT / "assets" / "shapes-instructblip"))
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    manifest = json.loads((EXAMPLES / "examples.json").read_text())
    with serve("--model", args.model, "--queue-size", str(args.queue_size)) as (_, _, url):

        def one(i: int):
            example = manifest[i % len(manifest)]
            start = time.perf_counter()
            try:
                got = Client(url, verbose=False).predict(
                    handle_file(str(EXAMPLES / example["image"])), example["question"], num_beams=1, api_name="/ask"
                )
                ok = got.strip().lower() == example["answer"]
                return ("served" if ok else "wrong answer"), time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 - every outcome is classified
                text = str(e).lower()
                return ("queue full" if "queue" in text and "full" in text else f"failed: {e}"), None

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            outcomes = list(pool.map(one, range(args.clients), timeout=args.timeout))
        wall = time.perf_counter() - start
    kinds = [k for k, _ in outcomes]
    latencies = sorted(t for k, t in outcomes if k == "served")
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")
    print("| clients | served | queue full | wrong | failed | p50 latency | p95 latency | wall |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.clients} | {kinds.count('served')} | {kinds.count('queue full')} | {kinds.count('wrong answer')} | "
        f"{sum(k.startswith('failed') for k in kinds)} | {statistics.median(latencies):.2f} s | {p95:.2f} s | "
        f"{wall:.1f} s |"
    )
    for k in kinds:
        if k.startswith("failed"):
            print(k)


if __name__ == "__main__":
    main()
