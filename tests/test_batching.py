"""Batching: concurrent requests decode together, and each keeps its own answer, length, stop and errors.

The reference for a request in a batch is the same request alone (whose answers match transformers, see
test_parity.py): float32, greedy, prompts of different lengths, images of different sizes, both LM kinds.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

import blipdemo
from blipdemo.batching import Request, run_batch

PROMPTS = ["What is in the image?", "Describe it in detail, please, and say what colors you see.", "Where?"]
GREEDY = dict(num_beams=1, do_sample=False)


def _requests(vlm, images, lengths, minimums=None):
    minimums = minimums or [None] * len(lengths)
    out = []
    for i, (n, m) in enumerate(zip(lengths, minimums, strict=True)):
        options = dict(max_new_tokens=n, min_new_tokens=m, **GREEDY)
        question = vlm.question(images[i % len(images)], PROMPTS[i % len(PROMPTS)], **options)
        out.append(vlm._request(vlm.prepare(question)))
    return out


@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("blip2", "opt"), ("instructblip", "t5")])
def test_greedy_rows_of_a_batch_answer_as_alone(checkpoint_dir, images, family, lm):
    vlm = blipdemo.load(checkpoint_dir(family, lm), dtype="float32")
    lengths, minimums = [12, 5, 9, 12], [12, None, 3, 6]  # each row its own max_new_tokens and min_new_tokens
    requests = _requests(vlm, images, lengths, minimums)
    assert len({r.inputs.input_ids.shape[1] for r in requests}) > 1, "the prompts must differ in length"
    run_batch(vlm, requests)
    for i, request in enumerate(requests):
        assert request.error is None
        alone = vlm.generate_ids(
            images[i % len(images)],
            PROMPTS[i % len(PROMPTS)],
            max_new_tokens=lengths[i],
            min_new_tokens=minimums[i],
            **GREEDY,
        )
        assert request.ids == alone.tolist(), f"row {i}"
        assert len(request.ids) <= lengths[i]
        if minimums[i]:
            assert len(request.ids) >= minimums[i]


def test_8bit_rows_answer_as_alone(checkpoint_dir, images):
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama", lm_width=64), dtype="float32", load_in_8bit=True)
    requests = _requests(vlm, images, [8, 8, 8])
    run_batch(vlm, requests)
    for i, request in enumerate(requests):
        alone = vlm.generate_ids(images[i], PROMPTS[i], max_new_tokens=8, **GREEDY)
        assert request.ids == alone.tolist()


@pytest.mark.parametrize("setup", ["4-bit", "disk-offloaded device map"])
def test_4bit_and_device_mapped_lms_batch_and_regroup_as_alone(checkpoint_dir, images, tmp_path, monkeypatch, setup):
    """The LM stays a transformers model, so bitsandbytes layers and accelerate's offload hooks take batches too."""
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
    assert _first_then_the_others(vlm, asks, monkeypatch, hold_at=3) == alone
    assert vlm.scheduler.regroups == 1


def test_the_vit_runs_once_for_the_new_images_of_a_batch(checkpoint_dir, images):
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama"), dtype="float32")
    vlm.ask(images[0], PROMPTS[0], max_new_tokens=2, **GREEDY)  # image 0 is cached now
    calls = vlm.vision_calls
    run_batch(vlm, _requests(vlm, images, [2, 2, 2]))
    assert vlm.vision_calls == calls + 1  # images 1 and 2 together, image 0 from the cache


class Gate:
    """Holds the LM's ``hold_at``-th forward call (and the ones after) until ``open()``: requests sent meanwhile
    wait for the model together."""

    def __init__(self, vlm, monkeypatch, hold_at: int = 1) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.batch_sizes = []
        self.calls = 0
        forward = vlm.language_model.forward

        def gated(*args, **kwargs):
            embeds = kwargs.get("inputs_embeds")
            if embeds is not None and not kwargs.get("past_key_values"):
                self.batch_sizes.append(embeds.shape[0])  # the first step of a generate call: its batch
            self.calls += 1
            if self.calls >= hold_at:
                self.entered.set()
                self.release.wait(timeout=30)
            return forward(*args, **kwargs)

        monkeypatch.setattr(vlm.language_model, "forward", gated)

    def open(self) -> None:
        self.release.set()


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


def _first_then_the_others(vlm, asks, monkeypatch, hold_at: int) -> list:
    """Runs ``asks[0]`` alone, holds its ``hold_at``-th step until the other asks wait for the model, then lets all
    go on; returns every ask's result (an answer, or the error it raised)."""
    gate = Gate(vlm, monkeypatch, hold_at=hold_at)
    first, t0 = _in_threads(asks[:1])
    assert gate.entered.wait(30)
    others, threads = _in_threads(asks[1:])
    _wait_pending(vlm, len(asks) - 1)
    gate.open()
    for t in t0 + threads:
        t.join(60)
    return first + others


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
    gate = Gate(batched, monkeypatch)
    first, t0 = _in_threads([lambda: batched.ask(images[0], "Hello?", max_new_tokens=3, min_new_tokens=3, **GREEDY)])
    assert gate.entered.wait(10)  # the model is busy with the first request
    asks = [lambda i=i: batched.ask(images[i], PROMPTS[i], max_new_tokens=10, **GREEDY) for i in range(3)]
    results, threads = _in_threads(asks)
    _wait_pending(batched, 3)
    gate.open()
    for t in t0 + threads:
        t.join(30)
    assert results == alone and first == [first_alone]
    # The lone first request started at once; after its first step the three waiting requests joined it.
    assert gate.batch_sizes[:2] == [1, 4]
    assert batched.scheduler.regroups == 1


