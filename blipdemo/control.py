"""Generation control for the app: who is generating, how to stop them, and the bridge to the GPU entry point.

- Each call of the GPU entry points — an answer, a remap — runs under a run id, registered under its Gradio
  session: the Stop button and a client that goes away stop every run of that session, and only those.
- ``Generations.answers`` pulls from ``gpu.answer`` (a plain generator, on ZeroGPU a forked worker behind it) in
  worker threads, so the event loop stays free; when Gradio cancels the event, ``finally`` flips the run's switch
  (in this process) and closes the generator (which is what reaches a ZeroGPU worker). ``Generations.remap`` runs
  ``gpu.remap`` in a worker thread the same way.
- A client that vanishes without cancelling is caught from Gradio's queue (``_watch``).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NamedTuple

import anyio

from . import gpu
from .question import Question

log = logging.getLogger(__name__)
_DONE = object()  # next()'s default: the generator has ended


class _Run(NamedTuple):
    id: str
    stop: threading.Event


class Generations:
    """The running generations of one app, by session; ``answers`` starts one."""

    def __init__(self, model_key: str) -> None:
        self.model_key = model_key
        self.blocks = None  # the Gradio app whose queue reports vanished clients (set by the UI)
        self._runs: dict[str, dict[str, threading.Event]] = {}  # session hash → {run id: its stop switch}

    async def answers(self, session: str | None, question: Question) -> AsyncIterator[tuple[str, object]]:
        """``gpu.answer``'s items for a checked question, each new one once (heartbeats are dropped): ("text", …),
        then ("ids", …) and ("maps", …) — under a run id of this session."""
        self._watch()
        text = None
        async with self._run(session) as run:
            iterator = gpu.answer(self.model_key, question, run.id)
            try:
                while (item := await anyio.to_thread.run_sync(next, iterator, _DONE)) is not _DONE:
                    kind, value = item
                    if kind == "text" and value == text:  # a heartbeat: nothing new
                        continue
                    text = value if kind == "text" else text
                    yield item
            finally:
                run.stop.set()
                with anyio.CancelScope(shield=True):
                    # A cancelled await may leave a next() running in its worker thread; with the switch set (or,
                    # on ZeroGPU, at the next heartbeat) it returns, and close() then ends the generation.
                    while True:
                        try:
                            await anyio.to_thread.run_sync(iterator.close)
                            break
                        except ValueError:  # "generator already executing"
                            await anyio.sleep(0.01)

    async def remap(self, session: str | None, question: Question, ids: list[int]):
        """``gpu.remap``: an answer's maps as ``question.maps`` says, under a run id of this session (Stop and a
        vanished client end it too); None when it was stopped."""
        self._watch()
        async with self._run(session) as run:
            try:
                return await anyio.to_thread.run_sync(gpu.remap, self.model_key, question, ids, run.id)
            finally:
                run.stop.set()  # a cancelled await leaves the pass running in its thread: it ends at its next check

    @asynccontextmanager
    async def _run(self, session: str | None) -> AsyncIterator[_Run]:
        """A run id of ``session`` with its stop switch, known to ``gpu`` and to ``stop`` while the block lasts."""
        session = session or "default"
        run = uuid.uuid4().hex
        with gpu.switch(run) as stop:
            self._runs.setdefault(session, {})[run] = stop
            try:
                yield _Run(run, stop)
            finally:
                self._forget(session, run)

    def _forget(self, session: str, run: str) -> None:
        runs = self._runs.get(session, {})
        runs.pop(run, None)
        if not runs:
            self._runs.pop(session, None)

    def stop(self, session: str | None) -> None:
        """End every generation of this session (the generation threads, not just the streams)."""
        for switch in list(self._runs.get(session or "default", {}).values()):
            switch.set()

    def _watch(self) -> None:
        """Stop a session's generations the moment its client goes away.

        When a client's event stream closes (tab closed, page left, client process killed), Gradio's queue calls
        ``clean_events(session_hash=...)`` at once, but only marks the job dead: the running handler is not
        cancelled, and a beam search (which sends nothing until the end) or an ``/ask`` call would run to its
        end. We hook that call on the queue in use (``demo.queue()`` replaces the queue, so this runs lazily,
        from the handlers). A connection that dies silently (no FIN from the peer) is seen only when Gradio's
        next heartbeat write fails.
        """
        queue = getattr(self.blocks, "_queue", None)
        clean = getattr(queue, "clean_events", None)
        if queue is None or getattr(clean, "blipdemo_watch", False):  # not served by a queue, or hooked already
            return
        if not callable(clean):  # pragma: no cover - a Gradio without the hook: only streams notice a vanished reader
            log.warning("This Gradio's queue has no clean_events: a vanished client is noticed only by streams")
            return

        async def clean_events(*, session_hash: str | None = None, event_id: str | None = None) -> None:
            if session_hash is not None:
                self.stop(session_hash)
            await clean(session_hash=session_hash, event_id=event_id)

        clean_events.blipdemo_watch = True
        queue.clean_events = clean_events
