"""Exact-match accuracy per question family on fresh shapes scenes (a seed never used in training).

    python -m blipdemo.tiny.evaluate assets/shapes-instructblip --per-family 300

Scenes are sampled over the spec's whole range and delivered as a user would (other sizes, PNG or JPEG);
answers come from ``vlm.ask`` with greedy decoding and are compared by the spec's rule. Besides the table it
prints, the result goes to a JSON file (default: ``evaluation.json`` in the model's folder), so that the README's
accuracy table can be checked against the repository: per family accuracy, correct and count, with the seed,
the date, the command, and what the model ran on.

Rows: the six version-1 families, asked alone exactly as before (same questions for the same seed, so their
numbers compare with the version-1 model's); ``absent`` and ``relation`` alone (relations on scenes with two
objects or more); ``follow-up`` after the turn it follows, given as history; and ``in a chat``: a random
single-turn family asked after one or two earlier turns of the same chat, to show that history does not hurt.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from .. import load
from . import scenes

EVAL_SEED = 20261123  # never used by training (its seeds are small integers)
DECODING = {"num_beams": 1, "do_sample": False, "max_new_tokens": 32}


IN_A_CHAT = "in a chat"  # the row of single-turn questions asked after 1-2 earlier turns
ROWS = (*scenes.FAMILIES, IN_A_CHAT)


def fresh_scene(row: str, rng: random.Random) -> scenes.Scene:
    """A new scene that has a question of ``row`` (relations need two objects; every scene has some chat)."""
    while True:
        scene = scenes.sample_scene(rng)
        if row == IN_A_CHAT or scenes.can_ask(scene, row):
            return scene


def question_for(scene: scenes.Scene, row: str, rng: random.Random) -> scenes.Dialogue:
    """The question of one row, with the earlier turns of its chat (none for the single-turn families)."""
    if row == IN_A_CHAT:
        family = rng.choice([f for f in scenes.SINGLE_TURN if scenes.can_ask(scene, f)])
        return scenes.dialogue(scene, family, rng, earlier=rng.randint(1, 2))
    if row == "follow-up":
        return scenes.dialogue(scene, row, rng)  # history: the color/shape/where turn it follows
    # Alone, through ``ask`` as in version 1: the same seed draws the same questions as before.
    question, answer = scenes.ask(scene, row, rng)
    return scenes.Dialogue((), question, answer)


def evaluate(
    model, per_family: int = 300, seed: int = EVAL_SEED, progress: bool = True, rows: tuple[str, ...] = ROWS
) -> dict[str, dict]:
    """{row: {"accuracy", "correct", "count"}} over ``per_family`` fresh scenes per row (``ROWS``, or some of
    them: the same ``rows`` and ``seed`` draw the same scenes and questions for any model)."""
    rng = random.Random(seed)
    result = {}
    for row in rows:
        correct = 0
        for _ in tqdm(range(per_family), desc=row, disable=not progress, leave=False):
            scene = fresh_scene(row, rng)
            image = scenes.degrade(scenes.render(scene, rng), rng)
            d = question_for(scene, row, rng)
            got = model.ask(image, d.question, history=d.history, **DECODING)
            correct += scenes.normalize_answer(got) == scenes.normalize_answer(d.answer)
        result[row] = {"accuracy": correct / per_family, "correct": correct, "count": per_family}
    return result


def cpu_info() -> tuple[str, set[str]]:
    """(the processor's name, its feature flags) — from /proc/cpuinfo where there is one (flags: empty elsewhere)."""
    name, flags = None, set()
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.is_file() else ():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name is None:
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return name or platform.processor() or platform.machine(), flags


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, nargs="?", default=Path("assets/shapes-instructblip"))
    parser.add_argument("--per-family", type=int, default=300)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: MODEL/evaluation.json)")
    parser.add_argument(
        "--rows",
        default=",".join(ROWS),
        help="comma-separated rows to ask (default: all); e.g. the version-1 families, to compare two models",
    )
    args = parser.parse_args(argv)
    if args.per_family < 1:
        parser.error("--per-family must be at least 1")
    rows = tuple(r.strip() for r in args.rows.split(","))
    if unknown := [r for r in rows if r not in ROWS]:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    output = args.output or args.model / "evaluation.json"
    model = load(args.model)
    start = time.time()
    result = evaluate(model, args.per_family, args.seed, rows=rows)
    seconds = time.time() - start
    print(f"| family | accuracy ({args.per_family} scenes each) |\n|---|---|")
    for family, r in result.items():
        print(f"| {family} | {100 * r['accuracy']:.1f}% |")
    print(f"\n{len(result) * args.per_family} questions in {seconds:.0f} s")
    record = {
        "model": str(args.model),
        "command": shlex.join(["python", "-m", "blipdemo.tiny.evaluate", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now().isoformat(timespec="seconds"),
        "seed": args.seed,
        "per_family": args.per_family,
        "decoding": DECODING,
        "families": result,
        # What the answers were computed with: bfloat16 where the CPU runs it natively, else float32.
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "cpu": cpu_info()[0],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "seconds": round(seconds, 1),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
