"""Runs in the reference environment (``reference_env.py``): builds a small random BLIP-Diffusion Q-Former with
diffusers' own class, saves it in the pipeline's layout, and writes the embeddings the pipeline would use.

    python blipdiffusion_reference.py OUT --requests requests.json [--seed 0] [--cross-attention-frequency 1]
                                      [--full-size] [--time N]

``requests.json`` lists {"image": path, "text": subject}. Output: ``OUT/pipeline/qformer`` (config.json +
model.safetensors, written by ``save_pretrained``), ``OUT/pipeline/image_processor``, ``OUT/bert`` (the offline
BERT tokenizer named by the config), and ``OUT/reference.safetensors`` with ``embeds.N`` (Q, D) and
``pixels.N`` for each request: the pipeline's preprocessing (its own mean / std) and
``qformer(text_input=[text], image_input=pixels, return_dict=False)``, the call BLIP-Diffusion's pipeline makes.

``--full-size``: BLIP-Diffusion's real sizes (CLIP ViT-L/14 cut to 23 layers, a 12-layer Q-Former, 16 queries).
``--time N``: also write ``OUT/timings.json``, the median seconds of N calls per request in float32 and bfloat16,
each decoding the image file, preprocessing it and running the Q-Former (for ``benchmarks/embed_speed.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers.pipelines.blip_diffusion.blip_image_processing import BlipImageProcessor
from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
from PIL import Image
from safetensors.torch import save_file
from transformers import BertTokenizer
from transformers.models.blip_2.configuration_blip_2 import Blip2Config

WORDS = ["a", "the", "dog", "cat", "red", "blue", "green", "circle", "square", "photo", "of", "on", "in"]
WORDS += ["small", "big", "sitting", "toy", "car", "house"]


def bert_tokenizer(folder: Path) -> Path:
    """An uncased WordPiece vocabulary written offline: specials, words, letters and ##letters."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, *("##" + c for c in letters)]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--requests", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cross-attention-frequency", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--time", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    bert = bert_tokenizer(args.out / "bert")
    vocab_size = len(BertTokenizer.from_pretrained(str(bert))) + 1  # + [DEC], which the model adds as BOS
    if args.full_size:  # the sizes of diffusers' conversion script (BLIP2_CONFIG) for Salesforce/blipdiffusion
        args.image_size = 224
        vision = dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, image_size=224, patch_size=14)
        vision.update(intermediate_size=4096, hidden_act="quick_gelu")
        qformer = dict(cross_attention_frequency=1, encoder_hidden_size=1024, vocab_size=30523)
        queries = 16
    else:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        vision.update(image_size=args.image_size, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
        qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
        qformer.update(cross_attention_frequency=args.cross_attention_frequency, encoder_hidden_size=32)
        qformer.update(vocab_size=vocab_size, max_position_embeddings=64)
        queries = 4
    config = Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=queries, tokenizer=str(bert))
    model = Blip2QFormerModel(config)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # a wider spread than the init, so every weight matters
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(noise * 1.5 / max(1.0, p.shape[-1] ** 0.5))
    model.eval()
    pipeline = args.out / "pipeline"
    model.save_pretrained(pipeline / "qformer", safe_serialization=True)
    processor = BlipImageProcessor(size={"height": args.image_size, "width": args.image_size})
    processor.save_pretrained(pipeline / "image_processor")
    # The pipeline normalises with its own mean / std when its config sets them (here: not the processor's).
    mean, std = [0.5, 0.45, 0.4], [0.3, 0.25, 0.2]
    index = {"_class_name": "BlipDiffusionPipeline", "mean": mean, "std": std}
    (pipeline / "model_index.json").write_text(json.dumps(index))

    tensors = {}
    for i, request in enumerate(json.loads(args.requests.read_text())):
        image = Image.open(request["image"])
        pixels = processor.preprocess(image, image_mean=mean, image_std=std, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            embeds = model(text_input=[request["text"]], image_input=pixels, return_dict=False)
        tensors[f"embeds.{i}"] = embeds[0].contiguous()
        tensors[f"pixels.{i}"] = pixels[0].contiguous()
    save_file(tensors, args.out / "reference.safetensors")
    if args.time:
        (args.out / "timings.json").write_text(json.dumps(timings(model, processor, mean, std, args)))


def timings(model, processor, mean, std, args) -> dict:
    """Median seconds per request (decode the file + preprocess + Q-Former call) in float32 and bfloat16."""
    requests = json.loads(args.requests.read_text())
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        seconds = []
        for request in requests:
            for run in range(args.time + 1):
                start = time.perf_counter()
                # Decoded from the file inside the timed region, as blipdemo's embed(path) decodes in its own.
                image = Image.open(request["image"]).convert("RGB")
                pixels = processor.preprocess(image, image_mean=mean, image_std=std, return_tensors="pt")
                with torch.no_grad():
                    model(text_input=[request["text"]], image_input=pixels["pixel_values"].to(dtype), return_dict=False)
                if run:  # the first is a warm-up
                    seconds.append(time.perf_counter() - start)
        result[str(dtype).removeprefix("torch.")] = statistics.median(seconds)
    return result


if __name__ == "__main__":
    main()
