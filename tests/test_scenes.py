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

_C, _S = "(red|green|blue|yellow|purple|orange)", "(circle|square|triangle)"
CANONICAL = {  # the spec's tables, as patterns over the canonical questions
    "color": rf"What color is the {_S}\?",
    "shape": rf"What shape is the {_C} object\?",
    "count": r"How many shapes are there\?",
    "where": rf"Where is the {_C} {_S}\?",
    "exists": rf"Is there a {_C} {_S}\?",
    "describe": r"Describe the image\.",
    # Version 2
    "absent": rf"What color is the {_S}\?|What shape is the {_C} object\?|Where is the {_C} {_S}\?",
    "relation": rf"Is the {_C} {_S} (left of|above) the {_C} {_S}\?|Which is higher, the {_C} {_S} or the {_C} {_S}\?",
    "follow-up": r"What color is it\?|What shape is it\?|Where is it\?",
}
# A follow-up's question → the attribute of "it" that answers it.
FOLLOW_UP_ATTRIBUTE = {"What color is it?": "color", "What shape is it?": "shape", "Where is it?": "cell"}


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
    v1 = ("color", "shape", "count", "where", "exists", "describe")
    assert scenes.V1_FAMILIES == v1 == ref.V1
    assert scenes.FAMILIES == (*v1, "absent", "relation", "follow-up") == (*ref.V1, *ref.V2)
    assert (*scenes.SINGLE_TURN, "follow-up") == scenes.FAMILIES  # a follow-up needs the turn it follows


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
            if not scenes.can_ask(scene, family):
                continue
            for variant in (False, True):
                if family == "follow-up":  # asked through the chat history
                    d = scenes.dialogue(scene, family, rng, variant=variant)
                    question, answer, history = d.question, d.answer, d.history
                else:
                    (question, answer), history = scenes.ask(scene, family, rng, variant=variant), ()
                assert answer == scenes.normalize_answer(answer), "answers are emitted in canonical form"
                expected = ref.normalize(ref.answer(as_ref, question, history))
                assert expected == scenes.normalize_answer(answer), (history, question)
                if not variant:
                    assert re.fullmatch(CANONICAL[family], question), question


def test_question_surface_forms():
    rng = random.Random(4)
    scene = scenes.sample_scene(rng, 2)
    forms = collections.Counter()
    for _ in range(3000):
        d = scenes.dialogue(scene, rng.choice(scenes.FAMILIES), rng)  # two objects: every family can be asked
        question = d.question
        canonical = question[:1].isupper() and question[1:] == question[1:].lower() and question[-1] in "?."
        forms["canonical" if canonical else "varied"] += 1
        forms["lower"] += question == question.lower()
        forms["no end"] += question[-1] not in "?."
        ref.answer(as_dict(scene), question, d.history)  # every form must still parse as a question of the spec
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
    with pytest.raises(ValueError, match="dialogue"):  # a follow-up needs the turn it follows
        scenes.ask(scenes.sample_scene(random.Random(0)), "follow-up", random.Random(0))


def test_deterministic_under_a_fixed_seed():
    def run(seed: int):
        rng = random.Random(seed)
        out = []
        for _ in range(20):
            scene = scenes.sample_scene(rng)
            image = scenes.degrade(scenes.render(scene, rng), rng)
            asked = [scenes.dialogue(scene, f, rng, earlier=2) for f in scenes.FAMILIES if scenes.can_ask(scene, f)]
            out.append((scene, image.size, image.tobytes(), asked))
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
        for family, question, answer, history in ref.v2_questions(scene, np_rng):
            families[family, ""] += 1
            assert re.fullmatch(CANONICAL[family], question), question
            assert ref.answer(scene, question, history) == answer
            assert all(ref.answer(scene, q) == a for q, a in history), history
    assert {f for f, _ in families} == set(scenes.FAMILIES)
    assert families["exists", "yes"] == families["exists", "no"]
    one = {"background": 100, "objects": [{"shape": "circle", "color": "red", "cell": "top", "box": (0, 0, 1, 1)}]}
    two = {"background": 100, "objects": [*one["objects"], {**one["objects"][0], "shape": "square", "cell": "bottom"}]}
    assert ref.answer(one, "What color is the square?") == "there is no square"  # version 2: defined
    for undefined, history in [
        ("What color is it?", []),  # a follow-up with no turn before it
        ("Where is it?", [("How many shapes are there?", "one")]),  # nor after a turn about no one object
        ("Is the red circle left of the blue square?", []),  # a relation naming an absent object
        ("Is the red circle left of the red square?", []),  # "left of" within one column
    ]:
        with pytest.raises(LookupError):
            ref.answer(two, undefined, history)
    assert ref.answer(two, "Is the red circle above the red square?") == "yes"


