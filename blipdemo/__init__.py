"""blipdemo: chat about an image with InstructBLIP / BLIP-2 models.

import blipdemo
vlm = blipdemo.load("Salesforce/instructblip-flan-t5-xl")   # hub id or local folder
vlm.ask("photo.jpg", "What is unusual about this image?")
vlm.embed("photo.jpg")                                       # the Q-Former's query outputs
blipdemo.load_qformer("Salesforce/blipdiffusion").embed("dog.jpg", "dog")   # BLIP-Diffusion's embedding

Where a request goes (the app's path; the library enters at step 2):
1. enters   ui/layout.py wires each event to ui/chat.py (Send, Regenerate, /chat, /ask, /stream) or ui/maps.py
2. checked  ui/chat.py ``Chat.ask`` → service.py ``Service.question``: one frozen ``question.Question`` (the
            picture decoded once, instruction, history, template, decoding options, map selection), checked once
3. run id   control.py gives every call a run id that Stop and a vanished client reach, and pulls in threads
4. GPU      gpu.py ``answer`` / ``remap``: all that holds the accelerator (on ZeroGPU, a worker process)
5. encoded  service.py ``prepare`` (prompt that fits, image tokens cached by picture) → ``start``
6. batched  batching.py: the ``Scheduler`` admits requests between steps into decode_loop.py's ``RunningBatch``
            (prompt prefilled once, caches merged, one step for all rows; model.py is the module)
7. mapped   attention.py, relevancy.py: the maps, from one teacher_forced.py pass; heatmap.py paints them
Loading (loading/: files, devices, LM, Q-Former) returns a model; api.py ``serve`` builds the service around it.
"""

from .api import load, load_qformer
from .attention import Explanation
from .decoding import INSTRUCTBLIP_DEFAULTS, DecodingOptions
from .embedding import Blip2TextQFormer, BlipDiffusionQFormer
from .images import ImageError, load_image
from .loading import CheckpointError, CheckpointUnavailable, plan_device_map
from .model import VisionLanguageModel
from .question import Picture, Question
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
    "Picture",
    "Question",
    "Service",
    "VisionLanguageModel",
    "load",
    "load_image",
    "load_qformer",
    "plan_device_map",
]
