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
Generation itself runs as in ``ask`` (SDPA everywhere); afterwards one teacher-forced pass over the
answer records only what the maps need, in this thread only: the Q-Former's cross-attention (its explicit
path) and the LM's attention weights (``lm_attention``: the same SDPA pass, with the weights recomputed from
its queries and keys). The LM's attention implementation is never switched, so concurrent requests are untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
import torch
from PIL import Image

from . import lm_attention
from .qformer import recording
from .relevancy import check_differentiable, relevancy_hops

# matplotlib's "inferno" sampled at 17 points: perceptually uniform, dark → bright, readable over photos.
INFERNO = np.array(
    [
        (0, 0, 4),
        (11, 7, 36),
        (33, 12, 74),
        (61, 9, 101),
        (87, 16, 110),
        (113, 25, 110),
        (138, 34, 106),
        (163, 44, 97),
        (188, 55, 84),
        (210, 70, 68),
        (228, 90, 49),
        (241, 115, 29),
        (249, 142, 9),
        (252, 172, 17),
        (249, 203, 53),
        (242, 234, 105),
        (252, 255, 164),
    ],
    dtype=np.float32,
)


# The heat is painted only where the map is strong: below FLOOR (a share of the map's peak) the photo shows as it
# is; above it, opacity rises to PEAK_OPACITY at the peak. The colors run over inferno's bright part only, where
# dark photos still show them.
FLOOR = 0.2
PEAK_OPACITY = 0.75
COLOR_RANGE = (0.35, 1.0)


def colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats (H, W) → RGB uint8 (H, W, 3) through the inferno colormap."""
    x = np.clip(values, 0.0, 1.0) * (len(INFERNO) - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(INFERNO) - 1)
    frac = (x - lo)[..., None]
    return (INFERNO[lo] * (1 - frac) + INFERNO[hi] * frac).round().astype(np.uint8)


def heat_colors(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A map scaled to [0, 1] (its peak = 1), (H, W) → (RGB uint8 (H, W, 3), opacity float32 (H, W))."""
    values = np.clip(values, 0.0, 1.0)
    low, high = COLOR_RANGE
    rgb = colormap(low + (high - low) * values)
    strength = np.clip((values - FLOOR) / (1.0 - FLOOR), 0.0, 1.0)
    opacity = PEAK_OPACITY * strength * strength * (3 - 2 * strength)  # smoothstep: no hard edge at the floor
    return rgb, opacity.astype(np.float32)


def legend_css(stops: int = 11) -> str:
    """A CSS ``linear-gradient`` (low → high) with the colors and opacities ``overlay`` paints the map with."""
    values = np.linspace(0.0, 1.0, stops)
    rgb, opacity = heat_colors(values)
    colors = [
        f"rgba({r}, {g}, {b}, {a:.2f}) {100 * v:.0f}%" for (r, g, b), a, v in zip(rgb, opacity, values, strict=True)
    ]
    return f"linear-gradient(to right, {', '.join(colors)})"


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

    def words_in_region(self, box: Sequence[float]) -> np.ndarray:
        """The path backwards: for a region of the picture, one score per token (n_tokens,), the share of that
        token's map inside ``box`` = (x0, y0, x1, y1) in the input image's pixels (clipped to the image). A patch
        the box covers in part counts with the covered fraction of its area."""
        weights = region_weights(box, self.image.size, self.token_maps.shape[1:])  # (gh, gw)
        return (self.token_maps * weights).sum(axis=(1, 2))

    def overlay(self, token: int | None = None) -> Image.Image:
        """The map (of ``token``, or of the whole answer) over the image, at the image's own size: colored where
        the map is strong (opacity follows it), the photo untouched where it is weak (``heat_colors``)."""
        if token is None:
            heat = self.image_map
        else:
            if not -len(self.tokens) <= token < len(self.tokens):
                raise IndexError(f"token {token} is out of range: the answer has {len(self.tokens)} tokens")
            heat = self.token_maps[token]
        return paint(self.image, heat)


def paint(image: Image.Image, heat: np.ndarray) -> Image.Image:
    """A (gh, gw) map over ``image``, at the image's own size: colored where the map is strong (opacity follows it),
    the photo untouched where it is weak (``heat_colors``)."""
    width, height = image.size
    # Smooth upsampling in the image's own aspect ratio (the processor squashed the image to a square).
    up = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((width, height), Image.BICUBIC))
    peak = up.max()
    up = np.clip(up, 0.0, None) / peak if peak > 0 else np.zeros_like(up)  # bicubic may undershoot below 0
    rgb, opacity = heat_colors(up)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    weight = opacity[..., None]
    return Image.fromarray((base * (1 - weight) + rgb.astype(np.float32) * weight).round().astype(np.uint8))


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
    if lm.config.is_encoder_decoder:
        return [m for name, m in lm.named_modules() if name.endswith("EncDecAttention")]
    return [m for name, m in lm.named_modules() if name.endswith(".self_attn")]


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
) -> Explanation:
    """Maps for ``answer_ids`` (what generation produced for the prepared ``inputs``), from one teacher-forced pass
    ("relevancy": plus the tokens' backward passes); the layers and heads of each hop as ``map_selection`` says.

    Both hops are recorded in this thread only (the Q-Former's explicit path, ``lm_attention.recording``): other
    requests generating with the same model at the same time run exactly as before.
    """
    selection = map_selection(
        service.model, method, qformer_layers, qformer_heads, lm_layers, lm_heads, aggregate=aggregate
    )
    return explain_selections(service, inputs, answer_ids, text, [selection])[0]


