"""Attention maps: shapes, probability maps, the same text as ask, hand-built attention patterns in the Q-Former
and (steered) in the LM."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import blipdemo
from blipdemo import heatmap
from blipdemo.attention import METHODS, explain_answer, query_image_maps, token_query_weights
from blipdemo.heatmap import colormap
from blipdemo.teacher_forced import Stopped, patch_grid

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
    from blipdemo.attention import Explanation
    from blipdemo.heatmap import PEAK_OPACITY, legend_css

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


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random photo (a 40 × 30 random image, bicubic-enlarged): detail at the scale of real pictures, not
    pixel noise (which no two downsampling filters agree on)."""
    small = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


@pytest.mark.parametrize("size,max_side,expected", [((1200, 900), 300, (300, 225)), ((600, 1000), 250, (150, 250))])
def test_overlay_at_max_side_is_the_full_overlay_resized(monkeypatch, size, max_side, expected):
    """The overlay at ``max_side``: the image's longer side reduced to it, aspect kept, and the colors of today's
    full-size overlay resized by PIL's Lanczos (within rounding). The maps keep their own size; the painting ran at
    the reduced size (what makes a 12-megapixel upload cost what a small one does)."""
    from blipdemo.attention import Explanation

    photo = _photo(*size, seed=4)
    heat = np.random.default_rng(5).random((6, 6)) ** 4  # a few strong patches, most of the picture untouched
    heat /= heat.sum()
    e = Explanation("red", ["red"], heat[None], heat, photo)
    reference = np.asarray(e.overlay().resize(expected, Image.LANCZOS)).astype(int)  # (H, W, 3)
    painted = []
    colors = heatmap.heat_colors
    monkeypatch.setattr(heatmap, "heat_colors", lambda values: painted.append(values.shape) or colors(values))
    small = e.overlay(max_side=max_side)
    assert small.size == expected and painted == [expected[::-1]]
    difference = np.abs(np.asarray(small).astype(int) - reference)
    assert difference.max() <= 3 and difference.mean() < 0.5, (difference.max(), difference.mean())
    assert np.abs(np.asarray(e.overlay(0, max_side=max_side)).astype(int) - reference).max() <= 3
    assert e.token_maps.shape == (1, 6, 6) and e.image_map.shape == (6, 6)
    # At or above the image's own longer side: today's overlay, pixel for pixel.
    assert np.array_equal(np.asarray(e.overlay(max_side=max(size))), np.asarray(e.overlay()))
    with pytest.raises(ValueError, match="max_side"):
        e.overlay(max_side=0)


def test_patch_grid_is_the_square_of_the_image_tokens():
    assert patch_grid(16) == (4, 4) and patch_grid(256) == (16, 16)
    with pytest.raises(AssertionError, match="square"):
        patch_grid(15)


def test_maps_need_no_pixel_values_once_the_image_tokens_are_cached(loaded, images):
    """The grid comes from the image tokens (1, 1 + P, Dv), not from the pixel values, which a request whose tokens
    are cached need not carry."""
    vlm = loaded("instructblip", "llama")
    inputs = vlm.prepare(vlm.question(images[1], PROMPT))
    ids = vlm._answer_ids(inputs, "red")
    vlm.image_tokens([inputs])
    lazy = dataclasses.replace(inputs, pixel_values=None)
    grid = vlm.config.vision_config.image_size // vlm.config.vision_config.patch_size
    for method in METHODS:
        e = explain_answer(vlm, lazy, ids, "red", method=method)
        assert e.token_maps.shape[1:] == (grid, grid) and e.query_maps.shape[1:] == (grid, grid)
        np.testing.assert_array_equal(e.token_maps, explain_answer(vlm, inputs, ids, "red", method=method).token_maps)


def test_a_stop_set_before_the_pass_runs_no_model_work(loaded, images, monkeypatch):
    """Stop (or a vanished client) already set: ``Stopped`` for either method, before the image tokens or the LM are
    touched. An event that is not set changes nothing."""
    vlm = loaded("instructblip", "llama")
    inputs = vlm.prepare(vlm.question(images[0], PROMPT))
    ids = vlm._answer_ids(inputs, "red")
    for method in METHODS:
        plain = explain_answer(vlm, inputs, ids, "red", method=method)
        unset = explain_answer(vlm, inputs, ids, "red", method=method, stop=threading.Event())
        np.testing.assert_array_equal(unset.token_maps, plain.token_maps)
    ran = []
    monkeypatch.setattr(vlm, "image_tokens", lambda *a, **k: ran.append("vision"))
    forward = vlm.language_model.forward
    monkeypatch.setattr(vlm.language_model, "forward", lambda *a, **k: ran.append("lm") or forward(*a, **k))
    stop = threading.Event()
    stop.set()
    for method in METHODS:
        with pytest.raises(Stopped):
            explain_answer(vlm, inputs, ids, "red", method=method, stop=stop)
    assert ran == [], "a stopped map pass must not start"
    assert issubclass(Stopped, Exception)


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


