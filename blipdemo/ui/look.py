"""Where the model looked closer: the picture with the crop's box drawn on it, and the crop beside it.

Painted in a worker thread at the size the page shows (``SIDE``), never on the event loop.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

SIDE = 480  # px: the height of the painted pair (the page shows it at a few hundred pixels)
GAP = 12  # px between the picture and the crop
BOX_COLOR = (255, 200, 0)  # the box on the picture, and the crop's frame: the same color says they are one place
LABEL = "Looked closer here: the model answered from the framed part of the picture, seen at full resolution."


def looked_closer(picture: Image.Image, box: tuple[int, int, int, int], crop: Image.Image) -> Image.Image:
    """The picture (reduced to ``SIDE`` px high) with ``box`` (in its full-size pixels) outlined, and the crop beside
    it at the same height, framed in the same color."""
    width, height = picture.size
    scale = SIDE / height
    # reducing_gap: a box reduce first, Lanczos over the last factor (a 12 MP photo costs little more than a small one)
    small = picture.resize((max(1, round(width * scale)), SIDE), Image.LANCZOS, reducing_gap=2.0)
    line = max(3, SIDE // 120)
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    ImageDraw.Draw(small).rectangle([x0, y0, max(x0 + 1, x1 - 1), max(y0 + 1, y1 - 1)], outline=BOX_COLOR, width=line)
    zoomed = crop.resize((max(1, round(crop.size[0] * SIDE / crop.size[1])), SIDE), Image.LANCZOS)
    ImageDraw.Draw(zoomed).rectangle([0, 0, zoomed.size[0] - 1, SIDE - 1], outline=BOX_COLOR, width=line)
    pair = Image.new("RGB", (small.size[0] + GAP + zoomed.size[0], SIDE), (255, 255, 255))
    pair.paste(small, (0, 0))
    pair.paste(zoomed, (small.size[0] + GAP, 0))
    return pair
