"""The GPU entry point: everything one answer needs of the accelerator, in the shape Hugging Face ZeroGPU needs.

On a ZeroGPU Space, ``spaces.GPU`` runs the decorated generator in a *forked worker process*: the call's arguments
are pickled into the worker, each yielded item is pickled back, and closing the generator in the main process
makes the worker close its own generator after the next item it yields. So ``answer`` and ``remap``

- take picklable values only: a model key, the checked ``Question`` (its picture decoded once, at the edge), a run id
  (``remap``: and the answer's token ids);
- reach the model through this module (``register`` puts it here before the fork; the worker inherits it);
- give back picklable values only: text, token ids, an ``Explanation`` without its picture (the caller has it);
- ``answer`` yields a heartbeat (the unchanged text) every ``HEARTBEAT`` seconds while nothing new arrives, so that a
  closed generator is noticed even in a beam search, which sends nothing until it ends;
- never raise a user's error in the worker: it comes back as a value, raised in the caller's process (the package
  keeps a worker for the next call only when its call ended without raising).

Anywhere else the decorator does nothing and both run in the app's own process, where a Stop (or a client that went
away, ``control``) reaches them through their run id's switch (``switch``): a generation within one decoding step,
a remap before its pass or between relevancy's gradient chunks. Nothing here times the reader: a busy event loop
that pulls late is not a vanished client.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace

import torch
from PIL import Image

from .attention import Explanation
from .batching import SchedulerError
from .errors import UserError
from .heatmap import reduced
from .images import ImageError
from .question import Question
from .teacher_forced import Stopped

log = logging.getLogger(__name__)
HEARTBEAT = 0.5  # seconds between heartbeats while a generation sends nothing (beam search)
DEFAULT_TIME_LIMIT = 120  # seconds: the most a lease asks for when the service sets no generation time limit

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


def _switch(run: str | None) -> threading.Event:
    """The stop switch of run id ``run`` (Stop, or the client left); without one (a direct call), a switch of its
    own."""
    return (_switches.get(run) if run else None) or threading.Event()


@dataclass(frozen=True)
class Costs:
    """What one call costs the model in use, in seconds of GPU time (``calibrate`` measures them)."""

    start: float  # preparing a question and its first step (image tokens, Q-Former, prefill)
    per_token: float  # one more token of a greedy or sampled answer
    per_beam_token: float  # one more token for each beam past the first
    maps_per_token: float  # the maps' pass, per answer token (relevancy's backward passes included)


# Before calibration (or where it cannot run): a 7B-class LM on a ZeroGPU H200, generously rounded up.
DEFAULT_COSTS = Costs(start=2.0, per_token=0.05, per_beam_token=0.01, maps_per_token=0.02)
LEASE_MARGIN = 1.5  # the measured costs times this, plus LEASE_FLOOR: a busy GPU or a long prompt still fits
LEASE_FLOOR = 5  # seconds, on top of every lease (the worker's own start)
LOOK_SIDE = 800  # px: a look-closer crop as it travels back (the page shows it smaller; remaps keep its model input)
REMAP_SECONDS = 20  # one teacher-forced pass and, for relevancy, its backward passes: a small fixed lease
CALIBRATE_SECONDS = 60  # the start-up measurement: a few short answers and their maps

_costs: dict[str, Costs] = {}  # model key → its measured costs (``calibrate``)


def answer_seconds(model: str, question: Question) -> int:
    """How long ZeroGPU should hold a GPU for one answer (through ``lease_seconds``, ``spaces.GPU``'s duration): the
    question's room for new tokens at the measured per-token cost (more for beams), its maps, a margin — never more
    than the generation's time limit. ZeroGPU refuses a call that asks for more seconds than the visitor has left,
    and schedules shorter ones first: ask for what the call needs. A look-closer question adds its look (the whole
    look runs inside the same call)."""
    vlm = _models.get(model)
    costs = _costs.get(model, DEFAULT_COSTS)
    options = question.decoding.resolved(vlm.language_model.generation_config) if vlm is not None else {}
    beams = max(1, options.get("num_beams") or 1)
    tokens = question.decoding.max_new_tokens
    seconds = costs.start + tokens * (costs.per_token + (beams - 1) * costs.per_beam_token)
    if question.maps is not None:
        seconds += tokens * costs.maps_per_token
    if question.look_closer is not None:
        # The look, step by step: a pass over the prompt (about a prefill) and the crop's ViT, about a start's cost
        # each step; a "relative" map makes two passes a step, a "gradient" one a backward pass too: twice that.
        closer = question.look_closer
        seconds += costs.start * closer.steps * (1 if closer.map == "attention" else 2)
    limit = getattr(vlm, "generation_time_limit", None) or DEFAULT_TIME_LIMIT
    return int(min(math.ceil(LEASE_MARGIN * seconds) + LEASE_FLOOR, limit))


def _in_this_process(model: str):
    """The model ``model`` names, with one CPU thread when this is a forked worker: GNU OpenMP is not fork-safe —
    loading already ran parallel CPU work in the parent, so a parallel CPU region here would hang for good. The
    heavy work runs on the GPU; one CPU thread is enough."""
    if os.getpid() != _home:
        torch.set_num_threads(1)
    return _models[model]


@contextmanager
def _user_errors(out_of_memory: str) -> Iterator[None]:
    """Errors a user can act on, as ``UserError`` (a ``gr.Error`` that pickles across the fork): a bad image or a value
    out of range with its own message, running out of memory with ``out_of_memory``."""
    try:
        yield
    except (ImageError, ValueError, SchedulerError) as e:
        raise UserError(str(e)) from e
    except torch.OutOfMemoryError as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise UserError(out_of_memory) from e


try:  # Hugging Face ZeroGPU: a GPU is attached only while a decorated function runs (elsewhere: no effect)
    import spaces

    def _gpu(duration):
        return spaces.GPU(duration=duration)

except ImportError:  # no `spaces` package: nothing special

    def _gpu(duration):
        return lambda fn: fn


def answer(model: str, question: Question, run: str | None = None) -> Iterator[tuple[str, object]]:
    """Generate the answer to a checked ``question`` (and its attention maps), yielding plain data.

    ``("text", the answer so far)`` as it grows (and unchanged as a heartbeat), then ``("ids", its token ids)``,
    then for a look-closer answer that cropped ``("look", its look_closer.Crop)`` (a light copy), then, when the
    question asks for maps and the answer is not empty, ``("maps", its Explanation)`` without the
    picture (the caller has it). ``run``: the run id whose switch (``switch``) stops it. An instruction too long for
    the model or an out-of-memory error is a ``UserError`` with a message for the user, raised here, in the caller's
    process (``on_gpu`` sends it back as an item).
    """
    error = None
    with closing(on_gpu(model, "answer", (question,), run)) as items:  # closing this generator closes the GPU's
        for kind, value in items:
            if kind == "error":  # the last item: read on to the end, so the GPU's generator ends, not closed
                error = value
                continue
            yield kind, value
    if error is not None:
        raise error


def remap(model: str, question: Question, ids: list[int], run: str | None = None) -> Explanation | None:
    """The maps of an answer already given (its token ``ids``) as ``question.maps`` now says (another method,
    layers or heads): one teacher-forced pass (relevancy: and its backward passes), no generation; the image tokens
    come from the cache. None when the run's switch ended it. Errors as in ``answer``."""
    return _one(on_gpu(model, "remap", (question, ids), run))


def calibrate(model: str, tokens: int = 16) -> Costs:
    """Measure what calls cost on the model in use, once at start-up (the leases ``answer_seconds`` asks for follow):
    a question's start, greedy and 3-beam answers of ``tokens`` tokens, and their maps; on ZeroGPU in the worker that
    serves the answers, as a real call runs."""
    return _one(on_gpu(model, "calibrate", (tokens,)))


def _one(items: Iterator[tuple[str, object]]):
    """The value of a task that gives one (its ``UserError`` raised here)."""
    (kind, value), *_ = list(items)
    if kind == "error":
        raise value
    return value


def lease_seconds(model: str, task: str, args: tuple, run: str | None = None) -> int:
    """``on_gpu``'s lease (ZeroGPU's duration, called with the call's own arguments): by task."""
    if task == "answer":
        return answer_seconds(model, args[0])
    return REMAP_SECONDS if task == "remap" else CALIBRATE_SECONDS


# One decorated entry point for every task: the `spaces` package keeps a worker per decorated function (and per GPU)
# and reuses it; one function means one worker, one copy of the weights on the GPU, for answers, remaps and the
# start-up calibration alike. A user's error comes back as an item, not raised: the package keeps a worker for the
# next call only when its call ended without raising (otherwise the next call forks a new one, and the old one
# waits, idle, for good; tests/test_zerogpu.py).
@_gpu(lease_seconds)
def on_gpu(model: str, task: str, args: tuple, run: str | None = None) -> Iterator[tuple[str, object]]:
    """Run ``task`` ("answer", "remap" or "calibrate") with ``args`` where the GPU is, yielding plain data; a
    ``UserError`` as a last item ``("error", it)``."""
    vlm = _in_this_process(model)
    stop = _switch(run)
    try:
        if task == "answer":
            yield from _answer(vlm, *args, stop)
        elif task == "remap":
            yield "maps", _remap(vlm, *args, stop)
        elif task == "calibrate":
            yield "costs", _measure(vlm, *args)
        else:
            raise ValueError(f"no GPU task {task!r}")
    except UserError as e:
        yield "error", e


def _answer(vlm, question: Question, stop: threading.Event) -> Iterator[tuple[str, object]]:
    text = ""
    oom = "The model ran out of memory on this request. Try a smaller image, fewer beams or fewer new tokens."
    with _user_errors(oom):
        generation = vlm.start(question, stop_event=stop, heartbeat=HEARTBEAT)
        for piece in generation:
            text += piece
            yield "text", text
        ids = generation.ids
        yield "ids", ids.tolist()
        crop = generation.inputs.crop
        if crop is not None:  # where it looked closer: a light copy (its model input kept, for remaps)
            yield "look", replace(crop, picture=vlm.kept(crop.picture, LOOK_SIDE))
        if question.maps is not None and text.strip() and not stop.is_set():
            try:
                explanation = vlm.explain_prepared(generation.inputs, ids, text.strip(), stop=stop)
            except Stopped:
                return
            yield "maps", light(explanation)


def _remap(vlm, question: Question, ids: list[int], stop: threading.Event) -> Explanation | None:
    with _user_errors("The model ran out of memory making these maps. Try the attention method."):
        inputs = vlm.prepare(question)
        try:
            explanation = vlm.explain_prepared(inputs, torch.tensor(ids, dtype=torch.long), stop=stop)
        except Stopped:
            return None
        return light(explanation)


def light(explanation: Explanation) -> Explanation:
    """An explanation as it travels back: without the picture (the caller has it), a look-closer crop reduced."""
    if explanation.crop is not None:
        crop = replace(explanation.crop, image=reduced(explanation.crop.image, LOOK_SIDE))
        explanation = replace(explanation, crop=crop)
    return replace(explanation, image=None)


def _measure(vlm, tokens: int) -> Costs:
    side = vlm.config.vision_config.image_size
    picture = Image.new("RGB", (side, side), (128, 128, 128))
    fixed = {"max_new_tokens": tokens, "min_new_tokens": tokens}

    def timed(**options) -> float:
        question = vlm.question(picture, "Describe the image.", **options)
        start = time.perf_counter()
        vlm.answer_ids(question)
        return time.perf_counter() - start

    vlm.clear_cache()
    start = timed(max_new_tokens=1, num_beams=1)  # the image tokens are computed here, as for a new picture
    vlm.clear_cache()
    greedy = timed(num_beams=1, **fixed)
    beams = timed(num_beams=3, **fixed)
    question = vlm.question(picture, "Describe the image.", maps={}, num_beams=1, **fixed)
    inputs, ids = vlm.answer_ids(question)
    began = time.perf_counter()
    vlm.explain_prepared(inputs, ids)
    maps = time.perf_counter() - began
    return Costs(
        start=start,
        per_token=max(greedy - start, 0.0) / max(tokens - 1, 1),
        per_beam_token=max(beams - greedy, 0.0) / (2 * tokens),
        maps_per_token=maps / max(len(ids), 1),
    )


def remember(model: str, costs: Costs) -> Costs:
    """Keep the costs ``calibrate`` measured for ``model``'s leases (in this process: the one that asks for them)."""
    _costs[model] = costs
    return costs


def on_zero_gpu() -> bool:
    """Whether this app runs on a ZeroGPU Space (the ``spaces`` package in its ZeroGPU mode)."""
    try:
        import spaces
    except ImportError:
        return False
    return bool(getattr(getattr(spaces, "config", None), "Config", None) and spaces.config.Config.zero_gpu)


def calibrate_leases(model: str) -> Costs | None:
    """On ZeroGPU, measure the model's costs once (``calibrate``) so that every lease fits its call; elsewhere nothing
    (no lease is asked for). A failed measurement keeps ``DEFAULT_COSTS`` and says so in the log."""
    if not on_zero_gpu():
        return None
    try:
        costs = remember(model, calibrate(model))
    except Exception as e:  # noqa: BLE001 - the app must start; the leases then follow the defaults
        log.warning(
            "Could not measure the model's GPU costs (%s: %s); leases follow %s", type(e).__name__, e, DEFAULT_COSTS
        )
        return None
    log.info("GPU costs of this model: %s", costs)
    return costs
