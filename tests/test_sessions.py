"""Gradio's per-visitor sessions, kept lean (blipdemo/ui/sessions.py), against Gradio's own ``SessionState``."""

from __future__ import annotations

import json
import logging
import random
import tracemalloc

import gradio as gr
import httpx
import pytest
from gradio.state_holder import SessionState, StateHolder
from gradio_client import Client, handle_file
from served import serve

import app as app_module
from blipdemo.tiny import scenes
from blipdemo.ui import sessions

ANSWER = ["Beam search", 1, 12, 1, 0.9, 1.0, 1.5, 1.0]  # method, beams, max/min new, top-p, temperature, rep, len
MAPS = ["Attention", "All (mean)", "All (mean)", "All (mean)", "All (mean)"]


@pytest.fixture(scope="module")
def served():
    with serve("--model", str(app_module.EMBEDDED_MODEL)) as (demo, vlm, url):
        yield demo, url


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    rng = random.Random(3)
    folder = tmp_path_factory.mktemp("sessions")
    paths = []
    for i in range(2):
        path = folder / f"scene-{i}.png"
        scenes.render(scenes.sample_scene(rng), rng).save(path)
        paths.append(path)
    return paths


def turns(client: Client, pictures) -> list[str]:
    """Two chat turns with maps, then one without, as the page's Send does them; the answers."""
    answers, chat = [], []
    for picture, maps in ((pictures[0], True), (pictures[0], True), (pictures[1], False)):
        outputs = client.predict(
            handle_file(str(picture)), "What color is the circle?", chat, maps, True, False, *ANSWER, *MAPS,
            api_name="/chat",
        )  # fmt: skip
        chat = outputs[0]
        content = chat[-1]["content"]
        answers.append("".join(p["text"] for p in content) if isinstance(content, list) else content)
    return answers


def test_the_app_keeps_lean_sessions_that_give_what_gradios_own_give(served, pictures):
    """Two visitors run the same turns: one in a lean session (the app's), one in Gradio's own ``SessionState``
    (put in the store before its first request). Same answers, same state kept, same blocks, and the same configs
    for Gradio's deep-link route, compared whole; and the route works on a lean session."""
    demo, url = served
    holder = demo.state_holder
    assert type(holder) is sessions.LeanStateHolder

    lean, own = Client(url, verbose=False), Client(url, verbose=False)
    holder.session_data[own.session_hash] = SessionState(demo)  # Gradio's, which the holder then uses as it is

    assert turns(lean, pictures) == turns(own, pictures)

    a, b = holder.session_data[lean.session_hash], holder.session_data[own.session_hash]
    assert type(a) is sessions.LeanSession and type(b) is SessionState
    assert set(a.state_data) == set(b.state_data) and a.state_data  # the app's gr.States, set by the turns
    assert {k: type(v) for k, v in a.state_data.items()} == {k: type(v) for k, v in b.state_data.items()}
    # The blocks: the page's (updated ones replaced by the session's copies), then those made while postprocessing,
    # whose ids come from Gradio's global counter (so differ between the two visitors): compared by kind.
    page, made = [{}, {}], [[], []]
    for i, session in enumerate((a, b)):
        for k, v in session.blocks_config.blocks.items():
            if k in demo.blocks:
                page[i][k] = type(v)
            else:
                made[i].append(type(v).__name__)
    assert page[0] == page[1] and sorted(made[0]) == sorted(made[1])
    assert not a.config_values.made  # nothing made: no one has read them

    # What Gradio's deep-link route reads: every config whole, with the ids of the blocks made while the events ran
    # (Gradio's global counter) numbered in order instead.
    def configs(session) -> list:
        made = [k for k in session.config_values if k not in demo.blocks]
        named = {k: f"made-{i}" for i, k in enumerate(made)}

        def same(x):
            if isinstance(x, dict):
                return {k: named.get(v, v) if k == "id" and isinstance(v, int) else same(v) for k, v in x.items()}
            return [same(v) for v in x] if isinstance(x, list) else x

        return same(json.loads(json.dumps(list(session.components), default=str)))

    assert configs(a) == configs(b)
    link = httpx.get(url + "gradio_api/deep_link", params={"session_hash": lean.session_hash})
    assert link.status_code == 200 and link.json()  # the route works on a lean session


def test_a_lean_session_holds_a_fraction_of_gradios_own(served, pictures):
    """What a session costs in memory (``tracemalloc``), made as the store makes it and after one chat event's
    input values are written, as Gradio's preprocess does: Gradio's own copies every component's config."""
    demo, _ = served
    chat = next(fn for fn in demo.fns.values() if fn.api_name == "chat")
    inputs = [b._id for b in chat.inputs]

    def cost(make) -> int:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            kept = []
            for _ in range(10):
                session = make(demo)
                for key in inputs:
                    session._update_value_in_config(key, "a value")
                kept.append(session)
            return (tracemalloc.get_traced_memory()[0] - before) // 10
        finally:
            tracemalloc.stop()

    lean, own = cost(sessions.LeanSession), cost(SessionState)
    assert lean < own / 4, (lean, own)


def test_a_gradio_whose_sessions_differ_keeps_its_own_and_says_so(monkeypatch, caplog):
    """``LeanSession`` rewrites a private Gradio class: where Gradio's holds other attributes, the app leaves
    Gradio's sessions alone (with a warning) rather than guess."""
    monkeypatch.setattr(sessions, "_EXPECTED", sessions._EXPECTED | {"something_new"})
    with sessions.Blocks() as demo:
        gr.Textbox()
    holder = StateHolder()
    with caplog.at_level(logging.WARNING, logger=sessions.__name__):
        holder.set_blocks(demo)
    assert type(holder) is StateHolder and demo.state_holder is holder
    assert "full config copy" in caplog.text
