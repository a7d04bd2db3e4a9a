"""The chat as people expect it (issue 28), in a real headless Chromium, at a desktop's and a phone's width: edit a
question (the chat from it on answered again), copy an answer and the whole conversation, rate and flag answers into
the log, change the picture mid-chat, export and import a conversation, keep conversations in the browser, the
keyboard. Expected answers come from the library itself (``vlm.ask`` with the page's default settings), never from
this file."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import fields

import pytest
from browser import bot_messages, click_example, launch, open_app, read_answer, skip_without_browser, toasts
from served import serve

import app as app_module
from blipdemo.decoding import INSTRUCTBLIP_DEFAULTS, DecodingOptions
from blipdemo.ui.conversations import MAX_IMPORT_BYTES

pytestmark = pytest.mark.browser
EXAMPLES = app_module.ASSETS / "examples"
WIDTHS = {"desktop": (1280, 800), "phone": (390, 844)}
PAGE_DEFAULTS = {k: v for k, v in INSTRUCTBLIP_DEFAULTS.items() if k not in ("top_p", "temperature")}

skip_without_browser()
pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def feedback_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feedback")


@pytest.fixture(scope="module")
def served(feedback_dir):
    """The app on the embedded model with the rating log on: (model, url)."""
    with serve("--model", str(app_module.EMBEDDED_MODEL), "--feedback-dir", str(feedback_dir)) as (_, vlm, url):
        yield vlm, url


@pytest.fixture(scope="module")
def browser():
    with launch() as b:
        yield b


def example(i: int) -> dict:
    return json.loads((EXAMPLES / "examples.json").read_text())[i]


def answer(vlm, image, question: str, history=()) -> str:
    """What the page should show: the library's answer with the page's default settings."""
    return vlm.ask(str(image), question, history=list(history), **PAGE_DEFAULTS)


def chat_texts(page) -> list[str]:
    """The chat's text messages as a person reads them, top to bottom (pictures left out)."""
    return page.evaluate(
        "() => [...document.querySelectorAll('#chat [data-testid=user], #chat [data-testid=bot]')]"
        ".filter(e => !e.querySelector('img'))"
        ".filter(e => !/component of type|file of extension/.test(e.getAttribute('aria-label')))"
        ".map(e => e.innerText.trim())"
    )


def ask(page, question: str, turns: int) -> str:
    page.locator("#instruction textarea").fill(question)
    page.locator("#send").click()
    return read_answer(page, turns=turns)


@pytest.mark.parametrize("size", WIDTHS)
def test_edit_a_question_answers_the_chat_again_from_there(served, browser, size):
    """Two turns; the first question edited: it is answered again, and so is the second (after the new first turn);
    nothing before it changes."""
    vlm, url = served
    page = open_app(browser, url, *WIDTHS[size])
    ex = example(2)
    image = EXAMPLES / ex["image"]
    click_example(page, 2)
    first = ask(page, ex["question"], 1)
    second_q = "What shape is the orange object?"
    second = ask(page, second_q, 2)
    assert chat_texts(page) == [ex["question"], first, second_q, second]

    edited = "Where is the square?"
    page.locator("#chat [data-testid=user]", has_text=ex["question"]).hover()
    page.locator("#chat button[aria-label=Edit]").first.click()  # the first question's (a picture has none)
    page.locator("#chat textarea.edit-textarea").fill(edited)
    page.locator("#chat button[aria-label=Submit]").first.click()
    new_first = answer(vlm, image, edited)
    new_second = answer(vlm, image, second_q, [(edited, new_first)])
    expected = [edited, new_first, second_q, new_second]
    deadline = time.time() + 60  # until the chat reads so (the old turns stay on screen until the new ones come)
    while chat_texts(page) != expected and time.time() < deadline:
        time.sleep(0.1)
    assert chat_texts(page) == expected
    assert bot_messages(page).count() == 2
    page.close()


