"""Hostile and unusual image files, built on the fly (nothing third-party is shipped)."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# The files `build` makes that must be refused, with what the message must say; every other one is a valid image.
REFUSED = {
    "random-bytes.png": "not an image we can read",
    "truncated.jpg": "damaged or incomplete",
    "drawing.svg": "not an image we can read",
    "bomb.png": "too large",
}
VALID = [
    "one-pixel.png",
    "thin.png",
    "cmyk.jpg",
    "transparent.png",
    "palette.gif",
    "animated.webp",
    "gray16.png",
    "exif-rotated.jpg",
]


def _png_bomb(side: int = 20000) -> bytes:
    """A valid grayscale PNG of side×side zeros: a few hundred KB on disk, 400 MP once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    row = b"\x00" * (side + 1)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def build(folder: Path) -> dict[str, Path]:
    """name → file. Each is something users upload, or something an attacker does."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files: dict[str, Path] = {}

    def save(name: str, data: bytes) -> None:
        (folder / name).write_bytes(data)
        files[name] = folder / name

    def encode(image: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        return buf.getvalue()

    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    save("random-bytes.png", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    save("truncated.jpg", encode(photo, "JPEG", quality=90)[:700])
    save(
        "drawing.svg",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
    )
    save("bomb.png", _png_bomb())
    save("one-pixel.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"))
    save("thin.png", encode(Image.new("RGB", (1, 10000), (10, 200, 10)), "PNG"))
    save("cmyk.jpg", encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"))
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (10, 10, 30, 30))
    save("transparent.png", encode(rgba, "PNG"))
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (8, 8, 24, 24))
    save("palette.gif", encode(palette, "GIF", transparency=0))
    frames = [Image.new("RGB", (32, 32), (i * 2, (i * 37) % 256, 255 - i * 2)) for i in range(100)]
    save(
        "animated.webp",
        encode(
            frames[0],
            "WEBP",
            save_all=True,
            append_images=frames[1:],
            duration=20,
            lossless=True,
            minimize_size=False,
            allow_mixed=False,
        ),
    )
    gray16 = Image.fromarray(np.full((20, 20), 50000, dtype=np.uint16))
    save("gray16.png", encode(gray16, "PNG"))
    # EXIF orientation 6: stored 40 wide × 20 high; upright it is 20 wide × 40 high (red half on top).
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif-rotated.jpg", encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    return files
