"""Attention maps: shapes, probability maps, the same text as ask, and a hand-built attention pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import blipdemo
from blipdemo.attention import colormap, query_image_maps, token_query_weights

PROMPT = "What color is the circle?"


@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("instructblip", "t5"), ("blip2", "opt")])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_maps_are_probability_maps_and_text_equals_ask(checkpoint_dir, images, family, lm, num_beams):
    vlm = blipdemo.load(checkpoint_dir(family, lm), dtype="float32")
    for image in images[:2]:
        e = vlm.explain(image, PROMPT, max_new_tokens=8, num_beams=num_beams)
        assert e.text == vlm.ask(image, PROMPT, max_new_tokens=8, num_beams=num_beams)
        grid = vlm.config.vision_config.image_size // vlm.config.vision_config.patch_size
        assert e.token_maps.shape == (len(e.tokens), grid, grid)
        assert e.image_map.shape == (grid, grid)
        np.testing.assert_allclose(e.token_maps.sum(axis=(1, 2)), 1.0, atol=1e-9)
        assert abs(e.image_map.sum() - 1.0) < 1e-9
        assert (e.token_maps >= 0).all() and (e.image_map >= 0).all()
        assert 0 < len(e.tokens) <= 8


def test_overlay_colors_only_where_the_map_is_strong():
    """One hot patch in an 8×8 map over a 160×160 photo: far from it the photo is untouched, pixel for pixel; on it
    the colormap's bright end covers most of the photo; the legend is a gradient from the photo to that color."""
    from blipdemo.attention import PEAK_OPACITY, Explanation, legend_css

    rng = np.random.default_rng(3)
    photo = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
    heat = np.full((8, 8), 1e-4)
    heat[2, 5] = 1.0  # the patch covering x 100–120, y 40–60
    heat /= heat.sum()
    e = Explanation("red", ["red"], heat[None], heat, Image.fromarray(photo))
    out = np.asarray(e.overlay()).astype(int)
    far = np.ones((160, 160), bool)
    far[20:80, 80:140] = False  # the patch and a margin of one patch around it (bicubic spreads that far)
    assert (out[far] == photo[far]).all(), "the photo must stay as it is where the map is weak"
    peak = out[50, 110]
    bright = colormap(np.array([1.0]))[0].astype(int)  # where the colors end
    expected = np.round(photo[50, 110] * (1 - PEAK_OPACITY) + bright * PEAK_OPACITY)
    assert np.abs(peak - expected).max() <= 2, (peak, expected)
    css = legend_css()
    assert css.startswith("linear-gradient(to right, rgba(") and "0.00) 0%" in css
    assert f"{PEAK_OPACITY:.2f}) 100%" in css


def test_overlay_has_the_image_size_and_orientation(checkpoint_dir):
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama"), dtype="float32")
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 90, 3), dtype=np.uint8))
    e = vlm.explain(wide, PROMPT, max_new_tokens=4, num_beams=1)
    assert e.overlay().size == (90, 30)
    assert e.overlay(token=0).size == (90, 30)
    with pytest.raises(IndexError):
        e.overlay(token=len(e.tokens))


def test_aggregation_of_a_hand_built_pattern():
    grid = (3, 4)
    peak = 7
    records = []
    for _ in range(2):  # two cross-attention layers, every query and head looking at patch 7 only
        probs = torch.zeros(1, 4, 5, 1 + 12)
        probs[..., 1 + peak] = 1.0
        records.append(probs)
    C = query_image_maps(records, grid)
    lm_attn = [torch.rand(1, 4, 20, 20).softmax(-1) for _ in range(3)]
    R = token_query_weights(lm_attn, torch.tensor([10, 11]), 5)
    maps = (R @ C).reshape(-1, *grid)
    assert torch.allclose(maps.sum(dim=(1, 2)), torch.ones(2))
    assert all(m.flatten().argmax().item() == peak for m in maps)


def test_map_peaks_where_the_qformer_was_made_to_look(checkpoint_dir, images):
    """End to end: cross-attention rewired so that every query reads one chosen patch."""
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama"), dtype="float32")
    image = images[0]
    tokens = vlm.encode_image(vlm.preprocess(image))[0]  # (1 + P, D)
    target = 5  # patch index (CLS excluded)
    u = tokens[1 + target] / tokens[1 + target].norm()
    with torch.no_grad():
        for module in vlm.qformer.cross_attention_modules():
            width = module.query.out_features
            e = torch.ones(width) / width**0.5
            module.key.weight.copy_(torch.outer(e, u))
            module.key.bias.zero_()
            module.query.weight.zero_()
            module.query.bias.copy_(e * 2000.0)  # scores ∝ u·x: a near one-hot on the target patch
    vlm.clear_cache()
    e = vlm.explain(image, PROMPT, max_new_tokens=5, num_beams=1)
    grid = e.image_map.shape
    assert np.unravel_index(e.image_map.argmax(), grid) == np.unravel_index(target, grid)
    for m in e.token_maps:
        assert m.flatten().argmax() == target
        assert m.flatten()[target] > 0.9


def test_colormap_is_dark_to_bright():
    ramp = colormap(np.linspace(0, 1, 11)[None])[0].astype(float)
    luminance = ramp @ np.array([0.2126, 0.7152, 0.0722])
    assert (np.diff(luminance) > 0).all()


def test_explain_with_8bit_lm(checkpoint_dir, images):
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama", lm_width=64), dtype="bfloat16", load_in_8bit=True)
    e = vlm.explain(images[1], PROMPT, max_new_tokens=4, num_beams=1)
    assert e.text == vlm.ask(images[1], PROMPT, max_new_tokens=4, num_beams=1)
    assert abs(e.image_map.sum() - 1) < 1e-9


def test_explain_with_offloaded_lm(checkpoint_dir, images, tmp_path):
    from test_device_map import _offload_map

    folder = checkpoint_dir("instructblip", "llama")
    plain = blipdemo.load(folder, dtype="float32")
    split = blipdemo.load(folder, dtype="float32", device_map=_offload_map(folder), offload_folder=str(tmp_path))
    a = plain.explain(images[2], PROMPT, max_new_tokens=4, num_beams=1)
    b = split.explain(images[2], PROMPT, max_new_tokens=4, num_beams=1)
    assert a.text == b.text
    np.testing.assert_allclose(a.token_maps, b.token_maps, atol=1e-5)
