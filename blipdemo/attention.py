"""Attention maps: where in the picture the model looked, for each generated word and for the whole answer.

A word reaches the image through two stages, and a token's map chains them:

    map_t[p] = Σ_q  r_t[q] · C[q, p]

- ``r_t[q]``: how much the LM attended to query position q when it produced token t (decoder-only:
  self-attention from the producing position to the query positions; T5: decoder cross-attention to the
  encoder's query positions), averaged over heads and layers, renormalized over the queries;
- ``C[q, p]``: where query q read the image (the Q-Former's cross-attention over the patch tokens, CLS
  dropped), averaged over heads and cross-attention layers, renormalized over the patches.

Both hops stay visible on the ``Explanation``: ``query_maps`` (C, per query, where it read the picture) and
``query_weights`` (r_t, per token, how much it drew on each query); ``words_in_region(box)`` runs the path backwards,
from a region of the picture to the answer's words. Each hop's layers and heads can be chosen (``MapSelection``);
the default, the mean over all of them, was chosen with the pointing game in ``benchmarks/``. ``method="relevancy"``
replaces raw attention with gradient-weighted relevancy propagated through both hops (``relevancy.py``).
Generation itself runs as in ``ask`` (SDPA everywhere); afterwards one teacher-forced pass over the answer
(``teacher_forced``, shared by both methods) records what the maps need, in this thread only: the Q-Former's attention
(its explicit path) and the LM's attention weights (``lm_attention``: the same SDPA pass, with the weights recomputed
from its queries and keys; for relevancy, the output computed from those weights so that gradients reach them). The
LM's attention implementation is never switched, so concurrent requests are untouched. A ``stop`` event ends a map
pass early (``Stopped``). Painting a map over the picture is ``heatmap.py``'s.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
import torch
from PIL import Image

from .heatmap import paint
from .relevancy import check_differentiable, lm_modules, relevancy_hops
from .teacher_forced import patch_grid, stop_if_set, teacher_forced

METHODS = ("attention", "relevancy")  # raw attention (one pass), or gradient-weighted relevancy (relevancy.py)
AGGREGATIONS = ("mean", "last", "qformer")  # see the pointing game in benchmarks/; "mean" is the default


@dataclass(frozen=True)
class MapSelection:
    """What a map is made of: the method and, per hop, the layers and heads averaged (indices from 0, sorted)."""

    method: str
    qformer_layers: tuple[int, ...]  # the Q-Former's cross-attention layers (0 = the first that has one)
    qformer_heads: tuple[int, ...]
    lm_layers: tuple[int, ...]  # the LM's decoder layers (T5: its decoder blocks)
    lm_heads: tuple[int, ...]
    uniform_lm: bool = False  # aggregate "qformer": no LM hop, every query weighs the same


@dataclass
class CropMaps:
    """The crop part of a look-closer answer's explanation: the box it looked closer at (in the picture's pixels), the
    crop, each token's map over the crop, and how much of each token came from the crop (``share``: its LM attention
    to the crop's queries over its attention to all queries; 1 when the answer read the crop alone)."""

    box: tuple[int, int, int, int]
    image: Image.Image = field(repr=False)
    token_maps: np.ndarray = field(repr=False)  # (n_tokens, grid_h, grid_w) over the crop, each sums to 1
    image_map: np.ndarray = field(repr=False)  # (grid_h, grid_w) over the crop, sums to 1
    share: np.ndarray = field(repr=False)  # (n_tokens,) in [0, 1]
    pictures: tuple[str, ...] = ("crop",)  # what the LM read, in order: ("crop",) or ("original", "crop")

    def overlay(self, token: int | None = None, *, max_side: int | None = None) -> Image.Image:
        """The map (of ``token``, or of the whole answer) over the crop, as ``Explanation.overlay`` paints it."""
        heat = self.image_map if token is None else self.token_maps[token]
        return paint(self.image, heat, max_side)


