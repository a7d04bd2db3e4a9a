"""The app in a real headless Chromium (Debian's chromium, driven by Python playwright).

Upload an image, ask, watch the streamed answer appear, change a slider, clear; screenshots at
1280×800 and at a phone width are saved under artifacts/ for a person to look at.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from served import freed_after, generating, serve, wait_for_generation

import app as app_module

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
EXAMPLES = app_module.ASSETS / "examples"

if not Path(CHROMIUM).exists():  # pragma: no cover - .ci/run installs it
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright


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
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield b
        b.close()


def _bot_messages(page):
    return page.locator("#chat [data-testid=bot]")


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


def test_chat_in_the_browser(url, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    example = json.loads((EXAMPLES / "examples.json").read_text())[0]
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url)
    page.wait_for_selector("#instruction textarea", timeout=60_000)
    assert "shapes-instructblip" in page.locator("#header").inner_text()

    page.locator("#image input[type=file]").set_input_files(str(EXAMPLES / example["image"]))
    page.wait_for_selector("#image img", timeout=20_000)
    page.locator("#instruction textarea").fill(example["question"])
    page.locator("#send").click()
    # The answer streams in: its text grows until it is the whole answer.
    seen = []
    deadline = time.time() + 60
    while time.time() < deadline:
        if _bot_messages(page).count():
            text = _bot_messages(page).last.inner_text().strip()
            if not seen or text != seen[-1]:
                seen.append(text)
            if text == example["answer"]:
                break
        time.sleep(0.02)
    assert seen and seen[-1] == example["answer"], seen
    assert page.locator("#instruction textarea").input_value() == ""

    # The answer's words appear as chips; clicking one shows that word's map over the image.
    page.wait_for_selector("#words label", timeout=30_000)
    chips = page.locator("#words label")
    assert chips.count() == 1 + len(example["answer"].split()), chips.all_inner_texts()
    heat = page.locator("#heatmap img")
    whole = heat.get_attribute("src")
    chips.nth(2).click()
    page.wait_for_function(f"document.querySelector('#heatmap img').src != {whole!r}", timeout=20_000)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "app-1280x800.png"))
    page.screenshot(path=str(ARTIFACTS / "app-1280-full.png"), full_page=True)
    page.locator("#show-maps input").uncheck()
    page.wait_for_selector("#heatmap", state="hidden", timeout=10_000)
    page.locator("#show-maps input").check()

    # Change a slider: at most 2 new tokens cuts the description short.
    page.locator("#decoding").get_by_text("Decoding").click()
    _set_slider(page, "max-new-tokens", 2)
    page.locator("#instruction textarea").fill(example["question"])
    page.locator("#send").click()
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length == 2", timeout=60_000)
    deadline = time.time() + 30
    while time.time() < deadline and _bot_messages(page).last.inner_text().strip() == "":
        time.sleep(0.05)
    time.sleep(1)
    short = _bot_messages(page).last.inner_text().strip()
    assert short and len(short) < len(example["answer"]) and example["answer"].startswith(short.split()[0])

    page.locator("#clear").click()
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length == 0", timeout=10_000)
    page.close()


def test_phone_width_layout(url, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    page.goto(url)
    page.wait_for_selector("#instruction textarea", timeout=60_000)
    # Nothing may overflow sideways on a phone.
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0
    for button in ("#send", "#stop", "#regenerate", "#undo", "#clear"):
        box = page.locator(button).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390 + 0.5, (button, box)
    page.screenshot(path=str(ARTIFACTS / "app-phone.png"), full_page=True)
    page.close()


def test_closing_the_tab_frees_the_model_within_a_second(served, browser, monkeypatch):
    """A person closes the tab two seconds into a long beam search (which streams nothing until it ends)."""
    vlm, address = served
    real_forward = vlm.language_model.forward

    def slow_forward(*args, **kwargs):  # a slow LM: at least 64 steps (the "Min new tokens" set below) of 0.2 s
        time.sleep(0.2)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(vlm.language_model, "forward", slow_forward)
    example = json.loads((EXAMPLES / "examples.json").read_text())[0]
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(address)
    page.wait_for_selector("#instruction textarea", timeout=60_000)
    page.locator("#image input[type=file]").set_input_files(str(EXAMPLES / example["image"]))
    page.wait_for_selector("#image img", timeout=20_000)
    page.locator("#decoding").get_by_text("Decoding").click()
    _set_slider(page, "min-new-tokens", 64)
    page.locator("#instruction textarea").fill(example["question"])
    page.locator("#send").click()
    wait_for_generation(30)
    time.sleep(2)
    assert generating(), "the generation should still be running two seconds in"
    page.close()
    freed = freed_after(20)
    assert not generating() and freed < 1.0, f"generation still ran {freed:.2f} s after the tab closed"
