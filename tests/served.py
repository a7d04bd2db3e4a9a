"""Start the app exactly as `python app.py` does (same build and launch options), in this process."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import app as app_module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(*flags: str):
    """Yields (demo, model, url) for `app.py *flags --port <free port>`; closes the server afterwards."""
    args = app_module.parse_args([*flags, "--port", str(free_port())])
    demo, vlm = app_module.build_demo(args)
    demo.launch(prevent_thread_lock=True, quiet=True, **app_module.launch_options(args))
    try:
        yield demo, vlm, f"http://127.0.0.1:{args.port}/"
    finally:
        demo.close()


def generating() -> bool:
    """Whether a generation thread (``vlm.stream``'s worker) is running in this process."""
    return any(t.name == "blipdemo-generate" for t in threading.enumerate())


def wait_for_generation(limit: float = 60) -> None:
    """Return once a generation thread runs (or after ``limit`` seconds)."""
    started = time.perf_counter()
    while not generating() and time.perf_counter() - started < limit:
        time.sleep(0.02)


def freed_after(limit: float = 5) -> float:
    """Seconds until no generation thread runs (``limit`` if one still does)."""
    left = time.perf_counter()
    while generating() and time.perf_counter() - left < limit:
        time.sleep(0.01)
    return time.perf_counter() - left
