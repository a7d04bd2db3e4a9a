"""blipdemo: chat about an image with InstructBLIP / BLIP-2 models.

import blipdemo
vlm = blipdemo.load("Salesforce/instructblip-flan-t5-xl")   # hub id or local folder
vlm.ask("photo.jpg", "What is unusual about this image?")
"""

from .attention import Explanation
from .decoding import INSTRUCTBLIP_DEFAULTS
from .images import ImageError, load_image
from .loading import CheckpointError, CheckpointUnavailable, load, plan_device_map
from .model import VisionLanguageModel

__all__ = [
    "INSTRUCTBLIP_DEFAULTS",
    "CheckpointError",
    "CheckpointUnavailable",
    "Explanation",
    "ImageError",
    "VisionLanguageModel",
    "load",
    "load_image",
    "plan_device_map",
]
