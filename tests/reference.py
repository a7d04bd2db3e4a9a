"""The transformers reference on the same checkpoint: processor + …ForConditionalGeneration."""

from __future__ import annotations

import functools

import torch
from transformers import (
    Blip2ForConditionalGeneration,
    Blip2Processor,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
)


@functools.lru_cache(maxsize=8)
def reference(folder, dtype=torch.float32):
    """(model, processor, family) of transformers' own classes for ``folder``."""
    text = (folder / "config.json").read_text()
    if '"instructblip"' in text:
        model = InstructBlipForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
        return model, InstructBlipProcessor.from_pretrained(folder), "instructblip"
    model = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    return model, Blip2Processor.from_pretrained(folder), "blip2"


def reference_answer(folder, image, prompt: str, dtype=torch.float32, **generate_kwargs) -> str:
    """What the reference generates for ``prompt`` (in the family's template), special tokens skipped."""
    model, processor, family = reference(folder, dtype)
    # Written out here, not imported: the templates are part of what the tests check.
    text = prompt if family == "instructblip" else f"Question: {prompt} Answer:"
    inputs = processor(images=image, text=text, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        out = model.generate(**inputs, **generate_kwargs)
    if model.config.use_decoder_only_language_model:
        out = out[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(out, skip_special_tokens=True)[0].strip()
