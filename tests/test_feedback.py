"""The rating log (blipdemo.feedback): lines written whole and read back, pictures saved once by hash, the summary
per model and per kind of question, the command line, and a folder that cannot be written."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace

import pytest
from PIL import Image

from blipdemo.feedback import FeedbackLog, Rating, format_summary, main, question_kind, read, summary
from blipdemo.ui.feedback import FLAG, REASONS, rating_of

LINE = Rating(
    "2026-01-01T00:00:00+00:00", "m", "What color is the square?", "red", {"num_beams": 5}, "like", None, None
)


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def test_lines_are_appended_and_read_back(tmp_path, picture):
    log = FeedbackLog(tmp_path / "log")
    assert log.check() is None
    digest = log.save_picture(picture)
    assert digest == hashlib.sha256(picture.read_bytes()).hexdigest()
    assert log.save_picture(picture) == digest  # a second rating of the same picture does not copy it again
    assert [p.name for p in (tmp_path / "log" / "images").iterdir()] == [f"{digest}.png"]
    log.write(replace(LINE, image=digest))
    log.write(replace(LINE, rating="dislike", reason="Wrong about the picture", image=digest))
    lines = (tmp_path / "log" / "ratings.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["reason"] == "Wrong about the picture"
    records, bad = read(tmp_path / "log")
    assert bad == 0 and [r["rating"] for r in records] == ["like", "dislike"]
    assert set(records[0]) == {"time", "model", "question", "answer", "decoding", "rating", "reason", "image"}


def test_damaged_lines_are_counted_not_fatal(tmp_path):
    log = FeedbackLog(tmp_path)
    log.write(LINE)
    with log.path.open("a") as f:
        f.write('{"rating": "like", "model": "m", "quest')  # cut short
        f.write("\n[1, 2]\n")
    records, bad = read(tmp_path)
    assert len(records) == 1 and bad == 2
    assert "2 lines could not be read" in format_summary(records, bad)


@pytest.mark.parametrize(
    "question, kind",
    [
        ("What color is the square?", "color"),
        ("How many shapes are there?", "count"),
        ("Where is the yellow triangle?", "where"),
        ("What shape is the orange object?", "shape"),
        ("Is there an orange triangle?", "yes/no"),
        ("Describe the image.", "description"),
        ("Why?", "other"),
    ],
)
def test_question_kinds(question, kind):
    assert question_kind(question) == kind


def test_summary_counts_per_model_and_kind(tmp_path):
    records = [
        {**json.loads(json.dumps(LINE.__dict__)), "model": "a", "rating": "like"},
        {**LINE.__dict__, "model": "a", "rating": "dislike", "reason": "Wrong about the picture"},
        {**LINE.__dict__, "model": "b", "question": "How many shapes?", "rating": "flag"},
    ]
    counts = summary(records)
    assert counts["model"]["a"] == {"like": 1, "dislike": 1}
    assert counts["model"]["b"] == {"flag": 1}
    assert counts["kind"]["color"] == {"like": 1, "dislike": 1} and counts["kind"]["count"] == {"flag": 1}
    text = format_summary(records)
    assert "3 ratings" in text and "50%" in text and "Wrong about the picture" in text


def test_the_command_prints_the_summary(tmp_path):
    log = FeedbackLog(tmp_path)
    log.write(LINE)
    log.write(replace(LINE, rating="dislike"))
    out = subprocess.run(
        [sys.executable, "-m", "blipdemo.feedback", "summary", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "2 ratings" in out.stdout and "Per model" in out.stdout and "color" in out.stdout
    with pytest.raises(SystemExit):
        main(["summary", str(tmp_path / "nothing-here")])


def unwritable(tmp_path):
    """A folder no one can write, root included: its parent is a file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return blocker / "log"


def test_a_folder_that_cannot_be_written_is_said(tmp_path):
    problem = FeedbackLog(unwritable(tmp_path)).check()
    assert problem and "cannot be written" in problem
    with pytest.raises(OSError):
        FeedbackLog(unwritable(tmp_path)).write(LINE)


def test_feedback_choices_become_ratings():
    assert rating_of(True) == ("like", None)
    assert rating_of(False) == ("dislike", None)
    assert rating_of("") == ("withdrawn", None)
    assert rating_of(FLAG) == ("flag", None)
    assert rating_of(REASONS[0]) == ("dislike", REASONS[0])


def test_the_app_goes_on_and_says_so_once_when_the_log_cannot_be_written(tmp_path, picture, caplog, monkeypatch):
    """Ratings into a folder that cannot be written: one error in the server's log (at start), one message to a
    visitor (the first rating), later ratings dropped quietly; nothing raises."""
    import anyio
    import gradio as gr

    from blipdemo.ui.feedback import Ratings
    from blipdemo.ui.messages import answer_message

    with caplog.at_level("ERROR"):
        ratings = Ratings(FeedbackLog(unwritable(tmp_path)), "m")
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "cannot be written" in caplog.records[0].message
    chat = [{"role": "user", "content": "What color?"}, answer_message("red", {"num_beams": 5})]
    said = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: said.append(message))  # the visitor's toast
    for liked in (True, False, True):
        like = gr.LikeData(None, {"index": 1, "value": "red", "liked": liked})
        anyio.run(ratings.rate, like, chat, str(picture), None)
    assert len(said) == 1 and "cannot be saved" in said[0]
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1, "the owner is told once"