def test_copy_an_answer_and_the_whole_conversation(served, browser):
    """The copy buttons put the answer, and the whole conversation, on the clipboard."""
    vlm, url = served
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#instruction textarea", timeout=60_000)
    ex = example(1)
    click_example(page, 1)
    said = ask(page, ex["question"], 1)
    assert said == answer(vlm, EXAMPLES / ex["image"], ex["question"])
    bot_messages(page).first.hover()
    page.locator("#chat button[aria-label='Copy message']").nth(1).click()  # the user's question's, then the answer's
    assert page.evaluate("navigator.clipboard.readText()").strip() == said
    page.locator("#chat button[aria-label='Copy conversation']").click()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert ex["question"] in copied and said in copied and copied.index(ex["question"]) < copied.index(said)
    assert not toasts(page)
    context.close()


def log_lines(folder, n: int, limit: float = 20) -> list[dict]:
    """The rating log's lines, once it has at least ``n``."""
    path = folder / "ratings.jsonl"
    deadline = time.time() + limit
    while time.time() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n:
            return [json.loads(line) for line in lines]
        time.sleep(0.1)
    raise AssertionError(f"the log has {len(lines)} lines, expected {n}")


@pytest.mark.parametrize("size", WIDTHS)
def test_rate_and_flag_answers_into_the_log(served, browser, feedback_dir, size):
    """Like an answer, dislike another with a reason from the feedback menu, flag it: a line each in the log, with
    the model, the question and the answer as shown, the decoding options, the rating and the picture's hash; the
    picture saved once under images/."""
    vlm, url = served
    page = open_app(browser, url, *WIDTHS[size])
    before = len(log_lines(feedback_dir, 0))
    ex = example(3)
    image = EXAMPLES / ex["image"]
    click_example(page, 3)
    first = ask(page, ex["question"], 1)
    second_q = "What color is the circle?"
    second = ask(page, second_q, 2)

    def buttons(label):
        return page.locator(f"#chat button[aria-label='{label}']")

    bot_messages(page).nth(0).hover()
    buttons("Like").nth(0).click()
    bot_messages(page).nth(1).hover()
    menu = page.locator("#chat .extra-feedback").nth(1)
    menu.hover()
    menu.get_by_text("Wrong about the picture").click()
    lines = log_lines(feedback_dir, before + 2)[before:]
    bot_messages(page).nth(1).hover()
    menu.hover()
    menu.get_by_text("Flag: harmful or offensive").click()
    lines = log_lines(feedback_dir, before + 3)[before:]

    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    expected = {f.name: None for f in fields(DecodingOptions)} | PAGE_DEFAULTS  # every option, as the answer had them
    assert [(r["question"], r["answer"], r["rating"], r["reason"]) for r in lines] == [
        (ex["question"], first, "like", None),
        (second_q, second, "dislike", "Wrong about the picture"),
        (second_q, second, "flag", None),
    ]
    for r in lines:
        assert r["model"] == app_module.EMBEDDED_MODEL.name
        assert r["image"] == digest
        assert r["decoding"] == expected
        assert r["time"].endswith("+00:00")
    saved = list((feedback_dir / "images").iterdir())
    assert [p.name for p in saved if p.stem == digest] == [f"{digest}.png"], "the picture is saved once, by its hash"
    assert (feedback_dir / "images" / f"{digest}.png").read_bytes() == image.read_bytes()
    assert not toasts(page)
    page.close()


def upload_picture(page, path) -> None:
    """Put another picture in the image box, as a person does: remove the one there, choose a file."""
    remove = page.locator("#image button[aria-label='Remove Image']")
    if remove.count():
        remove.first.click()
    page.locator("#image input[type=file]").set_input_files(str(path))


def chat_pictures(page) -> int:
    return page.locator("#chat [data-testid=user] img").count()


