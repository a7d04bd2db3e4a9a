"""An independent shapes-scene renderer and answer key, written straight from docs/scenes.md.

It shares no code with blipdemo.tiny.scenes and draws differently on purpose: float geometry, numpy
masks tested at pixel centers (disc by distance, square by slicing, triangle by half-planes) and, when
anti-aliased, coverage averaged over a 4×4 grid of sub-pixel samples. Tests use it to judge the trained
model on scenes it never saw, drawn by a renderer it never saw, and to check the training-side code.

A scene is a plain dict: {"background": int, "objects": [{"shape", "color", "cell", "box"}, ...]},
objects in reading order, box = (x0, y0, x1, y1) floats, the shape's bounding square.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

CANVAS = 224
SHAPE_NAMES = ("circle", "square", "triangle")
NOMINAL = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
CELL_NAMES = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
NUMBER_WORDS = ("zero", "one", "two", "three")


def random_scene(rng: np.random.Generator) -> dict:
    """A random scene within the spec, with float box geometry."""
    n = int(rng.integers(1, 4))
    cells = np.sort(rng.choice(9, size=n, replace=False))
    shapes = rng.permutation(SHAPE_NAMES)[:n]
    colors = rng.permutation(list(NOMINAL))[:n]
    pitch = CANVAS / 3
    objects = []
    for cell, shape, color in zip(cells, shapes, colors, strict=True):
        row, col = divmod(int(cell), 3)
        side = rng.uniform(36, 64)
        cx = (col + 0.5) * pitch + rng.uniform(-6, 6)
        cy = (row + 0.5) * pitch + rng.uniform(-6, 6)
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        objects.append({"shape": str(shape), "color": str(color), "cell": CELL_NAMES[cell], "box": box})
    return {"background": int(rng.integers(60, 191)), "objects": objects}


def _inside(shape: str, box: tuple[float, ...], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean: which points (x, y) in canvas coordinates fall inside the shape."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        r = (x1 - x0) / 2
        return (x - (x0 + x1) / 2) ** 2 + (y - (y0 + y1) / 2) ** 2 <= r * r
    if shape == "square":
        return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    if shape == "triangle":
        apex_x = (x0 + x1) / 2
        # Apex (apex_x, y0), base from (x0, y1) to (x1, y1): below the apex's two sides and above the base.
        left = (y - y0) * (apex_x - x0) >= (apex_x - x) * (y1 - y0)
        right = (y - y0) * (x1 - apex_x) >= (x - apex_x) * (y1 - y0)
        return left & right & (y <= y1)
    raise ValueError(f"unknown shape {shape!r}")


def _coverage(shape: str, box: tuple[float, ...], antialias: bool) -> tuple[slice, slice, np.ndarray]:
    """(rows, cols, coverage in [0, 1]) over the pixels around the box."""
    x0, y0, x1, y1 = box
    rows = slice(max(0, int(np.floor(y0)) - 1), min(CANVAS, int(np.ceil(y1)) + 1))
    cols = slice(max(0, int(np.floor(x0)) - 1), min(CANVAS, int(np.ceil(x1)) + 1))
    if shape == "square" and not antialias:
        # Pixel centers (i + 0.5) inside [y0, y1] are exactly the indices ceil(y0 - 0.5) .. floor(y1 - 0.5).
        cover = np.zeros((rows.stop - rows.start, cols.stop - cols.start))
        top, bottom = int(np.ceil(y0 - 0.5)), int(np.floor(y1 - 0.5)) + 1
        left, right = int(np.ceil(x0 - 0.5)), int(np.floor(x1 - 0.5)) + 1
        cover[top - rows.start : bottom - rows.start, left - cols.start : right - cols.start] = 1.0
        return rows, cols, cover
    offsets = (np.arange(4) + 0.5) / 4 if antialias else np.array([0.5])
    ys = np.arange(rows.start, rows.stop)[:, None, None, None] + offsets[None, None, :, None]
    xs = np.arange(cols.start, cols.stop)[None, :, None, None] + offsets[None, None, None, :]
    return rows, cols, _inside(shape, box, xs, ys).mean(axis=(2, 3))  # (H, W)


def draw(scene: dict, rng: np.random.Generator, *, antialias: bool | None = None) -> Image.Image:
    """A 224×224 RGB image of the scene; colors jittered ±20 per channel, antialias None = coin flip."""
    if antialias is None:
        antialias = bool(rng.integers(2))
    canvas = np.full((CANVAS, CANVAS, 3), float(scene["background"]))
    for obj in scene["objects"]:
        color = np.clip(np.array(NOMINAL[obj["color"]]) + rng.integers(-20, 21, size=3), 0, 255)
        rows, cols, cover = _coverage(obj["shape"], tuple(obj["box"]), antialias)
        patch = canvas[rows, cols]
        canvas[rows, cols] = patch + cover[..., None] * (color - patch)
    return Image.fromarray(np.round(canvas).astype(np.uint8), "RGB")


def normalize(answer: str) -> str:
    """Answers compare lowercased, with surrounding spaces and a final period removed."""
    answer = answer.strip().lower()
    return answer[:-1].strip() if answer.endswith(".") else answer


def _listing(objects: list[dict]) -> str:
    phrases = [f"a {o['color']} {o['shape']} at the {o['cell']}" for o in objects]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def answer(scene: dict, question: str) -> str:
    """The answer to any question of the six families, in any accepted surface form.

    Raises LookupError for a question about an object the scene lacks (the spec leaves it undefined)
    and ValueError for a question outside the six families.
    """
    q = question.strip().lower()
    if q.endswith(("?", ".")):
        q = q[:-1].strip()
    objects = scene["objects"]

    def find(**want: str) -> dict:
        hits = [o for o in objects if all(o[k] == v for k, v in want.items())]
        if not hits:
            raise LookupError(f"no object with {want} in the scene")
        return hits[0]

    if m := re.fullmatch(r"what colou?r is the (\w+)", q):
        return find(shape=m[1])["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object", q):
        return find(color=m[1])["shape"]
    if q == "how many shapes are there":
        return NUMBER_WORDS[len(objects)]
    if m := re.fullmatch(r"where is the (\w+) (\w+)", q):
        return find(color=m[1], shape=m[2])["cell"]
    if m := re.fullmatch(r"is there an? (\w+) (\w+)", q):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    if q == "describe the image":
        ordered = sorted(objects, key=lambda o: CELL_NAMES.index(o["cell"]))
        return _listing(ordered)
    raise ValueError(f"not a question of the six families: {question!r}")


def questions(scene: dict, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(family, question, answer) triples in the spec's canonical wording, covering all six families.

    Per object: color, shape, where and a present exists question; once per scene: count and describe;
    and as many absent exists questions as present ones, so yes and no are balanced.
    """
    out = []
    for o in scene["objects"]:
        out.append(("color", f"What color is the {o['shape']}?", o["color"]))
        out.append(("shape", f"What shape is the {o['color']} object?", o["shape"]))
        out.append(("where", f"Where is the {o['color']} {o['shape']}?", o["cell"]))
        out.append(("exists", f"Is there a {o['color']} {o['shape']}?", "yes"))
    out.append(("count", "How many shapes are there?", NUMBER_WORDS[len(scene["objects"])]))
    present = {(o["color"], o["shape"]) for o in scene["objects"]}
    absent = [(c, s) for c in NOMINAL for s in SHAPE_NAMES if (c, s) not in present]
    for i in rng.choice(len(absent), size=len(present), replace=False):
        color, shape = absent[i]
        out.append(("exists", f"Is there a {color} {shape}?", "no"))
    out.append(("describe", "Describe the image.", answer(scene, "Describe the image.")))
    return out
