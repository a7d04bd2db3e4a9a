"""The app's example images: shapes scenes drawn by our renderer, with one question each.

    python -m blipdemo.tiny.examples assets/examples

Writes PNGs and ``examples.json`` ([{"image": file, "question": q, "answer": a}], plus ``"history": [[q, a], ...]``
for a question that continues a chat: the earlier turns, oldest first); the answers let tests check that the
embedded model answers its own examples.

The spec words its questions "Is there a {color} {shape}?" even for "orange"; the examples are what a visitor reads
first, so their questions say "an orange" (``grammatical``). The model answers both wordings alike: asked both on
500 fresh scenes (and on 400 scenes with an orange object, half of them "yes", in canonical and varied case), it gave
the same, right answer every time.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from . import scenes

# (seed, number of objects, family, form): a spread of what the embedded model can answer. ``form``, when given,
# is a pattern that the chat's questions, earlier turns first, joined by " / ", must match: the question is drawn
# again (from the same seeded stream) until it shows what the example is for.
PLAN = [
    (11, 2, "describe", None),
    (12, 3, "where", None),
    (13, 1, "color", None),
    (14, 3, "count", None),
    (15, 2, "exists", None),
    (16, 3, "shape", None),
    # Version 2: something that is not there, a relation, and a follow-up whose answer the first turn does not give.
    (17, 2, "absent", r"Where is the .*"),
    (18, 3, "relation", r"Which is higher, .*"),
    (19, 2, "follow-up", r"What (color|shape) is the .* / Where is it\?"),
]
MAX_DRAWS = 100  # questions drawn for one example before its seed is declared unfit for its form
VOWEL_ARTICLE = re.compile(r"\ba (?=[aeiou])")  # "a orange" (the spec's template) → "an orange"


def grammatical(question: str) -> str:
    """The spec's question as a visitor should read it: "a" before a vowel becomes "an" (only "orange" has one)."""
    return VOWEL_ARTICLE.sub("an ", question)


def pick_question(scene: scenes.Scene, family: str, form: str | None, rng: random.Random) -> scenes.Dialogue:
    """The first question of ``family`` (canonical wording) whose chat matches ``form``; any when ``form`` is None."""
    for _ in range(MAX_DRAWS):
        d = scenes.dialogue(scene, family, rng, variant=False)
        if form is None or re.fullmatch(form, " / ".join([*(q for q, _ in d.history), d.question])):
            return d
    raise ValueError(f"no {family} question of the form {form!r} for this scene: pick another seed")


def write_examples(folder: Path) -> list[dict]:
    """Render the example scenes into ``folder`` and return the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    for seed, n, family, form in PLAN:
        rng = random.Random(seed)
        scene = scenes.sample_scene(rng, n_objects=n)
        image = scenes.render(scene, rng, antialias=True)
        d = pick_question(scene, family, form, rng)
        name = f"shapes-{seed}.png"
        image.save(folder / name, optimize=True)
        entry = {"image": name, "question": grammatical(d.question), "answer": d.answer}
        if d.history:
            entry["history"] = [[grammatical(q), a] for q, a in d.history]
        manifest.append(entry)
    (folder / "examples.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


if __name__ == "__main__":
    write_examples(Path(sys.argv[1] if len(sys.argv) > 1 else "assets/examples"))
