"""Conversations kept in the visitor's browser, exported and imported as one JSON file.

A conversation's record is its chat (``messages``: the turns and the pictures they were about) with the pictures
inside, base64:

    {"format": "blipdemo-conversation", "version": 1, "id": …, "title": …, "saved": …, "model": …,
     "pictures": {sha256: "data:image/png;base64,…"},
     "messages": [{"picture": sha256}, {"role": "user", "content": …}, {"role": "assistant", "content": …,
                  "decoding": {…}}, …]}

The browser keeps a list of these (Gradio's ``BrowserState``: the visitor's localStorage; nothing is kept on the
server), newest first, at most MAX_KEPT, its pictures made small enough for localStorage's few megabytes (larger ones
kept as a JPEG of at most KEPT_SIDE pixels; an export keeps them as they were). Opening or importing one writes its
pictures to temporary files for the page to show and the model to read, as an upload does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

from ..errors import UserError
from ..images import ImageError, load_image
from .messages import answer_message, facts, is_picture, picture_message, picture_path, text_of

FORMAT, VERSION = "blipdemo-conversation", 1
# An imported file: below the app's default --max-file-size (20 MB), which Gradio enforces first with its own message.
MAX_IMPORT_BYTES = 16 * 2**20
MAX_TEXT = 20_000  # characters of one message in an imported file
MAX_MESSAGES = 1_000
MAX_KEPT = 20  # conversations kept in a browser (the oldest go)
KEPT_BYTES, KEPT_SIDE = 400_000, 1024  # a larger picture is kept in the browser as a JPEG this size
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
PICTURES = Path(tempfile.gettempdir()) / "blipdemo-pictures"  # pictures of opened and imported conversations


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def title_of(chat: list[dict]) -> str:
    """The first question (shortened), as the side panel lists the conversation."""
    for message in chat:
        if message.get("role") == "user" and not is_picture(message):
            text = " ".join((text_of(message) or "").split())
            return text if len(text) <= 48 else text[:47] + "…"
    return "A picture"


def _data_url(data: bytes, small: bool) -> str:
    """A picture file's bytes as a data URL; ``small``: larger than KEPT_BYTES → a JPEG of at most KEPT_SIDE px."""
    with Image.open(io.BytesIO(data)) as image:
        kind = image.format
        if small and len(data) > KEPT_BYTES:
            rgb = load_image(data)
            rgb.thumbnail((KEPT_SIDE, KEPT_SIDE))
            out = io.BytesIO()
            rgb.save(out, "JPEG", quality=88)
            data, kind = out.getvalue(), "JPEG"
    return f"data:{MIME.get(kind, 'image/png')};base64,{base64.b64encode(data).decode()}"


def record_of(chat: list[dict], *, id: str, model: str, small: bool = False) -> dict:
    """The chat as a record (see the module's docstring). Reads the pictures' files: call it in a worker thread."""
    pictures: dict[str, str] = {}
    messages: list[dict] = []
    for message in chat or []:
        if is_picture(message):
            key = facts(message).get("picture")
            path = picture_path(message)
            data = Path(path).read_bytes()
            key = key or hashlib.sha256(data).hexdigest()
            if key not in pictures:
                pictures[key] = _data_url(data, small)
            messages.append({"picture": key})
        elif message.get("role") in ("user", "assistant"):
            item = {"role": message["role"], "content": text_of(message) or ""}
            decoding = facts(message).get("decoding")
            if decoding is not None:
                item["decoding"] = decoding
            messages.append(item)
    return {
        "format": FORMAT,
        "version": VERSION,
        "id": id,
        "title": title_of(chat),
        "saved": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model,
        "pictures": pictures,
        "messages": messages,
    }


NOT_OURS = "This file is not a conversation exported from this app"


def check_size(size: int) -> None:
    """``UserError`` if a file of ``size`` bytes is too large to import (said before it is read)."""
    if size > MAX_IMPORT_BYTES:
        raise UserError(
            f"This file is too large to be a conversation ({size / 2**20:.1f} MB; at most "
            f"{MAX_IMPORT_BYTES / 2**20:.0f} MB)."
        )


