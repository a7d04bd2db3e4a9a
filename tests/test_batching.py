"""Batching: requests join a running batch at any step, and each keeps its own answer, length, stop and errors.

References, independent of the code under test: transformers' own InstructBLIP / BLIP-2 classes on the same weights
(``tests/reference.py``), asked one question at a time — greedy, sampling with a seed, beam search — for decoder-only
LMs and T5, rows of different prompt lengths. Where a test compares with our own answer alone, that lone path was
checked against the reference above.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
from reference import reference_answer

import blipdemo
from blipdemo import cpu_linear
from blipdemo.batching import Request, Scheduler, run_batch

PROMPTS = ["What is in the image?", "Describe it in detail, please, and say what colors you see.", "Where?"]
GREEDY = dict(num_beams=1, do_sample=False)
COMBOS = [("instructblip", "llama"), ("blip2", "opt"), ("instructblip", "t5"), ("blip2", "t5")]


def _requests(vlm, images, lengths, minimums=None, options=None):
    minimums = minimums or [None] * len(lengths)
    options = options or [GREEDY] * len(lengths)
    out = []
    for i, (n, m, o) in enumerate(zip(lengths, minimums, options, strict=True)):
        question = vlm.question(
            images[i % len(images)], PROMPTS[i % len(PROMPTS)], max_new_tokens=n, min_new_tokens=m, **o
        )
        out.append(vlm._request(vlm.prepare(question)))
    return out


def _reference(folder, images, i, **options) -> str:
    return reference_answer(folder, images[i % len(images)], PROMPTS[i % len(PROMPTS)], **options)


@pytest.mark.parametrize("linear", ["plain", "transposed", "onednn"])
@pytest.mark.parametrize("family,lm", COMBOS)
def test_rows_of_a_batch_answer_as_the_transformers_reference_asked_alone(
    checkpoint_dir, images, family, lm, linear, monkeypatch
):
    """Greedy rows with their own lengths, and rows with other decoding options in the same batch (a repetition
    penalty, sampling with a seed): each answers as transformers' generate asked that question alone — with the
    LM's float32 linear layers computed as transformers does, as (W · xᵀ)ᵀ and by oneDNN (``cpu_linear``: the
    routes chosen on CPUs whose BLAS is slow for a few rows)."""
    monkeypatch.setenv(cpu_linear.ENV, linear)
    folder = checkpoint_dir(family, lm)
    vlm = blipdemo.load(folder, dtype="float32")
    assert vlm.cpu_linear == cpu_linear.Routes(linear, linear) and vlm.load_info["cpu_linear"] == linear
    lengths, minimums = [12, 5, 9, 12, 10], [12, None, 3, 6, None]
    options = [GREEDY, GREEDY, GREEDY, dict(GREEDY, repetition_penalty=1.5), dict(do_sample=True, top_p=0.8, seed=7)]
    requests = _requests(vlm, images, lengths, minimums, options)
    assert len({r.inputs.input_ids.shape[1] for r in requests}) == 3, "the prompts must differ in length"
    expected = []
    for i in range(len(requests)):
        given = {k: v for k, v in options[i].items() if k != "seed"}
        if "seed" in options[i]:
            torch.manual_seed(options[i]["seed"])  # generate draws from the global generator
        expected.append(_reference(folder, images, i, max_new_tokens=lengths[i], min_new_tokens=minimums[i], **given))
    assert len(set(expected[:3])) == 3, "the greedy rows' answers alone must differ, or a mix-up could pass"
    run_batch(vlm, requests)
    assert [r.error for r in requests] == [None] * len(requests)
    assert [vlm.decode(r.ids) for r in requests] == expected
    for i, request in enumerate(requests):
        assert len(request.ids) <= lengths[i]
        assert len(request.ids) >= (minimums[i] or 1)


@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("blip2", "t5")])
def test_beam_search_answers_as_the_reference_and_runs_alone(checkpoint_dir, images, family, lm):
    folder = checkpoint_dir(family, lm)
    vlm = blipdemo.load(folder, dtype="float32", max_batch_size=4)
    beam = dict(num_beams=3, max_new_tokens=8, length_penalty=1.0)
    assert vlm.ask(images[1], PROMPTS[1], **beam) == _reference(folder, images, 1, **beam)


def test_seeded_sampling_rows_keep_their_own_draws_in_any_batch(checkpoint_dir, images):
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama"), dtype="float32")
    sampled = dict(do_sample=True, top_p=0.9, temperature=1.5)
    alone = [vlm.ask(images[0], PROMPTS[0], max_new_tokens=10, seed=s, **sampled) for s in (1, 2)]
    assert alone[0] != alone[1], "two seeds must draw differently, or this test shows nothing"
    questions = [vlm.question(images[0], PROMPTS[0], max_new_tokens=10, seed=s, **sampled) for s in (2, 5, 1)]
    requests = [vlm._request(vlm.prepare(q)) for q in questions]
    run_batch(vlm, requests)
    assert vlm.decode(requests[0].ids) == alone[1] and vlm.decode(requests[2].ids) == alone[0]


def test_8bit_rows_answer_as_alone(checkpoint_dir, images):
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama", lm_width=64), dtype="float32", load_in_8bit=True)
    requests = _requests(vlm, images, [8, 8, 8])
    run_batch(vlm, requests)
    for i, request in enumerate(requests):
        alone = vlm.generate_ids(images[i], PROMPTS[i], max_new_tokens=8, **GREEDY)
        assert request.ids == alone.tolist()


@pytest.mark.parametrize("setup", ["4-bit", "disk-offloaded device map"])
def test_4bit_and_device_mapped_lms_take_joining_rows_as_alone(checkpoint_dir, images, tmp_path, monkeypatch, setup):
    """The LM stays a transformers model, so bitsandbytes layers and accelerate's offload hooks take the merged
    caches too (each layer's rows on that layer's device)."""
    from test_device_map import _offload_map

    if setup == "4-bit":
        folder = checkpoint_dir("instructblip", "llama", lm_width=64)
        kwargs = dict(dtype="float32", load_in_4bit=True)
    else:
        folder = checkpoint_dir("instructblip", "llama")
        kwargs = dict(dtype="float32", device_map=_offload_map(folder), offload_folder=str(tmp_path / "offload"))
    vlm = blipdemo.load(folder, max_batch_size=4, **kwargs)
    asks = [lambda i=i: vlm.ask(images[i], PROMPTS[i], max_new_tokens=8, min_new_tokens=8, **GREEDY) for i in range(3)]
    alone = [ask() for ask in asks]
    assert len(set(alone)) == 3
    feed = _first_then_the_others(vlm, asks, monkeypatch, hold_at=3)
    assert feed.results == alone
    assert feed.prefill_rows() == [1, 2]  # the first alone, then the two newcomers together, once


def test_the_vit_runs_once_for_the_new_images_of_a_batch(checkpoint_dir, images):
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama"), dtype="float32")
    vlm.ask(images[0], PROMPTS[0], max_new_tokens=2, **GREEDY)  # image 0 is cached now
    calls = vlm.vision_calls
    run_batch(vlm, _requests(vlm, images, [2, 2, 2]))
    assert vlm.vision_calls == calls + 1  # images 1 and 2 together, image 0 from the cache


class Feed:
    """Wraps the LM's forward and records what each call computes: a prefill (prompt embeddings: ``inputs_embeds``)
    or a decode step, its rows, and the real positions it feeds (the attention mask's ones for a prefill, one per
    row for a step). Holds call number ``hold_at`` (1-based) until ``open()``; ``arrivals`` (call number → ask)
    starts an ask in its own thread during that call and waits until it is queued, so that it joins at the next
    step boundary; ``stops`` (call number → switch) sets a run's Stop switch during that call."""

    def __init__(
        self, vlm, monkeypatch, hold_at: int | None = None, arrivals: dict | None = None, stops: dict | None = None
    ) -> None:
        self.vlm = vlm
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls: list[tuple[str, int, int]] = []
        self.arrivals = dict(arrivals or {})
        self.stops = dict(stops or {})
        self.results: list = []
        self.threads: list[threading.Thread] = []
        forward = vlm.language_model.forward

        def recorded(*args, **kwargs):
            embeds, mask = kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
            if embeds is not None:
                self.calls.append(("prefill", embeds.shape[0], int(mask.sum())))
            else:
                ids = kwargs.get("input_ids", kwargs.get("decoder_input_ids"))
                self.calls.append(("step", ids.shape[0], ids.shape[0] * ids.shape[1]))
            n = len(self.calls)
            if n in self.stops:  # a Stop pressed during this call: the row ends when the call's tokens are out
                self.stops.pop(n).set()
            if n in self.arrivals:
                results, threads = _in_threads([self.arrivals.pop(n)])
                self.results.append(results)
                self.threads += threads
                _wait_pending(vlm, 1)
            if hold_at is not None and n >= hold_at:
                self.entered.set()
                self.release.wait(timeout=30)
            return forward(*args, **kwargs)

        monkeypatch.setattr(vlm.language_model, "forward", recorded)

    def open(self) -> None:
        self.release.set()

    def prefill_rows(self) -> list[int]:
        return [rows for kind, rows, _ in self.calls if kind == "prefill"]

    def fed(self, kind: str) -> int:
        return sum(fed for k, _, fed in self.calls if k == kind)


