"""Load test: many simultaneous clients against the app, on loopback only; bounded in count and time.

    python benchmarks/load_test.py [--clients 30] [--queue-size 16] [--max-batch-size 1] [--model …]

Starts the app in this process as `python app.py` does, renders one distinct shapes scene per client
(blipdemo.tiny.scenes, docs/scenes.md) with a question from the scenes' own generator, so every client sends its
own picture and question and the right answer is known. The clients are built first; then all submit to /ask at
once, and each one's latency runs from its submit to its answer. Prints what each client sent and got, and a
summary: answered correctly, answered wrongly, told "queue full", failed, p50/p95 latency of the answered ones.
``--max-batch-size N`` starts the app with batching (``--max-batch-size`` of app.py): concurrent questions share
the model in batches of up to N.

Every answer is also checked against the model's answer to the same request asked alone, after the load: a
wrong answer that equals it is the model's own mistake; one that differs was changed by the load (a mixed-up or
damaged answer). The script exits non-zero on a failed request or an answer changed by the load.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gradio_client import Client, handle_file  # noqa: E402
from served import serve  # noqa: E402

from blipdemo.decoding import INSTRUCTBLIP_DEFAULTS  # noqa: E402
from blipdemo.tiny import EMBEDDED_MODEL, scenes  # noqa: E402

SEED = 3_000  # the scenes' seed: training used small integers, the evaluation 20261123


def requests_for(count: int, folder: Path, seed: int) -> list[dict]:
    """One distinct scene per client (PNG in ``folder``), the families taken in turn, with the true answer."""
    rng = random.Random(seed)
    seen, requests = set(), []
    while len(requests) < count:
        scene = scenes.sample_scene(rng)
        family = scenes.SINGLE_TURN[len(requests) % len(scenes.SINGLE_TURN)]  # /ask takes no chat history
        if scene in seen or not scenes.can_ask(scene, family):  # distinct: a mixed-up answer can't pass as right
            continue
        seen.add(scene)
        question, answer = scenes.ask(scene, family, rng)
        path = folder / f"client-{len(requests):02d}.png"
        scenes.render(scene, rng).save(path)
        requests.append({"image": path, "family": family, "question": question, "expected": answer})
    return requests


def nearest_rank(values: list[float], q: float) -> float:
    return sorted(values)[max(0, math.ceil(q * len(values)) - 1)] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=1, help="app.py's --max-batch-size (1: no batching)")
    parser.add_argument("--model", default=str(EMBEDDED_MODEL))
    parser.add_argument("--timeout", type=float, default=600, help="seconds each client waits for its answer")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blipdemo-load-") as folder:
        requests = requests_for(args.clients, Path(folder), args.seed)
        run(args, requests)


def run(args, requests: list[dict]) -> None:
    """Serve, load, check and report (the scenes' files exist for the whole call)."""
    # What the app's /ask does with the decoding values these clients send (num_beams=1, the rest defaults).
    decoding = {**INSTRUCTBLIP_DEFAULTS, "num_beams": 1}

    app_args = (
        "--model",
        args.model,
        "--queue-size",
        str(args.queue_size),
        "--max-batch-size",
        str(args.max_batch_size),
    )
    with serve(*app_args) as (_, vlm, url):
        # Clients first, in parallel: building one fetches the app's config, which is not the latency measured.
        with ThreadPoolExecutor(args.clients) as pool:
            clients = list(pool.map(lambda _: Client(url, verbose=False), range(args.clients)))
        ready = threading.Barrier(args.clients)

        def one(i: int) -> dict:
            request = requests[i]
            ready.wait()  # all submit at once
            start = time.perf_counter()
            try:
                job = clients[i].submit(
                    handle_file(str(request["image"])), request["question"], num_beams=1, api_name="/ask"
                )
                got = job.result(timeout=args.timeout)
                return {"outcome": "answered", "got": got, "latency": time.perf_counter() - start}
            except Exception as e:  # noqa: BLE001 - every outcome is classified
                text = str(e).lower()
                return {"outcome": "queue full" if "queue" in text and "full" in text else f"failed: {e}"}

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, range(args.clients)))
        wall = time.perf_counter() - start
        # The same requests, one at a time after the load: what the model answers when nothing else runs.
        for request, result in zip(requests, results, strict=True):
            if result["outcome"] == "answered":
                result["alone"] = vlm.ask(str(request["image"]), request["question"], **decoding)

    right = lambda r, q: scenes.normalize_answer(r["got"]) == scenes.normalize_answer(q["expected"])  # noqa: E731
    print(f"| client | image | question sent | expected | outcome | answer | latency |\n|{'---|' * 7}")
    for i, (q, r) in enumerate(zip(requests, results, strict=True)):
        if r["outcome"] == "answered":
            r["verdict"] = "correct" if right(r, q) else "wrong"
            if r["got"].strip() != r["alone"].strip():
                r["verdict"] += f", changed by the load (alone: {r['alone']!r})"
        shown = r.get("verdict", r["outcome"])
        latency = f"{r['latency']:.2f} s" if "latency" in r else "—"
        sent = f"{q['image'].name} | {q['question']} | {q['expected']}"
        print(f"| {i} | {sent} | {shown} | {r.get('got', '—')} | {latency} |")

    answered = [r for r in results if r["outcome"] == "answered"]
    correct = sum(r["verdict"].startswith("correct") for r in answered)
    changed = sum("changed by the load" in r["verdict"] for r in answered)
    queue_full = sum(r["outcome"] == "queue full" for r in results)
    failed = [r["outcome"] for r in results if r["outcome"].startswith("failed")]
    latencies = [r["latency"] for r in answered]
    p50 = statistics.median(latencies) if latencies else float("nan")
    print(
        f'\n| clients | queue size | max batch size | answered correctly | answered wrongly | told "queue full" | '
        f"failed | p50 latency | p95 latency | wall |\n|{'---|' * 10}\n"
        f"| {args.clients} | {args.queue_size} | {args.max_batch_size} | {correct} | {len(answered) - correct} | "
        f"{queue_full} | "
        f"{len(failed)} | {p50:.2f} s | {nearest_rank(latencies, 0.95):.2f} s | {wall:.1f} s |"
    )
    print(
        f"\ncorrectness: {len(answered)} answers checked against each scene's known answer: {correct} correct, "
        f"{len(answered) - correct} wrong; {changed} differ from the model's answer to the same request alone"
    )
    print("latency: from each client's submit to its answer (clients built beforehand), answered requests only")
    for f in failed:
        print(f)
    if failed or changed:
        sys.exit(f"FAILED: {len(failed)} requests failed, {changed} answers were changed by the load")


if __name__ == "__main__":
    main()
