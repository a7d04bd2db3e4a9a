"""Attention maps: where in the picture the model looked, for each generated word and for the whole answer.

A word reaches the image through two stages, and a token's map chains them:

    map_t[p] = Σ_q  r_t[q] · C[q, p]

- ``r_t[q]``: how much the LM attended to query position q when it produced token t (decoder-only:
  self-attention from the producing position to the query positions; T5: decoder cross-attention to the
  encoder's query positions), averaged over heads and layers, renormalized over the queries;
- ``C[q, p]``: where query q read the image (the Q-Former's cross-attention over the patch tokens, CLS
  dropped), averaged over heads and cross-attention layers, renormalized over the patches.

The aggregation (mean over heads and layers) was chosen with the pointing game in ``benchmarks/``.
Generation itself runs as in ``ask`` (SDPA everywhere); afterwards one teacher-forced pass over the
answer records only what the maps need, in this thread only: the Q-Former's cross-attention (its explicit
path) and the LM's attention weights (``lm_attention``: the same SDPA pass, with the weights recomputed from
its queries and keys). The LM's attention implementation is never switched, so concurrent requests are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from . import lm_attention
from .qformer import recording

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


@dataclass
class Explanation:
    """What ``vlm.explain`` returns: the answer, its tokens, and a probability map per token and overall."""

    text: str
    tokens: list[str]
    token_maps: np.ndarray  # (n_tokens, grid_h, grid_w), each sums to 1
    image_map: np.ndarray  # (grid_h, grid_w), sums to 1
    image: Image.Image = field(repr=False)  # the upright RGB picture the model saw

    def overlay(self, token: int | None = None) -> Image.Image:
        """The map (of ``token``, or of the whole answer) over the image, at the image's own size: colored where
        the map is strong (opacity follows it), the photo untouched where it is weak (``heat_colors``)."""
        if token is None:
            heat = self.image_map
        else:
            if not -len(self.tokens) <= token < len(self.tokens):
                raise IndexError(f"token {token} is out of range: the answer has {len(self.tokens)} tokens")
            heat = self.token_maps[token]
        width, height = self.image.size
        # Smooth upsampling in the image's own aspect ratio (the processor squashed the image to a square).
        up = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((width, height), Image.BICUBIC))
        peak = up.max()
        up = np.clip(up, 0.0, None) / peak if peak > 0 else np.zeros_like(up)  # bicubic may undershoot below 0
        rgb, opacity = heat_colors(up)
        base = np.asarray(self.image, dtype=np.float32)
        weight = opacity[..., None]
        return Image.fromarray((base * (1 - weight) + rgb.astype(np.float32) * weight).round().astype(np.uint8))


AGGREGATIONS = ("mean", "last", "qformer")  # see the pointing game in benchmarks/; "mean" is the default


def query_image_maps(records: list[torch.Tensor], grid: tuple[int, int], aggregate: str = "mean") -> torch.Tensor:
    """Q-Former cross-attention (per layer: (1, nh, Q, 1 + P)) → C (Q, P): mean over heads and layers
    ("last": the last cross-attention layer only)."""
    records = records[-1:] if aggregate == "last" else records
    probs = torch.stack([r[0].float() for r in records]).mean(dim=(0, 1))  # (Q, 1 + P)
    patches = probs[:, 1:]  # the CLS token is not a place in the picture
    assert patches.shape[1] == grid[0] * grid[1]
    return patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)


def token_query_weights(attentions, rows: torch.Tensor, num_queries: int, aggregate: str = "mean") -> torch.Tensor:
    """LM attention (per layer: (1, nh, T, S)) from ``rows`` to the first ``num_queries`` columns → (n, Q).

    "mean": over layers and heads; "last": the last layer's heads; "qformer": uniform over the queries (what
    averaging the Q-Former's cross-attention alone amounts to — the baseline the maps are measured against)."""
    if aggregate == "qformer":
        return torch.full((len(rows), num_queries), 1.0 / num_queries)
    attentions = attentions[-1:] if aggregate == "last" else attentions
    weights = torch.stack([a[0, :, rows, :num_queries].float() for a in attentions])  # (L, nh, n, Q)
    weights = weights.mean(dim=(0, 1))  # (n, Q)
    return weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)


def lm_attention_modules(lm) -> list[torch.nn.Module]:
    """The LM's attention modules whose weights reach the query positions, in layer order: the decoder's
    self-attention (decoder-only LMs), or the decoder's cross-attention to the encoder (T5)."""
    if lm.config.is_encoder_decoder:
        return [m for name, m in lm.named_modules() if name.endswith("EncDecAttention")]
    return [m for name, m in lm.named_modules() if name.endswith(".self_attn")]


def explain_answer(service, inputs, answer_ids: torch.Tensor, text: str, aggregate: str = "mean") -> Explanation:
    """Maps for ``answer_ids`` (what generation produced for the prepared ``inputs``), from one teacher-forced pass.

    Both stages are recorded in this thread only (the Q-Former's explicit path, ``lm_attention.recording``): other
    requests generating with the same model at the same time run exactly as before.
    """
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    model = service.model
    q = model.config.num_query_tokens
    grid = tuple(s // model.config.vision_config.patch_size for s in inputs.pixel_values.shape[-2:])
    lm = model.language_model
    with torch.inference_mode():
        image_embeds = service.image_tokens([inputs])
        with recording(model.qformer.cross_attention_modules()) as records:
            query_embeds = model.query_outputs(image_embeds, inputs.qformer_input_ids)
        C = query_image_maps([r for rec in records.values() for r in rec], grid, aggregate)  # (Q, P)
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
        R = token_query_weights(attentions, rows, q, aggregate)  # (n, Q)
        maps = (R.to(C.device) @ C).reshape(-1, *grid)  # (n, gh, gw)
    # The answer's pieces: what decoding shows of each token (special tokens — EOS, <image>… — show nothing).
    pieces = [service.tokenizer.decode([t], skip_special_tokens=True) for t in answer_ids.tolist()]
    keep = [i for i, piece in enumerate(pieces) if piece]
    tokens = [pieces[i] for i in keep]
    token_maps = maps[keep] if keep else maps[:0]
    whole = (token_maps if keep else maps).mean(0).cpu().numpy().astype(np.float64)
    token_maps = token_maps.cpu().numpy().astype(np.float64)
    token_maps /= np.maximum(token_maps.sum(axis=(1, 2), keepdims=True), 1e-300)
    return Explanation(
        text=text,
        tokens=tokens,
        token_maps=token_maps,
        image_map=whole / max(whole.sum(), 1e-300),
        image=inputs.image,
    )
