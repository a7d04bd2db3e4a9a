"""Requests on their way to the model: the queue, the running batch it feeds, and beam search alone.

A request (``Request``) carries a checked ``Question`` (every error the user can cause was raised where it was made,
before any model work), encoded in its caller's thread (``PreparedInputs``), and is decoded by ``decode_loop``'s
``RunningBatch``, alone or next to other requests:

- the images not yet cached go through the ViT together, the Q-Former and projection run on the newcomers of a step
  (``model_inputs``): decoder-only LMs get the rows left-padded ([pad ; queries ; prompt]), T5 right-padded;
- every row takes its tokens as ``generate`` would for it alone (its own processors, length, min length, seed), hands
  each to its request — its ids, and its ``TextIteratorStreamer``, which turns ids into text exactly as for a lone
  request — and ends at its own ``max_new_tokens``, Stop, time limit or EOS: its stream closes and its cache rows
  leave the batch at once;
- beam search decodes alone, through ``generate`` (``run_alone``): its beams reorder the cache at every step, and
  merging beams with other rows would win little (a beam search is already a batch of ``num_beams`` rows).

``Scheduler`` owns the waiting requests when batching is on: its thread runs the batch one step at a time and,
between two steps, admits the waiting requests up to ``max_batch_size`` rows: their prompts are prefilled once,
together, and their cache rows merged into the running batch (*continuous batching*). No row's prompt is ever computed
again, so a request that arrives mid-answer costs the others one prefill, not a restart. There is no waiting window:
an idle model starts a lone request at once. A beam search waits until the running rows have ended, and nobody passes
it meanwhile.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .decode_loop import RunningBatch, eos_ids
from .decoding import DecodingOptions
from .question import Picture, Question

if TYPE_CHECKING:
    from .look_closer import Crop


@dataclass(eq=False)  # identity, as Request: field-wise == would compare tensors
class PreparedInputs:
    """A question encoded for the model (``Service.prepare``), before the image tokens (which the batch computes, or
    the cache has)."""

    question: Question  # what was asked, as checked at the edge
    prompt: str  # the full text given to the LM (and to the Q-Former for InstructBLIP), earlier turns that fit
    input_ids: torch.Tensor  # (1, T) LM prompt ids, no image placeholders
    qformer_input_ids: torch.Tensor | None  # (1, Tq) InstructBLIP only
    max_new_tokens: int  # the answer room: the question's max_new_tokens, cut to what the LM's limit leaves
    pixel_values: torch.Tensor | None = None  # (1, 3, H, W), made at preparation only if the tokens were not cached
    crop: Crop | None = None  # look-closer: where it looked (None: the picture alone)

    @property
    def image(self):
        """The upright RGB PIL picture, as the user gave it (size and orientation)."""
        return self.question.picture.image

    def views(self) -> list[PreparedInputs | Picture]:
        """What the LM reads, in order, one set of queries each: the picture (these inputs stand for it: their pixels
        are made), and/or the look-closer crop (a ``Picture``)."""
        if self.crop is None:
            return [self]
        return [self if view == "original" else self.crop.picture for view in self.crop.pictures]


@dataclass(eq=False)  # identity: the scheduler finds requests in its lists (field-wise == would compare tensors)
class Request:
    """A prepared request on its way through a batch; its caller waits on ``done`` or reads ``streamer``."""

    inputs: PreparedInputs
    alone: bool = False  # beam search: decodes through generate, alone (DecodingOptions.decodes_alone)
    stop: threading.Event = field(default_factory=threading.Event)  # set by the caller: Stop, or it left
    external_stop: threading.Event | None = None  # the caller's own switch, only watched
    time_limit: float | None = None  # seconds of generation, counted from its prefill
    streamer: object | None = None  # a TextIteratorStreamer, for streaming callers
    ids: list[int] = field(default_factory=list)  # generated ids so far (EOS included when reached)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _deadline: float | None = None

    @property
    def options(self) -> DecodingOptions:
        """The question's decoding options."""
        return self.inputs.question.decoding

    def stopped(self) -> bool:
        return self.stop.is_set() or (self.external_stop is not None and self.external_stop.is_set())

    def finish(self, error: BaseException | None = None) -> None:
        """End this request (once): its stream closes, its waiter wakes up."""
        if self.done.is_set():
            return
        if error is not None:
            self.error = error
        if self.streamer is not None:
            self.streamer.end()
        self.done.set()


