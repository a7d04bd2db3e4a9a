"""The GPU entry point: everything one answer needs of the accelerator, in the shape Hugging Face ZeroGPU needs.

On a ZeroGPU Space, ``spaces.GPU`` runs the decorated generator in a *forked worker process*: the call's arguments
are pickled into the worker, each yielded item is pickled back, and closing the generator in the main process
makes the worker close its own generator after the next item it yields. So ``answer``

- takes plain data only: the image as a file path, text, (question, answer) pairs, ``DecodingOptions``, a run id;
- reaches the model through this module (``register`` puts it here before the fork; the worker inherits it);
- yields plain data only: ``("text", answer so far)`` and, last, ``("maps", {...numpy arrays...})``;
- yields a heartbeat (the unchanged text) every ``HEARTBEAT`` seconds while nothing new arrives, so that a closed
  generator is noticed even in a beam search, which sends nothing until it ends.

Anywhere else the decorator does nothing and ``answer`` runs in the app's own process, where a Stop also reaches
a running generation through its run id's switch (``switch``), within one decoding step.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import gradio as gr
import torch

from .decoding import DecodingOptions
from .images import ImageError

HEARTBEAT = 0.5  # seconds between heartbeats while a generation sends nothing (beam search)
# The reader pulls the next piece as soon as it has passed one on; a piece left unpulled this long means the
# client is gone without a word (Gradio drops a disconnected event without closing its generator).
READER_TIMEOUT = 0.5
GPU_MARGIN = 30  # seconds of GPU time asked for on top of the generation's own time limit (the maps, start-up)

_models: dict[str, object] = {}  # model key → loaded model, set before any fork
_home = os.getpid()  # the process that loaded the models; a ZeroGPU worker is a fork of it
_switches: dict[str, threading.Event] = {}  # run id → stop switch of a generation running in this process


def register(vlm) -> str:
    """Make ``vlm`` reachable from ``answer`` (and from a ZeroGPU worker forked later); returns its key."""
    global _home
    key = f"model-{id(vlm)}"
    _models[key] = vlm
    _home = os.getpid()
    return key


@contextmanager
def switch(run: str) -> Iterator[threading.Event]:
    """A stop switch for the run id ``run``, known to ``answer`` for as long as the block lasts."""
    event = _switches[run] = threading.Event()
    try:
        yield event
    finally:
        _switches.pop(run, None)


def gpu_seconds(model: str, *args, **kwargs) -> int:
    """How long ZeroGPU should hold a GPU for one ``answer`` call: the generation's limit plus a margin."""
    vlm = _models.get(model)
    limit = getattr(vlm, "generation_time_limit", None) or 120
    return int(limit) + GPU_MARGIN


def _in_this_process(model: str):
    """The model ``model`` names, with one CPU thread when this is a forked worker: GNU OpenMP is not fork-safe —
    loading already ran parallel CPU work in the parent, so a parallel CPU region here would hang for good. The
    heavy work runs on the GPU; one CPU thread is enough."""
    if os.getpid() != _home:
        torch.set_num_threads(1)
    return _models[model]


@contextmanager
def _user_errors(out_of_memory: str) -> Iterator[None]:
    """Errors a user can act on, as ``gr.Error`` (it pickles across the fork): a bad image or a value out of range
    with its own message, running out of memory with ``out_of_memory``."""
    try:
        yield
    except (ImageError, ValueError) as e:
        raise gr.Error(str(e)) from e
    except torch.OutOfMemoryError as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise gr.Error(out_of_memory) from e


try:  # Hugging Face ZeroGPU: a GPU is attached only while a decorated function runs
    import spaces

    on_gpu = spaces.GPU(duration=gpu_seconds)
except ImportError:  # anywhere else: nothing special

    def on_gpu(fn):
        return fn


@on_gpu
def answer(
    model: str,
    image: str,
    instruction: str,
    history: Sequence[tuple[str, str]],
    options: DecodingOptions,
    template: bool = True,
    maps: bool = False,
    run: str | None = None,
) -> Iterator[tuple[str, object]]:
    """Generate an answer (and its attention maps), yielding plain data.

    ``("text", the answer so far)`` as it grows (and unchanged as a heartbeat), then, with ``maps`` and a
    non-empty answer, ``("maps", {"text", "tokens", "token_maps", "image_map"})``. A bad image, a value out of
    range or an out-of-memory error is a ``gr.Error`` with a message for the user (it pickles across the fork).
    """
    vlm = _in_this_process(model)
    # The run's switch (Stop, or the client left); without a run id (a direct call) a switch of its own.
    stop = (_switches.get(run) if run else None) or threading.Event()
    text = ""
    oom = "The model ran out of memory on this request. Try a smaller image, fewer beams or fewer new tokens."
    with _user_errors(oom):
        answer_ = vlm.start(
            image,
            instruction,
            history=history,
            options=options,
            template=template,
            stop_event=stop,
            heartbeat=HEARTBEAT,
        )
        for piece in answer_:
            text += piece
            # The reader pulls the next item as soon as it has passed one on: one left unpulled for READER_TIMEOUT
            # means the client is gone without a word (Gradio drops a disconnected event without closing us).
            reader = threading.Timer(READER_TIMEOUT, stop.set)
            reader.daemon = True
            reader.start()
            try:
                yield "text", text
            finally:
                reader.cancel()
        if maps and text.strip() and not stop.is_set():
            ids = answer_.ids
            yield "maps", {**maps_data(vlm.explain_prepared(answer_.inputs, ids, text.strip())), "ids": ids.tolist()}


def maps_data(e) -> dict:
    """An ``Explanation`` as plain data (it pickles across a ZeroGPU fork): the picture stays with the caller."""
    return {
        "text": e.text,
        "tokens": e.tokens,
        "token_maps": e.token_maps,
        "image_map": e.image_map,
        "query_maps": e.query_maps,
        "query_weights": e.query_weights,
        "method": e.method,
    }


@on_gpu
def remap(
    model: str,
    image: str,
    instruction: str,
    history: Sequence[tuple[str, str]],
    template: bool,
    max_new_tokens: int,
    ids: list[int],
    selection: dict,
) -> dict:
    """The maps of an answer already given (its token ``ids``, asked with ``max_new_tokens``, which decides how much
    history fitted) with another method, layers or heads (``selection``: ``Service.explain``'s map options): one
    teacher-forced pass (relevancy: and its backward passes), no generation. Errors as in ``answer``."""
    vlm = _in_this_process(model)
    with _user_errors("The model ran out of memory making these maps. Try the attention method."):
        inputs = vlm.prepare(image, instruction, history, max_new_tokens, template=template)
        return maps_data(vlm.explain_prepared(inputs, torch.tensor(ids, dtype=torch.long), **selection))
