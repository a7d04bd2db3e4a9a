"""The GPU lease a ZeroGPU call asks for (``spaces.GPU``'s duration): what the call needs, from the model's measured
costs and the question's own arguments — never the generation's whole time limit for a 1-token answer or a remap."""

from __future__ import annotations

import math

import pytest

import blipdemo
from blipdemo import gpu
from blipdemo.tiny import EMBEDDED_MODEL

COSTS = gpu.Costs(start=1.0, per_token=0.1, per_beam_token=0.02, maps_per_token=0.05)


@pytest.fixture(scope="module")
def served():
    vlm = blipdemo.load(EMBEDDED_MODEL, dtype="float32")
    vlm.generation_time_limit = 120
    key = gpu.register(vlm)
    gpu.remember(key, COSTS)
    return vlm, key


def lease(served, **arguments) -> int:
    vlm, key = served
    return gpu.answer_seconds(key, vlm.question(_picture(), "Describe the image.", **arguments))


def _picture():
    import numpy as np

    return np.full((32, 32, 3), 200, np.uint8)


def expected(tokens: int, beams: int = 1, maps: bool = False) -> int:
    """The rule, written out: (start + tokens × (per token + extra beams × per beam-token) [+ tokens × maps]) × margin
    + floor, in whole seconds, at most the time limit (120 s here)."""
    seconds = COSTS.start + tokens * (COSTS.per_token + (beams - 1) * COSTS.per_beam_token)
    seconds += tokens * COSTS.maps_per_token if maps else 0
    return min(math.ceil(gpu.LEASE_MARGIN * seconds) + gpu.LEASE_FLOOR, 120)


@pytest.mark.parametrize(
    "tokens,beams,maps",
    [(1, 1, False), (32, 1, False), (32, 5, False), (32, 1, True), (256, 5, True), (2048, 10, True)],
)
def test_an_answer_asks_for_what_its_arguments_need(served, tokens, beams, maps):
    arguments = dict(max_new_tokens=tokens, num_beams=beams)
    assert lease(served, maps={} if maps else None, **arguments) == expected(tokens, beams, maps)


def test_more_tokens_beams_or_maps_ask_for_more_but_never_past_the_time_limit(served):
    short, long = lease(served, max_new_tokens=8, num_beams=1), lease(served, max_new_tokens=200, num_beams=1)
    assert short < long
    assert long < lease(served, max_new_tokens=200, num_beams=5) < 120
    assert long < lease(served, max_new_tokens=200, num_beams=1, maps={})
    assert lease(served, max_new_tokens=2048, num_beams=10, maps={}) == 120  # capped at the time limit
    assert short < 150 / 10, "a short answer asked for a long lease (the old rule asked 150 s for every call)"


def test_a_remap_asks_for_a_small_fixed_lease(served):
    vlm, key = served
    question = vlm.question(_picture(), "Describe the image.", maps={"method": "relevancy"})
    assert gpu.lease_seconds(key, "remap", (question, [1, 2, 3]), "run") == gpu.REMAP_SECONDS <= 30
    assert gpu.lease_seconds(key, "answer", (question,), "run") == gpu.answer_seconds(key, question)


def test_calibration_measures_the_model_in_use():
    """The costs come from running the model: start, per token, per beam-token and maps, each a finite time."""
    vlm = blipdemo.load(EMBEDDED_MODEL, dtype="float32")
    key = gpu.register(vlm)
    costs = gpu.calibrate(key, tokens=6)
    values = [costs.start, costs.per_token, costs.per_beam_token, costs.maps_per_token]
    assert all(math.isfinite(v) and v >= 0 for v in values) and costs.start > 0 and costs.maps_per_token > 0
    assert gpu.calibrate_leases(key) is None  # not on ZeroGPU: no lease, nothing measured at start-up


@pytest.mark.parametrize(
    "options,starts",
    [({}, 2), ({"steps": 1}, 1), ({"steps": 3}, 3), ({"map": "relative"}, 4), ({"map": "gradient", "steps": 1}, 2)],
)
def test_a_look_closer_answer_asks_for_its_look_too(served, options, starts):
    """The whole look runs inside the answer's GPU call: each step a pass over the prompt and the crop's ViT (a start),
    twice that for the relative map's second pass or the gradient map's backward pass."""
    plain = COSTS.start + 32 * COSTS.per_token
    want = min(math.ceil(gpu.LEASE_MARGIN * (plain + starts * COSTS.start)) + gpu.LEASE_FLOOR, 120)
    assert lease(served, max_new_tokens=32, num_beams=1, look_closer=options or True) == want
    assert want > expected(32)
