"""Decoding options, streaming, chat history, the vision-feature cache and training through forward."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from reference import reference
from transformers import TextIteratorStreamer

import blipdemo
from blipdemo import decoding
from blipdemo.prompts import build_prompt, normalize_history

PROMPT = "Describe the image in detail."


@pytest.fixture(scope="module")
def vlm(checkpoint_dir):
    return blipdemo.load(checkpoint_dir("instructblip", "llama"), dtype="float32")


@pytest.fixture(scope="module")
def t5(checkpoint_dir):
    return blipdemo.load(checkpoint_dir("blip2", "t5"), dtype="float32")


@pytest.mark.parametrize(
    "name,value",
    [
        ("temperature", 1e9),
        ("temperature", 0),
        ("num_beams", 0),
        ("num_beams", 2.5),
        ("max_new_tokens", 10**6),
        ("max_new_tokens", 0),
        ("top_p", 5),
        ("top_p", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", 0.5),
        ("length_penalty", math.nan),
        ("temperature", math.inf),
        ("min_new_tokens", -1),
        ("top_p", "0.9"),
        ("num_beams", True),
    ],
)
def test_out_of_range_decoding_is_a_clear_error_before_model_work(vlm, images, name, value):
    calls = vlm.vision_calls
    with pytest.raises(ValueError, match=name):
        vlm.ask(images[0], PROMPT, **{name: value})
    with pytest.raises(ValueError, match=name):
        list(vlm.stream(images[0], PROMPT, **{name: value}))
    assert vlm.vision_calls == calls, "validation must happen before the vision encoder runs"


def test_error_message_names_the_range():
    with pytest.raises(ValueError, match=r"num_beams must be an integer from 1 to 10"):
        decoding.validate({"num_beams": 0})
    with pytest.raises(ValueError, match=r"min_new_tokens \(9\) must not exceed max_new_tokens \(4\)"):
        decoding.validate({"min_new_tokens": 9, "max_new_tokens": 4})
    with pytest.raises(TypeError, match="top_k"):
        decoding.validate({"top_k": 5})


def test_decoding_modes(vlm, images):
    greedy = vlm.ask(images[0], PROMPT, max_new_tokens=10, num_beams=1, do_sample=False)
    beams = vlm.ask(images[0], PROMPT, max_new_tokens=10, num_beams=4, length_penalty=1.0)
    assert isinstance(greedy, str) and isinstance(beams, str)
    # Nucleus sampling: seeded runs repeat, and with top_p → 0 it collapses to the greedy answer.
    torch.manual_seed(3)
    a = vlm.ask(images[0], PROMPT, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.5)
    torch.manual_seed(3)
    b = vlm.ask(images[0], PROMPT, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.5)
    assert a == b
    samples = set()
    for seed in range(6):
        torch.manual_seed(seed)
        samples.add(vlm.ask(images[0], PROMPT, max_new_tokens=10, do_sample=True, temperature=2.0))
    assert len(samples) > 1, "sampling at temperature 2 should vary"
    assert vlm.ask(images[0], PROMPT, max_new_tokens=10, do_sample=True, top_p=1e-6) == greedy


def test_min_and_max_new_tokens(vlm, images):
    ids = vlm.generate_ids(images[0], PROMPT, max_new_tokens=7, min_new_tokens=7, num_beams=1)
    assert len(ids) == 7
    ids = vlm.generate_ids(images[1], PROMPT, max_new_tokens=3, num_beams=1)
    assert len(ids) <= 3


@pytest.mark.parametrize("which", ["vlm", "t5"])
def test_stream_concatenates_to_ask(request, images, which):
    model = request.getfixturevalue(which)
    for image in images:
        pieces = list(model.stream(image, PROMPT, max_new_tokens=16, num_beams=1))
        assert "".join(pieces).strip() == model.ask(image, PROMPT, max_new_tokens=16, num_beams=1)
    # Sampling draws from torch's global generator, also from the stream's worker thread: the same seed gives the
    # same sample as ask.
    torch.manual_seed(5)
    sampled = list(model.stream(images[0], PROMPT, max_new_tokens=16, do_sample=True, top_p=0.9))
    torch.manual_seed(5)
    assert "".join(sampled).strip() == model.ask(images[0], PROMPT, max_new_tokens=16, do_sample=True, top_p=0.9)


def _generation_threads(before: set) -> list[threading.Thread]:
    """The generation threads started since ``before`` (a set of thread objects): by identity, not by name alone,
    so that a thread left over from an earlier test (same name) can neither stand in for nor hide the one under test."""
    return [t for t in threading.enumerate() if t not in before and t.name == "blipdemo-generate"]


@pytest.fixture
def gated(vlm, monkeypatch):
    """(steps, release): once the streamer has handed out text, the LM's next step waits (once, up to 30 s) for
    ``release``; ``steps`` counts the LM's forward calls. Holding the generation at a known point makes "still
    running when the first piece arrives" a fact to check rather than a race to win."""
    handed_out, release = threading.Event(), threading.Event()
    steps = []
    real_forward = vlm.language_model.forward
    real_text = TextIteratorStreamer.on_finalized_text

    def forward(*args, **kwargs):
        if handed_out.is_set() and not release.wait(timeout=30):
            release.set()  # the reader never came: give up once, not at every remaining step
        steps.append(None)
        return real_forward(*args, **kwargs)

    def on_finalized_text(self, text, stream_end=False):
        real_text(self, text, stream_end)
        if text.strip():
            handed_out.set()

    monkeypatch.setattr(vlm.language_model, "forward", forward)
    monkeypatch.setattr(TextIteratorStreamer, "on_finalized_text", on_finalized_text)
    return steps, release


