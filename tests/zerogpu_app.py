"""`python app.py` with the ZeroGPU test double of `spaces` importable (tests/zerogpu), as on a ZeroGPU Space.

    python tests/zerogpu_app.py [--slow-lm SECONDS] [app.py's flags]

``--slow-lm`` makes every LM forward sleep that long first (in the server process, so the forked workers inherit
it): a long generation on the tiny embedded model, to stop in the middle.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "zerogpu"), str(HERE.parent)]  # the double first, then the project

import spaces  # noqa: E402 - the double, before the app imports it

import app  # noqa: E402

assert Path(spaces.__file__).parent.parent == HERE / "zerogpu", spaces.__file__


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--slow-lm", type=float, default=0.0)
    ours, rest = own.parse_known_args(argv)
    args = app.parse_args(rest)
    demo, vlm = app.build_demo(args)
    if ours.slow_lm:
        forward = vlm.language_model.forward

        def slow_forward(*a, **k):
            time.sleep(ours.slow_lm)
            return forward(*a, **k)

        vlm.language_model.forward = slow_forward
    demo.launch(**app.launch_options(args))


if __name__ == "__main__":
    main(sys.argv[1:])
