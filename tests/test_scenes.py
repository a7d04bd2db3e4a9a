"""blipdemo.tiny.scenes checked against docs/scenes.md and the independent tests/scene_reference.py."""

from __future__ import annotations

import collections
import random
import re

import numpy as np
import pytest

from blipdemo.tiny import scenes

try:  # tests/ on sys.path (rootdir-relative imports, no tests/__init__.py)
    import scene_reference as ref
except ImportError:  # tests/ is a package
    from tests import scene_reference as ref

CANONICAL = {  # the spec's table, as patterns over the canonical questions
    "color": r"What color is the (circle|square|triangle)\?",
    "shape": r"What shape is the (red|green|blue|yellow|purple|orange) object\?",
    "count": r"How many shapes are there\?",
    "where": r"Where is the (red|green|blue|yellow|purple|orange) (circle|square|triangle)\?",
    "exists": r"Is there a (red|green|blue|yellow|purple|orange) (circle|square|triangle)\?",
    "describe": r"Describe the image\.",
}


def as_dict(scene: scenes.Scene) -> dict:
    """The reference module's representation of a training-side scene."""
    return {
        "background": scene.background,
        "objects": [{"shape": o.shape, "color": o.color, "cell": o.cell, "box": o.box} for o in scene.objects],
    }


def many_scenes(n: int, seed: int = 0) -> list[scenes.Scene]:
    rng = random.Random(seed)
    return [scenes.sample_scene(rng) for _ in range(n)]


def test_constants_follow_the_spec():
    assert scenes.SHAPES == ("circle", "square", "triangle")
    assert scenes.COLORS == ref.NOMINAL
    assert scenes.CELLS == ref.CELL_NAMES
    assert scenes.FAMILIES == ("color", "shape", "count", "where", "exists", "describe")


def test_sampled_scenes_cover_the_spec_range():
    all_scenes = many_scenes(3000)
    sides, offsets, backgrounds = [], [], []
    counts, cells = collections.Counter(), collections.Counter()
    for scene in all_scenes:
        objs = scene.objects
        counts[len(objs)] += 1
        backgrounds.append(scene.background)
        assert 60 <= scene.background <= 190
        assert 1 <= len(objs) <= 3
        assert len({o.shape for o in objs}) == len(objs), "shapes must be distinct"
        assert len({o.color for o in objs}) == len(objs), "colors must be distinct"
        indices = [scenes.CELLS.index(o.cell) for o in objs]
        assert indices == sorted(set(indices)), "one object per cell, in reading order"
        for o in objs:
            assert o.shape in scenes.SHAPES and o.color in scenes.COLORS
            x0, y0, x1, y1 = o.box
            assert x1 - x0 == y1 - y0, "bounding box must be a square"
            assert 36 <= x1 - x0 <= 64
            assert min(x0, y0) >= 0 and max(x1, y1) <= 224
            row, col = divmod(scenes.CELLS.index(o.cell), 3)
            dx, dy = (x0 + x1) / 2 - (col + 0.5) * 224 / 3, (y0 + y1) / 2 - (row + 0.5) * 224 / 3
            assert abs(dx) <= 6 and abs(dy) <= 6
            sides.append(x1 - x0)
            offsets += [dx, dy]
            cells[o.cell] += 1
    # The whole range is used, not just its middle.
    assert set(counts) == {1, 2, 3} and set(cells) == set(scenes.CELLS)
    assert min(sides) == 36 and max(sides) == 64
    assert min(offsets) < -5.4 and max(offsets) > 5.4
    assert min(backgrounds) == 60 and max(backgrounds) == 190
    with pytest.raises(ValueError):
        scenes.sample_scene(random.Random(0), 4)
    assert len(scenes.sample_scene(random.Random(0), 2).objects) == 2


