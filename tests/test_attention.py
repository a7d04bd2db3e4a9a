"""Attention maps: shapes, probability maps, the same text as ask, hand-built attention patterns in the Q-Former
and (steered) in the LM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

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
    tokens = vlm.model.encode_image(vlm.preprocess(image))[0]  # (1 + P, D)
    target = 5  # patch index (CLS excluded)
    u = tokens[1 + target] / tokens[1 + target].norm()
    with torch.no_grad():
        for module in vlm.model.qformer.cross_attention_modules():
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


# In the test above every query reads the same patch, so no weighting of the queries by the LM (which rows, which
# columns, T5's cross-attention) can move the peak. Here each query reads its own patch and the
# LM is steered so that each answer token looks at its own query: only a correct LM stage puts each peak right.
QUERY_PATCH = {0: 5, 1: 10, 2: 3, 3: 14}  # query q reads patch QUERY_PATCH[q] (4 queries, a 4 × 4 grid)
STEP_QUERY = [2, 0, 3, 1]  # answer token t is produced looking at query STEP_QUERY[t % 4]: neighbours differ
ANSWER = "red green blue"  # tokenized into ~9 pieces by the test tokenizer, so every query is used twice


def _rig_qformer(vlm, inputs, scale: float = 100.0) -> None:
    """Set the cross-attention weights so that, on this image and instruction, query q reads patch QUERY_PATCH[q].

    Keys: each patch of QUERY_PATCH gets the code e_q in every head (all other tokens, CLS included, get 0); queries:
    query q gets scale · e_q. Both are solved by least squares on the very inputs of each layer (layer by layer,
    since a rigged layer changes what the next one sees), so a query's score is scale/√hs on its patch, 0 elsewhere.
    """
    image_embeds = vlm.image_tokens([inputs])  # (1, 1 + P, Dv)
    image = image_embeds[0].double()  # (1 + P, Dv): the keys' input
    for module in vlm.model.qformer.cross_attention_modules():
        seen = []
        hook = module.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0][0].double()))
        with torch.inference_mode():
            vlm.model.query_outputs(image_embeds, inputs.qformer_input_ids)
        hook.remove()
        queries = seen[0]  # (Q, D): what this layer's queries are on the way in
        width, heads = module.key.out_features, module.num_heads
        hs = width // heads
        key_codes = torch.zeros(image.shape[0], width, dtype=torch.float64)
        query_codes = torch.zeros(queries.shape[0], width, dtype=torch.float64)
        for q, patch in QUERY_PATCH.items():
            for h in range(heads):
                key_codes[1 + patch, h * hs + q] = 1.0
                query_codes[q, h * hs + q] = scale
        key_weight = torch.linalg.lstsq(image, key_codes).solution.T  # (width, Dv): image @ W.T = codes
        query_weight = torch.linalg.lstsq(queries, query_codes).solution.T
        assert torch.allclose(image @ key_weight.T, key_codes, atol=1e-6), "image tokens not independent"
        assert torch.allclose(queries @ query_weight.T, query_codes, atol=1e-4), "queries not independent"
        with torch.no_grad():
            module.key.weight.copy_(key_weight)
            module.key.bias.zero_()
            module.query.weight.copy_(query_weight)
            module.query.bias.zero_()


def _steer_lm(monkeypatch, vlm, first_row: int) -> list:
    """Replace the LM's attention function (SDPA, which the map pass runs like generation) so that the position
    producing answer token t puts 90% of its attention on query STEP_QUERY[t % 4] (and keeps 10% of its own,
    causal pattern): its output really follows, and the steered weights are what the function returns.

    ``first_row``: the position that produces answer token 0 — the layout as the test states it, not as the code
    under test computes it. Decoder-only LMs: self-attention, rows first_row, first_row + 1, …; T5: the decoder's
    cross-attention to the encoder (queries first), rows 0, 1, …. Returns the list of steered calls."""
    lm = vlm.language_model
    cross = vlm.is_encoder_decoder  # T5: the decoder's cross-attention (no causal mask); else self-attention
    if cross:
        steered = {block.layer[1].EncDecAttention for block in lm.decoder.block}
    else:
        steered = {m for m in lm.modules() if type(m).__name__.endswith("Attention")}
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    calls = []

    def sdpa(module, query, key, value, attention_mask, *args, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, *args, **kwargs)
        if module not in steered or query.shape[2] == 1:  # generation steps are not steered
            return out, weights
        calls.append(module)
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # grouped-query heads
        scores = (query @ key.transpose(-1, -2)).float()  # (B, nh, rows, keys); the scale does not matter here
        if not cross:
            scores = scores.masked_fill(torch.ones_like(scores[0, 0], dtype=torch.bool).triu(1), -torch.inf)
        weights = scores.softmax(-1)
        for row in range(first_row, weights.shape[2]):
            target = torch.zeros(weights.shape[-1], dtype=weights.dtype)
            target[STEP_QUERY[(row - first_row) % len(STEP_QUERY)]] = 1.0
            weights[:, :, row] = 0.1 * weights[:, :, row] + 0.9 * target
        value = value.repeat_interleave(weights.shape[1] // value.shape[1], dim=1)  # grouped-query heads
        return (weights.to(value.dtype) @ value).transpose(1, 2).contiguous(), weights

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", sdpa)
    return calls


@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("blip2", "opt"), ("instructblip", "t5")])
def test_each_token_map_follows_the_query_its_token_looked_at(checkpoint_dir, images, monkeypatch, family, lm):
    """Query q reads patch QUERY_PATCH[q]; answer token t is produced looking at query STEP_QUERY[t]: token t's map
    must peak on QUERY_PATCH[STEP_QUERY[t]]. A wrong row, a wrong query column or T5's self-attention read instead
    of its cross-attention each move the peaks; a map that ignores the LM (uniform over queries) has none."""
    vlm = blipdemo.load(checkpoint_dir(family, lm), dtype="float32")
    image = images[0]
    inputs = vlm.prepare(image, PROMPT)
    _rig_qformer(vlm, inputs)
    num_queries = vlm.config.num_query_tokens
    assert num_queries == len(QUERY_PATCH)
    # Decoder-only: [queries ; prompt ; answer[:-1]], and the last prompt position produces answer token 0.
    first_row = 0 if vlm.is_encoder_decoder else num_queries + inputs.input_ids.shape[1] - 1
    calls = _steer_lm(monkeypatch, vlm, first_row)
    e = vlm.explain(image, PROMPT, answer=ANSWER)
    assert calls, "the map pass did not run through the steered attention"
    assert "".join(e.tokens).strip() == ANSWER and len(e.tokens) >= 2 * len(STEP_QUERY)
    # Every visible token is an answer token in order (only the final EOS is hidden): token t is step t.
    for t, m in enumerate(e.token_maps):
        expected = QUERY_PATCH[STEP_QUERY[t % len(STEP_QUERY)]]
        assert m.flatten().argmax() == expected, (t, e.tokens[t], m.flatten().round(3))
        assert m.flatten()[expected] > 0.8, (t, e.tokens[t], m.flatten().round(3))


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
