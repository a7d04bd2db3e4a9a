"""Checkpoints: a hub id or a local folder, its config and safetensors shards, strict loading of our modules.

- A hub id is fetched with ``huggingface_hub.snapshot_download`` (progress bars in the terminal; only
  JSON, safetensors and tokenizer files — never a pickle); a local folder is used as it is.
- Our modules (``vision_model``, ``qformer``, ``query_tokens``, ``language_projection``) are built on
  the meta device and filled from the safetensors shards with ``load_state_dict(strict=True,
  assign=True)`` after a check that names every missing, unexpected or misshaped key.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, Blip2Config, InstructBlipConfig

from ..model import VisionLanguageModel

LM_PREFIX = "language_model."
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "qformer_tokenizer/*"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