def _in_threads(fns):
    results, threads = [None] * len(fns), []
    for i, fn in enumerate(fns):

        def run(i=i, fn=fn):
            try:
                results[i] = fn()
            except Exception as e:  # noqa: BLE001 - the test looks at it
                results[i] = e

        threads.append(threading.Thread(target=run))
        threads[-1].start()
    return results, threads


@pytest.fixture
def batched(checkpoint_dir):
    return blipdemo.load(checkpoint_dir("instructblip", "llama"), dtype="float32", max_batch_size=4)


def _first_then_the_others(vlm, asks, monkeypatch, hold_at: int) -> Feed:
    """Runs ``asks[0]`` alone, holds its ``hold_at``-th forward until the other asks wait for the model, then lets all
    go on; ``feed.results`` holds every ask's result (an answer, or the error it raised)."""
    feed = Feed(vlm, monkeypatch, hold_at=hold_at)
    first, t0 = _in_threads(asks[:1])
    assert feed.entered.wait(30)
    others, threads = _in_threads(asks[1:])
    _wait_pending(vlm, len(asks) - 1)
    feed.open()
    for t in t0 + threads:
        t.join(60)
    feed.results = first + others
    return feed


def _wait_pending(vlm, n: int) -> None:
    for _ in range(3000):
        with vlm.scheduler._cond:
            if len(vlm.scheduler._pending) >= n:
                return
        threading.Event().wait(0.01)
    raise AssertionError(f"{n} requests never queued")


