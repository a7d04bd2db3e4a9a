"""Strict, loud loading: every missing, unexpected or misshaped key is named; pickles are refused."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import blipdemo
from blipdemo.loading import CheckpointError


def _copy(folder, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    return target


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "key",
    [
        "vision_model.encoder.layers.1.self_attn.qkv.weight",
        "qformer.encoder.layer.0.crossattention.attention.key.bias",
        "query_tokens",
        "language_model.model.layers.1.mlp.up_proj.weight",
    ],
)
def test_missing_key_is_named(checkpoint_dir, tmp_path, key):
    folder = _copy(checkpoint_dir("instructblip", "llama"), tmp_path)
    _edit_weights(folder, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match="missing keys: .*" + key.replace(".", r"\.")):
        blipdemo.load(folder, dtype="float32")


def test_wrong_shape_is_named(checkpoint_dir, tmp_path):
    folder = _copy(checkpoint_dir("instructblip", "llama"), tmp_path)
    key = "qformer.encoder.layer.1.intermediate_query.dense.weight"
    _edit_weights(folder, lambda s: s.__setitem__(key, torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=r"wrong shapes: " + key.replace(".", r"\.") + r": checkpoint \(3, 3\)"):
        blipdemo.load(folder, dtype="float32")


def test_unexpected_key_is_named(checkpoint_dir, tmp_path):
    folder = _copy(checkpoint_dir("blip2", "opt"), tmp_path)
    _edit_weights(folder, lambda s: s.__setitem__("qformer.extra_head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected keys: qformer\.extra_head\.weight"):
        blipdemo.load(folder, dtype="float32")


def test_wrong_lm_shape_is_an_error(checkpoint_dir, tmp_path):
    folder = _copy(checkpoint_dir("blip2", "t5"), tmp_path)
    key = "language_model.lm_head.weight"
    _edit_weights(folder, lambda s: s.__setitem__(key, torch.zeros(7, 48)))
    with pytest.raises((CheckpointError, RuntimeError), match="lm_head"):
        blipdemo.load(folder, dtype="float32")


def test_config_is_read_not_assumed(checkpoint_dir, images):
    # qkv without bias, a cross-attention in every layer, 6 queries, 16-px patches on 48-px images.
    folder = checkpoint_dir(
        "instructblip",
        "llama",
        qkv_bias=False,
        cross_attention_frequency=1,
        num_query_tokens=6,
        patch_size=16,
        image_size=48,
    )
    vlm = blipdemo.load(folder, dtype="float32")
    assert vlm.model.vision_model.encoder.layers[0].self_attn.qkv.bias is None
    assert all(layer.has_cross_attention for layer in vlm.model.qformer.encoder.layer)
    assert vlm.model.query_tokens.shape[1] == 6
    tokens = vlm.model.encode_image(vlm.preprocess(images[0]))
    assert tokens.shape[1] == 1 + (48 // 16) ** 2


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/blipdemo-pwned", "w"))


def test_pickle_checkpoint_is_refused_and_never_executed(checkpoint_dir, tmp_path):
    folder = _copy(checkpoint_dir("instructblip", "llama"), tmp_path)
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": _Exploit()}, f)
    marker = tmp_path.parent / "blipdemo-pwned"
    with pytest.raises(CheckpointError, match="pickle"):
        blipdemo.load(folder, dtype="float32")
    import os

    assert not os.path.exists("/tmp/blipdemo-pwned") and not marker.exists()


def test_sharded_checkpoint_loads(checkpoint_dir, tmp_path, images):
    src = checkpoint_dir("instructblip", "t5")
    folder = _copy(src, tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a = blipdemo.load(src, dtype="float32").ask(images[0], "What color is it?", max_new_tokens=6, num_beams=1)
    b = blipdemo.load(folder, dtype="float32").ask(images[0], "What color is it?", max_new_tokens=6, num_beams=1)
    assert a == b


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint folder"):
        blipdemo.load(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="InstructBLIP and BLIP-2"):
        blipdemo.load(tmp_path)


def test_bad_arguments(checkpoint_dir):
    folder = checkpoint_dir("instructblip", "llama")
    with pytest.raises(ValueError, match="dtype"):
        blipdemo.load(folder, dtype="int8")
    with pytest.raises(ValueError, match="load_in_8bit"):
        blipdemo.load(folder, load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="device_map"):
        blipdemo.load(folder, device_map="everywhere")


@pytest.mark.parametrize("capability,expected", [((8, 0), torch.bfloat16), ((7, 5), torch.float16)])
def test_default_cuda_dtype_never_initializes_cuda(monkeypatch, capability, expected):
    """On a ZeroGPU Space the main process has no GPU: torch.cuda answers is_available and get_device_capability
    (patched by the spaces package), and anything that initializes CUDA there fails. The default dtype is chosen
    from the capability alone: bfloat16 where it is native (Ampere on), float16 before."""
    from blipdemo.loading import resolve_dtype

    def no_cuda_here(*args, **kwargs):
        raise AssertionError("CUDA was initialized in the main process")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    for name in ("current_device", "get_device_properties", "init", "_lazy_init"):
        monkeypatch.setattr(torch.cuda, name, no_cuda_here)
    assert resolve_dtype(None, torch.device("cuda")) == expected
