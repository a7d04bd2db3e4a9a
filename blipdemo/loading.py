"""Checkpoint resolution, strict loading, 8-bit / 4-bit LMs and device maps.

- A hub id is fetched with ``huggingface_hub.snapshot_download`` (progress bars in the terminal; only
  JSON, safetensors and tokenizer files — never a pickle); a local folder is used as it is.
- Our modules (``vision_model``, ``qformer``, ``query_tokens``, ``language_projection``) are built on
  the meta device and filled from the safetensors shards with ``load_state_dict(strict=True,
  assign=True)`` after a check that names every missing, unexpected or misshaped key.
- The LM is loaded by transformers' ``from_pretrained`` from the same files (``language_model.`` keys,
  via ``key_mapping``), so ``BitsAndBytesConfig``, ``device_map``, ``max_memory`` and cpu/disk offload
  behave exactly as transformers users expect. Its loading report is checked just as strictly.
- Device maps are planned for the whole stack with accelerate on meta tensors: the vision encoder,
  Q-Former and projection stay together on the first device (with room reserved for them), and the LM
  is split with its own no-split rules (a decoder layer is never cut).
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import (
    AddedToken,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    Blip2Config,
    InstructBlipConfig,
)

from .embedding import Blip2TextQFormer, BlipDiffusionQFormer
from .model import VisionLanguageModel
from .service import Service, check_max_batch_size

log = logging.getLogger(__name__)

LM_PREFIX = "language_model."
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "qformer_tokenizer/*"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
STRING_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
CORE_NAMES = ("vision_model", "query_tokens", "qformer", "language_projection")  # our modules: one block, one device


class CheckpointError(ValueError):
    """The checkpoint cannot be used; the message names the folder, the file or the key."""


class CheckpointUnavailable(CheckpointError):
    """A hub checkpoint that cannot be fetched (no network) and is not in the local cache."""


# --------------------------------------------------------------------------------------------------
# Files
def resolve_checkpoint(
    name_or_path: str | Path, revision: str | None = None, patterns: list[str] = HUB_PATTERNS
) -> Path:
    """A local folder as it is, or a hub id downloaded (or found in the cache) into a local snapshot
    (only the files that match ``patterns``)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{str(path)!r} is a file; a checkpoint is a folder (config.json + safetensors).")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"No checkpoint folder at {name!r}, and it is not a hub id of the form 'owner/name'.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id=name, revision=revision, allow_patterns=patterns))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, HFValidationError) as e:
        raise CheckpointError(f"{name!r} is not a model on the Hugging Face Hub that we can read: {e}") from e
    except (LocalEntryNotFoundError, OSError) as e:
        raise CheckpointUnavailable(
            f"{name!r} cannot be fetched (no connection to the Hugging Face Hub?) and is not in the local cache."
        ) from e


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint (sharded or not); pickles are refused, never opened."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards named in {index.name} are missing: {missing}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}). Pickle files can run arbitrary code "
            "when loaded, so blipdemo reads safetensors only: convert the checkpoint with "
            "`save_pretrained(..., safe_serialization=True)` in a trusted environment."
        )
    raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json.")


def read_config(folder: Path) -> InstructBlipConfig | Blip2Config:
    """The checkpoint's transformers config; only InstructBLIP and BLIP-2 configs are accepted."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json.")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if not isinstance(config, InstructBlipConfig | Blip2Config):
        raise CheckpointError(
            f"{folder} is a {type(config).__name__} checkpoint; blipdemo loads InstructBLIP and BLIP-2 checkpoints."
        )
    return config


# --------------------------------------------------------------------------------------------------
# Our modules
def read_state(files: list[Path], skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint whose name does not start with one of ``skip``."""
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles have keys(), not iteration
                if not key.startswith(skip):  # startswith(()) is False: nothing skipped
                    state[key] = f.get_tensor(key)
    return state


