"""Command line: the Q-Former's multimodal embedding of an image (and a text), saved as safetensors.

    python -m blipdemo.embed dog.jpg dog                          # BLIP-Diffusion's Q-Former (the default)
    python -m blipdemo.embed dog.jpg dog --compare other-dog.jpg  # + cosine similarity of the two embeddings
    python -m blipdemo.embed photo.png --model Salesforce/instructblip-vicuna-7b --output photo.safetensors

Where the default model cannot be fetched (no network, not cached), the embedded tiny InstructBLIP model
in ``assets/`` is used instead, with a notice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file

from .api import load_qformer
from .images import ImageError
from .loading import CheckpointError, CheckpointUnavailable
from .tiny import EMBEDDED_MODEL

DEFAULT_MODEL = "Salesforce/blipdiffusion"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m blipdemo.embed",
        description="The Q-Former's multimodal embedding (num_query_tokens × hidden) of an image and a text.",
    )
    p.add_argument("image", help="image file")
    p.add_argument("text", nargs="?", default=None, help="text the queries attend to (BLIP-Diffusion: the subject)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or folder (default: {DEFAULT_MODEL})")
    p.add_argument("--compare", metavar="IMAGE", help="a second image: print the cosine similarity of the two")
    p.add_argument("--output", type=Path, help="where to save (default: <image name>.embedding.safetensors)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the vision encoder (pays off for many images)")
    return p.parse_args(argv)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two embeddings, each flattened to one vector (Q·D)."""
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _load(args: argparse.Namespace):
    try:
        return load_qformer(args.model, dtype=args.dtype, device=args.device, compile=args.compile)
    except CheckpointUnavailable as e:
        if args.model != DEFAULT_MODEL:
            raise
        print(f"{e}\nUsing the embedded tiny model ({EMBEDDED_MODEL.name}) instead.", file=sys.stderr)
        return load_qformer(EMBEDDED_MODEL, dtype=args.dtype, device=args.device, compile=args.compile)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0, or 2 with a message for bad input)."""
    args = parse_args(argv)
    try:
        model = _load(args)
        embedding = model.embed(args.image, args.text).float().cpu()
        tensors = {"embedding": embedding.contiguous()}
        if args.compare:
            other = model.embed(args.compare, args.text).float().cpu()
            tensors["compare_embedding"] = other.contiguous()
        output = args.output or Path(f"{Path(args.image).stem}.embedding.safetensors")
        if not output.parent.is_dir():
            raise ValueError(f"Cannot save to {output}: the folder {output.parent} does not exist.")
        metadata = {"model": str(model.load_info.get("name")), "image": str(args.image), "text": args.text or ""}
        if args.compare:
            metadata["compare"] = str(args.compare)
        save_file(tensors, output, metadata=metadata)
    except (CheckpointError, ImageError, ValueError, OSError, SafetensorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model: {model.load_info.get('name')} ({model.load_info.get('kind')})")
    print(f"embedding: {tuple(embedding.shape)} (num_query_tokens × hidden), saved to {output}")
    if args.compare:
        print(f"cosine similarity with {args.compare}: {cosine(embedding, tensors['compare_embedding']):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
