"""Look closer: find the small detail a question is about with the model's own attention, crop the full-size picture
around it, and answer from the crop (Zhang et al., "MLLMs Know Where to Look", ICLR 2025: ViCrop).

BLIP-2 and InstructBLIP see every picture at their input size (224 px for the Salesforce checkpoints); the detail a
user asks about in a 12-megapixel photo is a few pixels there. But the model attends to the right place even when it
cannot read it, so:

1. **Where** (``question_map``): one teacher-forced pass over [queries ; prompt] records the LM's attention from the
   position that produces the answer's first token to the query positions, chained with where each query read the
   picture (the Q-Former's cross-attention): a map over the picture's patches (gh, gw), the same two hops as the
   answer maps (``attention.py``), for this question, before any answer. Variants (``MAPS``), measured in
   ``benchmarks/look_closer.py``: ``"attention"`` that map; ``"relative"`` the paper's rel-att, that map divided by
   the same map for a generic prompt (what the model looks at for any question); ``"gradient"`` the paper's
   grad-att, the two hops weighted by the positive gradients of the first token's logit (``relevancy.py``).
2. **The box** (``crop_box``): the smallest window of patches that holds ``MASS`` of the map, centred on the map's
   centre of mass inside it, grown by half a patch on every side (a detail rarely ends on a patch border), never
   smaller than ``LookCloser.min_box`` (3) times the model's input size in the picture's pixels (the map places the
   asked object, and the answer needs what is around it too; a crop under the input size would only be upsampled),
   with the picture's aspect ratio (the processor squashes the crop to a square as it squashes the picture, so both
   views deform alike); clamped into the picture. ``adaptive_box`` is the paper's rule, measured beside it. Then it
   looks again, on the crop (``LookCloser.steps``, 2 by default): a detail found in a large photo is framed within that
   part of it, the second map being made at the crop's finer resolution.
3. **The crop** is cut from the picture the user uploaded, at full resolution, and goes through the ViT and the
   Q-Former (which reads the instruction, as InstructBLIP does) like any picture: its image tokens are cached under
   its own content key (a follow-up that looks at the same place skips the ViT).
4. **The answer** (``VIEWS``): ``"crop"`` from the crop's queries alone, or ``"both"``, the paper's way, from the
   original's queries followed by the crop's. The default is what the benchmark chose (see the README).

Everything here runs where the request is prepared (``Service.prepare``, in the caller's thread, or inside the GPU
call on ZeroGPU), before the request joins a batch: a look-closer row then decodes beside any other row.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from .question import Picture, content_key
from .teacher_forced import patch_grid, stop_if_set, teacher_forced

VIEWS = ("crop", "both")  # what the LM answers from: the crop's queries, or the original's then the crop's
BOXES = ("mass", "adaptive")  # how the box is drawn around the map (see ``crop_box`` and ``adaptive_box``)
STEPS = (1, 2, 3)  # how many times it may zoom in, each look made on the crop before it
MIN_BOXES = (1, 2, 3, 4)  # the mass box's least side, in the model's input sizes (see ``LookCloser.min_box``)
MAPS = ("attention", "relative", "gradient")  # how the place is found (see the module's docstring)
GENERIC_PROMPT = "Write a general description of the image."  # the paper's baseline prompt for "relative"
# A box is drawn only where the map is this much denser than on average: a flat map has no place to zoom into (the
# shipped embedded model's maps of 1,000 Version 3 pictures, as ``crop_box`` measures it: 1.13 at the 5th percentile,
# 7.1 at the median, 0.2% under this line).
CONCENTRATION = 1.1
MASS = 0.35  # the share of the map a "mass" box must hold (chosen by benchmarks/look_closer.py: see the README)
# A picture whose shorter side is under this many times the model's input size is answered whole: the model already
# sees it at a fair share of its resolution, and a crop would take away the rest of the scene for little gain (on the
# embedded model's Version 1 pictures, 160-400 px for a 108-px input, answering from a crop cost 38 points).
MIN_PICTURE = 4


@dataclass(frozen=True)
class LookCloser:
    """How a question looks closer: ``view`` (what the LM answers from, ``VIEWS``) and ``map`` (how the place is
    found, ``MAPS``). ``look_closer=True`` is ``LookCloser()``: the defaults the benchmark chose."""

    view: str = "crop"
    map: str = "attention"
    box: str = "mass"
    steps: int = 2  # zoom in this many times at most, each look made on the crop before it
    # The mass box's shorter side is at least this many times the model's input size, in the picture's pixels. A
    # map of gh × gw cells places a box to within a cell or two, and the place it points at is the asked object,
    # not all that the question needs (a count needs every object; the object's neighbours tell which one is asked
    # about). Chosen on the embedded model's Version 3 pictures, in probes on other seeds than the benchmark's
    # (float32): least sides of 1 / 2 / 2.5 / 3 / 3.5 / 4 input sizes answered color 94.2 / 95.0 / 95.8 / 96.7 /
    # 93.3 / 89.2% and count 94.2 / 95.8 / 98.3 / 99.2 / 99.2 / 100% (120 pictures each): larger boxes hold the
    # whole scene more often, which count needs, and shrink its objects, which color cannot afford. The README has
    # the benchmark's figures.
    min_box: int = 3

    @classmethod
    def of(cls, value) -> LookCloser | None:
        """None for off (False / None); ``LookCloser()`` for True; a dict of fields or a ``LookCloser``, checked.
        A ValueError names what is wrong."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        choices = {"view": VIEWS, "map": MAPS, "box": BOXES, "steps": STEPS, "min_box": MIN_BOXES}
        if isinstance(value, LookCloser):
            given = {name: getattr(value, name) for name in choices}
        elif isinstance(value, dict):
            unknown = set(value) - set(choices)
            if unknown:
                raise ValueError(f"look_closer: unknown option(s) {sorted(unknown)}; valid: {sorted(choices)}")
            given = {name: value.get(name, getattr(cls, name)) for name in choices}
        else:
            raise ValueError(f"look_closer must be true or false (or a dict of {sorted(choices)}), got {value!r}")
        for name, allowed in choices.items():
            if isinstance(given[name], bool) or given[name] not in allowed:
                raise ValueError(f"look_closer {name} must be one of {allowed}, got {given[name]!r}")
        return cls(**given)


