"""The teacher-forced pass the maps are made from: the model producing exactly a given answer, in one pass, with the
attention it used recorded in the calling thread only (``qformer.recording``, ``lm_attention.recording``).

Raw attention (``attention.py``) and relevancy (``relevancy.py``) both read it; a map pass can be stopped between its
steps (``Stopped``: the caller's Stop, or a client that went away).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import lm_attention
from .qformer import recording


class Stopped(Exception):
    """The caller's Stop or a vanished client ended a map pass."""


def stop_if_set(stop: threading.Event | None) -> None:
    """Raise ``Stopped`` when ``stop`` is set (checked before a pass and between relevancy's gradient chunks)."""
    if stop is not None and stop.is_set():
        raise Stopped("the map pass was stopped")


def patch_grid(patches: int) -> tuple[int, int]:
    """The (gh, gw) grid of ``patches`` image tokens (CLS not counted): the vision encoders here see a square image."""
    side = math.isqrt(patches)
    assert side * side == patches, f"{patches} image tokens (CLS not counted) do not form a square grid"
    return side, side


@dataclass
class TeacherForced:
    """What one teacher-forced pass over an answer recorded, in the calling thread only."""

    qformer: dict[torch.nn.Module, torch.Tensor]  # Q-Former attention module → its probabilities (V, nh, Tq, Tk)
    lm: dict[torch.nn.Module, torch.Tensor]  # LM attention module → its weights (1, nh, T, S), float32
    rows: torch.Tensor  # (n,): position rows[t] of the LM's output produced answer token t
    logits: torch.Tensor  # (1, S, vocab): decoder-only S = V*Q + T + n - 1 (queries, prompt, answer[:-1]); T5 S = n
    grid: tuple[int, int]  # (gh, gw): the image tokens' patch grid
    views: int = 1  # V: the pictures the LM read (PreparedInputs.views), Q queries each, in that order


def teacher_forced(
    service,
    inputs,
    answer_ids: torch.Tensor,
    qformer_modules: Sequence[torch.nn.Module],
    language_modules: Sequence[torch.nn.Module],
    *,
    in_graph: bool,
) -> TeacherForced:
    """The model producing exactly ``answer_ids`` (n,) for the prepared ``inputs``, in one pass: the image tokens (from
    the cache), the Q-Former with ``qformer_modules`` recorded, the LM fed [queries ; prompt ; answer[:-1]]
    (decoder-only) or the encoder's inputs and [start ; answer[:-1]] (T5) with ``language_modules`` recorded.

    ``in_graph=False`` (raw attention): under ``inference_mode``, the records detached. ``in_graph=True`` (relevancy):
    with gradients on, every record in the autograd graph of the logits; nothing is accumulated on parameters.
    Only the modules named are recorded: a recorded Q-Former module leaves SDPA for its explicit path."""
    model = service.model
    lm = model.language_model
    answer = answer_ids.reshape(1, -1).to(inputs.input_ids.device)  # (1, n)
    with contextlib.ExitStack() as modes:
        if in_graph:
            modes.enter_context(torch.inference_mode(False))
            modes.enter_context(torch.enable_grad())
        else:
            modes.enter_context(torch.inference_mode())
        views = inputs.views()  # the pictures the LM reads: the picture, or a look-closer crop, or both
        image_embeds = service.image_tokens(views)  # (V, 1 + P, Dv)
        if in_graph:  # the cached image tokens are inference tensors: a plain copy can enter a graph
            image_embeds = image_embeds.clone()
        qformer_ids = inputs.qformer_input_ids
        if qformer_ids is not None:
            qformer_ids = qformer_ids.expand(len(views), -1)  # every picture's queries read the instruction
        with recording(list(qformer_modules), in_graph=in_graph) as q_records:
            query_embeds = model.query_outputs(image_embeds, qformer_ids)  # (V, Q, D)
        query_embeds = query_embeds.reshape(1, -1, query_embeds.shape[-1])  # (1, V*Q, D): the pictures' in turn
        with lm_attention.recording(list(language_modules), in_graph=in_graph) as lm_records:
            if model.is_encoder_decoder:
                embeds, mask = model.language_inputs(query_embeds, inputs.input_ids)
                start = torch.tensor([[lm.config.decoder_start_token_id]], device=answer.device)
                decoder_ids = torch.cat([start, answer[:, :-1]], dim=1).to(embeds.device)  # position t → token t
                decoder = {"decoder_input_ids": decoder_ids}
                if in_graph:  # a leaf that needs a gradient: the first decoder layer's self-attention hangs on it
                    leaf = lm.get_input_embeddings()(decoder_ids).detach().requires_grad_()  # (1, n, D)
                    decoder = {"decoder_inputs_embeds": leaf}
                logits = lm(inputs_embeds=embeds, attention_mask=mask, **decoder).logits
                rows = torch.arange(answer.shape[1])
            else:
                ids = torch.cat([inputs.input_ids, answer[:, :-1]], dim=1)  # (1, T + n - 1)
                embeds, mask = model.language_inputs(query_embeds, ids)
                logits = lm(inputs_embeds=embeds, attention_mask=mask).logits
                first = query_embeds.shape[1] + inputs.input_ids.shape[1] - 1  # produced answer token 0
                rows = torch.arange(first, first + answer.shape[1])
    return TeacherForced(
        qformer={m: q_records[m][0] for m in qformer_modules},
        lm={m: lm_records[m][0] for m in language_modules},
        rows=rows,
        logits=logits,
        grid=patch_grid(image_embeds.shape[1] - 1),
        views=image_embeds.shape[0],
    )
