"""The Gradio app: chat about an image, with streamed answers, a decoding panel and named API endpoints.

The UI calls only the public contract (``vlm.stream`` / ``vlm.ask`` / ``vlm.load_info``). One generation
runs at a time per model (``concurrency_limit``); the queue is bounded and the REST API goes through it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import gradio as gr
import torch

from .decoding import INSTRUCTBLIP_DEFAULTS, validate
from .images import ImageError, load_image

MAX_INSTRUCTION_CHARS = 4000
BEAM, SAMPLE = "Beam search", "Nucleus sampling"
CONCURRENCY_ID = "model"
# Gradio pulls the next piece as soon as it has sent one; a piece left unpulled this long means the client is
# gone (Gradio drops a disconnected event without closing its generator): generation stops. Beam search sends
# no pieces until the end, so a vanished client is also caught from the queue itself (`_watch_disconnects`).
READER_TIMEOUT = 0.5
WHOLE_ANSWER = "Whole answer"
FAMILY_NAMES = {
    "instructblip": "InstructBLIP",
    "blip2": "BLIP-2",
}  # every event that runs the model shares one concurrency group

try:  # Hugging Face ZeroGPU: a GPU is attached only while a decorated function runs
    import spaces

    gpu = spaces.GPU(duration=120)
except ImportError:  # anywhere else: nothing special

    def gpu(fn):
        return fn


CSS = """
#header {margin-bottom: 0}
#banner {background: var(--color-accent-soft); border-radius: 8px; padding: 6px 12px}
.compact-row {gap: 6px; flex-wrap: nowrap}
.compact-row button {padding-left: 4px; padding-right: 4px}
@media (max-width: 640px) {
  .compact-row {flex-wrap: wrap}
  .compact-row button {min-width: 30% !important; flex: 1 1 30% !important}
}
"""


class ImageInput(gr.Image):
    """gr.Image that hands over the uploaded file untouched: our loader (``images.load_image``) opens it, with
    clear messages for damaged files, SVGs and decompression bombs, EXIF rotation and 16-bit scaling."""

    is_template = True  # rendered by the frontend as a plain gr.Image

    def preprocess(self, payload):
        if payload is None or (payload.url and payload.url.startswith("data:")) or payload.path is None:
            return super().preprocess(payload)
        return payload.path


log = logging.getLogger(__name__)


def decoding_options(method, beams, max_new_tokens, min_new_tokens, top_p, temperature, repetition, length) -> dict:
    """UI controls → validated ``generate`` options (ValueError with the parameter's name if out of range)."""
    options = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "repetition_penalty": repetition,
    }
    if method == SAMPLE:
        options.update(do_sample=True, num_beams=1, top_p=top_p, temperature=temperature)
    elif method == BEAM:
        options.update(do_sample=False, num_beams=beams, length_penalty=length)
    else:
        raise ValueError(f"method must be {BEAM!r} or {SAMPLE!r}, got {method!r}")
    return validate(options)


def _turns(chat: list[dict]) -> list[tuple[str, str]]:
    """Chatbot messages → (question, answer) pairs of finished turns."""
    turns, question = [], None
    for message in chat or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # Gradio may hand back structured content: keep the text parts
            content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
        if message.get("role") == "user":
            question = content
        elif message.get("role") == "assistant" and question is not None:
            turns.append((question, content or ""))
            question = None
    return turns


