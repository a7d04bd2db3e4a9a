"""BLIP-Diffusion multimodal embeddings at full size, side by side with diffusers' own Q-Former.

    python benchmarks/embed_speed.py [--runs 5] [--compile]
    python benchmarks/embed_speed.py --attention-only  # the machine and the attention op alone (seconds)
    python benchmarks/embed_speed.py --tiny --runs 1   # a small Q-Former: checks the script runs

diffusers' ``Blip2QFormerModel`` runs only on transformers 4.46, so its half runs in the reference venv
(``tests/reference_env.py``, made if missing): it builds a random Q-Former at BLIP-Diffusion's sizes (CLIP
ViT-L/14 cut to 23 layers at 224 px, 12-layer Q-Former, 16 queries), saves it in the pipeline's layout, and
times decoding the image file + its preprocess + Q-Former call. Then ``blipdemo.load_qformer`` loads the same
files and times ``embed(path, subject)``, which decodes the same file and preprocesses it too: both sides time
the same work, end to end from the file. Prints the medians, the ratios (ours / reference) and the largest
difference from the reference embedding.

It prints the machine first (speed.py's ``machine``: processor, bfloat16 support, matmul peaks measured in this run),
then the one op the README explains the bfloat16 gap with: attention at the ViT's shape (257 tokens, 16 heads of 64)
through ``scaled_dot_product_attention`` (what we run) and as diffusers' CLIP runs it (matmul, softmax, matmul).
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
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import reference_env  # noqa: E402
from speed import describe_machine, machine  # noqa: E402

import blipdemo  # noqa: E402

SUBJECTS = ["dog", "red car", "a small cat"]
TOLERANCE = 1e-4  # float32 parity, as tests/test_embedding.py asserts it
VIT_ATTENTION = (1, 16, 257, 64)  # CLIP ViT-L/14 at 224 px: batch, heads, 1 + 16² tokens, head width


def attention_op(dtype: torch.dtype, repeats: int = 200) -> tuple[float, float]:
    """Median seconds of one attention call at VIT_ATTENTION: (SDPA, matmul–softmax–matmul), interleaved call by call
    so that other work on a shared machine weighs on both alike."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(VIT_ATTENTION, generator=gen).to(dtype) for _ in range(3))
    scale = VIT_ATTENTION[-1] ** -0.5
    ops = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "explicit": lambda: torch.matmul((torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(-1), v),
    }
    torch.testing.assert_close(ops["sdpa"](), ops["explicit"](), atol=2e-2, rtol=2e-2)  # the same op, two ways
    times: dict[str, list[float]] = {name: [] for name in ops}
    for run in range(repeats + 10):  # the first 10: warm-up
        for name, op in ops.items():
            start = time.perf_counter()
            op()
            if run >= 10:
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["sdpa"]), statistics.median(times["explicit"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed calls per image and dtype (after a warm-up)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint here (default: a temp dir)")
    parser.add_argument("--compile", action="store_true", help="also time ours with the vision encoder compiled")
    parser.add_argument("--tiny", action="store_true", help="the reference's small test sizes (smoke test)")
    parser.add_argument("--attention-only", action="store_true", help="print the machine and the attention op only")
    args = parser.parse_args()
    print(describe_machine(machine("cpu", torch.bfloat16, (256,) if args.tiny else (1024, 2048, 4096))), flush=True)
    shape = "×".join(map(str, VIT_ATTENTION))
    for dtype in (torch.bfloat16, torch.float32):
        sdpa, explicit = attention_op(dtype, 20 if args.tiny else 200)
        print(
            f"attention op {shape} ({str(dtype).removeprefix('torch.')}, median): scaled_dot_product_attention "
            f"{sdpa * 1e3:.3f} ms, matmul–softmax–matmul {explicit * 1e3:.3f} ms: SDPA takes {sdpa / explicit:.2f}×",
            flush=True,
        )
    if args.attention_only:
        return
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
