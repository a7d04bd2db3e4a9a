"""Version 3 cases for the look-closer tests: pictures drawn from the spec (``tiny.small_details``) with their
questions, and the first of them whose look makes a crop."""

from __future__ import annotations

import random

from blipdemo.tiny import small_details


def cases(n: int, seed: int = 5, family: str | None = None) -> list[tuple[small_details.SmallDetail, str, str]]:
    """``n`` (picture, question, answer): one family (``family``), or the four in turn."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        detail = small_details.small_detail(rng)
        question, answer = small_details.question(detail, family or small_details.FAMILIES[i % 4], rng)
        out.append((detail, question, answer))
    return out


def cropping(vlm, candidates) -> tuple[small_details.SmallDetail, str, str]:
    """The first case whose question makes ``vlm``'s look crop (most do); an AssertionError when none does."""
    for detail, question, answer in candidates:
        if vlm.prepare(vlm.question(detail.image, question, look_closer=True)).crop is not None:
            return detail, question, answer
    raise AssertionError("no case made the model look closer")
