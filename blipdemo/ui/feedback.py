"""Rating answers on the page: Gradio's like / dislike buttons, a reason or a flag from its feedback menu, each
appended to the rating log (``blipdemo.feedback``). Shown only when the app's owner gave a log folder.

If the folder cannot be written the app goes on serving: the owner is told once in the server's log, a visitor once
in a toast, and ratings are dropped meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import anyio
import gradio as gr

from ..feedback import FeedbackLog, Rating, now
from .messages import facts, is_picture, last_picture, picture_path, text_of

log = logging.getLogger(__name__)

LIKE, DISLIKE = "Like", "Dislike"
REASONS = ("Wrong about the picture", "Does not answer the question")  # a dislike, with why
FLAG = "Flag: harmful or offensive"
# What the chat's feedback buttons offer: Gradio shows Like and Dislike as thumbs, the others in its flag menu.
FEEDBACK_OPTIONS = (LIKE, DISLIKE, *REASONS, FLAG)
# Gradio 6.31 sends a choice from its feedback menu twice (its click handler dispatches, then dispatches again): the
# same rating of the same message from the same page within this many seconds is that echo, logged once.
ECHO_SECONDS = 2.0
SESSIONS_REMEMBERED = 1024


def rating_of(liked) -> tuple[str, str | None]:
    """Gradio's ``LikeData.liked`` → (rating, reason): True like, False dislike, "" a rating taken back, a reason
    a dislike with it, the flag a flag."""
    if liked is True or liked == LIKE:
        return "like", None
    if liked is False or liked == DISLIKE:
        return "dislike", None
    if not liked:
        return "withdrawn", None
    if liked == FLAG:
        return "flag", None
    return "dislike", str(liked)


class Ratings:
    """The like handler around one log and the served model's name."""

    def __init__(self, log_: FeedbackLog, model: str) -> None:
        self.log = log_
        self.model = model
        self.logged = self.told = False  # the folder cannot be written: said once to the owner, once on the page
        self._last: OrderedDict[str, tuple] = OrderedDict()  # session → (message index, liked, when)
        self._last_lock = threading.Lock()
        problem = log_.check()
        if problem:
            self._fail(problem)

    def _fail(self, problem: str) -> None:
        if not self.logged:
            self.logged = True
            log.error("Ratings are not kept: %s. The app goes on serving.", problem)

    def _echo(self, session: str | None, index: int, liked) -> bool:
        """Whether this rating repeats the session's last one at once (see ECHO_SECONDS)."""
        key, when = session or "", time.monotonic()
        with self._last_lock:
            last = self._last.get(key)
            self._last[key] = (index, liked, when)
            self._last.move_to_end(key)
            while len(self._last) > SESSIONS_REMEMBERED:
                self._last.popitem(last=False)
        return last is not None and last[:2] == (index, liked) and when - last[2] < ECHO_SECONDS

    async def rate(self, like: gr.LikeData, chat, image, request: gr.Request = None) -> None:
        """An answer was rated: one line in the log, with the question before it and the picture it was about (the
        last picture message before it; the current picture if the chat has none)."""
        chat = list(chat or [])
        index = like.index[0] if isinstance(like.index, list | tuple) else like.index
        if not isinstance(index, int) or not 0 <= index < len(chat) or chat[index].get("role") != "assistant":
            return
        if self._echo(getattr(request, "session_hash", None), index, like.liked):
            return
        question = next(
            (text_of(m) for m in reversed(chat[:index]) if m.get("role") == "user" and not is_picture(m)), ""
        )
        where = last_picture(chat, before=index)
        picture = picture_path(chat[where]) if where is not None else image
        rating, reason = rating_of(like.liked)

        def write() -> None:
            digest = self.log.save_picture(picture) if picture else None
            decoding = facts(chat[index]).get("decoding")
            said = text_of(chat[index]) or ""
            self.log.write(Rating(now(), self.model, question or "", said, decoding, rating, reason, digest))

        try:
            await anyio.to_thread.run_sync(write)
        except OSError as e:
            self._fail(f"the feedback folder {self.log.folder} cannot be written ({e.strerror or e})")
            if not self.told:
                self.told = True
                gr.Warning("Ratings cannot be saved here (the app's rating log cannot be written); the chat goes on.")
