"""A test double of Hugging Face's ``spaces`` package: ``spaces.GPU`` under ZeroGPU's contract, on the CPU.

What the real package does on a ZeroGPU Space (``spaces/zero/wrappers.py``), kept here:
- the decorated function runs in a worker process made with ``fork`` (so module-level objects, such as a loaded
  model, reach it without pickling), never in the calling process;
- the call's arguments are pickled into the worker (a lock or an event among them fails the call there);
- a generator's items are pickled back one by one (an item that cannot be pickled fails the call);
- closing the generator in the calling process sets a stop event; the worker checks it after the *next* item its
  generator yields, then closes its generator;
- a ``gr.Error`` raised in the worker reaches the caller as itself; any other exception as
  ``gr.Error("ZeroGPU worker error")`` naming its class; a worker that dies aborts the call;
- ``duration`` may be a callable, called with the call's arguments.
Simplified: each call gets a fresh worker (the real one reuses an idle worker), and no GPU is attached.
``WORKERS`` lists the pids of the workers this process started (tests look for them).
"""

from __future__ import annotations

import functools
import inspect
import multiprocessing
import threading
import traceback
from pickle import PicklingError

import gradio as gr

_fork = multiprocessing.get_context("fork")
forked = False  # True inside a worker: decorated calls made there run directly, as in the real package
WORKERS: list[int] = []


def GPU(task=None, *, duration=None, **_ignored):  # noqa: N802 - the real package's name
    """``@spaces.GPU`` or ``@spaces.GPU(duration=...)``."""
    if task is None:
        return functools.partial(GPU, duration=duration)
    return _generator(task, duration) if inspect.isgeneratorfunction(task) else _regular(task, duration)


def _failure(e: BaseException) -> tuple:
    if isinstance(e, gr.Error):
        return ("error", e)
    print("".join(traceback.format_exception(type(e), e, e.__traceback__)), flush=True)
    return ("error", gr.Error(f"ZeroGPU worker error: {type(e).__name__}"))


def _start(target, duration, args, kwargs):
    """A forked worker with the call's arguments pickled into it: (process, results queue, stop event)."""
    if callable(duration):
        duration(*args, **kwargs)
    arguments, results, stop = _fork.SimpleQueue(), _fork.SimpleQueue(), _fork.Event()
    process = _fork.Process(target=target, args=(arguments, results, stop), daemon=True)
    process.start()
    WORKERS.append(process.pid)

    def reap() -> None:  # the real package's sentinel: a worker that dies without a word aborts the call
        process.join()
        results.put(("aborted", None))

    threading.Thread(target=reap, daemon=True).start()
    try:
        arguments.put((args, kwargs))
    except (PicklingError, TypeError, AttributeError):
        process.kill()
        raise
    return process, results, stop


def _raise(kind: str, value) -> None:
    if kind == "error":
        raise value
    raise gr.Error("ZeroGPU worker error: GPU task aborted")


def _generator(task, duration):
    def work(arguments, results, stop) -> None:
        global forked
        forked = True
        args, kwargs = arguments.get()
        gen = task(*args, **kwargs)
        while True:
            try:
                item = next(gen)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - every failure goes back to the caller
                results.put(_failure(e))
                return
            if stop.is_set():
                gen.close()
                break
            try:
                results.put(("ok", item))
            except (PicklingError, TypeError, AttributeError) as e:
                results.put(_failure(e))
                return
        results.put(("end", None))

    @functools.wraps(task)
    def handler(*args, **kwargs):
        if forked:
            yield from task(*args, **kwargs)
            return
        _, results, stop = _start(work, duration, args, kwargs)
        while True:
            kind, value = results.get()
            if kind == "end":
                return
            if kind != "ok":
                _raise(kind, value)
            try:
                yield value
            except GeneratorExit:
                stop.set()
                raise

    return handler


def _regular(task, duration):
    def work(arguments, results, stop) -> None:
        global forked
        forked = True
        args, kwargs = arguments.get()
        try:
            value = task(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the caller
            results.put(_failure(e))
            return
        try:
            results.put(("ok", value))
        except (PicklingError, TypeError, AttributeError) as e:
            results.put(_failure(e))

    @functools.wraps(task)
    def handler(*args, **kwargs):
        if forked:
            return task(*args, **kwargs)
        _, results, _ = _start(work, duration, args, kwargs)
        kind, value = results.get()
        if kind != "ok":
            _raise(kind, value)
        return value

    return handler
