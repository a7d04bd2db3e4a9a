"""`python app.py` as a ZeroGPU Space runs it, on a CPU machine: Hugging Face's `spaces` package in its ZeroGPU mode.

    python tests/zerogpu_app.py [--slow-lm SECONDS] [app.py's flags]

What ZeroGPU does in the app's process and in its workers is the package's own code: the worker pool, pickling, the
leases and their durations, the quota refusal. Replaced, in this process only (and so in the workers it forks), is
what needs Hugging Face's servers or CUDA:
- the device-allocation API: ``SPACES_ZERO_DEVICE_API_URL`` as the caller set it (tests/test_zerogpu.py serves
  tests/zerogpu_api.py and reads its record), else the same stand-in, served here;
- a new worker's CUDA start, ``spaces.zero.torch.init`` (its first CUDA tensor) and ``move`` (the weights to the GPU,
  a CUDA synchronize): no-ops. The model is loaded on the CPU (``--device cpu`` unless told; under the package's CUDA
  emulation the app would pick "cuda"), so no weight went to that emulation and there is nothing to move;
- on a CPU build of torch, three things the package reads of a CUDA build at import (below).

``--slow-lm`` makes every LM forward sleep that long first (in the server process, so the forked workers inherit
it; from the start, so the start-up calibration measures it and the leases cover it): a long generation on the tiny
embedded model, to stop in the middle.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

if not os.environ.get("SPACES_ZERO_DEVICE_API_URL"):  # run by hand (benchmarks/stop_latency.py): a stand-in here
    from zerogpu_api import DeviceAPI

    os.environ["SPACES_ZERO_DEVICE_API_URL"] = DeviceAPI().start().url
os.environ["SPACES_ZERO_GPU"] = "true"

import torch  # noqa: E402


def _no_cuda() -> None:
    raise AssertionError("Torch not compiled with CUDA enabled")


def _not_in_bad_fork() -> bool:
    return False


# What the package reads of a CUDA build of torch at import, which a CPU build lacks or has in another form: its CUDA
# version (for that import only: the shape of the emulated CUDA memory stats), the low-level CUDA init (swapped for
# the package's own, put back in a worker: here it fails as a CPU build fails on CUDA) and the bad-fork check it runs
# in a forked process (a CPU build's is a lambda, which cannot be pickled there).
cpu_build = torch.version.cuda is None
if cpu_build:
    torch.version.cuda = "12.8"
    torch._C._cuda_init = getattr(torch._C, "_cuda_init", _no_cuda)
    torch.cuda._is_in_bad_fork = _not_in_bad_fork
import spaces  # noqa: E402 - ZeroGPU mode: must come before anything initializes CUDA
import spaces.zero.torch  # noqa: E402

if cpu_build:
    torch.version.cuda = None


def _init(nvidia_uuid: str) -> None:
    """The package's ``init`` without its first CUDA tensor: the device the scheduler named, and nothing else."""
    os.environ["CUDA_VISIBLE_DEVICES"] = nvidia_uuid


spaces.zero.torch.init = _init
spaces.zero.torch.move = lambda callback=None: None

import app  # noqa: E402
from blipdemo import gpu  # noqa: E402

assert gpu.on_zero_gpu(), "the spaces package is not in its ZeroGPU mode"


def slowed(load_model, seconds: float):
    """``app.load_model`` whose model's every LM forward first sleeps ``seconds``."""

    def load(args):
        vlm, banner = load_model(args)
        forward = vlm.language_model.forward

        def slow_forward(*a, **k):
            time.sleep(seconds)
            return forward(*a, **k)

        vlm.language_model.forward = slow_forward
        return vlm, banner

    return load


def _terminate(signum, frame) -> None:
    """SIGTERM: end the package's workers too; they would outlive this process, waiting for their next call."""
    for worker in multiprocessing.active_children():
        worker.terminate()
    sys.exit(128 + signum)


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--slow-lm", type=float, default=0.0)
    ours, rest = own.parse_known_args(argv)
    args = app.parse_args(rest)
    args.device = args.device or "cpu"  # under the package's CUDA emulation the app would pick "cuda"
    if ours.slow_lm:  # before the start-up calibration, so that the leases cover the slow steps
        app.load_model = slowed(app.load_model, ours.slow_lm)
    demo, _ = app.build_demo(args)
    demo.launch(**app.launch_options(args))


if __name__ == "__main__":
    main(sys.argv[1:])
