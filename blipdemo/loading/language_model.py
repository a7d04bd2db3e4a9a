"""The language model: loaded by transformers' ``from_pretrained`` from the checkpoint's own files.

The LM is read from the ``language_model.`` keys (via ``key_mapping``), so ``BitsAndBytesConfig``, ``device_map``,
``max_memory`` and cpu/disk offload behave exactly as transformers users expect. Its loading report is checked just
as strictly as our modules are (and misshaped tensors are named before transformers would). Which quantization an
LM gets is chosen here (``quantization_backend``: PyTorch's CPU kernels of ``cpu_quant`` for an LM on the CPU,
bitsandbytes elsewhere); with bitsandbytes' 4-bit on a CPU, the linear layers its packed kernel cannot run are found
here (``cpu_4bit_misfits``).
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import BitsAndBytesConfig

from .checkpoint import LM_PREFIX, CheckpointError, weight_files
from .cpu_quant import missing_kernels
from .devices import _as_torch_device, _lm_class

log = logging.getLogger(__name__)


@contextmanager
def _quiet_transformers():
    """transformers prints a table of the non-LM keys as 'unexpected'; we check them ourselves."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def _lm_skeleton(config):
    """The LM on the meta device: its module names and shapes, no memory."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return _lm_class(config).from_config(config.text_config)


def _check_lm_shapes(folder: Path, config) -> None:
    """Name misshaped LM tensors before transformers would (its own report is silenced above)."""
    expected = {k: tuple(v.shape) for k, v in _lm_skeleton(config).state_dict().items()}
    bad = []
    for file in weight_files(folder):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                name = key[len(LM_PREFIX) :]
                if key.startswith(LM_PREFIX) and name in expected:
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != expected[name]:
                        bad.append(f"{key}: checkpoint {shape}, model {expected[name]}")
    if bad:
        raise CheckpointError(
            f"{folder}: the language model does not match its config — wrong shapes: " + "; ".join(bad)
        )


# bitsandbytes >= 0.49 (0.50.2 here; 0.48 has no such path) runs 4-bit layers on a CPU with AVX512-BF16 through a
# packed kernel: at a layer's first forward in inference (cpu input, eval mode, no grad), ``Linear4bit.forward``
# calls ``functional._convert_weight_packed_for_cpu(weight, quant_state, block_n=32)``, which needs
#   ``assert N % block_n == 0, "N must be divisible by block_n"``  (N = out_features, block_n = 32), and
#   ``absmax.reshape(N, K // blocksize)``  (K = in_features, blocksize 64: NF4's default) — K % 64 == 0, else a
#   RuntimeError ("shape '[N, 0]' is invalid …"). The input dtype does not matter (the kernel computes in bfloat16).
# CPUs without AVX512-BF16, older bitsandbytes and CUDA dequantize instead and take any width.
CPU_4BIT_BLOCK_N = 32  # functional._convert_weight_packed_for_cpu's block_n
CPU_4BIT_BLOCKSIZE = 64  # Params4bit's default blocksize (transformers' BitsAndBytesConfig sets none)


def _bnb_packs_4bit_on_cpu() -> bool:
    """Whether this bitsandbytes, on this CPU, runs 4-bit layers through its packed kernel (see above)."""
    import bitsandbytes.functional as bnb_functional

    packs = hasattr(bnb_functional, "_convert_weight_packed_for_cpu")
    has_avx512bf16 = getattr(bnb_functional, "has_avx512bf16", None)
    return bool(packs and has_avx512bf16 is not None and has_avx512bf16())


def _module_device(name: str, device_map: dict) -> torch.device:
    """The device a module of the LM is placed on: the entry of ``device_map`` with the longest matching prefix."""
    matches = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    where = device_map[max(matches, key=len)] if matches else "cpu"
    return torch.device("cpu") if where == "disk" else _as_torch_device(where)  # disk-offloaded layers run on cpu


def cpu_4bit_misfits(config, device_map: dict) -> list[str]:
    """LM linear layers (names inside the LM) that bitsandbytes' packed CPU 4-bit kernel cannot run.

    A layer is listed when it would be quantized (not among transformers' own modules-not-to-convert), is placed on
    the CPU, and has ``out_features % 32`` or ``in_features % 64`` — and only where that kernel is in use at all.
    """
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    if not _bnb_packs_4bit_on_cpu():
        return []
    skeleton = _lm_skeleton(config)
    already_float = get_keys_to_not_convert(skeleton) + list(skeleton._keep_in_fp32_modules or ())
    misfits = []
    for name, module in skeleton.named_modules():
        if not (type(module) is torch.nn.Linear or isinstance(module, Conv1D)):  # what transformers replaces
            continue
        if not should_convert_module(name, already_float) or _module_device(name, device_map).type != "cpu":
            continue
        n_in, n_out = module.weight.shape if isinstance(module, Conv1D) else (module.in_features, module.out_features)
        if n_out % CPU_4BIT_BLOCK_N or n_in % CPU_4BIT_BLOCKSIZE:
            misfits.append(name)
    return misfits


def quantization_backend(quantization: str | None, bits: int | None, device_map: dict) -> str | None:
    """Which layers quantize the LM: "torch" (``cpu_quant``: PyTorch's CPU kernels), "bitsandbytes", or None.

    ``quantization``: None — "torch" where every LM module is on the CPU (bitsandbytes' CPU layers are slower than
    float there: README), else "bitsandbytes" (CUDA, disk offload); "torch" — refused unless the LM is wholly on
    the CPU; "bitsandbytes" — as asked. ``device_map``: the LM's plan (names inside the LM → device). Where this
    torch lacks the kernels, "torch" falls back to bitsandbytes with a warning.
    """
    if bits is None:
        return None
    places = {"disk" if w == "disk" else str(_as_torch_device(w)) for w in device_map.values()}
    off_cpu = sorted(p for p in places if p != "cpu")
    if quantization == "bitsandbytes" or (quantization is None and off_cpu):
        return "bitsandbytes"
    if off_cpu:
        raise ValueError(
            f"quantization='torch' runs on PyTorch's CPU kernels, but the device map puts language model layers on "
            f"{', '.join(off_cpu)}: keep the LM on the CPU, or use quantization='bitsandbytes' (or None) there."
        )
    missing = missing_kernels(bits)
    if missing:
        log.warning(
            "%d-bit on CPU: this torch (%s) lacks %s; the language model is quantized by bitsandbytes instead (slower "
            "than float on a CPU).",
            bits,
            torch.__version__,
            ", ".join(f"torch.ops.aten.{name}" for name in missing),
        )
        return "bitsandbytes"
    return "torch"


def load_language_model(
    folder: Path,
    config,
    core_keys: set[str],
    *,
    dtype: torch.dtype,
    device_map: dict,
    load_in_8bit: bool,
    load_in_4bit: bool,
    offload_folder: str | None,
    keep_float: list[str] | tuple[str, ...] = (),
):
    """The LM through transformers' ``from_pretrained`` on the checkpoint's ``language_model.*`` keys.

    ``keep_float``: names of LM modules (inside the LM) left in ``dtype`` when quantizing, besides transformers' own.
    """
    _check_lm_shapes(folder, config)
    kwargs: dict = {
        "config": config.text_config,
        "key_mapping": {"^" + re.escape(LM_PREFIX): ""},
        "dtype": dtype,
        "device_map": device_map,
        "output_loading_info": True,
        "use_safetensors": True,
        "trust_remote_code": False,
    }
    if load_in_8bit or load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=load_in_8bit,
            load_in_4bit=load_in_4bit,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
        )
        if keep_float:
            from transformers.quantizers.base import get_keys_to_not_convert

            # llm_int8_skip_modules REPLACES transformers' default modules-not-to-convert (lm_head, tied and
            # output embeddings): name those again. Its _keep_in_fp32_modules (T5's "wo") are still added by it.
            defaults = get_keys_to_not_convert(_lm_skeleton(config))
            kwargs["quantization_config"].llm_int8_skip_modules = sorted({*defaults, *keep_float})
    if offload_folder:
        kwargs["offload_folder"] = offload_folder
    with _quiet_transformers():
        lm, info = _lm_class(config).from_pretrained(folder, **kwargs)
    problems = []
    if info["missing_keys"]:
        problems.append("missing keys: " + ", ".join(LM_PREFIX + k for k in sorted(info["missing_keys"])))
    if info["mismatched_keys"]:
        problems.append("wrong shapes: " + ", ".join(LM_PREFIX + str(k[0]) for k in info["mismatched_keys"]))
    stray = sorted(k for k in info["unexpected_keys"] if k not in core_keys)
    if stray:
        problems.append("unexpected keys: " + ", ".join(LM_PREFIX + k for k in stray))
    if problems:
        raise CheckpointError(f"{folder}: the language model does not match its config — " + " | ".join(problems))
    lm.eval()
    if hasattr(lm, "_hf_hook"):
        lm._hf_hook.io_same_device = True  # generate() gets its outputs back on the input device
    return lm
