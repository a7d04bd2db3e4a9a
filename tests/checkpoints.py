"""Small random checkpoints in the published Hugging Face layout, built offline by transformers itself.

Each is a real `InstructBlipForConditionalGeneration` / `Blip2ForConditionalGeneration` saved with
`save_pretrained`, with its processor (image processor, LM tokenizer with the `<image>` token, and the
Q-Former tokenizer in `qformer_tokenizer/` for InstructBLIP). Weights are re-drawn with a larger spread
than transformers' init so that answers really depend on the image and the prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    BlipImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    LlamaConfig,
    OPTConfig,
    T5Config,
)

from blipdemo.tiny.tokenizers import lm_tokenizer, wordpiece_tokenizer

CORPUS = [
    "What color is the circle? red green blue yellow purple orange",
    "Describe the image in detail. A photo of a cat sitting on a mat next to a dog.",
    "Question: how many shapes are there? Answer: two three one",
    "Where is the red square? top left bottom right center",
    "Is there a blue triangle? yes no maybe. What is unusual about this image?",
    "The quick brown fox jumps over the lazy dog, and the picture shows it clearly!",
] * 4
WORDS = sorted({w.strip("?.,!:").lower() for line in CORPUS for w in line.split()})
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _lm_config(lm: str, vocab_size: int, tok, width: int = 48) -> object:
    common = {"vocab_size": vocab_size, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    if lm == "llama":
        return LlamaConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tok.bos_token_id,
            tie_word_embeddings=False,
            **common,
        )
    if lm == "opt":
        return OPTConfig(
            hidden_size=width,
            ffn_dim=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=width,
            max_position_embeddings=256,
            bos_token_id=tok.bos_token_id,
            **common,
        )
    if lm == "t5":
        return T5Config(
            d_model=width,
            d_ff=2 * width,
            d_kv=width // 4,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
            **common,
        )
    raise ValueError(lm)


def _redraw(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise * (0.5 / max(1.0, p.shape[-1] ** 0.5)) * 3)


def make_checkpoint(
    path: str | Path,
    family: str = "instructblip",
    lm: str = "llama",
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    num_query_tokens: int = 4,
    qformer_layers: int = 3,
    cross_attention_frequency: int = 2,
    qkv_bias: bool = True,
    lm_width: int = 48,
    lm_config: dict | None = None,
    tokenizer=None,
) -> Path:
    """Build, randomise and save a tiny checkpoint + processor; returns the folder.

    ``lm_config``: LM config fields that replace the defaults (e.g. heads and ``head_dim`` together).
    ``tokenizer``: the LM tokenizer (default: a byte-level BPE trained on CORPUS in the LM family's style).
    """
    path = Path(path)
    torch.manual_seed(seed)
    tok = tokenizer if tokenizer is not None else lm_tokenizer(CORPUS, vocab_size=300, style=lm)
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    if family == "instructblip":
        qtok = wordpiece_tokenizer(WORDS, max_length=64)
        processor = InstructBlipProcessor(image_processor, tok, qtok, num_query_tokens=num_query_tokens)
    else:
        processor = Blip2Processor(image_processor, tok, num_query_tokens=num_query_tokens)
    tok = processor.tokenizer  # now holds the <image> placeholder token
    image_token = tok.convert_tokens_to_ids("<image>")
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        qkv_bias=qkv_bias,
    )
    qformer = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=qformer_layers,
        num_attention_heads=4,
        cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=32,
        max_position_embeddings=64,
    )
    text = _lm_config(lm, len(tok), tok, lm_width)
    if lm_config:
        text = type(text).from_dict({**text.to_dict(), **lm_config})
    if family == "instructblip":
        qformer["vocab_size"] = len(processor.qformer_tokenizer)
        config = InstructBlipConfig(
            vision_config=vision,
            qformer_config=qformer,
            text_config=text.to_dict(),
            num_query_tokens=num_query_tokens,
            image_token_index=image_token,
        )
        model = InstructBlipForConditionalGeneration(config)
    else:
        config = Blip2Config(
            vision_config=vision,
            qformer_config=qformer,
            text_config=text.to_dict(),
            num_query_tokens=num_query_tokens,
            image_token_index=image_token,
        )
        model = Blip2ForConditionalGeneration(config)
    _redraw(model, seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_retrieval_checkpoint(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A random BLIP-2 image-text checkpoint (``Blip2ForImageTextRetrieval``, the layout of
    Salesforce/blip2-itm-vit-g): Q-Former with word embeddings and the text feed-forward, no LM."""
    path = Path(path)
    torch.manual_seed(seed)
    tok = wordpiece_tokenizer(WORDS, max_length=64)
    config = Blip2Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=image_size
        ),
        qformer_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            cross_attention_frequency=2,
            encoder_hidden_size=32,
            max_position_embeddings=64,
            vocab_size=len(tok),
            use_qformer_text_input=True,
        ),
        num_query_tokens=4,
        image_text_hidden_size=16,
    )
    model = Blip2ForImageTextRetrieval(config)
    _redraw(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    ).save_pretrained(path)
    return path
