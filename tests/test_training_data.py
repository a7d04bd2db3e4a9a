"""Stage 3's training data (``tiny.train``): framed scenes and their per-patch labels, checked against the pixels."""

from __future__ import annotations

import random

import numpy as np
import pytest

from blipdemo.tiny import scenes
from blipdemo.tiny.train import OUTSIDE, Frame, TinyConfig, framed, framing_stage, patch_targets

GRID = 9


def _patch_of(x: float, y: float, side: int) -> int:
    """The index of the grid patch (row-major, GRID × GRID over a ``side``-px picture) holding pixel (x, y)."""
    return int(y * GRID / side) * GRID + int(x * GRID / side)


@pytest.mark.parametrize("seed", range(12))
def test_framed_scene_and_its_labels_agree_with_the_pixels(seed):
    rng = random.Random(seed)
    scene = scenes.sample_scene(rng)
    image, frame = framed(scene, rng, max_scale=2.0)
    side = image.size[0]
    assert image.size == (side, side) and scenes.SIZE <= side <= 2 * scenes.SIZE
    assert 0 <= frame.x0 <= side - scenes.SIZE and 0 <= frame.y0 <= side - scenes.SIZE and frame.side == side
    pixels = np.asarray(image).astype(int)  # (side, side, 3)
    labels = patch_targets(scene, GRID, frame)
    centre = lambda i: ((i % GRID + 0.5) * side / GRID, (i // GRID + 0.5) * side / GRID)  # noqa: E731
    for i in range(GRID * GRID):
        x, y = centre(i)
        outside = not (frame.x0 <= x < frame.x0 + scenes.SIZE and frame.y0 <= y < frame.y0 + scenes.SIZE)
        assert (labels["cell"][i] == OUTSIDE) == outside
        if outside:  # the canvas around the scene is the scene's own gray, and no object is there
            assert (pixels[int(y), int(x)] == scene.background).all()
            assert labels["shape"][i] == labels["color"][i] == labels["on"][i] == 0
    for obj in scene.objects:  # the patch at each object's centre is labelled with that object, in its cell
        x0, y0, x1, y1 = obj.box
        x, y = frame.x0 + (x0 + x1) / 2, frame.y0 + (y0 + y1) / 2
        i = _patch_of(x, y, side)
        px, py = centre(i)
        if not (frame.x0 + x0 <= px < frame.x0 + x1 and frame.y0 + y0 <= py < frame.y0 + y1):
            continue  # that patch's own centre lies off the object's box (a small object on a patch border)
        assert scenes.CELLS[int(labels["cell"][i])] == obj.cell
        assert scenes.SHAPES[int(labels["shape"][i]) - 1] == obj.shape
        assert list(scenes.COLORS)[int(labels["color"][i]) - 1] == obj.color
        assert labels["on"][i] == 1
        nominal = np.array(scenes.COLORS[obj.color])
        assert np.abs(pixels[int(y), int(x)] - nominal).max() <= scenes.COLOR_JITTER + 1


def test_unframed_labels_are_stage_one_labels():
    rng = random.Random(5)
    scene = scenes.sample_scene(rng)
    labels = patch_targets(scene, GRID)
    same = patch_targets(scene, GRID, Frame())
    assert all((labels[k] == same[k]).all() for k in labels)
    assert (labels["cell"] < OUTSIDE).all()
    # Every cell is 3 × 3 patches of a 9 × 9 grid.
    assert [int(c) for c in labels["cell"][:GRID]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("scale", [1.0, 3.0, 6.0])
def test_framing_never_reaches_version_3(scale):
    """Version 3 (a scene in a canvas 3-6× its side) judges look-closer and is never trained on."""
    with pytest.raises(ValueError, match="Version 3"):
        framing_stage(None, TinyConfig(framing_max=scale), ([], None), ([], None))
