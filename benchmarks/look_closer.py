"""Look closer, measured: accuracy with and without it, for each variant tried, and what it costs.

    python benchmarks/look_closer.py [--model assets/shapes-instructblip] [--per-family 250] [--v12-per-family 100]

- Version 3 pictures (small details: a Version 1 scene pasted whole into a canvas 3-6x larger, ``tiny/small_details``,
  drawn here from the spec and never used in training), per family (color, shape, count, exists): accuracy without
  look-closer, and with it for every variant tried (how the place is found × how the box is drawn × its least side ×
  what the LM reads: ``look_closer.MAPS`` × ``BOXES`` × ``MIN_BOXES`` × ``VIEWS``); the share of crops that contain
  the whole small scene; the share of questions answered from the picture alone (no crop: the box would have been
  the whole picture);
- Version 1/2 pictures (every family of ``tiny.evaluate``, as it draws them): accuracy without and with the default
  look-closer;
- time per answer (greedy, as ``tiny.evaluate`` decodes) without and with the default, on the Version 3 pictures, in
  the same run, with the machine and its matmul peak.
Every question is asked once per variant on the same picture; answers compared by the spec's rule.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blipdemo  # noqa: E402
from benchmarks.speed import describe_machine, machine  # noqa: E402
from blipdemo.look_closer import LookCloser  # noqa: E402
from blipdemo.question import Picture  # noqa: E402
from blipdemo.tiny import evaluate, scenes, small_details  # noqa: E402

SEED = 20261206  # Version 3 pictures: a seed training never used (training never draws Version 3 at all)
DECODING = evaluate.DECODING
DEFAULT = LookCloser()
VARIANTS = {  # name → LookCloser: the default first
    "default (attention, mass box ≥ 3 inputs, 2 steps, crop)": DEFAULT,
    "attention, mass box ≥ 1 input (before 2026-12-07), 2 steps, crop": LookCloser(min_box=1),
    "attention, mass box ≥ 2 inputs, 2 steps, crop": LookCloser(min_box=2),
    "attention, mass box ≥ 4 inputs, 2 steps, crop": LookCloser(min_box=4),
    "attention, mass box, 1 step, crop": LookCloser(steps=1),
    "attention, mass box, 3 steps, crop": LookCloser(steps=3),
    "attention, paper's adaptive box, 2 steps, crop": LookCloser(box="adaptive"),
    "relative (rel-att), mass box, 2 steps, crop": LookCloser(map="relative"),
    "gradient (grad-att), mass box, 2 steps, crop": LookCloser(map="gradient"),
    "attention, mass box, 2 steps, original + crop": LookCloser(view="both"),
    "the paper's: relative, adaptive box, 1 step, original + crop": LookCloser(
        map="relative", box="adaptive", view="both", steps=1
    ),
}


def contains(box, inner) -> bool:
    """Whether ``box`` (x0, y0, x1, y1) holds all of ``inner``."""
    return box[0] <= inner[0] and box[1] <= inner[1] and box[2] >= inner[2] and box[3] >= inner[3]


def right(answer: str, expected: str) -> bool:
    return scenes.normalize_answer(answer) == scenes.normalize_answer(expected)


def version3(vlm, per_family: int, variants: dict[str, LookCloser]) -> tuple[dict, dict]:
    """{family: {"plain", variant…: accuracy, "contains …", "no crop …"}}, and the seconds per answer."""
    rng = random.Random(SEED)
    table: dict[str, dict[str, float]] = {}
    seconds: dict[str, list[float]] = {"plain": [], "look closer": []}
    for family in small_details.FAMILIES:
        counts: dict[str, float] = {}
        for _ in range(per_family):
            detail = small_details.small_detail(rng)
            question, expected = small_details.question(detail, family, rng)
            picture = Picture.of(detail.image)
            vlm.clear_cache()  # every answer pays for its picture, as a new upload does
            began = time.perf_counter()
            counts["plain"] = counts.get("plain", 0) + right(vlm.ask(picture, question, **DECODING), expected)
            seconds["plain"].append(time.perf_counter() - began)
            for name, options in variants.items():
                vlm.clear_cache()
                began = time.perf_counter()
                inputs = vlm.prepare(vlm.question(picture, question, look_closer=options, **DECODING))
                ids = vlm.generate_prepared(inputs)
                if options == DEFAULT:
                    seconds["look closer"].append(time.perf_counter() - began)
                counts[name] = counts.get(name, 0) + right(vlm.decode(ids), expected)
                crop = inputs.crop
                counts[f"contains · {name}"] = counts.get(f"contains · {name}", 0) + (
                    crop is not None and contains(crop.box, detail.box)
                )
                counts[f"no crop · {name}"] = counts.get(f"no crop · {name}", 0) + (crop is None)
        table[family] = {k: v / per_family for k, v in counts.items()}
    return table, seconds


def version12(vlm, per_family: int) -> dict:
    """{row: {"plain": accuracy, "look closer": accuracy}} over ``tiny.evaluate``'s rows and draws."""
    rng = random.Random(evaluate.EVAL_SEED)
    out = {}
    for row in evaluate.ROWS:
        plain = closer = 0
        for _ in range(per_family):
            scene = evaluate.fresh_scene(row, rng)
            image = scenes.degrade(scenes.render(scene, rng), rng)
            d = evaluate.question_for(scene, row, rng)
            plain += right(vlm.ask(image, d.question, history=d.history, **DECODING), d.answer)
            closer += right(vlm.ask(image, d.question, history=d.history, look_closer=True, **DECODING), d.answer)
        out[row] = {"plain": plain / per_family, "look closer": closer / per_family}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="assets/shapes-instructblip")
    parser.add_argument("--per-family", type=int, default=250, help="Version 3 pictures per family")
    parser.add_argument("--v12-per-family", type=int, default=100, help="Version 1/2 questions per row")
    parser.add_argument("--only-default", action="store_true", help="the default variant only (a short run)")
    args = parser.parse_args(argv)
    vlm = blipdemo.load(args.model)
    info = machine("cpu", vlm.dtype, (1024, 2048))
    print(describe_machine(info))
    print(f"model: {args.model} ({str(vlm.dtype).removeprefix('torch.')}), greedy, max_new_tokens 32\n")
    variants = {k: v for k, v in VARIANTS.items() if v == DEFAULT or not args.only_default}
    torch.manual_seed(0)
    table, seconds = version3(vlm, args.per_family, variants)
    n = args.per_family
    print(f"| Version 3 ({n} pictures per family) | " + " | ".join(small_details.FAMILIES) + " |")
    print("|---|" + "---|" * len(small_details.FAMILIES))
    names = ["plain", *variants]
    for name in names:
        label = "without look-closer" if name == "plain" else name
        print(f"| {label} | " + " | ".join(f"{100 * table[f][name]:.1f}%" for f in small_details.FAMILIES) + " |")
    for name in variants:
        print(
            f"| crops holding the whole scene · {name} | "
            + " | ".join(f"{100 * table[f][f'contains · {name}']:.1f}%" for f in small_details.FAMILIES)
            + " |"
        )
    for name in variants:
        print(
            f"| answered from the picture alone · {name} | "
            + " | ".join(f"{100 * table[f][f'no crop · {name}']:.1f}%" for f in small_details.FAMILIES)
            + " |"
        )
    plain_s, look_s = statistics.median(seconds["plain"]), statistics.median(seconds["look closer"])
    print(
        f"\ntime per answer (median of {len(seconds['plain'])}, Version 3 pictures, image tokens not cached): "
        f"without {1000 * plain_s:.0f} ms, with look-closer (default) {1000 * look_s:.0f} ms: "
        f"{look_s / plain_s:.2f}x"
    )
    rows = version12(vlm, args.v12_per_family)
    print(f"\n| Version 1/2 ({args.v12_per_family} questions per row) | without | with look-closer (default) |")
    print("|---|---|---|")
    for row, r in rows.items():
        print(f"| {row} | {100 * r['plain']:.1f}% | {100 * r['look closer']:.1f}% |")


if __name__ == "__main__":
    main()