def test_concurrent_asks_share_a_batch_and_answer_as_alone(batched, images, monkeypatch):
    alone = [batched.ask(images[i], PROMPTS[i], max_new_tokens=10, **GREEDY) for i in range(3)]
    first_alone = batched.ask(images[0], "Hello?", max_new_tokens=3, min_new_tokens=3, **GREEDY)
    asks = [lambda: batched.ask(images[0], "Hello?", max_new_tokens=3, min_new_tokens=3, **GREEDY)]
    asks += [lambda i=i: batched.ask(images[i], PROMPTS[i], max_new_tokens=10, **GREEDY) for i in range(3)]
    feed = _first_then_the_others(batched, asks, monkeypatch, hold_at=1)
    assert feed.results == [first_alone, *alone]
    # The lone first request started at once; the three waiting requests were prefilled together at the next step
    # boundary and decoded with it: a step of 4 rows.
    assert feed.prefill_rows() == [1, 3]
    assert ("step", 4, 4) in feed.calls


@pytest.mark.parametrize("family,lm", COMBOS)
def test_rows_joining_at_different_steps_compute_their_prompts_once_and_answer_as_the_reference(
    checkpoint_dir, images, family, lm, monkeypatch
):
    """A request that arrives mid-answer joins the running batch at the next step: its prompt is prefilled once,
    alone, and merged into the batch's cache. No row's prompt or answer is ever fed twice: the positions fed are
    exactly each prompt once plus each generated token but the last once; restarting the batch at a join (which
    recomputes the running rows) would feed more."""
    folder = checkpoint_dir(family, lm)
    vlm = blipdemo.load(folder, dtype="float32", max_batch_size=4)
    lengths, minimums = [14, 9, 6], [14, 4, None]
    expected = [
        _reference(folder, images, i, max_new_tokens=lengths[i], min_new_tokens=minimums[i], **GREEDY) for i in range(3)
    ]
    assert len(set(expected)) == 3, "the answers alone must differ, or a mix-up of rows could pass"
    asks = [
        lambda i=i: vlm.ask(images[i], PROMPTS[i], max_new_tokens=lengths[i], min_new_tokens=minimums[i], **GREEDY)
        for i in range(3)
    ]
    tokens = [  # answer lengths alone (the forward is not recorded yet)
        len(vlm.generate_ids(images[i], PROMPTS[i], max_new_tokens=lengths[i], min_new_tokens=minimums[i], **GREEDY))
        for i in range(3)
    ]
    # Request 0 alone; request 1 arrives during request 0's third call, request 2 during the sixth.
    feed = Feed(vlm, monkeypatch, arrivals={3: asks[1], 6: asks[2]})
    first = asks[0]()
    for t in feed.threads:
        t.join(60)
    assert [first] + [r[0] for r in feed.results] == expected
    prompts = [vlm.prepare(vlm.question(images[i], PROMPTS[i])) for i in range(3)]
    queries = vlm.config.num_query_tokens
    assert feed.prefill_rows() == [1, 1, 1]  # each newcomer prefilled alone, once
    assert feed.fed("prefill") == sum(queries + p.input_ids.shape[1] for p in prompts)
    assert feed.fed("step") == sum(n - 1 for n in tokens)
    steps = [rows for kind, rows, _ in feed.calls if kind == "step"]
    # Calls: prefill 0, step, step (1 arrives), prefill 1, step, step (2 arrives), prefill 2, step, …
    assert steps[:5] == [1, 1, 2, 2, 3]


