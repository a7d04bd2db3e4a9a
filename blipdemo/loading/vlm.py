"""The whole model: ``load_model`` reads a checkpoint into a ``Loaded`` bundle — the ``VisionLanguageModel`` (our
vision encoder, Q-Former and projection, then the LM of ``language_model``), its tokenizers and image processor, and
what was loaded how (``load_info``). Serving it (a ``Service``) is ``blipdemo.api``'s business, not loading's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import AddedToken, AutoImageProcessor, InstructBlipConfig

from ..model import VisionLanguageModel
from .checkpoint import (
    LM_PREFIX,
    CheckpointError,
    core_keys,
    load_core,
    read_config,
    read_core_state,
    resolve_checkpoint,
    weight_files,
)
from .cpu_quant import quantize_linears
from .devices import CORE_NAMES, _as_torch_device, _lm_part, plan_device_map, resolve_device, resolve_dtype
from .language_model import (
    CPU_4BIT_BLOCK_N,
    CPU_4BIT_BLOCKSIZE,
    cpu_4bit_misfits,
    load_language_model,
    quantization_backend,
)
from .tokenizers import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """A loaded checkpoint: the model and what turns images and text into its inputs.

    ``model``: the ``VisionLanguageModel`` (``language_model`` None where no LM was loaded); ``qformer_tokenizer``:
    InstructBLIP's (None for BLIP-2); ``load_info``: name, folder, dtype, device, quantization, device map …
    """

    model: VisionLanguageModel
    tokenizer: object
    qformer_tokenizer: object = None
    image_processor: object = None
    load_info: dict = field(default_factory=dict)


def load_model(
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
    compile: bool = False,
    quantization: str | None = None,
) -> Loaded:
    """Load an InstructBLIP / BLIP-2 checkpoint (hub id or local folder): the ``VisionLanguageModel`` with its
    tokenizers and image processor, as a ``Loaded`` bundle (``blipdemo.load`` serves it).

    ``dtype``: None (bfloat16 where the device supports it, else float32) | "float32" | "bfloat16" |
    "float16". ``device``: "cpu", "cuda", "cuda:1"… (None: cuda if available). ``device_map`` /
    ``max_memory``: split the LM over several devices (accelerate). ``load_in_8bit`` / ``load_in_4bit``: the LM's
    linear layers in int8 / int4; the vision encoder and Q-Former stay in ``dtype``. ``quantization``: how —
    None (an LM wholly on the CPU: "torch", else "bitsandbytes") | "torch" (weight-only layers on PyTorch's CPU
    kernels, ``cpu_quant``; CPU only) | "bitsandbytes" (LLM.int8 / nf4, CPU or CUDA). ``compile``: compile the
    vision encoder with torch.compile (inductor, weights frozen and prepacked: inference only; ~40 s once at
    load, then ~1.2× faster on this CPU — see benchmarks/speed.py).
    """
    if load_in_8bit and load_in_4bit:
        raise ValueError("Choose one of load_in_8bit and load_in_4bit.")
    bits = 8 if load_in_8bit else 4 if load_in_4bit else None
    if quantization not in (None, "torch", "bitsandbytes"):
        raise ValueError(f"quantization must be None, 'torch' or 'bitsandbytes', got {quantization!r}")
    if quantization is not None and bits is None:
        raise ValueError(f"quantization={quantization!r} says how to quantize: give load_in_8bit or load_in_4bit too.")
    if max_memory is not None and device_map is None:
        device_map = "auto"
    folder = resolve_checkpoint(name_or_path, revision)
    config = read_config(folder)
    files = weight_files(folder)

    if device_map is None:
        core_device = resolve_device(device)
        dtype = resolve_dtype(dtype, core_device)
        plan = dict.fromkeys(CORE_NAMES, str(core_device))
        plan["language_model"] = str(core_device)
    else:
        first_gpu = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        dtype = resolve_dtype(dtype, first_gpu)
        plan = plan_device_map(
            config, device_map, max_memory=max_memory, dtype=dtype, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit
        )
        core_device = _as_torch_device(plan["vision_model"])
        if core_device.type in ("meta", "disk"):
            raise ValueError("The vision encoder and Q-Former must be on a real device, not offloaded to disk.")
    if core_device.type == "cpu" and dtype == torch.float16:
        log.warning("float16 on CPU is slow and less accurate than bfloat16; consider dtype='bfloat16'.")

    lm_map = _lm_part(plan)
    backend = quantization_backend(quantization, bits, lm_map)  # before minutes of loading: it may refuse
    core = _load_core_model(folder, config, files, core_device, dtype)
    bnb = backend == "bitsandbytes"
    # Layers bitsandbytes' CPU 4-bit kernel would fail on at their first forward (mid-answer): keep them in dtype.
    keep_float = cpu_4bit_misfits(config, lm_map) if load_in_4bit and bnb else []
    if keep_float:
        log.warning(
            "4-bit on CPU: bitsandbytes' packed kernel needs a linear layer's output width to be a multiple of %d "
            "and its input width a multiple of %d; keeping %d layer(s) of the language model in %s instead: %s",
            CPU_4BIT_BLOCK_N,
            CPU_4BIT_BLOCKSIZE,
            len(keep_float),
            str(dtype).removeprefix("torch."),
            ", ".join(LM_PREFIX + name for name in keep_float),
        )
    model = core.model
    model.language_model = load_language_model(
        folder,
        config,
        core_keys(files),
        dtype=dtype,
        device_map=lm_map,
        load_in_8bit=load_in_8bit and bnb,
        load_in_4bit=load_in_4bit and bnb,
        offload_folder=offload_folder,
        keep_float=keep_float,
    )
    if backend == "torch":
        keep_float = _quantize_on_cpu(model.language_model, bits, dtype)
    if compile:
        compile_vision_encoder(model)
    load_info = {
        "name": str(name_or_path),
        "folder": str(folder),
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": "8-bit" if load_in_8bit else "4-bit" if load_in_4bit else None,
        "quantization_backend": backend,  # "torch" (PyTorch's CPU kernels) | "bitsandbytes" | None
        # LM layers kept in ``dtype`` although quantization was asked for (the kernels cannot run them here)
        "unquantized": [LM_PREFIX + name for name in keep_float],
        "device_map": plan if device_map is not None else None,
        "device": str(core_device),
        "compiled": compile,
    }
    return replace(core, load_info=load_info)


def _quantize_on_cpu(lm, bits: int, dtype: torch.dtype) -> list[str]:
    """The LM's linear layers on PyTorch's CPU kernels, in place; one log line for the layers that could not be
    ``bits``-bit. Returns the names (inside the LM) of those left in ``dtype``."""
    kinds = quantize_linears(lm, bits)
    wanted = "int8" if bits == 8 else "int4"
    # "tied": an output layer sharing the input embeddings' weight stays float by choice (no memory to save)
    others = {kind: [n for n, k in kinds.items() if k == kind] for kind in ("int8", "float") if kind != wanted}
    if bits == 4:  # the output layer is int8 by choice (quantize_linears' docstring), not for want of a kernel
        others["int8"] = [n for n in others["int8"] if n != "lm_head"]
    if any(others.values()):
        log.warning(
            "%d-bit on CPU: PyTorch's weight-only kernels cannot run some layers of the language model at their "
            "widths; kept %s",
            bits,
            "; ".join(
                f"{len(names)} in {str(dtype).removeprefix('torch.') if kind == 'float' else kind}: "
                + ", ".join(LM_PREFIX + n for n in names)
                for kind, names in others.items()
                if names
            ),
        )
    return others["float"]


def _load_core_model(folder: Path, config, files: list[Path], device: torch.device, dtype: torch.dtype) -> Loaded:
    """Tokenizers, image processor and our modules (vision encoder, Q-Former, projection); no LM yet."""
    tokenizer = load_tokenizer(folder)
    if not hasattr(tokenizer, "image_token"):
        # What Blip2Processor / InstructBlipProcessor do, so our ids are the reference's: add the query placeholder
        # "<image>" as a special token when the tokenizer lacks it (a no-op where tokenizer.json has it; a folder with
        # only a sentencepiece model may not list it), at the id after the vocabulary (config.image_token_index).
        tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    qformer_tokenizer = None
    if isinstance(config, InstructBlipConfig):
        if not (folder / "qformer_tokenizer").is_dir():
            raise CheckpointError(f"{folder} is an InstructBLIP checkpoint without its qformer_tokenizer/ folder.")
        qformer_tokenizer = load_tokenizer(folder / "qformer_tokenizer")
    image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil", trust_remote_code=False)

    with torch.device("meta"):
        model = VisionLanguageModel(config)
    load_core(model, read_core_state(files), str(folder))
    model.to(device=device, dtype=dtype)
    model.eval()
    return Loaded(model, tokenizer, qformer_tokenizer, image_processor)


def compile_vision_encoder(model) -> None:
    """torch.compile the ViT in place (names and weights unchanged) and pay the compile cost now.

    ``model``: a ``VisionLanguageModel`` or a Q-Former of ``load_qformer`` (its ``vision_model`` or
    ``visual_encoder``)."""
    import torch._inductor.config as inductor_config

    vision = getattr(model, "vision_model", None) or model.visual_encoder
    # Freezing lets inductor constant-fold the weights and prepack them for oneDNN / cuBLAS: inference only.
    inductor_config.freezing = True
    vision.compile()
    side = vision.config.image_size
    with torch.inference_mode():
        vision(torch.zeros(1, 3, side, side, device=model.device, dtype=model.dtype))
