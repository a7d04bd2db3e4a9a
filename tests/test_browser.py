"""The app in a real headless Chromium (Debian's chromium, driven by Python playwright), used as a person uses it.

Click an example, press Send without typing, read the streamed answer, click its words; at 1280 px and at a phone's
390 px. Validation messages show alone (no "Error" badge painted into the chat or the instruction box). Regenerate,
Undo, a slider, Clear. Screenshots are saved under artifacts/ for a person to look at.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from browser import (
    ARTIFACTS,
    AVAILABLE,
    bot_messages,
    click_example,
    launch,
    open_app,
    read_answer,
    toasts,
    visible_error_badges,
)
from served import freed_after, generating, serve, wait_for_generation

import app as app_module

pytestmark = pytest.mark.browser
EXAMPLES = app_module.ASSETS / "examples"
WIDTHS = {"desktop": (1280, 800), "phone": (390, 844)}

if not AVAILABLE:  # pragma: no cover - .ci/run installs it
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)
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


def _set_slider(page, elem_id: str, value: int) -> None:
    """Type ``value`` into a slider's number box, as a person can, and wait until the slider shows it too (the
    shared state the next event sends). Keyboard presses on the range input proved racy while the accordion
    opens, so the typing is retried until both agree."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.wait_for(state="visible")
    check = (
        f"document.querySelector('#{elem_id} input[type=range]').value == '{value}' && "
        f"document.querySelector('#{elem_id} input[type=number]').value == '{value}'"
    )
    for _ in range(5):
        box.fill(str(value))
        box.press("Enter")
        box.blur()
        try:
            page.wait_for_function(check, timeout=4_000)
            return
        except Exception:  # playwright's TimeoutError: type it again
            continue
    page.wait_for_function(check, timeout=4_000)


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

    # Clicking a word shows that word's map over the image.
    page.wait_for_selector("#words label", timeout=30_000)
    heat = page.locator("#heatmap img")
    whole = heat.get_attribute("src")
    page.locator("#words label").nth(2).click()
    page.wait_for_function(f"document.querySelector('#heatmap img').src != {whole!r}", timeout=20_000)
    assert page.locator("#legend").is_visible()
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "app-1280x800.png"))
    page.locator("#show-maps input").uncheck()
    page.wait_for_selector("#maps", state="hidden", timeout=10_000)
    page.locator("#show-maps input").check()
    page.wait_for_selector("#maps", state="visible", timeout=10_000)

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
    _set_slider(page, "max-new-tokens", 2)
    page.locator("#instruction textarea").fill(example["question"])
    page.locator("#send").click()
    short = read_answer(page, turns=2)
    assert short and len(short) < len(example["answer"]) and example["answer"].startswith(short.split()[0])

    page.locator("#clear").click()
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length == 0", timeout=10_000)
    assert not page.locator("#maps").is_visible()
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
    _set_slider(page, "min-new-tokens", 64)
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
    _set_slider(page, "min-new-tokens", 1)
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
    real = vlm.language_model.generate

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(vlm.language_model, "generate", exhausted)
    example = examples()[2]
    page = open_app(browser, address)
    click_example(page, 2)
    page.locator("#send").click()
    _wait_for_toast(page, "ran out of memory")
    assert not visible_error_badges(page)
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length == 0", timeout=10_000)
    assert page.locator("#instruction textarea").input_value() == example["question"]
    monkeypatch.setattr(vlm.language_model, "generate", real)
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
    page.wait_for_function("document.querySelectorAll('#queries img').length > 0", timeout=30_000)
    assert (
        page.locator("#queries img").count()
        == app_module.blipdemo.load(app_module.EMBEDDED_MODEL).config.num_query_tokens
    )
    heat = page.locator("#heatmap img")
    for obj in scene.objects:
        box = heat.bounding_box()
        x0, y0, x1, y1 = obj.box  # on the 224-px canvas; the picture is shown scaled
        heat.click(position={"x": (x0 + x1) / 2 * box["width"] / 224, "y": (y0 + y1) / 2 * box["height"] / 224})
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
