"""Driving the app in Debian's headless Chromium as a person does (Python playwright; never `playwright install`).

A person clicks an example row, presses Send and reads the chat: these helpers do exactly that, nothing a person
could not do (no filling of boxes behind the UI's back, no reading of Gradio's internal state).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# BLIPDEMO_CHROMIUM names another browser binary (a path that does not exist: a machine without one).
CHROMIUM = os.environ.get("BLIPDEMO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
AVAILABLE = Path(CHROMIUM).exists()
# Where browser tests must run (CI sets it): no browser is then a failure, not a skip.
REQUIRED = os.environ.get("BLIPDEMO_REQUIRE_BROWSER") == "1"
NOT_INSTALLED = f"Debian's chromium is not installed ({CHROMIUM}): apt-get install chromium"


def skip_without_browser() -> None:
    """Skip the calling test module (or test) where no browser is found — or fail it, where one is required."""
    import pytest

    if AVAILABLE:
        return
    if REQUIRED:
        pytest.fail(f"{NOT_INSTALLED}; BLIPDEMO_REQUIRE_BROWSER=1 says the browser tests must run here", pytrace=False)
    pytest.skip(NOT_INSTALLED, allow_module_level=True)


ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def launch() -> Iterator[object]:
    """A headless Chromium (playwright's Browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def open_app(browser, url: str, width: int = 1280, height: int = 800):
    """A new page on the app, ready for input."""
    page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1 if width > 600 else 2)
    page.goto(url)
    page.wait_for_selector("#instruction textarea", timeout=60_000)
    return page


def click_example(page, index: int, cell: int = 1) -> str:
    """Click row ``index`` of the examples (``cell`` 0: its picture, 1: its question), as a person does; wait until
    the picture is in place and return what the instruction box then holds."""
    target = page.locator(f"#examples [data-testid=dataset-cell-{index}-{cell}]")
    target.scroll_into_view_if_needed()
    question = page.locator(f"#examples [data-testid=dataset-cell-{index}-1]").inner_text().strip()
    target.click()
    page.wait_for_selector("#image img", timeout=20_000)
    # The example fills both boxes, then the image's change event starts a new chat: give it time to land.
    page.wait_for_function(
        "q => document.querySelector('#instruction textarea').value === q", arg=question, timeout=10_000
    )
    time.sleep(0.5)
    return page.locator("#instruction textarea").input_value()


def bot_messages(page):
    return page.locator("#chat [data-testid=bot]")


def read_answer(page, expected: str | None = None, turns: int = 1, limit: float = 60) -> str:
    """The text of the ``turns``-th answer once it stops growing (or equals ``expected``)."""
    page.wait_for_function(
        f"document.querySelectorAll('#chat [data-testid=bot]').length >= {turns}", timeout=int(limit * 1000)
    )
    deadline, last, steady = time.time() + limit, None, 0
    while time.time() < deadline:
        text = bot_messages(page).nth(turns - 1).inner_text().strip()
        if expected is not None and text == expected:
            return text
        steady = steady + 1 if text and text == last else 0
        if steady >= 20:  # unchanged for ~1 s
            return text
        last = text
        time.sleep(0.05)
    return bot_messages(page).nth(turns - 1).inner_text().strip()


def box(page, selector: str) -> dict:
    """Where ``selector`` lies on the page (not the viewport): x, y, width, height, bottom and right in CSS pixels,
    whatever the scroll position."""
    b = page.locator(selector).first.bounding_box()
    assert b is not None, f"{selector} is not shown"
    scroll = page.evaluate("[window.scrollX, window.scrollY]")
    x, y = b["x"] + scroll[0], b["y"] + scroll[1]
    w, h = b["width"], b["height"]
    return {"x": x, "y": y, "width": w, "height": h, "right": x + w, "bottom": y + h}


def shown(page, selectors) -> list[str]:
    """Those of ``selectors`` that a person can see (on the page, maybe scrolled away; not hidden)."""
    return [s for s in selectors if page.locator(s).count() and page.locator(s).first.is_visible()]


def open_maps(page, word: int | None = None) -> None:
    """Open the maps explorer as a person does: the "Show maps" button, or a click on the answer's ``word``-th chip
    (0: "Whole answer")."""
    if word is not None:
        page.locator("#words label").nth(word).click()
    else:
        button = page.locator("#open-maps")
        assert button.inner_text().strip() == "Show maps", "the explorer should be closed"
        button.click()
    page.wait_for_selector("#maps #heatmap img", timeout=20_000)


def click_picture(page, selector: str, x: float, y: float) -> None:
    """Click the picture shown by the ``img`` at ``selector`` at its pixel (x, y) (in the picture's own pixels), as
    a person points at a spot of it. The element's box may be larger than the picture: Gradio shows it scaled down
    to fit, never up (object-fit: scale-down), centered, and maps a click back so."""
    natural_w, natural_h, box_w, box_h, fit = page.evaluate(
        "s => { const i = document.querySelector(s);"
        " return [i.naturalWidth, i.naturalHeight, i.clientWidth, i.clientHeight, getComputedStyle(i).objectFit]; }",
        selector,
    )
    assert fit == "scale-down", f"Gradio maps a click on its image as shown with object-fit: scale-down, not {fit}"
    scale = min(box_w / natural_w, box_h / natural_h, 1.0)
    left, top = (box_w - natural_w * scale) / 2, (box_h - natural_h * scale) / 2
    page.locator(selector).click(position={"x": left + x * scale, "y": top + y * scale})


def visible_error_badges(page) -> list[str]:
    """Components showing Gradio's red "Error" badge (what an event that raises paints into its outputs)."""
    found = []
    for elem in ("chat", "instruction", "image"):
        badges = page.locator(f"#{elem}").get_by_text("Error", exact=True)
        if any(badges.nth(i).is_visible() for i in range(badges.count())):
            found.append(elem)
    return found


def toasts(page) -> list[str]:
    """The texts of the toasts on screen."""
    page.wait_for_timeout(300)
    return [t.strip() for t in page.locator(".toast-body").all_inner_texts()]


def set_slider(page, elem_id: str, value: int) -> None:
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
