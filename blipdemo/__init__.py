"""blipdemo: chat about an image with InstructBLIP / BLIP-2 models.

import blipdemo
vlm = blipdemo.load("Salesforce/instructblip-flan-t5-xl")   # hub id or local folder
vlm.ask("photo.jpg", "What is unusual about this image?")
vlm.embed("photo.jpg")                                       # the Q-Former's query outputs
blipdemo.load_qformer("Salesforce/blipdiffusion").embed("dog.jpg", "dog")   # BLIP-Diffusion's embedding
"""

from .api import load, load_qformer
from .attention import Explanation
from .decoding import INSTRUCTBLIP_DEFAULTS, DecodingOptions
from .embedding import Blip2TextQFormer, BlipDiffusionQFormer
from .images import ImageError, load_image
from .loading import CheckpointError, CheckpointUnavailable, plan_device_map
from .model import VisionLanguageModel
from .service import Answer, Service

__all__ = [
    "INSTRUCTBLIP_DEFAULTS",
    "Answer",
    "Blip2TextQFormer",
    "BlipDiffusionQFormer",
    "CheckpointError",
    "CheckpointUnavailable",
    "DecodingOptions",
    "Explanation",
    "ImageError",
    "Service",
    "VisionLanguageModel",
    "load",
    "load_image",
    "load_qformer",
    "plan_device_map",
]