def test_a_stopped_row_leaves_at_once_its_slot_is_reused_and_the_others_answer_as_alone(
    checkpoint_dir, images, monkeypatch
):
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama"), dtype="float32", max_batch_size=2)
    long = dict(max_new_tokens=16, min_new_tokens=16, **GREEDY)
    alone = [vlm.ask(images[i], PROMPTS[i], **long) for i in range(3)]
    assert len(set(alone)) == 3
    switch = threading.Event()
    # Calls: 1 prefill of request 0 (held until the others wait), 2 prefill of request 1 (one free slot), 3–5 steps
    # of both; Stop for request 1 during call 5; then request 2 takes the free slot while request 0 answers on.
    feed = Feed(vlm, monkeypatch, hold_at=1, stops={5: switch})
    first, t0 = _in_threads([lambda: vlm.ask(images[0], PROMPTS[0], **long)])
    assert feed.entered.wait(30)
    stream = vlm.stream(images[1], PROMPTS[1], stop_event=switch, **long)
    results, threads = _in_threads([lambda: "".join(stream)])
    _wait_pending(vlm, 1)  # request 1 queued first: it gets the free slot, request 2 waits behind it
    more, threads2 = _in_threads([lambda: vlm.ask(images[2], PROMPTS[2], **long)])
    _wait_pending(vlm, 2)
    feed.open()
    for t in t0 + threads + threads2:
        t.join(60)
    assert first == [alone[0]] and more == [alone[2]]  # complete, and as alone
    assert 0 < len(results[0]) < len(alone[1])  # the stopped row's text ends early
    assert [kind for kind, _, _ in feed.calls[:7]] == ["prefill", "prefill", "step", "step", "step", "prefill", "step"]
    assert feed.calls[6][:2] == ("step", 2)  # request 2 in the stopped row's slot, beside request 0
    assert max(rows for _, rows, _ in feed.calls) == 2
    # Every row fed each of its tokens but the last once: request 1 left with 4 tokens (prefill + 3 steps).
    assert feed.fed("step") == (16 - 1) + (4 - 1) + (16 - 1)


