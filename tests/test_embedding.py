"""Multimodal embeddings: ``vlm.embed`` against transformers' query outputs, BLIP-Diffusion's Q-Former against
diffusers' own class (run in its own environment, see ``reference_env.py``), and ``python -m blipdemo.embed``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reference_env
import torch
from checkpoints import make_retrieval_checkpoint
from conftest import COMBOS, OFFLINE
from PIL import Image
from reference import reference
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import blipdemo
from blipdemo.embedding import text_ids
from blipdemo.loading import CheckpointError

HERE = Path(__file__).resolve().parent
SUBJECTS = ["dog", "red car", "A small CAT sitting", "zebra on a house", "toy"]


# ------------------------------------------------------------------------------------------------
# InstructBLIP / BLIP-2: the Q-Former's query outputs, as transformers computes them
def _reference_query_outputs(folder, image, text: str | None) -> torch.Tensor:
    model, processor, family = reference(folder)
    pixel_values = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    kwargs = {}
    if family == "instructblip":
        if text is None:
            ids = torch.zeros(1, 0, dtype=torch.long)  # no instruction: the queries read the image alone
        else:
            ids = processor.qformer_tokenizer(text, return_tensors="pt")["input_ids"]
        kwargs["qformer_input_ids"] = ids
    with torch.no_grad():
        out = model.get_image_features(pixel_values, return_dict=True, **kwargs)
    return out.qformer_outputs[0][0, : model.config.num_query_tokens]


@pytest.mark.parametrize("family,lm", COMBOS)
def test_embed_matches_transformers_query_outputs(loaded, checkpoint_dir, images, family, lm):
    vlm = loaded(family, lm)
    folder = checkpoint_dir(family, lm)
    texts = [None, "What color is the circle?", "Describe the image in detail."] if family == "instructblip" else [None]
    for image in images:
        for text in texts:
            ours = vlm.embed(image, text)
            expected = _reference_query_outputs(folder, image, text)
            assert ours.shape == (vlm.config.num_query_tokens, vlm.config.qformer_config.hidden_size)
            torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    if family == "instructblip":  # the instruction really changes the embedding
        assert not torch.allclose(vlm.embed(images[0], "What color is the circle?"), vlm.embed(images[0]), atol=1e-3)


def test_embed_refuses_what_it_cannot_embed(loaded, images):
    instructblip, blip2 = loaded("instructblip", "llama"), loaded("blip2", "opt")
    with pytest.raises(ValueError, match="no text embeddings"):
        blip2.embed(images[0], "a dog")
    with pytest.raises(ValueError, match="empty"):
        instructblip.embed(images[0], "  \n")
    with pytest.raises(ValueError, match="too long"):
        instructblip.embed(images[0], "circle " * 500)
    with pytest.raises(ValueError, match="must be a string"):
        instructblip.embed(images[0], 42)
    with pytest.raises(blipdemo.ImageError):
        instructblip.embed(b"not an image at all", "a dog")


def test_load_qformer_on_a_generation_checkpoint_skips_the_language_model(loaded, checkpoint_dir, images):
    folder = checkpoint_dir("instructblip", "t5")
    encoder = blipdemo.load_qformer(folder, dtype="float32", device="cpu")
    assert encoder.language_model is None
    assert "no language model" in encoder.load_info["kind"]
    full = loaded("instructblip", "t5")
    torch.testing.assert_close(encoder.embed(images[1], "Where is it?"), full.embed(images[1], "Where is it?"))
    with pytest.raises(ValueError, match="without its language model"):
        encoder.ask(images[1], "Where is it?")


# ------------------------------------------------------------------------------------------------
# BLIP-2 image-text checkpoints: queries and text share self-attention
def test_blip2_image_text_checkpoint_matches_transformers(tmp_path, images):
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval, BlipImageProcessor

    folder = make_retrieval_checkpoint(tmp_path / "itm")
    reference = Blip2ForImageTextRetrieval.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = BlipImageProcessor.from_pretrained(folder)
    captured = []
    reference.qformer.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))

    def expected(image, text):
        captured.clear()
        pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
        ids = tokenizer(text or "x", return_tensors="pt")
        with torch.no_grad():  # the matching head reads [queries ; text]; the contrastive path the queries alone
            reference(pixel_values, ids["input_ids"], ids["attention_mask"], use_image_text_matching_head=bool(text))
        return captured[0][0, :4]

    model = blipdemo.load_qformer(folder, dtype="float32", device="cpu")
    assert isinstance(model, blipdemo.Blip2TextQFormer)
    for image in images:
        for text in (None, "a photo of a cat", "Where is the red square?"):
            torch.testing.assert_close(model.embed(image, text), expected(image, text), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model.embed(images[0], "a dog"), model.embed(images[0], "a cat"), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# BLIP-Diffusion: against diffusers' Blip2QFormerModel in the reference environment
def _test_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(7)
    arrays = [
        rng.integers(0, 256, (40, 50, 3), dtype=np.uint8),  # noise, not square
        np.kron(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8)),  # blocks
        np.linspace(0, 255, 90 * 30 * 3).reshape(30, 90, 3).astype(np.uint8),  # a wide gradient
        # RGBA, opaque: both sides drop the alpha channel. (Where it is not opaque, we composite on white as
        # everywhere in blipdemo; transformers 4.46's convert_to_rgb, under diffusers, just drops it.)
        np.concatenate([rng.integers(0, 256, (48, 36, 3), dtype=np.uint8), np.full((48, 36, 1), 255, np.uint8)], -1),
    ]
    paths = []
    for i, array in enumerate(arrays):
        paths.append(folder / f"image-{i}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


@pytest.fixture(scope="module", params=[1, 2], ids=["cross-every-layer", "cross-every-2nd-layer"])
def blip_diffusion(request, tmp_path_factory):
    """(pipeline folder, requests, reference tensors) made by diffusers 0.31 + transformers 4.46."""
    python = reference_env.ensure()
    folder = tmp_path_factory.mktemp(f"blipdiffusion-{request.param}")
    images = _test_images(folder)
    requests = [{"image": str(images[i % len(images)]), "text": text} for i, text in enumerate(SUBJECTS)]
    (folder / "requests.json").write_text(json.dumps(requests))
    command = [str(python), str(HERE / "blipdiffusion_reference.py"), str(folder / "out")]
    command += ["--requests", str(folder / "requests.json"), "--seed", str(request.param)]
    command += ["--cross-attention-frequency", str(request.param)]
    env = {**os.environ, **OFFLINE}  # the reference builds its BERT tokenizer offline: nothing to fetch
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "out" / "pipeline", requests, load_file(folder / "out" / "reference.safetensors")


def test_blip_diffusion_matches_diffusers(blip_diffusion):
    pipeline, requests, expected = blip_diffusion
    model = blipdemo.load_qformer(pipeline, dtype="float32", device="cpu")
    assert isinstance(model, blipdemo.BlipDiffusionQFormer)
    for i, request in enumerate(requests):
        ours = model.embed(request["image"], request["text"])
        assert ours.shape == expected[f"embeds.{i}"].shape == (4, 32)
        torch.testing.assert_close(ours, expected[f"embeds.{i}"], atol=1e-4, rtol=1e-4)
    # The subject word matters, and so does the picture.
    image = requests[0]["image"]
    assert not torch.allclose(model.embed(image, "dog"), model.embed(image, "car"), atol=1e-3)
    assert not torch.allclose(model.embed(image, "dog"), model.embed(requests[1]["image"], "dog"), atol=1e-3)
    assert model.embed(image).shape == (4, 32)  # no text: the queries read the image alone
    # Typed special tokens are plain text (as in the chat), where diffusers would read "[SEP]" as a separator.
    sep = model.tokenizer.sep_token_id
    assert text_ids(model.tokenizer, "dog [SEP] cat", 64)[0, 1:-1].tolist().count(sep) == 0


def test_blip_diffusion_qformer_folder_alone(blip_diffusion):
    """The qformer/ folder on its own: diffusers' processor defaults (square resize, CLIP statistics), not the
    pipeline's own mean / std, so the embedding differs from the pipeline's while the weights are the same."""
    pipeline, requests, expected = blip_diffusion
    alone = blipdemo.load_qformer(pipeline / "qformer", dtype="float32", device="cpu")
    whole = blipdemo.load_qformer(pipeline, dtype="float32", device="cpu")
    pixels = whole.image_processor(images=Image.open(requests[0]["image"]), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels[0], expected["pixels.0"])
    ids = text_ids(alone.tokenizer, requests[0]["text"], 64)
    with torch.no_grad():  # the same weights: from the pipeline's pixels, the same embedding
        torch.testing.assert_close(alone.embeddings_from_pixels(pixels, ids)[0], expected["embeds.0"])
    assert alone.image_processor.image_mean != whole.image_processor.image_mean


def test_blip_diffusion_from_the_hub_fetches_only_the_qformer(blip_diffusion, tmp_path, monkeypatch):
    """`load_qformer("Salesforce/blipdiffusion")`: a stand-in for the hub serves the pipeline's files (plus a
    UNet and a text encoder); only the Q-Former's and the image processor's files may be fetched."""
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    pipeline, requests, expected = blip_diffusion
    repo = tmp_path / "repo"
    shutil.copytree(pipeline, repo)
    for heavy in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/x.bin"):
        (repo / heavy).parent.mkdir(parents=True, exist_ok=True)
        (repo / heavy).write_bytes(b"\0" * 1024)
    fetched: list[str] = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        assert repo_id == "Salesforce/blipdiffusion"
        snapshot = tmp_path / "snapshot"
        files = [str(f.relative_to(repo)) for f in repo.rglob("*") if f.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / name, snapshot / name)
            fetched.append(name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = blipdemo.load_qformer("Salesforce/blipdiffusion", dtype="float32")
    torch.testing.assert_close(model.embed(requests[0]["image"], requests[0]["text"]), expected["embeds.0"])
    assert "qformer/model.safetensors" in fetched and "image_processor/preprocessor_config.json" in fetched
    assert not [name for name in fetched if name.startswith(("unet", "text_encoder", "vae"))], fetched


def test_blip_diffusion_bfloat16_stays_close(blip_diffusion):
    pipeline, requests, expected = blip_diffusion
    model = blipdemo.load_qformer(pipeline, dtype="bfloat16", device="cpu")
    ours = model.embed(requests[0]["image"], requests[0]["text"]).float()
    cos = torch.nn.functional.cosine_similarity(ours.flatten(), expected["embeds.0"].flatten(), dim=0)
    assert cos > 0.99


def test_compiled_vision_encoder_gives_the_same_embeddings(blip_diffusion, checkpoint_dir, images):
    """``compile=True`` (torch.compile of the ViT, weights frozen) changes speed, not results."""
    pipeline, requests, expected = blip_diffusion
    compiled = blipdemo.load_qformer(pipeline, dtype="float32", compile=True)
    assert compiled.load_info["compiled"]
    torch.testing.assert_close(compiled.embed(requests[0]["image"], requests[0]["text"]), expected["embeds.0"])
    folder = checkpoint_dir("instructblip", "llama")
    eager, compiled = (blipdemo.load_qformer(folder, dtype="float32", compile=c) for c in (False, True))
    torch.testing.assert_close(compiled.embed(images[0], "What is it?"), eager.embed(images[0], "What is it?"))


def test_blip_diffusion_tokenizer_sources(blip_diffusion, tmp_path):
    """config.json's "tokenizer" first (as diffusers); where that path is not on this machine, tokenizer files in
    the folder itself; with neither, a clear error (bert-base-uncased cannot be fetched here)."""
    import shutil

    pipeline, requests, expected = blip_diffusion
    config = json.loads((pipeline / "qformer" / "config.json").read_text())
    bert = Path(config["tokenizer"])
    moved = tmp_path / "qformer"
    shutil.copytree(pipeline / "qformer", moved)
    config["tokenizer"] = "/a/path/on/another/machine/bert"
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(blipdemo.CheckpointUnavailable, match="another/machine"):
        blipdemo.load_qformer(moved, dtype="float32")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bert / name, moved / name)
    model = blipdemo.load_qformer(moved, dtype="float32")
    ids = text_ids(model.tokenizer, requests[0]["text"], 64)
    with torch.no_grad():  # qformer/ alone normalises with the processor's defaults: start from the pipeline's pixels
        embedding = model.embeddings_from_pixels(expected["pixels.0"][None], ids)[0]
    torch.testing.assert_close(embedding, expected["embeds.0"], atol=1e-4, rtol=1e-4)


def test_blip_diffusion_loading_is_strict(blip_diffusion, tmp_path):
    pipeline, _, _ = blip_diffusion
    source = pipeline / "qformer"
    state = load_file(source / "model.safetensors")
    for name in ("config.json",):
        (tmp_path / name).write_text((source / name).read_text())
    broken = dict(state)
    del broken["proj_layer.dense1.weight"]
    broken["proj_layer.extra"] = torch.zeros(3)
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"proj_layer\.dense1\.weight.*proj_layer\.extra"):
        blipdemo.load_qformer(tmp_path, dtype="float32")
    broken = dict(state, **{"embeddings.position_ids": torch.arange(64).flip(0)[None]})
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="position_ids"):
        blipdemo.load_qformer(tmp_path, dtype="float32")


# ------------------------------------------------------------------------------------------------
# The command
def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    root = HERE.parent
    # Offline with an empty hub cache: the default model (Salesforce/blipdiffusion) is neither downloaded nor
    # found in this machine's cache, so a command without --model falls back to the embedded model everywhere.
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", **OFFLINE, "HF_HUB_CACHE": str(cwd / "empty-hub-cache")}
    return subprocess.run(
        [sys.executable, "-m", "blipdemo.embed", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_embed_command_saves_and_compares(blip_diffusion, tmp_path):
    pipeline, requests, expected = blip_diffusion
    first, second = requests[0]["image"], requests[1]["image"]
    args = (first, "dog", "--model", str(pipeline), "--compare", second, "--output", "out.safetensors")
    done = _run(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "(4, 32)" in done.stdout
    with safe_open(tmp_path / "out.safetensors", framework="pt") as f:
        assert f.metadata()["text"] == "dog"
        saved, other = f.get_tensor("embedding"), f.get_tensor("compare_embedding")
    torch.testing.assert_close(saved, expected["embeds.0"], atol=1e-4, rtol=1e-4)  # request 0 is image 0 + "dog"
    a, b = saved.flatten().double(), other.flatten().double()
    cosine = float(a @ b / (a.norm() * b.norm()))
    assert f"cosine similarity with {second}: {cosine:.4f}" in done.stdout


def test_embed_command_default_output_and_bad_input(checkpoint_dir, tmp_path):
    image = tmp_path / "photo.png"
    Image.new("RGB", (20, 30), (10, 200, 30)).save(image)
    folder = str(checkpoint_dir("instructblip", "llama"))
    done = _run(str(image), "What is it?", "--model", folder, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "photo.embedding.safetensors").is_file()
    (tmp_path / "fake.png").write_bytes(b"\x89PNG not really")
    done = _run(str(tmp_path / "fake.png"), "--model", folder, cwd=tmp_path)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr
    done = _run(str(image), "a dog", "--model", str(checkpoint_dir("blip2", "opt")), cwd=tmp_path)
    assert done.returncode == 2 and "no text embeddings" in done.stderr
    done = _run(str(image), "--model", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert done.returncode == 2 and "nowhere" in done.stderr
    nowhere = str(tmp_path / "no" / "such" / "x.safetensors")
    done = _run(str(image), "--model", folder, "--output", nowhere, cwd=tmp_path)
    assert done.returncode == 2 and "does not exist" in done.stderr
    done = _run(str(image), "--model", folder, "--dtype", "int8", cwd=tmp_path)
    assert done.returncode == 2 and "dtype" in done.stderr and "Traceback" not in done.stderr


def test_embed_command_falls_back_to_the_embedded_model(tmp_path):
    """Offline, nothing cached: the default BLIP-Diffusion model cannot be had, so the embedded model answers."""
    example = sorted((HERE.parent / "assets" / "examples").glob("*.png"))[0]
    done = _run(str(example), "What color is the circle?", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "embedded tiny model" in done.stderr and "(16, 128)" in done.stdout
