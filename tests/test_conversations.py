"""Exported conversations (blipdemo.ui.conversations): a chat → one JSON record with its pictures → the same chat;
files that are not ours, too large, or hold a picture that cannot be decoded are refused with a clear message."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from blipdemo.errors import UserError
from blipdemo.ui import conversations as cv
from blipdemo.ui.messages import answer_message, facts, picture_message, picture_path, text_of, turns_of


def picture(tmp_path, name, color, size=(32, 32)):
    path = tmp_path / name
    Image.new("RGB", size, color).save(path)
    return path


def a_chat(tmp_path):
    one, two = picture(tmp_path, "one.png", (255, 0, 0)), picture(tmp_path, "two.png", (0, 0, 255))
    key = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    return [
        picture_message(str(one), key(one), 1),
        {"role": "user", "content": "What color is it?"},
        answer_message("red", {"num_beams": 5}),
        picture_message(str(two), key(two), 2),
        {"role": "user", "content": "And now?"},
        answer_message("blue", {"num_beams": 1}),
    ], (one, two)


def test_a_chat_goes_out_and_comes_back_whole(tmp_path):
    chat, (one, two) = a_chat(tmp_path)
    record = cv.record_of(chat, id="abc123", model="m")
    data = json.dumps(record).encode()
    back, last = cv.chat_of(cv.parse(data))
    assert turns_of(back) == [("What color is it?", "red"), ("And now?", "blue")]
    paths = [picture_path(m) for m in back if picture_path(m)]
    assert [Path(p).read_bytes() for p in paths] == [one.read_bytes(), two.read_bytes()], "pictures byte for byte"
    assert last == paths[-1]
    assert facts(back[2]) == {"decoding": {"num_beams": 5}}
    assert record["title"] == "What color is it?" and record["model"] == "m"
    assert [text_of(m) for m in back if text_of(m) is not None] == ["What color is it?", "red", "And now?", "blue"]


def test_the_browser_keeps_large_pictures_smaller(tmp_path):
    noise = Image.effect_noise((1600, 1200), 100).convert("RGB")
    big = tmp_path / "big.png"
    noise.save(big)
    assert big.stat().st_size > cv.KEPT_BYTES
    chat = [picture_message(str(big), "k", 1), {"role": "user", "content": "q"}, answer_message("a")]
    kept = cv.record_of(chat, id="x", model="m", small=True)["pictures"]["k"]
    assert kept.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(kept.split(",", 1)[1]))) as image:
        assert max(image.size) == cv.KEPT_SIDE
    exported = cv.record_of(chat, id="x", model="m")["pictures"]["k"]
    assert base64.b64decode(exported.split(",", 1)[1]) == big.read_bytes(), "an export keeps the picture as it was"


@pytest.mark.parametrize(
    "data, says",
    [
        (b"\x89PNG not json", "not a conversation exported from this app (it is not JSON)"),
        (b"[1, 2, 3]", "not a conversation exported from this app"),
        (json.dumps({"format": "something-else", "version": 1}).encode(), "not a conversation exported"),
        (json.dumps({"format": cv.FORMAT, "version": 99, "pictures": {}, "messages": []}).encode(), "version 99"),
        (json.dumps({"format": cv.FORMAT, "version": 1}).encode(), "no pictures and messages"),
        (
            json.dumps({"format": cv.FORMAT, "version": 1, "pictures": {}, "messages": [{"picture": "nope"}]}).encode(),
            "names a picture that is not in it",
        ),
        (
            json.dumps({"format": cv.FORMAT, "version": 1, "pictures": {}, "messages": [{"role": "x"}]}).encode(),
            "no role or no text",
        ),
    ],
)
def test_files_that_are_not_ours_are_refused(data, says):
    with pytest.raises(UserError, match=says.replace("(", r"\(").replace(")", r"\)")):
        cv.parse(data)


def test_too_large_is_refused_before_reading():
    with pytest.raises(UserError, match="too large to be a conversation"):
        cv.check_size(cv.MAX_IMPORT_BYTES + 1)
    with pytest.raises(UserError, match="too large"):
        cv.parse(b" " * (cv.MAX_IMPORT_BYTES + 1))
    cv.check_size(cv.MAX_IMPORT_BYTES)


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,aGVsbG8gdGhlcmU=",  # base64 of text, not a picture
        "data:image/png;base64,@@@not base64@@@",
        "https://example.com/picture.png",
    ],
)
def test_a_picture_that_cannot_be_decoded_is_refused(url):
    record = cv.check(
        {
            "format": cv.FORMAT,
            "version": 1,
            "pictures": {"k": url},
            "messages": [{"picture": "k"}, {"role": "user", "content": "q"}],
        }
    )
    with pytest.raises(UserError, match="A picture in this conversation cannot be read"):
        cv.chat_of(record)


def test_the_browser_list_keeps_the_newest_first_and_at_most_max_kept():
    kept = []
    for i in range(cv.MAX_KEPT + 3):
        kept = cv.kept_with(kept, {"id": f"c{i}", "title": f"t{i}"})
    assert len(kept) == cv.MAX_KEPT and kept[0]["id"] == f"c{cv.MAX_KEPT + 2}"
    kept = cv.kept_with(kept, {"id": "c5", "title": "again"})
    assert kept[0] == {"id": "c5", "title": "again"} and sum(r["id"] == "c5" for r in kept) == 1
    assert cv.choices(kept)[0] == ("again", "c5")


def test_history_is_the_turns_about_the_current_picture(tmp_path):
    """The model's history after a picture change: the turns since the current picture joined, none from before."""
    from blipdemo.ui.chat import Chat
    from blipdemo.ui.messages import current_context

    chat, _ = a_chat(tmp_path)
    assert turns_of(current_context(chat)) == [("And now?", "blue")]
    assert turns_of(current_context(chat[:3])) == [("What color is it?", "red")]
    assert turns_of(current_context(chat[:4])) == [], "a picture just joined: no history"
    # Undo takes the last turn back (its question to the box); a picture that came after it stays.
    undone, question = Chat.undo(chat[:4])
    assert question == "What color is it?" and [m["role"] for m in undone] == ["user", "user"]
    assert picture_path(undone[-1]) == picture_path(chat[3])
