"""Every kind of image a user (or an attacker) hands us: a clear message or a correct picture."""

from __future__ import annotations

import resource
import time

import numpy as np
import pytest
from hazards import REFUSED, build
from PIL import Image

import blipdemo
from blipdemo.images import ImageError, load_image


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build(tmp_path_factory.mktemp("hazards"))


@pytest.mark.parametrize("name,message", REFUSED.items())
def test_bad_files_get_clear_messages(files, name, message):
    with pytest.raises(ImageError, match=message):
        load_image(files[name])


def test_decompression_bomb_is_refused_fast_and_flat(files):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ImageError):
        load_image(files["bomb.png"])
    assert time.perf_counter() - start < 5  # generous; decoding it would take far longer
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB"  # decoded it would be 400 MiB


def test_unusual_but_valid_images(files):
    assert load_image(files["one-pixel.png"]).size == (1, 1)
    assert load_image(files["thin.png"]).size == (1, 10000)
    cmyk = np.asarray(load_image(files["cmyk.jpg"]))
    assert cmyk.shape == (30, 40, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60  # red
    transparent = np.asarray(load_image(files["transparent.png"]))
    assert tuple(transparent[0, 0]) == (255, 255, 255), "transparency is composited on white"
    assert tuple(transparent[20, 20]) == (255, 0, 0)
    gif = np.asarray(load_image(files["palette.gif"]))
    assert tuple(gif[0, 0]) == (255, 255, 255) and tuple(gif[16, 16]) == (0, 0, 255)
    webp = Image.open(files["animated.webp"])
    assert webp.n_frames == 100
    first = np.asarray(load_image(files["animated.webp"]))
    assert first[..., 2].mean() > 250 and first[..., 1].mean() < 5, "the first frame is used"
    gray = np.asarray(load_image(files["gray16.png"]))
    assert abs(int(gray[0, 0, 0]) - round(50000 / 65535 * 255)) <= 1, "16-bit is scaled, not clamped"
    upright = load_image(files["exif-rotated.jpg"])
    assert upright.size == (20, 40)
    arr = np.asarray(upright).astype(int)
    assert arr[5, 10, 0] > 200 and arr[35, 10, 2] > 200, "EXIF orientation 6 is applied"


def test_arrays_and_bytes():
    assert load_image(np.zeros((5, 6, 3), np.uint8)).size == (6, 5)
    assert load_image(np.full((5, 6), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageError, match="HxW"):
        load_image(np.zeros((5, 6, 2), np.uint8))
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((5, 6, 3), np.float64))
    with pytest.raises(ImageError, match="No image"):
        load_image(None)
    with pytest.raises(ImageError, match="No image file"):
        load_image("/nonexistent/picture.png")


def test_the_model_sees_every_valid_file_and_refuses_the_rest(checkpoint_dir, files):
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama"), dtype="float32")
    for name, path in files.items():
        if name in REFUSED:
            with pytest.raises(ImageError):
                vlm.ask(path, "What is this?", max_new_tokens=3, num_beams=1)
        else:
            assert isinstance(vlm.ask(path, "What is this?", max_new_tokens=3, num_beams=1), str), name
    e = vlm.explain(files["exif-rotated.jpg"], "What is this?", max_new_tokens=3, num_beams=1)
    assert e.overlay().size == (20, 40), "the heatmap is drawn over the upright image"
