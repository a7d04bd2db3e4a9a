"""Every kind of image a user (or an attacker) hands us: a clear message or a correct picture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


# Runs in a fresh interpreter, with the peak reset just before the call (Linux: writing 5 to /proc/self/clear_refs
# resets VmHWM): ru_maxrss is a process-wide peak that earlier tests (models, images) and even the imports
# (torch, through blipdemo) have raised past anything one call adds, so it could not show a decode.
DECODE = """
import json, re, sys, time
from blipdemo.images import ImageError, load_image

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
start = time.perf_counter()
try:
    size, outcome = load_image(sys.argv[1]).size, "decoded"
except ImageError:
    size, outcome = None, "refused"
took = time.perf_counter() - start
grown = status("VmHWM") - before
print(json.dumps({"outcome": outcome, "size": size, "seconds": took, "grown_mib": grown / 1024}))
"""


def _decode_alone(path) -> dict:
    """``load_image(path)`` in a new interpreter: its outcome, time and how far it raised the peak memory."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-c", DECODE, str(path)], capture_output=True, text=True, env=env, cwd=root, timeout=300
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc")
def test_decompression_bomb_is_refused_fast_and_flat(files, tmp_path):
    # Control: a real image of 5000×4000 pixels (within MAX_PIXELS) decoded the same way must show up as at least
    # its RGB bytes (57 MiB; Pillow holds RGB as 4 bytes a pixel, so more): the measurement sees a decode.
    control = tmp_path / "control.png"
    Image.new("RGB", (5000, 4000), (90, 140, 200)).save(control)  # uniform: a small file, a full-size decode
    decoded = _decode_alone(control)
    assert decoded["outcome"] == "decoded" and decoded["size"] == [5000, 4000]
    assert decoded["grown_mib"] > 5000 * 4000 * 3 / 2**20, decoded
    # The bomb is 20000×20000: decoded it would take 400 MB as grayscale and 1.2 GB as RGB. Refused from its header,
    # its peak must stay within noise, far below even the control's 57 MiB.
    bomb = _decode_alone(files["bomb.png"])
    assert bomb["outcome"] == "refused", bomb
    assert bomb["grown_mib"] < 16, f"the refused bomb raised peak memory by {bomb['grown_mib']:.0f} MiB"
    assert bomb["seconds"] < 5, bomb  # generous; decoding it would take far longer


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
