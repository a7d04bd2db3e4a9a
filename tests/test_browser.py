"""The app in a real headless Chromium (Debian's chromium, driven by Python playwright), used as a person uses it.

Click an example, press Send without typing, read the streamed answer, click its words; at 1280 px and at a phone's
390 px. The page puts the chat first: the picture, then the chat and the instruction box (beside it on a desktop,
below it on a phone), the maps explorer below them, opened by a word or "Show maps", and nothing empty on screen.
Validation messages show alone (no "Error" badge painted into the chat or the instruction box). Regenerate, Undo, a
slider, Clear. Screenshots are saved under artifacts/ for a person to look at; with BLIPDEMO_DOCS_SCREENSHOTS=1 the
page's two widths also go to docs/ (the README shows them).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from browser import (
    ARTIFACTS,
    bot_messages,
    box,
    click_example,
    click_picture,
    launch,
    open_app,
    open_maps,
    read_answer,
    set_slider,
    shown,
    skip_without_browser,
    toasts,
    visible_error_badges,
)
from served import freed_after, generating, serve, wait_for_generation

import app as app_module

pytestmark = pytest.mark.browser
EXAMPLES = app_module.ASSETS / "examples"
WIDTHS = {"desktop": (1280, 800), "phone": (390, 844)}
DOCS = app_module.HERE / "docs"
# What only an answer's maps bring: the entry under the chat (its words, "Show maps"), then the explorer and its parts.
ENTRY = ["#answer-maps", "#words", "#open-maps"]
EXPLORER = ["#maps", "#heatmap", "#legend", "#region-words", "#queries", "#map-settings"]

skip_without_browser()  # a skip with its reason where no browser is found (a failure in CI, which installs one)
pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def served():
    """The app as `python app.py` builds it, on the embedded model, on a free loopback port: (model, url)."""
    with serve("--model", str(app_module.EMBEDDED_MODEL)) as (_, vlm, address):
        yield vlm, address


@pytest.fixture(scope="module")
def url(served):
    return served[1]


@pytest.fixture(scope="module")
def browser():
    with launch() as b:
        yield b


def examples() -> list[dict]:
    return json.loads((EXAMPLES / "examples.json").read_text())


def _wait_for_toast(page, text: str) -> None:
    """Until a toast on screen says ``text`` (the check runs through the queue: no fixed delay)."""
    try:
        page.wait_for_function(
            "text => [...document.querySelectorAll('.toast-body')].some(t => t.innerText.includes(text))",
            arg=text,
            timeout=20_000,
        )
    except Exception as e:  # playwright's TimeoutError: say what was on screen instead
        raise AssertionError(f"no toast saying {text!r}; toasts on screen: {toasts(page)}") from e


@pytest.mark.parametrize("size", WIDTHS)
def test_each_example_answers_with_send_alone(url, browser, size):
    """Click an example row, press Send (no typing): the right answer, its words as chips, one turn per picture (two for
    the two-turn example, whose first turn the example puts into the chat and whose question follows it up)."""
    ARTIFACTS.mkdir(exist_ok=True)
    page = open_app(browser, url, *WIDTHS[size])
    for i, example in enumerate(examples()):
        # Alternate between clicking the example's picture and its question, as people do both.
        assert click_example(page, i, cell=i % 2) == example["question"], "the example must fill the instruction box"
        page.locator("#send").click()
        turns = 1 + len(example.get("history", []))  # a two-turn example brings its first turn into the chat
        assert read_answer(page, example["answer"], turns=turns) == example["answer"], example
        assert bot_messages(page).count() == turns, "a new picture starts a new chat (with the example's turns)"
        page.wait_for_function(
            "n => document.querySelectorAll('#words label').length == n",
            arg=1 + len(example["answer"].split()),
            timeout=30_000,
        )
        assert page.locator("#words label").all_inner_texts() == ["Whole answer", *example["answer"].split()]
        assert page.locator("#instruction textarea").input_value() == ""
        if i == 0:
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(ARTIFACTS / f"example-{size}.png"), full_page=True)
    assert not visible_error_badges(page)
    page.close()


def test_validation_messages_show_alone(url, browser, tmp_path):
    """No image, no instruction, a file that is no image: each is the message alone, and the app goes on."""
    page = open_app(browser, url)
    page.locator("#instruction textarea").fill("What color is the square?")
    page.locator("#send").click()
    _wait_for_toast(page, "Upload an image first")
    assert not visible_error_badges(page)
    assert page.locator("#instruction textarea").input_value() == "What color is the square?", "nothing is lost"

    click_example(page, 2)
    page.locator("#instruction textarea").fill("   ")
    page.locator("#send").click()
    _wait_for_toast(page, "Type a question")
    assert not visible_error_badges(page)
    assert bot_messages(page).count() == 0, "a refused question leaves no turn in the chat"

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"these bytes are not a picture")
    page.locator("#image button[aria-label='Remove Image']").first.click()
    page.locator("#image input[type=file]").set_input_files(str(broken))
    page.locator("#instruction textarea").fill("What color is the square?")
    page.wait_for_timeout(500)
    page.locator("#send").click()
    _wait_for_toast(page, "not an image we can read")
    assert not visible_error_badges(page)
    page.screenshot(path=str(ARTIFACTS / "validation-message.png"))

    example = examples()[2]  # and the next question is answered
    click_example(page, 2)
    page.locator("#send").click()
    assert read_answer(page, example["answer"]) == example["answer"]
    page.close()


def test_chat_controls_in_the_browser(url, browser):
    """Word chips and the map, the maps switch, Undo, Regenerate, a decoding slider, Clear."""
    example = examples()[0]
    page = open_app(browser, url)
    click_example(page, 0)
    page.locator("#send").click()
    assert read_answer(page, example["answer"]) == example["answer"]

    # The answer's words come under the chat, the explorer stays closed; "Show maps" opens it on the whole answer's
    # map, a word shows that word's map, "Hide maps" closes it.
    page.wait_for_selector("#words label", timeout=30_000)
    assert shown(page, ENTRY + EXPLORER) == ENTRY
    open_maps(page)
    heat = page.locator("#heatmap img")
    whole = heat.get_attribute("src")
    page.locator("#words label").nth(2).click()
    page.wait_for_function(f"document.querySelector('#heatmap img').src != {whole!r}", timeout=20_000)
    assert page.locator("#legend").is_visible()
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "app-1280x800.png"))
    assert page.locator("#open-maps").inner_text().strip() == "Hide maps"
    page.locator("#open-maps").click()
    page.wait_for_selector("#maps", state="hidden", timeout=10_000)
    assert page.locator("#open-maps").inner_text().strip() == "Show maps"
    open_maps(page)
    # The maps switch: off hides every part of the maps; on brings the answer's words back, the explorer closed.
    page.locator("#show-maps input").uncheck()
    page.wait_for_selector("#answer-maps", state="hidden", timeout=10_000)
    assert shown(page, ENTRY + EXPLORER) == []
    page.locator("#show-maps input").check()
    page.wait_for_selector("#answer-maps", state="visible", timeout=10_000)
    assert shown(page, ENTRY + EXPLORER) == ENTRY

    # Undo takes the turn back and puts its question in the box; Regenerate answers it again.
    page.locator("#undo").click()
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length == 0", timeout=10_000)
    assert page.locator("#instruction textarea").input_value() == example["question"]
    page.locator("#send").click()
    assert read_answer(page, example["answer"]) == example["answer"]
    page.locator("#regenerate").click()
    time.sleep(0.5)
    assert read_answer(page, example["answer"]) == example["answer"], "beam search gives the same answer again"
    assert bot_messages(page).count() == 1, "Regenerate replaces the last answer"
    assert page.locator("#chat [data-testid=user]").all_inner_texts()[-1].strip() == example["question"]

    # A slider: at most 2 new tokens cuts the description short.
    page.locator("#decoding").get_by_text("Decoding").click()
    set_slider(page, "max-new-tokens", 2)
    page.locator("#instruction textarea").fill(example["question"])
    page.locator("#send").click()
    short = read_answer(page, turns=2)
    assert short and len(short) < len(example["answer"]) and example["answer"].startswith(short.split()[0])

    page.locator("#clear").click()
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length == 0", timeout=10_000)
    assert shown(page, ENTRY + EXPLORER) == [], "Clear takes the maps away with the chat"
    page.close()


@pytest.mark.parametrize("size", WIDTHS)
def test_the_chat_comes_first_and_the_maps_wait_below(url, browser, size):
    """What a new visitor sees, top to bottom: the picture, then the chat and the instruction box (below the picture
    on a phone, all on the first screen; beside it on a desktop), and nothing empty: no part of the maps before an
    answer has some. After an answer: its words under the chat, the explorer still closed; a word (phone) or "Show
    maps" (desktop) opens it below the chat and the picture, its map scrolled into view; "Words that looked here"
    appears once the map is clicked. The page with the maps open is saved as a screenshot (artifacts/page-<size>.png;
    docs/ too with BLIPDEMO_DOCS_SCREENSHOTS=1)."""
    import random

    from blipdemo.tiny import scenes

    width, height = WIDTHS[size]
    page = open_app(browser, url, width, height)
    assert page.evaluate("window.scrollY") == 0, "the page opens at its top, the picture first (no focus scrolls it)"
    assert shown(page, ["#image", "#chat", "#instruction", "#send", "#examples"]) == [
        "#image",
        "#chat",
        "#instruction",
        "#send",
        "#examples",
    ]
    assert shown(page, ENTRY + EXPLORER) == [], "nothing of the maps before an answer has some"

    def chat_first():
        image, chat, instruction = (box(page, s) for s in ("#image", "#chat", "#instruction"))
        if size == "phone":
            assert image["bottom"] <= chat["y"] and chat["bottom"] <= instruction["y"], (image, chat, instruction)
        else:
            assert abs(chat["y"] - image["y"]) < 2 and chat["x"] >= image["right"], "the chat beside the picture"
            assert instruction["y"] >= chat["bottom"]
        return image, chat, instruction

    image, chat, instruction = chat_first()
    assert instruction["bottom"] <= height, "the instruction box is on the first screen"

    example = examples()[0]  # "Describe the image.": a green square and a purple circle (scene 11)
    green = scenes.sample_scene(random.Random(11), n_objects=2).objects[0]
    assert green.color == "green" and example["answer"].split()[1] == "green"
    click_example(page, 0)
    page.locator("#send").click()
    assert read_answer(page, example["answer"]) == example["answer"]
    page.wait_for_selector("#words label", timeout=30_000)
    assert shown(page, ENTRY + EXPLORER) == ENTRY, "the answer's words under the chat, the explorer closed"
    words = box(page, "#answer-maps")
    assert words["y"] >= instruction["bottom"], "the words come after the instruction box, never in its way"

    # A phone's visitor clicks the word "green" (chip 2; 0 is the whole answer); a desktop's presses "Show maps"
    # and then clicks it.
    if size == "phone":
        open_maps(page, word=2)
    else:
        open_maps(page)
        whole = page.locator("#heatmap img").get_attribute("src")
        page.locator("#words label").nth(2).click()
        page.wait_for_function(f"document.querySelector('#heatmap img').src != {whole!r}", timeout=20_000)
    page.wait_for_selector("#queries img", timeout=20_000)
    assert shown(page, ENTRY + EXPLORER) == [s for s in ENTRY + EXPLORER if s != "#region-words"]
    page.wait_for_function(
        "() => { const r = document.querySelector('#heatmap').getBoundingClientRect();"
        " return r.top >= 0 && r.bottom <= window.innerHeight; }",
        timeout=5_000,
    )  # the map was scrolled into view
    image, chat, instruction = chat_first()
    explorer = box(page, "#maps")
    assert explorer["y"] >= max(image["bottom"], instruction["bottom"], box(page, "#decoding")["bottom"])
    if size == "desktop":
        assert explorer["x"] <= image["x"] + 1 and explorer["right"] >= chat["right"] - 1, "a section of its own"

    # Click the green square on the map: the words that looked there appear, "green" the strongest color word.
    x0, y0, x1, y1 = green.box  # on the 224-px canvas; the map is painted at that size (shown scaled)
    click_picture(page, "#heatmap img", (x0 + x1) / 2, (y0 + y1) / 2)
    page.wait_for_function("document.querySelectorAll('#region-words .score-token').length > 0", timeout=20_000)
    time.sleep(0.5)
    assert page.locator("#region-words").is_visible()
    colors = {w: s for w, s in _highlighted(page) if w in scenes.COLORS}
    assert max(colors, key=colors.get) == "green", colors
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, "nothing may overflow sideways"

    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(300)
    until = {"x": 0, "y": 0, "width": width, "height": box(page, "#maps")["bottom"] + 16}  # the examples left out
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"page-{size}.png"), full_page=True, clip=until)
    if os.environ.get("BLIPDEMO_DOCS_SCREENSHOTS") == "1":
        page.screenshot(path=str(DOCS / f"page-{size}.png"), full_page=True, clip=until)

    # Another picture: a new chat, and the maps of the last one go with it.
    click_example(page, 2)
    page.wait_for_selector("#maps", state="hidden", timeout=10_000)
    assert shown(page, ENTRY + EXPLORER) == []
    page.close()


def test_phone_width_layout(url, browser):
    page = open_app(browser, url, *WIDTHS["phone"])
    # Nothing may overflow sideways on a phone.
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0
    for button in ("#send", "#stop", "#regenerate", "#undo", "#clear"):
        box = page.locator(button).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390 + 0.5, (button, box)
    page.screenshot(path=str(ARTIFACTS / "app-phone.png"), full_page=True)
    page.close()


@pytest.mark.parametrize("how", ["the Stop button", "a closed tab"])
def test_stop_or_a_closed_tab_frees_the_model_within_a_second(served, browser, monkeypatch, how):
    """Two seconds into a long beam search (which streams nothing until it ends) a person presses Stop, or closes
    the tab; after Stop, the next question is answered."""
    vlm, address = served
    real_forward = vlm.language_model.forward

    def slow_forward(*args, **kwargs):  # a slow LM: at least 64 steps (the "Min new tokens" set below) of 0.2 s
        time.sleep(0.2)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(vlm.language_model, "forward", slow_forward)
    page = open_app(browser, address)
    click_example(page, 0)
    page.locator("#decoding").get_by_text("Decoding").click()
    set_slider(page, "min-new-tokens", 64)
    page.locator("#send").click()
    wait_for_generation(30)
    time.sleep(2)
    assert generating(), "the generation should still be running two seconds in"
    if how == "a closed tab":
        page.close()
    else:
        page.locator("#stop").click()
    freed = freed_after(20)
    assert not generating() and freed < 1.0, f"generation still ran {freed:.2f} s after {how}"
    if how == "a closed tab":
        return
    monkeypatch.setattr(vlm.language_model, "forward", real_forward)
    set_slider(page, "min-new-tokens", 1)
    example = examples()[2]
    click_example(page, 2)
    page.locator("#send").click()
    assert read_answer(page, example["answer"]) == example["answer"]
    assert not visible_error_badges(page)
    page.close()


def test_a_failure_while_answering_gives_the_turn_back_with_its_message(served, browser, monkeypatch):
    """The model runs out of memory mid-request: the message shows alone, the question is back in the box, the
    chat holds no half turn, and once memory is back the same click on Send is answered."""
    vlm, address = served

    def exhausted(*args, **kwargs):  # the LM's forward, which every decoding path calls
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(vlm.language_model, "forward", exhausted)
    example = examples()[2]
    page = open_app(browser, address)
    click_example(page, 2)
    page.locator("#send").click()
    _wait_for_toast(page, "ran out of memory")
    assert not visible_error_badges(page)
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length == 0", timeout=10_000)
    assert page.locator("#instruction textarea").input_value() == example["question"]
    monkeypatch.undo()
    page.locator("#send").click()
    assert read_answer(page, example["answer"]) == example["answer"]
    page.close()


def _highlighted(page) -> list[tuple[str, float]]:
    """The words of "Words that looked here" as a person sees them: each word and how strongly it is highlighted
    (the opacity of its background; Gradio paints a word's score as that)."""
    return page.evaluate(
        """() => [...document.querySelectorAll('#region-words .score-token')].map(span => {
            const bg = getComputedStyle(span).backgroundColor;
            const parts = bg.match(/[\\d.]+/g) || [];
            return [span.innerText.trim(), parts.length === 4 ? parseFloat(parts[3]) : (parts.length ? 1 : 0)];
        })"""
    )


def test_maps_explorer_click_the_picture_and_read_the_words(served, browser):
    """Describe a two-object example; click the middle of each object on the map: the highlighted word that is
    strongest among the answer's color words is that object's color. The query gallery shows every query."""
    import random

    from blipdemo.tiny import scenes

    example = examples()[0]
    assert example["question"] == "Describe the image."
    scene = scenes.sample_scene(random.Random(11), n_objects=2)  # how blipdemo.tiny.examples drew this picture
    vlm, url = served
    page = open_app(browser, url)
    click_example(page, 0)
    page.locator("#send").click()
    assert read_answer(page, example["answer"]) == example["answer"]
    page.wait_for_selector("#words label", timeout=30_000)
    open_maps(page)
    page.wait_for_function("document.querySelectorAll('#queries img').length > 0", timeout=30_000)
    assert not page.locator("#region-words").is_visible(), "no words under a click before a click"
    assert (
        page.locator("#queries img").count()
        == app_module.blipdemo.load(app_module.EMBEDDED_MODEL).config.num_query_tokens
    )
    heat = page.locator("#heatmap img")
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box  # on the 224-px canvas; the map is painted at that size (shown scaled)
        click_picture(page, "#heatmap img", (x0 + x1) / 2, (y0 + y1) / 2)
        page.wait_for_function("document.querySelectorAll('#region-words .score-token').length > 0", timeout=20_000)
        time.sleep(0.5)
        colors = {w: s for w, s in _highlighted(page) if w in scenes.COLORS}
        assert max(colors, key=colors.get) == obj.color, (obj, colors)
    page.screenshot(path=str(ARTIFACTS / "explorer.png"), full_page=True)
    # Another layer and the relevancy method: the maps are made again (one pass each) and still shown.
    page.locator("#map-settings").click()
    before = heat.get_attribute("src")
    page.locator("#map-method label", has_text="Relevancy").click()
    page.wait_for_function(
        "src => document.querySelector('#heatmap img').getAttribute('src') !== src", arg=before, timeout=30_000
    )
    assert not visible_error_badges(page) and not toasts(page)
    page.close()
