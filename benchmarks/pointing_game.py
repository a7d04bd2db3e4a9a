"""The pointing game: do the attention maps of the embedded model point at the object a question names?

    python benchmarks/pointing_game.py [--model assets/shapes-instructblip] [--scenes 300]

For fresh shapes scenes (docs/scenes.md; a seed training never used):
- "Where is the {color} {shape}?": the peak of the whole-answer map must fall inside the named object's box
  enlarged by 15 px;
- "What color is the {shape}?": the same for the map of the answer's first token (the color word);
- "Describe the image." (2-3 objects): the map of each color word of the description must point at the
  object that word describes — the per-word test, which a map that ignores the LM cannot pass.
Against the random baseline (a uniformly random patch) and for each aggregation of attention.py.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blipdemo  # noqa: E402
from blipdemo.attention import AGGREGATIONS, explain_answer  # noqa: E402
from blipdemo.tiny import scenes  # noqa: E402

MARGIN = 15  # px, in the 224-px canvas


def patch_centers(grid: tuple[int, int], size: int = scenes.SIZE) -> np.ndarray:
    """(gh, gw, 2) centers (x, y) of the patches in canvas pixels."""
    gh, gw = grid
    ys, xs = (np.arange(gh) + 0.5) * size / gh, (np.arange(gw) + 0.5) * size / gw
    return np.stack(np.meshgrid(xs, ys), axis=-1)


def inside(point, box, margin: int = MARGIN) -> bool:
    x0, y0, x1, y1 = box
    return x0 - margin <= point[0] < x1 + margin and y0 - margin <= point[1] < y1 + margin


def run(model, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    hits = {(family, agg): 0 for family in ("where", "color", "describe") for agg in AGGREGATIONS}
    baseline = {"where": 0.0, "color": 0.0, "describe": 0.0}
    words = 0
    for _ in range(n):
        scene = scenes.sample_scene(rng)
        image = scenes.render(scene, rng)
        target = rng.choice(scene.objects)
        for family, question in (
            ("where", f"Where is the {target.color} {target.shape}?"),
            ("color", f"What color is the {target.shape}?"),
        ):
            inputs, ids = model._generate(image, question, (), {"num_beams": 1, "max_new_tokens": 8})
            for agg in AGGREGATIONS:
                e = explain_answer(model, inputs, ids, "", image, aggregate=agg)
                heat = e.image_map if family == "where" else e.token_maps[0]
                centers = patch_centers(heat.shape)
                peak = np.unravel_index(heat.argmax(), heat.shape)
                hits[(family, agg)] += inside(centers[peak], target.box)
            centers = patch_centers(heat.shape).reshape(-1, 2)
            baseline[family] += np.mean([inside(c, target.box) for c in centers])
        if len(scene.objects) > 1:
            inputs, ids = model._generate(image, "Describe the image.", (), {"num_beams": 1, "max_new_tokens": 40})
            for agg in AGGREGATIONS:
                e = explain_answer(model, inputs, ids, "", image, aggregate=agg)
                color_tokens = [i for i, t in enumerate(e.tokens) if t.strip() in scenes.COLORS]
                for obj, i in zip(scene.objects, color_tokens, strict=False):
                    heat = e.token_maps[i]
                    peak = np.unravel_index(heat.argmax(), heat.shape)
                    hits[("describe", agg)] += inside(patch_centers(heat.shape)[peak], obj.box)
                    if agg == AGGREGATIONS[0]:
                        words += 1
                        centers = patch_centers(heat.shape).reshape(-1, 2)
                        baseline["describe"] += np.mean([inside(c, obj.box) for c in centers])
    table = {}
    for family in ("where", "color", "describe"):
        total = n if family != "describe" else max(words, 1)
        table.update({f"{family} / {agg}": hits[(family, agg)] / total for agg in AGGREGATIONS})
        table[f"{family} / random patch"] = baseline[family] / total
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="assets/shapes-instructblip")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=777_000)
    args = parser.parse_args()
    model = blipdemo.load(args.model)
    start = time.time()
    table = run(model, args.scenes, args.seed)
    print(f"| pointing game ({args.scenes} fresh scenes, box + {MARGIN} px) | hit rate |\n|---|---|")
    for name, value in table.items():
        print(f"| {name} | {100 * value:.1f}% |")
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