# --------------------------------------------------------------------------------------------------
# Version 2: absent objects, relations, follow-ups. Each answer is re-derived here from the scene's objects (their
# boxes for grid positions), not from the generator's helpers.
def grid_position(obj: scenes.SceneObject) -> tuple[int, int]:
    """(row, column), 0..2, of the cell that holds the center of the object's box."""
    x0, y0, x1, y1 = obj.box
    pitch = 224 / 3
    return int((y0 + y1) / 2 // pitch), int((x0 + x1) / 2 // pitch)


def named(scene: scenes.Scene, color: str, shape: str) -> scenes.SceneObject:
    """The scene's object of that color and shape (the question must name one)."""
    hits = [o for o in scene.objects if (o.color, o.shape) == (color, shape)]
    assert len(hits) == 1, (color, shape, scene)
    return hits[0]


def test_absent_questions_name_what_the_scene_lacks():
    rng = random.Random(11)
    forms = collections.Counter()
    for scene in many_scenes(3000, seed=11):
        question, answer = scenes.ask(scene, "absent", rng, variant=False)
        colors, shapes = {o.color for o in scene.objects}, {o.shape for o in scene.objects}
        if m := re.fullmatch(r"What color is the (\w+)\?", question):
            assert m[1] in scenes.SHAPES and m[1] not in shapes, (question, scene)
            assert answer == f"there is no {m[1]}"
            forms["color"] += 1
        elif m := re.fullmatch(r"What shape is the (\w+) object\?", question):
            assert m[1] in scenes.COLORS and m[1] not in colors, (question, scene)
            assert answer == f"there is no {m[1]} object"
            forms["shape"] += 1
        else:
            m = re.fullmatch(r"Where is the (\w+) (\w+)\?", question)
            assert m and m[1] in scenes.COLORS and m[2] in scenes.SHAPES, question
            assert not any((o.color, o.shape) == (m[1], m[2]) for o in scene.objects), (question, scene)
            assert answer == f"there is no {m[1]} {m[2]}"
            # Which of the pair the scene has elsewhere: both (on two objects), one of them, or neither.
            forms["where", (m[1] in colors) + (m[2] in shapes)] += 1
    assert min(forms["color"], forms["shape"], sum(v for k, v in forms.items() if k[0] == "where")) > 400, forms
    assert all(forms["where", n] > 20 for n in (0, 1, 2)), forms
    # With three objects every shape is there, so "What color is the …?" can only be asked with fewer.
    three = scenes.sample_scene(random.Random(0), 3)
    assert not any(scenes.ask(three, "absent", rng)[0].lower().startswith("what color") for _ in range(200))


def test_relation_answers_follow_grid_rows_and_columns():
    rng = random.Random(12)
    seen = collections.Counter()
    for scene in many_scenes(3000, seed=12):
        if len(scene.objects) < 2:
            continue
        question, answer = scenes.ask(scene, "relation", rng, variant=False)
        if m := re.fullmatch(r"Is the (\w+) (\w+) (left of|above) the (\w+) (\w+)\?", question):
            a, b = named(scene, m[1], m[2]), named(scene, m[4], m[5])
            axis = 1 if m[3] == "left of" else 0  # left of compares columns, above rows
            assert a is not b and grid_position(a)[axis] != grid_position(b)[axis], (question, scene)
            assert answer == ("yes" if grid_position(a)[axis] < grid_position(b)[axis] else "no"), (question, scene)
            seen[m[3], answer] += 1
        else:
            m = re.fullmatch(r"Which is higher, the (\w+) (\w+) or the (\w+) (\w+)\?", question)
            assert m, question
            a, b = named(scene, m[1], m[2]), named(scene, m[3], m[4])
            assert a is not b and grid_position(a)[0] != grid_position(b)[0], (question, scene)
            upper = a if grid_position(a)[0] < grid_position(b)[0] else b
            assert answer == f"the {upper.color} {upper.shape}", (question, scene)
            seen["higher", "first named" if upper is a else "second named"] += 1
    for kind, answers in (
        ("left of", ("yes", "no")),
        ("above", ("yes", "no")),
        ("higher", ("first named", "second named")),
    ):
        total = sum(seen[kind, x] for x in answers)
        assert total > 300 and 0.4 < seen[kind, answers[0]] / total < 0.6, seen  # no answer is a safe guess


def test_relations_only_across_columns_for_left_of_and_across_rows_for_above():
    rng = random.Random(13)
    column = scenes.Scene(
        100,
        (
            scenes.SceneObject("circle", "red", "top", (87, 13, 137, 63)),
            scenes.SceneObject("square", "blue", "bottom", (87, 161, 137, 211)),
        ),
    )
    row = scenes.Scene(
        100,
        (
            scenes.SceneObject("circle", "red", "left", (13, 87, 63, 137)),
            scenes.SceneObject("square", "blue", "right", (161, 87, 211, 137)),
        ),
    )
    in_column = {scenes.ask(column, "relation", rng, variant=False) for _ in range(300)}
    in_row = {scenes.ask(row, "relation", rng, variant=False) for _ in range(300)}
    assert not any(" left of " in q for q, _ in in_column), in_column
    assert in_column >= {
        ("Is the red circle above the blue square?", "yes"),
        ("Is the blue square above the red circle?", "no"),
        ("Which is higher, the red circle or the blue square?", "the red circle"),
        ("Which is higher, the blue square or the red circle?", "the red circle"),
    }, in_column
    assert in_row == {
        ("Is the red circle left of the blue square?", "yes"),
        ("Is the blue square left of the red circle?", "no"),
    }


def test_can_ask_refuses_relations_on_one_object_scenes():
    for scene in many_scenes(300, seed=14):
        for family in scenes.FAMILIES:
            assert scenes.can_ask(scene, family) == (family != "relation" or len(scene.objects) >= 2), family
    one = scenes.sample_scene(random.Random(0), 1)
    assert not scenes.can_ask(one, "relation")
    with pytest.raises(ValueError):
        scenes.ask(one, "relation", random.Random(0))
    with pytest.raises(ValueError):
        scenes.dialogue(one, "relation", random.Random(0), earlier=1)
    # Earlier turns of a one-object chat never are relations either.
    rng = random.Random(15)
    for _ in range(300):
        d = scenes.dialogue(one, rng.choice(scenes.FAMILIES[:-2]), rng, earlier=2, variant=False)
        assert not any(re.fullmatch(CANONICAL["relation"], q) for q, _ in d.history), d.history


def first_turn_object(scene: scenes.Scene, question: str, answer: str) -> scenes.SceneObject:
    """The one object a color/shape/where question (canonical form) names; asserts that ``answer`` is right."""
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        obj = next(o for o in scene.objects if o.shape == m[1])
        assert answer == obj.color, (question, answer)
    elif m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        obj = next(o for o in scene.objects if o.color == m[1])
        assert answer == obj.shape, (question, answer)
    else:
        m = re.fullmatch(r"Where is the (\w+) (\w+)\?", question)
        assert m, f"a follow-up must follow a color, shape or where question, not {question!r}"
        obj = named(scene, m[1], m[2])
        assert answer == scenes.CELLS[3 * grid_position(obj)[0] + grid_position(obj)[1]], (question, answer)
    return obj


def test_follow_ups_ask_about_the_object_of_the_turn_before():
    rng = random.Random(16)
    firsts, follow_ups = collections.Counter(), collections.Counter()
    for scene in many_scenes(1500, seed=16):
        earlier, chain = rng.randint(0, 2), rng.randint(0, 2)
        d = scenes.dialogue(scene, "follow-up", rng, earlier=earlier, chain=chain, variant=False)
        assert len(d.history) == earlier + 1 + chain, d
        first_question, first_answer = d.history[earlier]
        obj = first_turn_object(scene, first_question, first_answer)
        firsts[first_question.split()[0] + " " + first_question.split()[1]] += 1
        # Every later turn, the new question included, is a follow-up about that same object, rightly answered.
        for question, answer in (*d.history[earlier + 1 :], (d.question, d.answer)):
            assert question in FOLLOW_UP_ATTRIBUTE, question
            assert answer == getattr(obj, FOLLOW_UP_ATTRIBUTE[question]), (d, obj)
        assert d.about == obj
        follow_ups[d.question] += 1
        if chain == 0:
            assert d.history[-1] == (first_question, first_answer), "a plain follow-up comes right after its turn"
    assert len(firsts) == 3 and min(firsts.values()) > 300, firsts  # "What color", "What shape", "Where is"
    assert set(follow_ups) == set(FOLLOW_UP_ATTRIBUTE) and min(follow_ups.values()) > 300, follow_ups


def family_of(question: str, answer: str) -> str:
    """The family of a canonical single-turn question (absent ones share their wording with color/shape/where)."""
    if answer.startswith("there is no "):
        return "absent"
    return next(f for f in scenes.SINGLE_TURN if f != "absent" and re.fullmatch(CANONICAL[f], question))


def test_dialogue_gives_earlier_turns_with_right_answers():
    rng = random.Random(17)
    earlier_families = collections.Counter()
    for scene in many_scenes(400, seed=17):
        as_ref = as_dict(scene)
        for family in scenes.FAMILIES:
            if not scenes.can_ask(scene, family):
                continue
            k = rng.randint(0, 3)
            d = scenes.dialogue(scene, family, rng, earlier=k, variant=False)
            assert len(d.history) == k + (family == "follow-up"), (family, k, d)
            for question, answer in d.history[:k]:  # each stands alone: the reference answers it with no history
                assert ref.answer(as_ref, question) == answer, (question, answer)
                earlier_families[family_of(question, answer)] += 1
            assert ref.answer(as_ref, d.question, d.history) == d.answer, d
            if family != "follow-up":
                assert family_of(d.question, d.answer) == family, d
    assert set(earlier_families) == set(scenes.SINGLE_TURN), earlier_families