def _rig_qformer(vlm, inputs, scale: float = 100.0, only_layers=None, only_heads=None) -> None:
    """Set the cross-attention weights so that, on this image and instruction, query q reads patch QUERY_PATCH[q].

    Keys: each patch of QUERY_PATCH gets the code e_q in every head (all other tokens, CLS included, get 0); queries:
    query q gets scale · e_q. Both are solved by least squares on the very inputs of each layer (layer by layer,
    since a rigged layer changes what the next one sees), so a query's score is scale/√hs on its patch, 0 elsewhere.
    ``only_layers`` / ``only_heads`` (cross-attention layer and head indices; None = all): only those read their
    patches; the others get all-zero codes, so that they spread their attention exactly evenly over the 1 + P tokens.
    """
    image_embeds = vlm.image_tokens([inputs])  # (1, 1 + P, Dv)
    image = image_embeds[0].double()  # (1 + P, Dv): the keys' input
    modules = vlm.model.qformer.cross_attention_modules()
    rigged = set(range(len(modules))) if only_layers is None else {i % len(modules) for i in only_layers}
    for index, module in enumerate(modules):
        seen = []
        hook = module.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0][0].double()))
        with torch.inference_mode():
            vlm.model.query_outputs(image_embeds, inputs.qformer_input_ids)
        hook.remove()
        queries = seen[0]  # (Q, D): what this layer's queries are on the way in
        width, heads = module.key.out_features, module.num_heads
        hs = width // heads
        chosen = set(range(heads)) if only_heads is None else {h % heads for h in only_heads}
        key_codes = torch.zeros(image.shape[0], width, dtype=torch.float64)
        query_codes = torch.zeros(queries.shape[0], width, dtype=torch.float64)
        for q, patch in QUERY_PATCH.items():
            for h in range(heads) if index in rigged else ():
                key_codes[1 + patch, h * hs + q] = 1.0
                query_codes[q, h * hs + q] = scale if h in chosen else 0.0
        key_weight = torch.linalg.lstsq(image, key_codes).solution.T  # (width, Dv): image @ W.T = codes
        query_weight = torch.linalg.lstsq(queries, query_codes).solution.T
        assert torch.allclose(image @ key_weight.T, key_codes, atol=1e-6), "image tokens not independent"
        assert torch.allclose(queries @ query_weight.T, query_codes, atol=1e-4), "queries not independent"
        with torch.no_grad():
            module.key.weight.copy_(key_weight)
            module.key.bias.zero_()
            module.query.weight.copy_(query_weight)
            module.query.bias.zero_()


def _steer_lm(monkeypatch, vlm, first_row: int, only_layers=None, only_heads=None) -> list:
    """Replace the LM's attention function (SDPA, which the map pass runs like generation) so that the position
    producing answer token t puts 90% of its attention on query STEP_QUERY[t % 4] (and keeps 10% of its own,
    causal pattern): its output really follows, and the steered weights are what the function returns (built out of
    place, so that gradients can flow through them: relevancy).

    ``first_row``: the position that produces answer token 0 — the layout as the test states it, not as the code
    under test computes it. Decoder-only LMs: self-attention, rows first_row, first_row + 1, …; T5: the decoder's
    cross-attention to the encoder (queries first), rows 0, 1, …. ``only_layers`` / ``only_heads`` (decoder layer
    and head indices; None = all): only those are steered. Returns the list of steered calls."""
    lm = vlm.language_model
    cross = vlm.is_encoder_decoder  # T5: the decoder's cross-attention (no causal mask); else self-attention
    if cross:
        layers = [block.layer[1].EncDecAttention for block in lm.decoder.block]
    else:
        layers = [layer.self_attn for layer in lm.get_decoder().layers]
    steered = set(layers) if only_layers is None else {layers[i] for i in only_layers}
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
        heads = range(weights.shape[1]) if only_heads is None else only_heads
        keep = torch.ones_like(weights)  # 0.1 on the steered rows, 1 elsewhere
        target = torch.zeros_like(weights)  # 0.9 on each steered row's query
        for row in range(first_row, weights.shape[2]):
            for h in heads:
                keep[:, h, row] = 0.1
                target[:, h, row, STEP_QUERY[(row - first_row) % len(STEP_QUERY)]] = 0.9
        weights = weights * keep + target
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
    inputs = vlm.prepare(vlm.question(image, PROMPT))
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
    # Each hop on its own: query q reads its patch (hop 2), token t draws on its query (hop 1); the maps chain them.
    _check_hops(e, num_queries)


