"""The chat's handlers: where a request from the page or the API becomes a ``Question``, and its answer streams back.

- ``Chat.ask`` is the edge: the page's controls (or an API call's parameters) → one checked ``Question``, made in a
  worker thread (the image is decoded there, once) with ``Service.question``; every error a user can cause becomes a
  ``UserError`` (a ``gr.Error``) with its message here, before anything waits for the model.
- The page checks in a step of its own (``check``, in a concurrency group beside the model's), which hands the
  question to the generating step (``respond``) through a ``gr.State``: a bad request shows its message alone, as a
  toast, at once, instead of waiting for the model and painting an "Error" badge into the chat and the instruction
  box (which Gradio puts on every output of an event that raises). For the same reason ``respond`` never raises: a
  failure gives the turn back and shows its message as a toast.
- The API endpoints (``/ask``, ``/stream``, ``/chat``) keep their parameters (Gradio's API page shows them); their
  bodies build the question the same way and run the same code.
"""

from __future__ import annotations

import html
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass

import anyio
import gradio as gr

from ..control import Generations
from ..decoding import INSTRUCTBLIP_DEFAULTS
from ..errors import UserError
from ..images import ImageError
from ..question import Question
from .look import LABEL as LOOK_LABEL
from .look import looked_closer
from .maps import MapsPanel
from .messages import answer_message, current_context, is_picture, last_picture, picture_path, text_of, turns_of

__all__ = ["BEAM", "SAMPLE", "Chat", "Rerun", "decoding_fields", "turns_of"]

MAX_INSTRUCTION_CHARS = 4000
BEAM, SAMPLE = "Beam search", "Nucleus sampling"
EARLIER_SEPARATOR = " → "  # "question → answer", one turn per line: how an example's earlier turns read
D = INSTRUCTBLIP_DEFAULTS


def decoding_fields(method, beams, max_new_tokens, min_new_tokens, top_p, temperature, repetition, length) -> dict:
    """The decoding controls → ``DecodingOptions`` fields (``Service.question`` checks them, naming the parameter)."""
    options = {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "repetition_penalty": repetition}
    if method == SAMPLE:
        options.update(do_sample=True, num_beams=1, top_p=top_p, temperature=temperature)
    elif method == BEAM:
        options.update(do_sample=False, num_beams=beams, length_penalty=length)
    else:
        raise ValueError(f"method must be {BEAM!r} or {SAMPLE!r}, got {method!r}")
    return options


def earlier_turns_text(history) -> str:
    """[[question, answer], ...] → "question → answer" lines (the examples' table shows them as they are)."""
    return "\n".join(f"{q}{EARLIER_SEPARATOR}{a}" for q, a in history)


def parse_earlier_turns(text: str | None) -> list[tuple[str, str]]:
    """``earlier_turns_text``'s lines back to (question, answer) pairs; anything else is no turn."""
    turns = []
    for line in (text or "").splitlines():
        question, sep, answer = line.partition(EARLIER_SEPARATOR)
        if sep and question.strip() and answer.strip():
            turns.append((question.strip(), answer.strip()))
    return turns


def _escaped(error: gr.Error) -> gr.Error:
    """A toast renders HTML, and our messages may quote a file's name."""
    return UserError(html.escape(error.message))


@dataclass(frozen=True)
class Rerun:
    """An edited question, checked: the chat from message ``index`` (the edited question) on is answered again, the
    edited turn as ``question`` says, each later question with the same settings (``settings``: the template, the
    decoding controls' values, the map settings' values or None, the "Look closer" box) about its own picture."""

    index: int
    question: Question
    settings: tuple


