"""The side panel's handlers: the conversations kept in this browser (open, delete), export and import.

The list lives in the visitor's browser (``gr.BrowserState``); these handlers only pass it through. Every step that
reads pictures or writes files runs in a worker thread.
"""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path

import anyio
import gradio as gr

from .conversations import chat_of, check, check_size, choices, kept_with, new_id, parse, record_of
from .messages import turns_of

EXPORTS = Path(tempfile.gettempdir()) / "blipdemo-exports"


class SidePanel:
    """Handlers around the served model's name (written into each record)."""

    def __init__(self, model: str) -> None:
        self.model = model

    @staticmethod
    def listed(kept):
        """The side panel's list of kept conversations (on page load)."""
        return gr.update(choices=choices(kept), value=None)

    def _export(self, chat, conversation: str) -> str:
        record = record_of(chat, id=conversation, model=self.model)
        EXPORTS.mkdir(parents=True, exist_ok=True)
        path = EXPORTS / f"conversation-{conversation}.json"
        path.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        return str(path)

    async def keep(self, kept, conversation, chat):
        """After each change of a chat with turns: the browser's list updated with it (first), and the Export
        button's file made from it. A chat without turns is not kept."""
        if not turns_of(chat) or not conversation:
            return gr.skip(), gr.skip(), gr.skip()

        def work():
            record = record_of(chat, id=conversation, model=self.model, small=True)
            return record, self._export(chat, conversation)

        try:
            record, export = await anyio.to_thread.run_sync(work)
        except OSError as e:  # a picture's file gone (the server's temporary files cleaned): nothing to keep
            gr.Warning(html.escape(f"This conversation could not be kept ({e.strerror or e})."))
            return gr.skip(), gr.skip(), gr.skip()
        kept = kept_with(kept, record)
        return kept, gr.update(choices=choices(kept), value=conversation), export

    async def open(self, kept, chosen):
        """A kept conversation chosen in the list: (the picture it ends with, the chat, its id)."""
        record = next((r for r in kept or [] if isinstance(r, dict) and r.get("id") == chosen), None)
        if record is None:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            chat, picture = await anyio.to_thread.run_sync(chat_of, check(record))
        except gr.Error as e:
            gr.Warning(html.escape(e.message), title="Could not open it")
            return gr.skip(), gr.skip(), gr.skip()
        return picture, chat, chosen

    @staticmethod
    def delete(kept, chosen, conversation):
        """The chosen conversation leaves the browser's list. If it is the one on screen, it stays on screen but is a
        new conversation from now on (a next question keeps it again, under a new id)."""
        if not chosen:
            gr.Info("Choose a conversation in the list first.")
            return gr.skip(), gr.skip(), gr.skip()
        kept = [r for r in kept or [] if isinstance(r, dict) and r.get("id") != chosen]
        return kept, gr.update(choices=choices(kept), value=None), new_id() if chosen == conversation else gr.skip()

    async def load(self, file):
        """An imported file: (the picture it ends with, the chat, its id); a message and nothing changed if it is not
        a conversation of ours, too large, or holds a picture that cannot be read."""
        if not file:
            return gr.skip(), gr.skip(), gr.skip()

        def work():
            path = Path(file)
            check_size(path.stat().st_size)  # before reading it
            record = parse(path.read_bytes())
            chat, picture = chat_of(record)
            conversation = record.get("id")
            return picture, chat, conversation if isinstance(conversation, str) and conversation.isalnum() else new_id()

        try:
            return await anyio.to_thread.run_sync(work)
        except gr.Error as e:
            gr.Warning(html.escape(e.message), title="Could not import it")
        except OSError as e:
            gr.Warning(html.escape(f"The file could not be read ({e.strerror or e})."), title="Could not import it")
        return gr.skip(), gr.skip(), gr.skip()