def explain_selections(
    service, inputs, answer_ids: torch.Tensor, text: str, selections: Sequence[MapSelection]
) -> list[Explanation]:
    """One ``Explanation`` per selection (from ``map_selection``), the selections of a method sharing its passes:
    one teacher-forced pass for "attention", one pass and the tokens' gradients for "relevancy"."""
    model = service.model
    grid = tuple(s // model.config.vision_config.patch_size for s in inputs.pixel_values.shape[-2:])
    # The answer's pieces: what decoding shows of each token (special tokens — EOS, <image>… — show nothing).
    pieces = [service.tokenizer.decode([t], skip_special_tokens=True) for t in answer_ids.tolist()]
    keep = [i for i, piece in enumerate(pieces) if piece]
    which = keep or list(range(len(pieces)))  # no visible token: the whole-answer map is that of them all
    hops = {}  # selection → (maps (len(which), P), query maps (Q, P), weights (len(which), Q))
    for method in dict.fromkeys(s.method for s in selections):
        chosen = list(dict.fromkeys(s for s in selections if s.method == method))
        if method == "attention":
            results = attention_hops(service, inputs, answer_ids, chosen, grid)  # per selection: C (Q, P), R (n, Q)
            for selection, (C, R) in zip(chosen, results, strict=True):
                maps = (R.to(C.device) @ C)[which].cpu()  # every row, then the visible ones (as the maps always were)
                hops[selection] = (maps, C.cpu(), R[which].cpu())
        else:
            results = relevancy_hops(service, inputs, answer_ids, chosen, which)  # R (n, Q), per-token C (n, Q, P)
            for selection, (R, Cs) in zip(chosen, results, strict=True):
                hops[selection] = (torch.einsum("tq,tqp->tp", R, Cs), Cs.mean(0), R)
    image = inputs.image
    return [_explanation(text, pieces, keep, grid, image, selection, *hops[selection]) for selection in selections]


def _explanation(text, pieces, keep, grid, image, selection, maps, query_maps, weights) -> Explanation:
    """The ``Explanation`` of one selection's maps (len(which), P), query maps (Q, P) and weights (len(which), Q)."""
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
    )


def _rows_to_one(x: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """float64 copy of ``x`` with each slice over ``axis`` summing to 1."""
    x = x.astype(np.float64)
    return x / np.maximum(x.sum(axis=axis, keepdims=True), 1e-300)


def attention_hops(service, inputs, answer_ids: torch.Tensor, selections: Sequence[MapSelection], grid) -> list:
    """Raw attention, one teacher-forced pass; per selection (C (Q, P) where each query read the picture, R (n, Q) how
    much each answer token's producing position attended to each query), over the selection's layers and heads."""
    model = service.model
    q = model.config.num_query_tokens
    lm = model.language_model
    with torch.inference_mode():
        image_embeds = service.image_tokens([inputs])
        with recording(model.qformer.cross_attention_modules()) as records:
            query_embeds = model.query_outputs(image_embeds, inputs.qformer_input_ids)
        cross = [r for rec in records.values() for r in rec]
        answer = answer_ids.reshape(1, -1).to(inputs.input_ids.device)
        modules = lm_attention_modules(lm)
        with lm_attention.recording(modules) as lm_records:
            if model.is_encoder_decoder:
                embeds, mask = model.language_inputs(query_embeds, inputs.input_ids)
                start = torch.tensor([[lm.config.decoder_start_token_id]], device=answer.device)
                decoder_ids = torch.cat([start, answer[:, :-1]], dim=1)  # position t produces answer token t
                lm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids.to(embeds.device))
                rows = torch.arange(answer.shape[1])
            else:
                ids = torch.cat([inputs.input_ids, answer[:, :-1]], dim=1)
                embeds, mask = model.language_inputs(query_embeds, ids)
                lm(inputs_embeds=embeds, attention_mask=mask)
                first = q + inputs.input_ids.shape[1] - 1  # the position that produced the first answer token
                rows = torch.arange(first, first + answer.shape[1])
        attentions = [lm_records[m][0].cpu() for m in modules]  # per layer (1, nh, T, S)
        return [
            (
                query_image_maps(cross, grid, layers=s.qformer_layers, heads=s.qformer_heads),
                token_query_weights(
                    attentions, rows, q, "qformer" if s.uniform_lm else "mean", layers=s.lm_layers, heads=s.lm_heads
                ),
            )
            for s in selections
        ]