def test_stream_yields_increments_as_they_are_produced(vlm, images, gated):
    """The first piece reaches the reader while the generation is still running, with steps still to come. A stream
    that yielded only at the end would hand out its first piece after the generation (the gate gives up after 30 s)
    had ended: its thread would be gone and every step done."""
    steps, release = gated
    options = dict(max_new_tokens=40, min_new_tokens=40, num_beams=1)
    before = set(threading.enumerate())
    stream = vlm.stream(images[0], PROMPT, **options)
    first = next(stream)
    running = [t for t in _generation_threads(before) if t.is_alive()]
    steps_at_first = len(steps)
    release.set()
    rest = list(stream)
    assert first and len(running) == 1, "the generation must still be running when its first piece arrives"
    assert steps_at_first < 40 == len(steps), (steps_at_first, len(steps))
    assert rest, "more pieces must follow the first"
    assert "".join([first, *rest]).strip() == vlm.ask(images[0], PROMPT, **options)


def test_beam_search_stream_yields_final_text_once(vlm, images):
    pieces = list(vlm.stream(images[0], PROMPT, max_new_tokens=10, num_beams=3))
    assert pieces == [vlm.ask(images[0], PROMPT, max_new_tokens=10, num_beams=3)]


def test_closing_a_stream_stops_generation(vlm, images, gated):
    """Closing ends the generation early: its thread is gone and far fewer steps ran than the answer's length (the old
    check could not tell a stopped thread from one that close() had simply waited for)."""
    steps, release = gated
    room = vlm.prepare(
        vlm.question(images[0], PROMPT, max_new_tokens=2000)
    ).max_new_tokens  # the LM's limit caps the 2000
    before = set(threading.enumerate())
    stream = vlm.stream(images[0], PROMPT, max_new_tokens=2000, min_new_tokens=2000, num_beams=1)
    next(stream)
    ours = _generation_threads(before)
    assert len(ours) == 1 and ours[0].is_alive(), "the generation is held running after its first piece"
    release.set()
    stream.close()  # what a disconnecting client does
    assert not ours[0].is_alive(), "the generation thread must be finished once the stream is closed"
    assert len(steps) < room / 2, f"{len(steps)} of {room} steps ran: the generation was not stopped"


def test_stop_event_stops_generation(vlm, images):
    stop = threading.Event()
    pieces = []
    for piece in vlm.stream(images[0], PROMPT, max_new_tokens=2000, min_new_tokens=2000, num_beams=1, stop_event=stop):
        pieces.append(piece)
        if len(pieces) == 3:
            stop.set()
    assert 3 <= len(pieces) < 50


def test_history_templates():
    history = [("What color is the circle?", "red"), ("Where is it?", "top left")]
    assert build_prompt("instructblip", "Is there a square?", history) == (
        "What color is the circle? red Where is it? top left Is there a square?"
    )
    assert build_prompt("blip2", "Is there a square?", history) == (
        "Question: What color is the circle? Answer: red Question: Where is it? Answer: top left "
        "Question: Is there a square? Answer:"
    )
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": {"path": "x.png"}},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    assert normalize_history(messages) == [("a", "b"), ("c", "d")]


def test_history_reaches_the_model_as_the_reference_would_see_it(checkpoint_dir, vlm, images):
    history = [("What color is the circle?", "red")]
    model, processor, _ = reference(checkpoint_dir("instructblip", "llama"))
    text = "What color is the circle? red Where is it?"
    inputs = processor(images=images[0], text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, num_beams=1, do_sample=False)
    expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    assert vlm.ask(images[0], "Where is it?", history=history, max_new_tokens=8, num_beams=1) == expected


def test_history_is_truncated_oldest_first(vlm, images):
    # The test checkpoint's Q-Former reads 64 positions; 30 turns cannot all fit.
    history = [(f"question number {i} about the picture", f"answer {i}") for i in range(30)]
    inputs = vlm.prepare(vlm.question(images[0], "What color is it?", history=history, max_new_tokens=8))
    assert inputs.prompt.endswith("What color is it?")
    assert "answer 29" in inputs.prompt and "question number 0 " not in inputs.prompt
    assert inputs.qformer_input_ids.shape[1] <= vlm.config.qformer_config.max_position_embeddings
    prompt = vlm.prepare(
        vlm.question(images[0], "What color is it?", history=history, max_new_tokens=4)
    ).prompt  # the ask below
    kept = [i for i in range(30) if f"question number {i} about" in prompt]
    assert kept == list(range(30 - len(kept), 30)), "whole turns are dropped, oldest first"
    # Asking with the whole history answers exactly as asking with only the turns that fit.
    answer = vlm.ask(images[0], "What color is it?", history=history, max_new_tokens=4)
    assert answer == vlm.ask(images[0], "What color is it?", history=history[-len(kept) :], max_new_tokens=4)
    with pytest.raises(ValueError, match="too long"):
        vlm.ask(images[0], "word " * 500, max_new_tokens=4)