class _BeamStop(StoppingCriteria):
    """Ends a beam search (all its beams) on its request's Stop switch or time limit; ``generate`` calls it after
    every step. Its beams change their mind, so nothing is recorded or streamed per step: the text comes at the end."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        request = self.request
        over = request.stopped() or (request._deadline is not None and time.monotonic() > request._deadline)
        return torch.full((input_ids.shape[0],), over, dtype=torch.bool, device=input_ids.device)


def run_batch(service, requests: list[Request]) -> None:
    """Decode ``requests`` to their ends: the beam searches one by one through ``generate``, the others as one running
    batch (``decode_loop``). Never raises an ``Exception``: a failure ends each request it reaches with its error."""
    for request in requests:
        if request.alone:
            run_alone(service, request)
    batch = RunningBatch(service)
    batch.admit([r for r in requests if not r.alone])
    while batch.rows:
        batch.step()


def run_alone(service, request: Request) -> None:
    """A beam search, through ``generate`` alone; never raises an ``Exception`` (the request ends with it)."""
    if request.stopped():
        request.finish()
        return
    try:
        with torch.inference_mode():
            _beam_search(service, request)
    except BaseException as e:  # handed to the caller, who raises it in its own thread
        request.finish(e)
        if not isinstance(e, Exception):
            raise
        return
    request.finish()


def model_inputs(service, requests: list[Request]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The LM's inputs for ``requests``' prompts, one row each: ``inputs_embeds`` (B, S, D) and its mask (B, S) on the
    LM's input device, and for decoder-only LMs the matching ids (B, S) with the image placeholder at the query
    positions (the reference passes them: the repetition penalty sees the same ids). A row is [queries ; prompt], with
    one set of Q queries per picture it reads (``PreparedInputs.views``: the picture, a look-closer crop, or both).
    Decoder-only rows are left-padded, [pad ; queries ; prompt]; T5 rows right-padded, [queries ; prompt ; pad]."""
    model = service.model
    views = [r.inputs.views() for r in requests]
    owners = [i for i, row in enumerate(views) for _ in row]  # view → its row
    image_embeds = service.image_tokens([v for row in views for v in row])  # (V, N, Dv): every picture once
    qformer_ids = qformer_mask = None
    if model.family == "instructblip":
        qformer_pad = service.qformer_tokenizer.pad_token_id or 0
        rows = [requests[i].inputs.qformer_input_ids[0] for i in owners]  # each view's queries read its instruction
        qformer_ids, qformer_mask = _pad(rows, qformer_pad, left=False)
    query_embeds = model.query_outputs(image_embeds, qformer_ids, qformer_mask)  # (V, Q, Dq)
    pad_id = _pad_id(service)
    placeholder = model.config.image_token_index
    if placeholder is None:
        placeholder = service.tokenizer.pad_token_id or 0
    # Each row's [queries ; prompt] embeddings and ids, then padded: decoder-only LMs continue the sequence, so their
    # rows are padded on the left (every prompt ends at the last position); T5's encoder rows on the right.
    left = not model.is_encoder_decoder
    embeds, ids = [], []
    for i, request in enumerate(requests):
        prompt = request.inputs.input_ids  # (1, T)
        mine = [v for v, owner in enumerate(owners) if owner == i]
        queries = query_embeds[mine].reshape(1, -1, query_embeds.shape[-1])  # (1, kQ, Dq): its pictures' queries
        row, _ = model.language_inputs(queries, prompt)  # (1, kQ + T, D)
        embeds.append(row[0])
        ids.append(torch.cat([torch.full((queries.shape[1],), placeholder, dtype=torch.long), prompt[0]]))
    # Padding positions hold the pad token's embedding, as a padded batch of ids would give them (masked out).
    pad_embed = model.language_inputs(query_embeds[:1, :0], torch.tensor([[pad_id]]))[0][0, -1]  # (D,)
    full_ids, mask = _pad(ids, pad_id, left=left)
    width = full_ids.shape[1]
    batch = pad_embed.expand(len(requests), width, -1).clone()  # (B, S, D)
    for i, row in enumerate(embeds):
        batch[i, slice(width - len(row), width) if left else slice(0, len(row))] = row
    return batch, mask.to(batch.device), full_ids.to(batch.device) if left else None


def _pad_id(service) -> int:
    gen_cfg = service.model.language_model.generation_config
    pad_id = service.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else (eos_ids(gen_cfg) or [0])[0]
    return pad_id


def generate_kwargs(service, requests: list[Request]) -> dict:
    """``generate`` keyword arguments for ``requests`` (one row each; the first one's decoding options): query +
    prompt embeddings, mask, and the decoder-only LM's matching ids. Beam search and benchmarks use it."""
    gen_cfg = service.model.language_model.generation_config
    embeds, mask, ids = model_inputs(service, requests)
    options = requests[0].options.kwargs()
    options.pop("seed", None)  # a row's own generator is the decode loop's; generate draws from torch's global one
    room = max(r.inputs.max_new_tokens for r in requests)
    if options.get("min_new_tokens"):
        options["min_new_tokens"] = min(options["min_new_tokens"], room)
    pad_id = _pad_id(service)
    kwargs = dict(
        options,
        inputs_embeds=embeds,
        attention_mask=mask,
        max_new_tokens=room,
        pad_token_id=gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else pad_id,
    )
    if ids is not None:
        kwargs["input_ids"] = ids
    return kwargs


def _beam_search(service, request: Request) -> None:
    model = service.model
    lm = model.language_model
    kwargs = generate_kwargs(service, [request])
    if request._deadline is None and request.time_limit:
        request._deadline = time.monotonic() + request.time_limit
    kwargs["stopping_criteria"] = StoppingCriteriaList([_BeamStop(request)])
    output = lm.generate(**kwargs)
    new = output[0] if model.is_encoder_decoder else output[0, kwargs["input_ids"].shape[1] :]
    request.ids = new.tolist()
    if request.streamer is not None:
        request.streamer.text_queue.put(service.decode(new))


