"""A question about a picture: the one value a request is, from where it is made to the model.

The edge — a UI handler, an API endpoint, ``ask`` / ``stream`` / ``explain`` — makes a ``Question`` with
``Service.question`` (which checks every part against the loaded model) and hands it down unchanged: to the GPU entry
point (pickled into a ZeroGPU worker), the service, the scheduler and the maps. Nothing below the edge checks it
again, and a new option of a request is a field here, not a parameter in every signature on the way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from .decoding import DecodingOptions
from .images import load_image

if TYPE_CHECKING:
    import torch

    from .attention import MapSelection
    from .look_closer import Crop, LookCloser


def content_key(image: Image.Image) -> str:
    """A key of the picture's content (size, mode and pixels): the image-token cache's key."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Picture:
    """An image decoded once: the upright RGB picture as the user gave it (full size) and its content key.

    Equal pictures are those with equal keys; it pickles (PIL images do), so it crosses a ZeroGPU fork as it is.
    A picture kept for later (``Service.kept``: a remap of an answer shown in a visitor's session) holds a reduced
    copy as ``image`` and the model's input made from the full picture as ``pixel_values`` (1, 3, H, W), so the
    image tokens made from it are still exactly the full picture's."""

    image: Image.Image = field(compare=False, repr=False)
    key: str
    pixel_values: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, value) -> Picture:
        """A ``Picture`` from anything ``images.load_image`` takes (a path, a PIL image, bytes, an array), decoded
        now (``ImageError`` with a message for the user if it cannot be); a ``Picture`` is returned as it is."""
        if isinstance(value, Picture):
            return value
        image = load_image(value)
        return cls(image, content_key(image))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.image.size


@dataclass(frozen=True)
class Question:
    """One request, checked: build it with ``Service.question``, which validates every field against the model.

    ``maps``: the attention maps to make with the answer (an ``attention.MapSelection``: method, and the layers and
    heads of each hop), or None for none. ``look_closer``: how to look closer (``look_closer.LookCloser``), or None
    for the picture alone; ``crop``: a look already made for this question (a remap of its answer), used as it is."""

    picture: Picture
    instruction: str
    history: tuple[tuple[str, str], ...] = ()  # earlier (question, answer) turns, oldest first
    template: bool = True  # BLIP-2: wrap in "Question: … Answer:"; False: the instruction exactly as written
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    maps: MapSelection | None = None
    look_closer: LookCloser | None = None
    crop: Crop | None = None