@pytest.mark.parametrize("size", WIDTHS)
def test_change_the_picture_mid_chat(served, browser, size):
    """A turn about one picture, then another picture in the same chat: its thumbnail joins the chat under the earlier
    turn (which stays), and the next question is answered about the new picture alone — as the library answers it
    with no history — not with the turn about the other picture as history."""
    vlm, url = served
    page = open_app(browser, url, *WIDTHS[size])
    first_ex, second_ex = example(2), example(3)
    click_example(page, 2)
    first = ask(page, first_ex["question"], 1)
    page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=user] img').length == 1")
    upload_picture(page, EXAMPLES / second_ex["image"])
    page.wait_for_function(
        "() => document.querySelectorAll('#chat [data-testid=user] img').length == 2", timeout=30_000
    )
    question = "What color is the triangle?"
    second = ask(page, question, 2)
    assert second == answer(vlm, EXAMPLES / second_ex["image"], question)
    assert chat_texts(page) == [first_ex["question"], first, question, second], "the earlier turn stays"
    # Which picture each turn was about: the thumbnails sit before their turns.
    order = page.evaluate(
        "() => [...document.querySelectorAll('#chat [data-testid=user], #chat [data-testid=bot]')]"
        ".map(e => e.querySelector('img') ? 'picture' : e.dataset.testid)"
    )
    assert order == ["picture", "user", "bot", "picture", "user", "bot"]
    assert not toasts(page)
    page.screenshot(path=str(app_module.HERE / "artifacts" / f"picture-change-{size}.png"), full_page=True)
    page.close()


def side_panel_open(page) -> bool:
    return page.locator("#side.open").count() == 1


def open_side_panel(page) -> None:
    """Open the conversations panel, as a person does (its toggle), if it is closed; wait until it has slid in."""
    if not side_panel_open(page):
        page.locator("button[aria-label='Toggle Sidebar']").click()
    page.wait_for_function(
        "() => { const r = document.querySelector('#conversations').getBoundingClientRect();"
        " return r.left >= 0 && r.right <= window.innerWidth; }",
        timeout=10_000,
    )


def close_side_panel(page) -> None:
    if side_panel_open(page):
        page.locator("button[aria-label='Toggle Sidebar']").click()
        page.wait_for_selector("#side:not(.open)", timeout=10_000)


def import_file(page, path) -> None:
    """Press Import and choose ``path`` in the file chooser, as a person does."""
    with page.expect_file_chooser(timeout=10_000) as chooser:
        page.locator("#import").click()
    chooser.value.set_files(str(path))


def kept_titles(page) -> list[str]:
    return [t.strip() for t in page.locator("#conversations label").all_inner_texts()]


@pytest.mark.parametrize("size", WIDTHS)
def test_conversations_kept_in_the_browser(served, browser, size):
    """Two chats: both listed in the side panel (newest first), still there after a reload (the browser keeps them);
    the older one reopened with its picture and continued; one deleted."""
    vlm, url = served
    context = browser.new_context(viewport=dict(zip(("width", "height"), WIDTHS[size], strict=True)))
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#instruction textarea", timeout=60_000)
    a, b = example(1), example(4)
    click_example(page, 1)
    said_a = ask(page, a["question"], 1)
    click_example(page, 4)
    ask(page, b["question"], 1)
    open_side_panel(page)
    page.wait_for_function("() => document.querySelectorAll('#conversations label').length == 2", timeout=20_000)
    assert kept_titles(page) == [b["question"], a["question"]]

    page.reload()  # nothing on the server: the list comes back from the browser
    page.wait_for_selector("#instruction textarea", timeout=60_000)
    open_side_panel(page)
    page.wait_for_function("() => document.querySelectorAll('#conversations label').length == 2", timeout=20_000)
    page.locator("#conversations label", has_text=a["question"]).click()
    page.wait_for_function(
        "q => [...document.querySelectorAll('#chat [data-testid=user]')].some(e => e.innerText.trim() === q)",
        arg=a["question"],
        timeout=20_000,
    )
    assert chat_texts(page) == [a["question"], said_a]
    assert page.locator("#image img").count() == 1, "the picture comes back with the chat"
    if size == "phone":  # the panel covers the page on a phone: close it to go on
        close_side_panel(page)
    follow_up = "What color is the circle?"
    said = ask(page, follow_up, 2)
    assert said == answer(vlm, EXAMPLES / a["image"], follow_up, [(a["question"], said_a)])
    assert chat_texts(page) == [a["question"], said_a, follow_up, said]

    open_side_panel(page)
    page.locator("#conversations label", has_text=b["question"]).click()
    page.locator("#delete-conversation").click()
    page.wait_for_function("() => document.querySelectorAll('#conversations label').length == 1", timeout=20_000)
    assert kept_titles(page) == [a["question"]]

    # The chat's own Clear (its trash button) starts a new conversation: the kept one is not overwritten.
    close_side_panel(page)
    page.locator("#chat button[aria-label='Clear']").click()
    # Gradio empties the chat in the browser at once; the new chat (the current picture first) comes from the server.
    page.wait_for_function(
        "() => document.querySelectorAll('#chat [data-testid=user]').length == 1"
        " && document.querySelectorAll('#chat [data-testid=user] img').length == 1",
        timeout=30_000,
    )
    assert chat_texts(page) == []
    ask(page, "How many shapes are there?", 1)
    open_side_panel(page)
    page.wait_for_function("() => document.querySelectorAll('#conversations label').length == 2", timeout=20_000)
    assert kept_titles(page) == ["How many shapes are there?", a["question"]]
    assert not toasts(page)
    context.close()


