"""Look closer: the model's own attention picks a box, the full-size picture is cropped there, and the LM answers from
the crop (or from the picture's queries followed by the crop's).

References, independent of the code under test: the box on maps built by hand (one hot region, every picture size and
aspect ratio); transformers' own InstructBLIP / BLIP-2 classes on the same weights — the crop asked alone through
their processor and ``generate``, and the original + crop queries (their ``get_image_features``) fed to their LM's
``generate`` as ``inputs_embeds``; and Version 3 pictures drawn from the spec (``tiny.small_details``).
"""

from __future__ import annotations

import random
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from reference import reference, reference_answer
from small_detail_cases import cases, cropping

import blipdemo
from blipdemo import look_closer
from blipdemo.batching import run_batch
from blipdemo.look_closer import Crop, LookCloser, adaptive_box, crop_box, crop_picture
from blipdemo.question import Picture
from blipdemo.tiny import EMBEDDED_MODEL, scenes

GREEDY = dict(num_beams=1, do_sample=False)
COMBOS = [("instructblip", "llama"), ("blip2", "opt"), ("instructblip", "t5"), ("blip2", "t5")]
SIZES = [(224, 224), (1344, 1344), (4000, 3000), (3000, 4000), (700, 300), (300, 900), (641, 479)]


# ------------------------------------------------------------------------------------------------------------------
# The box
def _hot(grid: int, rows: slice, cols: slice, rng) -> np.ndarray:
    heat = rng.uniform(0.0, 0.001, (grid, grid))  # a faint floor everywhere: what a real map has
    heat[rows, cols] += 1.0
    return heat


def _pixels(rows: slice, cols: slice, grid: int, size) -> tuple[float, float, float, float]:
    """The hot cells' rectangle in the picture's pixels (the processor squashes the picture to the square grid)."""
    width, height = size
    return (cols.start * width / grid, rows.start * height / grid, cols.stop * width / grid, rows.stop * height / grid)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("grid", [9, 16])
