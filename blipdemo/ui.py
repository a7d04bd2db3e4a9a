"""The Gradio app: chat about an image, with streamed answers, attention maps, a decoding panel and an API.

This file is the layout and the event handlers; generation itself goes through ``control.Generations`` (stop
switches, disconnects, the thread bridge) to ``gpu.answer`` (the one function that runs on the GPU). One
generation runs at a time per model (``concurrency_limit``); the queue is bounded and the REST API goes through it.

Input is checked in a step of its own before a question is queued (``check``): a bad request shows its message
alone, as a toast, instead of an "Error" badge painted into the chat and the instruction box (which Gradio puts on
every output of an event that raises). For the same reason the chat's generating step never raises: a failure
there gives the turn back and shows its message as a toast.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import gradio as gr
import numpy as np
from PIL import ImageDraw

from . import gpu
from .attention import Explanation, legend_css, lm_attention_modules, paint
from .control import Generations
from .decoding import INSTRUCTBLIP_DEFAULTS, DecodingOptions
from .images import ImageError, load_image
from .prompts import check_template

MAX_INSTRUCTION_CHARS = 4000
BEAM, SAMPLE = "Beam search", "Nucleus sampling"
CONCURRENCY_ID = "model"  # every event that runs the model shares one concurrency group
WHOLE_ANSWER = "Whole answer"
ALL = "All (mean)"  # a map settings' choice: the mean over every layer / head of that hop
METHODS = {"Attention": "attention", "Relevancy (gradients)": "relevancy"}
THUMBNAIL = 160  # px, the longer side of a query's map in the gallery
FAMILY_NAMES = {"instructblip": "InstructBLIP", "blip2": "BLIP-2"}
TEMPLATE_LABEL = 'Wrap as "Question: … Answer:" (off: the prompt goes to the model exactly as typed, e.g. "a photo of")'


CSS = """
#header {margin-bottom: 0}
#banner {background: var(--color-accent-soft); border-radius: 8px; padding: 6px 12px}
.compact-row {gap: 6px; flex-wrap: nowrap}
.compact-row button {padding-left: 4px; padding-right: 4px}
#legend {display: flex; align-items: center; gap: 8px; font-size: var(--text-sm); color: var(--body-text-color-subdued)}
#legend .bar {flex: 0 1 180px; height: 10px; border-radius: 5px; border: 1px solid var(--border-color-primary)}
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


def decoding_options(
    method, beams, max_new_tokens, min_new_tokens, top_p, temperature, repetition, length
) -> DecodingOptions:
    """UI controls → validated ``DecodingOptions`` (ValueError with the parameter's name if out of range)."""
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
    return DecodingOptions.of(options)


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


EARLIER_SEPARATOR = " → "  # "question → answer", one turn per line: how an example's earlier turns read


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


@dataclass
class Shown:
    """What the maps panel shows: an answer's ``Explanation``, the request it answered (to map it again with other
    settings) and the map settings it was made with (``Service.explain``'s map options)."""

    explanation: Explanation
    request: dict  # image, instruction, history, template, max_new_tokens, ids
    selection: dict = field(default_factory=lambda: dict(DEFAULT_SELECTION))


DEFAULT_SELECTION = {
    "method": "attention",
    "qformer_layers": None,
    "qformer_heads": None,
    "lm_layers": None,
    "lm_heads": None,
}


def selection_of(method, qformer_layer, qformer_head, lm_layer, lm_head) -> dict:
    """The map settings' controls → ``Service.explain``'s map options (a choice is 1-based; ALL: None)."""

    def pick(value):
        return None if value in (None, ALL) else [int(value) - 1]

    return {
        "method": METHODS.get(method, "attention"),
        "qformer_layers": pick(qformer_layer),
        "qformer_heads": pick(qformer_head),
        "lm_layers": pick(lm_layer),
        "lm_heads": pick(lm_head),
    }


