"""What a visitor's session keeps of an answer with maps: a display-size copy of the picture, not the upload.

Gradio keeps a closed session's values for an hour (up to ``--session-capacity`` sessions): with the full upload
in the shown answer, 256 visitors with 12-megapixel photos would hold 9 GB. The copy must still remap exactly: its
``pixel_values`` are the full picture's model input, so a remap after the image-token cache has forgotten the picture
gives the maps of the full picture, not of the copy.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import replace

import anyio
import numpy as np
import pytest
import torch
from PIL import Image

import blipdemo
from blipdemo.tiny import EMBEDDED_MODEL, scenes
from blipdemo.ui.maps import DISPLAY_SIDE, MapsPanel


@pytest.fixture(scope="module")
def vlm():
    return blipdemo.load(EMBEDDED_MODEL, dtype="float32")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A scene drawn from the spec, blown up to a 3000 × 2250 photo (6.75 MP, 20 MB as RGB)."""
    rng = random.Random(11)
    return scenes.render(scenes.sample_scene(rng), rng).resize((3000, 2250), Image.Resampling.BICUBIC)


def test_the_kept_copy_is_display_sized_and_carries_the_full_pictures_model_input(vlm, photo):
    picture = vlm.question(photo, "Describe the image.").picture
    kept = vlm.kept(picture, DISPLAY_SIDE)
    assert kept.size == (800, 600) and kept.key == picture.key
    # The reference: the checkpoint's own image processor on the full upload.
    reference = vlm.image_processor(images=photo, return_tensors="pt")["pixel_values"]
    assert torch.equal(kept.pixel_values, reference)
    small = vlm.question(photo.resize((200, 150)), "Describe the image.").picture
    assert vlm.kept(small, DISPLAY_SIDE) is small  # nothing to reduce: kept as it is


def test_a_remap_from_the_kept_copy_equals_the_full_pictures_maps_after_the_cache_forgot_it(vlm, photo):
    question = vlm.question(photo, "What color is the shape?", maps={})
    inputs, ids = vlm.answer_ids(question)
    full = vlm.explain_prepared(inputs, ids)

    kept = replace(question, picture=vlm.kept(question.picture, DISPLAY_SIDE))
    vlm.clear_cache()  # 16 newer pictures later: the image tokens must be made again, from what the session kept
    calls = vlm.vision_calls
    again = vlm.explain_prepared(vlm.prepare(kept), ids)
    assert vlm.vision_calls == calls + 1  # really recomputed, not found in the cache
    np.testing.assert_array_equal(again.token_maps, full.token_maps)
    np.testing.assert_array_equal(again.query_maps, full.query_maps)

    # The copy's own pixels would give other maps: without the kept model input the remap would not be exact.
    vlm.clear_cache()
    copy_only = replace(kept, picture=replace(kept.picture, pixel_values=None))
    other = vlm.explain_prepared(vlm.prepare(copy_only), ids)
    assert not np.array_equal(other.token_maps, full.token_maps)


def test_the_shown_answer_in_the_session_is_small_and_paints_at_display_size(vlm, photo):
    question = vlm.question(photo, "Describe the image.", maps={})
    inputs, ids = vlm.answer_ids(question)
    explanation = replace(vlm.explain_prepared(inputs, ids), image=None)  # as gpu hands it over
    panel = MapsPanel(vlm, generations=None)

    shown, _, overlay, *_ = anyio.run(panel.show, question, ids.tolist(), explanation)
    assert shown.question.picture.size == (800, 600)
    assert shown.explanation.image is shown.question.picture.image
    assert overlay.size == (800, 600)
    # What the session holds of this answer, pickled: a few MB at most, against 20 MB for the upload alone.
    assert len(pickle.dumps(shown)) < 4 * 2**20 < len(photo.tobytes())
