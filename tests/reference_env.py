"""The small Python environment in which diffusers' BLIP-Diffusion Q-Former still runs (the parity reference).

diffusers' ``Blip2QFormerModel`` no longer runs on transformers 5 (it calls ``invert_attention_mask`` and
``get_head_mask``, and reads tuple outputs from attention modules that now return tensors), so the reference
runs in its own venv: transformers 4.46.3 + diffusers 0.31.0 (+ huggingface_hub < 0.26). torch, numpy, pillow
and the rest come from *the interpreter that runs the tests*, shared through a ``.pth`` file in the reference
venv's site-packages. (``--system-site-packages`` would share the *base* interpreter's packages instead: inside a
virtual environment torch lives in that environment, and the reference could not import it.) Paths listed in a
``.pth`` file come after the venv's own site-packages, so its pinned transformers and diffusers win.

Made once; ``.ci/run`` makes it before the tests (``python tests/reference_env.py``), and the test makes it if it
is missing. When the tests run under another interpreter than last time, only the ``.pth`` file is rewritten; the
venv is rebuilt only where the reference then fails its check (another Python version, a dependency missing).
"""

from __future__ import annotations

import importlib.util
import json
import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = Path(os.environ.get("BLIPDEMO_REFERENCE_ENV", ROOT / ".cache" / "blipdiffusion-reference"))
PINS = ["transformers==4.46.3", "diffusers==0.31.0", "huggingface_hub<0.26"]
SHARED = "blipdemo-shared-packages.pth"
CHECK = (
    "import json, sys, diffusers, torch, transformers; "
    "print(json.dumps([list(sys.version_info[:2]), torch.__file__, transformers.__version__, diffusers.__version__]))"
)


def python() -> Path:
    return ENV / "bin" / "python"


def shared_paths() -> list[str]:
    """The site-packages folders of the running interpreter, in its own search order (a venv's own; the system
    Python's, Debian's dist-packages included; the user site where it is enabled)."""
    candidates = {*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    if site.ENABLE_USER_SITE:
        candidates.add(site.getusersitepackages())
    return list(dict.fromkeys(p for p in sys.path if p in candidates))


def _pth_file() -> Path | None:
    found = sorted(ENV.glob(f"lib/python*/site-packages/{SHARED}"))
    if found:
        return found[0]
    folders = sorted(ENV.glob("lib/python*/site-packages"))
    return folders[0] / SHARED if folders else None


def _pth_text() -> str:
    return f"# Written by {Path(__file__).name}: the packages of the Python at {sys.prefix}\n" + "".join(
        f"{p}\n" for p in shared_paths()
    )


def _pth_current() -> bool:
    pth = _pth_file()
    return pth is not None and pth.is_file() and pth.read_text() == _pth_text()


def _write_pth() -> None:
    pth = _pth_file()
    if pth is None:
        raise RuntimeError(f"{ENV} has no site-packages folder")
    pth.write_text(_pth_text())


def ready() -> bool:
    """Whether the reference runs the pinned versions on this interpreter's Python and torch."""
    if not python().is_file() or not _pth_current():
        return False
    done = subprocess.run([python(), "-c", CHECK], capture_output=True, text=True)
    if done.returncode != 0:
        return False
    version, torch_file, transformers, diffusers = json.loads(done.stdout.strip().splitlines()[-1])
    torch_spec = importlib.util.find_spec("torch")  # where this interpreter's torch is, without importing it
    return (
        tuple(version) == sys.version_info[:2]
        and torch_spec is not None
        and Path(torch_file).resolve() == Path(torch_spec.origin).resolve()
        and (transformers, diffusers) == ("4.46.3", "0.31.0")
    )


def ensure() -> Path:
    """The reference interpreter, made first if needed (needs PyPI once)."""
    if python().is_file() and not _pth_current():
        _write_pth()  # another interpreter runs the tests now: point at its packages, no reinstall
    if ready():
        return python()
    # Not --system-site-packages: the base interpreter's packages must not stand in for this one's.
    venv.EnvBuilder(system_site_packages=False, with_pip=True, clear=True).create(ENV)
    _write_pth()  # before pip, so that pip counts this interpreter's numpy, pillow, ... as installed
    install = [python(), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS]
    done = subprocess.run(install, capture_output=True, text=True)
    if done.returncode != 0 or not ready():
        raise RuntimeError(f"Could not make the reference environment in {ENV}:\n{done.stdout}\n{done.stderr}")
    return python()


if __name__ == "__main__":
    print(ensure())
    sys.exit(0)