@dataclass
class Explanation:
    """What ``vlm.explain`` returns: the answer, its tokens, a probability map per token and overall, and both hops
    of the path from a word to the picture (``query_weights`` @ ``query_maps``; ``words_in_region`` backwards)."""

    text: str
    tokens: list[str]
    token_maps: np.ndarray  # (n_tokens, grid_h, grid_w), each sums to 1
    image_map: np.ndarray  # (grid_h, grid_w), sums to 1
    image: Image.Image = field(repr=False)  # the upright RGB picture the model saw
    # Hop 2, queries → patches: (num_queries, grid_h, grid_w), each sums to 1 — where each query read the picture
    # (relevancy: for each token its own, these are their mean over the tokens).
    query_maps: np.ndarray | None = field(default=None, repr=False)
    # Hop 1, tokens → queries: (n_tokens, num_queries), each row sums to 1 — how much each token drew on each query.
    query_weights: np.ndarray | None = field(default=None, repr=False)
    method: str = "attention"
    selection: MapSelection | None = None
    # A look-closer answer: where it looked closer, and its maps over the crop. The maps above then cover the whole
    # picture on a finer grid: the crop's share of each word placed inside the box, the picture's over all of it.
    crop: CropMaps | None = field(default=None, repr=False)

    def words_in_region(self, box: Sequence[float]) -> np.ndarray:
        """The path backwards: for a region of the picture, one score per token (n_tokens,), the share of that
        token's map inside ``box`` = (x0, y0, x1, y1) in the input image's pixels (clipped to the image). A patch
        the box covers in part counts with the covered fraction of its area."""
        weights = region_weights(box, self.image.size, self.token_maps.shape[1:])  # (gh, gw)
        return (self.token_maps * weights).sum(axis=(1, 2))

    def overlay(self, token: int | None = None, *, max_side: int | None = None) -> Image.Image:
        """The map (of ``token``, or of the whole answer) over the image, at the image's own size or, with
        ``max_side``, reduced (aspect kept) to that longer side: colored where the map is strong (opacity follows
        it), the photo untouched where it is weak (``heatmap.paint``). The maps themselves stay at full detail."""
        if token is None:
            heat = self.image_map
        else:
            if not -len(self.tokens) <= token < len(self.tokens):
                raise IndexError(f"token {token} is out of range: the answer has {len(self.tokens)} tokens")
            heat = self.token_maps[token]
        return paint(self.image, heat, max_side)


def check_box(box, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``box`` (x0, y0, x1, y1) in pixels, checked and clipped to an image of ``image_size`` (width, height)."""
    bad = isinstance(box, (str, bytes)) or not isinstance(box, Sequence | np.ndarray) or len(box) != 4
    if bad or not all(isinstance(v, Real) and not isinstance(v, bool) for v in box):
        raise ValueError(f"box must be 4 numbers (x0, y0, x1, y1) in the image's pixels, got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box must be 4 finite numbers, got {box!r}")
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"box must have x0 < x1 and y0 < y1 (left, top, right, bottom), got {box!r}")
    width, height = image_size
    clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    if not (clipped[0] < clipped[2] and clipped[1] < clipped[3]):
        raise ValueError(f"box {box!r} lies entirely outside the image ({width} × {height} px): nothing to score")
    return clipped


def _covered(start: float, end: float, cells: int) -> np.ndarray:
    """(cells,): the fraction of each unit cell [i, i + 1) that [start, end) covers."""
    edges = np.arange(cells, dtype=np.float64)
    return np.clip(np.minimum(end, edges + 1) - np.maximum(start, edges), 0.0, 1.0)


def region_weights(box, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(gh, gw): the fraction of each patch's area inside ``box`` (x0, y0, x1, y1), in an image of ``image_size``
    (width, height) pixels. The processor squashes the image to a square, so x and y map to the grid proportionally."""
    x0, y0, x1, y1 = check_box(box, image_size)
    (width, height), (gh, gw) = image_size, grid
    return np.outer(_covered(y0 * gh / height, y1 * gh / height, gh), _covered(x0 * gw / width, x1 * gw / width, gw))


def _indices(name: str, value, size: int, what: str) -> tuple[int, ...]:
    """None → all of ``size``; an int or a list of ints (negative from the end, as in Python) → sorted, unique."""
    if value is None:
        return tuple(range(size))
    items = [value] if isinstance(value, Integral) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence | np.ndarray):
        raise ValueError(f"{name} must be None (all) or a list of {what} indices, got {value!r}")
    if len(items) == 0:
        raise ValueError(f"{name} must name at least one of the {size} {what} (None: all of them)")
    for i in items:
        if not isinstance(i, Integral) or isinstance(i, bool):
            raise ValueError(f"{name} must hold whole numbers ({what} indices), got {i!r}")
        if not -size <= i < size:
            raise ValueError(
                f"{name}: {i} is out of range: there are {size} {what}, valid indices 0 to {size - 1} "
                f"(or -{size} to -1 from the end)"
            )
    return tuple(sorted({int(i) % size for i in items}))