def read_core_state(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint that is not the LM's."""
    return read_state(files, skip=(LM_PREFIX,))


def tensor_names(files: list[Path]) -> set[str]:
    """The names of all the checkpoint's tensors (no tensor is read)."""
    names: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            names.update(f.keys())  # noqa: SIM118
    return names


def core_keys(files: list[Path]) -> set[str]:
    """The names of the checkpoint's tensors that are not the LM's (no tensor is read)."""
    return {k for k in tensor_names(files) if not k.startswith(LM_PREFIX)}


def check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, torch.Tensor], where: str) -> None:
    """Raise ``CheckpointError`` naming every missing, unexpected and misshaped key."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{k}: checkpoint {tuple(found[k].shape)}, model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if misshaped:
        problems.append("wrong shapes: " + "; ".join(misshaped))
    if problems:
        raise CheckpointError(f"{where} does not match its config.json — " + " | ".join(problems))


def load_core(vlm: VisionLanguageModel, state: dict[str, torch.Tensor], where: str) -> None:
    """Fill the meta-device core modules of ``vlm`` from ``state`` (strict, by assignment)."""
    expected = {"query_tokens": tuple(vlm.query_tokens.shape)}
    for prefix, module in vlm.core_modules().items():
        expected.update({f"{prefix}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
    check_keys(expected, state, where)
    for prefix, module in vlm.core_modules().items():
        part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        module.load_state_dict(part, strict=True, assign=True)
    vlm.query_tokens = torch.nn.Parameter(state["query_tokens"])


# --------------------------------------------------------------------------------------------------
# Devices and dtypes
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


# --------------------------------------------------------------------------------------------------
# The LM
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


# --------------------------------------------------------------------------------------------------
# Entry point
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
) -> Service:
    """Load an InstructBLIP / BLIP-2 checkpoint (hub id or local folder) and serve it: a ``Service`` (``ask``,
    ``stream``, ``explain``, ``embed``, the forward call) around the ``VisionLanguageModel`` (``.model``).

    ``dtype``: None (bfloat16 where the device supports it, else float32) | "float32" | "bfloat16" |
    "float16". ``device``: "cpu", "cuda", "cuda:1"… (None: cuda if available). ``device_map`` /
    ``max_memory``: split the LM over several devices (accelerate). ``load_in_8bit`` / ``load_in_4bit``:
    bitsandbytes LM weights; the vision encoder and Q-Former stay in ``dtype``. ``compile``: compile the
    vision encoder with torch.compile (inductor, weights frozen and prepacked: inference only; ~40 s once at
    load, then ~1.2× faster on this CPU — see benchmarks/speed.py). ``max_batch_size``: concurrent requests (from
    threads, as the app makes them) decode together in batches of up to this many rows (1: one at a time).
    """
    if load_in_8bit and load_in_4bit:
        raise ValueError("Choose one of load_in_8bit and load_in_4bit.")
    check_max_batch_size(max_batch_size)
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

    vlm = _load_core_model(folder, config, files, core_device, dtype, cache_size)
    lm_map = _lm_part(plan)
    # Layers bitsandbytes' CPU 4-bit kernel would fail on at their first forward (mid-answer): keep them in dtype.
    keep_float = cpu_4bit_misfits(config, lm_map) if load_in_4bit else []
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
    model = vlm.model
    model.language_model = load_language_model(
        folder,
        config,
        core_keys(files),
        dtype=dtype,
        device_map=lm_map,
        load_in_8bit=load_in_8bit,
        load_in_4bit=load_in_4bit,
        offload_folder=offload_folder,
        keep_float=keep_float,
    )
    if compile:
        compile_vision_encoder(model)
    load_info = {
        "name": str(name_or_path),
        "folder": str(folder),
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": "8-bit" if load_in_8bit else "4-bit" if load_in_4bit else None,
        # LM layers kept in ``dtype`` although quantization was asked for (bitsandbytes cannot run them here)
        "unquantized": [LM_PREFIX + name for name in keep_float],
        "device_map": plan if device_map is not None else None,
        "device": str(core_device),
        "compiled": compile,
        "max_batch_size": max_batch_size,
    }
    return Service(
        model,
        vlm.tokenizer,
        vlm.qformer_tokenizer,
        vlm.image_processor,
        cache_size=cache_size,
        max_batch_size=max_batch_size,
        load_info=load_info,
    )


# --------------------------------------------------------------------------------------------------
# Tokenizers
TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")  # "base64-token rank": a tiktoken vocabulary, also *.model


def sentencepiece_only(folder: Path) -> Path | None:
    """The sentencepiece model of a tokenizer folder without ``tokenizer.json`` (older LLaMA / Vicuna and T5 folders,
    LAVIS conversions: ``tokenizer.model``, ``spiece.model``), or None."""
    if (folder / "tokenizer.json").is_file():
        return None
    for path in sorted(folder.glob("*.model")):
        with path.open("rb") as f:
            if not TIKTOKEN_LINE.match(f.readline(200)):
                return path
    return None


def _sentencepiece_problem() -> tuple[str, str] | None:
    """Why transformers cannot convert a sentencepiece model here, and the command that fixes it (None: it can).

    transformers 5 reads a ``.model`` file with its ``SentencePieceExtractor``, which needs both packages and
    sentencepiece's protobuf schema; when that fails it falls back to reading the file as a tiktoken vocabulary, and
    the error the user sees is about ``tiktoken``.
    """
    from transformers import utils

    missing = [name for name in ("sentencepiece", "protobuf") if not getattr(utils, f"is_{name}_available")()]
    if missing:
        return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed", "sentencepiece protobuf"
    try:
        from transformers.convert_slow_tokenizer import import_protobuf

        import_protobuf()  # sentencepiece's model schema: a protobuf older than this sentencepiece's fails here
    except Exception as e:  # VersionError, ImportError: whatever makes transformers fall back to tiktoken
        return f"protobuf cannot load sentencepiece's model schema: {type(e).__name__}: {e}", "-U protobuf"
    return None


def load_tokenizer(folder: Path):
    """``AutoTokenizer`` for a tokenizer folder; a folder that holds only a sentencepiece model needs the sentencepiece
    and protobuf packages, and their absence is a clear error here rather than transformers' message about tiktoken."""
    model = sentencepiece_only(folder)
    problem = _sentencepiece_problem() if model is not None else None
    if problem:
        raise CheckpointError(
            f"{folder}: the tokenizer is a sentencepiece model only ({model.name}, no tokenizer.json), and "
            f"transformers needs the sentencepiece and protobuf packages to read it ({problem[0]}). Install them: "
            f"pip install {problem[1]}"
        )
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _load_core_model(
    folder: Path, config, files: list[Path], device: torch.device, dtype: torch.dtype, cache_size: int
) -> Service:
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
    return Service(model, tokenizer, qformer_tokenizer, image_processor, cache_size=cache_size)


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


