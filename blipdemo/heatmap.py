"""Painting a map over the picture: the colormap, its opacity rule, the legend, and the overlay itself.

The maps' maths (what a map says) lives in ``attention.py``; this file only decides how a (gh, gw) map looks over a
photo. The heat is painted only where the map is strong, so the photo stays readable where the model did not look;
``legend_css`` draws the same colors and opacities as a CSS gradient for the app's legend.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

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
    """A CSS ``linear-gradient`` (low → high) with the colors and opacities ``paint`` paints a map with."""
    values = np.linspace(0.0, 1.0, stops)
    rgb, opacity = heat_colors(values)
    colors = [
        f"rgba({r}, {g}, {b}, {a:.2f}) {100 * v:.0f}%" for (r, g, b), a, v in zip(rgb, opacity, values, strict=True)
    ]
    return f"linear-gradient(to right, {', '.join(colors)})"


def display_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(width, height) reduced, aspect kept, so that the longer side is at most ``max_side`` (None: unchanged)."""
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be at least 1 pixel, got {max_side}")
    width, height = size
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def reduced(image: Image.Image, max_side: int | None) -> Image.Image:
    """``image`` reduced (aspect kept, ``display_size``) so that its longer side is at most ``max_side``; the image
    itself where it is small enough already (or ``max_side`` is None)."""
    size = display_size(image.size, max_side)
    if size == image.size:
        return image
    # reducing_gap: an integer box reduce() first, then Lanczos over the last factor < 2 (thumbnail's recipe): the
    # quality of a full Lanczos at a fraction of its cost on a large photo.
    return image.resize(size, Image.LANCZOS, reducing_gap=2.0)


def paint(image: Image.Image, heat: np.ndarray, max_side: int | None = None) -> Image.Image:
    """A (gh, gw) map over ``image``: colored where the map is strong (opacity follows it), the photo untouched where
    it is weak (``heat_colors``). At the image's own size, or, with ``max_side``, over a copy reduced (aspect kept)
    so that its longer side is ``max_side``: a 12-megapixel upload then costs what a display-sized one does."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = reduced(image, max_side)
    width, height = image.size
    # Smooth upsampling in the image's own aspect ratio (the processor squashed the image to a square).
    up = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((width, height), Image.BICUBIC))
    peak = up.max()
    up = np.clip(up, 0.0, None) / peak if peak > 0 else np.zeros_like(up)  # bicubic may undershoot below 0
    rgb, opacity = heat_colors(up)  # (H, W, 3), (H, W)
    base = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    weight = opacity[..., None]
    return Image.fromarray((base * (1 - weight) + rgb.astype(np.float32) * weight).round().astype(np.uint8))
