"""Driving the app in Debian's headless Chromium as a person does (Python playwright; never `playwright install`).

A person clicks an example row, presses Send and reads the chat: these helpers do exactly that, nothing a person
could not do (no filling of boxes behind the UI's back, no reading of Gradio's internal state).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
AVAILABLE = Path(CHROMIUM).exists()
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
