"""Look closer in the page, as a person uses it (a real headless Chromium): upload a large photo with a small scene,
tick "Look closer", ask; the answer is the library's look-closer answer, and the picture with the box it zoomed into,
beside the crop, appears under the chat. On a small picture nothing is cropped and no such view appears. Expected
answers come from the library itself (``vlm.ask`` with the page's default settings), never from this file."""

from __future__ import annotations

import json

import pytest
from browser import click_example, launch, open_app, read_answer, skip_without_browser, toasts
from served import serve
from small_detail_cases import cases, cropping

import app as app_module
from blipdemo.decoding import INSTRUCTBLIP_DEFAULTS

pytestmark = pytest.mark.browser
EXAMPLES = app_module.ASSETS / "examples"
PAGE_DEFAULTS = {k: v for k, v in INSTRUCTBLIP_DEFAULTS.items() if k not in ("top_p", "temperature")}

skip_without_browser()
pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def served():
    with serve("--model", str(app_module.EMBEDDED_MODEL)) as (_, vlm, url):
        yield vlm, url


@pytest.fixture(scope="module")
def browser():
    with launch() as b:
        yield b


def upload(page, path) -> None:
    page.locator("#image input[type=file]").set_input_files(str(path))
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=user] img').length >= 1", timeout=30000)


def ask(page, question: str, turns: int = 1) -> str:
    page.locator("#instruction textarea").fill(question)
    page.locator("#send").click()
    return read_answer(page, turns=turns)


def test_look_closer_answers_from_the_crop_and_shows_where(served, browser, tmp_path):
    vlm, url = served
    detail, question, _ = cropping(vlm, cases(20, seed=4, family="color"))
    path = tmp_path / "small-detail.png"
    detail.image.save(path)
    expected = vlm.ask(str(path), question, look_closer=True, **PAGE_DEFAULTS)
    page = open_app(browser, url)
    upload(page, path)
    view = page.locator("#looked-closer")
    assert not view.is_visible(), "nothing was looked at yet"
    page.locator("#look-closer input").check()
    assert ask(page, question) == expected
    page.wait_for_selector("#looked-closer img", state="visible", timeout=30000)
    size = page.evaluate(
        "() => { const i = document.querySelector('#looked-closer img'); return [i.naturalWidth, i.naturalHeight]; }"
    )
    assert size[0] > size[1] > 0, "the picture with its box and the crop beside it"
    assert "Looked closer" in view.inner_text()
    assert toasts(page) == []
    # Undo takes the answer back, and the view with it.
    page.locator("#undo").click()
    page.wait_for_selector("#looked-closer", state="hidden", timeout=30000)
    # Ticked again the view comes back; unticked, the next answer is the plain one, and the view goes.
    assert ask(page, question) == expected
    page.wait_for_selector("#looked-closer img", state="visible", timeout=30000)
    page.locator("#look-closer input").uncheck()
    plain = vlm.ask(str(path), question, history=[(question, expected)], **PAGE_DEFAULTS)
    assert ask(page, question, turns=2) == plain
    page.wait_for_selector("#looked-closer", state="hidden", timeout=30000)


def test_on_a_small_picture_look_closer_changes_nothing(served, browser):
    """An example's picture is small (under 4× the model's input): answered whole, as without look-closer."""
    vlm, url = served
    ex = json.loads((EXAMPLES / "examples.json").read_text())[0]
    page = open_app(browser, url)
    click_example(page, 0)
    page.locator("#look-closer input").check()
    page.locator("#send").click()
    assert read_answer(page) == vlm.ask(str(EXAMPLES / ex["image"]), ex["question"], **PAGE_DEFAULTS)
    assert not page.locator("#looked-closer").is_visible()
    assert toasts(page) == []
