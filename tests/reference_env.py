"""The small Python environment in which diffusers' BLIP-Diffusion Q-Former still runs (the parity reference).

diffusers' ``Blip2QFormerModel`` no longer runs on transformers 5 (it calls ``invert_attention_mask`` and
``get_head_mask``, and reads tuple outputs from attention modules that now return tensors), so the reference
runs in its own venv: transformers 4.46.3 + diffusers 0.31.0 (+ huggingface_hub < 0.26), sharing this
machine's torch, numpy and pillow through ``--system-site-packages``. Made once; ``.ci/run`` makes it before
the tests (``python tests/reference_env.py``), and the test makes it if it is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = Path(os.environ.get("BLIPDEMO_REFERENCE_ENV", ROOT / ".cache" / "blipdiffusion-reference"))
PINS = ["transformers==4.46.3", "diffusers==0.31.0", "huggingface_hub<0.26"]
CHECK = (
    "import diffusers, transformers; assert (transformers.__version__, diffusers.__version__) == ('4.46.3', '0.31.0')"
)


def python() -> Path:
    return ENV / "bin" / "python"


def ready() -> bool:
    if not python().is_file():
        return False
    return subprocess.run([python(), "-c", CHECK], capture_output=True).returncode == 0


def ensure() -> Path:
    """The reference interpreter, made first if needed (needs PyPI once)."""
    if ready():
        return python()
    venv.EnvBuilder(system_site_packages=True, with_pip=True, clear=True).create(ENV)
    install = [python(), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS]
    done = subprocess.run(install, capture_output=True, text=True)
    if done.returncode != 0 or not ready():
        raise RuntimeError(f"Could not make the reference environment in {ENV}:\n{done.stdout}\n{done.stderr}")
    return python()


if __name__ == "__main__":
    print(ensure())
    sys.exit(0)
