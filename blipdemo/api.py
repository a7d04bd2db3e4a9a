"""The public entry points: load a checkpoint (``blipdemo.loading``) and serve it (``blipdemo.service``).

``serve`` is the one place a ``Service`` is built around a loaded model; ``load`` and ``load_qformer`` compose the
two layers, so that loading never depends on serving.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import loading
from .loading import Loaded, load_model
from .service import Service, check_max_batch_size


def serve(loaded: Loaded, *, cache_size: int = 16, max_batch_size: int = 1) -> Service:
    """A ``Service`` (``ask``, ``stream``, ``explain``, ``embed``, the forward call) around a loaded model."""
    return Service(
        loaded.model,
        loaded.tokenizer,
        loaded.qformer_tokenizer,
        loaded.image_processor,
        cache_size=cache_size,
        max_batch_size=max_batch_size,
        load_info=loaded.load_info,
    )


def load(
    name_or_path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    *,
    offload_folder: str | None = None,
    revision: str | None = None,
    cache_size: int = 16,
    compile: bool = False,
    max_batch_size: int = 1,
    quantization: str | None = None,
) -> Service:
    """Load an InstructBLIP / BLIP-2 checkpoint (hub id or local folder) and serve it: a ``Service`` (``ask``,
    ``stream``, ``explain``, ``embed``, the forward call) around the ``VisionLanguageModel`` (``.model``).

    ``dtype``: None (bfloat16 where the device supports it, else float32) | "float32" | "bfloat16" |
    "float16". ``device``: "cpu", "cuda", "cuda:1"… (None: cuda if available). ``device_map`` /
    ``max_memory``: split the LM over several devices (accelerate). ``load_in_8bit`` / ``load_in_4bit``: the LM's
    linear layers in int8 / int4 (on a CPU weight-only layers on PyTorch's own kernels, faster than float there; on
    CUDA bitsandbytes); the vision encoder and Q-Former stay in ``dtype``. ``quantization``: None (that choice) |
    "torch" | "bitsandbytes" (its LLM.int8 / nf4 layers, on the CPU too). ``compile``: compile the
    vision encoder with torch.compile (inductor, weights frozen and prepacked: inference only; ~40 s once at
    load, then ~1.2× faster on this CPU — see benchmarks/speed.py). ``max_batch_size``: concurrent requests (from
    threads, as the app makes them) decode together in batches of up to this many rows (1: one at a time).
    """
    check_max_batch_size(max_batch_size)  # before minutes of loading
    loaded = load_model(
        name_or_path,
        dtype,
        device,
        device_map,
        max_memory,
        load_in_8bit,
        load_in_4bit,
        offload_folder=offload_folder,
        revision=revision,
        compile=compile,
        quantization=quantization,
    )
    loaded.load_info["max_batch_size"] = max_batch_size
    return serve(loaded, cache_size=cache_size, max_batch_size=max_batch_size)


def load_qformer(
    name_or_path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    *,
    revision: str | None = None,
    compile: bool = False,
):
    """The Q-Former as an image (+ text) encoder; the returned object's ``embed(image, text=None)`` gives a
    (num_query_tokens, hidden) multimodal embedding, and its ``load_info`` says what was loaded.

    ``name_or_path``: BLIP-Diffusion (``Salesforce/blipdiffusion``, a local copy of that pipeline, or its
    ``qformer/`` folder) → a ``BlipDiffusionQFormer`` whose embeddings are what the pipeline conditions on
    (``ProjLayer`` applied); a BLIP-2 image-text checkpoint (``Salesforce/blip2-itm-vit-g``) → a
    ``Blip2TextQFormer`` (queries and text share self-attention); an InstructBLIP / BLIP-2 generation
    checkpoint → a ``Service`` around its ``VisionLanguageModel`` without the language model (nothing of the LM is
    loaded), whose ``embed`` gives the Q-Former's query outputs.
    From the hub only the Q-Former's files are fetched. ``dtype`` / ``device`` / ``compile`` as in ``load``.
    """
    model = loading.load_qformer(name_or_path, dtype, device, revision=revision, compile=compile)
    return serve(model) if isinstance(model, Loaded) else model
