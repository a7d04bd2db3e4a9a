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
  names (the higher one when the answer is right); an answer with no color of the scene counts as a miss;
- reverse describe: the same descriptions backwards — the box of each object (in the image's pixels) must give
  *its* color word the highest ``words_in_region`` score among the answer's color words (answers with at least two
  color words; the baseline is a random one of them).
Against the random baseline (a uniformly random patch, a random color word) and for each aggregation of attention.py.
The first table is raw attention (the default maps); the second crosses methods (attention, relevancy) and
aggregations for every question type, with the time the maps of one answer took per method (all aggregations of a
method share its pass). ``--methods attention`` skips relevancy.
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
from blipdemo.attention import AGGREGATIONS, METHODS, explain_selections, map_selection  # noqa: E402
from blipdemo.tiny import scenes  # noqa: E402

MARGIN = 15  # px, in the 224-px canvas
CASES = ("where", "color", "describe", "relation")
QUESTION_TYPES = (*CASES, "reverse describe")


def patch_centers(grid: tuple[int, int], size: int = scenes.SIZE) -> np.ndarray:
    """(gh, gw, 2) centers (x, y) of the patches in canvas pixels."""
    gh, gw = grid
    ys, xs = (np.arange(gh) + 0.5) * size / gh, (np.arange(gw) + 0.5) * size / gw
    return np.stack(np.meshgrid(xs, ys), axis=-1)


def inside(point, box, margin: int = MARGIN) -> bool:
    x0, y0, x1, y1 = box
    return x0 - margin <= point[0] < x1 + margin and y0 - margin <= point[1] < y1 + margin


def explanations(model, image, question: str, max_new_tokens: int, methods=("attention",), clock=None) -> dict:
    """{(method, aggregation): Explanation} of the greedy answer to ``question``, generated once; the aggregations of
    a method share its pass. ``clock``: {method: [seconds, answers]} to add each method's map time to."""
    inputs, ids = model.answer_ids(model.question(image, question, num_beams=1, max_new_tokens=max_new_tokens))
    found = {}
    for method in methods:
        start = time.perf_counter()
        selections = [map_selection(model.model, method, aggregate=agg) for agg in AGGREGATIONS]
        maps = explain_selections(model, inputs, ids, "", selections)
        found.update(zip([(method, agg) for agg in AGGREGATIONS], maps, strict=True))
        if clock is not None:
            clock[method][0] += time.perf_counter() - start
            clock[method][1] += 1
    return found


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


def relation_case(model, scene: scenes.Scene, image, pair, methods, clock) -> tuple[dict, float]:
    """({(method, aggregation): hit}, random baseline) for "Which is higher, the A or the B?" about ``pair``."""
    a, b = pair
    question = f"Which is higher, the {a.color} {a.shape} or the {b.color} {b.shape}?"
    maps = explanations(model, image, question, 8, methods, clock)
    first = next(iter(maps.values()))  # one generated answer, explained per method and aggregation
    by_color = {o.color: o for o in scene.objects}
    named = [(i, by_color[t.strip()]) for i, t in enumerate(first.tokens) if t.strip() in by_color]
    if not named:  # no object named: a miss for every aggregation; the baseline is that of the right answer
        upper = min(pair, key=lambda o: scenes.CELLS.index(o.cell))  # rows differ: the lower index is higher up
        return dict.fromkeys(maps, False), random_patch_share(first.token_maps.shape[1:], upper.box)
    i, obj = named[0]
    hits = {key: peak_inside(e.token_maps[i], obj.box) for key, e in maps.items()}
    return hits, random_patch_share(first.token_maps[i].shape, obj.box)


def image_box(box, image) -> tuple[float, float, float, float]:
    """A box in the 224-px canvas → the same box in ``image``'s own pixels."""
    sx, sy = image.size[0] / scenes.SIZE, image.size[1] / scenes.SIZE
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def reverse_hits(e, objects, image) -> list[bool]:
    """Per described object (paired with the answer's color words in order, as for describe): whether its box gives
    its own color word the top ``words_in_region`` score among the answer's color words (at least two of them)."""
    color_tokens = [i for i, t in enumerate(e.tokens) if t.strip() in scenes.COLORS]
    if len(color_tokens) < 2:
        return []
    hits = []
    for obj, i in zip(objects, color_tokens, strict=False):
        scores = e.words_in_region(image_box(obj.box, image))[color_tokens]
        hits.append(color_tokens[int(scores.argmax())] == i)
    return hits