def map_selection(
    model,
    method: str = "attention",
    qformer_layers=None,
    qformer_heads=None,
    lm_layers=None,
    lm_heads=None,
    aggregate: str = "mean",
) -> MapSelection:
    """Check the map options against ``model`` (a ``VisionLanguageModel``) before any model work; None = all.

    ``aggregate``: "mean" (the layers and heads given), "last" (the last layer of each hop unless given), "qformer"
    (no LM hop: uniform weights over the queries — the pointing game's baseline)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    if model.language_model is None:
        raise ValueError("This model was loaded without its language model: it has no answers to explain.")
    if method == "relevancy":
        check_differentiable(model.language_model)
    if aggregate == "last":
        qformer_layers = [-1] if qformer_layers is None else qformer_layers
        lm_layers = [-1] if lm_layers is None else lm_layers
    cross_layers = len(model.qformer.cross_attention_modules())
    qformer_size = model.config.qformer_config.num_attention_heads
    lm_size = len(lm_attention_modules(model.language_model))
    return MapSelection(
        method=method,
        qformer_layers=_indices("qformer_layers", qformer_layers, cross_layers, "Q-Former cross-attention layers"),
        qformer_heads=_indices("qformer_heads", qformer_heads, qformer_size, "Q-Former attention heads"),
        lm_layers=_indices("lm_layers", lm_layers, lm_size, "LM layers"),
        lm_heads=_indices("lm_heads", lm_heads, model.config.text_config.num_attention_heads, "LM attention heads"),
        uniform_lm=aggregate == "qformer",
    )


def query_image_maps(
    records: list[torch.Tensor],
    grid: tuple[int, int],
    aggregate: str = "mean",
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> torch.Tensor:
    """Q-Former cross-attention (per layer: (1, nh, Q, 1 + P)) → C (Q, P): mean over heads and layers
    ("last": the last cross-attention layer only; ``layers`` / ``heads``: those only)."""
    if layers is not None:
        records = [records[i] for i in layers]
    elif aggregate == "last":
        records = records[-1:]
    probs = torch.stack([_heads(r, heads) for r in records]).mean(dim=(0, 1))  # (Q, 1 + P)
    patches = probs[:, 1:]  # the CLS token is not a place in the picture
    assert patches.shape[1] == grid[0] * grid[1]
    return patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)


def _heads(record: torch.Tensor, heads: Sequence[int] | None) -> torch.Tensor:
    """(1, nh, Tq, Tk) → (h, Tq, Tk) float32: the chosen heads (None: all)."""
    return record[0].float() if heads is None else record[0, list(heads)].float()


def token_query_weights(
    attentions,
    rows: torch.Tensor,
    num_queries: int,
    aggregate: str = "mean",
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> torch.Tensor:
    """LM attention (per layer: (1, nh, T, S)) from ``rows`` to the first ``num_queries`` columns → (n, Q).

    "mean": over layers and heads; "last": the last layer's heads; "qformer": uniform over the queries (what
    averaging the Q-Former's cross-attention alone amounts to — the baseline the maps are measured against);
    ``layers`` / ``heads``: those only."""
    if aggregate == "qformer":
        return torch.full((len(rows), num_queries), 1.0 / num_queries)
    if layers is not None:
        attentions = [attentions[i] for i in layers]
    elif aggregate == "last":
        attentions = attentions[-1:]
    weights = torch.stack([_heads(a, heads)[:, rows, :num_queries] for a in attentions])  # (L, h, n, Q)
    weights = weights.mean(dim=(0, 1))  # (n, Q)
    return weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)


def lm_attention_modules(lm) -> list[torch.nn.Module]:
    """The LM's attention modules whose weights reach the query positions, in layer order: the decoder's
    self-attention (decoder-only LMs), or the decoder's cross-attention to the encoder (T5)."""
    return lm_modules(lm)["cross" if lm.config.is_encoder_decoder else "self"]


def explain_answer(
    service,
    inputs,
    answer_ids: torch.Tensor,
    text: str,
    aggregate: str = "mean",
    *,
    method: str = "attention",
    qformer_layers: Sequence[int] | int | None = None,
    qformer_heads: Sequence[int] | int | None = None,
    lm_layers: Sequence[int] | int | None = None,
    lm_heads: Sequence[int] | int | None = None,
    stop: threading.Event | None = None,
) -> Explanation:
    """Maps for ``answer_ids`` (what generation produced for the prepared ``inputs``), from one teacher-forced pass
    ("relevancy": plus the tokens' backward passes); the layers and heads of each hop as ``map_selection`` says.

    Both hops are recorded in this thread only (``teacher_forced``): other requests generating with the same model
    at the same time run exactly as before. ``stop``: set, it ends the pass early with ``Stopped``.
    """
    selection = map_selection(
        service.model, method, qformer_layers, qformer_heads, lm_layers, lm_heads, aggregate=aggregate
    )
    return explain_selections(service, inputs, answer_ids, text, [selection], stop)[0]


