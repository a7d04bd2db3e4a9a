"""The pointing game: do the attention maps of the embedded model point at the object a question names?

    python benchmarks/pointing_game.py [--model assets/shapes-instructblip] [--scenes 300]

For fresh shapes scenes (docs/scenes.md; a seed training never used):
- "Where is the {color} {shape}?": the peak of the whole-answer map must fall inside the named object's box
  enlarged by 15 px;
- "What color is the {shape}?": the same for the map of the answer's first token (the color word);
- "Describe the image." (2-3 objects): the map of each color word of the description must point at the
  object that word describes — the per-word test, which a map that ignores the LM cannot pass;
- "Which is higher, the {color1} {shape1} or the {color2} {shape2}?" (two objects in different rows, named in
  random order; docs/scenes.md, version 2): the map of the answer's color word must point at the object that word
  names (the higher one when the answer is right); an answer with no color of the scene counts as a miss.
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
from blipdemo.decoding import DecodingOptions  # noqa: E402
from blipdemo.tiny import scenes  # noqa: E402

MARGIN = 15  # px, in the 224-px canvas
CASES = ("where", "color", "describe", "relation")


def patch_centers(grid: tuple[int, int], size: int = scenes.SIZE) -> np.ndarray:
    """(gh, gw, 2) centers (x, y) of the patches in canvas pixels."""
    gh, gw = grid
    ys, xs = (np.arange(gh) + 0.5) * size / gh, (np.arange(gw) + 0.5) * size / gw
    return np.stack(np.meshgrid(xs, ys), axis=-1)


def inside(point, box, margin: int = MARGIN) -> bool:
    x0, y0, x1, y1 = box
    return x0 - margin <= point[0] < x1 + margin and y0 - margin <= point[1] < y1 + margin


def explanations(model, image, question: str, max_new_tokens: int) -> dict:
    """{aggregation: Explanation} of the greedy answer to ``question``, generated once for all aggregations."""
    options = DecodingOptions.of(num_beams=1, max_new_tokens=max_new_tokens)
    inputs, ids = model._generate(image, question, (), options)
    return {agg: explain_answer(model, inputs, ids, "", aggregate=agg) for agg in AGGREGATIONS}


def peak_inside(heat: np.ndarray, box) -> bool:
    """Whether the hottest patch of a (gh, gw) map has its center inside the box (plus the margin)."""
    peak = np.unravel_index(heat.argmax(), heat.shape)
    return inside(patch_centers(heat.shape)[peak], box)


def random_patch_share(grid: tuple[int, int], box) -> float:
    """The random baseline: the share of patches whose center is inside the box (plus the margin)."""
    return float(np.mean([inside(c, box) for c in patch_centers(grid).reshape(-1, 2)]))


def higher_pair(scene: scenes.Scene, rng: random.Random) -> tuple[scenes.SceneObject, scenes.SceneObject] | None:
    """Two objects in different grid rows, in random order (None when all share one row)."""
    row = {o: scenes.CELLS.index(o.cell) // 3 for o in scene.objects}
    pairs = [(a, b) for a in scene.objects for b in scene.objects if row[a] != row[b]]
    return rng.choice(pairs) if pairs else None


def relation_case(model, scene: scenes.Scene, image, pair) -> tuple[dict[str, bool], float]:
    """({aggregation: hit}, random baseline) for "Which is higher, the A or the B?" about ``pair``."""
    a, b = pair
    maps = explanations(model, image, f"Which is higher, the {a.color} {a.shape} or the {b.color} {b.shape}?", 8)
    tokens = next(iter(maps.values())).tokens  # one generated answer, explained per aggregation
    by_color = {o.color: o for o in scene.objects}
    named = [(i, by_color[t.strip()]) for i, t in enumerate(tokens) if t.strip() in by_color]
    if not named:  # no object named: a miss for every aggregation; the baseline is that of the right answer
        upper = min(pair, key=lambda o: scenes.CELLS.index(o.cell))  # rows differ: the lower index is higher up
        return dict.fromkeys(maps, False), random_patch_share(maps[AGGREGATIONS[0]].token_maps.shape[1:], upper.box)
    i, obj = named[0]
    hits = {agg: peak_inside(e.token_maps[i], obj.box) for agg, e in maps.items()}
    return hits, random_patch_share(maps[AGGREGATIONS[0]].token_maps[i].shape, obj.box)


def run(model, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    relation_rng = random.Random(seed + 1)  # its own stream: the other cases keep their scenes and numbers
    hits = {(family, agg): 0 for family in CASES for agg in AGGREGATIONS}
    baseline = dict.fromkeys(CASES, 0.0)
    words = relations = 0
    for _ in range(n):
        scene = scenes.sample_scene(rng)
        image = scenes.render(scene, rng)
        target = rng.choice(scene.objects)
        for family, question in (
            ("where", f"Where is the {target.color} {target.shape}?"),
            ("color", f"What color is the {target.shape}?"),
        ):
            for agg, e in explanations(model, image, question, 8).items():
                heat = e.image_map if family == "where" else e.token_maps[0]
                hits[(family, agg)] += peak_inside(heat, target.box)
            baseline[family] += random_patch_share(heat.shape, target.box)
        if len(scene.objects) > 1:
            for agg, e in explanations(model, image, "Describe the image.", 40).items():
                color_tokens = [i for i, t in enumerate(e.tokens) if t.strip() in scenes.COLORS]
                for obj, i in zip(scene.objects, color_tokens, strict=False):
                    hits[("describe", agg)] += peak_inside(e.token_maps[i], obj.box)
                    if agg == AGGREGATIONS[0]:
                        words += 1
                        baseline["describe"] += random_patch_share(e.token_maps[i].shape, obj.box)
        if pair := higher_pair(scene, relation_rng):
            relation_hits, share = relation_case(model, scene, image, pair)
            for agg, hit in relation_hits.items():
                hits[("relation", agg)] += hit
            baseline["relation"] += share
            relations += 1
    table = {}
    totals = {"where": n, "color": n, "describe": max(words, 1), "relation": max(relations, 1)}
    for family in CASES:
        total = totals[family]
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