@pytest.mark.parametrize("size", WIDTHS)
def test_export_and_import_a_conversation_and_go_on(served, browser, tmp_path, size):
    """Export a chat (one JSON file, its picture inside), import it in a fresh browser, ask a follow-up: it is
    answered about that picture, after the imported turn."""
    vlm, url = served
    viewport = dict(zip(("width", "height"), WIDTHS[size], strict=True))
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#instruction textarea", timeout=60_000)
    ex = example(5)
    click_example(page, 5)
    said = ask(page, ex["question"], 1)
    open_side_panel(page)
    page.wait_for_function("() => document.querySelectorAll('#conversations label').length >= 1", timeout=20_000)
    with page.expect_download(timeout=20_000) as download:
        page.locator("#export").click()
    exported = tmp_path / "exported.json"
    download.value.save_as(exported)
    record = json.loads(exported.read_text())
    assert [m.get("content") for m in record["messages"] if "role" in m] == [ex["question"], said]
    assert len(record["pictures"]) == 1
    context.close()

    context = browser.new_context(viewport=viewport)  # another browser: nothing kept there
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#instruction textarea", timeout=60_000)
    open_side_panel(page)
    assert kept_titles(page) == []
    import_file(page, exported)
    page.wait_for_function(
        "q => [...document.querySelectorAll('#chat [data-testid=user]')].some(e => e.innerText.trim() === q)",
        arg=ex["question"],
        timeout=20_000,
    )
    assert chat_texts(page) == [ex["question"], said]
    page.wait_for_function("() => document.querySelectorAll('#conversations label').length == 1", timeout=20_000)
    if size == "phone":
        close_side_panel(page)
    follow_up = "Where is it?"
    went_on = ask(page, follow_up, 2)
    assert went_on == answer(vlm, EXAMPLES / ex["image"], follow_up, [(ex["question"], said)])
    assert not toasts(page)
    context.close()


def test_bad_imports_say_why_and_break_nothing(served, browser, tmp_path):
    """A file that is not ours, one too large, one whose picture cannot be decoded: a message each, the chat as it
    was, and the next question still answered."""
    vlm, url = served
    page = open_app(browser, url)
    ex = example(2)
    click_example(page, 2)
    said = ask(page, ex["question"], 1)
    not_ours = tmp_path / "not-ours.json"
    not_ours.write_text(json.dumps({"messages": [], "hello": 1}))
    too_large = tmp_path / "large.json"
    too_large.write_bytes(b" " * (MAX_IMPORT_BYTES + 10))
    broken = tmp_path / "broken-picture.json"
    broken.write_text(
        json.dumps(
            {
                "format": "blipdemo-conversation",
                "version": 1,
                "id": "abc",
                "pictures": {"k": "data:image/png;base64,aGVsbG8gdGhlcmU="},
                "messages": [
                    {"picture": "k"},
                    {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "x"},
                ],
            }
        )
    )
    open_side_panel(page)
    for path, message in (
        (not_ours, "not a conversation exported from this app"),
        (too_large, "too large to be a conversation"),
        (broken, "picture in this conversation cannot be read"),
    ):
        import_file(page, path)
        try:
            page.wait_for_function(
                "t => [...document.querySelectorAll('.toast-body')].some(e => e.innerText.includes(t))",
                arg=message,
                timeout=30_000,
            )
        except Exception as e:  # playwright's TimeoutError: say what was on screen
            raise AssertionError(f"{path.name}: no toast saying {message!r}; on screen: {toasts(page)}") from e
        assert chat_texts(page) == [ex["question"], said], "the chat on screen is left as it was"
        for close in page.locator(".toast-close").all():
            close.click()
    close_side_panel(page)
    again = ask(page, "What shape is it?", 2)
    assert again == answer(vlm, EXAMPLES / ex["image"], "What shape is it?", [(ex["question"], said)])
    page.close()


