"""A new picture mid-chat: what should the model see of the turns about the earlier picture?

    python benchmarks/picture_change.py [--model assets/shapes-instructblip] [--scenes 100]

For fresh shapes scenes (docs/scenes.md; a seed training never used): a first turn about picture A (a single-turn
question of any family, the model's own answer), then a question about a new picture B. The question about B is asked
three ways, and each answer checked against B's truth:
- **new context**: no history (what the app does: a new picture starts a new model context);
- **labelled text**: the turn about A kept as history, its question prefixed "(About an earlier picture)";
- **as if about B**: the turn about A as plain history (what a chat that ignores the change would send).
The accuracy of each, per question family of B, and overall.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blipdemo  # noqa: E402
from blipdemo.tiny import EMBEDDED_MODEL, scenes  # noqa: E402
from blipdemo.tiny.evaluate import DECODING, EVAL_SEED, fresh_scene  # noqa: E402

LABEL = "(About an earlier picture) "
POLICIES = ("new context", "labelled text", "as if about B")


def history_for(policy: str, turn: tuple[str, str]) -> tuple:
    question, answer = turn
    if policy == "new context":
        return ()
    if policy == "labelled text":
        return ((LABEL + question, answer),)
    return ((question, answer),)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(EMBEDDED_MODEL))
    p.add_argument("--scenes", type=int, default=100, help="pictures B per question family")
    args = p.parse_args(argv)
    vlm = blipdemo.load(args.model, dtype="float32")
    rng = random.Random(EVAL_SEED + 28)
    families = [f for f in scenes.SINGLE_TURN]
    correct = {policy: {f: 0 for f in families} for policy in POLICIES}
    for family in families:
        for _ in range(args.scenes):
            a = scenes.sample_scene(rng)
            image_a = scenes.degrade(scenes.render(a, rng), rng)
            first_family = rng.choice([f for f in scenes.SINGLE_TURN if scenes.can_ask(a, f)])
            question_a, _ = scenes.ask(a, first_family, rng)
            turn = (question_a, vlm.ask(image_a, question_a, **DECODING))
            b = fresh_scene(family, rng)
            image_b = scenes.degrade(scenes.render(b, rng), rng)
            question_b, truth = scenes.ask(b, family, rng)
            for policy in POLICIES:
                got = vlm.ask(image_b, question_b, history=history_for(policy, turn), **DECODING)
                correct[policy][family] += scenes.normalize_answer(got) == scenes.normalize_answer(truth)
    n = args.scenes
    print(f"| question about the new picture ({n} per family) | " + " | ".join(POLICIES) + " |")
    print("|---|" + "---|" * len(POLICIES))
    for family in families:
        print(f"| {family} | " + " | ".join(f"{100 * correct[p][family] / n:.1f}%" for p in POLICIES) + " |")
    total = n * len(families)
    print("| **all** | " + " | ".join(f"**{100 * sum(correct[p].values()) / total:.1f}%**" for p in POLICIES) + " |")


if __name__ == "__main__":
    main()
