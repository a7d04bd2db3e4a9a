"""BLIP-Diffusion multimodal embeddings at full size, side by side with diffusers' own Q-Former.

    python benchmarks/embed_speed.py [--runs 5] [--compile]
    python benchmarks/embed_speed.py --tiny --runs 1   # a small Q-Former: checks the script runs

diffusers' ``Blip2QFormerModel`` runs only on transformers 4.46, so its half runs in the reference venv
(``tests/reference_env.py``, made if missing): it builds a random Q-Former at BLIP-Diffusion's sizes (CLIP
ViT-L/14 cut to 23 layers at 224 px, 12-layer Q-Former, 16 queries), saves it in the pipeline's layout, and
times decoding the image file + its preprocess + Q-Former call. Then ``blipdemo.load_qformer`` loads the same
files and times ``embed(path, subject)``, which decodes the same file and preprocesses it too: both sides time
the same work, end to end from the file. Prints the medians, the ratios (ours / reference) and the largest
difference from the reference embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import reference_env  # noqa: E402

import blipdemo  # noqa: E402

SUBJECTS = ["dog", "red car", "a small cat"]
TOLERANCE = 1e-4  # float32 parity, as tests/test_embedding.py asserts it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed calls per image and dtype (after a warm-up)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint here (default: a temp dir)")
    parser.add_argument("--compile", action="store_true", help="also time ours with the vision encoder compiled")
    parser.add_argument("--tiny", action="store_true", help="the reference's small test sizes (smoke test)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="blipdemo-embed-"))
    work.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(0)
    requests = []
    for i, subject in enumerate(SUBJECTS):
        path = work / f"image-{i}.png"
        Image.fromarray(rng.integers(0, 256, (300 + 40 * i, 400, 3), dtype=np.uint8)).save(path)
        requests.append({"image": str(path), "text": subject})
    (work / "requests.json").write_text(json.dumps(requests))

    python = reference_env.ensure()
    command = [str(python), str(ROOT / "tests" / "blipdiffusion_reference.py"), str(work / "out")]
    command += ["--requests", str(work / "requests.json"), "--time", str(args.runs)]
    command += [] if args.tiny else ["--full-size"]
    print("reference: diffusers 0.31 + transformers 4.46, building and timing …", flush=True)
    # The reference builds everything it needs locally (an offline BERT vocabulary): it must never fetch anything.
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    reference = json.loads((work / "out" / "timings.json").read_text())
    expected = load_file(work / "out" / "reference.safetensors")

    ours: dict[str, float] = {}
    worst = 0.0
    runs = [("float32", False), ("bfloat16", False)] + ([("bfloat16", True)] if args.compile else [])
    for dtype, compiled in runs:
        model = blipdemo.load_qformer(work / "out" / "pipeline", dtype=dtype, device="cpu", compile=compiled)
        seconds = []
        for i, request in enumerate(requests):
            for run in range(args.runs + 1):
                start = time.perf_counter()
                embedding = model.embed(request["image"], request["text"])  # a path: decoded in here, as there
                if run:
                    seconds.append(time.perf_counter() - start)
            if dtype == "float32":
                worst = max(worst, (embedding - expected[f"embeds.{i}"]).abs().max().item())
        ours[dtype + (" (ours compiled)" if compiled else "")] = statistics.median(seconds)
        del model

    print(f"\nembedding {tuple(embedding.shape)}, {torch.get_num_threads()} threads, {args.runs} runs × 3 images")
    print("each timed call: decode the PNG file, preprocess, Q-Former (+ projection); the same work on both sides")
    print("| dtype | diffusers (s) | blipdemo (s) | ours / reference |")
    print("|---|---|---|---|")
    for name, seconds in ours.items():
        ref = reference[name.split()[0]]
        print(f"| {name} | {ref:.3f} | {seconds:.3f} | {seconds / ref:.2f}× |")
    print(f"\nlargest difference from diffusers' embedding (float32): {worst:.2e} (checked: at most {TOLERANCE:.0e})")
    if not worst <= TOLERANCE:  # timings of different outputs would not compare the same work
        sys.exit(f"FAILED: our float32 embedding differs from diffusers' by {worst:.2e} > {TOLERANCE:.0e}")


if __name__ == "__main__":
    main()