def run(model, n: int, seed: int, methods=METHODS) -> tuple[dict, dict]:
    """({row name: hit rate}, {method: seconds of maps per answer}) over ``n`` fresh scenes. Row names: "{question
    type} / {aggregation}" for raw attention (the first table), "{question type} / {method} {aggregation}" for the
    others, "{question type} / random patch" (or "random word")."""
    rng = random.Random(seed)
    relation_rng = random.Random(seed + 1)  # its own stream: the other cases keep their scenes and numbers
    keys = [(method, agg) for method in methods for agg in AGGREGATIONS]
    hits = {(family, *key): 0 for family in QUESTION_TYPES for key in keys}
    baseline = dict.fromkeys(QUESTION_TYPES, 0.0)
    words = relations = reversed_words = 0
    clock = {method: [0.0, 0] for method in methods}
    for _ in range(n):
        scene = scenes.sample_scene(rng)
        image = scenes.render(scene, rng)
        target = rng.choice(scene.objects)
        for family, question in (
            ("where", f"Where is the {target.color} {target.shape}?"),
            ("color", f"What color is the {target.shape}?"),
        ):
            for key, e in explanations(model, image, question, 8, methods, clock).items():
                heat = e.image_map if family == "where" else e.token_maps[0]
                hits[(family, *key)] += peak_inside(heat, target.box)
            baseline[family] += random_patch_share(heat.shape, target.box)
        if len(scene.objects) > 1:
            for key, e in explanations(model, image, "Describe the image.", 40, methods, clock).items():
                color_tokens = [i for i, t in enumerate(e.tokens) if t.strip() in scenes.COLORS]
                for obj, i in zip(scene.objects, color_tokens, strict=False):
                    hits[("describe", *key)] += peak_inside(e.token_maps[i], obj.box)
                    if key == keys[0]:
                        words += 1
                        baseline["describe"] += random_patch_share(e.token_maps[i].shape, obj.box)
                reverse = reverse_hits(e, scene.objects, image)
                hits[("reverse describe", *key)] += sum(reverse)
                if key == keys[0]:
                    reversed_words += len(reverse)
                    baseline["reverse describe"] += len(reverse) / max(len(color_tokens), 1)  # a random color word
        if pair := higher_pair(scene, relation_rng):
            relation_hits, share = relation_case(model, scene, image, pair, methods, clock)
            for key, hit in relation_hits.items():
                hits[("relation", *key)] += hit
            baseline["relation"] += share
            relations += 1
    totals = {"where": n, "color": n, "describe": words, "relation": relations, "reverse describe": reversed_words}
    table = {}
    for family in QUESTION_TYPES:
        total = max(totals[family], 1)
        for method, agg in keys:
            name = f"{family} / {agg}" if method == "attention" else f"{family} / {method} {agg}"
            table[name] = hits[(family, method, agg)] / total
        table[f"{family} / {'random word' if family == 'reverse describe' else 'random patch'}"] = (
            baseline[family] / total
        )
    table.update({f"{family} / count": float(totals[family]) for family in QUESTION_TYPES})
    return table, {method: seconds / max(count, 1) for method, (seconds, count) in clock.items()}


def print_tables(table: dict, times: dict, scenes_count: int, methods) -> None:
    """The first table as it always was (raw attention, with reverse describe after the others), then the
    methods × aggregations × question types table and the map time per answer."""
    print(f"| pointing game ({scenes_count} fresh scenes, box + {MARGIN} px) | hit rate |\n|---|---|")
    for name, value in table.items():
        family, column = name.split(" / ")
        if column in (*AGGREGATIONS, "random patch", "random word"):
            print(f"| {name} | {100 * value:.1f}% |")
    columns = [(method, agg) for method in methods for agg in AGGREGATIONS]
    print(f"\n| question (cases) | {' | '.join(f'{m} {a}' for m, a in columns)} | random |")
    print(f"|---|{'---|' * (len(columns) + 1)}")
    for family in QUESTION_TYPES:
        cells = [table[f"{family} / {a}" if m == "attention" else f"{family} / {m} {a}"] for m, a in columns]
        random_name = f"{family} / {'random word' if family == 'reverse describe' else 'random patch'}"
        row = " | ".join(f"{100 * v:.1f}%" for v in [*cells, table[random_name]])
        print(f"| {family} ({table[f'{family} / count']:.0f}) | {row} |")
    print("\nmaps of one answer, all aggregations of a method from its pass (after generation):")
    for method, seconds in times.items():
        print(f"- {method}: {1000 * seconds:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="assets/shapes-instructblip")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=777_000)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    args = parser.parse_args()
    methods = tuple(args.methods.split(","))
    if "attention" not in methods or not set(methods) <= set(METHODS):
        parser.error(f"--methods must include attention and name only {', '.join(METHODS)}")
    model = blipdemo.load(args.model)
    start = time.time()
    table, times = run(model, args.scenes, args.seed, methods)
    print_tables(table, times, args.scenes, methods)
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
