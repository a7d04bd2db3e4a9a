"""A new picture in the same chat: it joins the chat as a message of its own (a thumbnail), and the turns after it
are about it. The model is asked about the current picture with only the turns since it joined as history: turns about
an earlier picture are not passed as if they were about this one (a new picture starts a new model context; the
earlier turns stay on screen, above its thumbnail). README: "Change the picture mid-chat" says why this and not the
earlier turns as labelled text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import anyio

from ..images import ImageError, load_image
from .messages import facts, last_picture, picture_count, picture_message


def file_key(path: str | Path) -> str:
    """A picture file's SHA-256: its key in the chat, in the rating log and in an exported conversation."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def readable_key(path: str | Path) -> str | None:
    """The file's key if it is a picture we can read (decoded once to know), else None."""
    try:
        load_image(str(path))
        return file_key(path)
    except (ImageError, OSError):
        return None


async def with_picture(chat: list[dict] | None, image) -> list[dict] | None:
    """The chat with ``image`` joined as its current picture; None when nothing changes: no picture, one that cannot
    be read (Send says why), or the one the chat is already about (a conversation reopened with its picture).
    Decodes the picture in a worker thread."""
    if not image:
        return None
    key = await anyio.to_thread.run_sync(readable_key, image)
    if key is None:
        return None
    chat = list(chat or [])
    last = last_picture(chat)
    if last is not None and facts(chat[last]).get("picture") == key:
        return None
    if last is not None and last == len(chat) - 1:  # nothing was asked about the last one: this one replaces it
        chat = chat[:-1]
    return [*chat, picture_message(image, key, picture_count(chat) + 1)]
