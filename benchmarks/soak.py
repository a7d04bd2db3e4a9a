"""Soak: the app under long traffic — thousands of requests, Stops, vanishing visitors, hostile input — on loopback.

    python benchmarks/soak.py [--requests 2000] [--clients 16] [--max-batch-size 8] [--seed 5000]
                              [--session-capacity 256]

Starts `python app.py --max-batch-size N` (the embedded model) as a server process of its own, its log in a file, and
sends ``--requests`` requests from ``--clients`` concurrent visitors, each request one of:
- a chat turn through `/chat` (the page's Send), streamed, on a picture of its own (a distinct scene each time),
  maps on for a third of them; a sample of these is compared with the same question asked alone afterwards;
- a Stop: a long streamed answer cancelled after its first piece (``job.cancel()``, as the Stop button does);
- a visitor who vanishes: a raw queue join whose event stream is closed after the answer started (a closed tab);
- 5% hostile input: the refused files of ``tests/hazards.py`` (bytes that are no image, a truncated JPEG, an SVG, a
  decompression bomb) and out-of-range values, through `/ask`: each must be a clear message, and the next request
  served.
Reports requests served, errors by kind, answers equal to alone (sampled), the server's RSS and thread count at 10%,
50% and 100% of the requests (goals: RSS growth under 5% after the first 10%, thread count flat), and the unhandled
exceptions in the server's log (goal: none). Exits non-zero when an unexpected error, a changed answer or an
unhandled exception is seen. Bounded in count and time.

``--session-capacity`` is the app's: Gradio keeps every visitor's session (one per vanished visitor) up to that many,
or an hour. At the default 256 the store is still filling after 2,000 requests (16 visitors + ~226 who vanished);
since the app's sessions are lean (blipdemo/ui/sessions.py: ~30 KiB each instead of ~200 KiB) that costs little.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import httpx  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from hazards import REFUSED  # noqa: E402
from hazards import build as build_hazards  # noqa: E402
from served import free_port  # noqa: E402
from speed import describe_machine, machine  # noqa: E402

import blipdemo  # noqa: E402
from blipdemo.tiny import EMBEDDED_MODEL, scenes  # noqa: E402

D = blipdemo.INSTRUCTBLIP_DEFAULTS
MAP_SETTINGS = ["Attention", "All (mean)", "All (mean)", "All (mean)", "All (mean)"]
ANSWER = ["Beam search", 1, 32, 1, D["top_p"], D["temperature"], D["repetition_penalty"], 1.0]
LONG = ["Beam search", 1, 64, 48, D["top_p"], D["temperature"], D["repetition_penalty"], 1.0]  # to stop midway
ALONE = dict(num_beams=1, max_new_tokens=32, min_new_tokens=1, repetition_penalty=D["repetition_penalty"])
ALONE["length_penalty"] = 1.0
HOSTILE_VALUES = {  # /ask parameters → what the message must say
    "num_beams=0": ({"num_beams": 0}, "num_beams must be"),
    "top_p=2": ({"method": "Nucleus sampling", "top_p": 2.0}, "top_p must be"),
    "max_new_tokens=-1": ({"max_new_tokens": -1}, "max_new_tokens must be"),
}
LONG_INSTRUCTION = "Describe the image. " * 300  # over the app's 4,000 characters


def start_server(port: int, batch: int, log: Path, sessions: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "app.py"), "--model", str(EMBEDDED_MODEL), "--port", str(port)]
    command += ["--max-batch-size", str(batch), "--queue-size", "64", "--session-capacity", str(sessions)]
    out = log.open("w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            httpx.get(url + "config", timeout=2).raise_for_status()
            return process
        except httpx.HTTPError:
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the app did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


def text_of(chat) -> str:
    if not chat:
        return ""
    content = chat[-1].get("content") if isinstance(chat[-1], dict) else None
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


class Visitor:
    """One browser-like visitor: its own gradio_client (its own session)."""

    def __init__(self, url: str, fn_chat: int) -> None:
        self.url = url
        self.client = Client(url, verbose=False)
        self.fn_chat = fn_chat

    def chat(self, image: Path, question: str, maps: bool) -> dict:
        job = self.client.submit(
            handle_file(str(image)), question, [], maps, True, False, *ANSWER, *MAP_SETTINGS, api_name="/chat"
        )
        outputs = list(job)
        final = (job.outputs() or outputs or [None])[-1]
        answer = text_of(final[0]) if final else ""
        heat = final[2] if final and isinstance(final[2], str) else None
        return {"kind": "chat", "answer": answer.strip(), "maps": maps, "heat": heat}

    def stop(self, image: Path, question: str) -> dict:
        job = self.client.submit(
            handle_file(str(image)), question, [], True, True, False, *LONG, *MAP_SETTINGS, api_name="/chat"
        )
        for outputs in job:
            if text_of(outputs[0]):
                job.cancel()  # the Stop button cancels the event
                break
        return {"kind": "stop"}

    def vanish(self, image: Path, question: str) -> dict:
        """Join the queue by hand and close the event stream once the answer has started: a tab closed mid-answer."""
        session = uuid.uuid4().hex
        with httpx.Client(timeout=60) as http:
            with image.open("rb") as f:
                path = http.post(self.url + "gradio_api/upload", files={"files": (image.name, f)}).json()[0]
            picture = {"path": path, "orig_name": image.name, "meta": {"_type": "gradio.FileData"}}
            data = [picture, question, [], True, True, False, *LONG, *MAP_SETTINGS]
            body = {"data": data, "fn_index": self.fn_chat, "session_hash": session, "event_data": None}
            http.post(self.url + "gradio_api/queue/join", json={**body, "trigger_id": None}).raise_for_status()
            with http.stream("GET", self.url + "gradio_api/queue/data", params={"session_hash": session}) as stream:
                for line in stream.iter_lines():
                    if "process_generating" in line:
                        break  # the answer has started: leaving the block closes the connection
                    if "process_completed" in line:  # it ended before it began: a refused request, not a vanish
                        return {"kind": "vanish", "error": f"ended before the answer started: {line[:200]}"}
        return {"kind": "vanish"}

    def hostile(self, which: str, files: dict[str, Path], image: Path) -> dict:
        if which in REFUSED:
            arguments, expected = (handle_file(str(files[which])), "Describe the image."), REFUSED[which]
            options = {}
        elif which == "long instruction":
            arguments, expected, options = (handle_file(str(image)), LONG_INSTRUCTION), "too long", {}
        else:
            options, expected = HOSTILE_VALUES[which]
            arguments = (handle_file(str(image)), "Describe the image.")
        try:
            self.client.predict(*arguments, api_name="/ask", **options)
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            return {"kind": "hostile", "which": which, "clear": expected in str(e), "message": str(e)[:200]}
        return {"kind": "hostile", "which": which, "clear": False, "message": "answered instead of refusing"}


def unhandled(log: str) -> Counter:
    """The tracebacks in a log, one per chain, by the exception that ended it."""
    found = Counter()
    for chunk in log.split("Traceback (most recent call last):")[1:]:
        if "The above exception was the direct cause" in chunk or "During handling of the above exception" in chunk:
            continue  # a link of a chain: its end comes in a later chunk
        ends = [line for line in chunk.splitlines() if line.strip() and not line.startswith(" ")]
        found[(ends[0] if ends else "?")[:160]] += 1
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--sample", type=float, default=0.1, help="share of chat answers compared with alone")
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument(
        "--session-capacity",
        type=int,
        default=256,
        help="the app's --session-capacity: Gradio keeps this many visitors' sessions",
    )
    parser.add_argument("--limit", type=float, default=3 * 3600, help="seconds at most, then the soak stops")
    args = parser.parse_args(argv)
    print(describe_machine(machine("cpu", torch.float32, (1024,))))
    with tempfile.TemporaryDirectory(prefix="blipdemo-soak-") as folder:
        return soak(args, Path(folder))


def soak(args, folder: Path) -> int:
    rng = random.Random(args.seed)
    hazards = build_hazards(folder / "hazards")
    hostile_kinds = [*REFUSED, *HOSTILE_VALUES, "long instruction"]
    plan = []  # (kind, scene, question) for every request, decided up front (reproducible)
    for i in range(args.requests):
        scene = scenes.sample_scene(rng)
        family = rng.choice([f for f in scenes.SINGLE_TURN if scenes.can_ask(scene, f)])
        question = scenes.ask(scene, family, rng)[0]
        path = folder / f"scene-{i:05d}.png"
        scenes.render(scene, rng).save(path)
        roll = rng.random()
        kind = "hostile" if roll < 0.05 else "stop" if roll < 0.15 else "vanish" if roll < 0.25 else "chat"
        extra = rng.choice(hostile_kinds) if kind == "hostile" else (rng.random() < 1 / 3)  # hostile kind / maps on
        plan.append((kind, path, question, extra))

    log = folder / "server.log"
    port = free_port()
    server = start_server(port, args.max_batch_size, log, args.session_capacity)
    url = f"http://127.0.0.1:{port}/"
    results: list[dict] = []
    samples: dict[str, tuple[int, float]] = {}
    lock, began = threading.Lock(), time.perf_counter()
    marks = {max(1, round(args.requests * k / 10)): f"{10 * k}%" for k in range(1, 11)}
    process = psutil.Process(server.pid)
    try:
        with ThreadPoolExecutor(args.clients) as pool:
            first = Visitor(url, 0)
            fn_chat = first.client._infer_fn_index("/chat", None)
            visitors = [first, *pool.map(lambda _: Visitor(url, fn_chat), range(args.clients - 1))]
            for v in visitors:
                v.fn_chat = fn_chat
            free = list(visitors)
            free_lock = threading.Lock()

            def one(i: int) -> None:
                kind, path, question, extra = plan[i]
                with free_lock:
                    visitor = free.pop()
                try:
                    if time.perf_counter() - began > args.limit:
                        result = {"kind": kind, "error": "skipped: the soak's time limit"}
                    elif kind == "chat":
                        result = visitor.chat(path, question, extra)
                    elif kind == "stop":
                        result = visitor.stop(path, question)
                    elif kind == "vanish":
                        result = visitor.vanish(path, question)
                    else:
                        result = visitor.hostile(extra, hazards, path)
                except Exception as e:  # noqa: BLE001 - every outcome is classified
                    result = {"kind": kind, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                finally:
                    with free_lock:
                        free.append(visitor)
                with lock:
                    results.append({"i": i, "question": question, "image": path, **result})
                    done = len(results)
                    if done in marks:
                        samples[marks[done]] = (process.memory_info().rss, process.num_threads())

            list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - began
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    # A sample of the chat answers, asked alone (the app's dtype and options), after the load.
    vlm = blipdemo.load(EMBEDDED_MODEL)
    chats = [r for r in results if r["kind"] == "chat" and "error" not in r]
    sampled = random.Random(args.seed + 1).sample(chats, max(1, round(len(chats) * args.sample))) if chats else []
    changed = [r for r in sampled if r["answer"] != vlm.ask(str(r["image"]), r["question"], **ALONE)]
    no_maps = [r for r in chats if r["maps"] and r["answer"] and not r["heat"]]
    errors = Counter(r["error"].split(":")[0] for r in results if "error" in r)
    hostile = [r for r in results if r["kind"] == "hostile" and "error" not in r]
    unclear = [r for r in hostile if not r["clear"]]
    text = log.read_text(errors="replace")
    tracebacks = unhandled(text)

    kinds = Counter(r["kind"] for r in results)
    print(
        f"\nrequests: {len(results)} in {wall:.0f} s ({len(results) / wall:.1f}/s) from {args.clients} clients; "
        f"max batch size {args.max_batch_size}; session capacity {args.session_capacity}; "
        f"the server {'stayed up' if alive else 'DIED'}"
    )
    print("| kind | sent | errors |\n|---|---|---|")
    for kind in ("chat", "stop", "vanish", "hostile"):
        print(f"| {kind} | {kinds[kind]} | {sum(1 for r in results if r['kind'] == kind and 'error' in r)} |")
    print(f"\nerrors by kind: {dict(errors) or 'none'}")
    print(f"hostile input: {len(hostile)} sent, {len(hostile) - len(unclear)} refused with a clear message")
    for r in unclear[:5]:
        print(f"  unclear: {r['which']}: {r['message']}")
    print(
        f"answers equal to alone: {len(sampled) - len(changed)} of {len(sampled)} sampled; maps missing: {len(no_maps)}"
    )
    print("\n| point | server RSS | threads |\n|---|---|---|")
    for name in (f"{10 * k}%" for k in range(1, 11)):
        if name in samples:
            rss, threads = samples[name]
            print(f"| {name} | {rss / 2**20:.0f} MiB | {threads} |")
    growth = float("nan")
    if "10%" in samples and "100%" in samples:
        growth = 100 * (samples["100%"][0] - samples["10%"][0]) / samples["10%"][0]
        thread_change = samples["100%"][1] - samples["10%"][1]
        print(f"\nRSS growth after the first 10%: {growth:+.1f}% (goal < 5%); threads {thread_change:+d} (goal: flat)")
    print(f"unhandled exceptions in the server's log: {sum(tracebacks.values())} (goal: 0)")
    for last, count in tracebacks.most_common():
        print(f"  {count} × {last}")
    bad = len(errors) + len(unclear) + len(changed) + len(no_maps) + sum(tracebacks.values()) + (not alive)
    if bad:
        print("FAILED: see above")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
