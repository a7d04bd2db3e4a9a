"""Checkpoints whose LM tokenizer is only a sentencepiece model (``tokenizer.model`` / ``spiece.model``, no
``tokenizer.json``): older LLaMA / Vicuna and T5 folders and LAVIS conversions.

The sentencepiece models are trained here, offline, on the shared corpus; transformers converts them, and our
answers are compared with transformers' own processor + model loading the very same folder.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from checkpoints import CORPUS, make_checkpoint
from conftest import OFFLINE
from reference import reference, reference_answer
from transformers import LlamaTokenizer, T5Tokenizer

import blipdemo
from blipdemo.loading import sentencepiece_only

PROMPTS = ["What color is the circle?", "Describe the image in detail.", "how many shapes are there"]
GREEDY = dict(max_new_tokens=10, num_beams=1, do_sample=False)
# Special ids as the real models have them: LLaMA (BPE with byte fallback) <unk>=0 <s>=1 </s>=2 and no pad;
# T5 (unigram) <pad>=0 </s>=1 <unk>=2 and no BOS.
LLAMA_SPM = dict(model_type="bpe", vocab_size=400, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
T5_SPM = dict(model_type="unigram", vocab_size=120, unk_id=2, bos_id=-1, eos_id=1, pad_id=0)
KINDS = {
    "instructblip-llama": ("instructblip", "llama", LlamaTokenizer, "tokenizer.model", LLAMA_SPM),
    "blip2-t5": ("blip2", "t5", T5Tokenizer, "spiece.model", T5_SPM),
}


def train_sentencepiece(path: Path, options: dict) -> Path:
    """A sentencepiece model trained on CORPUS, written to ``path``."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        character_coverage=1.0,
        hard_vocab_limit=False,  # the corpus is small: the vocabulary is what it holds, up to vocab_size
        minloglevel=2,
        num_threads=1,
        **options,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def sentencepiece_checkpoint(root: Path, kind: str, image_token_listed: bool) -> Path:
    """A random checkpoint whose LM tokenizer folder holds only the sentencepiece model + tokenizer_config.json.

    ``image_token_listed``: tokenizer_config.json lists ``<image>`` in ``added_tokens_decoder``, as transformers 4
    saved it; otherwise it is what transformers 5 saves (it keeps added tokens in tokenizer.json, removed here).
    """
    family, lm, tokenizer_class, filename, options = KINDS[kind]
    model = train_sentencepiece(root / "spm" / filename, options)
    tokenizer = tokenizer_class.from_pretrained(model.parent)  # transformers converts the sentencepiece model
    folder = make_checkpoint(root / "checkpoint", family, lm, tokenizer=tokenizer)  # its processor adds <image>
    (folder / "tokenizer.json").unlink()
    shutil.copy(model, folder / filename)
    if image_token_listed:
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["added_tokens_decoder"] = {
            str(i): {k: getattr(t, k) for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for i, t in tokenizer.added_tokens_decoder.items()
        }
        config_file.write_text(json.dumps(config, indent=2))
    assert sentencepiece_only(folder) == folder / filename
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    built: dict = {}

    def get(kind: str, image_token_listed: bool = False) -> Path:
        key = (kind, image_token_listed)
        if key not in built:
            built[key] = sentencepiece_checkpoint(tmp_path_factory.mktemp(kind), kind, image_token_listed)
        return built[key]

    return get


@pytest.mark.parametrize(
    "kind,image_token_listed", [("instructblip-llama", False), ("instructblip-llama", True), ("blip2-t5", False)]
)
def test_sentencepiece_only_folder_answers_as_reference(folders, images, kind, image_token_listed):
    folder = folders(kind, image_token_listed)
    vlm = blipdemo.load(folder, dtype="float32", device="cpu")
    _, processor, _ = reference(folder)
    assert type(vlm.tokenizer).__name__ == KINDS[kind][2].__name__
    # The query placeholder is where the processor puts it, and where the model looks for it.
    image_token = vlm.config.image_token_index
    assert vlm.tokenizer.convert_tokens_to_ids("<image>") == image_token
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_token
    assert len(vlm.tokenizer) == len(processor.tokenizer) == vlm.config.text_config.vocab_size
    assert vlm.tokenizer.decode([image_token, 5], skip_special_tokens=True) == processor.tokenizer.decode(
        [image_token, 5], skip_special_tokens=True
    )
    # "<image>" typed by a user is text, not the placeholder.
    assert (
        image_token
        not in vlm.prepare(vlm.question(images[0], "What is <image>?", max_new_tokens=4)).input_ids[0].tolist()
    )
    answers = set()
    for image in images:
        for prompt in PROMPTS:
            got = vlm.ask(image, prompt, **GREEDY)
            assert got == reference_answer(folder, image, prompt, **GREEDY), (kind, prompt)
            answers.add(got)
    assert len(answers) > 1, "answers should depend on the image and the prompt"


def test_sentencepiece_only_logits_match_reference(folders, images):
    folder = folders("instructblip-llama")
    vlm = blipdemo.load(folder, dtype="float32", device="cpu")
    model, processor, _ = reference(folder)
    inputs = processor(images=images[1], text=PROMPTS[0], return_tensors="pt")
    q = vlm.config.num_query_tokens
    with torch.no_grad():
        expected = model(**inputs).logits
        ours = vlm(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"][:, q:],
            qformer_input_ids=inputs["qformer_input_ids"],
            qformer_attention_mask=inputs["qformer_attention_mask"],
        ).logits
    assert (ours - expected).abs().max().item() < 1e-4


# Runs blipdemo.load in a fresh interpreter in which the named top-level packages cannot be found (as if not
# installed): transformers' own availability checks then report them missing.
WITHOUT = """
import importlib.machinery, sys

hidden = tuple(sys.argv[2].split(","))

class Hide:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.startswith(hidden):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    @classmethod
    def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()

    @classmethod
    def find_distributions(cls, *args, **kwargs):  # importlib.metadata asks the meta path finders too
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)

sys.meta_path[:] = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
import blipdemo

try:
    blipdemo.load(sys.argv[1], dtype="float32", device="cpu")
except ValueError as e:
    print(type(e).__name__, e)
else:
    print("loaded")
"""


@pytest.mark.parametrize("hidden", ["sentencepiece", "google.protobuf"])
def test_missing_sentencepiece_or_protobuf_is_a_clear_error(folders, hidden):
    folder = folders("instructblip-llama")
    path = os.pathsep.join([str(Path(blipdemo.__file__).parent.parent), *sys.path])
    env = {**os.environ, **OFFLINE, "PYTHONPATH": path}
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT, str(folder), hidden], capture_output=True, text=True, env=env, timeout=300
    )
    out = run.stdout.strip()
    assert out.startswith("CheckpointError"), run.stdout + run.stderr
    assert "tokenizer.model" in out and "pip install sentencepiece protobuf" in out
    assert f"{hidden.split('.')[-1]} is not installed" in out
    assert "tiktoken" not in out


def test_tiktoken_model_file_is_not_taken_for_sentencepiece(tmp_path):
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # tiktoken's format: base64 token, rank
    assert sentencepiece_only(tmp_path) is None
    train_sentencepiece(tmp_path / "spiece.model", T5_SPM)
    assert sentencepiece_only(tmp_path) == tmp_path / "spiece.model"
    (tmp_path / "tokenizer.json").write_text("{}")
    assert sentencepiece_only(tmp_path) is None