def _pad(rows: list[torch.Tensor], value: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id rows → (B, T) ids padded with ``value`` on the left or right, and the (B, T) mask of real ids."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


class SchedulerError(RuntimeError):
    """The scheduler's thread ended while this request waited: the caller is told instead of waiting for ever."""


class Scheduler:
    """Owns the running batch of a service with ``max_batch_size > 1`` (see the module's docstring).

    Under stops and faults: a stopped request leaves the queue at once (``withdraw``, and stopped requests are never
    taken or counted); a caller waits with a bound (``wait``) and gets a ``SchedulerError`` if the thread died, and
    the next request starts a new thread; a forked child (ZeroGPU's workers are forks) starts with a fresh lock and
    an empty queue, whatever the parent's threads held at the fork."""

    def __init__(self, service, max_batch_size: int) -> None:
        self.service = service
        self.max_batch_size = max_batch_size
        self._pending: list[Request] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self.batch: RunningBatch | None = None  # the running batch of the current thread
        self.alone = 0  # beam searches run alone (tests read it)
        after_fork_in_child(self, Scheduler._after_fork)

    def _after_fork(self) -> None:
        """In a forked child: the parent's thread did not come along, and its lock may have been held at the fork."""
        self._cond = threading.Condition()
        self._pending = []
        self._thread = None
        self.batch = None

    def alive(self) -> bool:
        """Whether this process's scheduler thread is running."""
        return self._thread is not None and self._pid == os.getpid() and self._thread.is_alive()

    def submit(self, request: Request) -> None:
        """Queue ``request``; it joins the running batch at the next step (at once when the model is idle)."""
        with self._cond:
            if not self.alive():  # none yet, or one that ended (an interrupt inside a batch, a fault)
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="blipdemo-batches", daemon=True)
                self._thread.start()
            self._pending.append(request)
            self._cond.notify()

    def withdraw(self, request: Request) -> None:
        """``request`` was stopped: if it still waits, it leaves the queue now and is finished (its caller is free);
        in the running batch, its row ends at the next step."""
        with self._cond:
            if any(r is request for r in self._pending):
                self._pending = [r for r in self._pending if r is not request]
                request.finish()

    def wait(self, request: Request, poll: float = 1.0) -> None:
        """Wait until ``request`` is done; a ``SchedulerError`` if the thread that would serve it died meanwhile."""
        while not request.done.wait(poll):
            if not self.alive() and not request.done.is_set():
                self.withdraw(request)
                raise SchedulerError("The model's scheduler stopped before this request was served; ask again.")

    def _purge(self) -> None:
        """Stopped requests leave the queue (called with the lock held): they take no slot and count for nothing."""
        stopped = [r for r in self._pending if r.stopped()]
        if stopped:
            self._pending = [r for r in self._pending if not r.stopped()]
            for request in stopped:
                request.finish()

    def _take(self, running: int) -> list[Request]:
        """The requests that start now (called with the lock held), oldest first, next to ``running`` rows: waiting
        rows up to the free slots; a beam search, alone, once the batch is empty — and nobody passes an older beam
        search, so that a stream of joining requests cannot keep it waiting for ever."""
        self._purge()
        if not self._pending:
            return []
        if self._pending[0].alone:
            return [self._pending.pop(0)] if running == 0 else []
        taken = []
        while self._pending and not self._pending[0].alone and running + len(taken) < self.max_batch_size:
            taken.append(self._pending.pop(0))
        return taken

    def _loop(self) -> None:
        batch = self.batch = RunningBatch(self.service)
        taken: list[Request] = []
        try:
            while True:
                with self._cond:
                    self._purge()
                    while not self._pending and not batch.rows:
                        self._cond.wait()
                        self._purge()
                    taken = self._take(len(batch.rows))
                if taken and taken[0].alone:
                    self.alone += 1
                    run_alone(self.service, taken[0])
                elif taken:  # newcomers: their prompts once, then they decode with the others
                    batch.admit(taken)
                else:
                    batch.step()
                taken = []
        except BaseException as e:
            # The thread ends (an interrupt inside a step, or a fault here): its rows are told, and the requests
            # that wait stay for the next thread, which the next submit (or a waiting caller's error) brings.
            error = SchedulerError(f"The model's scheduler stopped: {type(e).__name__}: {e}")
            for request in [row.request for row in batch.rows] + taken:
                request.finish(error)
            batch.fail(error)
            raise


def after_fork_in_child(owner, reset: Callable[[object], None]) -> None:
    """Call ``reset(owner)`` in every forked child (a ZeroGPU worker), where a lock another thread held at the fork
    would stay held for good; ``owner`` is held weakly, so nothing is kept alive for it."""
    ref = weakref.ref(owner)

    def in_child() -> None:
        if (alive := ref()) is not None:
            reset(alive)

    os.register_at_fork(after_in_child=in_child)
