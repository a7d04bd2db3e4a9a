"""Shapes scenes: the training-side renderer and question generator (described in docs/scenes.md).

The tiny model is judged on scenes drawn by renderers it never saw, so this module samples the
spec's whole range rather than one renderer's habits: every background level, the full ±20 color
jitter, every box size and center offset, anti-aliased and hard-edged drawing (with sub-pixel
placement when anti-aliased), PNG/JPEG round trips and images delivered at other sizes.
Questions come in the spec's exact wording, with case and final punctuation varied sometimes.

Version 2 adds questions about what the scene lacks (``absent``), comparisons of grid positions
(``relation``) and second turns that refer back to the object of the first (``follow-up``). A question may
come with earlier turns of the same chat (``dialogue``), which the model sees through
``blipdemo.prompts`` exactly as the app builds them.
"""

from __future__ import annotations

import functools
import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 224  # canvas side, px
SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
CELLS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
V1_FAMILIES = ("color", "shape", "count", "where", "exists", "describe")
FAMILIES = (*V1_FAMILIES, "absent", "relation", "follow-up")
SINGLE_TURN = FAMILIES[:-1]  # every family but follow-up can be asked as a chat's first question

BACKGROUND_RANGE = (60, 190)  # gray level, inclusive
COLOR_JITTER = 20  # max deviation per channel from the nominal color
SIDE_RANGE = (36, 64)  # bounding-square side, px, inclusive
CENTER_JITTER = 6  # max offset of the box center from the cell center, px
SUPERSAMPLE = 4  # anti-aliasing: draw masks at 4x, then box-average down
VARIANT_PROB = 0.3  # share of questions whose surface form deviates from the canonical one


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    cell: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) bounding square, x1/y1 exclusive: side = x1 - x0


@dataclass(frozen=True)
class Scene:
    background: int  # gray level, R = G = B
    objects: tuple[SceneObject, ...]  # in reading order of their cells


def cell_center(cell: str) -> tuple[float, float]:
    """(x, y) center of a named cell on the 224-px canvas."""
    row, col = divmod(CELLS.index(cell), 3)
    step = SIZE / 3
    return (col + 0.5) * step, (row + 0.5) * step