@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("blip2", "opt"), ("instructblip", "t5")])
def test_requests_arriving_mid_answer_join_it_and_every_row_answers_as_alone(
    checkpoint_dir, images, family, lm, monkeypatch
):
    """A regroup re-forms the batch at a step boundary: the running row continues from its answer so far (its
    prompt + ids, or T5's decoder ids) next to the newcomers, each with its own remaining lengths."""
    vlm = blipdemo.load(checkpoint_dir(family, lm), dtype="float32", max_batch_size=4)
    lengths, minimums = [12, 9, 5], [12, 4, None]
    asks = [
        lambda i=i: vlm.ask(images[i], PROMPTS[i], max_new_tokens=lengths[i], min_new_tokens=minimums[i], **GREEDY)
        for i in range(3)
    ]
    alone = [ask() for ask in asks]
    # The running row has 4 tokens when the others come.
    assert _first_then_the_others(vlm, asks, monkeypatch, hold_at=5) == alone
    assert (vlm.scheduler.batches, vlm.scheduler.rows, vlm.scheduler.regroups) == (3 + 2, 3 + 1 + 3, 1)


def test_the_scheduler_tells_requests_apart_by_identity(batched, images):
    """Two requests about the same picture are still two requests (field-wise == would compare their tensors)."""
    greedy, sampling = dict(max_new_tokens=2, **GREEDY), dict(max_new_tokens=2, do_sample=True, top_p=0.5)
    first, other, second = (
        batched._request(batched.prepare(batched.question(images[0], PROMPTS[0], **o)))
        for o in (greedy, sampling, greedy)
    )
    scheduler = batched.scheduler
    scheduler._pending = [first, other, second]
    assert scheduler._take() == [first, second] and scheduler._pending == [other]
    scheduler._pending = []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the interrupt, on purpose
def test_a_scheduler_thread_ended_by_an_interrupt_is_replaced(batched, images, monkeypatch):
    real = batched.language_model.generate
    interrupts = [KeyboardInterrupt()]

    def generate(*args, **kwargs):
        if interrupts:
            raise interrupts.pop()  # not an Exception: run_batch fails the rows and lets it end the thread
        return real(*args, **kwargs)

    monkeypatch.setattr(batched.language_model, "generate", generate)
    with pytest.raises(KeyboardInterrupt):
        batched.ask(images[0], PROMPTS[0], max_new_tokens=3, **GREEDY)
    batched.scheduler._thread.join(10)
    results, threads = _in_threads([lambda: batched.ask(images[0], PROMPTS[0], max_new_tokens=3, **GREEDY)])
    threads[0].join(30)
    assert isinstance(results[0], str) and results[0]  # a new scheduler thread served it


def test_a_regroup_waits_until_the_newcomers_are_as_many_as_the_live_rows():
    from blipdemo.batching import Scheduler

    scheduler = Scheduler(lambda batch, regroup: [], max_batch_size=4)
    waiting = [Request(inputs=None, key=("greedy",)), Request(inputs=None, key=("sampling",))]
    scheduler._pending = waiting
    assert scheduler._should_regroup(("greedy",), live=1)  # one newcomer for one live row
    assert not scheduler._should_regroup(("greedy",), live=2)  # one newcomer would make two rows recompute
    assert not scheduler._should_regroup(("beam",), live=1)  # nobody who can share
    scheduler._pending = waiting * 3
    assert not scheduler._should_regroup(("greedy",), live=4)  # no room
    scheduler._pending = waiting[::-1]
    assert not scheduler._should_regroup(("greedy",), live=1)  # an older request that cannot join goes first


def test_a_stopped_row_ends_alone(batched, images, monkeypatch):
    alone = [batched.ask(images[i], PROMPTS[i], max_new_tokens=12, min_new_tokens=12, **GREEDY) for i in range(3)]
    gate = Gate(batched, monkeypatch)
    _, t0 = _in_threads([lambda: batched.ask(images[0], "Hello?", max_new_tokens=2, **GREEDY)])
    assert gate.entered.wait(10)
    streams = [batched.stream(images[i], PROMPTS[i], max_new_tokens=12, min_new_tokens=12, **GREEDY) for i in range(3)]
    stopped = []

    def read_one_then_leave():
        stopped.append(next(streams[1]))
        streams[1].close()  # the user pressed Stop: this row ends, the others go on
        return "left"

    fns = [lambda: "".join(streams[0]), read_one_then_leave, lambda: "".join(streams[2])]
    results, threads = _in_threads(fns)
    _wait_pending(batched, 3)
    gate.open()
    for t in t0 + threads:
        t.join(30)
    assert results[0].strip() == alone[0] and results[2].strip() == alone[2]
    assert results[1] == "left" and stopped and len(stopped[0]) < len(alone[1])


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
    assert isinstance(results[1], blipdemo.ImageError)
    assert isinstance(results[2], ValueError) and "top_p" in str(results[2])