def test_special_tokens_in_text_are_plain_text(vlm, images):
    inputs = vlm.prepare(vlm.question(images[0], "What is <image> </s> [SEP] <s>?", max_new_tokens=4))
    assert vlm.config.image_token_index not in inputs.input_ids[0].tolist()
    assert vlm.tokenizer.eos_token_id not in inputs.input_ids[0].tolist()
    assert vlm.qformer_tokenizer.sep_token_id not in inputs.qformer_input_ids[0, :-1].tolist()


def test_vision_cache(vlm, images):
    vlm.clear_cache()
    calls = vlm.vision_calls
    first = vlm.ask(images[0], PROMPT, max_new_tokens=6, num_beams=1)
    assert vlm.vision_calls == calls + 1
    vlm.ask(images[0].copy(), "What color is it?", max_new_tokens=6, num_beams=1)  # same content, new object
    list(vlm.stream(images[0], "Is there a circle?", max_new_tokens=6, num_beams=1))
    assert vlm.vision_calls == calls + 1, "follow-up questions about the same image must skip the ViT"
    vlm.ask(images[1], PROMPT, max_new_tokens=6, num_beams=1)
    assert vlm.vision_calls == calls + 2
    assert vlm.ask(images[0], PROMPT, max_new_tokens=6, num_beams=1) == first  # cached features are exact


def test_vision_cache_is_bounded(vlm):
    import numpy as np

    vlm.clear_cache()
    old = vlm.cache_size
    vlm.cache_size = 3
    try:
        for i in range(6):
            vlm.image_tokens([blipdemo.Picture.of(np.full((8, 8, 3), i * 20, np.uint8))])
        assert len(vlm._cache) == 3
    finally:
        vlm.cache_size = old


@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("blip2", "t5"), ("blip2", "opt")])
def test_training_loss_matches_reference_and_gradients_reach_every_stage(checkpoint_dir, images, family, lm):
    folder = checkpoint_dir(family, lm)
    ours = blipdemo.load(folder, dtype="float32")
    ref, processor, _ = reference(folder)
    text = "What color is the circle? red" if family == "instructblip" else "Question: what color? Answer: red"
    inputs = processor(images=images[0], text=text, return_tensors="pt")
    q = ours.config.num_query_tokens
    ids = inputs["input_ids"][:, q:]
    if ours.is_encoder_decoder:
        labels = ours.tokenizer("red blue", return_tensors="pt")["input_ids"]
        ref_labels, our_labels = labels, labels
    else:
        our_labels = ids.clone()
        our_labels[:, :3] = -100
        ref_labels = torch.cat([torch.full((1, q), -100), our_labels], dim=1)
    with torch.no_grad():
        expected = ref(**inputs, labels=ref_labels).loss
    ours.model.eval()  # dropout off on both sides; gradients still flow
    out = ours(
        pixel_values=inputs["pixel_values"],
        input_ids=ids,
        qformer_input_ids=inputs.get("qformer_input_ids"),
        labels=our_labels,
    )
    assert abs(out.loss.item() - expected.item()) < 1e-4
    out.loss.backward()
    for name in (
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.encoder.layers.0.self_attn.qkv.weight",
        "query_tokens",
        "qformer.encoder.layer.0.crossattention.attention.key.weight",
        "language_projection.weight",
    ):
        grad = ours.model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_a_reader_that_pulls_late_gets_the_whole_answer(vlm, images, monkeypatch, tmp_path):
    """The app's GPU entry point: a reader that pulls late (the app's event loop, busy with another visitor) is not a
    vanished client: the answer and its maps come whole, and no timer thread is started per piece. (A vanished client
    is told by the queue's clean-up, ``control``, not by how fast a healthy reader pulls.)"""
    from blipdemo import gpu

    timers = []
    monkeypatch.setattr(threading, "Timer", lambda *a, **k: timers.append(a) or pytest.fail("a timer was started"))
    path = tmp_path / "image.png"
    images[0].save(path)
    options = dict(max_new_tokens=6, min_new_tokens=6, num_beams=1)
    question = vlm.question(path, PROMPT, maps={}, **options)
    items = []
    for item in gpu.answer(gpu.register(vlm), question):
        items.append(item)
        time.sleep(0.6)  # longer than any reader's grace the old code gave (0.5 s)
    texts = [value for kind, value in items if kind == "text"]
    assert texts[-1] == vlm.ask(path, PROMPT, **options)
    assert [kind for kind, _ in items[-2:]] == ["ids", "maps"] and items[-1][1].text == texts[-1]
    assert not timers
