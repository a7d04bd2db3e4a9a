"""Exact-match accuracy per question family on fresh shapes scenes (a seed never used in training).

    python -m blipdemo.tiny.evaluate assets/shapes-instructblip --per-family 300

Scenes are sampled over the spec's whole range and delivered as a user would (other sizes, PNG or JPEG);
answers come from ``vlm.ask`` with greedy decoding and are compared by the spec's rule. Besides the table it
prints, the result goes to a JSON file (default: ``evaluation.json`` in the model's folder), so that the README's
accuracy table can be checked against the repository: per family accuracy, correct and count, with the seed,
the date, the command, and what the model ran on.
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


def evaluate(model, per_family: int = 300, seed: int = EVAL_SEED, progress: bool = True) -> dict[str, dict]:
    """{family: {"accuracy", "correct", "count"}} over ``per_family`` fresh scenes per family."""
    rng = random.Random(seed)
    result = {}
    for family in scenes.FAMILIES:
        correct = 0
        for _ in tqdm(range(per_family), desc=family, disable=not progress, leave=False):
            scene = scenes.sample_scene(rng)
            image = scenes.degrade(scenes.render(scene, rng), rng)
            question, answer = scenes.ask(scene, family, rng)
            got = model.ask(image, question, **DECODING)
            correct += scenes.normalize_answer(got) == scenes.normalize_answer(answer)
        result[family] = {"accuracy": correct / per_family, "correct": correct, "count": per_family}
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
    args = parser.parse_args(argv)
    if args.per_family < 1:
        parser.error("--per-family must be at least 1")
    output = args.output or args.model / "evaluation.json"
    model = load(args.model)
    start = time.time()
    result = evaluate(model, args.per_family, args.seed)
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
