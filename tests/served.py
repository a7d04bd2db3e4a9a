"""Start the app exactly as `python app.py` does (same build and launch options), in this process."""

from __future__ import annotations

import socket
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
