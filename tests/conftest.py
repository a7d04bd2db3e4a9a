"""Shared fixtures: small random checkpoints saved by transformers itself, and test images.

The whole session is offline: no test may download a model (on a machine with internet, the app's default
checkpoint alone is several GB). Tests that load a hub id serve it from a stand-in or expect it to be unreachable.
"""

from __future__ import annotations

import os
import sys

# Set before anything imports huggingface_hub (checkpoints → transformers does, below): it reads these once, at
# import. Subprocesses inherit them; those the tests build also set OFFLINE explicitly, so each says so itself.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(OFFLINE)
if "huggingface_hub.constants" in sys.modules:  # imported earlier (a plugin?): its download code reads this flag
    sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402
from PIL import Image  # noqa: E402

COMBOS = [("instructblip", "llama"), ("instructblip", "t5"), ("blip2", "opt"), ("blip2", "t5")]


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """Factory: (family, lm, **options) → folder of a saved random checkpoint (built once per session)."""
    built: dict = {}

    def get(family: str, lm: str, **options):
        key = (family, lm, tuple(sorted(options.items())))
        if key not in built:
            built[key] = make_checkpoint(tmp_path_factory.mktemp(f"{family}-{lm}"), family, lm, **options)
        return built[key]

    return get


@pytest.fixture(scope="module")
def loaded(checkpoint_dir):
    """Factory: (family, lm, dtype="float32") → blipdemo's model of that test checkpoint, on the CPU."""
    cache: dict = {}

    def get(family: str, lm: str, dtype: str = "float32"):
        key = (family, lm, dtype)
        if key not in cache:
            import blipdemo

            cache[key] = blipdemo.load(checkpoint_dir(family, lm), dtype=dtype, device="cpu")
        return cache[key]

    return get


@pytest.fixture(scope="session")
def images():
    """A few differently sized random and structured RGB images."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    stripes = Image.fromarray(np.kron(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), np.ones((16, 8, 1), np.uint8)))
    flat = Image.new("RGB", (64, 64), (200, 30, 30))
    return [noise, stripes, flat]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