def explain_selections(
    service,
    inputs,
    answer_ids: torch.Tensor,
    text: str,
    selections: Sequence[MapSelection],
    stop: threading.Event | None = None,
) -> list[Explanation]:
    """One ``Explanation`` per selection (from ``map_selection``), the selections of a method sharing its passes:
    one teacher-forced pass for "attention", one pass and the tokens' gradients for "relevancy".

    ``stop``: checked before each method's pass and between relevancy's gradient chunks; set, it raises ``Stopped``
    (no pass is run when it is set from the start)."""
    # The answer's pieces: what decoding shows of each token (special tokens — EOS, <image>… — show nothing).
    pieces = [service.tokenizer.decode([t], skip_special_tokens=True) for t in answer_ids.tolist()]
    keep = [i for i, piece in enumerate(pieces) if piece]
    which = keep or list(range(len(pieces)))  # no visible token: the whole-answer map is that of them all
    hops = {}  # selection → (maps (len(which), P), query maps (Q, P), weights (len(which), Q))
    crops = {}  # selection → its CropMaps (look-closer answers)
    for method in dict.fromkeys(s.method for s in selections):
        stop_if_set(stop)
        chosen = list(dict.fromkeys(s for s in selections if s.method == method))
        if method == "attention":
            results = attention_hops(service, inputs, answer_ids, chosen)  # per selection: C (V, Q, P), R (n, V*Q)
            for selection, (C, R) in zip(chosen, results, strict=True):
                C, R = C.cpu(), R.cpu()
                if inputs.crop is not None:
                    crops[selection] = crop_maps(inputs.crop, C, R[which], keep)
                    C = on_picture(inputs.crop, C, image_size=inputs.image.size)  # (V*Q, P'): over the picture
                else:
                    C = C[0]
                maps = (R @ C)[which]  # every row, then the visible ones (as the maps always were)
                hops[selection] = (maps, C, R[which])
        else:
            results = relevancy_hops(service, inputs, answer_ids, chosen, which, stop)  # R (n, V*Q), C (n, V, Q, P)
            for selection, (R, Cs) in zip(chosen, results, strict=True):
                if inputs.crop is not None:
                    crops[selection] = crop_maps(inputs.crop, Cs, R, keep)
                    Cs = torch.stack([on_picture(inputs.crop, c, image_size=inputs.image.size) for c in Cs])
                else:
                    Cs = Cs[:, 0]  # (n, Q, P): the one picture
                hops[selection] = (torch.einsum("tq,tqp->tp", R, Cs), Cs.mean(0), R)
    image = inputs.image
    return [
        _explanation(text, pieces, keep, image, selection, *hops[selection], crop=crops.get(selection))
        for selection in selections
    ]


def _explanation(text, pieces, keep, image, selection, maps, query_maps, weights, crop=None) -> Explanation:
    """The ``Explanation`` of one selection's maps (len(which), P), query maps (Q, P) and weights (len(which), Q)."""
    grid = patch_grid(maps.shape[-1])  # P columns: the image tokens less CLS, as the pass found them
    maps = maps.reshape(-1, *grid)  # (len(which), gh, gw)
    whole = maps.mean(0).numpy().astype(np.float64)
    return Explanation(
        text=text,
        tokens=[pieces[i] for i in keep],
        token_maps=_rows_to_one(maps[: len(keep)].numpy(), axis=(1, 2)),  # which is keep, or no token is visible
        image_map=whole / max(whole.sum(), 1e-300),
        image=image,
        query_maps=_rows_to_one(query_maps.reshape(-1, *grid).numpy(), axis=(1, 2)),
        query_weights=_rows_to_one(weights[: len(keep)].numpy(), axis=(1,)),
        method=selection.method,
        selection=selection,
        crop=crop,
    )