@dataclass(frozen=True)
class Crop:
    """Where a question looked closer: the box in the picture's pixels, the crop (a ``Picture`` of its own, cut from
    the full-size picture), and the map the box was chosen from."""

    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in the uploaded picture's pixels, x1/y1 exclusive
    picture: Picture = field(repr=False)
    heat: np.ndarray = field(repr=False, compare=False)  # (gh, gw): the question's map over the original, sums to 1
    view: str = "crop"

    @property
    def pictures(self) -> tuple[str, ...]:
        """Which pictures the LM reads, in order: ("crop",) or ("original", "crop")."""
        return ("crop",) if self.view == "crop" else ("original", "crop")


# ------------------------------------------------------------------------------------------------------------------
# 1. Where the question looks
def _first_position_hops(service, inputs, in_graph: bool):
    """The teacher-forced pass over [queries ; prompt] (an answer of one token: nothing of it is fed), recording the
    Q-Former's cross-attention and the LM's attention to the queries."""
    from .attention import lm_attention_modules  # attention imports this module's users; keep the import local

    model = service.model
    modules = lm_attention_modules(model.language_model)
    cross = model.qformer.cross_attention_modules()
    pad = torch.tensor([0])  # the answer's first token is produced, never fed: its value does not matter here
    return teacher_forced(service, inputs, pad, cross, modules, in_graph=in_graph), cross, modules


def _attention_map(service, inputs) -> np.ndarray:
    """The question's map (gh, gw), summing to 1: the LM's attention from the answer's first position to each query
    (mean over layers and heads), times where that query read the picture (mean over cross-attention layers and
    heads) — ``attention.py``'s default selection, for a position before any answer."""
    from .attention import query_image_maps, token_query_weights

    with torch.inference_mode():
        forced, cross, modules = _first_position_hops(service, inputs, in_graph=False)
    C = query_image_maps([forced.qformer[m] for m in cross], forced.grid)  # (Q, P)
    R = token_query_weights([forced.lm[m].cpu() for m in modules], forced.rows, C.shape[0])  # (1, Q)
    heat = (R.to(C.device) @ C)[0].float().cpu().numpy().reshape(forced.grid)
    return heat / max(float(heat.sum()), 1e-30)


def _gradient_map(service, inputs) -> np.ndarray:
    """The paper's grad-att: both hops weighted by the positive gradients of the first token's logit (the token the
    model would answer with), through ``relevancy.py``'s propagation."""
    from .attention import map_selection
    from .relevancy import relevancy_hops

    with torch.inference_mode():
        forced, _, _ = _first_position_hops(service, inputs, in_graph=False)
    first = forced.logits[0, forced.rows[0]].argmax().reshape(1).cpu()  # (1,): the greedy first token
    selection = map_selection(service.model, method="relevancy")
    R, Cs = relevancy_hops(service, inputs, first, [selection], [0])[0]  # (1, Q), (1, 1, Q, P): one picture
    heat = torch.einsum("tq,tqp->tp", R, Cs[:, 0])[0].clamp_min(0).numpy().reshape(patch_grid(Cs.shape[-1]))
    return heat / max(float(heat.sum()), 1e-30)