def test_take_fills_the_free_slots_and_never_passes_an_older_beam_search(batched, images):
    """Two requests about the same picture are still two requests (identity, not field-wise ==)."""
    greedy, beam = dict(max_new_tokens=2, **GREEDY), dict(max_new_tokens=2, num_beams=2)
    first, other, second = (
        batched._request(batched.prepare(batched.question(images[0], PROMPTS[0], **o))) for o in (greedy, beam, greedy)
    )
    scheduler = batched.scheduler
    with scheduler._cond:
        scheduler._pending = [first, second, other]
        assert scheduler._take(running=3) == [first] and scheduler._pending == [second, other]  # one free slot
        scheduler._pending = [first, other, second]
        assert scheduler._take(running=0) == [first]  # not past the older beam search
        assert scheduler._take(running=1) == []  # the beam search waits until the batch is empty
        assert scheduler._take(running=0) == [other] and scheduler._take(running=0) == [second]
        scheduler._pending = []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the interrupt, on purpose
def test_a_scheduler_thread_ended_by_an_interrupt_is_replaced(batched, images, monkeypatch):
    expected = batched.ask(images[0], PROMPTS[0], max_new_tokens=3, **GREEDY)
    real = batched.language_model.forward
    interrupts = [KeyboardInterrupt()]

    def forward(*args, **kwargs):
        if interrupts:
            raise interrupts.pop()  # not an Exception: the batch fails its rows and lets it end the thread
        return real(*args, **kwargs)

    monkeypatch.setattr(batched.language_model, "forward", forward)
    with pytest.raises(KeyboardInterrupt):
        batched.ask(images[0], PROMPTS[0], max_new_tokens=3, **GREEDY)
    batched.scheduler._thread.join(10)
    results, threads = _in_threads([lambda: batched.ask(images[0], PROMPTS[0], max_new_tokens=3, **GREEDY)])
    threads[0].join(30)
    assert results == [expected]  # a new scheduler thread served it


def test_a_bad_request_fails_alone(batched, images, monkeypatch):
    alone = [batched.ask(images[i], PROMPTS[i], max_new_tokens=6, **GREEDY) for i in range(2)]
    fns = [
        lambda: batched.ask(images[0], PROMPTS[0], max_new_tokens=6, **GREEDY),
        lambda: batched.ask(b"not an image", PROMPTS[0], max_new_tokens=6, **GREEDY),
        lambda: batched.ask(images[1], PROMPTS[1], max_new_tokens=6, top_p=7.0, do_sample=True),
        lambda: batched.ask(images[1], PROMPTS[1], max_new_tokens=6, **GREEDY),
    ]
    results, threads = _in_threads(fns)
    for t in threads:
        t.join(30)
    assert results[0] == alone[0] and results[3] == alone[1]
    assert isinstance(results[1], blipdemo.ImageError) and "image" in str(results[1]).lower()
    assert isinstance(results[2], ValueError) and "top_p must be" in str(results[2])


