"""Tokenizers of a checkpoint folder: ``AutoTokenizer``, with a clear error where a sentencepiece-only folder
cannot be read (the sentencepiece and protobuf packages missing or mismatched)."""

from __future__ import annotations

import re
from pathlib import Path

from transformers import AutoTokenizer

from .checkpoint import CheckpointError

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
