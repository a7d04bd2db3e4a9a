"""Loading a checkpoint into a model; serving it is ``blipdemo.api``'s (nothing here imports the service layer).

- ``checkpoint``: a hub id or local folder resolved to a snapshot (safetensors only, never a pickle), its config,
  and strict loading of our modules (every missing, unexpected or misshaped key named).
- ``tokenizers``: ``AutoTokenizer`` for a folder, with a clear error for a sentencepiece-only one.
- ``devices``: dtype and device resolution, and device maps planned for the whole stack on meta tensors.
- ``language_model``: the LM through transformers' ``from_pretrained`` (8-bit / 4-bit bitsandbytes, device maps,
  offload), checked as strictly; which quantization an LM gets; the layers bitsandbytes' packed CPU 4-bit kernel
  cannot run.
- ``cpu_quant``: weight-only int8 / int4 linear layers on PyTorch's own CPU kernels (``load_in_8bit`` /
  ``load_in_4bit`` on a CPU), quantized at load time.
- ``vlm``: ``load_model`` → a ``Loaded`` bundle (model, tokenizers, image processor, ``load_info``);
  ``compile_vision_encoder``.
- ``qformer``: ``load_qformer``, the Q-Former alone as a multimodal embedding (BLIP-Diffusion, BLIP-2 image-text,
  or a generation checkpoint without its LM).
"""

from .checkpoint import (
    HUB_PATTERNS,
    LM_PREFIX,
    CheckpointError,
    CheckpointUnavailable,
    check_keys,
    core_keys,
    load_core,
    read_config,
    read_core_state,
    read_state,
    resolve_checkpoint,
    tensor_names,
    weight_files,
)
from .cpu_quant import Int4Linear, Int8Linear, quantize_linears
from .devices import CORE_NAMES, STRING_DEVICE_MAPS, plan_device_map, resolve_device, resolve_dtype
from .language_model import (
    CPU_4BIT_BLOCK_N,
    CPU_4BIT_BLOCKSIZE,
    cpu_4bit_misfits,
    load_language_model,
    quantization_backend,
)
from .qformer import load_qformer
from .tokenizers import load_tokenizer, sentencepiece_only
from .vlm import Loaded, compile_vision_encoder, load_model

__all__ = [
    "CORE_NAMES",
    "CPU_4BIT_BLOCKSIZE",
    "CPU_4BIT_BLOCK_N",
    "HUB_PATTERNS",
    "Int4Linear",
    "Int8Linear",
    "LM_PREFIX",
    "STRING_DEVICE_MAPS",
    "CheckpointError",
    "CheckpointUnavailable",
    "Loaded",
    "check_keys",
    "compile_vision_encoder",
    "core_keys",
    "cpu_4bit_misfits",
    "load_core",
    "load_language_model",
    "load_model",
    "load_qformer",
    "load_tokenizer",
    "plan_device_map",
    "quantization_backend",
    "quantize_linears",
    "read_config",
    "read_core_state",
    "read_state",
    "resolve_checkpoint",
    "resolve_device",
    "resolve_dtype",
    "sentencepiece_only",
    "tensor_names",
    "weight_files",
]
