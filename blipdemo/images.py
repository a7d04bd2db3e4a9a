"""Turning whatever a user hands us into one upright RGB picture, or a clear error.

Accepts a PIL image, a path, raw bytes, or an HxW / HxWx3 / HxWx4 uint8 (or uint16) array. The first
frame of an animation is used; EXIF orientation is applied so the model (and the heatmap) see the image
upright; transparency is composited on white; 16-bit images are scaled, not clamped; CMYK and palette
images are converted. Decompression bombs are refused from the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # ~6300×6300; a photo from any phone fits, a decompression bomb does not


class ImageError(ValueError):
    """The input is not an image we can use; the message says why, in words for a user."""


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageError("The image is empty (zero width or height).")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"The image is too large: {width}×{height} pixels (at most {MAX_PIXELS // 1_000_000} megapixels)."
        )


def _open(source: str | os.PathLike | bytes) -> Image.Image:
    try:
        if isinstance(source, bytes):
            image = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"No image file at {str(path)!r}.")
            image = Image.open(path)
        _check_size(*image.size)  # from the header: nothing decoded yet
        image.seek(0)  # first frame of an animation
        image.load()
        return image
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own guard fires first for the most extreme sizes
        raise ImageError(f"The image is too large (at most {MAX_PIXELS // 1_000_000} megapixels): {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError("This file is not an image we can read (PNG, JPEG, WebP, GIF, BMP, TIFF).") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"The image file is damaged or incomplete ({e}).") from e


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"An image array must be HxW, HxWx3 or HxWx4, got shape {tuple(array.shape)}.")
    if array.dtype == np.uint16:
        array = (array.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageError(f"An image array must hold uint8 (or uint16) values, got {array.dtype}.")
    _check_size(array.shape[1], array.shape[0])
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    return Image.fromarray(np.ascontiguousarray(array.squeeze(-1) if mode == "L" else array), mode)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grayscale: scale the full range of the type into 8 bits, never clamp.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        if image.mode == "F":
            top = max(1.0, float(values.max()))
        image = Image.fromarray(np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB")


def load_image(image) -> Image.Image:
    """Return the input as an upright RGB ``PIL.Image``; raise ``ImageError`` with a clear message if not."""
    if image is None:
        raise ImageError("No image was given: upload an image first.")
    if isinstance(image, Image.Image):
        _check_size(*image.size)
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
    elif isinstance(image, np.ndarray):
        image = _from_array(image)
    elif isinstance(image, str | os.PathLike | bytes):
        image = _open(image)
    else:
        raise ImageError(f"Expected an image, a path or an array, got {type(image).__name__}.")
    image = ImageOps.exif_transpose(image)
    return _to_rgb(image)