def test_a_failing_batch_fails_its_rows_and_the_next_request_is_served(batched, images, monkeypatch):
    real = batched.language_model.generate
    failures = [RuntimeError("boom")]

    def generate(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(batched.language_model, "generate", generate)
    with pytest.raises(RuntimeError, match="boom"):
        batched.ask(images[0], PROMPTS[0], max_new_tokens=4, **GREEDY)
    assert batched.ask(images[0], PROMPTS[0], max_new_tokens=4, **GREEDY)  # the scheduler is still there


def test_beam_search_and_sampling_do_not_share_a_greedy_batch(batched, images, monkeypatch):
    beam_alone = batched.ask(images[1], PROMPTS[1], max_new_tokens=6, num_beams=3)
    greedy_alone = batched.ask(images[2], PROMPTS[2], max_new_tokens=6, **GREEDY)
    gate = Gate(batched, monkeypatch)
    _, t0 = _in_threads([lambda: batched.ask(images[0], "Hello?", max_new_tokens=2, **GREEDY)])
    assert gate.entered.wait(10)
    fns = [
        lambda: batched.ask(images[1], PROMPTS[1], max_new_tokens=6, num_beams=3),
        lambda: batched.ask(images[0], PROMPTS[0], max_new_tokens=6, do_sample=True, top_p=0.9),
        lambda: batched.ask(images[2], PROMPTS[2], max_new_tokens=6, **GREEDY),
    ]
    results, threads = [], []
    for k, fn in enumerate(fns):  # queued in this order: beam search, sampling, greedy
        result, thread = _in_threads([fn])
        results, threads = results + [result], threads + thread
        _wait_pending(batched, k + 1)
    gate.open()
    for t in t0 + threads:
        t.join(30)
    results = [r[0] for r in results]
    assert results[0] == beam_alone and results[2] == greedy_alone and isinstance(results[1], str)
    # Each decodes alone, in the order they came: the greedy one could share the running greedy batch, but does not
    # jump the older beam and sampling requests; beam search's first step shows its 3 beams.
    assert gate.batch_sizes[1:] == [3, 1, 1]
    assert batched.scheduler.regroups == 0


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


def test_reference_alone_matches_transformers_sanity(checkpoint_dir, images):
    """Batching builds on the lone path: check it once more here against the transformers reference."""
    from reference import reference_answer

    folder = checkpoint_dir("instructblip", "llama")
    vlm = blipdemo.load(folder, dtype="float32", max_batch_size=4)
    ours = vlm.ask(images[1], PROMPTS[1], max_new_tokens=8, **GREEDY)
    assert ours == reference_answer(folder, images[1], PROMPTS[1], max_new_tokens=8, **GREEDY)
    assert torch.is_tensor(vlm.generate_ids(images[1], PROMPTS[1], max_new_tokens=2, **GREEDY))


def test_a_stopped_request_leaves_the_queue_at_once(batched, images, monkeypatch):
    """A request stopped while it waits for a busy model ends at once: its reader is free (not held until the
    running batch ends) and the request leaves the queue."""
    gate = Gate(batched, monkeypatch)
    _, t0 = _in_threads([lambda: batched.ask(images[0], "Hello?", max_new_tokens=2, **GREEDY)])
    assert gate.entered.wait(10)  # the model is busy with the first request, held
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
        gate.open()
        for t in t0 + threads:
            t.join(30)


def test_stopped_requests_take_no_slot_and_do_not_count_for_a_regroup():
    from blipdemo.batching import Scheduler

    def request(key, stopped=False):
        switch = threading.Event()
        if stopped:
            switch.set()
        return Request(inputs=None, key=key, external_stop=switch)

    scheduler = Scheduler(lambda batch, regroup: [], max_batch_size=4)
    scheduler._pending = [request(("greedy",), stopped=True), request(("greedy",))]
    assert not scheduler._should_regroup(("greedy",), live=2)  # one live newcomer, not two
    assert len(scheduler._pending) == 1 and not scheduler._pending[0].stopped()
    scheduler._pending = [request(("sampling",), stopped=True), request(("greedy",))]
    assert scheduler._should_regroup(("greedy",), live=1)  # a stopped older request holds nobody back


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the fault, on purpose
def test_a_caller_is_told_when_the_scheduler_thread_dies_and_the_next_request_is_served(batched, images, monkeypatch):
    """A scheduler thread that dies (a fault outside any batch) leaves no caller waiting for ever: the caller gets an
    error, and the next request a new thread."""
    from blipdemo.batching import SchedulerError

    expected = batched.ask(images[0], PROMPTS[0], max_new_tokens=3, **GREEDY)
    scheduler = batched.scheduler
    real_take = scheduler._take

    def broken_take():
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
