"""An independent shapes-scene renderer and answer key, written straight from docs/scenes.md.

It shares no code with blipdemo.tiny.scenes and draws differently on purpose: float geometry, numpy
masks tested at pixel centers (disc by distance, square by slicing, triangle by half-planes) and, when
anti-aliased, coverage averaged over a 4×4 grid of sub-pixel samples. Tests use it to judge the trained
model on scenes it never saw, drawn by a renderer it never saw, and to check the training-side code.

A scene is a plain dict: {"background": int, "objects": [{"shape", "color", "cell", "box"}, ...]},
objects in reading order, box = (x0, y0, x1, y1) floats, the shape's bounding square.

Version 2 of the spec adds three families, answered here too: ``absent`` (a color, shape or where question about
something the scene lacks: "there is no …"), ``relation`` (left of / above / which is higher, by grid columns and
rows only) and ``follow-up`` (a second turn, "What color is it?", about the object of the turn before, given as
the chat history).
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
V1 = ("color", "shape", "count", "where", "exists", "describe")
V2 = ("absent", "relation", "follow-up")
# The second turns of the spec, keyed by what they ask about "it".
FOLLOW_UP_FORMS = {"color": "What color is it?", "shape": "What shape is it?", "where": "Where is it?"}


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


def _plain(question: str) -> str:
    """The question lowercased, without surrounding spaces and one final '?' or '.'."""
    q = question.strip().lower()
    return q[:-1].strip() if q.endswith(("?", ".")) else q


def _row_col(obj: dict) -> tuple[int, int]:
    """The object's grid row and column (0..2), from its cell name."""
    return divmod(CELL_NAMES.index(obj["cell"]), 3)


def _find(objects: list[dict], **want: str) -> dict | None:
    return next((o for o in objects if all(o[k] == v for k, v in want.items())), None)


def _named(objects: list[dict], color: str, shape: str) -> dict:
    """The object of that color and shape; LookupError when absent (a relation needs both objects present)."""
    obj = _find(objects, color=color, shape=shape)
    if obj is None:
        raise LookupError(f"no {color} {shape} in the scene")
    return obj


def _relation(objects: list[dict], q: str) -> str | None:
    """The answer to a relation question, None when ``q`` is not one."""
    if m := re.fullmatch(r"is the (\w+) (\w+) (left of|above) the (\w+) (\w+)", q):
        (ra, ca), (rb, cb) = _row_col(_named(objects, m[1], m[2])), _row_col(_named(objects, m[4], m[5]))
        a, b = (ca, cb) if m[3] == "left of" else (ra, rb)
        if a == b:  # the spec asks "left of" across columns and "above" across rows only
            raise LookupError(f"{m[3]!r} is undefined for two objects in the same column/row")
        return "yes" if a < b else "no"
    if m := re.fullmatch(r"which is higher, the (\w+) (\w+) or the (\w+) (\w+)", q):
        a, b = _named(objects, m[1], m[2]), _named(objects, m[3], m[4])
        if _row_col(a)[0] == _row_col(b)[0]:
            raise LookupError("'which is higher' is undefined for objects in the same row")
        upper = a if _row_col(a)[0] < _row_col(b)[0] else b
        return f"the {upper['color']} {upper['shape']}"
    return None


def _referent(scene: dict, history: list[tuple[str, str]]) -> dict:
    """The object "it" stands for: that of the last turn, a color/shape/where question or a follow-up itself."""
    if not history:
        raise LookupError("a follow-up needs the turn it follows")
    q = _plain(history[-1][0])
    if q in {_plain(f) for f in FOLLOW_UP_FORMS.values()}:
        return _referent(scene, history[:-1])
    objects = scene["objects"]
    obj = None
    if m := re.fullmatch(r"what colou?r is the (\w+)", q):
        obj = _find(objects, shape=m[1])
    elif m := re.fullmatch(r"what shape is the (\w+) object", q):
        obj = _find(objects, color=m[1])
    elif m := re.fullmatch(r"where is the (\w+) (\w+)", q):
        obj = _find(objects, color=m[1], shape=m[2])
    else:
        raise LookupError(f"a follow-up must follow a color, shape or where question, not {history[-1][0]!r}")
    if obj is None:
        raise LookupError(f"the turn before names no object of the scene: {history[-1][0]!r}")
    return obj


