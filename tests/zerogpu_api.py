"""A local stand-in for ZeroGPU's device-allocation API, the one HTTP service the `spaces` package talks to.

On a ZeroGPU Space, `spaces` (pinned in requirements-dev.txt) asks ``SPACES_ZERO_DEVICE_API_URL`` for a GPU before
each decorated call and gives it back after; everything else — the forked worker pool and its reuse, pickling both
ways, the blocking close of a generator, the duration callable, the quota message — is the package's own code. This
server answers its client (``spaces/zero/api.py``, ``client.py``) as Hugging Face's does, on one machine:

- ``POST /startup-report``: 200.
- ``POST /schedule?taskId&durationSeconds[&token]…``: a lease on the lowest GPU index not leased now, as JSON
  ``{idle, nvidiaIndex, nvidiaUUID, allowToken}`` (``idle``: the index was free, so the package may reuse the worker it
  kept for that task and index); or, for a visitor (``token``, the ``X-IP-Token`` header the app received) with
  fewer seconds left than asked for (``quota``), 429 ``{left, wait}``: the package turns that into "You have exceeded
  your ZeroGPU quota (…s requested vs. …s left)".
- ``POST /allow?allowToken&pid``: a new worker announces itself (only a new one: a reused worker is never allowed
  again), which is how the record knows which process ran a lease.
- ``POST /release?allowToken&fail``: the lease ends (``fail``: the call raised, or its worker died); 404 when unknown.

Every schedule is kept in ``leases``, in order, with what it asked for and what became of it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

QUOTA_WAIT = 30  # seconds a refused visitor is told to wait


@dataclass
class Lease:
    """One ``/schedule`` call and what became of it."""

    task: int  # the package's task id: id() of the decorated function in the app's process
    seconds: int  # durationSeconds, what the call asked for
    token: str | None  # the visitor's X-IP-Token, if the app received one
    index: int | None = None  # the GPU index granted; None when refused
    refused: bool = False  # refused for quota (429)
    allow: str | None = None  # the allow token
    pid: int | None = None  # the worker that ran it (the one allowed last for this task and index)
    new_worker: bool = False  # whether a new worker was allowed for it (False: a reused one ran it)
    started: float = 0.0  # time.monotonic() of the schedule
    released: float | None = None  # time.monotonic() of the release
    failed: bool = False  # released with fail=true


class DeviceAPI:
    """The stand-in, served from a thread of the calling process: ``url`` for ``SPACES_ZERO_DEVICE_API_URL``,
    ``leases`` the record, ``quota`` {visitor token: seconds left} (visitors not named there have no limit)."""

    def __init__(self, port: int = 0) -> None:
        self.leases: list[Lease] = []
        self.quota: dict[str, int] = {}
        self._by_token: dict[str, Lease] = {}
        self._workers: dict[tuple[int, int], int] = {}  # (task, index) → pid of the worker allowed last
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                url = urlsplit(self.path)
                params = {k: v[0] for k, v in parse_qs(url.query).items()}
                status, body = api.answer(url.path, params)
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("X-Approve-Result", "quota-exceeded")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"

    def start(self) -> DeviceAPI:
        threading.Thread(target=self._server.serve_forever, name="zerogpu-api", daemon=True).start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, path: str, params: dict[str, str]) -> tuple[int, dict | None]:
        with self._lock:
            if path == "/startup-report":
                return 200, None
            if path == "/schedule":
                return self._schedule(params)
            if path == "/allow":
                lease = self._by_token.get(params.get("allowToken", ""))
                if lease is None:
                    return 404, None
                lease.pid, lease.new_worker = int(params["pid"]), True
                self._workers[lease.task, lease.index] = lease.pid
                return 200, None
            if path == "/release":
                lease = self._by_token.pop(params.get("allowToken", ""), None)
                if lease is None:
                    return 404, None
                lease.released, lease.failed = time.monotonic(), params.get("fail") == "true"
                return 200, None
            return 404, None

    def _schedule(self, params: dict[str, str]) -> tuple[int, dict]:
        token = params.get("token")
        lease = Lease(task=int(params["taskId"]), seconds=int(params["durationSeconds"]), token=token)
        lease.started = time.monotonic()
        self.leases.append(lease)
        left = self.quota.get(token) if token is not None else None
        if left is not None and lease.seconds > left:
            lease.refused = True
            return 429, {"left": left, "wait": QUOTA_WAIT}
        busy = {held.index for held in self._by_token.values()}
        lease.index = min(i for i in range(len(busy) + 1) if i not in busy)
        lease.allow = uuid.uuid4().hex
        lease.pid = self._workers.get((lease.task, lease.index))  # until a new worker announces itself
        self._by_token[lease.allow] = lease
        body = {"idle": True, "nvidiaIndex": lease.index, "nvidiaUUID": f"GPU-stand-in-{lease.index}"}
        return 200, {**body, "allowToken": lease.allow}
