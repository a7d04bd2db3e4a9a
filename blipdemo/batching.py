"""Generation for a batch of requests: one ``generate`` call, each row with its own length, stop, time limit and stream.

A request (``Request``) carries a checked ``Question`` (every error the user can cause was raised where it was made,
before any model work), encoded in its caller's thread (``PreparedInputs``), and is decoded by ``run_batch``, alone
or next to other requests:

- the images not yet cached go through the ViT together, the Q-Former and projection run on the batch;
- decoder-only LMs get the rows left-padded ([pad ; queries ; prompt], generate derives the positions from the
  mask), T5 gets them right-padded in its encoder;
- ``_Rows`` (a stopping criterion, which ``generate`` calls after every step with the ids so far) hands each row's
  new token to its request — its ids, and its ``TextIteratorStreamer``, which turns ids into text exactly as for a
  lone request — and ends each row at its own ``max_new_tokens``, Stop, time limit or EOS; a row that ends gets
  padding from then on and its stream closes at once; ``generate`` returns when every row has ended;
- ``_RowMinNewTokens`` holds back EOS per row when the rows' ``min_new_tokens`` differ.

``Scheduler`` owns the waiting requests when batching is on: a worker thread takes the oldest waiting request and
every other waiting request that can share its decoding (``DecodingOptions.batch_key``), up to ``max_batch_size``,
and runs them as one batch. There is no waiting window: an idle model starts a lone request at once.

Requests that arrive while a batch decodes join it at a step boundary (the batch is *regrouped*) when they are at
least as many as its live rows and there is room: ``_Rows`` ends the ``generate`` call after recording the step's
tokens, the live rows go back to the head of the queue with the ids they have so far, and the next batch takes
them with the newcomers. A continuing row's prompt is its prompt plus its answer so far (a T5 row continues its
decoder ids), so its answer goes on exactly where it was: greedy rows still answer as alone. The price is the
recomputed prefill of the live rows — bounded because a regroup at least doubles the batch — against the
newcomers waiting for the whole batch to end (eight requests sent at once would otherwise decode as 1 + 7).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .decoding import DecodingOptions
from .question import Question


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

    @property
    def image(self):
        """The upright RGB PIL picture, as the user gave it (size and orientation)."""
        return self.question.picture.image


@dataclass(eq=False)  # identity: the scheduler finds requests in its lists (field-wise == would compare tensors)
class Request:
    """A prepared request on its way through a batch; its caller waits on ``done`` or reads ``streamer``."""

    inputs: PreparedInputs
    key: tuple | None  # DecodingOptions.batch_key: equal keys share a batch; None decodes alone
    stop: threading.Event = field(default_factory=threading.Event)  # set by the caller: Stop, or it left
    external_stop: threading.Event | None = None  # the caller's own switch, only watched
    time_limit: float | None = None  # seconds of generation, counted from the start of its batch
    streamer: object | None = None  # a TextIteratorStreamer, for streaming callers
    ids: list[int] = field(default_factory=list)  # generated ids so far (EOS included when reached)
    ended: bool = False  # its row is over (the batch may go on for the others)
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


class _Rows(StoppingCriteria):
    """Called by ``generate`` after every step with the ids so far (B, T): hands each live row its new token (the
    request's ids and text stream) and ends rows — EOS, the row's own max_new_tokens, its Stop switch or its time
    limit. An ended row's request is finished at once (its stream closes) and gets padding from then on.

    Beam search (``record=False``) runs alone: its beams change their mind, so nothing is recorded or streamed per
    step (its text comes at the end), and all ``input_ids`` rows (the beams) share the one request's end."""

    def __init__(
        self,
        requests: list[Request],
        eos: set[int],
        record: bool = True,
        regroup: Callable[[int], bool] | None = None,
    ) -> None:
        self.requests = requests
        self.eos = eos
        self.record = record
        self.regroup = regroup  # (live rows) → whether waiting requests should join now (the Scheduler's rule)
        self.regrouped = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        now = time.monotonic()
        newest = input_ids[:, -1].tolist() if self.record else None
        for i, request in enumerate(self.requests):
            if request.ended:
                continue
            if self.record:
                request.ids.append(newest[i])
                if request.streamer is not None:
                    request.streamer.put(torch.tensor([newest[i]]))
            request.ended = bool(
                (self.record and (newest[i] in self.eos or len(request.ids) >= request.inputs.max_new_tokens))
                or request.stopped()
                or (request._deadline is not None and now > request._deadline)
            )
            if request.ended and self.record:
                request.finish()
        live = sum(not r.ended for r in self.requests)
        if self.record and self.regroup is not None and live and self.regroup(live):
            # End this generate call; the live rows (not ended, not finished) continue in the regrouped batch.
            self.regrouped = True
            return torch.ones((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)
        if len(self.requests) == 1:
            return torch.full((input_ids.shape[0],), self.requests[0].ended, dtype=torch.bool, device=input_ids.device)
        return torch.tensor([r.ended for r in self.requests], dtype=torch.bool, device=input_ids.device)


class _RowMinNewTokens(LogitsProcessor):
    """EOS is not allowed before each row's own ``min_new_tokens`` (transformers' processor has one value for all)."""

    def __init__(self, requests: list[Request], eos: list[int]) -> None:
        self.minimum = [r.options.min_new_tokens or 0 for r in requests]
        self.requests = requests
        self.eos = eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        early = [i for i, r in enumerate(self.requests) if len(r.ids) < self.minimum[i]]
        if early and self.eos:
            scores[
                torch.tensor(early, device=scores.device)[:, None], torch.tensor(self.eos, device=scores.device)
            ] = -float("inf")
        return scores


def _eos_ids(generation_config) -> list[int]:
    eos = generation_config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, list | tuple) else [eos]


def run_batch(service, requests: list[Request], regroup: Callable[[int], bool] | None = None) -> list[Request]:
    """Decode ``requests`` (which share a ``batch_key``, or one request) as one batch; never raises: a failure ends
    each request with its error. ``regroup`` (live rows → bool), asked after every step, ends the batch early for
    waiting requests to join: the unfinished requests are returned, to be decoded on (else the list is empty)."""
    live = []
    for request in requests:
        if request.stopped():  # stopped while it waited: nothing to do
            request.finish()
        else:
            live.append(request)
    if not live:
        return []
    try:
        with torch.inference_mode():
            left = _generate(service, live, regroup)
    except BaseException as e:  # handed to each caller, who raises it in its own thread
        for request in live:
            request.finish(e)
        if not isinstance(e, Exception):
            raise
        return []
    for request in live:
        if request not in left:
            request.finish()
    return left


def generate_kwargs(service, requests: list[Request]) -> dict:
    """``generate`` keyword arguments for a batch (one row per request): query + prompt embeddings, mask, and the
    decoder-only LM's matching ids, with the shared decoding options; the per-row limits are ``run_batch``'s."""
    model = service.model
    gen_cfg = model.language_model.generation_config
    image_embeds = service.image_tokens([r.inputs for r in requests])  # (B, N, Dv)
    qformer_ids = qformer_mask = None
    if model.family == "instructblip":
        qformer_pad = service.qformer_tokenizer.pad_token_id or 0
        qformer_ids, qformer_mask = _pad([r.inputs.qformer_input_ids[0] for r in requests], qformer_pad, left=False)
    query_embeds = model.query_outputs(image_embeds, qformer_ids, qformer_mask)  # (B, Q, Dq)

    pad_id = service.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else (_eos_ids(gen_cfg) or [0])[0]
    # Decoder-only LMs continue the sequence: pad on the left so every row's prompt ends at the last position.
    left = not model.is_encoder_decoder
    # A decoder-only row regrouped mid-answer continues from its prompt + answer so far (ids: (T,) each).
    rows = [r.inputs.input_ids[0] for r in requests]
    if left:
        rows = [torch.cat([row, torch.tensor(r.ids, dtype=row.dtype)]) for row, r in zip(rows, requests, strict=True)]
    ids, mask = _pad(rows, pad_id, left=left)
    embeds, _ = model.language_inputs(query_embeds, ids)  # (B, Q + T, D): [queries ; padded prompt]
    num_queries = query_embeds.shape[1]
    if left:
        # The queries sit between the padding and the prompt: [pad ; queries ; prompt], mask [0 ; 1 ; 1].
        embeds = _queries_after_padding(embeds, mask, num_queries)
    options = requests[0].options.kwargs()
    options.pop("min_new_tokens", None)
    kwargs = dict(
        options,
        inputs_embeds=embeds,
        attention_mask=_mask_with_queries(mask, num_queries, left).to(embeds.device),
        max_new_tokens=max(r.inputs.max_new_tokens - len(r.ids) for r in requests),
        pad_token_id=gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else pad_id,
    )
    if model.is_encoder_decoder and any(r.ids for r in requests):
        # T5 rows regrouped mid-answer continue their decoder: [pad ; start ; answer so far], left-padded (T5's
        # positions are relative, so the padding shifts nothing); generate extends the decoder mask step by step.
        start_id = gen_cfg.decoder_start_token_id
        if start_id is None:
            start_id = model.language_model.config.decoder_start_token_id
        decoder_rows = [torch.tensor([start_id, *r.ids], dtype=torch.long) for r in requests]
        decoder_ids, decoder_mask = _pad(decoder_rows, pad_id, left=True)
        kwargs["decoder_input_ids"] = decoder_ids.to(embeds.device)
        kwargs["decoder_attention_mask"] = decoder_mask.to(embeds.device)
    # What is left of each row's min_new_tokens (regrouped rows have answered some already).
    minimums = {max(0, min(r.options.min_new_tokens or 0, r.inputs.max_new_tokens) - len(r.ids)) for r in requests}
    if len(minimums) == 1:
        kwargs["min_new_tokens"] = minimums.pop()  # transformers' own processor, as for a lone request
    else:
        kwargs["logits_processor"] = LogitsProcessorList([_RowMinNewTokens(requests, _eos_ids(gen_cfg))])
    if left:
        # The reference passes ids for the query positions too (its <image> placeholders): generate's repetition
        # penalty and the returned sequence see the same ids here.
        placeholder = model.config.image_token_index
        if placeholder is None:
            placeholder = service.tokenizer.pad_token_id or 0
        kwargs["input_ids"] = _ids_with_queries(ids, mask, num_queries, placeholder, pad_id).to(embeds.device)
    return kwargs


def _generate(service, requests: list[Request], regroup: Callable[[int], bool] | None = None) -> list[Request]:
    """One ``generate`` call for ``requests``; returns the rows a regroup left unfinished (else [])."""
    model = service.model
    lm = model.language_model
    kwargs = generate_kwargs(service, requests)
    start = time.monotonic()
    for request in requests:
        if request._deadline is None and request.time_limit:  # counted from the row's first batch
            request._deadline = start + request.time_limit
    beams = (requests[0].options.resolved(lm.generation_config)["num_beams"] or 1) if len(requests) == 1 else 1
    eos = set(_eos_ids(lm.generation_config))
    rows = _Rows(requests, eos, record=beams == 1, regroup=regroup if beams == 1 else None)
    kwargs["stopping_criteria"] = StoppingCriteriaList([rows])
    if beams > 1:  # beam search (alone): beams change their mind, so only the end is final
        output = lm.generate(**kwargs)
        new = output[0] if model.is_encoder_decoder else output[0, kwargs["input_ids"].shape[1] :]
        request = requests[0]
        request.ids = new.tolist()
        if request.streamer is not None:
            request.streamer.text_queue.put(service.decode(new))
        return []
    lm.generate(**kwargs)  # the tokens reach their requests through _Rows, step by step
    return [r for r in requests if not r.ended] if rows.regrouped else []


def _pad(rows: list[torch.Tensor], value: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id rows → (B, T) ids padded with ``value`` on the left or right, and the (B, T) mask of real ids."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


def _mask_with_queries(mask: torch.Tensor, num_queries: int, left: bool) -> torch.Tensor:
    """The prompt mask (B, T) → the LM's mask (B, Q + T): queries count as real positions, next to their prompt."""
    ones = torch.ones((mask.shape[0], num_queries), dtype=mask.dtype)
    if not left:
        return torch.cat([ones, mask], dim=1)  # [queries ; prompt ; pad]
    padding = (mask == 0).sum(1).tolist()
    out = torch.zeros((mask.shape[0], num_queries + mask.shape[1]), dtype=mask.dtype)
    for i, n in enumerate(padding):
        out[i, n:] = 1  # [pad ; queries ; prompt]
    return out


def _queries_after_padding(embeds: torch.Tensor, mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """language_inputs gives [queries ; pad ; prompt] (B, Q + T, D); move each row's padding to the front."""
    out = torch.empty_like(embeds)
    for i, n in enumerate((mask == 0).sum(1).tolist()):
        out[i] = torch.cat(
            [embeds[i, num_queries : num_queries + n], embeds[i, :num_queries], embeds[i, num_queries + n :]]
        )
    return out


def _ids_with_queries(
    ids: torch.Tensor, mask: torch.Tensor, num_queries: int, placeholder: int, pad: int
) -> torch.Tensor:
    """Left-padded prompt ids (B, T) → (B, Q + T): [pad ; placeholder × Q ; prompt], aligned with the embeddings."""
    out = torch.full((ids.shape[0], num_queries + ids.shape[1]), pad, dtype=torch.long)
    for i, n in enumerate((mask == 0).sum(1).tolist()):
        out[i, n : n + num_queries] = placeholder
        out[i, n + num_queries :] = ids[i, n:]
    return out


class SchedulerError(RuntimeError):
    """The scheduler's thread ended while this request waited: the caller is told instead of waiting for ever."""


class Scheduler:
    """Merges concurrent requests into batches of up to ``max_batch_size`` (see the module's docstring).

    Under stops and faults: a stopped request leaves the queue at once (``withdraw``, and stopped requests are never
    taken or counted); a caller waits with a bound (``wait``) and gets a ``SchedulerError`` if the thread died, and
    the next request starts a new thread; a forked child (ZeroGPU's workers are forks) starts with a fresh lock and
    an empty queue, whatever the parent's threads held at the fork."""

    def __init__(
        self, run: Callable[[list[Request], Callable[[int], bool] | None], list[Request]], max_batch_size: int
    ) -> None:
        self.run = run  # (batch, regroup rule) → the requests a regroup left unfinished
        self.max_batch_size = max_batch_size
        self._pending: list[Request] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self.batches = 0  # batches run so far, the rows they held, and the regroups (tests and benchmarks read these)
        self.rows = 0
        self.regroups = 0
        after_fork_in_child(self, Scheduler._after_fork)

    def _after_fork(self) -> None:
        """In a forked child: the parent's thread did not come along, and its lock may have been held at the fork."""
        self._cond = threading.Condition()
        self._pending = []
        self._thread = None

    def alive(self) -> bool:
        """Whether this process's scheduler thread is running."""
        return self._thread is not None and self._pid == os.getpid() and self._thread.is_alive()

    def submit(self, request: Request) -> None:
        """Queue ``request``; it starts with the next batch (at once when the model is idle)."""
        with self._cond:
            if not self.alive():  # none yet, or one that ended (an interrupt inside a batch, a fault)
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="blipdemo-batches", daemon=True)
                self._thread.start()
            self._pending.append(request)
            self._cond.notify()

    def withdraw(self, request: Request) -> None:
        """``request`` was stopped: if it still waits, it leaves the queue now and is finished (its caller is free);
        in a batch, its row ends at the batch's next step."""
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

    def _take(self) -> list[Request]:
        first = self._pending.pop(0)
        batch = [first]
        if first.key is not None:
            for request in list(self._pending):
                if len(batch) == self.max_batch_size:
                    break
                if request.key == first.key:
                    batch.append(request)
                    self._pending.remove(request)
        return batch

    def _should_regroup(self, key: tuple, live: int) -> bool:
        """Whether the waiting requests with ``key`` should join a batch of ``live`` rows now: only if they are at
        least as many as the live rows (and fit), so the recomputed prefill of the live rows is paid for by at
        least as many rows starting at once, and every regroup at least doubles the live rows. Never past an older
        request that cannot join (beam search, other sampling values): it goes next, so that a stream of joining
        requests cannot keep it waiting for ever. Stopped requests do not count."""
        room = self.max_batch_size - live
        if room <= 0:
            return False
        with self._cond:
            self._purge()
            if not self._pending or self._pending[0].key != key:
                return False
            waiting = sum(1 for r in self._pending if r.key == key)
        return min(waiting, room) >= live

    def _loop(self) -> None:
        batch: list[Request] = []
        try:
            while True:
                with self._cond:
                    self._purge()
                    while not self._pending:
                        self._cond.wait()
                        self._purge()
                    batch = self._take()
                self.batches += 1
                self.rows += len(batch)
                key = batch[0].key
                regroup = None if key is None else (lambda live, key=key: self._should_regroup(key, live))
                left = self.run(batch, regroup)  # finishes its rows, also when it fails
                batch = []
                if left:
                    with self._cond:  # the continuing rows go first: they were taken before anyone waiting now
                        self._pending[:0] = left
                        self.regroups += 1
        except BaseException as e:
            # The thread ends (an interrupt inside a batch, or a fault here): its rows are told, and the requests
            # that wait stay for the next thread, which the next submit (or a waiting caller's error) brings.
            for request in batch:
                request.finish(SchedulerError(f"The model's scheduler stopped: {type(e).__name__}: {e}"))
            raise


def after_fork_in_child(owner, reset: Callable[[object], None]) -> None:
    """Call ``reset(owner)`` in every forked child (a ZeroGPU worker), where a lock another thread held at the fork
    would stay held for good; ``owner`` is held weakly, so nothing is kept alive for it."""
    ref = weakref.ref(owner)

    def in_child() -> None:
        if (alive := ref()) is not None:
            reset(alive)

    os.register_at_fork(after_in_child=in_child)