def test_keyboard_enter_sends_shift_enter_breaks_the_line_esc_stops(served, browser, monkeypatch):
    """Shift+Enter makes a new line in the instruction box (nothing sent); Enter sends; Esc, during a long answer,
    stops it (the model is free within seconds) and the next Enter is answered."""
    from served import freed_after, generating, wait_for_generation

    vlm, url = served
    page = open_app(browser, url)
    ex = example(2)
    click_example(page, 2)
    box = page.locator("#instruction textarea")
    box.fill("")
    box.type("What color")
    box.press("Shift+Enter")
    box.type("is the square?")
    assert box.input_value() == "What color\nis the square?"
    time.sleep(1)
    assert bot_messages(page).count() == 0, "Shift+Enter sends nothing"
    box.fill(ex["question"])
    box.press("Enter")
    assert read_answer(page, turns=1) == answer(vlm, EXAMPLES / ex["image"], ex["question"])

    real_forward = vlm.language_model.forward

    def slow_forward(*args, **kwargs):  # a slow LM: every step 0.2 s
        time.sleep(0.2)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(vlm.language_model, "forward", slow_forward)
    box.fill("Describe the image.")
    box.press("Enter")
    wait_for_generation(30)
    time.sleep(1)
    assert generating(), "the answer should still be in the making"
    page.keyboard.press("Escape")
    assert freed_after(20) < 5, "Esc stops the answer"
    monkeypatch.setattr(vlm.language_model, "forward", real_forward)
    time.sleep(1)
    before = bot_messages(page).count()
    box.fill("What shape is it?")
    box.press("Enter")
    said = read_answer(page, turns=before + 1)
    assert said and chat_texts(page)[-2:] == ["What shape is it?", said]
    page.close()


def test_every_control_within_a_phone_screen(served, browser):
    """At 390 px: no sideways scrolling, with an answer, its rating and copy buttons, the maps entry and the side
    panel open; every control lies within the screen's width."""
    vlm, url = served
    page = open_app(browser, url, *WIDTHS["phone"])
    ex = example(2)
    click_example(page, 2)
    ask(page, ex["question"], 1)
    page.wait_for_selector("#words label", timeout=30_000)
    page.locator("#decoding").get_by_text("Decoding").click()

    def inside(selectors):
        for selector in selectors:
            for i in range(page.locator(selector).count()):
                element = page.locator(selector).nth(i)
                if not element.is_visible():
                    continue
                b = element.bounding_box()
                assert b["x"] >= -0.5 and b["x"] + b["width"] <= 390.5, (selector, i, b)
        assert page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth") <= 0

    chat_controls = [f"#chat button[aria-label='{label}']" for label in ("Copy message", "Edit", "Like", "Dislike")]
    inside(["#image", "#chat", "#instruction", "#send", "#stop", "#regenerate", "#undo", "#clear"])
    inside(["#words", "#open-maps"])
    inside([*chat_controls, "#chat .extra-feedback", "#chat button[aria-label='Copy conversation']", "#decoding"])
    inside(["#max-new-tokens", "#show-maps", "button[aria-label='Toggle Sidebar']"])
    open_side_panel(page)
    inside(["#conversations", "#delete-conversation", "#export", "#import", "button[aria-label='Toggle Sidebar']"])
    page.screenshot(path=str(app_module.HERE / "artifacts" / "phone-side-panel.png"))
    page.close()