def test_a_failing_step_fails_its_rows_and_the_next_request_is_served(batched, images, monkeypatch):
    expected = batched.ask(images[0], PROMPTS[0], max_new_tokens=4, **GREEDY)
    real = batched.language_model.forward
    failures = [RuntimeError("boom")]

    def forward(*args, **kwargs):
        if failures and kwargs.get("inputs_embeds") is None:  # a decode step, not the prefill
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(batched.language_model, "forward", forward)
    with pytest.raises(RuntimeError, match="boom"):
        batched.ask(images[0], PROMPTS[0], max_new_tokens=4, **GREEDY)
    assert batched.ask(images[0], PROMPTS[0], max_new_tokens=4, **GREEDY) == expected  # the scheduler goes on


def test_beam_search_waits_for_an_empty_batch_and_nobody_passes_it(batched, images, monkeypatch):
    beam_alone = batched.ask(images[1], PROMPTS[1], max_new_tokens=6, num_beams=3)
    greedy_alone = batched.ask(images[2], PROMPTS[2], max_new_tokens=6, **GREEDY)
    sampled_alone = batched.ask(images[0], PROMPTS[0], max_new_tokens=6, do_sample=True, top_p=0.9, seed=3)
    beams_before = batched.scheduler.alone
    feed = Feed(batched, monkeypatch, hold_at=1)
    _, t0 = _in_threads([lambda: batched.ask(images[0], "Hello?", max_new_tokens=2, **GREEDY)])
    assert feed.entered.wait(10)
    fns = [
        lambda: batched.ask(images[1], PROMPTS[1], max_new_tokens=6, num_beams=3),
        lambda: batched.ask(images[0], PROMPTS[0], max_new_tokens=6, do_sample=True, top_p=0.9, seed=3),
        lambda: batched.ask(images[2], PROMPTS[2], max_new_tokens=6, **GREEDY),
    ]
    results, threads = [], []
    for k, fn in enumerate(fns):  # queued in this order: beam search, sampling, greedy
        result, thread = _in_threads([fn])
        results, threads = results + [result], threads + thread
        _wait_pending(batched, k + 1)
    feed.open()
    for t in t0 + threads:
        t.join(30)
    assert [r[0] for r in results] == [beam_alone, sampled_alone, greedy_alone]
    # The running greedy row ends, then the beam search runs alone (its first call: 3 beams), then sampling and
    # greedy share one batch (their own processors each): neither passed the older beam search.
    assert feed.prefill_rows() == [1, 3, 2]
    assert batched.scheduler.alone == beams_before + 1


