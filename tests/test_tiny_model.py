"""The embedded tiny model in assets/: it really answers, on scenes drawn by an independent renderer, and
transformers' own classes load it and agree with ours."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import scene_reference as ref
import torch
from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

import blipdemo

ASSET = Path(__file__).resolve().parent.parent / "assets" / "shapes-instructblip"


@pytest.fixture(scope="module")
def tiny():
    return blipdemo.load(ASSET)


def _as_user_upload(image, rng):
    """Deliver the picture as users do: another size, PNG or JPEG."""
    side = int(rng.integers(160, 401))
    image = image.resize((side, side), resample=int(rng.choice([2, 3])))
    buffer = io.BytesIO()
    if rng.random() < 0.5:
        image.save(buffer, "JPEG", quality=int(rng.integers(85, 101)))
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def test_the_plain_training_command_is_the_recipe_of_the_shipped_checkpoint():
    """`python -m blipdemo.tiny.train` with no options must train what the checkpoint's log says it was trained with."""
    import json
    from dataclasses import asdict

    from blipdemo.tiny.train import TinyConfig

    assert json.loads((ASSET / "training_log.json").read_text())["config"] == asdict(TinyConfig())


def test_checkpoint_is_small_and_in_the_published_layout():
    total = sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file())
    assert total <= 25 * 2**20, f"{total / 2**20:.1f} MiB"
    for name in (
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "qformer_tokenizer/tokenizer.json",
        "generation_config.json",
    ):
        assert (ASSET / name).is_file(), name


def test_accuracy_on_scenes_from_an_independent_renderer(tiny):
    rng = np.random.default_rng(4242)  # neither renderer's training seeds
    correct, total = defaultdict(int), defaultdict(int)
    for _ in range(40):
        scene = ref.random_scene(rng)
        upload = _as_user_upload(ref.draw(scene, rng), rng)
        for family, question, answer in ref.questions(scene, rng):
            if family == "exists" and total[family] >= 60:
                continue
            got = tiny.ask(upload, question, num_beams=1, max_new_tokens=32)
            correct[family] += ref.normalize(got) == ref.normalize(answer)
            total[family] += 1
    accuracy = {f: correct[f] / total[f] for f in total}
    assert set(accuracy) == {"color", "shape", "count", "where", "exists", "describe"}
    assert all(a > 0.9 for a in accuracy.values()), accuracy


# Version 2 of the scenes (docs/scenes.md): what is not there, relations, follow-ups asked through the history.
# These measure the model trained on version 2; a version-1 model in assets/ fails them (it never saw the families).
V2_QUESTIONS = 90  # per family
V2_PER_SCENE = 3  # at most, so that the questions come from many scenes (a 3-object scene has 9 relation questions)


@pytest.mark.parametrize("family", ref.V2)
def test_v2_accuracy_on_scenes_from_an_independent_renderer(tiny, family):
    rng = np.random.default_rng({"absent": 5151, "relation": 5252, "follow-up": 5353}[family])
    correct, total, wrong = 0, 0, []
    while total < V2_QUESTIONS:
        scene = ref.random_scene(rng)
        asked = [x for x in ref.v2_questions(scene, rng) if x[0] == family]
        if not asked:
            continue  # a relation needs two objects
        upload = _as_user_upload(ref.draw(scene, rng), rng)
        picked = rng.permutation(len(asked))[: min(V2_PER_SCENE, V2_QUESTIONS - total)]
        for _family, question, answer, history in (asked[i] for i in picked):
            got = tiny.ask(upload, question, history=history, num_beams=1, max_new_tokens=32)
            ok = ref.normalize(got) == ref.normalize(answer)
            correct += ok
            total += 1
            if not ok and len(wrong) < 5:
                wrong.append((history, question, answer, got))
    assert correct / total > 0.9, f"{family}: {correct}/{total} right (needs the version-2 model); e.g. {wrong}"


def test_reads_ordinary_english_without_crashing(tiny):
    rng = np.random.default_rng(1)
    image = ref.draw(ref.random_scene(rng), rng)
    for text in [
        "What is unusual about this image? Tell me a story about it, please!",
        "¿Qué color tiene el círculo? 🤔",
        "<image> </s> [SEP] [CLS] <s>",
    ]:
        assert isinstance(tiny.ask(image, text, num_beams=1, max_new_tokens=16), str)


def test_transformers_reference_loads_it_and_agrees(tiny):
    model = InstructBlipForConditionalGeneration.from_pretrained(ASSET, dtype=torch.float32).eval()
    processor = InstructBlipProcessor.from_pretrained(ASSET)
    ours = blipdemo.load(ASSET, dtype="float32")
    rng = np.random.default_rng(99)
    for _ in range(6):
        scene = ref.random_scene(rng)
        image = ref.draw(scene, rng)
        for _family, question, _answer in ref.questions(scene, rng)[:4] + ref.questions(scene, rng)[-1:]:
            inputs = processor(images=image, text=question, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=32, num_beams=1, do_sample=False)
            expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            assert ours.ask(image, question, num_beams=1, max_new_tokens=32) == expected[0].strip()


def test_where_maps_point_at_the_named_object(tiny):
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(20):
        scene = ref.random_scene(rng)
        target = scene["objects"][int(rng.integers(len(scene["objects"])))]
        e = tiny.explain(ref.draw(scene, rng), f"Where is the {target['color']} {target['shape']}?", num_beams=1)
        gh, gw = e.image_map.shape
        r, c = np.unravel_index(e.image_map.argmax(), (gh, gw))
        x, y = (c + 0.5) * 224 / gw, (r + 0.5) * 224 / gh
        x0, y0, x1, y1 = target["box"]
        hits += x0 - 15 <= x < x1 + 15 and y0 - 15 <= y < y1 + 15
    assert hits >= 14, f"{hits}/20 peaks inside the named object"
