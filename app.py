"""blipdemo: chat about an image with InstructBLIP / BLIP-2 in the browser.

Every flag has an environment variable (for Hugging Face Spaces): --model / BLIPDEMO_MODEL, and so on.
With no model named and the default one out of reach (no network, nothing cached), the app starts on
the embedded tiny model and says so in a banner.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import blipdemo
from blipdemo import allocator, gpu, kernel_caches
from blipdemo.loading import CheckpointUnavailable
from blipdemo.tiny import EMBEDDED_MODEL
from blipdemo.ui import CSS, Demo

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"
DEFAULT_MODEL = "Salesforce/instructblip-flan-t5-xl"
ON_SPACES = bool(os.environ.get("SPACE_ID"))
ON_ZERO_GPU = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")  # what the spaces package reads


def _env(name: str, default=None):
    return os.environ.get(f"BLIPDEMO_{name}", default)


def _flag(name: str) -> bool:
    return str(_env(name, "")).lower() in ("1", "true", "yes", "on")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Chat about an image with InstructBLIP / BLIP-2 (blipdemo).")
    p.add_argument(
        "--model",
        default=_env("MODEL"),
        help=f"hub id or local folder [BLIPDEMO_MODEL; default {DEFAULT_MODEL}, or the embedded "
        "tiny model when that cannot be fetched]",
    )
    p.add_argument(
        "--dtype",
        default=_env("DTYPE"),
        choices=[None, "float32", "bfloat16", "float16"],
        help="weights dtype [BLIPDEMO_DTYPE; default bfloat16 where supported, else float32]",
    )
    p.add_argument("--device", default=_env("DEVICE"), help="cpu, cuda, cuda:1 … [BLIPDEMO_DEVICE]")
    p.add_argument(
        "--load-8bit",
        action="store_true",
        default=_flag("LOAD_8BIT"),
        help="LM weights in int8: PyTorch's CPU kernels on a CPU, bitsandbytes on CUDA [BLIPDEMO_LOAD_8BIT=1]",
    )
    p.add_argument(
        "--load-4bit",
        action="store_true",
        default=_flag("LOAD_4BIT"),
        help="LM weights in int4: PyTorch's CPU kernels on a CPU, bitsandbytes nf4 on CUDA [BLIPDEMO_LOAD_4BIT=1]",
    )
    p.add_argument(
        "--quantization",
        default=_env("QUANTIZATION"),
        choices=[None, "torch", "bitsandbytes"],
        help="how --load-8bit / --load-4bit quantize: torch (CPU only) or bitsandbytes [BLIPDEMO_QUANTIZATION; "
        "default: torch for an LM on the CPU, else bitsandbytes]",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=_flag("COMPILE"),
        help="torch.compile the vision encoder: ~40 s more at start, faster first answers [BLIPDEMO_COMPILE=1]",
    )
    p.add_argument(
        "--device-map",
        default=_env("DEVICE_MAP"),
        help="auto | balanced | balanced_low_0 | sequential: split the LM over GPUs [BLIPDEMO_DEVICE_MAP]",
    )
    p.add_argument(
        "--max-memory",
        default=_env("MAX_MEMORY"),
        help='per-device budget, e.g. "0=20GiB,1=20GiB,cpu=64GiB" [BLIPDEMO_MAX_MEMORY]',
    )
    p.add_argument(
        "--host",
        default=_env("HOST", "0.0.0.0" if ON_SPACES else "127.0.0.1"),
        help="address to bind [BLIPDEMO_HOST; default 127.0.0.1, 0.0.0.0 on a Space]",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(_env("PORT", os.environ.get("GRADIO_SERVER_PORT", 7860))),
        help="port [BLIPDEMO_PORT; default 7860]",
    )
    p.add_argument(
        "--share",
        action="store_true",
        default=_flag("SHARE"),
        help="create a public gradio.live link [BLIPDEMO_SHARE=1]",
    )
    p.add_argument(
        "--history-turns",
        type=int,
        default=int(_env("HISTORY_TURNS", -1)),
        help="earlier chat turns given to the model with a new question (-1: what the model's config says it was "
        "trained with, else all that fit; default -1) [BLIPDEMO_HISTORY_TURNS]",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=int(_env("CONCURRENCY", 1)),
        help="generations running at once [BLIPDEMO_CONCURRENCY; default 1, at least --max-batch-size]",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=int(_env("MAX_BATCH_SIZE", 1)),
        help="concurrent questions decoded together in one batch (1: one at a time; off on ZeroGPU, where each "
        "answer has its own GPU worker) [BLIPDEMO_MAX_BATCH_SIZE; default 1]",
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=int(_env("QUEUE_SIZE", 16)),
        help="requests waiting at most; more are told the queue is full [BLIPDEMO_QUEUE_SIZE; default 16, at "
        "least twice --max-batch-size]",
    )
    p.add_argument(
        "--session-capacity",
        type=int,
        default=int(_env("SESSION_CAPACITY", 256)),
        help="visitors' sessions kept in memory (each holds its last answer's maps and an 800-pixel copy of its "
        "picture, some tens of KiB besides; Gradio keeps a closed one for an hour): the oldest go beyond this "
        "[BLIPDEMO_SESSION_CAPACITY; default 256]",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=float(_env("TIME_LIMIT", 120)),
        help="seconds per generation, besides max new tokens [BLIPDEMO_TIME_LIMIT; default 120]",
    )
    p.add_argument(
        "--max-file-size",
        default=_env("MAX_FILE_SIZE", "20mb"),
        help="largest upload [BLIPDEMO_MAX_FILE_SIZE; default 20mb]",
    )
    p.add_argument(
        "--feedback-dir",
        default=_env("FEEDBACK_DIR"),
        help="log each rating of an answer (like, dislike, flag) to ratings.jsonl in this folder, with the visitor's "
        "picture saved beside it; off unless given (it stores visitors' pictures) [BLIPDEMO_FEEDBACK_DIR]",
    )
    return p.parse_args(argv)


def parse_max_memory(text: str | None) -> dict | None:
    """ "0=20GiB,1=20GiB,cpu=64GiB" → {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}."""
    if not text:
        return None
    budget = {}
    for part in text.split(","):
        device, _, amount = part.partition("=")
        device = device.strip()
        budget[int(device) if device.isdigit() else device] = amount.strip()
    return budget


def batch_size(args: argparse.Namespace) -> int:
    """--max-batch-size, except on ZeroGPU, where every answer runs in a GPU worker of its own (nothing to share)."""
    if ON_ZERO_GPU and args.max_batch_size > 1:
        logging.warning("ZeroGPU runs each answer in its own worker: batching is off (max batch size 1).")
        return 1
    return args.max_batch_size


def load_model(args: argparse.Namespace):
    """(model, banner): the named model, the default one, or the embedded tiny model as the fallback."""
    options = dict(
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        max_memory=parse_max_memory(args.max_memory),
        load_in_8bit=args.load_8bit,
        load_in_4bit=args.load_4bit,
        quantization=args.quantization,
        compile=args.compile,
        max_batch_size=batch_size(args),
    )
    if args.model:  # a model the user named: failing to load it is an error, not a fallback
        return blipdemo.load(args.model, **options), None
    try:
        return blipdemo.load(DEFAULT_MODEL, **options), None
    except CheckpointUnavailable as e:
        logging.warning("%s Starting on the embedded tiny model instead.", e)
        banner = (
            f"**Running on the embedded tiny model** — `{DEFAULT_MODEL}` could not be fetched here. It "
            "answers questions about simple shapes scenes (try the examples); start with `--model` to "
            "use a real checkpoint."
        )
        embedded = dict(dtype=args.dtype, device=args.device, compile=args.compile, max_batch_size=batch_size(args))
        return blipdemo.load(EMBEDDED_MODEL, **embedded), banner


def build_demo(args: argparse.Namespace):
    """(Blocks, model): the app as `python app.py` serves it, not yet launched."""
    vlm, banner = load_model(args)
    vlm.generation_time_limit = args.time_limit
    history_turns = args.history_turns if args.history_turns >= 0 else None  # None: as the model's config says
    demo = Demo(
        vlm,
        notice=banner,
        examples_dir=ASSETS / "examples",
        history_turns=history_turns,
        feedback_dir=args.feedback_dir,
    )
    gpu.calibrate_leases(demo.generations.model_key)  # ZeroGPU: each call's lease from the model's measured costs
    # A batch of N rows needs N handlers waiting on the model at once, and a queue that can hold the next batch.
    concurrency = max(args.concurrency, vlm.max_batch_size)
    demo = demo.build(concurrency_limit=concurrency)
    queue_size = max(args.queue_size, 2 * vlm.max_batch_size)
    demo.queue(max_size=queue_size, default_concurrency_limit=concurrency, api_open=False)
    return demo, vlm


def launch_options(args: argparse.Namespace) -> dict:
    """What `demo.launch` gets: loopback unless told, no share link unless asked, bounded uploads, only assets/
    served as files, no monitoring routes."""
    return dict(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=args.max_file_size,
        state_session_capacity=args.session_capacity,
        allowed_paths=[str(ASSETS)],
        enable_monitoring=False,
        show_error=True,
        css=CSS,
    )


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    # A server's C heap: few arenas, free pages handed back (allocator.py; measured by benchmarks/soak.py).
    allocator.limit_arenas()
    allocator.keep_trimmed()
    # PyTorch's per-shape matmul caches, bounded before the first matmul (kernel_caches.py; soak.py measured them).
    kernel_caches.bound()
    demo, _ = build_demo(args)
    demo.launch(**launch_options(args))


if __name__ == "__main__":
    main()