class Demo:
    """The app around one loaded model; ``build()`` returns the Gradio Blocks."""

    def __init__(
        self, vlm, *, notice: str | None = None, examples_dir: Path | None = None, history_turns: int | None = None
    ) -> None:
        """``history_turns``: earlier turns put before a new question (None: all that fit; 0: none — for a
        model trained on single questions, like the embedded one)."""
        self.vlm = vlm
        self.history_turns = history_turns
        self.notice = notice
        self.examples_dir = examples_dir
        self.blocks: gr.Blocks | None = None
        # session hash → the stop switches of its running generations (a session may run several: API clients)
        self._stops: dict[str, set[threading.Event]] = {}

    # ----------------------------------------------------------------------------------------------
    # Model calls
    def _check(self, image, instruction: str, options: dict):
        if image is None:
            raise gr.Error("Upload an image first (or pick an example below).")
        if not isinstance(instruction, str) or not instruction.strip():
            raise gr.Error("Type a question or an instruction about the image.")
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise gr.Error(
                f"The instruction is too long ({len(instruction):,} characters; at most {MAX_INSTRUCTION_CHARS:,})."
            )
        try:
            return load_image(image), decoding_options(*options)
        except (ImageError, ValueError) as e:
            raise gr.Error(str(e)) from e

    @gpu
    def _stream(self, image, instruction: str, history, opts: dict, stop: threading.Event) -> Iterator[str]:
        """Accumulated answer text; model errors become messages for the user."""
        answer = ""
        try:
            pieces = self.vlm.stream(
                image, instruction, history=history, stop_event=stop, idle_timeout=READER_TIMEOUT, **opts
            )
            for piece in pieces:
                answer += piece
                yield answer
        except (ImageError, ValueError) as e:
            raise gr.Error(str(e)) from e
        except torch.OutOfMemoryError as e:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise gr.Error(
                "The model ran out of memory on this request. Try a smaller image, fewer beams or fewer new tokens."
            ) from e

    async def _answers(self, image, instruction: str, history, opts: dict, stop: threading.Event):
        """The growing answer, pulled from ``_stream`` in worker threads so that the event loop stays free.

        When Gradio cancels the event (Stop, a client that cancels or goes away), the cancellation lands at an
        ``await`` here, and ``finally`` ends the generation thread itself, not just the stream.
        """
        iterator = self._stream(image, instruction, history, opts, stop)
        done = object()
        try:
            while (answer := await anyio.to_thread.run_sync(next, iterator, done)) is not done:
                yield answer
        finally:
            stop.set()
            with anyio.CancelScope(shield=True):
                # A cancelled await may leave a next() still running in its worker thread; with `stop` set it
                # returns within a token, and then close() joins the generation thread.
                while True:
                    try:
                        await anyio.to_thread.run_sync(iterator.close)
                        break
                    except ValueError:  # "generator already executing"
                        await anyio.sleep(0.01)

    @contextmanager
    def _stop_event(self, request: gr.Request | None) -> Iterator[threading.Event]:
        """A stop switch for one generation of this session, registered for as long as it runs: the Stop button
        and the session's disconnect set it."""
        self._watch_disconnects()
        key = getattr(request, "session_hash", None) or "default"
        event = threading.Event()
        self._stops.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            running = self._stops.get(key, set())
            running.discard(event)
            if not running:
                self._stops.pop(key, None)

    def stop_session(self, session_hash: str | None) -> None:
        """End every generation of this session (the worker threads, not just the streams)."""
        for event in list(self._stops.get(session_hash or "default", ())):
            event.set()

    def stop(self, request: gr.Request) -> None:
        """The Stop button: ends this session's generation."""
        self.stop_session(getattr(request, "session_hash", None))

    def _watch_disconnects(self) -> None:
        """Stop a session's generations the moment its client goes away.

        When a client's event stream closes (tab closed, page left, client process killed), Gradio's queue calls
        ``clean_events(session_hash=...)`` at once, but only marks the job dead: the running handler is not
        cancelled, and a beam search (which sends nothing until the end) or an ``/ask`` call would run to its
        end. We hook that call on the queue in use (``demo.queue()`` replaces the queue, so this runs lazily
        from the handlers). A connection that dies silently (no FIN from the peer) is seen only when Gradio's
        next heartbeat write fails.
        """
        queue = getattr(self.blocks, "_queue", None)
        clean = getattr(queue, "clean_events", None)
        if queue is None or getattr(clean, "blipdemo_watch", False):  # not served by a queue, or hooked already
            return
        if not callable(clean):  # pragma: no cover - a Gradio without the hook: only streams notice a vanished reader
            log.warning("This Gradio's queue has no clean_events: a vanished client is noticed only by streams")
            return

        async def clean_events(*, session_hash: str | None = None, event_id: str | None = None) -> None:
            if session_hash is not None:
                self.stop_session(session_hash)
            await clean(session_hash=session_hash, event_id=event_id)

        clean_events.blipdemo_watch = True
        queue.clean_events = clean_events

    async def respond(
        self,
        image,
        instruction,
        chat,
        show_maps,
        method,
        beams,
        max_new_tokens,
        min_new_tokens,
        top_p,
        temperature,
        repetition,
        length,
        request: gr.Request = None,
    ):
        """Chat handler: append the turn, stream the answer into it, then (optionally) its attention maps.

        The decoding options are spelled out because Gradio hands ``request`` (whose session the Stop button and
        a disconnect stop) only to a positional parameter.
        """
        options = (method, beams, max_new_tokens, min_new_tokens, top_p, temperature, repetition, length)
        pil, opts = await anyio.to_thread.run_sync(self._check, image, instruction, options)
        chat = list(chat or [])
        history = _turns(chat)
        if self.history_turns is not None:
            history = history[-self.history_turns :] if self.history_turns else []
        chat += [{"role": "user", "content": instruction}, {"role": "assistant", "content": ""}]
        unchanged = (gr.skip(), gr.skip(), gr.skip())
        yield chat, "", *unchanged
        answer = ""
        try:
            with self._stop_event(request) as stop:
                async for answer in self._answers(pil, instruction, history, opts, stop):
                    chat[-1] = {"role": "assistant", "content": answer}
                    yield chat, "", *unchanged
        except gr.Error:
            yield chat[:-2], instruction, *unchanged  # give the turn back, as it was typed
            raise
        if show_maps and answer.strip():
            explanation = await anyio.to_thread.run_sync(
                lambda: self.vlm.explain(pil, instruction, history=history, answer=answer)
            )
            yield chat, "", explanation, gr.update(value=explanation.overlay(), visible=True), self._words(explanation)

    @staticmethod
    def _words(explanation) -> dict:
        """The answer's words as chips: the whole answer first, then each token."""
        chips = [(WHOLE_ANSWER, -1)] + [(t.strip() or "␣", i) for i, t in enumerate(explanation.tokens)]
        return gr.update(choices=chips, value=-1, visible=True)

    @staticmethod
    def show_word(explanation, choice):
        """A chip was clicked: that token's map (or the whole answer's) over the image."""
        if explanation is None or choice is None:
            return gr.skip()
        return explanation.overlay(None if choice == -1 else int(choice))

    @staticmethod
    def toggle_maps(show: bool, explanation):
        """Turning maps off hides them; turning them on shows the last answer's maps (if any)."""
        visible = gr.update(visible=bool(show and explanation is not None))
        return visible, visible

    async def regenerate(
        self,
        image,
        chat,
        show_maps,
        method,
        beams,
        max_new_tokens,
        min_new_tokens,
        top_p,
        temperature,
        repetition,
        length,
        request: gr.Request = None,
    ):
        """Answer the last question again (with the current decoding settings)."""
        turns = _turns(chat)
        if not turns:
            raise gr.Error("There is no answer to regenerate yet.")
        options = (method, beams, max_new_tokens, min_new_tokens, top_p, temperature, repetition, length)
        async for update in self.respond(image, turns[-1][0], list(chat)[:-2], show_maps, *options, request=request):
            yield update

    @staticmethod
    def undo(chat):
        """Remove the last turn and put its question back in the box."""
        chat = list(chat or [])
        turns = _turns(chat)
        if not turns:
            return chat, ""
        return chat[:-2], turns[-1][0]

    async def api_ask(
        self,
        image,
        instruction,
        method=BEAM,
        num_beams=INSTRUCTBLIP_DEFAULTS["num_beams"],
        max_new_tokens=INSTRUCTBLIP_DEFAULTS["max_new_tokens"],
        min_new_tokens=INSTRUCTBLIP_DEFAULTS["min_new_tokens"],
        top_p=INSTRUCTBLIP_DEFAULTS["top_p"],
        temperature=INSTRUCTBLIP_DEFAULTS["temperature"],
        repetition_penalty=INSTRUCTBLIP_DEFAULTS["repetition_penalty"],
        length_penalty=INSTRUCTBLIP_DEFAULTS["length_penalty"],
        request: gr.Request = None,
    ) -> str:
        """/ask: the whole answer at once (parameter names are what API clients see)."""
        answer = ""
        async for answer in self.api_stream(  # noqa: B007 - the last value is the whole answer
            image,
            instruction,
            method,
            num_beams,
            max_new_tokens,
            min_new_tokens,
            top_p,
            temperature,
            repetition_penalty,
            length_penalty,
            request=request,
        ):
            pass
        return answer

    async def api_stream(
        self,
        image,
        instruction,
        method=BEAM,
        num_beams=INSTRUCTBLIP_DEFAULTS["num_beams"],
        max_new_tokens=INSTRUCTBLIP_DEFAULTS["max_new_tokens"],
        min_new_tokens=INSTRUCTBLIP_DEFAULTS["min_new_tokens"],
        top_p=INSTRUCTBLIP_DEFAULTS["top_p"],
        temperature=INSTRUCTBLIP_DEFAULTS["temperature"],
        repetition_penalty=INSTRUCTBLIP_DEFAULTS["repetition_penalty"],
        length_penalty=INSTRUCTBLIP_DEFAULTS["length_penalty"],
        request: gr.Request = None,
    ):
        """/stream: the answer so far, growing as it is generated."""
        options = (
            method,
            num_beams,
            max_new_tokens,
            min_new_tokens,
            top_p,
            temperature,
            repetition_penalty,
            length_penalty,
        )
        pil, opts = await anyio.to_thread.run_sync(self._check, image, instruction, options)
        with self._stop_event(request) as stop:
            async for answer in self._answers(pil, instruction, (), opts, stop):
                yield answer

    # ----------------------------------------------------------------------------------------------
    def header(self) -> str:
        info = self.vlm.load_info
        quant = info.get("quantization") or "no quantization"
        device_map = info.get("device_map")
        if device_map:
            devices = sorted({str(d) for d in device_map.values()})
            where = f"device map over {', '.join(devices)}"
        else:
            where = f"on {info.get('device', 'cpu')}"
        name = str(info.get("name", "?"))
        if Path(name).is_dir():  # a local folder: its name, not the server's file system layout
            name = Path(name).name
        return (
            f"### Chat about an image with `{name}`\n"
            f"{FAMILY_NAMES[self.vlm.family]} · {info.get('dtype')} · {quant} · {where}"
        )

    def examples(self) -> list[list[str]]:
        if not self.examples_dir or not (self.examples_dir / "examples.json").is_file():
            return []
        manifest = json.loads((self.examples_dir / "examples.json").read_text())
        return [[str(self.examples_dir / e["image"]), e["question"]] for e in manifest]

    def build(self, concurrency_limit: int = 1) -> gr.Blocks:
        """The Blocks app; ``concurrency_limit`` generations run at once (1 = one at a time per model)."""
        d = INSTRUCTBLIP_DEFAULTS
        model_event = {"concurrency_limit": concurrency_limit, "concurrency_id": CONCURRENCY_ID}
        with gr.Blocks(title="blipdemo — chat about an image") as demo:
            gr.Markdown(self.header(), elem_id="header")
            if self.notice:
                gr.Markdown(self.notice, elem_id="banner")
            with gr.Row(equal_height=False):
                with gr.Column(scale=4, min_width=300):
                    image = ImageInput(
                        label="Image",
                        type="filepath",
                        image_mode=None,
                        format="png",
                        sources=["upload", "clipboard", "webcam"],
                        height=340,
                        elem_id="image",
                    )
                    show_maps = gr.Checkbox(
                        True, label="Show where the model looked (attention maps)", elem_id="show-maps"
                    )
                    heat = gr.Image(
                        label="Where the model looked",
                        interactive=False,
                        format="png",  # lossless: the map's colors are data
                        height=300,
                        visible=False,
                        elem_id="heatmap",
                        buttons=["fullscreen"],
                    )
                    words = gr.Radio(
                        [], label="Words of the answer: click one to see its map", visible=False, elem_id="words"
                    )
                    explanation = gr.State(None)
                with gr.Column(scale=6, min_width=320):
                    chat = gr.Chatbot(
                        label="Conversation",
                        elem_id="chat",
                        height=440,
                        placeholder="Upload an image, then ask about it.",
                        buttons=["copy"],
                    )
                    instruction = gr.Textbox(
                        label="Instruction",
                        placeholder="What is unusual about this image?",
                        lines=1,
                        max_lines=6,
                        autofocus=True,
                        elem_id="instruction",
                    )
                    with gr.Row(elem_classes="compact-row"):
                        send = gr.Button("Send", variant="primary", scale=2, min_width=70, elem_id="send")
                        stop = gr.Button("Stop", variant="stop", scale=1, min_width=60, elem_id="stop")
                        regen = gr.Button("Regenerate", scale=1, min_width=60, size="md", elem_id="regenerate")
                        undo = gr.Button("Undo", scale=1, min_width=60, size="md", elem_id="undo")
                        clear = gr.Button("Clear", scale=1, min_width=60, size="md", elem_id="clear")
                    with gr.Accordion("Decoding", open=False, elem_id="decoding"):
                        method = gr.Radio([BEAM, SAMPLE], value=BEAM, label="Method")
                        beams = gr.Slider(1, 10, value=d["num_beams"], step=1, label="Beams")
                        length = gr.Slider(-2, 2, value=d["length_penalty"], step=0.1, label="Length penalty")
                        top_p = gr.Slider(0.05, 1.0, value=d["top_p"], step=0.05, label="Top-p", visible=False)
                        temperature = gr.Slider(
                            0.1, 2.0, value=d["temperature"], step=0.05, label="Temperature", visible=False
                        )
                        max_new = gr.Slider(
                            1, 512, value=d["max_new_tokens"], step=1, label="Max new tokens", elem_id="max-new-tokens"
                        )
                        min_new = gr.Slider(
                            0, 64, value=d["min_new_tokens"], step=1, label="Min new tokens", elem_id="min-new-tokens"
                        )
                        repetition = gr.Slider(
                            1.0, 3.0, value=d["repetition_penalty"], step=0.05, label="Repetition penalty"
                        )
            examples = self.examples()
            if examples:
                gr.Examples(examples, inputs=[image, instruction], label="Examples (made by this project)")

            options = [method, beams, max_new, min_new, top_p, temperature, repetition, length]
            method.change(
                lambda m: [gr.update(visible=m == BEAM)] * 2 + [gr.update(visible=m == SAMPLE)] * 2,
                method,
                [beams, length, top_p, temperature],
                queue=False,
                api_visibility="private",
            )
            reply = [chat, instruction, explanation, heat, words]
            ask = dict(
                fn=self.respond,
                inputs=[image, instruction, chat, show_maps, *options],
                outputs=reply,
                api_visibility="undocumented",
                **model_event,
            )
            sent = send.click(api_name="chat", **ask)
            submitted = instruction.submit(api_name=False, **ask)
            regenerated = regen.click(
                self.regenerate, [image, chat, show_maps, *options], reply, api_visibility="private", **model_event
            )
            stop.click(
                self.stop, None, None, cancels=[sent, submitted, regenerated], queue=False, api_visibility="private"
            )
            words.select(self.show_word, [explanation, words], heat, queue=False, api_visibility="private")
            show_maps.change(
                self.toggle_maps, [show_maps, explanation], [heat, words], queue=False, api_visibility="private"
            )
            undo.click(self.undo, chat, [chat, instruction], queue=False, api_visibility="private")
            reset = lambda: (
                [],
                "",
                None,
                gr.update(value=None, visible=False),
                gr.update(choices=[], value=None, visible=False),
            )
            clear.click(reset, None, reply, queue=False, api_visibility="private")
            image.change(reset, None, reply, queue=False, api_visibility="private")  # a new image: a new chat

            # Named API endpoints: image and instruction first, every decoding option defaulted. The options
            # are plain numbers (not the sliders) so that our validator, which names the parameter and its
            # range, judges what an API caller sends.
            with gr.Group(visible=False):
                api_image = ImageInput(label="image", type="filepath", image_mode=None, format="png")
                api_text = gr.Textbox(label="instruction")
                api_options = [gr.Textbox(value=BEAM, label="method")] + [
                    gr.Number(value=d[name], label=name, precision=None)
                    for name in (
                        "num_beams",
                        "max_new_tokens",
                        "min_new_tokens",
                        "top_p",
                        "temperature",
                        "repetition_penalty",
                        "length_penalty",
                    )
                ]
                answer = gr.Textbox(label="answer")
                api_button = gr.Button()
            api_inputs = [api_image, api_text, *api_options]
            api_button.click(self.api_ask, api_inputs, answer, api_name="ask", **model_event)
            api_button.click(self.api_stream, api_inputs, answer, api_name="stream", **model_event)
        self.blocks = demo
        return demo