def _rows_to_one(x: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """float64 copy of ``x`` with each slice over ``axis`` summing to 1."""
    x = x.astype(np.float64)
    return x / np.maximum(x.sum(axis=axis, keepdims=True), 1e-300)


def attention_hops(service, inputs, answer_ids: torch.Tensor, selections: Sequence[MapSelection]) -> list:
    """Raw attention, one teacher-forced pass; per selection (C (V, Q, P) where each query of each picture read it —
    V = 1, or 2 for a look-closer answer from the picture and its crop — and R (n, V*Q) how much each answer token's
    producing position attended to each query), over the selection's layers and heads."""
    model = service.model
    modules = lm_attention_modules(model.language_model)
    forced = teacher_forced(
        service, inputs, answer_ids, model.qformer.cross_attention_modules(), modules, in_graph=False
    )
    cross = list(forced.qformer.values())  # per cross-attention layer (V, nh, Q, 1 + P): V pictures read
    attentions = [forced.lm[m].cpu() for m in modules]  # per layer (1, nh, T, S)
    q = model.config.num_query_tokens * forced.views  # every picture's queries, in turn
    return [
        (
            torch.stack(
                [
                    query_image_maps(
                        [r[v : v + 1] for r in cross], forced.grid, layers=s.qformer_layers, heads=s.qformer_heads
                    )
                    for v in range(forced.views)
                ]
            ),  # (V, Q, P)
            token_query_weights(
                attentions, forced.rows, q, "qformer" if s.uniform_lm else "mean", layers=s.lm_layers, heads=s.lm_heads
            ),
        )
        for s in selections
    ]


def crop_maps(crop, C: torch.Tensor, R: torch.Tensor, keep: list[int]) -> CropMaps:
    """The crop's own maps of a look-closer answer: C (V, Q, P) per picture read — or (n, V, Q, P), one per token
    (relevancy) — and R (n, V*Q) over the visible tokens ``keep`` (or all, when none is visible)."""
    if C.dim() == 3:
        C = C.expand(len(R), *C.shape)  # raw attention: the same query maps for every token
    v = crop.pictures.index("crop")
    q = C.shape[2]
    weights = R[:, v * q : (v + 1) * q]  # (n, Q): each token's weight on the crop's queries
    share = (weights.sum(1) / R.sum(1).clamp_min(1e-30)).numpy().astype(np.float64)
    maps = torch.einsum("tq,tqp->tp", weights, C[:, v]).reshape(-1, *patch_grid(C.shape[-1])).numpy()  # (n, gh, gw)
    n = len(keep) or len(maps)
    whole = maps.mean(0).astype(np.float64)
    return CropMaps(
        box=tuple(crop.box),
        image=crop.picture.image,
        token_maps=_rows_to_one(maps[:n], axis=(1, 2)),
        image_map=whole / max(whole.sum(), 1e-300),
        share=share[:n],
        pictures=crop.pictures,
    )


def on_picture(crop, C: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Every query's map over the whole picture on a grid ``f`` times finer (V*Q, f*gh * f*gw): the picture's queries
    spread evenly over the finer cells, the crop's placed inside the box, each cell's mass shared among the finer
    cells it overlaps. So the token maps (R @ these) say where in the picture a word looked, crop and picture alike."""
    gh, gw = patch_grid(C.shape[-1])
    width, height = image_size
    x0, y0, x1, y1 = crop.box
    f = int(min(6, max(1, round(min(width / max(x1 - x0, 1), height / max(y1 - y0, 1))))))  # the zoom, at most 6
    fine_h, fine_w = f * gh, f * gw
    out = []
    for v, name in enumerate(crop.pictures):
        maps = C[v].reshape(-1, gh, gw).double()  # (Q, gh, gw)
        if name == "original":
            spread = maps.repeat_interleave(f, 1).repeat_interleave(f, 2) / (f * f)
        else:
            along_y = torch.from_numpy(_overlap(y0, y1, gh, height, fine_h))  # (fine_h, gh)
            along_x = torch.from_numpy(_overlap(x0, x1, gw, width, fine_w))  # (fine_w, gw)
            spread = torch.einsum("ai,qij,bj->qab", along_y, maps, along_x)
        out.append(spread.reshape(maps.shape[0], -1).float())
    return torch.cat(out)  # (V*Q, fine_h * fine_w)


def _overlap(start: float, end: float, cells: int, length: float, fine: int) -> np.ndarray:
    """(fine, cells): the share of crop cell j (of ``cells`` equal cells spanning [start, end) px) that falls in fine
    cell a (of ``fine`` equal cells spanning [0, length) px): the fraction of each fine cell it covers (``_covered``,
    in fine-cell units), times a fine cell's size over its own."""
    size, unit = (end - start) / cells, length / fine
    lo = start + np.arange(cells) * size  # (cells,)
    covered = [_covered(a / unit, (a + size) / unit, fine) for a in lo]  # each (fine,)
    return np.stack(covered, axis=1) * unit / size
