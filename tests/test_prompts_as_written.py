"""BLIP-2 prompts as written (``template=False``): a prefix or the user's own template reaches the LM untouched.

The reference is transformers' ``Blip2Processor`` + ``Blip2ForConditionalGeneration.generate`` given the very
same text, so whatever we add (a template, a strip) shows up as a different answer.
"""

from __future__ import annotations

import pytest
import torch
from reference import reference

# A prefix to complete, the same with a trailing space (tokenizes differently), and a template of the user's own.
AS_WRITTEN = ["a photo of", "a photo of ", "Q: what is it? A:"]
GREEDY = dict(num_beams=1, do_sample=False, max_new_tokens=8)


def _reference_text(folder, image, text: str, **generate_kwargs) -> str:
    """transformers' answer for exactly ``text`` (no template added here), special tokens skipped, stripped."""
    model, processor, _ = reference(folder)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **generate_kwargs)
    if model.config.use_decoder_only_language_model:
        out = out[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(out, skip_special_tokens=True)[0].strip()


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_blip2_prompt_as_written_equals_reference(loaded, checkpoint_dir, images, lm):
    vlm, folder = loaded("blip2", lm), checkpoint_dir("blip2", lm)
    answers, wrapped = set(), set()
    for image in images[:2]:
        for prompt in AS_WRITTEN:
            assert (
                vlm.prepare(vlm.question(image, prompt, template=False)).prompt == prompt
            )  # not stripped, not wrapped
            got = vlm.ask(image, prompt, template=False, **GREEDY)
            assert got == _reference_text(folder, image, prompt, **GREEDY), (lm, prompt)
            answers.add(got)
            wrapped.add(vlm.ask(image, prompt, **GREEDY))
    assert len(answers) > 1, "answers should depend on the image and the prompt"
    assert answers != wrapped, "the random model should answer a bare prompt and a templated one differently"


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_blip2_default_still_wraps_in_the_vqa_template(loaded, checkpoint_dir, images, lm):
    vlm, folder = loaded("blip2", lm), checkpoint_dir("blip2", lm)
    assert vlm.prepare(vlm.question(images[0], " a photo of ")).prompt == "Question: a photo of Answer:"
    for prompt in AS_WRITTEN:
        expected = _reference_text(folder, images[0], f"Question: {prompt.strip()} Answer:", **GREEDY)
        assert vlm.ask(images[0], prompt, **GREEDY) == expected
        assert vlm.ask(images[0], prompt, template=True, **GREEDY) == expected


def test_blip2_history_as_typed(loaded, checkpoint_dir, images):
    vlm, folder = loaded("blip2", "opt"), checkpoint_dir("blip2", "opt")
    history = [("Q: what is it? A:", "a cat"), ("Q: where? A:", "on a mat")]
    text = "Q: what is it? A: a cat Q: where? A: on a mat Q: what color? A:"
    assert vlm.prepare(vlm.question(images[0], "Q: what color? A:", history=history, template=False)).prompt == text
    got = vlm.ask(images[0], "Q: what color? A:", history=history, template=False, **GREEDY)
    assert got == _reference_text(folder, images[0], text, **GREEDY)


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_stream_and_explain_as_written_equal_ask(loaded, images, lm):
    vlm = loaded("blip2", lm)
    for prompt in AS_WRITTEN:
        answer = vlm.ask(images[1], prompt, template=False, **GREEDY)
        assert "".join(vlm.stream(images[1], prompt, template=False, **GREEDY)) == answer
        assert vlm.explain(images[1], prompt, template=False, **GREEDY).text == answer


def test_instructblip_has_no_template_so_the_flag_changes_nothing(loaded, images):
    vlm = loaded("instructblip", "llama")
    history = [("What color is the circle?", "red")]
    for template in (True, False):
        assert vlm.prepare(vlm.question(images[0], " Where is it? ", history=history, template=template)).prompt == (
            "What color is the circle? red Where is it?"
        )
    assert vlm.ask(images[0], "Where is it?", template=False, **GREEDY) == vlm.ask(images[0], "Where is it?", **GREEDY)


def test_template_must_be_a_bool(loaded, images):
    with pytest.raises(ValueError, match="template must be True or False"):
        loaded("blip2", "opt").ask(images[0], "a photo of", template="no", **GREEDY)