def _check_hops(e, num_queries: int, map_share: float = 0.9, weight_share: float = 0.85) -> None:
    """The rigged pattern in both hops of ``e``: query maps peak on QUERY_PATCH (with more than ``map_share``),
    token rows on STEP_QUERY (with more than ``weight_share``)."""
    assert e.query_maps.shape == (num_queries, *e.token_maps.shape[1:])
    assert e.query_weights.shape == (len(e.tokens), num_queries)
    np.testing.assert_allclose(e.query_maps.sum(axis=(1, 2)), 1.0, atol=1e-9)
    np.testing.assert_allclose(e.query_weights.sum(axis=1), 1.0, atol=1e-9)
    for q, patch in QUERY_PATCH.items():
        heat = e.query_maps[q].flatten()
        assert heat.argmax() == patch and heat[patch] > map_share, (q, heat.round(3))
    for t, row in enumerate(e.query_weights):
        expected = STEP_QUERY[t % len(STEP_QUERY)]
        assert row.argmax() == expected and row[expected] > weight_share, (t, e.tokens[t], row.round(3))


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


# ---------------------------------------------------------------------------------------------------------------
# The maps explorer: both hops, layer and head choice, the reverse direction (words_in_region).


def _chained(e) -> np.ndarray:
    """Σ_q query_weights[t, q] · query_maps[q], each token's map scaled to sum 1."""
    maps = np.einsum("tq,qhw->thw", e.query_weights, e.query_maps)
    return maps / maps.sum(axis=(1, 2), keepdims=True)


@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("blip2", "opt"), ("instructblip", "t5")])
def test_token_maps_are_query_weights_times_query_maps(loaded, images, family, lm):
    vlm = loaded(family, lm)
    e = vlm.explain(images[1], PROMPT, max_new_tokens=6, num_beams=1)
    assert e.method == "attention" and len(e.tokens) > 0
    np.testing.assert_allclose(e.token_maps, _chained(e), atol=1e-6)
    assert e.selection.lm_layers == (0, 1) and e.selection.qformer_heads == (0, 1, 2, 3)


def _rigged(vlm, images, monkeypatch, **rig):
    """The llama checkpoint with its Q-Former rigged (``_rig_qformer(**rig)``) and its LM steered (every layer and
    head); returns (image, explain(**options) for the fixed ANSWER)."""
    image = images[0]
    inputs = vlm.prepare(vlm.question(image, PROMPT))
    _rig_qformer(vlm, inputs, only_layers=rig.get("qformer_layers"), only_heads=rig.get("qformer_heads"))
    first_row = vlm.config.num_query_tokens + inputs.input_ids.shape[1] - 1
    _steer_lm(monkeypatch, vlm, first_row, only_layers=rig.get("lm_layers"), only_heads=rig.get("lm_heads"))
    return image, lambda **options: vlm.explain(image, PROMPT, answer=ANSWER, **options)


def _share(e, q: int) -> float:
    """How much of query q's map lies on its own patch QUERY_PATCH[q]."""
    return float(e.query_maps[q].flatten()[QUERY_PATCH[q]])


