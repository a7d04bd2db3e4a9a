"""Exact-match accuracy per question family on fresh shapes scenes (a seed never used in training).

    python -m blipdemo.tiny.evaluate assets/shapes-instructblip --per-family 300

Scenes are sampled over the spec's whole range and delivered as a user would (other sizes, PNG or JPEG);
answers come from ``vlm.ask`` with greedy decoding and are compared by the spec's rule.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from tqdm import tqdm

from .. import load
from . import scenes

EVAL_SEED = 20261123  # never used by training (its seeds are small integers)


def evaluate(model, per_family: int = 300, seed: int = EVAL_SEED, progress: bool = True) -> dict[str, float]:
    """{family: accuracy} over ``per_family`` fresh scenes per family."""
    rng = random.Random(seed)
    result = {}
    for family in scenes.FAMILIES:
        correct = 0
        for _ in tqdm(range(per_family), desc=family, disable=not progress, leave=False):
            scene = scenes.sample_scene(rng)
            image = scenes.degrade(scenes.render(scene, rng), rng)
            question, answer = scenes.ask(scene, family, rng)
            got = model.ask(image, question, num_beams=1, do_sample=False, max_new_tokens=32)
            correct += scenes.normalize_answer(got) == scenes.normalize_answer(answer)
        result[family] = correct / per_family
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, nargs="?", default=Path("assets/shapes-instructblip"))
    parser.add_argument("--per-family", type=int, default=300)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    args = parser.parse_args()
    model = load(args.model)
    start = time.time()
    result = evaluate(model, args.per_family, args.seed)
    print(f"| family | accuracy ({args.per_family} scenes each) |\n|---|---|")
    for family, acc in result.items():
        print(f"| {family} | {100 * acc:.1f}% |")
    print(f"\n{len(result) * args.per_family} questions in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
