"""Version 3 of the shapes world, small details: a Version 1 scene pasted, whole, into a canvas 3 to 6 times larger.

What a model must find before it can answer: at the model's input size the objects are 3 to 6 times smaller than in
Version 1. These pictures judge look-closer (``benchmarks/look_closer.py``, the tests); they are never used for
training (``train.py`` does not import this module), so a model that answers them found the small scene itself.

- the scene: drawn by ``scenes.render`` (every Version 1 rule), 224×224;
- the canvas: square, side L drawn from 672 to 1344, filled with the scene's own background gray; the scene pasted at a
  position drawn uniformly among those where it fits entirely;
- delivered at size L, as PNG or JPEG (quality 85 to 100), as a user would upload it;
- questions: the Version 1 families ``color``, ``shape``, ``count`` and ``exists``, worded and answered as there.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image

from . import scenes

FAMILIES = ("color", "shape", "count", "exists")
CANVAS_RANGE = (3 * scenes.SIZE, 6 * scenes.SIZE)  # 672 .. 1344 px, inclusive


@dataclass(frozen=True)
class SmallDetail:
    """One Version 3 picture: the full-size image, its scene, and where the scene lies in it."""

    image: Image.Image
    scene: scenes.Scene
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the pasted 224-px scene in the canvas, x1/y1 exclusive

    @property
    def side(self) -> int:
        """L: the canvas side in pixels."""
        return self.image.size[0]


def _encode(image: Image.Image, rng: random.Random) -> Image.Image:
    """A PNG or JPEG (quality 85..100) round trip, as an upload delivers the picture."""
    buffer = io.BytesIO()
    if rng.random() < 0.5:
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=rng.randint(85, 100), subsampling=rng.choice((0, 2)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def small_detail(rng: random.Random, scene: scenes.Scene | None = None, side: int | None = None) -> SmallDetail:
    """A Version 3 picture: ``scene`` (random when None) pasted into a canvas of ``side`` px (random in 672..1344)."""
    scene = scene or scenes.sample_scene(rng)
    side = rng.randint(*CANVAS_RANGE) if side is None else side
    if not CANVAS_RANGE[0] <= side <= CANVAS_RANGE[1]:
        raise ValueError(f"side must be in {CANVAS_RANGE[0]}..{CANVAS_RANGE[1]}, got {side}")
    small = scenes.render(scene, rng)
    canvas = Image.new("RGB", (side, side), (scene.background,) * 3)
    x0, y0 = rng.randint(0, side - scenes.SIZE), rng.randint(0, side - scenes.SIZE)
    canvas.paste(small, (x0, y0))
    return SmallDetail(_encode(canvas, rng), scene, (x0, y0, x0 + scenes.SIZE, y0 + scenes.SIZE))


def question(detail: SmallDetail, family: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of a Version 3 family about the picture's small scene, worded as in Version 1."""
    if family not in FAMILIES:
        raise ValueError(f"Version 3 families are {FAMILIES}, got {family!r}")
    return scenes.ask(detail.scene, family, rng)
