"""The app's example images: shapes scenes drawn by our renderer, with one question each.

    python -m blipdemo.tiny.examples assets/examples

Writes PNGs and ``examples.json`` ([{"image": file, "question": q, "answer": a}]); the answers let
tests check that the embedded model answers its own examples.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from . import scenes

# (seed, number of objects, family): a spread of what the embedded model can answer.
PLAN = [(11, 2, "describe"), (12, 3, "where"), (13, 1, "color"), (14, 3, "count"), (15, 2, "exists"), (16, 3, "shape")]


def write_examples(folder: Path) -> list[dict]:
    """Render the example scenes into ``folder`` and return the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    for seed, n, family in PLAN:
        rng = random.Random(seed)
        scene = scenes.sample_scene(rng, n_objects=n)
        image = scenes.render(scene, rng, antialias=True)
        question, answer = scenes.ask(scene, family, rng, variant=False)
        name = f"shapes-{seed}.png"
        image.save(folder / name, optimize=True)
        manifest.append({"image": name, "question": question, "answer": answer})
    (folder / "examples.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


if __name__ == "__main__":
    write_examples(Path(sys.argv[1] if len(sys.argv) > 1 else "assets/examples"))
