"""The maps panel: where the model looked, per word of the answer, and the paths from a word to the picture and back.

An answer's maps are made once, with the panel's settings at the time of the question (they are part of the
``Question``); changing a setting afterwards remaps that answer (``Generations.remap``: one teacher-forced pass, no
generation, under a run id that Stop reaches). Everything painted here — the overlay, the query gallery — is painted
in a worker thread, never on the event loop that every visitor shares, and at the size the page shows it
(``DISPLAY_SIDE``): a 12-megapixel photo costs no more than a small one. The map data stays whole on the
``Explanation``.

On the page (``layout``) the panel has two parts: under the chat, once an answer has maps, its words as chips and a
"Show maps" button (the entry); below the chat, the explorer they open (the map, the words under a click, the query
gallery, the map settings). Nothing is shown before it has content: the words under a click appear after a click,
the gallery when the model has query maps.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, replace

import anyio
import gradio as gr
import numpy as np
from PIL import ImageDraw

from ..attention import Explanation, lm_attention_modules, map_selection
from ..control import Generations
from ..heatmap import paint
from ..look_closer import Crop
from ..question import Question

WHOLE_ANSWER = "Whole answer"
ALL = "All (mean)"  # a map settings' choice: the mean over every layer / head of that hop
METHODS = {"Attention": "attention", "Relevancy (gradients)": "relevancy"}
THUMBNAIL = 160  # px, the longer side of a query's map in the gallery
DISPLAY_SIDE = 800  # px, the longer side of the painted overlay: the page shows it at a few hundred pixels
SHOW_MAPS, HIDE_MAPS = "Show maps", "Hide maps"  # the explorer's button, as it reads when the explorer is closed/open


@dataclass(frozen=True)
class Shown:
    """What the maps panel shows: the question answered (its ``maps`` say how the maps were made), the answer's token
    ids (to map it again with other settings) and its ``Explanation``."""

    question: Question
    ids: list[int]
    explanation: Explanation

    @classmethod
    def of(cls, vlm, question: Question, ids: list[int], explanation: Explanation, crop: Crop | None = None) -> Shown:
        """An explanation as ``gpu`` gives it (without its picture) joined to a light copy of the question's picture
        (``Service.kept``: at the size the page shows, with the model's input for remaps). Gradio keeps a closed
        session's values for an hour: the full upload is not among them. ``crop``: where a look-closer answer looked
        (``gpu``'s light copy): a remap maps the answer from that same crop. Some CPU work: call it in a worker
        thread."""
        question = replace(question, picture=vlm.kept(question.picture, DISPLAY_SIDE), crop=crop or question.crop)
        return cls(question, ids, replace(explanation, image=question.picture.image))


def _token(choice) -> int | None:
    return None if choice in (None, -1) else int(choice)


def word_chips(explanation: Explanation) -> dict:
    """The answer's words as chips: the whole answer first, then each token. None is chosen (the map shows the whole
    answer meanwhile): a chip that is already chosen sends no event when clicked, and every chip opens the explorer."""
    chips = [(WHOLE_ANSWER, -1)] + [(t.strip() or "␣", i) for i, t in enumerate(explanation.tokens)]
    return gr.update(choices=chips, value=None)


def shown_only_with(value) -> dict:
    """An update that shows a component only when it has something to show (an empty list or None hides it)."""
    return gr.update(value=value, visible=value is not None and len(value) > 0)


def query_gallery(explanation: Explanation, choice) -> list:
    """Where each query read the picture, ordered by how much the chosen token (or the whole answer) drew on it, with
    that share as the caption."""
    e = explanation
    if e.query_maps is None or e.query_weights is None:
        return []
    token = _token(choice)
    weights = e.query_weights.mean(0) if token is None else e.query_weights[token]  # (Q,)
    small = e.image.copy()
    small.thumbnail((THUMBNAIL, THUMBNAIL))
    order = np.argsort(-weights, kind="stable")
    # "#3 · 12%": short enough to stay whole on a phone's thumbnail (the gallery's label says what the numbers are)
    return [(paint(small, e.query_maps[q]), f"#{q + 1} · {100 * weights[q]:.0f}%") for q in order]


class MapsPanel:
    """The maps panel's handlers around one served model (``vlm``) and its runs (``generations``)."""

    # What ``show`` fills, in this order (the layout wires the components so): the shown answer (a State), the
    # entry's visibility (the word chips and the "Show maps" button), the overlay, the word chips, the query gallery,
    # the words under a click.
    outputs = ("shown", "panel", "heat", "words", "queries", "region")

    def __init__(self, vlm, generations: Generations) -> None:
        self.vlm = vlm
        self.generations = generations

    def sizes(self) -> dict[str, int]:
        """How many layers and heads each hop has: the map settings' choices."""
        model = self.vlm.model
        return {
            "Q-Former layer (cross-attention)": len(model.qformer.cross_attention_modules()),
            "Q-Former head": model.config.qformer_config.num_attention_heads,
            "LM layer": len(lm_attention_modules(model.language_model)),
            "LM head": model.config.text_config.num_attention_heads,
        }

    @staticmethod
    def selection(method, qformer_layer, qformer_head, lm_layer, lm_head) -> dict:
        """The map settings' values → ``attention.map_selection``'s options (a choice is 1-based; ALL: None)."""

        def pick(value):
            return None if value in (None, ALL) else [int(value) - 1]

        return {
            "method": METHODS.get(method, "attention"),
            "qformer_layers": pick(qformer_layer),
            "qformer_heads": pick(qformer_head),
            "lm_layers": pick(lm_layer),
            "lm_heads": pick(lm_head),
        }

    async def show(
        self, question: Question, ids: list[int], explanation: Explanation, crop: Crop | None = None
    ) -> tuple:
        """A new answer's maps (``crop``: where it looked closer, if it did): the panel's outputs (see ``outputs``),
        painted in a worker thread."""

        def paint_all():
            shown = Shown.of(self.vlm, question, ids, explanation, crop)
            e = shown.explanation
            gallery = shown_only_with(query_gallery(e, -1))
            return shown, gr.update(visible=True), e.overlay(max_side=DISPLAY_SIDE), word_chips(e), gallery

        return (*(await anyio.to_thread.run_sync(paint_all)), shown_only_with(None))

    async def show_word(self, shown: Shown | None, choice):
        """A chip was clicked: that token's map (or the whole answer's) over the image, and the queries it drew on."""
        if shown is None or choice is None:
            return gr.skip(), gr.skip()
        e = shown.explanation
        return await anyio.to_thread.run_sync(
            lambda: (e.overlay(_token(choice), max_side=DISPLAY_SIDE), shown_only_with(query_gallery(e, choice)))
        )

    async def words_here(self, shown: Shown | None, choice, evt: gr.SelectData):
        """The picture was clicked: the words whose maps lie most in the patch under the click (the path backwards,
        ``Explanation.words_in_region``), and that patch outlined on the map."""
        if shown is None or not isinstance(evt.index, list | tuple) or len(evt.index) != 2:
            return gr.skip(), gr.skip()
        return await anyio.to_thread.run_sync(self._words_at, shown.explanation, _token(choice), *evt.index)

    @staticmethod
    def _words_at(e: Explanation, token: int | None, x: float, y: float):
        heat = e.overlay(token, max_side=DISPLAY_SIDE)  # what the page shows: the click is in its pixels
        (shown_w, shown_h), (width, height), (gh, gw) = heat.size, e.image.size, e.token_maps.shape[1:]
        col = min(max(int(x * gw // shown_w), 0), gw - 1)
        row = min(max(int(y * gh // shown_h), 0), gh - 1)
        box = (col * width / gw, row * height / gh, (col + 1) * width / gw, (row + 1) * height / gh)  # image pixels
        scores = e.words_in_region(box)  # (n_tokens,): the share of each token's map inside the box
        top = float(scores.max()) if len(scores) else 0.0
        words = [(t, round(float(s) / top, 3) if top > 0 else 0.0) for t, s in zip(e.tokens, scores, strict=True)]
        outline = (col * shown_w / gw, row * shown_h / gh, (col + 1) * shown_w / gw, (row + 1) * shown_h / gh)
        line = max(2, shown_w // 150)
        ImageDraw.Draw(heat).rectangle([round(v) for v in outline], outline=(255, 255, 255), width=line)
        return shown_only_with(words), heat

    async def follow_settings(self, shown: Shown | None, choice, *controls, request: gr.Request = None):
        """The map settings changed: the shown answer mapped again as they say (one teacher-forced pass on the model,
        no generation), unless its maps were made so already."""
        skip = (gr.skip(),) * 5
        if shown is None:
            return skip
        try:
            selection = map_selection(self.vlm.model, **self.selection(*controls))
        except ValueError as e:
            gr.Warning(html.escape(str(e)), title="Could not make these maps")
            return skip
        if selection == shown.question.maps:
            return skip
        question = replace(shown.question, maps=selection)
        session = getattr(request, "session_hash", None)
        try:
            explanation = await self.generations.remap(session, question, shown.ids)
        except gr.Error as e:
            gr.Warning(html.escape(e.message), title="Could not make these maps")
            return skip
        if explanation is None:  # stopped
            return skip

        def paint_all():
            new = Shown.of(self.vlm, question, shown.ids, explanation)
            e = new.explanation
            gallery = shown_only_with(query_gallery(e, -1))
            return new, e.overlay(max_side=DISPLAY_SIDE), word_chips(e), gallery, shown_only_with(None)

        return await anyio.to_thread.run_sync(paint_all)

    @staticmethod
    def toggle(show: bool, shown: Shown | None) -> tuple:
        """Turning maps off hides them (the entry and the explorer); turning them on shows the last answer's word
        chips again (if any), the explorer staying closed until they are clicked."""
        closed = (gr.update(visible=False), SHOW_MAPS)
        return gr.update(visible=bool(show and shown is not None)), *(closed if not show else (gr.skip(), gr.skip()))

    @staticmethod
    def open_explorer() -> tuple:
        """A word chip was clicked: the explorer opens (its map follows from ``show_word``)."""
        return gr.update(visible=True), HIDE_MAPS

    @staticmethod
    def toggle_explorer(label: str) -> tuple:
        """The "Show maps" / "Hide maps" button: opens or closes the explorer (``label``: what the button read)."""
        opening = label != HIDE_MAPS
        return gr.update(visible=opening), HIDE_MAPS if opening else SHOW_MAPS