def parse(data: bytes) -> dict:
    """An exported file's bytes → its record, checked (a ``UserError`` saying what is wrong otherwise). Pictures are
    checked when opened (``chat_of``)."""
    check_size(len(data))
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{NOT_OURS} (it is not JSON).") from None
    return check(record)


def check(record) -> dict:
    """A record's shape, checked (``UserError`` if it is not one of ours); returned as it is."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{NOT_OURS}.")
    if not isinstance(record.get("version"), int) or record["version"] > VERSION:
        raise UserError(f"{NOT_OURS} version (it says version {record.get('version')!r}; this app reads {VERSION}).")
    pictures, messages = record.get("pictures"), record.get("messages")
    if not isinstance(pictures, dict) or not isinstance(messages, list) or len(messages) > MAX_MESSAGES:
        raise UserError(f"{NOT_OURS} (no pictures and messages in it).")
    for message in messages:
        if not isinstance(message, dict):
            raise UserError(f"{NOT_OURS} (a message is not an object).")
        if "picture" in message:
            if message["picture"] not in pictures or not isinstance(pictures[message["picture"]], str):
                raise UserError(f"{NOT_OURS} (a message names a picture that is not in it).")
        elif message.get("role") not in ("user", "assistant") or not isinstance(message.get("content"), str):
            raise UserError(f"{NOT_OURS} (a message has no role or no text).")
        elif len(message["content"]) > MAX_TEXT:
            raise UserError(f"A message in this file is too long ({len(message['content']):,} characters).")
    return record


def _picture_file(data_url: str) -> tuple[Path, str]:
    """A record's picture written to a temporary file (named by its SHA-256), decoded once to be sure it is one:
    (path, sha256). ``UserError`` if it is not a picture we can read."""
    match = re.fullmatch(r"data:image/[\w.+-]+;base64,(.*)", data_url, flags=re.S)
    try:
        if not match:
            raise ValueError("not a base64 picture")
        data = base64.b64decode(match.group(1), validate=True)
        load_image(data)
    except (ValueError, binascii.Error, ImageError) as e:
        raise UserError(f"A picture in this conversation cannot be read ({e}).") from None
    key = hashlib.sha256(data).hexdigest()
    with Image.open(io.BytesIO(data)) as image:
        suffix = {"JPEG": ".jpg"}.get(image.format or "", f".{(image.format or 'png').lower()}")
    path = PICTURES / f"{key}{suffix}"
    if not path.exists():
        PICTURES.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{uuid.uuid4().hex}.part")
        partial.write_bytes(data)
        partial.replace(path)
    return path, key


def chat_of(record: dict) -> tuple[list[dict], str | None]:
    """A checked record → (the chat, its last picture's file: the picture to continue with). Decodes and writes the
    pictures: call it in a worker thread. ``UserError`` if a picture cannot be read."""
    files: dict[str, tuple[Path, str]] = {}
    chat: list[dict] = []
    last = None
    for message in record["messages"]:
        if "picture" in message:
            ref = message["picture"]
            if ref not in files:
                files[ref] = _picture_file(record["pictures"][ref])
            path, key = files[ref]
            chat.append(picture_message(str(path), key, sum(is_picture(m) for m in chat) + 1))
            last = str(path)
        elif message["role"] == "user":
            chat.append({"role": "user", "content": message["content"]})
        else:
            decoding = message.get("decoding")
            chat.append(answer_message(message["content"], decoding if isinstance(decoding, dict) else None))
    return chat, last


def kept_with(kept: list | None, record: dict) -> list[dict]:
    """The browser's list with ``record`` first (replacing the one with its id), at most MAX_KEPT."""
    others = [r for r in (kept or []) if isinstance(r, dict) and r.get("id") != record["id"]]
    return [record, *others][:MAX_KEPT]


def choices(kept: list | None) -> list[tuple[str, str]]:
    """The side panel's list: (title, id) per kept conversation, newest first."""
    return [(f"{r.get('title', '?')}", r["id"]) for r in kept or [] if isinstance(r, dict) and r.get("id")]