def test_a_map_with_one_hot_region_gives_a_box_around_it(size, grid):
    rng = np.random.default_rng(grid * 7 + size[0])
    width, height = size
    for _ in range(12):
        k = int(rng.integers(1, 3))  # the hot region: 1×1 or 2×2 cells
        i, j = (int(v) for v in rng.integers(0, grid - k + 1, 2))
        rows, cols = slice(i, i + k), slice(j, j + k)
        box = crop_box(_hot(grid, rows, cols, rng), size, min_side=32)
        assert box is not None, "a region of a few cells is worth a closer look"
        x0, y0, x1, y1 = box
        hx0, hy0, hx1, hy1 = _pixels(rows, cols, grid, size)
        assert 0 <= x0 <= hx0 + 1 and 0 <= y0 <= hy0 + 1 and hx1 - 1 <= x1 <= width and hy1 - 1 <= y1 <= height
        assert (x1 - x0) * (y1 - y0) < 0.5 * width * height, "a look closer must zoom in"
        # The box keeps the picture's aspect ratio (both views are squashed alike), to a pixel's rounding.
        assert abs((x1 - x0) / (y1 - y0) - width / height) < 0.02 * width / height + 2 / (y1 - y0)
        # Not clamped against an edge, the hot region sits in the middle of the box.
        if x0 > 0 and x1 < width:
            assert abs((x0 + x1) / 2 - (hx0 + hx1) / 2) <= width / grid
        if y0 > 0 and y1 < height:
            assert abs((y0 + y1) / 2 - (hy0 + hy1) / 2) <= height / grid
        # The paper's adaptive box, too, is centred on the region (where it is not clamped) and lies in the picture.
        a = adaptive_box(_hot(grid, rows, cols, rng), size, min_side=max(1, min(size) // 6))
        if a is not None:
            ax0, ay0, ax1, ay1 = a
            assert 0 <= ax0 < ax1 <= width and 0 <= ay0 < ay1 <= height
            centre = ((hx0 + hx1) / 2, (hy0 + hy1) / 2)
            assert ax0 - width / grid <= centre[0] <= ax1 + width / grid
            assert ay0 - height / grid <= centre[1] <= ay1 + height / grid


def test_no_box_where_the_map_is_spread_or_the_box_would_be_the_picture():
    assert crop_box(np.ones((16, 16)), (1000, 1000), min_side=224) is None  # no place stands out
    hot = np.full((16, 16), 1e-3)
    hot[3, 3] = 1.0
    assert crop_box(hot, (1000, 800), min_side=900) is None  # the model's input is as large as the picture
    assert crop_box(hot, (1000, 800), min_side=100) is not None
    for bad in (np.zeros((4, 4)), -np.ones((4, 4)), np.full((4, 4), np.nan), np.ones(16)):
        with pytest.raises(ValueError, match="heat"):
            crop_box(bad, (100, 100), min_side=10)


def test_the_crop_is_cut_from_the_full_size_picture_and_keyed_by_its_content():
    rng = np.random.default_rng(0)
    photo = Picture.of(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8))
    crop = crop_picture(photo, (100, 50, 400, 275))
    assert crop.size == (300, 225)
    assert np.array_equal(np.asarray(crop.image), np.asarray(photo.image)[50:275, 100:400])
    assert crop.key == crop_picture(Picture.of(photo.image.copy()), (100, 50, 400, 275)).key != photo.key


# ------------------------------------------------------------------------------------------------------------------
# Against transformers
def _photo(side_w: int = 200, side_h: int = 160) -> Image.Image:
    """A picture large enough to look closer at (≥ 4× the test checkpoints' 32-px input), with structure."""
    rng = np.random.default_rng(3)
    base = np.kron(rng.integers(0, 256, (10, 8, 3), dtype=np.uint8), np.ones((side_h // 10, side_w // 8, 1), np.uint8))
    return Image.fromarray(base)


def _with_crop(vlm, question, box, view):
    """The question with its look made at ``box`` (the look's choice of box is tested above and below; here what is
    checked is what the LM answers from)."""
    crop = Crop(box, crop_picture(question.picture, box), np.ones((4, 4)) / 16, view)
    return replace(question, crop=crop)


def _reference_both(folder, image, crop_image, prompt, **generate) -> str:
    """transformers: the original's and the crop's projected queries (``get_image_features``), then the prompt's
    embeddings, fed to its LM's ``generate`` as ``inputs_embeds``."""
    model, processor, family = reference(folder)
    text = prompt if family == "instructblip" else f"Question: {prompt} Answer:"
    pixels = processor.image_processor(images=[image, crop_image], return_tensors="pt")["pixel_values"]
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        if family == "instructblip":
            q = processor.qformer_tokenizer([text, text], return_tensors="pt")
            features = model.get_image_features(pixels, q["input_ids"], q["attention_mask"]).pooler_output
        else:
            features = model.get_image_features(pixels).pooler_output  # (2, Q, D)
        lm = model.language_model
        embeds = torch.cat([features.reshape(1, -1, features.shape[-1]), lm.get_input_embeddings()(ids)], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        out = lm.generate(inputs_embeds=embeds, attention_mask=mask, **generate)
    return processor.tokenizer.decode(out[0], skip_special_tokens=True).strip()


@pytest.mark.parametrize("family,lm", COMBOS)
def test_an_answer_from_the_crop_equals_the_reference_asked_about_the_crop(checkpoint_dir, family, lm):
    folder = checkpoint_dir(family, lm)
    vlm = blipdemo.load(folder, dtype="float32")
    image, prompt = _photo(), "What is in the image?"
    answers = set()
    for box in [(0, 0, 90, 72), (100, 60, 190, 132), (37, 21, 150, 111)]:
        question = _with_crop(
            vlm, vlm.question(image, prompt, look_closer=True, max_new_tokens=8, **GREEDY), box, "crop"
        )
        ours = vlm.decode(vlm.generate_prepared(vlm.prepare(question)))
        assert ours == reference_answer(folder, image.crop(box), prompt, max_new_tokens=8, **GREEDY)
        answers.add(ours)
    assert len(answers) > 1, "the crops' answers must differ, or a crop left out could pass"


@pytest.mark.parametrize("family,lm", COMBOS)
def test_an_answer_from_the_picture_and_its_crop_equals_the_reference_fed_both(checkpoint_dir, family, lm):
    folder = checkpoint_dir(family, lm)
    vlm = blipdemo.load(folder, dtype="float32")
    image, prompt, box = _photo(), "Describe it in detail, please.", (40, 30, 130, 102)
    question = vlm.question(image, prompt, look_closer={"view": "both"}, max_new_tokens=10, **GREEDY)
    inputs = vlm.prepare(_with_crop(vlm, question, box, "both"))
    assert [type(v).__name__ for v in inputs.views()] == ["PreparedInputs", "Picture"]
    ours = vlm.decode(vlm.generate_prepared(inputs))
    assert ours == _reference_both(folder, image, image.crop(box), prompt, max_new_tokens=10, **GREEDY)
    alone = vlm.ask(image, prompt, max_new_tokens=10, **GREEDY)
    from_crop = vlm.ask(image.crop(box), prompt, max_new_tokens=10, **GREEDY)
    assert ours not in (alone, from_crop) or alone != from_crop, "the test needs answers that tell the views apart"


# ------------------------------------------------------------------------------------------------------------------
# The embedded model on Version 3 pictures (drawn from the spec; never seen in training)
@pytest.fixture(scope="module")
def tiny():
    return blipdemo.load(EMBEDDED_MODEL, dtype="float32")


def test_the_embedded_model_finds_the_small_scene_and_answers_most_only_when_it_looks_closer(tiny):
    right = lambda text, answer: scenes.normalize_answer(text) == answer  # noqa: E731
    only_closer = plain_right = closer_right = inside = 0
    details = cases(40)
    for detail, question, answer in details:
        plain = right(tiny.ask(detail.image, question, max_new_tokens=16, **GREEDY), answer)
        inputs = tiny.prepare(tiny.question(detail.image, question, look_closer=True, max_new_tokens=16, **GREEDY))
        closer = right(tiny.decode(tiny.generate_prepared(inputs)), answer)
        plain_right += plain
        closer_right += closer
        only_closer += closer and not plain
        if inputs.crop is not None:
            x0, y0, x1, y1 = inputs.crop.box
            sx0, sy0, sx1, sy1 = detail.box
            inside += x0 <= (sx0 + sx1) / 2 <= x1 and y0 <= (sy0 + sy1) / 2 <= y1
            least = LookCloser().min_box * tiny.config.vision_config.image_size  # 3 × 108 px
            assert min(x1 - x0, y1 - y0) >= least - 1, "every box is at least min_box input sizes on its shorter side"
    # Measured on these 40 (float32, 2026-12-07, the model after four rounds of stage 3, boxes of at least 3 input
    # sizes): 18 right from the picture alone, 39 with look-closer, 21 of them only with it, 40 crops around the
    # scene's centre (boxes of at least 1 input size: 18, 37, 20, 38; after two rounds: 15, 37, 23, 36). The bounds
    # leave room for another CPU's rounding.
    assert only_closer >= 15, "look-closer must answer the small details the picture alone gets wrong"
    assert closer_right >= 0.8 * len(details) and closer_right > plain_right
    assert inside >= 0.8 * len(details), "the crop should frame the small scene's centre for most pictures"


def test_a_small_picture_is_answered_whole(tiny):
    """Under MIN_PICTURE times the model's input size there is nothing to gain: no look, the plain answer exactly."""
    rng = random.Random(2)
    scene = scenes.sample_scene(rng)
    image = scenes.render(scene, rng)
    question, _ = scenes.ask(scene, "describe", rng)
    inputs = tiny.prepare(tiny.question(image, question, look_closer=True, max_new_tokens=32, **GREEDY))
    assert inputs.crop is None
    assert tiny.decode(tiny.generate_prepared(inputs)) == tiny.ask(image, question, max_new_tokens=32, **GREEDY)


def test_rows_with_and_without_look_closer_share_a_batch_and_answer_as_alone():
    vlm = blipdemo.load(EMBEDDED_MODEL, dtype="float32", max_batch_size=8)
    drawn = cases(6, seed=9)
    asked = [
        (drawn[0], True), (drawn[0], False), (drawn[1], {"view": "both"}), (drawn[2], True), (drawn[3], False),
        (drawn[4], {"box": "adaptive"}), (drawn[5], True),
    ]  # fmt: skip
    questions = [
        vlm.question(d.image, q, look_closer=closer, max_new_tokens=12 + i, **GREEDY)
        for i, ((d, q, _), closer) in enumerate(asked)
    ]
    alone = [vlm.decode(vlm.generate_prepared(vlm.prepare(q))) for q in questions]
    prepared = [vlm.prepare(q) for q in questions]
    assert sum(p.crop is not None for p in prepared) >= 3, "the batch must hold rows that looked closer"
    requests = [vlm._request(p) for p in prepared]
    run_batch(vlm, requests)
    assert [r.error for r in requests] == [None] * len(requests)
    assert [vlm.decode(r.ids) for r in requests] == alone
    # And through the scheduler, from threads at once.
    got = [None] * len(questions)

    def ask(i):
        got[i] = vlm.decode(vlm.generate_prepared(vlm.prepare(questions[i])))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone


def test_the_crop_tokens_are_cached_like_any_pictures(tiny):
    detail, question, _ = cropping(tiny, cases(12))
    tiny.clear_cache()
    before = tiny.vision_calls
    first = tiny.ask(detail.image, question, look_closer=True, max_new_tokens=8)
    calls = tiny.vision_calls - before
    assert calls in (2, 3)  # the picture and each crop a look was made on (one or two), the last one for the answer
    again = tiny.ask(detail.image, question, look_closer=True, max_new_tokens=8)
    assert again == first and tiny.vision_calls - before == calls  # all cached: a follow-up skips the ViT


def test_the_explanation_covers_the_picture_and_the_crop_and_says_which_is_which(tiny):
    detail, question, _ = cropping(tiny, cases(12))
    e = tiny.explain(detail.image, question, look_closer=True, max_new_tokens=16)
    assert e.crop is not None and e.crop.pictures == ("crop",)
    assert e.text == tiny.ask(detail.image, question, look_closer=True, max_new_tokens=16)
    np.testing.assert_allclose(e.crop.share, 1.0)  # it read the crop alone
    np.testing.assert_allclose(e.token_maps.sum(axis=(1, 2)), 1.0, atol=1e-9)
    np.testing.assert_allclose(e.crop.token_maps.sum(axis=(1, 2)), 1.0, atol=1e-9)
    # Every word's map over the picture lies inside the box (the crop is all it read): all of it, but for the finer
    # grid's cells that straddle the box's edge, which ``words_in_region`` counts by their area inside.
    inside = e.words_in_region(e.crop.box)
    assert (inside > 0.95).all(), inside
    grown = (e.crop.box[0] - 1, e.crop.box[1] - 1, e.crop.box[2] + 1, e.crop.box[3] + 1)
    cell = max(e.image.size) / e.token_maps.shape[-1]
    grown = (grown[0] - cell, grown[1] - cell, grown[2] + cell, grown[3] + cell)  # whole straddling cells
    np.testing.assert_allclose(e.words_in_region(grown), 1.0, atol=1e-6)
    assert e.overlay(0).size == detail.image.size and e.crop.overlay().size == e.crop.image.size
    assert e.crop.image.size == (e.crop.box[2] - e.crop.box[0], e.crop.box[3] - e.crop.box[1])

    both = tiny.explain(detail.image, question, look_closer={"view": "both"}, max_new_tokens=16)
    assert both.crop.pictures == ("original", "crop")
    assert ((both.crop.share > 0) & (both.crop.share < 1)).all()  # a word drew on both pictures' queries
    assert both.query_weights.shape[1] == 2 * tiny.config.num_query_tokens
    inside = both.words_in_region(both.crop.box)
    assert (inside < 1 - 1e-6).all(), "the picture's own queries put part of each map outside the box"


@pytest.mark.parametrize("method", ["attention", "relevancy"])
def test_the_crops_maps_are_those_of_the_crop_asked_about_alone(tiny, method):
    """Answering from the crop alone is asking about the crop: the crop part of a look-closer explanation equals the
    explanation of the same answer about the crop as a picture of its own (another entry point, no look), for raw
    attention and for relevancy, each word wholly from the crop."""
    detail, question, _ = cropping(tiny, cases(12))
    e = tiny.explain(detail.image, question, look_closer=True, method=method, max_new_tokens=16)
    alone = tiny.explain(e.crop.image, question, answer=e.text, method=method, max_new_tokens=16)
    assert alone.tokens == e.tokens
    np.testing.assert_allclose(e.crop.token_maps, alone.token_maps, atol=1e-5)
    np.testing.assert_allclose(e.crop.share, 1.0)
    x0, y0, x1, y1 = e.crop.box
    cell = max(e.image.size) / e.token_maps.shape[-1]  # the finer grid's cells that straddle the box's edge
    np.testing.assert_allclose(e.words_in_region((x0 - cell, y0 - cell, x1 + cell, y1 + cell)), 1.0, atol=1e-6)


@pytest.mark.parametrize("method", ["attention", "relevancy"])
def test_maps_of_an_answer_from_the_picture_and_its_crop_split_each_word_between_them(tiny, method):
    detail, question, _ = cropping(tiny, cases(12))
    e = tiny.explain(detail.image, question, look_closer={"view": "both"}, method=method, max_new_tokens=16)
    assert e.crop.pictures == ("original", "crop") and e.method == method
    np.testing.assert_allclose(e.token_maps.sum(axis=(1, 2)), 1.0, atol=1e-9)
    np.testing.assert_allclose(e.crop.token_maps.sum(axis=(1, 2)), 1.0, atol=1e-9)
    assert ((e.crop.share >= 0) & (e.crop.share <= 1)).all()
    np.testing.assert_allclose(e.query_weights.sum(1), 1.0, atol=1e-9)
    assert e.query_weights.shape[1] == 2 * tiny.config.num_query_tokens
    if method == "attention":  # a word's map: its weights over both pictures' queries times where each query read
        np.testing.assert_allclose(np.einsum("tq,qhw->thw", e.query_weights, e.query_maps), e.token_maps, atol=1e-6)


def test_bad_look_closer_options_are_refused_before_any_model_work(tiny):
    image = np.zeros((50, 50, 3), np.uint8)
    for bad, words in [
        ("yes", "true or false"),
        ({"view": "zoom"}, "view"),
        ({"map": "x"}, "map"),
        ({"size": 2}, "unknown"),
        ({"min_box": 5}, "min_box"),
        ({"min_box": True}, "min_box"),
    ]:
        with pytest.raises(ValueError, match=words):
            tiny.question(image, "What color is the circle?", look_closer=bad)
    assert LookCloser.of(True) == LookCloser() and LookCloser.of(False) is None


def test_a_stop_before_the_look_ends_the_answer_at_once(tiny):
    detail, question, _ = cases(1)[0]
    stop = threading.Event()
    stop.set()
    assert list(tiny.stream(detail.image, question, look_closer=True, stop_event=stop)) == []


def test_the_look_closer_question_pickles_whole(tiny):
    """ZeroGPU hands the question and its look to a forked worker, and the crop back."""
    import pickle

    detail, question, _ = cases(1)[0]
    q = tiny.question(detail.image, question, look_closer={"view": "both"})
    assert pickle.loads(pickle.dumps(q)).look_closer == LookCloser(view="both")
    inputs = tiny.prepare(q)
    if inputs.crop is not None:
        back = pickle.loads(pickle.dumps(inputs.crop))
        assert back.box == inputs.crop.box and back.picture.key == inputs.crop.picture.key


def test_the_module_says_which_variants_exist():
    assert LookCloser().view in look_closer.VIEWS and LookCloser().map in look_closer.MAPS
    assert LookCloser().box in look_closer.BOXES and LookCloser().min_box in look_closer.MIN_BOXES


# ------------------------------------------------------------------------------------------------------------------
# With an 8-bit LM, and with an LM offloaded by a device map
def _looked(vlm, image, view="both"):
    """(the question's map over the picture, the answer from a given crop, its explanation)."""
    question = vlm.question(image, "What is in the image?", look_closer={"view": view}, max_new_tokens=6, **GREEDY)
    inputs = vlm.prepare(_with_crop(vlm, question, (40, 30, 130, 102), view))
    heat = look_closer.question_map(vlm, vlm.prepare(vlm.question(image, "What is in the image?")))
    ids = vlm.generate_prepared(inputs)
    return heat, vlm.decode(ids), vlm.explain_prepared(inputs, ids)


def test_the_look_and_its_maps_work_with_an_8bit_lm(checkpoint_dir):
    pytest.importorskip("bitsandbytes")
    folder = checkpoint_dir("instructblip", "llama")
    vlm = blipdemo.load(folder, dtype="bfloat16", load_in_8bit=True, quantization="bitsandbytes")
    assert any(type(m).__name__ == "Linear8bitLt" for m in vlm.language_model.modules())
    heat, text, e = _looked(vlm, _photo())
    assert np.isfinite(heat).all() and abs(heat.sum() - 1) < 1e-6
    assert e.text == text and e.crop.pictures == ("original", "crop")
    np.testing.assert_allclose(e.token_maps.sum(axis=(1, 2)), 1.0, atol=1e-6)


def test_the_look_and_its_answer_are_the_same_with_the_lm_offloaded(checkpoint_dir, tmp_path):
    folder = checkpoint_dir("blip2", "opt")
    plain = blipdemo.load(folder, dtype="float32", device="cpu")
    offloaded = blipdemo.load(
        folder, dtype="float32", device_map="auto", max_memory={"cpu": 300_000}, offload_folder=str(tmp_path / "off")
    )
    assert "disk" in set(offloaded.load_info["device_map"].values())
    a, b = _looked(plain, _photo()), _looked(offloaded, _photo())
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert a[1] == b[1]
    np.testing.assert_allclose(a[2].token_maps, b[2].token_maps, atol=1e-5)