class Demo:
    """The app around one loaded model; ``build()`` returns the Gradio Blocks."""

    def __init__(
        self, vlm, *, notice: str | None = None, examples_dir: Path | None = None, history_turns: int | None = None
    ) -> None:
        """``history_turns``: earlier turns put before a new question (0: none). None: what the model's config says
        it was trained with (``"blipdemo": {"history_turns": N}``, as the embedded model's), else all that fit."""
        self.vlm = vlm
        if history_turns is None:
            history_turns = (getattr(vlm.config, "blipdemo", None) or {}).get("history_turns")
        self.history_turns = history_turns
        self.notice = notice
        self.examples_dir = examples_dir
        self.blocks: gr.Blocks | None = None
        self.generations = Generations(gpu.register(vlm))

    # ----------------------------------------------------------------------------------------------
    # Checks (in the server process, before anything is queued for the model)
    def _check(self, image, instruction, options: tuple, template=True) -> tuple[object, DecodingOptions]:
        """(upright RGB picture, validated decoding options), or a ``gr.Error`` with a message for the user."""
        if image is None:
            raise gr.Error("Upload an image first (or pick an example below).")
        if not isinstance(instruction, str) or not instruction.strip():
            raise gr.Error("Type a question or an instruction about the image.")
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise gr.Error(
                f"The instruction is too long ({len(instruction):,} characters; at most {MAX_INSTRUCTION_CHARS:,})."
            )
        try:
            check_template(template)
            return load_image(image), decoding_options(*options)
        except (ImageError, ValueError) as e:
            raise gr.Error(str(e)) from e

    async def check(self, image, instruction, *options) -> None:
        """The chat's first step: a bad request stops here, with its message alone (this step has no outputs)."""
        try:
            await anyio.to_thread.run_sync(self._check, image, instruction, options)
        except gr.Error as e:  # a toast renders HTML, and our messages may quote a file's name
            raise gr.Error(html.escape(e.message)) from e

    async def check_regenerate(self, image, chat, *options) -> None:
        """Regenerate's first step: there must be an answer, and the request must still be valid."""
        turns = _turns(chat)
        if not turns:
            raise gr.Error("There is no answer to regenerate yet.")
        await self.check(image, turns[-1][0], *options)

    def _history(self, chat) -> list[tuple[str, str]]:
        history = _turns(chat)
        if self.history_turns is not None:
            history = history[-self.history_turns :] if self.history_turns else []
        return history

    # ----------------------------------------------------------------------------------------------
    # The chat
    async def respond(
        self,
        image,
        instruction,
        chat,
        show_maps,
        template,
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
        """Append the turn, stream the answer into it, then (optionally) its attention maps.

        The decoding options are spelled out because Gradio hands ``request`` (whose session the Stop button and
        a disconnect stop) only to a positional parameter. Nothing here raises: a failure gives the turn back, as
        it was typed, and shows its message.
        """
        options = (method, beams, max_new_tokens, min_new_tokens, top_p, temperature, repetition, length)
        chat = list(chat or [])
        history = self._history(chat)
        question = {"role": "user", "content": instruction}
        unchanged = (gr.skip(), gr.skip(), gr.skip(), gr.skip())
        try:
            pil, opts = await anyio.to_thread.run_sync(self._check, image, instruction, options)
            turn = [*chat, question, {"role": "assistant", "content": ""}]
            yield turn, "", *unchanged
            session = getattr(request, "session_hash", None)
            answers = self.generations.answers(session, image, instruction, history, opts, template, show_maps)
            async for kind, value in answers:
                if kind == "text":  # a new list each time: Gradio diffs what it sent with what comes next
                    turn = [*chat, question, {"role": "assistant", "content": value}]
                    yield turn, "", *unchanged
                else:
                    ids = value.pop("ids")
                    explanation = Explanation(image=pil, **value)
                    request_ = dict(
                        image=image,
                        instruction=instruction,
                        history=history,
                        template=template,
                        max_new_tokens=opts.max_new_tokens,
                        ids=ids,
                    )
                    shown = Shown(explanation, request_)
                    panel = (shown, gr.update(visible=True), explanation.overlay(), self._words(explanation))
                    yield turn, "", *panel
        except gr.Error as e:  # the turn goes back as it was typed; the message shows alone
            gr.Warning(html.escape(e.message), title="Could not answer")
            yield chat, instruction, *unchanged

    @staticmethod
    def _words(explanation: Explanation) -> dict:
        """The answer's words as chips: the whole answer first, then each token."""
        chips = [(WHOLE_ANSWER, -1)] + [(t.strip() or "␣", i) for i, t in enumerate(explanation.tokens)]
        return gr.update(choices=chips, value=-1)

    @staticmethod
    def _token(choice) -> int | None:
        return None if choice in (None, -1) else int(choice)

    def show_word(self, shown: Shown | None, choice):
        """A chip was clicked: that token's map (or the whole answer's) over the image, and the queries it drew on."""
        if shown is None or choice is None:
            return gr.skip(), gr.skip()
        return shown.explanation.overlay(self._token(choice)), self._queries(shown, choice)

    def _queries(self, shown: Shown, choice) -> list:
        """The query gallery: where each query read the picture, ordered by how much the chosen token (or the whole
        answer) drew on it, with that share as the caption."""
        e = shown.explanation
        if e.query_maps is None or e.query_weights is None:
            return []
        token = self._token(choice)
        weights = e.query_weights.mean(0) if token is None else e.query_weights[token]  # (Q,)
        small = e.image.copy()
        small.thumbnail((THUMBNAIL, THUMBNAIL))
        order = np.argsort(-weights, kind="stable")
        return [(paint(small, e.query_maps[q]), f"query {q + 1} · {100 * weights[q]:.0f}%") for q in order]

    def words_here(self, shown: Shown | None, choice, evt: gr.SelectData):
        """The picture was clicked: the words whose maps lie most in the patch under the click (the path backwards,
        ``Explanation.words_in_region``), and that patch outlined on the map."""
        if shown is None or not isinstance(evt.index, list | tuple) or len(evt.index) != 2:
            return gr.skip(), gr.skip()
        e = shown.explanation
        (width, height), (gh, gw) = e.image.size, e.token_maps.shape[1:]
        col = min(max(int(evt.index[0] * gw // width), 0), gw - 1)
        row = min(max(int(evt.index[1] * gh // height), 0), gh - 1)
        box = (col * width / gw, row * height / gh, (col + 1) * width / gw, (row + 1) * height / gh)
        scores = e.words_in_region(box)  # (n_tokens,): the share of each token's map inside the box
        top = float(scores.max()) if len(scores) else 0.0
        words = [(t, round(float(s) / top, 3) if top > 0 else 0.0) for t, s in zip(e.tokens, scores, strict=True)]
        heat = e.overlay(self._token(choice))
        ImageDraw.Draw(heat).rectangle([round(v) for v in box], outline=(255, 255, 255), width=max(2, width // 150))
        return words, heat

    async def follow_settings(self, shown: Shown | None, choice, *controls):
        """A new answer's maps, or map settings changed: remap when the settings differ from how the maps were made
        (one teacher-forced pass on the model, no generation), and show the query gallery."""
        if shown is None:
            return gr.skip(), gr.skip(), gr.skip(), [], None
        selection = selection_of(*controls)
        if selection == shown.selection:
            return gr.skip(), gr.skip(), gr.skip(), self._queries(shown, choice), None
        r = shown.request
        args = (r["image"], r["instruction"], r["history"], r["template"], r["max_new_tokens"], r["ids"], selection)
        try:
            data = await anyio.to_thread.run_sync(lambda: gpu.remap(self.generations.model_key, *args))
        except gr.Error as e:
            gr.Warning(html.escape(e.message), title="Could not make these maps")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        new = Shown(Explanation(image=shown.explanation.image, **data), r, selection)
        return new, new.explanation.overlay(), self._words(new.explanation), self._queries(new, -1), None

    @staticmethod
    def toggle_maps(show: bool, shown):
        """Turning maps off hides them; turning them on shows the last answer's maps (if any)."""
        return gr.update(visible=bool(show and shown is not None))

    async def regenerate(
        self,
        image,
        chat,
        show_maps,
        template,
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
        if not turns:  # checked before (check_regenerate); the chat may have changed since
            return
        options = (method, beams, max_new_tokens, min_new_tokens, top_p, temperature, repetition, length)
        earlier = list(chat)[:-2]
        async for update in self.respond(image, turns[-1][0], earlier, show_maps, template, *options, request=request):
            yield update

    @staticmethod
    def undo(chat):
        """Remove the last turn and put its question back in the box."""
        chat = list(chat or [])
        turns = _turns(chat)
        if not turns:
            return chat, gr.skip()
        return chat[:-2], turns[-1][0]

    def stop(self, request: gr.Request) -> None:
        """The Stop button: ends this session's generations."""
        self.generations.stop(getattr(request, "session_hash", None))

    # ----------------------------------------------------------------------------------------------
    # The API
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
        template=True,
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
            template,
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
        template=True,
        request: gr.Request = None,
    ):
        """/stream: the answer so far, growing as it is generated. ``template`` (BLIP-2): False sends the
        instruction exactly as written, without "Question: … Answer:"."""
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
        _, opts = await anyio.to_thread.run_sync(self._check, image, instruction, options, template)
        session = getattr(request, "session_hash", None)
        async for _, answer in self.generations.answers(session, image, instruction, (), opts, template):
            yield answer

    # ----------------------------------------------------------------------------------------------
    # The layout
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
        """[image path, question, earlier turns as text] per example of the manifest (earlier turns: "" or
        ``earlier_turns_text`` of the example's "history")."""
        if not self.examples_dir or not (self.examples_dir / "examples.json").is_file():
            return []
        manifest = json.loads((self.examples_dir / "examples.json").read_text())
        return [
            [str(self.examples_dir / e["image"]), e["question"], earlier_turns_text(e.get("history", []))]
            for e in manifest
        ]

    @staticmethod
    def new_chat(earlier: str | None = None):
        """A new image starts a new chat — with the earlier turns of the example that brought it, if any — and keeps
        the instruction (an example fills both at once)."""
        chat = [
            {"role": role, "content": text}
            for question, answer in parse_earlier_turns(earlier)
            for role, text in (("user", question), ("assistant", answer))
        ]
        return chat, None, gr.update(visible=False), None, gr.update(choices=[], value=None), "", [], None

    def map_settings(self) -> list:
        """The map settings' controls: the method, and the layer and head of each hop (ALL: their mean)."""
        model = self.vlm.model
        sizes = {
            "Q-Former layer (cross-attention)": len(model.qformer.cross_attention_modules()),
            "Q-Former head": model.config.qformer_config.num_attention_heads,
            "LM layer": len(lm_attention_modules(model.language_model)),
            "LM head": model.config.text_config.num_attention_heads,
        }
        controls = [gr.Radio(list(METHODS), value="Attention", label="Method", elem_id="map-method")]
        for label, size in sizes.items():
            choices = [ALL, *(str(i) for i in range(1, size + 1))]
            elem = "map-" + label.split(" (")[0].lower().replace(" ", "-").replace("q-former", "qformer")
            controls.append(gr.Dropdown(choices, value=ALL, label=label, elem_id=elem))
        return controls

    def build(self, concurrency_limit: int = 1) -> gr.Blocks:
        """The Blocks app; ``concurrency_limit`` generations run at once (1 = one at a time per model)."""
        d = INSTRUCTBLIP_DEFAULTS
        model_event = {"concurrency_limit": concurrency_limit, "concurrency_id": CONCURRENCY_ID}
        private = {"queue": False, "api_visibility": "private"}
        # Checks go through the queue: Gradio shows the message of a failed event only for queued events. They
        # decode the image (bombs are refused from the header), so a few at a time, beside the model's group.
        checking = {"api_visibility": "private", "concurrency_limit": 4, "concurrency_id": "check"}
        follow = {"api_visibility": "private", **model_event}  # a remap runs the model: the model's group
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
                    with gr.Column(visible=False, elem_id="maps") as maps:
                        heat = gr.Image(
                            label="Where the model looked",
                            interactive=False,
                            format="png",  # lossless: the map's colors are data
                            height=300,
                            elem_id="heatmap",
                            buttons=["fullscreen"],
                        )
                        bar = f"background: {legend_css()}, #8c8c8c"  # over a mid gray, as over a photo
                        gr.HTML(f'<div id="legend">attention: low<span class="bar" style="{bar}"></span>high</div>')
                        words = gr.Radio([], label="Words of the answer: click one to see its map", elem_id="words")
                        region = gr.HighlightedText(
                            label="Words that looked here: click the picture above",
                            elem_id="region-words",
                            combine_adjacent=False,
                            show_legend=False,
                        )
                        queries = gr.Gallery(
                            label="Where each query looked, by how much the word drew on it",
                            columns=8,
                            height="auto",
                            allow_preview=False,
                            elem_id="queries",
                        )
                        with gr.Accordion("Map settings", open=False, elem_id="map-settings"):
                            settings = self.map_settings()
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
                    # BLIP-2 was tuned on "Question: … Answer:"; its users also prompt by prefix. InstructBLIP
                    # has no template, so the switch is shown for BLIP-2 only.
                    template = gr.Checkbox(
                        True, label=TEMPLATE_LABEL, visible=self.vlm.family == "blip2", elem_id="template"
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
            # An example's earlier turns (a two-turn chat): shown in the examples' table, put into the chat with the
            # example's image (the image's change handler reads them), then cleared.
            earlier = gr.Textbox(visible=False, label="Earlier in the chat", elem_id="earlier-turns")
            examples = self.examples()
            if examples:
                gr.Examples(
                    examples,
                    inputs=[image, instruction, earlier],
                    label="Examples (made by this project)",
                    elem_id="examples",
                )

            options = [method, beams, max_new, min_new, top_p, temperature, repetition, length]
            method.change(
                lambda m: [gr.update(visible=m == BEAM)] * 2 + [gr.update(visible=m == SAMPLE)] * 2,
                method,
                [beams, length, top_p, temperature],
                **private,
            )
            reply = [chat, instruction, explanation, maps, heat, words]
            answering = []
            for trigger, api_name in ((send.click, "chat"), (instruction.submit, False)):
                checked = trigger(self.check, [image, instruction, *options], None, **checking)
                answering.append(
                    checked.success(
                        self.respond,
                        [image, instruction, chat, show_maps, template, *options],
                        reply,
                        api_name=api_name,
                        api_visibility="undocumented",
                        **model_event,
                    )
                )
            regen_checked = regen.click(self.check_regenerate, [image, chat, *options], None, **checking)
            answering.append(
                regen_checked.success(
                    self.regenerate,
                    [image, chat, show_maps, template, *options],
                    reply,
                    api_visibility="private",
                    **model_event,
                )
            )
            stop.click(self.stop, None, None, cancels=answering, **private)
            words.select(self.show_word, [explanation, words], [heat, queries], **private)
            heat.select(self.words_here, [explanation, words], [region, heat], **private)
            # After an answer (its maps made with the default settings), and when a setting changes: the maps as the
            # settings say, and the query gallery. (Chained, not on the State's change: its value holds arrays.)
            remapped = [explanation, heat, words, queries, region]
            for event in [*answering, *(control.change for control in settings)]:
                then = event.then if hasattr(event, "then") else event
                then(self.follow_settings, [explanation, words, *settings], remapped, **follow)
            show_maps.change(self.toggle_maps, [show_maps, explanation], maps, **private)
            undo.click(self.undo, chat, [chat, instruction], **private)
            fresh = [chat, explanation, maps, heat, words, earlier, queries, region]
            image.change(self.new_chat, earlier, fresh, **private)
            clear.click(lambda: ("", *self.new_chat()), None, [instruction, *fresh], **private)

            # Named API endpoints: image and instruction first, every other parameter defaulted. The options are
            # plain numbers (not the sliders) so that our validator, which names the parameter and its range,
            # judges what an API caller sends.
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
                api_template = gr.Checkbox(value=True, label="template")
                answer = gr.Textbox(label="answer")
                api_button = gr.Button()
            api_inputs = [api_image, api_text, *api_options, api_template]
            api_button.click(self.api_ask, api_inputs, answer, api_name="ask", **model_event)
            api_button.click(self.api_stream, api_inputs, answer, api_name="stream", **model_event)
        self.blocks = self.generations.blocks = demo
        return demo
