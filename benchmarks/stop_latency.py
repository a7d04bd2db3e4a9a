"""How fast a generation ends when its user stops it or goes away, measured against the running app.

    python benchmarks/stop_latency.py [--runs 3] [--step 0.1] [--no-browser] [--no-zerogpu]

The app runs on the embedded model with every LM step slowed to ``--step`` seconds (a long generation: at least
64 new tokens), in this process, as `python app.py` builds it. Two seconds into each generation the client:
cancels its job (gradio_client), is killed (SIGKILL), hangs up a plain HTTP event stream, presses Stop in
Chromium, or closes the tab. Measured: seconds until the generation thread is gone. On ZeroGPU (Hugging Face's own
`spaces` package in its ZeroGPU mode, against the local stand-in of its device API, tests/zerogpu_api.py) the app
runs in a subprocess, the GPU worker is kept for the next call, and the measure is until the call's GPU lease is
released after a cancel (the worker has stopped generating and is free).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from served import free_port, generating  # noqa: E402

import app as app_module  # noqa: E402

IMAGE = str(ROOT / "assets" / "examples" / "shapes-14.png")
QUESTION = "Describe the image."
LONG = (4, 200, 64)  # num_beams, max_new_tokens, min_new_tokens: at least 64 slowed steps


def wait(condition, limit: float = 60.0) -> float:
    """Seconds until ``condition()`` holds (polled every 5 ms), or raise after ``limit``."""
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > limit:
            raise TimeoutError("the condition did not come within the limit")
        time.sleep(0.005)
    return time.perf_counter() - start


def two_seconds_in() -> None:
    wait(generating)
    time.sleep(2)
    assert generating(), "the generation should still run two seconds in"


def in_process(url: str, runs: int, browser: bool) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    client = Client(url, verbose=False)
    for method in ("Beam search", "Nucleus sampling"):
        for _ in range(runs):
            job = client.submit(handle_file(IMAGE), QUESTION, method, *LONG, api_name="/stream")
            two_seconds_in()
            start = time.perf_counter()
            job.cancel()  # returns once the server has handled the cancel
            wait(lambda: not generating())
            found.setdefault(f"gradio_client cancels ({method})", []).append(time.perf_counter() - start)
            time.sleep(0.3)
        for _ in range(runs):
            code = (
                "from gradio_client import Client, handle_file; "
                f"Client({url!r}, verbose=False).predict(handle_file({IMAGE!r}), {QUESTION!r}, {method!r}, "
                f"{LONG[0]}, {LONG[1]}, {LONG[2]}, api_name='/ask')"
            )
            process = subprocess.Popen([sys.executable, "-c", code])
            two_seconds_in()
            process.send_signal(signal.SIGKILL)
            start = time.perf_counter()
            wait(lambda: not generating())
            found.setdefault(f"gradio_client process killed ({method}, /ask)", []).append(time.perf_counter() - start)
            process.wait()
            time.sleep(0.3)
    with open(IMAGE, "rb") as f:
        path = httpx.post(url + "gradio_api/upload", files={"files": f}).json()[0]
    image = {"path": path, "meta": {"_type": "gradio.FileData"}}
    for _ in range(runs):
        data = [image, QUESTION, "Beam search", *LONG, 0.9, 1.0, 1.5, 1.0, True]
        event = httpx.post(url + "gradio_api/call/ask", json={"data": data}).json()["event_id"]
        with httpx.stream("GET", url + f"gradio_api/call/ask/{event}", timeout=30):
            two_seconds_in()
        start = time.perf_counter()
        wait(lambda: not generating())
        found.setdefault("plain HTTP client hangs up (/ask)", []).append(time.perf_counter() - start)
        time.sleep(0.3)
    if browser:
        from browser import AVAILABLE, click_example, launch, open_app, set_slider

        if not AVAILABLE:
            print("Debian's chromium is not installed: no browser rows")
            return found
        with launch() as chromium:
            for how in ("Stop pressed (beam search)", "tab closed (beam search)"):
                for _ in range(runs):
                    page = open_app(chromium, url)
                    click_example(page, 0)
                    page.locator("#decoding").get_by_text("Decoding").click()
                    set_slider(page, "min-new-tokens", LONG[2])
                    page.locator("#send").click()
                    two_seconds_in()
                    start = time.perf_counter()
                    page.locator("#stop").click() if how.startswith("Stop") else page.close()
                    wait(lambda: not generating())
                    found.setdefault(how, []).append(time.perf_counter() - start)
                    if how.startswith("Stop"):
                        page.close()
                    time.sleep(0.3)
    return found


def zerogpu(runs: int, step: float) -> dict[str, list[float]]:
    from zerogpu_api import DeviceAPI

    api = DeviceAPI().start()
    port = free_port()
    command = [sys.executable, str(ROOT / "tests" / "zerogpu_app.py"), "--slow-lm", str(step), "--port", str(port)]
    env = {**os.environ, "SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": api.url, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    found: dict[str, list[float]] = {}
    try:
        url = f"http://127.0.0.1:{port}/"
        wait(lambda: _up(url), limit=180)
        client = Client(url, verbose=False)
        for method in ("Beam search", "Nucleus sampling"):
            for _ in range(runs):
                since = len(api.leases)
                job = client.submit(handle_file(IMAGE), QUESTION, method, *LONG, api_name="/stream")
                wait(lambda since=since: len(api.leases) > since)
                lease = api.leases[since]
                time.sleep(2)
                assert lease.released is None, "the call should still hold its GPU two seconds in"
                start = time.monotonic()
                job.cancel()
                wait(lambda lease=lease: lease.released is not None)
                found.setdefault(f"ZeroGPU: gradio_client cancels ({method}), GPU lease released", []).append(
                    lease.released - start
                )
                time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(timeout=30)
        api.close()
    return found


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--step", type=float, default=0.1, help="seconds each LM step sleeps")
    p.add_argument("--no-browser", action="store_true")
    p.add_argument("--no-zerogpu", action="store_true")
    args = p.parse_args()
    found: dict[str, list[float]] = {}
    flags = app_module.parse_args(["--model", str(app_module.EMBEDDED_MODEL), "--port", "0"])
    demo, vlm = app_module.build_demo(flags)
    forward = vlm.language_model.forward

    def slow_forward(*a, **k):
        time.sleep(args.step)
        return forward(*a, **k)

    vlm.language_model.forward = slow_forward
    flags.port = free_port()
    demo.launch(prevent_thread_lock=True, quiet=True, **app_module.launch_options(flags))
    try:
        found.update(in_process(f"http://127.0.0.1:{flags.port}/", args.runs, not args.no_browser))
    finally:
        demo.close()
    if not args.no_zerogpu:
        found.update(zerogpu(args.runs, args.step))
    print(f"\nLM slowed to {args.step} s a step; stopped two seconds into a generation of at least {LONG[2]} tokens")
    print("| how the generation is stopped | runs | min | median | max |")
    print("|---|---|---|---|---|")
    for how, times in found.items():
        print(f"| {how} | {len(times)} | {min(times):.3f} s | {statistics.median(times):.3f} s | {max(times):.3f} s |")


if __name__ == "__main__":
    main()
