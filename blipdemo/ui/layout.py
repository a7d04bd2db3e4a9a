"""The page: its layout, and which handler each control's event runs (``chat.Chat``, ``maps.MapsPanel``).

The chat comes first: the picture, then the chat and the instruction box (beside the picture on a wide screen, right
under it on a phone). Maps show only once an answer has some: its words under the chat, and the explorer (the map,
the words under a click, the query gallery, the map settings) as a section of its own below, opened by a word or
"Show maps". The examples come last.

One model, one concurrency group: every event that runs the model shares it (``concurrency_limit`` at once); the
checks run in a group of their own beside it, so a bad request is told at once. The queue is bounded and the REST
API goes through it.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from ..control import Generations
from ..decoding import INSTRUCTBLIP_DEFAULTS
from ..feedback import FeedbackLog
from ..gpu import register
from ..heatmap import legend_css
from . import sessions
from .chat import BEAM, SAMPLE, Chat, earlier_turns_text, parse_earlier_turns
from .conversations import new_id
from .feedback import FEEDBACK_OPTIONS, Ratings
from .look import LABEL as LOOK_LABEL
from .maps import ALL, METHODS, SHOW_MAPS, MapsPanel, shown_only_with
from .pictures import with_picture
from .sidepanel import SidePanel

# Where the browser keeps the visitor's conversations (localStorage), and the key Gradio encrypts them with there: a
# fixed one, so that they can still be read after the app restarts (a random one each start would lose them all).
BROWSER_KEY, BROWSER_SECRET = "blipdemo-conversations", "blipdemo-conversations-v1"
NO_EARLIER_TURNS = "—"  # an example with no earlier turns (its table cell); see ``Demo.examples``
CONCURRENCY_ID = "model"  # every event that runs the model shares one concurrency group
FAMILY_NAMES = {"instructblip": "InstructBLIP", "blip2": "BLIP-2"}
LOOK_CLOSER_LABEL = "Look closer"
LOOK_CLOSER_INFO = (
    "For a small detail in a large photo: the model finds where to look with its own attention, zooms in there "
    "and answers from the zoomed part (a little slower)."
)
TEMPLATE_LABEL = 'Wrap as "Question: … Answer:" (off: the prompt goes to the model exactly as typed, e.g. "a photo of")'


CSS = """
#header {margin-bottom: 0}
#banner {background: var(--color-accent-soft); border-radius: 8px; padding: 6px 12px}
.compact-row {gap: 6px; flex-wrap: nowrap}
.compact-row button {padding-left: 4px; padding-right: 4px}
#legend {display: flex; align-items: center; gap: 8px; font-size: var(--text-sm); color: var(--body-text-color-subdued)}
#legend .bar {flex: 0 1 180px; height: 10px; border-radius: 5px; border: 1px solid var(--border-color-primary)}
#answer-maps {gap: 6px}
#words label {padding: 4px 10px}
/* The query gallery: as many columns as fit (Gradio's fixed count overflows a narrow column), no blank below. */
#queries .grid-container {grid-template-columns: repeat(auto-fill, minmax(84px, 1fr))}
#queries .fixed-height {min-height: 0}
/* A picture that joined the chat: a thumbnail, enough to tell which picture the turns below it are about. */
#chat .user-row .component {max-width: 120px; min-height: 0}
#chat .user-row .component img {max-height: 96px; width: auto; object-fit: contain}
@media (max-width: 640px) {
  .compact-row {flex-wrap: wrap}
  .compact-row button {min-width: 30% !important; flex: 1 1 30% !important}
  #chat {height: 240px !important}  /* the instruction box on the first screen, under the picture and the chat */
}
"""


# After the explorer opens: bring its map into view, scrolling no more than that takes (on a wide screen the word
# chips above often stay in view too). Nothing happens when the explorer was closed instead.
SCROLL_TO_MAP = "() => document.querySelector('#heatmap')?.scrollIntoView({block: 'nearest', behavior: 'smooth'})"
# The instruction box takes the focus on a wide screen only: on a phone, focus would scroll the picture away and open
# the keyboard before the visitor has seen the page.
FOCUS_ON_WIDE_SCREENS = """() => {
  if (window.innerWidth > 640) document.querySelector('#instruction textarea')?.focus({preventScroll: true});
}"""

# Esc stops the answer being made (as Stop does), wherever the focus is: people reach for it in every chat app.
# Enter sends and Shift+Enter makes a new line already (Gradio's Textbox with lines=1, max_lines > 1).
ESCAPE_STOPS = """() => {
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && !e.isComposing) document.querySelector('#stop')?.click();
  });
}"""


class ImageInput(gr.Image):
    """gr.Image that hands over the uploaded file untouched: our loader (``images.load_image``) opens it, with
    clear messages for damaged files, SVGs and decompression bombs, EXIF rotation and 16-bit scaling."""

    is_template = True  # rendered by the frontend as a plain gr.Image

    def preprocess(self, payload):
        if payload is None or (payload.url and payload.url.startswith("data:")) or payload.path is None:
            return super().preprocess(payload)
        return payload.path


class Demo:
    """The app around one loaded model; ``build()`` returns the Gradio Blocks."""

    def __init__(
        self,
        vlm,
        *,
        notice: str | None = None,
        examples_dir: Path | None = None,
        history_turns: int | None = None,
        feedback_dir: str | Path | None = None,
    ) -> None:
        """``history_turns``: earlier turns put before a new question (0: none). None: what the model's config says
        it was trained with (``"blipdemo": {"history_turns": N}``, as the embedded model's), else all that fit.
        ``feedback_dir``: where ratings are logged (``blipdemo.feedback``); None: no rating buttons."""
        self.vlm = vlm
        if history_turns is None:
            history_turns = (getattr(vlm.config, "blipdemo", None) or {}).get("history_turns")
        self.notice = notice
        self.examples_dir = examples_dir
        self.blocks: gr.Blocks | None = None
        self.generations = Generations(register(vlm))
        self.panel = MapsPanel(vlm, self.generations)
        self.chat = Chat(vlm, self.generations, self.panel, history_turns)
        self.ratings = Ratings(FeedbackLog(feedback_dir), self.model_name()) if feedback_dir else None
        self.side = SidePanel(self.model_name())

    def model_name(self) -> str:
        """The served checkpoint's name (a local folder: its last part, not the server's file system layout)."""
        name = str(self.vlm.load_info.get("name", "?"))
        return Path(name).name if Path(name).is_dir() else name

    def header(self) -> str:
        info = self.vlm.load_info
        quant = info.get("quantization") or "no quantization"
        if info.get("quantization_backend"):
            quant += " (PyTorch CPU kernels)" if info["quantization_backend"] == "torch" else " (bitsandbytes)"
        device_map = info.get("device_map")
        if device_map:
            devices = sorted({str(d) for d in device_map.values()})
            where = f"device map over {', '.join(devices)}"
        else:
            where = f"on {info.get('device', 'cpu')}"
        name = self.model_name()
        return (
            f"### Chat about an image with `{name}`\n"
            f"{FAMILY_NAMES[self.vlm.family]} · {info.get('dtype')} · {quant} · {where}"
        )

    def examples(self) -> list[list[str]]:
        """[image path, question, earlier turns as text] per example of the manifest (earlier turns:
        ``earlier_turns_text`` of the example's "history", or NO_EARLIER_TURNS: never empty, which tells the picture's
        change handler that an example, not an upload, brought the picture)."""
        if not self.examples_dir or not (self.examples_dir / "examples.json").is_file():
            return []
        manifest = json.loads((self.examples_dir / "examples.json").read_text())
        return [
            [
                str(self.examples_dir / e["image"]),
                e["question"],
                earlier_turns_text(e.get("history", [])) or NO_EARLIER_TURNS,
            ]
            for e in manifest
        ]

    @staticmethod
    def new_chat(earlier: str | None = None, picture: dict | None = None):
        """A new chat — with ``picture`` (a picture message) and then the earlier turns of the example that brought
        it, if any — keeping the instruction (an example fills both at once); the last answer's maps go, and the
        explorer closes; a new conversation id (what the browser keeps it under)."""
        chat = [picture] if picture else []
        chat += [
            {"role": role, "content": text}
            for question, answer in parse_earlier_turns(earlier)
            for role, text in (("user", question), ("assistant", answer))
        ]
        hidden = gr.update(visible=False)
        empty = shown_only_with(None)
        words = gr.update(choices=[], value=None)
        return chat, None, hidden, None, words, "", empty, empty, hidden, SHOW_MAPS, hidden, new_id()

    async def picture_changed(self, image, chat, earlier):
        """The picture changed. From an example (``earlier`` is set, if only to NO_EARLIER_TURNS): a new chat, as
        the example shows it. Otherwise (an upload, a paste, the webcam): the picture joins this chat, the turns
        before it kept on screen but no longer the model's history, and the last answer's maps go (they are about
        the other picture). Removed, or unreadable: the chat stays as it is (Send says what is wrong)."""
        if earlier:
            chat = await with_picture([], image)
            return self.new_chat(earlier, chat[0] if chat else None)
        joined = await with_picture(chat, image)
        if joined is None:
            return (gr.skip(),) * 12
        return joined, *self.new_chat()[1:-1], gr.skip()  # the same conversation

    async def clear(self, image):
        """Clear: a new chat about the current picture, the instruction box emptied."""
        chat = await with_picture([], image)
        return "", *self.new_chat(None, chat[0] if chat else None)

    def map_settings(self) -> list:
        """The map settings' controls: the method, and the layer and head of each hop (ALL: their mean)."""
        controls = [gr.Radio(list(METHODS), value="Attention", label="Method", elem_id="map-method")]
        for label, size in self.panel.sizes().items():
            choices = [ALL, *(str(i) for i in range(1, size + 1))]
            elem = "map-" + label.split(" (")[0].lower().replace(" ", "-").replace("q-former", "qformer")
            controls.append(gr.Dropdown(choices, value=ALL, label=label, elem_id=elem))
        return controls

    def build(self, concurrency_limit: int = 1) -> gr.Blocks:
        """The Blocks app; ``concurrency_limit`` generations run at once (1 = one at a time per model)."""
        d = INSTRUCTBLIP_DEFAULTS
        c, p = self.chat, self.panel
        model_event = {"concurrency_limit": concurrency_limit, "concurrency_id": CONCURRENCY_ID}
        model_private = {"api_visibility": "private", **model_event}  # runs the model: the model's group
        private = {"queue": False, "api_visibility": "private"}
        # Painting runs in a worker thread; queued, so that a slow paint never holds the event loop's HTTP handler.
        private_queued = {"api_visibility": "private", "concurrency_limit": 4, "concurrency_id": "paint"}
        # Checks go through the queue: Gradio shows the message of a failed event only for queued events. They
        # decode the image (bombs are refused from the header), so a few at a time, beside the model's group.
        checking = {"api_visibility": "private", "concurrency_limit": 4, "concurrency_id": "check"}
        with sessions.Blocks(title="blipdemo — chat about an image") as demo:
            # The visitor's conversations, kept in their browser (nothing on the server): see ui/conversations.py.
            kept = gr.BrowserState([], storage_key=BROWSER_KEY, secret=BROWSER_SECRET)
            conversation = gr.State(new_id)  # the id the chat on screen is kept under
            with gr.Sidebar(label="Conversations", open=False, elem_id="side"):
                gr.Markdown("### Conversations\nKept in this browser only.", elem_id="side-title")
                listed = gr.Radio([], label="Open one", elem_id="conversations")
                delete = gr.Button("Delete the chosen one", size="sm", elem_id="delete-conversation")
                export = gr.DownloadButton("Export this chat", size="sm", elem_id="export")
                importer = gr.UploadButton(
                    "Import a chat", file_types=[".json"], type="filepath", size="sm", elem_id="import"
                )
            gr.Markdown(self.header(), elem_id="header")
            if self.notice:
                gr.Markdown(self.notice, elem_id="banner")
            # The picture, then the chat: beside each other on a wide screen, one above the other on a phone (a Row
            # wraps its columns there). Everything about maps waits below, until an answer has some.
            with gr.Row(equal_height=False, elem_id="ask"):
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
                with gr.Column(scale=6, min_width=320):
                    chat = gr.Chatbot(
                        label="Conversation",
                        elem_id="chat",
                        height=400,
                        placeholder="Upload an image or pick an example below, then ask about it.",
                        buttons=["copy", "copy_all"],  # an answer's text; the whole conversation
                        editable="user",  # a question edited is answered again (``Chat.answer_edit``)
                        # One bubble per message: a picture message beside a question would join its bubble, and
                        # Gradio's edit mode cannot hold a picture (it edits text only).
                        group_consecutive_messages=False,
                        feedback_options=FEEDBACK_OPTIONS,  # shown only with a rating log (``chat.like`` below)
                    )
                    instruction = gr.Textbox(
                        label="Instruction",
                        placeholder="What is unusual about this image?",
                        lines=1,
                        max_lines=6,
                        elem_id="instruction",
                    )
                    # BLIP-2 was tuned on "Question: … Answer:"; its users also prompt by prefix. InstructBLIP
                    # has no template, so the switch is shown for BLIP-2 only.
                    template = gr.Checkbox(
                        True, label=TEMPLATE_LABEL, visible=self.vlm.family == "blip2", elem_id="template"
                    )
                    look = gr.Checkbox(False, label=LOOK_CLOSER_LABEL, info=LOOK_CLOSER_INFO, elem_id="look-closer")
                    with gr.Row(elem_classes="compact-row"):
                        send = gr.Button("Send", variant="primary", scale=2, min_width=70, elem_id="send")
                        stop = gr.Button("Stop", variant="stop", scale=1, min_width=60, elem_id="stop")
                        regen = gr.Button("Regenerate", scale=1, min_width=60, size="md", elem_id="regenerate")
                        undo = gr.Button("Undo", scale=1, min_width=60, size="md", elem_id="undo")
                        clear = gr.Button("Clear", scale=1, min_width=60, size="md", elem_id="clear")
                    # Where a look-closer answer looked: the picture with the box, and the crop (after the answer).
                    closer = gr.Image(
                        label=LOOK_LABEL,
                        interactive=False,
                        visible=False,
                        format="png",
                        height=240,
                        elem_id="looked-closer",
                        buttons=["fullscreen"],
                    )
                    # The way into the maps, shown once an answer has them: its words (a click opens that word's
                    # map in the explorer below) and a button that opens or closes the explorer.
                    with gr.Column(visible=False, elem_id="answer-maps") as entry:
                        words = gr.Radio(
                            [], label="Where did the model look? Click a word of the answer", elem_id="words"
                        )
                        open_maps = gr.Button(SHOW_MAPS, size="sm", elem_id="open-maps")
                    show_maps = gr.Checkbox(
                        True, label="Map where the model looked, with each answer", elem_id="show-maps"
                    )
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
            # The explorer: a section of its own below the chat, opened by a word chip or "Show maps". The words
            # under a click and the query gallery appear only with something to show (``maps.shown_only_with``).
            with gr.Column(visible=False, elem_id="maps") as explorer:
                gr.Markdown("### Where the model looked", elem_id="maps-title")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4, min_width=300):
                        heat = gr.Image(
                            label="The map: click it to see which words looked there",
                            interactive=False,
                            format="png",  # lossless: the map's colors are data
                            height=340,
                            elem_id="heatmap",
                            buttons=["fullscreen"],
                        )
                        bar = f"background: {legend_css()}, #8c8c8c"  # over a mid gray, as over a photo
                        gr.HTML(f'<div id="legend">attention: low<span class="bar" style="{bar}"></span>high</div>')
                    with gr.Column(scale=6, min_width=300):
                        region = gr.HighlightedText(
                            label="Words that looked at the outlined patch",
                            elem_id="region-words",
                            combine_adjacent=False,
                            show_legend=False,
                            visible=False,
                        )
                        queries = gr.Gallery(
                            label="Where each query (#) looked, and how much the word drew on it (%)",
                            columns=8,
                            height="auto",
                            allow_preview=False,
                            elem_id="queries",
                            visible=False,
                        )
                        with gr.Accordion("Map settings", open=False, elem_id="map-settings"):
                            settings = self.map_settings()
            explanation = gr.State(None)  # the shown answer (maps.Shown)
            asked = gr.State(None)  # the question a check made, for the step that answers it
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
            # chat.Chat.respond's outputs: the chat, the box, maps.MapsPanel.outputs, the checked question (emptied)
            reply = [chat, instruction, explanation, entry, heat, words, queries, region, asked, closer]
            # Each question is checked first (a toast at once if it is bad), then answered from the checked value.
            settings_inputs = [show_maps, template, look, *options, *settings]
            steps = [
                (send.click, c.check, [image, instruction, chat, *settings_inputs], c.respond),
                (instruction.submit, c.check, [image, instruction, chat, *settings_inputs], c.respond),
                (regen.click, c.check_regenerate, [image, chat, *settings_inputs], c.regenerate),
                (chat.edit, c.check_edit, [image, chat, *settings_inputs], c.answer_edit),
            ]
            answering = [
                trigger(check, inputs, asked, **checking).success(answer, [asked, chat], reply, **model_private)
                for trigger, check, inputs, answer in steps
            ]
            words.select(p.show_word, [explanation, words], [heat, queries], **private_queued)
            words.select(p.open_explorer, None, [explorer, open_maps], **private).then(None, js=SCROLL_TO_MAP)
            open_maps.click(p.toggle_explorer, open_maps, [explorer, open_maps], **private).then(None, js=SCROLL_TO_MAP)
            heat.select(p.words_here, [explanation, words], [region, heat], **private_queued)
            remapped = [explanation, heat, words, queries, region]
            remaps = [
                control.change(p.follow_settings, [explanation, words, *settings], remapped, **model_private)
                for control in settings
            ]
            stop.click(c.stop, None, None, cancels=answering + remaps, **private)
            show_maps.change(p.toggle, [show_maps, explanation], [entry, explorer, open_maps], **private)
            undone = undo.click(c.undo, chat, [chat, instruction], **private)
            undone.then(lambda: gr.update(visible=False, value=None), None, closer, **private)  # its look goes too
            if self.ratings is not None:  # Gradio shows the rating buttons only to a chat with a like listener
                chat.like(self.ratings.rate, [chat, image], None, **checking)
            demo.load(None, js=FOCUS_ON_WIDE_SCREENS)
            demo.load(None, js=ESCAPE_STOPS)
            fresh = [chat, explanation, entry, heat, words, earlier, queries, region, explorer, open_maps, closer]
            fresh.append(conversation)  # last: ``fresh[1:-1]`` is what a newly opened conversation resets
            # Decoding the picture: in the checks' group (a worker thread), not on the event loop.
            image.change(self.picture_changed, [image, chat, earlier], fresh, **checking)
            clear.click(self.clear, image, [instruction, *fresh], **checking)
            # The chat's own trash button too: a new conversation, so that the kept one is not overwritten by the next.
            chat.clear(self.clear, image, [instruction, *fresh], **checking)

            # Keeping: after every change of a chat's turns, the browser's list and the Export button's file.
            keep = {"fn": self.side.keep, "inputs": [kept, conversation, chat], "outputs": [kept, listed, export]}
            for step in [*answering, undone]:
                step.then(**keep, **checking)
            demo.load(self.side.listed, kept, listed, **private)
            opened = [image, chat, conversation]
            listed.select(self.side.open, [kept, listed], opened, **checking).then(
                lambda: self.new_chat()[1:-1], None, fresh[1:-1], **private
            )
            delete.click(self.side.delete, [kept, listed, conversation], [kept, listed, conversation], **private)
            importer.upload(self.side.load, importer, opened, **checking).then(
                lambda: self.new_chat()[1:-1], None, fresh[1:-1], **private
            ).then(**keep, **checking)

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
            api_button.click(c.api_ask, api_inputs, answer, api_name="ask", **model_event)
            api_button.click(c.api_stream, api_inputs, answer, api_name="stream", **model_event)
            # The page's chat turn in one call (what Send does after its check), for API clients and load tests.
            api_button.click(
                c.api_chat,
                [image, instruction, chat, *settings_inputs],
                reply,
                api_name="chat",
                api_visibility="undocumented",
                **model_event,
            )
        self.blocks = self.generations.blocks = demo
        return demo