def answer(scene: dict, question: str, history: list[tuple[str, str]] | tuple = ()) -> str:
    """The answer to any question of the spec's nine families, in any accepted surface form.

    ``history``: the earlier (question, answer) turns of the chat, oldest first; only a follow-up
    ("What color is it?") reads it. Questions about an absent object get the spec's "there is no …".
    Raises LookupError for a question the spec leaves undefined (a relation naming an absent object or
    two objects in the same column/row, a follow-up with no color/shape/where turn before it) and
    ValueError for a question outside the families.
    """
    q = _plain(question)
    objects = scene["objects"]
    if m := re.fullmatch(r"what colou?r is (?:the (\w+)|it)", q):
        if m[1] is None:
            return _referent(scene, list(history))["color"]
        obj = _find(objects, shape=m[1])
        return f"there is no {m[1]}" if obj is None else obj["color"]
    if m := re.fullmatch(r"what shape is (?:the (\w+) object|it)", q):
        if m[1] is None:
            return _referent(scene, list(history))["shape"]
        obj = _find(objects, color=m[1])
        return f"there is no {m[1]} object" if obj is None else obj["shape"]
    if q == "how many shapes are there":
        return NUMBER_WORDS[len(objects)]
    if q == "where is it":
        return _referent(scene, list(history))["cell"]
    if m := re.fullmatch(r"where is the (\w+) (\w+)", q):
        obj = _find(objects, color=m[1], shape=m[2])
        return f"there is no {m[1]} {m[2]}" if obj is None else obj["cell"]
    if m := re.fullmatch(r"is there an? (\w+) (\w+)", q):
        return "no" if _find(objects, color=m[1], shape=m[2]) is None else "yes"
    if q == "describe the image":
        ordered = sorted(objects, key=lambda o: CELL_NAMES.index(o["cell"]))
        return _listing(ordered)
    if (relation := _relation(objects, q)) is not None:
        return relation
    raise ValueError(f"not a question of the spec's families: {question!r}")


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


def _first_turn(obj: dict, kind: str) -> tuple[str, str]:
    """A color, shape or where question about one present object, with its answer."""
    if kind == "color":
        return f"What color is the {obj['shape']}?", obj["color"]
    if kind == "shape":
        return f"What shape is the {obj['color']} object?", obj["shape"]
    return f"Where is the {obj['color']} {obj['shape']}?", obj["cell"]


def _absent_questions(scene: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    """One question of each absent form the scene allows: color (if a shape is missing), shape, where."""
    objects = scene["objects"]
    colors, shapes = {o["color"] for o in objects}, {o["shape"] for o in objects}
    present = {(o["color"], o["shape"]) for o in objects}
    out = []
    missing_shapes = [s for s in SHAPE_NAMES if s not in shapes]
    if missing_shapes:  # with three objects every shape is there: no "What color is the …?" without an answer
        shape = missing_shapes[rng.integers(len(missing_shapes))]
        out.append((f"What color is the {shape}?", f"there is no {shape}"))
    missing_colors = [c for c in NOMINAL if c not in colors]
    color = missing_colors[rng.integers(len(missing_colors))]
    out.append((f"What shape is the {color} object?", f"there is no {color} object"))
    # "Where is the …?" with its color, its shape or both differing from every object that has the other one.
    pairs = {
        "color differs": [(c, s) for c in NOMINAL for s in shapes if (c, s) not in present],
        "shape differs": [(c, s) for c in colors for s in SHAPE_NAMES if (c, s) not in present],
        "both differ": [(c, s) for c in NOMINAL for s in SHAPE_NAMES if c not in colors and s not in shapes],
    }
    kinds = [k for k, v in pairs.items() if v]
    candidates = pairs[kinds[rng.integers(len(kinds))]]
    color, shape = candidates[rng.integers(len(candidates))]
    out.append((f"Where is the {color} {shape}?", f"there is no {color} {shape}"))
    return out


def _relation_questions(scene: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Per pair of objects (named in random order): left of if their columns differ, above and higher if rows do."""
    objects, out = scene["objects"], []
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            a, b = (objects[i], objects[j]) if rng.integers(2) else (objects[j], objects[i])
            (ra, ca), (rb, cb) = _row_col(a), _row_col(b)
            name_a, name_b = f"{a['color']} {a['shape']}", f"{b['color']} {b['shape']}"
            if ca != cb:
                out.append((f"Is the {name_a} left of the {name_b}?", "yes" if ca < cb else "no"))
            if ra != rb:
                upper = a if ra < rb else b
                out.append((f"Is the {name_a} above the {name_b}?", "yes" if ra < rb else "no"))
                higher = f"the {upper['color']} {upper['shape']}"
                out.append((f"Which is higher, the {name_a} or the {name_b}?", higher))
    return out


def _follow_up_questions(scene: dict, rng: np.random.Generator) -> list[tuple[str, str, list]]:
    """Each follow-up form, about one object, after a color/shape/where turn about it (random kind)."""
    obj = scene["objects"][rng.integers(len(scene["objects"]))]
    out = []
    for kind, question in FOLLOW_UP_FORMS.items():
        first = _first_turn(obj, ("color", "shape", "where")[rng.integers(3)])
        out.append((question, obj["cell" if kind == "where" else kind], [first]))
    return out


def v2_questions(scene: dict, rng: np.random.Generator) -> list[tuple[str, str, str, list[tuple[str, str]]]]:
    """(family, question, answer, history) of the version-2 families in the spec's canonical wording.

    absent: each form the scene allows; relation (two objects or more): every applicable question per pair;
    follow-up: each of the three second turns, the first turn given as history. History is empty except there.
    """
    out = [("absent", q, a, []) for q, a in _absent_questions(scene, rng)]
    out += [("relation", q, a, []) for q, a in _relation_questions(scene, rng)]
    out += [("follow-up", q, a, history) for q, a, history in _follow_up_questions(scene, rng)]
    return out