def test_qformer_layer_and_head_choice(checkpoint_dir, images, monkeypatch):
    """Only the last cross-attention layer's head 2 reads the patches (every other head of both layers spreads its
    attention evenly): choosing it gives sharp query maps, choosing another layer or head gives exactly flat ones,
    and the default mean lies between — the rigged head diluted by the seven flat ones."""
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama"), dtype="float32")
    assert len(vlm.model.qformer.cross_attention_modules()) == 2 and vlm.config.qformer_config.num_attention_heads == 4
    _, explain = _rigged(vlm, images, monkeypatch, qformer_layers=[1], qformer_heads=[2])
    chosen = explain(qformer_layers=[-1], qformer_heads=[2])
    assert chosen.selection.qformer_layers == (1,) and chosen.selection.qformer_heads == (2,)
    _check_hops(chosen, len(QUERY_PATCH))
    flat = 1 / chosen.query_maps[0].size
    for other in (
        explain(qformer_layers=[0]),
        explain(qformer_heads=[0, 1, 3]),
        explain(qformer_layers=[0, 1], qformer_heads=[-1]),
    ):
        np.testing.assert_allclose(other.query_maps, flat, rtol=1e-5)
    mean = explain()
    for q in QUERY_PATCH:
        assert mean.query_maps[q].flatten().argmax() == QUERY_PATCH[q]
        assert 2 * flat < _share(mean, q) < _share(chosen, q) - 0.3, (q, _share(mean, q), _share(chosen, q))
    # The LM hop is not touched by the Q-Former's choice.
    np.testing.assert_allclose(mean.query_weights, chosen.query_weights)


def test_lm_layer_and_head_choice(checkpoint_dir, images, monkeypatch):
    """Only the LM's last layer, head 3 is steered: choosing it gives each token's row its query (≥ 0.9); the
    default mean dilutes it; the unsteered layer or heads do not follow the steered pattern."""
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama"), dtype="float32")
    assert vlm.config.text_config.num_hidden_layers == 2 and vlm.config.text_config.num_attention_heads == 4
    _, explain = _rigged(vlm, images, monkeypatch, lm_layers=[1], lm_heads=[3])
    chosen = explain(lm_layers=[-1], lm_heads=[-1])
    assert chosen.selection.lm_layers == (1,) and chosen.selection.lm_heads == (3,)
    _check_hops(chosen, len(QUERY_PATCH))
    targets = [STEP_QUERY[t % len(STEP_QUERY)] for t in range(len(chosen.tokens))]
    rows = np.arange(len(targets))
    assert (chosen.query_weights[rows, targets] >= 0.9).all()
    mean = explain()
    diluted = chosen.query_weights[rows, targets] - mean.query_weights[rows, targets]
    assert (diluted > 0.1).all() and diluted.mean() > 0.25, diluted.round(3)
    for other in (explain(lm_layers=[0]), explain(lm_heads=[0, 1, 2]), explain(lm_layers=[1], lm_heads=[0])):
        assert (other.query_weights.argmax(1) != targets).any(), other.query_weights.round(2)
        np.testing.assert_allclose(other.query_maps, chosen.query_maps)  # the Q-Former hop is not touched


def test_map_options_are_checked_before_any_model_work(loaded, images, monkeypatch):
    vlm = loaded("instructblip", "llama")
    ran = []
    monkeypatch.setattr(vlm, "answer_ids", lambda *a, **k: ran.append("generate"))
    monkeypatch.setattr(vlm, "image_tokens", lambda *a, **k: ran.append("vision"))
    cases = {
        "qformer_layers": ([2], "0 to 1"),  # two cross-attention layers
        "qformer_heads": ([-5], "0 to 3"),
        "lm_layers": ([0, 7], "0 to 1"),
        "lm_heads": ([4], "0 to 3"),
    }
    for name, (value, valid) in cases.items():
        with pytest.raises(ValueError, match=rf"{name}: .* out of range.*{valid}"):
            vlm.explain(images[0], PROMPT, **{name: value})
        with pytest.raises(ValueError, match=rf"{name} must name at least one"):
            vlm.explain(images[0], PROMPT, answer="red", **{name: []})
        for bad in (["1"], [1.0], [True], "1", 1.5):
            with pytest.raises(ValueError, match=name):
                vlm.explain(images[0], PROMPT, **{name: bad})
    with pytest.raises(ValueError, match=r"method must be one of \('attention', 'relevancy'\)"):
        vlm.explain(images[0], PROMPT, method="gradients")
    with pytest.raises(ValueError, match="aggregate"):
        blipdemo.attention.map_selection(vlm.model, aggregate="max")
    assert ran == [], "a bad map option must fail before any model work"


