"""The chat's messages as Gradio's Chatbot holds them: the turns, the picture each turn was about, and what an answer
was made with.

The Chatbot's value is the conversation's one record — what the browser keeps, what an export writes, what a rating
logs — so nothing about a conversation lives elsewhere on the server. A picture that joins the chat is a message of
its own (a user message holding the picture's file, shown as a thumbnail) and the turns after it are about it, until
the next one. An answer carries what it was made with (its decoding options) and a picture message its content hash,
in the message's ``metadata["id"]`` as JSON: the one field of a message that Gradio keeps on every round trip and
does not show (it names a message only to nest "thoughts", which also need a title).
"""

from __future__ import annotations

import json
from collections.abc import Sequence


def _content(message: dict) -> list:
    content = message.get("content") if isinstance(message, dict) else None
    if content is None:
        return []
    return content if isinstance(content, list) else [content]


def text_of(message: dict) -> str | None:
    """The message's text (Gradio may hand back a list of parts: the text parts joined); None for a picture."""
    parts = _content(message)
    if any(isinstance(p, dict) and (p.get("type") == "file" or "path" in p or "file" in p) for p in parts):
        return None
    texts = [p if isinstance(p, str) else p.get("text", "") for p in parts if isinstance(p, str | dict)]
    return " ".join(texts)


def facts(message: dict) -> dict:
    """What the message carries in ``metadata["id"]`` (``{}`` when nothing, or not ours)."""
    meta = message.get("metadata") if isinstance(message, dict) else None
    try:
        value = json.loads((meta or {}).get("id") or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def picture_path(message: dict) -> str | None:
    """The file of a picture message (None for any other message)."""
    for part in _content(message):
        if isinstance(part, dict):
            file = part.get("file") if isinstance(part.get("file"), dict) else part
            if isinstance(file, dict) and file.get("path"):
                return file["path"]
    return None


def is_picture(message: dict) -> bool:
    return isinstance(message, dict) and message.get("role") == "user" and picture_path(message) is not None


def picture_message(path: str, key: str, number: int | None = None) -> dict:
    """A picture joining the chat: its file (shown as a thumbnail) and its content hash ``key``."""
    label = f"Picture {number}" if number else "Picture"
    return {
        "role": "user",
        "content": {"path": str(path), "alt_text": label},
        "metadata": {"id": json.dumps({"picture": key})},
    }


def answer_message(text: str, decoding: dict | None = None) -> dict:
    """An answer, with the decoding options it was made with (None: not known, e.g. an example's earlier turn)."""
    message = {"role": "assistant", "content": text}
    if decoding is not None:
        message["metadata"] = {"id": json.dumps({"decoding": decoding}, sort_keys=True)}
    return message


def turns_of(chat: Sequence[dict] | None) -> list[tuple[str, str]]:
    """Chatbot messages → (question, answer) pairs of finished turns (picture messages are no turn)."""
    turns, question = [], None
    for message in chat or []:
        if not isinstance(message, dict) or is_picture(message):
            continue
        if message.get("role") == "user":
            question = text_of(message)
        elif message.get("role") == "assistant" and question is not None:
            turns.append((question, text_of(message) or ""))
            question = None
    return turns


def last_picture(chat: Sequence[dict] | None, before: int | None = None) -> int | None:
    """The index of the last picture message (before ``before``, if given), or None."""
    chat = list(chat or [])
    end = len(chat) if before is None else before
    for i in range(end - 1, -1, -1):
        if is_picture(chat[i]):
            return i
    return None


def current_context(chat: Sequence[dict] | None) -> list[dict]:
    """The messages about the latest picture: those after its picture message (all, when there is none). Turns about
    an earlier picture are not history of a question about this one."""
    chat = list(chat or [])
    start = last_picture(chat)
    return chat if start is None else chat[start + 1 :]


def picture_count(chat: Sequence[dict] | None) -> int:
    return sum(is_picture(m) for m in chat or [])