def _box_start(rng: random.Random, center: float, side: int) -> int:
    """Integer start coordinate whose box center (start + side/2) lies within ±CENTER_JITTER of center."""
    low = int(-(-(center - CENTER_JITTER - side / 2) // 1))  # ceil
    high = int((center + CENTER_JITTER - side / 2) // 1)  # floor
    return rng.randint(low, high)


def sample_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """A random scene from the spec's whole range; n_objects (1..3) is random when None."""
    n = rng.randint(1, 3) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be in 1..3, got {n}")
    cells = sorted(rng.sample(range(len(CELLS)), n))  # sorted: objects are kept in reading order
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(list(COLORS), n)
    objects = []
    for cell_index, shape, color in zip(cells, shapes, colors, strict=True):
        cell = CELLS[cell_index]
        cx, cy = cell_center(cell)
        side = rng.randint(*SIDE_RANGE)
        x0, y0 = _box_start(rng, cx, side), _box_start(rng, cy, side)
        objects.append(SceneObject(shape, color, cell, (x0, y0, x0 + side, y0 + side)))
    return Scene(rng.randint(*BACKGROUND_RANGE), tuple(objects))


@functools.cache
def _mask(shape: str, side: int, scale: int, dx: int, dy: int) -> Image.Image:
    """Coverage mask ('L') of one shape; shared between calls, so callers must not modify it.

    The shape's bounding square is side*scale px, offset by (dx, dy) px of the scale-times canvas,
    which places it with sub-pixel precision once the mask is reduced by `scale`.
    """
    big = side * scale
    pad = scale if (dx or dy) else 0  # one extra output pixel holds the sub-pixel shift
    mask = Image.new("L", (big + pad, big + pad), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = dx, dy, dx + big - 1, dy + big - 1  # PIL boxes are inclusive
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)  # apex up, base at the bottom
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask.reduce(scale) if scale > 1 else mask  # reduce = box filter: exact area coverage


def jitter_color(color: str, rng: random.Random) -> tuple[int, int, int]:
    """The nominal color with each channel moved by up to ±COLOR_JITTER (clipped to 0..255)."""
    return tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in COLORS[color])


def render(scene: Scene, rng: random.Random, *, antialias: bool | None = None) -> Image.Image:
    """Draw the scene as a 224×224 RGB image; antialias=None picks hard or smooth edges at random."""
    if antialias is None:
        antialias = rng.random() < 0.5
    image = Image.new("RGB", (SIZE, SIZE), (scene.background,) * 3)
    for obj in scene.objects:
        color = jitter_color(obj.color, rng)
        side = obj.box[2] - obj.box[0]
        if antialias:
            # Random sub-pixel placement, so edge pixels take every blend a float-coordinate renderer makes.
            dx, dy = rng.randrange(SUPERSAMPLE), rng.randrange(SUPERSAMPLE)
            mask = _mask(obj.shape, side, SUPERSAMPLE, dx, dy)
        else:
            mask = _mask(obj.shape, side, 1, 0, 0)
        image.paste(color, obj.box[:2], mask)  # paste clips at the canvas edge
    return image


_RESAMPLE = (  # (filter, weight): processors and users resize mostly with bicubic/bilinear
    (Image.Resampling.BICUBIC, 4),
    (Image.Resampling.BILINEAR, 3),
    (Image.Resampling.LANCZOS, 2),
    (Image.Resampling.NEAREST, 1),
)


def _resize(image: Image.Image, rng: random.Random) -> Image.Image:
    width = rng.randint(160, 400)
    # Mostly square; otherwise mildly non-square (aspect 0.85..1.15), as photos of a screen or crops give.
    height = width if rng.random() < 0.6 else min(400, max(160, round(width * rng.uniform(0.85, 1.15))))
    resample = rng.choices([f for f, _ in _RESAMPLE], weights=[w for _, w in _RESAMPLE])[0]
    return image.resize((width, height), resample)


def _reencode(image: Image.Image, rng: random.Random) -> Image.Image:
    buffer = io.BytesIO()
    if rng.random() < 0.3:
        image.save(buffer, format="PNG")  # lossless: pixels unchanged, kept for the code path's sake
    else:
        # subsampling 0 = 4:4:4, 2 = 4:2:0 (Pillow's default); chroma blur matters for colored edges.
        image.save(buffer, format="JPEG", quality=rng.randint(85, 100), subsampling=rng.choice((0, 2)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """What an image may go through before the model sees it: resize to 160..400 px, PNG/JPEG round trip.

    Each happens independently with probability 1/2, in random order; the image may come back untouched.
    """
    steps = [step for step in (_resize, _reencode) if rng.random() < 0.5]
    rng.shuffle(steps)
    for step in steps:
        image = step(image, rng)
    return image.convert("RGB") if image.mode != "RGB" else image


def count_word(n: int) -> str:
    """'one', 'two' or 'three'."""
    words = {1: "one", 2: "two", 3: "three"}
    if n not in words:
        raise ValueError(f"a scene has 1..3 objects, got {n}")
    return words[n]


def describe(scene: Scene) -> str:
    """'a red circle at the top left, a green triangle at the top and a blue square at the center'."""
    parts = [f"a {o.color} {o.shape} at the {o.cell}" for o in scene.objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def normalize_answer(text: str) -> str:
    """The spec's comparison rule: lowercase, surrounding spaces stripped, one final period dropped."""
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def normalize_question(text: str) -> str:
    """Questions match case-insensitively, with or without the final '?' or '.'."""
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(("?", ".")) else text


def vary_question(question: str, rng: random.Random) -> str:
    """A surface form the spec says must be accepted: other case, final '?'/'.' dropped or swapped."""
    body, end = question[:-1], question[-1]
    while True:
        case = rng.choices(("keep", "lower", "upper"), weights=(4, 5, 1))[0]
        new_body = {"keep": body, "lower": body.lower(), "upper": body.upper()}[case]
        new_end = rng.choice(("", end, "?" if end == "." else "."))
        if new_body + new_end != question:
            return new_body + new_end


def _absent_pair(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A (color, shape) pair that no object has.

    Half the time, when the scene allows it, recombine the color of one object with the shape of another:
    those negatives can only be told apart by binding color to shape, not by spotting either alone.
    """
    present = {(o.color, o.shape) for o in scene.objects}
    swapped = [(a.color, b.shape) for a in scene.objects for b in scene.objects if a is not b]
    if swapped and rng.random() < 0.5:
        return rng.choice(swapped)
    return rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])


def _absent(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A color/shape/where question about something the scene lacks, and its 'there is no …' answer."""
    kinds = ["shape", "where"]  # an unused color always exists (6 colors, at most 3 objects)
    missing_shapes = [s for s in SHAPES if s not in {o.shape for o in scene.objects}]
    if missing_shapes:
        kinds.append("color")
    kind = rng.choice(kinds)
    if kind == "color":
        shape = rng.choice(missing_shapes)
        return f"What color is the {shape}?", f"there is no {shape}"
    if kind == "shape":
        color = rng.choice([c for c in COLORS if c not in {o.color for o in scene.objects}])
        return f"What shape is the {color} object?", f"there is no {color} object"
    color, shape = _absent_pair(scene, rng)
    return f"Where is the {color} {shape}?", f"there is no {color} {shape}"


def _relation(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A left-of / above / which-is-higher question about two objects (grid columns and rows only)."""
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a is not b]
    if not pairs:
        raise ValueError("a relation question needs a scene with at least two objects")
    a, b = rng.choice(pairs)
    (ra, ca), (rb, cb) = divmod(CELLS.index(a.cell), 3), divmod(CELLS.index(b.cell), 3)
    kinds = (["left"] if ca != cb else []) + (["above", "higher"] if ra != rb else [])
    kind = rng.choice(kinds)  # two cells differ in their row, their column or both
    name_a, name_b = f"{a.color} {a.shape}", f"{b.color} {b.shape}"
    if kind == "left":
        return f"Is the {name_a} left of the {name_b}?", "yes" if ca < cb else "no"
    if kind == "above":
        return f"Is the {name_a} above the {name_b}?", "yes" if ra < rb else "no"
    upper = a if ra < rb else b
    return f"Which is higher, the {name_a} or the {name_b}?", f"the {upper.color} {upper.shape}"


def can_ask(scene: Scene, family: str) -> bool:
    """Whether the spec has a question of ``family`` for this scene (relations need two objects)."""
    return family != "relation" or len(scene.objects) >= 2


def ask(scene: Scene, family: str, rng: random.Random, *, variant: bool | None = None) -> tuple[str, str]:
    """(question, answer) of one single-turn family about the scene, worded as in the spec's table.

    variant=None varies the question's surface form with probability VARIANT_PROB (so the canonical form
    stays the most common); True always varies it, False never. Answers are always canonical.
    A follow-up needs the turn it follows: use ``dialogue``.
    """
    return _ask(scene, family, rng, variant)[:2]


def _ask(scene: Scene, family: str, rng: random.Random, variant: bool | None) -> tuple[str, str, SceneObject | None]:
    """(question, answer, the one object it is about or None) of a single-turn family."""
    obj = rng.choice(scene.objects)
    about = None
    if family == "color":
        question, answer, about = f"What color is the {obj.shape}?", obj.color, obj
    elif family == "shape":
        question, answer, about = f"What shape is the {obj.color} object?", obj.shape, obj
    elif family == "count":
        question, answer = "How many shapes are there?", count_word(len(scene.objects))
    elif family == "where":
        question, answer, about = f"Where is the {obj.color} {obj.shape}?", obj.cell, obj
    elif family == "exists":
        if rng.random() < 0.5:
            color, shape, answer = obj.color, obj.shape, "yes"
        else:
            (color, shape), answer = _absent_pair(scene, rng), "no"
        question = f"Is there a {color} {shape}?"
    elif family == "describe":
        question, answer = "Describe the image.", describe(scene)
    elif family == "absent":
        question, answer = _absent(scene, rng)
    elif family == "relation":
        question, answer = _relation(scene, rng)
    elif family == "follow-up":
        raise ValueError("a follow-up question needs the turn it follows: use scenes.dialogue")
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if variant is None:
        variant = rng.random() < VARIANT_PROB
    return (vary_question(question, rng) if variant else question), answer, about


FOLLOW_UPS = {"color": "What color is it?", "shape": "What shape is it?", "where": "Where is it?"}
REFERENT_FAMILIES = tuple(FOLLOW_UPS)  # the first turns a follow-up may follow: one object, present


@dataclass(frozen=True)
class Dialogue:
    """One question in a chat: the earlier (question, answer) turns, oldest first, then the new question."""

    history: tuple[tuple[str, str], ...]
    question: str
    answer: str
    about: SceneObject | None = None  # the object the new question is about, where it is about one


def _follow_up(obj: SceneObject, rng: random.Random, variant: bool | None) -> tuple[str, str]:
    kind = rng.choice(REFERENT_FAMILIES)
    answer = {"color": obj.color, "shape": obj.shape, "where": obj.cell}[kind]
    question = FOLLOW_UPS[kind]
    if variant is None:
        variant = rng.random() < VARIANT_PROB
    return (vary_question(question, rng) if variant else question), answer


def dialogue(
    scene: Scene,
    family: str,
    rng: random.Random,
    *,
    earlier: int = 0,
    chain: int = 0,
    variant: bool | None = None,
) -> Dialogue:
    """A question of ``family`` after ``earlier`` unrelated turns of the same chat (right answers, any family).

    A follow-up ("What color is it?") comes after a color/shape/where turn about one present object and asks
    about that object; with ``chain`` > 0, that turn is itself preceded by ``chain`` follow-ups about the same
    object ("Where is the red circle?" → "What shape is it?" → "What color is it?"): "it" is the object of
    the latest turn. ``earlier`` turns come before all of them.
    """
    askable = [f for f in SINGLE_TURN if can_ask(scene, f)]
    history = [_ask(scene, rng.choice(askable), rng, variant)[:2] for _ in range(earlier)]
    if family != "follow-up":
        question, answer, about = _ask(scene, family, rng, variant)
        return Dialogue(tuple(history), question, answer, about)
    question, answer, about = _ask(scene, rng.choice(REFERENT_FAMILIES), rng, variant)
    history.append((question, answer))
    for _ in range(chain):
        history.append(_follow_up(about, rng, variant))
    question, answer = _follow_up(about, rng, variant)
    return Dialogue(tuple(history), question, answer, about)
