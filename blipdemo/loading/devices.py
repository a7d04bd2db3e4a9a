"""Devices, dtypes and device maps.

Device maps are planned for the whole stack with accelerate on meta tensors: the vision encoder,
Q-Former and projection stay together on the first device (with room reserved for them), and the LM
is split with its own no-split rules (a decoder layer is never cut).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from ..model import VisionLanguageModel
from .checkpoint import LM_PREFIX

STRING_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
CORE_NAMES = ("vision_model", "query_tokens", "qformer", "language_projection")  # our modules: one block, one device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None/"auto": bfloat16 where the device runs it natively, float16 on older GPUs, else float32."""
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype not in (None, "auto"):
        if str(dtype).lower() not in names:
            raise ValueError(f"dtype must be float32, bfloat16 or float16 (or None), got {dtype!r}")
        return names[str(dtype).lower()]
    if device.type == "cuda":
        # Native bfloat16 from Ampere (compute capability 8) on. Not torch.cuda.is_bf16_supported(): it initializes
        # CUDA (current_device), which a ZeroGPU Space's main process must not do (it has no GPU until a
        # spaces.GPU call; ZeroGPU answers get_device_capability itself), and it says yes to emulated bfloat16.
        native = bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if native else torch.float16
    if device.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:1', got {device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but this machine has no usable CUDA GPU.")
    return device


def _as_torch_device(value) -> torch.device:
    return torch.device(f"cuda:{value}") if isinstance(value, int) else torch.device(value)


def _lm_class(config):
    return AutoModelForCausalLM if config.use_decoder_only_language_model else AutoModelForSeq2SeqLM


def plan_device_map(
    config,
    device_map,
    *,
    max_memory: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
) -> dict[str, int | str]:
    """A device for every part of the stack, planned on meta tensors (no GPU needed to plan).

    ``device_map``: "auto" | "balanced" | "balanced_low_0" | "sequential" | a dict over the whole model's
    module names (``vision_model``, ``qformer``, ``language_model.model.layers.3``, ``""`` …).
    Returns a dict over whole-model names; the core modules share the first device.
    """
    if isinstance(device_map, dict):
        return _normalize_dict_map(device_map)
    if device_map not in STRING_DEVICE_MAPS:
        raise ValueError(f"device_map must be one of {STRING_DEVICE_MAPS}, a dict, or None; got {device_map!r}")
    from accelerate import init_empty_weights
    from accelerate.utils import CustomDtype, get_balanced_memory, get_max_memory, infer_auto_device_map

    with init_empty_weights():
        core = VisionLanguageModel(config)
        lm = _lm_class(config).from_config(config.text_config)
    core_bytes = sum(p.numel() for p in core.parameters()) * torch.finfo(dtype).bits // 8
    max_memory = get_max_memory(dict(max_memory) if max_memory else None)
    gpus = [k for k in max_memory if isinstance(k, int)]
    first = gpus[0] if gpus else "cpu"
    if max_memory[first] < core_bytes:
        raise ValueError(
            f"The vision encoder and Q-Former need {core_bytes / 2**20:.0f} MiB on device {first!r}, "
            f"but max_memory allows {max_memory[first] / 2**20:.0f} MiB there."
        )
    max_memory[first] -= core_bytes  # room for our modules beside the first LM layers
    plan_dtype = CustomDtype.INT4 if load_in_4bit else torch.int8 if load_in_8bit else dtype
    no_split = list(lm._no_split_modules or [])
    if device_map.startswith("balanced"):
        max_memory = get_balanced_memory(
            lm,
            max_memory,
            no_split_module_classes=no_split,
            dtype=plan_dtype,
            low_zero=device_map == "balanced_low_0",
        )
    lm_map = infer_auto_device_map(lm, max_memory=max_memory, no_split_module_classes=no_split, dtype=plan_dtype)
    plan: dict[str, int | str] = dict.fromkeys(CORE_NAMES, first)
    for name, where in lm_map.items():
        plan[f"{LM_PREFIX}{name}" if name else LM_PREFIX[:-1]] = where
    return plan


def _normalize_dict_map(device_map: dict) -> dict[str, int | str]:
    """A user's dict: {"": d} → everything on d; otherwise the core parts must name one device."""
    if "" in device_map:
        if len(device_map) > 1:
            raise ValueError("A device_map with the key '' puts everything on one device; give no other keys.")
        where = device_map[""]
        return {**dict.fromkeys(CORE_NAMES, where), "language_model": where}
    plan = dict(device_map)
    core = {plan.get(name) for name in CORE_NAMES}
    core.discard(None)
    if len(core) > 1:
        raise ValueError(
            "vision_model, query_tokens, qformer and language_projection must share one device "
            f"(they run as one block), got {sorted(map(str, core))}."
        )
    lm_keys = [k for k in plan if k == "language_model" or k.startswith(LM_PREFIX)]
    if not lm_keys:
        raise ValueError("The device_map names no language_model modules.")
    default = core.pop() if core else plan[lm_keys[0]]
    for name in CORE_NAMES:
        plan.setdefault(name, default)
    unknown = [k for k in plan if k not in CORE_NAMES and k not in lm_keys]
    if unknown:
        raise ValueError(f"Unknown module names in device_map: {unknown}")
    return plan


def _lm_part(plan: dict[str, int | str]) -> dict[str, int | str]:
    return {
        ("" if k == "language_model" else k[len(LM_PREFIX) :]): v
        for k, v in plan.items()
        if k == "language_model" or k.startswith(LM_PREFIX)
    }