class Chat:
    """The chat's handlers around one served model (``vlm``), its runs (``generations``) and its maps panel."""

    def __init__(self, vlm, generations: Generations, panel: MapsPanel, history_turns: int | None) -> None:
        self.vlm = vlm
        self.generations = generations
        self.panel = panel
        self.history_turns = history_turns  # earlier turns put before a new question (None: all that fit; 0: none)

    # ----------------------------------------------------------------------------------------------
    # The edge
    def ask(
        self,
        image,
        instruction,
        chat: list[dict] | None,
        template,
        decoding: Sequence,
        maps: Sequence | None = None,
        look_closer: bool = False,
    ) -> Question:
        """The controls' values → a checked ``Question``, or a ``UserError`` with a message for the user.

        ``chat``: the conversation so far (messages), whose finished turns (as many as ``history_turns``) come before
        the question; ``decoding``: the decoding controls' values (``decoding_fields``); ``maps``: the map settings'
        values (``MapsPanel.selection``) when maps are on, else None; ``look_closer``: the "Look closer" box. Decodes
        the image: call it in a worker thread.
        """
        if image is None:
            raise UserError("Upload an image first (or pick an example below).")
        if not isinstance(instruction, str) or not instruction.strip():
            raise UserError("Type a question or an instruction about the image.")
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise UserError(
                f"The instruction is too long ({len(instruction):,} characters; at most {MAX_INSTRUCTION_CHARS:,})."
            )
        history = turns_of(current_context(chat))  # turns about an earlier picture are no history of this one
        if self.history_turns is not None:
            history = history[-self.history_turns :] if self.history_turns else []
        try:
            selection = None if maps is None else self.panel.selection(*maps)
            return self.vlm.question(
                image,
                instruction,
                history=history,
                template=template,
                maps=selection,
                look_closer=bool(look_closer),
                **decoding_fields(*decoding),
            )
        except (ImageError, ValueError, TypeError) as e:
            raise UserError(str(e)) from e

    async def check(self, image, instruction, chat, show_maps, template, look_closer, *controls) -> Question:
        """The chat's first step: the question, checked (a bad request stops here, with its message alone)."""
        decoding, maps = controls[:8], (controls[8:] if show_maps else None)
        try:
            return await anyio.to_thread.run_sync(
                self.ask, image, instruction, chat, template, decoding, maps, look_closer
            )
        except gr.Error as e:
            raise _escaped(e) from e

    async def check_regenerate(self, image, chat, show_maps, template, look_closer, *controls) -> Question:
        """Regenerate's first step: there must be an answer; the last question, asked again with the current
        settings, after the turns before it."""
        chat = list(chat or [])
        turns = turns_of(chat)
        if not turns or chat[-1].get("role") != "assistant":  # after a new picture, the last answer is about another
            raise UserError("There is no answer to regenerate yet.")
        return await self.check(image, turns[-1][0], chat[:-2], show_maps, template, look_closer, *controls)

    async def check_edit(
        self, edit: gr.EditData, image, chat, show_maps, template, look_closer, *controls
    ) -> Rerun | None:
        """An edited question's first step: the edited text, checked as a question about the picture it was asked
        about (the last picture message before it; the current picture if none). The chat from it on is answered
        again by ``answer_edit``; the earlier turns stay. (``edit`` comes first: Gradio fills event data into
        positional parameters only.)"""
        chat = list(chat or [])
        index = edit.index if edit is not None else None
        if isinstance(index, list | tuple):
            index = index[0]
        if not isinstance(index, int) or not 0 <= index < len(chat) or chat[index].get("role") != "user":
            return None
        text = edit.value if isinstance(edit.value, str) else text_of(chat[index])
        where = last_picture(chat, before=index)
        picture = picture_path(chat[where]) if where is not None else image
        question = await self.check(picture, text, chat[:index], show_maps, template, look_closer, *controls)
        maps = tuple(controls[8:]) if show_maps else None
        return Rerun(index, question, (template, tuple(controls[:8]), maps, look_closer))

    # ----------------------------------------------------------------------------------------------
    # Answering
    async def respond(self, question: Question | None, chat, request: gr.Request = None, outcome: dict | None = None):
        """Append the turn, stream the answer into it, then (when the question asks for them) its attention maps.

        Nothing here raises: a failure gives the turn back, as it was typed, and shows its message. The outputs: the
        chat, the instruction box, the maps panel's (``MapsPanel.outputs``), the checked question's State, emptied
        at the first update (the question, its picture among it, is not kept in the session once taken), and last
        where the answer looked closer (``ui.look``: hidden at the start, shown when a look-closer answer cropped).
        ``outcome`` (if given) gets ``"answered"``: whether the answer came."""
        if question is None:  # the check did not pass (its message is shown)
            return
        chat = list(chat or [])
        asked = {"role": "user", "content": question.instruction}
        panel = (gr.skip(),) * len(self.panel.outputs)
        unchanged = (*panel, gr.skip(), gr.skip())  # the panel, the question's State, the look-closer view
        session = getattr(request, "session_hash", None)
        ids = crop = None
        decoding = asdict(question.decoding)  # the answer carries what it was made with (a rating logs it)
        outcome = {} if outcome is None else outcome
        outcome["answered"] = False
        try:
            turn = [*chat, asked, answer_message("", decoding)]
            yield turn, "", *panel, None, gr.update(visible=False, value=None)
            async for kind, value in self.generations.answers(session, question):
                if kind == "text":  # a new list each time: Gradio diffs what it sent with what comes next
                    turn = [*chat, asked, answer_message(value, decoding)]
                    yield turn, "", *unchanged
                elif kind == "ids":
                    ids = value
                elif kind == "look":  # where it looked closer: painted in a worker thread, at the page's size
                    crop = value
                    pair = await anyio.to_thread.run_sync(
                        looked_closer, question.picture.image, crop.box, crop.picture.image
                    )
                    yield turn, "", *panel, gr.skip(), gr.update(visible=True, value=pair, label=LOOK_LABEL)
                else:  # the maps: painted in a worker thread, at the size the page shows them
                    yield turn, "", *(await self.panel.show(question, ids, value, crop)), gr.skip(), gr.skip()
            outcome["answered"] = True
        except gr.Error as e:  # the turn goes back as it was typed; the message shows alone
            gr.Warning(html.escape(e.message), title="Could not answer")
            yield (
                chat,
                question.instruction,
                *panel,
                gr.skip(),
                gr.update(visible=False, value=None),
            )  # no answer: no view

    async def regenerate(self, question: Question | None, chat, request: gr.Request = None):
        """Answer the last question again (its turn replaced), as ``check_regenerate`` made it."""
        if question is None or not turns_of(chat):  # the chat may have changed since the check
            return
        async for update in self.respond(question, list(chat)[:-2], request=request):
            yield update

    async def answer_edit(self, rerun: Rerun | None, chat, request: gr.Request = None):
        """Answer an edited question again, then each question after it in turn (each about its own picture, with the
        settings of the edit); the turns before it stay. Outputs as ``respond``'s. A later question that cannot be
        asked any more (its picture gone) ends it there, its text back in the box."""
        if rerun is None:
            return
        original = list(chat or [])
        if rerun.index >= len(original):  # the chat changed since the check
            return
        done: list[dict] = original[: rerun.index]
        template, decoding, maps, look_closer = rerun.settings
        question: Question | None = rerun.question
        later = original[rerun.index + 1 :]
        while question is not None:
            outcome: dict = {}
            update = None
            async for update in self.respond(question, done, request=request, outcome=outcome):
                yield update
            if not outcome["answered"] or update is None:
                return
            done = list(update[0])
            question = None
            while later and question is None:
                message = later.pop(0)
                if is_picture(message):
                    done.append(message)
                elif message.get("role") == "user":
                    where = last_picture(done)
                    picture = picture_path(done[where]) if where is not None else rerun.question.picture
                    text = text_of(message) or ""
                    try:
                        question = await anyio.to_thread.run_sync(
                            self.ask, picture, text, done, template, decoding, maps, look_closer
                        )
                    except gr.Error as e:
                        gr.Warning(html.escape(e.message), title="Could not answer")
                        yield done, text, *(gr.skip(),) * (len(self.panel.outputs) + 2)
                        return

    @staticmethod
    def undo(chat):
        """Remove the last turn (a picture that came after it stays) and put its question back in the box."""
        chat = list(chat or [])
        answers = [i for i, m in enumerate(chat) if m.get("role") == "assistant" and i and not is_picture(chat[i - 1])]
        if not answers:
            return chat, gr.skip()
        i = answers[-1]
        return chat[: i - 1] + chat[i + 1 :], text_of(chat[i - 1])

    def stop(self, request: gr.Request) -> None:
        """The Stop button: ends this session's runs (answers and remaps)."""
        self.generations.stop(getattr(request, "session_hash", None))

    # ----------------------------------------------------------------------------------------------
    # The API (parameter names are what API clients see)
    async def api_chat(
        self,
        image,
        instruction,
        chat,
        show_maps,
        template,
        look_closer,
        *controls,
        request: gr.Request = None,
    ):
        """/chat: the page's chat turn in one call (image, instruction, chat, show maps, template, look closer, the
        decoding controls): the same question and the same outputs as pressing Send."""
        try:
            question = await self.check(image, instruction, chat, show_maps, template, look_closer, *controls)
        except gr.Error as e:
            gr.Warning(e.message, title="Could not answer")
            yield chat, instruction, *(gr.skip(),) * (len(self.panel.outputs) + 2)
            return
        async for update in self.respond(question, chat, request=request):
            yield update

    async def api_ask(
        self,
        image,
        instruction,
        method=BEAM,
        num_beams=D["num_beams"],
        max_new_tokens=D["max_new_tokens"],
        min_new_tokens=D["min_new_tokens"],
        top_p=D["top_p"],
        temperature=D["temperature"],
        repetition_penalty=D["repetition_penalty"],
        length_penalty=D["length_penalty"],
        template=True,
        look_closer=False,
        request: gr.Request = None,
    ) -> str:
        """/ask: the whole answer at once. ``look_closer``: answer from a crop around where the model looks for this
        question (the picture alone when it is small)."""
        decoding = (method, num_beams, max_new_tokens, min_new_tokens, top_p, temperature, repetition_penalty)
        question = await self._api_question(image, instruction, template, (*decoding, length_penalty), look_closer)
        answer = ""
        async for answer in self._texts(question, request):  # noqa: B007 - the last value is the whole answer
            pass
        return answer

    async def api_stream(
        self,
        image,
        instruction,
        method=BEAM,
        num_beams=D["num_beams"],
        max_new_tokens=D["max_new_tokens"],
        min_new_tokens=D["min_new_tokens"],
        top_p=D["top_p"],
        temperature=D["temperature"],
        repetition_penalty=D["repetition_penalty"],
        length_penalty=D["length_penalty"],
        template=True,
        look_closer=False,
        request: gr.Request = None,
    ):
        """/stream: the answer so far, growing as it is generated. ``template`` (BLIP-2): False sends the
        instruction exactly as written, without "Question: … Answer:". ``look_closer`` as in /ask."""
        decoding = (method, num_beams, max_new_tokens, min_new_tokens, top_p, temperature, repetition_penalty)
        question = await self._api_question(image, instruction, template, (*decoding, length_penalty), look_closer)
        async for answer in self._texts(question, request):
            yield answer

    async def _api_question(self, image, instruction, template, decoding: tuple, look_closer=False) -> Question:
        if not isinstance(look_closer, bool):  # an API caller may send anything: say what is expected
            raise UserError(f"look_closer must be true or false, got {look_closer!r}.")
        return await anyio.to_thread.run_sync(self.ask, image, instruction, (), template, decoding, None, look_closer)

    async def _texts(self, question: Question, request: gr.Request | None) -> AsyncIterator[str]:
        session = getattr(request, "session_hash", None)
        async for kind, value in self.generations.answers(session, question):
            if kind == "text":
                yield value