def question_map(service, inputs, how: str = "attention") -> np.ndarray:
    """Where the model looks for this question (gh, gw), summing to 1 (``MAPS``; see the module's docstring)."""
    if how == "gradient":
        return _gradient_map(service, inputs)
    heat = _attention_map(service, inputs)
    if how == "relative":
        generic = service.prepare(service.question(inputs.question.picture, GENERIC_PROMPT))
        base = _attention_map(service, generic)
        heat = heat / np.maximum(base, 1e-12)
        heat = heat / max(float(heat.sum()), 1e-30)
    return heat


# ------------------------------------------------------------------------------------------------------------------
# 2. The box
def crop_box(
    heat: np.ndarray, image_size: tuple[int, int], min_side: int, mass: float = MASS
) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1, y1) to look closer at, in pixels of a picture of ``image_size`` (width, height), from a map
    ``heat`` (gh, gw) over it (the processor squashes the picture to a square, so cell (i, j) covers a W/gw × H/gh
    rectangle); None when it would be (nearly) the whole picture: nothing to zoom into.

    The smallest square window of cells holding ``mass`` of the map (among windows of one size, the one that holds
    the most; None unless that is ``CONCENTRATION`` times its share of the area), centred on the map's centre of
    mass inside it, grown by half a cell on every side and to at least ``min_side`` pixels on its shorter side, then
    clamped into the picture (moved, not shrunk)."""
    heat = np.asarray(heat, dtype=np.float64)
    if heat.ndim != 2 or not np.isfinite(heat).all() or heat.min() < 0 or heat.sum() <= 0:
        raise ValueError("heat must be a 2-D map of finite, non-negative values with a positive sum")
    width, height = image_size
    gh, gw = heat.shape
    heat = heat / heat.sum()
    table = _summed(heat)
    best = None
    for k in range(1, max(gh, gw) + 1):
        kh, kw = min(k, gh), min(k, gw)
        sums = _window_sums(table, kh, kw)
        i, j = np.unravel_index(np.argmax(sums), sums.shape)
        if sums[i, j] >= mass - 1e-9:
            best = (int(i), int(j), kh, kw)
            break
    i, j, kh, kw = best  # a window of the whole grid holds everything, so one is always found
    if mass / (kh * kw / (gh * gw)) < CONCENTRATION:
        return None  # no place stands out: the map is nearly as strong everywhere
    cell_w, cell_h = width / gw, height / gh
    # Centred on the map's centre of mass inside the window (windows of one size that hold the hot place tie), grown
    # by half a cell each way, as a square in cells: the crop keeps the picture's aspect ratio.
    window = heat[i : i + kh, j : j + kw]
    ys, xs = np.mgrid[i : i + kh, j : j + kw] + 0.5
    cx, cy = float((window * xs).sum() / window.sum()) * cell_w, float((window * ys).sum() / window.sum()) * cell_h
    side_w, side_h = (max(kh, kw) + 1) * cell_w, (max(kh, kw) + 1) * cell_h
    grow = max(1.0, min_side / min(side_w, side_h))  # never below the model's input size in pixels
    side_w, side_h = min(side_w * grow, width), min(side_h * grow, height)
    if side_w * side_h >= 0.5 * width * height:
        return None  # at most a 1.4× zoom: the picture itself is as close as the model gets
    return _placed(cx, cy, side_w, side_h, image_size)


def adaptive_box(heat: np.ndarray, image_size: tuple[int, int], min_side: int) -> tuple[int, int, int, int] | None:
    """The paper's box (``bbox_from_att_image_adaptive``): square windows of ``min_side`` × r pixels, r in 1, 1.2, …,
    2, each slid over the map to its highest sum; the r whose best window stands out most from its four neighbours
    (per cell) wins, and the box is that many pixels around the window's centre, clamped into the picture. None when
    even the smallest window covers the picture."""
    heat = np.asarray(heat, dtype=np.float64)
    width, height = image_size
    gh, gw = heat.shape
    cell_w, cell_h = width / gw, height / gh
    table = _summed(heat)
    best = None  # (sharpness, side in px, centre)
    for ratio in (1.0, 1.2, 1.4, 1.6, 1.8, 2.0):
        side = min_side * ratio
        kw, kh = max(min(int(side / cell_w), gw), 1), max(min(int(side / cell_h), gh), 1)
        if kw >= gw and kh >= gh:
            if ratio == 1.0:
                return None
            continue
        sums = _window_sums(table, kh, kw)
        i, j = np.unravel_index(np.argmax(sums), sums.shape)
        steps = ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1))
        around = [sums[a, b] for a, b in steps if 0 <= a < sums.shape[0] and 0 <= b < sums.shape[1]]
        sharpness = (sums[i, j] - (np.mean(around) if around else 0.0)) / (kw * kh)
        centre = ((j + kw / 2) * cell_w, (i + kh / 2) * cell_h)
        if best is None or sharpness > best[0]:
            best = (sharpness, side, centre)
    if best is None:
        return None
    _, side, (cx, cy) = best
    return _placed(cx, cy, min(side, width), min(side, height), image_size)


def _summed(heat: np.ndarray) -> np.ndarray:
    """The summed-area table (gh + 1, gw + 1) of a map (gh, gw): any window's sum in four look-ups."""
    table = np.zeros((heat.shape[0] + 1, heat.shape[1] + 1))
    table[1:, 1:] = heat.cumsum(0).cumsum(1)
    return table


