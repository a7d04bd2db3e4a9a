"""Prompt templates per checkpoint family, and chat history → one prompt that fits the model.

InstructBLIP's authors feed the raw instruction to both the Q-Former and the LM, and for several rounds
concatenate the earlier rounds before the new instruction. BLIP-2 was tuned on ``Question: … Answer:``,
so each round is written that way (the template of the transformers BLIP-2 docs and the LAVIS demo).
``template=False`` turns that off: BLIP-2 users also prompt by prefix ("a photo of") or in a template of their
own, and then every round is written as typed, "question answer", as InstructBLIP's rounds are. InstructBLIP
has no template, so the flag changes nothing there.
The Q-Former and the LM have their own token limits; whole turns are dropped, oldest first, until the
prompt fits both. An instruction that alone does not fit is an error, never silently cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Turn = tuple[str, str]  # (user instruction, model answer)


def check_template(template) -> bool:
    """``template`` as given, or a ValueError: only True or False (a string such as "false" is not quietly true)."""
    if not isinstance(template, bool):
        raise ValueError(f"template must be True or False, got {template!r}.")
    return template


def format_turn(family: str, question: str, answer: str | None, template: bool = True) -> str:
    """One round in the family's template; ``answer=None`` leaves it open for the model to complete.

    ``template=False``: the round as typed (``question``, or ``"question answer"``), whatever the family.
    """
    if family == "blip2" and template:
        if not question:  # BLIP-2 with no text is the captioning mode
            return "" if answer is None else answer
        return f"Question: {question} Answer:" + ("" if answer is None else f" {answer}")
    return question if answer is None else f"{question} {answer}"


def build_prompt(family: str, prompt: str, history: Sequence[Turn] = (), template: bool = True) -> str:
    """The full text for the model: earlier rounds (oldest first), then the open new round, joined by spaces.

    ``template=False``: no template applied to any round (see ``format_turn``).
    """
    parts = [format_turn(family, q, a, template) for q, a in history]
    parts.append(format_turn(family, prompt, None, template))
    return " ".join(p for p in parts if p)


def normalize_history(history: Sequence) -> list[Turn]:
    """Accept (question, answer) pairs or {"role", "content"} messages; return (question, answer) pairs."""
    turns: list[Turn] = []
    pending: str | None = None
    for item in history or ():
        if isinstance(item, dict):
            role, content = item.get("role"), item.get("content")
            if not isinstance(content, str):
                continue  # images and other files in a chat history are not text turns
            if role == "user":
                pending = content
            elif role == "assistant" and pending is not None:
                turns.append((pending, content))
                pending = None
        else:
            question, answer = item
            if question is not None and answer is not None:
                turns.append((str(question), str(answer)))
    return turns


def fit_history(
    family: str,
    prompt: str,
    history: Sequence[Turn],
    fits: Callable[[str], bool],
    template: bool = True,
) -> tuple[str, list[Turn]]:
    """Drop whole turns, oldest first, until ``fits(full_prompt)``; returns the prompt and the turns kept.

    ``template``: as in ``build_prompt``.

    Raises ``ValueError`` when the new instruction alone does not fit.
    """
    turns = list(history)
    while True:
        text = build_prompt(family, prompt, turns, template)
        if fits(text):
            return text, turns
        if not turns:
            raise ValueError(
                "The instruction is too long for this model: shorten it (the model's token limit is "
                "shared by the image's query tokens, the prompt and the answer)."
            )
        turns.pop(0)