# --------------------------------------------------------------------------------------------------
# The Q-Former alone: multimodal embeddings
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
):
    """The Q-Former as an image (+ text) encoder; the returned object's ``embed(image, text=None)`` gives a
    (num_query_tokens, hidden) multimodal embedding.

    ``name_or_path``: BLIP-Diffusion (``Salesforce/blipdiffusion``, a local copy of that pipeline, or its
    ``qformer/`` folder) → a ``BlipDiffusionQFormer`` whose embeddings are what the pipeline conditions on
    (``ProjLayer`` applied); a BLIP-2 image-text checkpoint (``Salesforce/blip2-itm-vit-g``) → a
    ``Blip2TextQFormer`` (queries and text share self-attention); an InstructBLIP / BLIP-2 generation
    checkpoint → its ``VisionLanguageModel`` without the language model (nothing of the LM is loaded), whose
    ``embed`` gives the Q-Former's query outputs.
    From the hub only the Q-Former's files are fetched. ``dtype`` / ``device`` / ``compile`` as in ``load``.
    """
    folder, processor_folder, pipeline = _qformer_folders(name_or_path, revision)
    core_device = resolve_device(device)
    dtype = resolve_dtype(dtype, core_device)
    config = read_config(folder)
    files = weight_files(folder)
    keys = tensor_names(files)
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
        model = _load_core_model(folder, config, files, core_device, dtype, cache_size=16)
        kind = ("InstructBLIP" if model.family == "instructblip" else "BLIP-2") + " Q-Former (no language model)"
    else:
        raise CheckpointError(
            f"{folder} is neither a BLIP-Diffusion Q-Former (visual_encoder.* keys), a BLIP-2 image-text checkpoint "
            "(embeddings.word_embeddings), nor an InstructBLIP / BLIP-2 checkpoint (language_model.* keys)."
        )
    if compile:
        compile_vision_encoder(model.model if isinstance(model, Service) else model)
    model.load_info = {
        "name": str(name_or_path),
        "folder": str(folder),
        "kind": kind,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(core_device),
        "compiled": compile,
    }
    return model
