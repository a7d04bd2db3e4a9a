"""The Q-Former alone, as a multimodal embedding: BLIP-Diffusion's (``BlipDiffusionQFormer``), a BLIP-2 image-text
checkpoint's (``Blip2TextQFormer``), or an InstructBLIP / BLIP-2 generation checkpoint's without its LM."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer, Blip2Config

from ..embedding import Blip2TextQFormer, BlipDiffusionQFormer
from .checkpoint import (
    HUB_PATTERNS,
    LM_PREFIX,
    CheckpointError,
    CheckpointUnavailable,
    check_keys,
    read_config,
    read_state,
    resolve_checkpoint,
    tensor_names,
    weight_files,
)
from .devices import resolve_device, resolve_dtype
from .tokenizers import load_tokenizer
from .vlm import Loaded, _load_core_model, compile_vision_encoder

PIPELINE_PATTERNS = ["model_index.json", "qformer/*.json", "qformer/*.safetensors", "qformer/*.txt"]
PIPELINE_PATTERNS += ["image_processor/*.json"]
PROBE_PATTERNS = ["model_index.json", "config.json", "qformer/config.json"]
# Older transformers saved BERT's position-id buffer; it is arange(max_positions), so it is checked, not loaded.
DERIVED_KEYS = ("embeddings.position_ids",)
BERT_FALLBACK = "bert-base-uncased"  # what diffusers' Blip2QFormerModel loads when its config names no tokenizer


def _qformer_folders(name_or_path: str | Path, revision: str | None) -> tuple[Path, Path | None, dict]:
    """(folder with config.json + weights, folder of the image processor or None, the pipeline's settings).

    A BLIP-Diffusion pipeline's ``model_index.json`` may set its own ``mean`` / ``std``: the pipeline normalises
    the reference image with those, not with the image processor's.
    """
    root = Path(name_or_path).expanduser()
    if not root.is_dir():  # a hub id: look at its layout first, then fetch only what is needed
        root = resolve_checkpoint(name_or_path, revision, PROBE_PATTERNS)
        pipeline = (root / "model_index.json").is_file() or (root / "qformer" / "config.json").is_file()
        root = resolve_checkpoint(name_or_path, revision, PIPELINE_PATTERNS if pipeline else HUB_PATTERNS)
    if (root / "qformer" / "config.json").is_file():  # a BLIP-Diffusion pipeline folder
        index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
        processor = root / "image_processor"
        processor = processor if (processor / "preprocessor_config.json").is_file() else None
        return root / "qformer", processor, index
    if (root / "model_index.json").is_file():
        raise CheckpointError(f"{root} is a diffusers pipeline without a qformer/ folder.")
    return root, (root if (root / "preprocessor_config.json").is_file() else None), {}


def _blip_diffusion_tokenizer(folder: Path, config, vocab_size: int):
    """BERT tokenizer with "[DEC]" as BOS, as diffusers builds it: from ``config.tokenizer`` (what diffusers
    reads) — or, where that path is not on this machine, from tokenizer files saved in the folder itself —
    else from bert-base-uncased."""
    named = getattr(config, "tokenizer", None)
    own = str(folder) if any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt")) else None
    sources = [s for s in (named, own) if s] or [BERT_FALLBACK]
    tokenizer, failures = None, []
    for source in sources:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
            break
        except (OSError, ValueError) as e:  # ValueError: a path from another machine read as a hub id
            failures.append(f"{source!r} ({type(e).__name__})")
    if tokenizer is None:
        raise CheckpointUnavailable(
            f"{folder}: its BERT tokenizer cannot be loaded: tried {', '.join(failures)} (no connection to the "
            "Hugging Face Hub, or a path from another machine?). Save one into the folder, or name a local one "
            "in config.json's 'tokenizer'."
        )
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer {source!r} has {len(tokenizer)} tokens but the Q-Former embeds {vocab_size}."
        )
    return tokenizer


def _blip_diffusion_processor(config, processor_folder: Path | None, pipeline: dict):
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
    from transformers.models.blip import BlipImageProcessorPil

    if processor_folder is not None:
        processor = BlipImageProcessorPil.from_pretrained(processor_folder)
    else:  # diffusers' BlipImageProcessor defaults: a square resize to the encoder's size, CLIP statistics
        side = config.vision_config.image_size
        processor = BlipImageProcessorPil(
            size={"height": side, "width": side},
            resample=PILImageResampling.BICUBIC,
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )
    # diffusers' processor center-crops to ``size`` after resizing to it (a no-op) and saves no crop_size.
    processor.do_center_crop = False
    if pipeline.get("mean") is not None:
        processor.image_mean = list(pipeline["mean"])
    if pipeline.get("std") is not None:
        processor.image_std = list(pipeline["std"])
    return processor


def _load_strict(model_class, folder: Path, config, files: list[Path], tokenizer, processor, device, dtype, heads=()):
    """Build ``model_class`` on meta and fill it from every tensor of ``files`` (strict); tensors under the
    ``heads`` prefixes are known parts of the checkpoint that the embedding does not use."""
    state = read_state(files, skip=heads)
    for key in DERIVED_KEYS:
        derived = state.pop(key, None)
        if derived is not None and not torch.equal(derived.reshape(-1), torch.arange(derived.numel())):
            raise CheckpointError(f"{folder}: {key} is not 0, 1, 2, …: this is not a checkpoint we understand.")
    with torch.device("meta"):
        model = model_class(config, tokenizer, processor)
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, str(folder))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def load_qformer(
    name_or_path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    *,
    revision: str | None = None,
    compile: bool = False,
) -> BlipDiffusionQFormer | Blip2TextQFormer | Loaded:
    """The Q-Former as an image (+ text) encoder; the returned object's ``embed(image, text=None)`` gives a
    (num_query_tokens, hidden) multimodal embedding.

    ``name_or_path``: BLIP-Diffusion (``Salesforce/blipdiffusion``, a local copy of that pipeline, or its
    ``qformer/`` folder) → a ``BlipDiffusionQFormer`` whose embeddings are what the pipeline conditions on
    (``ProjLayer`` applied); a BLIP-2 image-text checkpoint (``Salesforce/blip2-itm-vit-g``) → a
    ``Blip2TextQFormer`` (queries and text share self-attention); an InstructBLIP / BLIP-2 generation
    checkpoint → a ``Loaded`` bundle of its ``VisionLanguageModel`` without the language model (nothing of the LM
    is loaded); ``blipdemo.load_qformer`` serves that bundle, and the ``Service``'s ``embed`` gives the Q-Former's
    query outputs. ``load_info`` says what was loaded (on the Q-Former, or in the bundle).
    From the hub only the Q-Former's files are fetched. ``dtype`` / ``device`` / ``compile`` as in ``load``.
    """
    folder, processor_folder, pipeline = _qformer_folders(name_or_path, revision)
    core_device = resolve_device(device)
    dtype = resolve_dtype(dtype, core_device)
    config = read_config(folder)
    files = weight_files(folder)
    keys = tensor_names(files)
    core = None  # the Loaded bundle of a generation checkpoint
    if any(k.startswith("visual_encoder.") for k in keys):
        if not isinstance(config, Blip2Config):
            raise CheckpointError(f"{folder}: a BLIP-Diffusion Q-Former needs a BLIP-2 config.json.")
        tokenizer = _blip_diffusion_tokenizer(folder, config, config.qformer_config.vocab_size)
        processor = _blip_diffusion_processor(config, processor_folder, pipeline)
        model = _load_strict(BlipDiffusionQFormer, folder, config, files, tokenizer, processor, core_device, dtype)
        kind = "BLIP-Diffusion Q-Former"
    elif "embeddings.word_embeddings.weight" in keys and not any(k.startswith(LM_PREFIX) for k in keys):
        if not isinstance(config, Blip2Config):
            raise CheckpointError(f"{folder}: a BLIP-2 image-text Q-Former needs a BLIP-2 config.json.")
        tokenizer = load_tokenizer(folder)
        processor = AutoImageProcessor.from_pretrained(folder, backend="pil", trust_remote_code=False)
        heads = Blip2TextQFormer.HEADS
        model = _load_strict(Blip2TextQFormer, folder, config, files, tokenizer, processor, core_device, dtype, heads)
        kind = "BLIP-2 image-text Q-Former"
    elif any(k.startswith(LM_PREFIX) for k in keys):
        core = _load_core_model(folder, config, files, core_device, dtype)
        model = core.model
        kind = ("InstructBLIP" if model.family == "instructblip" else "BLIP-2") + " Q-Former (no language model)"
    else:
        raise CheckpointError(
            f"{folder} is neither a BLIP-Diffusion Q-Former (visual_encoder.* keys), a BLIP-2 image-text checkpoint "
            "(embeddings.word_embeddings), nor an InstructBLIP / BLIP-2 checkpoint (language_model.* keys)."
        )
    if compile:
        compile_vision_encoder(model)
    load_info = {
        "name": str(name_or_path),
        "folder": str(folder),
        "kind": kind,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(core_device),
        "compiled": compile,
    }
    if core is not None:
        return replace(core, load_info=load_info)
    model.load_info = load_info
    return model