def test_negative_indices_count_from_the_end(loaded, images):
    vlm = loaded("instructblip", "llama")
    a = vlm.explain(images[1], PROMPT, answer="red", lm_layers=[-1], lm_heads=[-2, 0], qformer_layers=-2)
    b = vlm.explain(images[1], PROMPT, answer="red", lm_layers=[1], lm_heads=[0, 2, 2], qformer_layers=[0])
    assert a.selection == b.selection
    np.testing.assert_array_equal(a.token_maps, b.token_maps)
    # "last" of the pointing game is the last layer of each hop.
    from blipdemo.attention import explain_answer

    inputs = vlm.prepare(vlm.question(images[1], PROMPT))
    ids = vlm._answer_ids(inputs, "red")
    last = explain_answer(vlm, inputs, ids, "red", aggregate="last")
    chosen = explain_answer(vlm, inputs, ids, "red", lm_layers=[-1], qformer_layers=[-1])
    np.testing.assert_array_equal(last.token_maps, chosen.token_maps)


def test_region_weights_cover_patches_by_area():
    from blipdemo.attention import region_weights

    grid = (4, 4)
    size = (50, 40)  # a wide image: a patch is 12.5 px wide, 10 px high
    np.testing.assert_allclose(region_weights((0, 0, 50, 40), size, grid), 1.0)
    one = region_weights((25, 10, 37.5, 20), size, grid)  # exactly patch (row 1, column 2)
    expected = np.zeros(grid)
    expected[1, 2] = 1.0
    np.testing.assert_allclose(one, expected, atol=1e-12)
    half = region_weights((25, 15, 43.75, 20), size, grid)  # half a patch high, one and a half wide
    expected = np.zeros(grid)
    expected[1, 2], expected[1, 3] = 0.5, 0.25
    np.testing.assert_allclose(half, expected, atol=1e-12)
    clipped = region_weights((-100, -5, 12.5, 10), size, grid)  # clipped to the image: patch (0, 0)
    assert clipped[0, 0] == 1.0 and clipped.sum() == 1.0


def test_words_in_region_checks_the_box():
    from blipdemo.attention import Explanation

    rng = np.random.default_rng(0)
    maps = rng.random((3, 4, 4))
    maps /= maps.sum(axis=(1, 2), keepdims=True)
    e = Explanation("a b c", ["a", "b", "c"], maps, maps.mean(0), Image.new("RGB", (50, 40)))
    np.testing.assert_allclose(e.words_in_region((0, 0, 50, 40)), 1.0)
    halves = e.words_in_region((0, 0, 25, 40)) + e.words_in_region((25, 0, 50, 40))
    np.testing.assert_allclose(halves, 1.0)  # two halves of the picture share each token's map
    np.testing.assert_allclose(e.words_in_region((-10, -10, 60, 50)), 1.0)
    assert e.words_in_region(np.array([0, 0, 12.5, 10])).shape == (3,)
    for bad, message in (
        ((0, 0, 10), "4 numbers"),
        ("0 0 10 10", "4 numbers"),
        ((0, 0, "10", 10), "4 numbers"),
        ((0, 0, True, 10), "4 numbers"),
        ((0, 0, float("nan"), 10), "finite"),
        ((0, 0, 10, float("inf")), "finite"),
        ((10, 0, 10, 10), "x0 < x1"),
        ((0, 20, 10, 5), "x0 < x1 and y0 < y1"),
        ((50, 0, 60, 10), "entirely outside the image \\(50 × 40 px\\)"),
        ((-20, -20, -1, 30), "entirely outside"),
    ):
        with pytest.raises(ValueError, match=message):
            e.words_in_region(bad)


def test_words_in_region_finds_the_tokens_that_looked_there(checkpoint_dir, images, monkeypatch):
    """The reverse of the chain test: the box (in the non-square image's own pixels) around patch QUERY_PATCH[q]
    scores highest the tokens that were produced looking at query q."""
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama"), dtype="float32")
    image, explain = _rigged(vlm, images, monkeypatch)
    width, height = image.size
    assert (width, height) == (50, 40)
    e = explain()
    targets = np.array([STEP_QUERY[t % len(STEP_QUERY)] for t in range(len(e.tokens))])
    for q, patch in QUERY_PATCH.items():
        row, column = divmod(patch, 4)
        box = (column * width / 4, row * height / 4, (column + 1) * width / 4, (row + 1) * height / 4)
        scores = e.words_in_region(box)
        assert scores.shape == (len(e.tokens),)
        assert scores[targets == q].min() > 0.7 > 0.1 > scores[targets != q].max(), (q, scores.round(3))