def test_render_background_and_object_colors():
    rng = random.Random(1)
    deviations = []
    for scene in many_scenes(300, seed=1):
        pixels = np.asarray(scenes.render(scene, rng))
        assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
        # Everywhere outside the boxes (plus the 1 px that sub-pixel placement may add) is the uniform gray.
        outside = np.ones((224, 224), bool)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            outside[y0 : y1 + 1, x0 : x1 + 1] = False
        assert (pixels[outside] == scene.background).all()
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            center = pixels[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
            deviation = center - np.array(scenes.COLORS[o.color])
            assert np.abs(deviation).max() <= 20, (o, center)
            deviations += deviation.tolist()
    assert min(deviations) <= -18 and max(deviations) >= 18, "color jitter should span ±20"


def test_antialias_switch():
    def n_colors(image) -> int:
        return len(image.getcolors(maxcolors=224 * 224))

    scene = scenes.Scene(120, (scenes.SceneObject("circle", "red", "center", (82, 82, 142, 142)),))
    assert n_colors(scenes.render(scene, random.Random(0), antialias=False)) == 2, "background + one fill"
    assert n_colors(scenes.render(scene, random.Random(0), antialias=True)) > 10, "edges blend into the gray"
    rng = random.Random(2)
    smooth = {n_colors(scenes.render(scene, rng)) > 2 for _ in range(20)}
    assert smooth == {False, True}, "antialias=None must give both kinds"


def test_answers_agree_with_the_reference():
    rng = random.Random(3)
    for scene in many_scenes(500, seed=3):
        as_ref = as_dict(scene)
        for family in scenes.FAMILIES:
            for variant in (False, True):
                question, answer = scenes.ask(scene, family, rng, variant=variant)
                assert answer == scenes.normalize_answer(answer), "answers are emitted in canonical form"
                assert ref.normalize(ref.answer(as_ref, question)) == scenes.normalize_answer(answer), question
                if not variant:
                    assert re.fullmatch(CANONICAL[family], question), question


def test_question_surface_forms():
    rng = random.Random(4)
    scene = scenes.sample_scene(rng, 2)
    forms = collections.Counter()
    for _ in range(3000):
        question, _ = scenes.ask(scene, rng.choice(scenes.FAMILIES), rng)
        canonical = question[:1].isupper() and question[1:] == question[1:].lower() and question[-1] in "?."
        forms["canonical" if canonical else "varied"] += 1
        forms["lower"] += question == question.lower()
        forms["no end"] += question[-1] not in "?."
        ref.answer(as_dict(scene), question)  # every form must still parse as a question of the spec
    assert forms["canonical"] > 2 * forms["varied"], forms
    assert forms["lower"] > 100 and forms["no end"] > 100, forms
    assert scenes.normalize_question("  WHAT color is the circle? ") == "what color is the circle"


def test_describe_reading_order():
    objects = (
        scenes.SceneObject("circle", "red", "top left", (10, 10, 60, 60)),
        scenes.SceneObject("triangle", "green", "top", (90, 10, 140, 60)),
        scenes.SceneObject("square", "blue", "center", (90, 90, 140, 140)),
    )
    assert scenes.describe(scenes.Scene(100, objects[:1])) == "a red circle at the top left"
    assert (
        scenes.describe(scenes.Scene(100, (objects[0], objects[2])))
        == "a red circle at the top left and a blue square at the center"
    )
    assert (
        scenes.describe(scenes.Scene(100, objects))
        == "a red circle at the top left, a green triangle at the top and a blue square at the center"
    )
    rng = random.Random(5)
    for scene in many_scenes(200, seed=5):
        text = scenes.describe(scene)
        assert text == ref.answer(as_dict(scene), "Describe the image.")
        assert scenes.ask(scene, "describe", rng, variant=False) == ("Describe the image.", text)
        positions = [text.index(f"a {o.color} {o.shape} at the {o.cell}") for o in scene.objects]
        assert positions == sorted(positions)


def test_exists_is_balanced():
    rng = random.Random(6)
    answers = [scenes.ask(scene, "exists", rng)[1] for scene in many_scenes(4000, seed=6)]
    assert set(answers) == {"yes", "no"}
    assert 0.46 < answers.count("yes") / len(answers) < 0.54


def test_normalize_answer_and_count_word():
    assert scenes.normalize_answer("  Top Left. ") == "top left"
    assert scenes.normalize_answer("yes") == "yes"
    assert scenes.normalize_answer("one..") == "one."  # only one final period goes
    assert [scenes.count_word(n) for n in (1, 2, 3)] == ["one", "two", "three"]
    with pytest.raises(ValueError):
        scenes.count_word(4)
    with pytest.raises(ValueError):
        scenes.ask(scenes.sample_scene(random.Random(0)), "size", random.Random(0))


def test_deterministic_under_a_fixed_seed():
    def run(seed: int):
        rng = random.Random(seed)
        out = []
        for _ in range(20):
            scene = scenes.sample_scene(rng)
            image = scenes.degrade(scenes.render(scene, rng), rng)
            out.append((scene, image.size, image.tobytes(), [scenes.ask(scene, f, rng) for f in scenes.FAMILIES]))
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_degrade_sizes_and_modes():
    rng = random.Random(8)
    scene = scenes.sample_scene(rng, 3)
    image = scenes.render(scene, rng, antialias=False)
    original = np.asarray(image)
    kinds = collections.Counter()
    for _ in range(200):
        out = scenes.degrade(image, rng)
        assert out.mode == "RGB"
        width, height = out.size
        if out.size == (224, 224):
            kinds["same size, same pixels" if np.array_equal(np.asarray(out), original) else "re-encoded"] += 1
        else:
            assert 160 <= width <= 400 and 160 <= height <= 400, out.size
            assert 0.8 <= width / height <= 1.25, out.size
            kinds["resized"] += 1
    assert min(kinds.values()) > 20 and len(kinds) == 3, kinds


def mask_from_background(pixels: np.ndarray, background: int) -> np.ndarray:
    # Every spec color is at least ~45 away from any gray in some channel, so 25 separates them.
    return np.abs(pixels.astype(int) - background).max(axis=-1) > 25


def test_the_two_renderers_agree_on_object_masks():
    rng, np_rng = random.Random(9), np.random.default_rng(9)
    worst = 1.0
    for scene in many_scenes(100, seed=9):
        ours = mask_from_background(np.asarray(scenes.render(scene, rng, antialias=False)), scene.background)
        theirs = mask_from_background(np.asarray(ref.draw(as_dict(scene), np_rng, antialias=False)), scene.background)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            region = (slice(max(0, y0 - 2), y1 + 2), slice(max(0, x0 - 2), x1 + 2))
            a, b = ours[region], theirs[region]
            iou = (a & b).sum() / (a | b).sum()
            assert iou > 0.8, (o, iou)
            worst = min(worst, iou)
    assert worst > 0.9, worst  # the same geometry, so well beyond the 0.8 floor


def test_reference_is_self_consistent():
    np_rng = np.random.default_rng(10)
    families = collections.Counter()
    for _ in range(100):
        scene = ref.random_scene(np_rng)
        pixels = np.asarray(ref.draw(scene, np_rng))
        assert pixels.shape == (224, 224, 3)
        assert 60 <= scene["background"] <= 190 and 1 <= len(scene["objects"]) <= 3
        for family, question, answer in ref.questions(scene, np_rng):
            families[family, answer if family == "exists" else ""] += 1
            assert re.fullmatch(CANONICAL[family], question), question
            assert ref.answer(scene, question) == answer
    assert {f for f, _ in families} == set(scenes.FAMILIES)
    assert families["exists", "yes"] == families["exists", "no"]
    with pytest.raises(LookupError):
        ref.answer({"background": 100, "objects": []}, "What color is the circle?")