def _window_sums(table: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """The sum of every kh × kw window of the map behind ``table`` (``_summed``): (gh - kh + 1, gw - kw + 1)."""
    return table[kh:, kw:] - table[:-kh, kw:] - table[kh:, :-kw] + table[:-kh, :-kw]


def _placed(cx: float, cy: float, side_w: float, side_h: float, image_size) -> tuple[int, int, int, int]:
    """A side_w × side_h box centred on (cx, cy), moved (not shrunk) to lie inside the picture; whole pixels."""
    width, height = image_size
    x0 = min(max(cx - side_w / 2, 0.0), width - side_w)
    y0 = min(max(cy - side_h / 2, 0.0), height - side_h)
    return (round(x0), round(y0), round(x0 + side_w), round(y0 + side_h))


# ------------------------------------------------------------------------------------------------------------------
# 3. The crop
def crop_picture(picture: Picture, box: tuple[int, int, int, int]) -> Picture:
    """The crop of the full-size picture, keyed by its content, so its image tokens are cached like any picture's
    (a follow-up that looks at the same place skips the ViT)."""
    image: Image.Image = picture.image.crop(box)
    return Picture(image, content_key(image))


def look(service, inputs, options: LookCloser, stop: threading.Event | None = None) -> Crop | None:
    """Where the question of the prepared ``inputs`` looks closer: the map, the box and the crop, or None when the
    picture is small (under ``MIN_PICTURE`` times the model's input size on its shorter side) or the box would be
    (nearly) the whole picture: the answer then comes from the picture alone, exactly as without look-closer.

    Up to ``options.steps`` looks, each on the crop the one before made (a crop still large enough, by the same rule):
    a small detail is found in a large photo, then framed within that part of it. Every crop is cut from the full-size
    picture; the box is in its pixels. ``stop``: set, it ends the look with ``teacher_forced.Stopped`` before a pass."""
    picture = inputs.question.picture
    size = service.config.vision_config.image_size
    draw = crop_box if options.box == "mass" else adaptive_box
    box = heat = None
    seen, seen_inputs = picture, inputs
    for _ in range(options.steps):
        stop_if_set(stop)
        if min(seen.size) < MIN_PICTURE * size:
            break
        if seen_inputs is None:  # a crop to look at again: prepared only now (the last crop's pixels: by prepare)
            seen_inputs = service.prepare(replace(inputs.question, picture=seen, look_closer=None, crop=None))
        found = question_map(service, seen_inputs, options.map)  # (gh, gw) over what it sees now
        # The paper's adaptive box sizes itself from the input size (1-2×), as the paper does.
        inner = draw(found, seen.size, min_side=size * (options.min_box if options.box == "mass" else 1))
        if inner is None:
            break
        x, y = (box[0], box[1]) if box is not None else (0, 0)
        box = (inner[0] + x, inner[1] + y, inner[2] + x, inner[3] + y)  # in the full-size picture's pixels
        heat = found if heat is None else heat  # the map over the whole picture: where the search began
        seen, seen_inputs = crop_picture(picture, box), None
    if box is None:
        return None
    return Crop(box, seen, heat, options.view)


def zoom(box: tuple[int, int, int, int], image_size: tuple[int, int]) -> float:
    """How much closer the crop is than the picture: the picture's area over the box's, as a side ratio."""
    x0, y0, x1, y1 = box
    return math.sqrt(image_size[0] * image_size[1] / max((x1 - x0) * (y1 - y0), 1))