def test_explain_leaves_the_attention_of_concurrent_generations_alone(batched, images, monkeypatch):
    """The map pass records the LM's weights in its own thread; generation keeps its implementation throughout."""
    lm = batched.language_model
    alone = batched.ask(images[2], PROMPTS[2], max_new_tokens=24, min_new_tokens=24, **GREEDY)
    seen = []
    forward = lm.forward

    def slow(*args, **kwargs):  # 20 ms a step, so that the maps below are made while the answer is being generated
        seen.append(lm.config._attn_implementation)
        threading.Event().wait(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(lm, "forward", slow)
    stream = batched.stream(images[2], PROMPTS[2], max_new_tokens=24, min_new_tokens=24, **GREEDY)
    text = next(stream)
    explanations = [batched.explain(images[0], PROMPTS[0], answer="red and green") for _ in range(3)]
    steps_during_maps = len(seen)
    text += "".join(stream)
    assert text.strip() == alone
    assert 3 <= steps_during_maps < len(seen), "the maps were not made while the answer was being generated"
    assert set(seen) == {"blipdemo:sdpa"}
    assert all(abs(e.image_map.sum() - 1) < 1e-6 for e in explanations)


def test_max_batch_size_is_checked(checkpoint_dir):
    for bad in (0, -1, 2.5, "4", True):
        with pytest.raises(ValueError, match="max_batch_size"):
            blipdemo.load(checkpoint_dir("instructblip", "llama"), max_batch_size=bad)


def test_a_stopped_request_leaves_the_queue_at_once(batched, images, monkeypatch):
    """A request stopped while it waits for a busy model ends at once: its reader is free (not held until the
    running batch ends) and the request leaves the queue."""
    feed = Feed(batched, monkeypatch, hold_at=1)
    _, t0 = _in_threads([lambda: batched.ask(images[0], "Hello?", max_new_tokens=2, **GREEDY)])
    assert feed.entered.wait(10)  # the model is busy with the first request, held
    switch = threading.Event()  # the run's switch: Stop, or the client left
    stream = batched.stream(images[1], PROMPTS[1], max_new_tokens=4, do_sample=True, top_p=0.5, stop_event=switch)
    read, threads = _in_threads([lambda: list(stream)])
    _wait_pending(batched, 1)
    switch.set()
    threads[0].join(5)  # the model stays held all along
    try:
        assert not threads[0].is_alive(), "the stopped request's reader waited for the busy model"
        assert read[0] == []
        with batched.scheduler._cond:
            assert not batched.scheduler._pending, "the stopped request still waits in the queue"
    finally:
        feed.open()
        for t in t0 + threads:
            t.join(30)


def test_stopped_requests_take_no_slot_and_hold_nobody_back():
    def request(alone=False, stopped=False):
        switch = threading.Event()
        if stopped:
            switch.set()
        return Request(inputs=None, alone=alone, external_stop=switch)

    scheduler = Scheduler(None, max_batch_size=4)
    live = [request(), request()]
    scheduler._pending = [request(stopped=True), live[0], request(stopped=True), live[1]]
    assert scheduler._take(running=2) == live  # two free slots, two live requests
    assert scheduler._pending == []
    live = request()
    scheduler._pending = [request(alone=True, stopped=True), live]
    assert scheduler._take(running=1) == [live]  # a stopped older beam search holds nobody back


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the fault, on purpose
def test_a_caller_is_told_when_the_scheduler_thread_dies_and_the_next_request_is_served(batched, images, monkeypatch):
    """A scheduler thread that dies (a fault outside any batch) leaves no caller waiting for ever: the caller gets an
    error, and the next request a new thread."""
    from blipdemo.batching import SchedulerError

    expected = batched.ask(images[0], PROMPTS[0], max_new_tokens=3, **GREEDY)
    scheduler = batched.scheduler
    real_take = scheduler._take

    def broken_take(*args, **kwargs):
        raise RuntimeError("a fault in the scheduler")

    monkeypatch.setattr(scheduler, "_take", broken_take)
    results, threads = _in_threads([lambda: batched.ask(images[0], PROMPTS[0], max_new_tokens=3, **GREEDY)])
    threads[0].join(10)
    assert not threads[0].is_alive(), "the caller waited for a dead scheduler"
    assert isinstance(results[0], SchedulerError), results[0]
    monkeypatch.setattr(scheduler, "_take", real_take)
    assert batched.ask(images[0], PROMPTS[0], max_new_tokens=3, **GREEDY) == expected  # served by a new thread


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (ZeroGPU's workers are forks)")
def test_a_fork_while_a_lock_is_held_leaves_the_child_free(batched, images):
    """ZeroGPU forks a worker while other threads of the app run: a lock held at that moment (the scheduler's, the
    image cache's) must not stay held in the child, where nobody would release it."""
    batched.ask(images[0], PROMPTS[0], max_new_tokens=2, **GREEDY)  # the scheduler thread exists
    scheduler = batched.scheduler
    with scheduler._cond, batched._cache_lock:
        pid = os.fork()
        if pid == 0:  # the child: both locks must be free, and the queue empty
            free = scheduler._cond.acquire(timeout=2) and batched._cache_lock.acquire(timeout=2)
            os._exit(0 if free and not scheduler._pending and not scheduler.alive() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "a lock held at the fork stayed held in the child"
