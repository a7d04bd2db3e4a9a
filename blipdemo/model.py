"""VisionLanguageModel: image → ViT → Q-Former → projection → transformers LM, as one module (weights and forward).

- the vision encoder, Q-Former and projection are our own modules (``vision.py``, ``qformer.py``); the
  LM stays a transformers model, so bitsandbytes layers and accelerate device maps work on it;
- the query embeddings go first, then the prompt (decoder-only: into the decoder; T5: into the encoder),
  and they are moved to whatever device the LM's input embeddings live on (``language_inputs``, the one path
  from query outputs + prompt ids to the LM, used by ``forward``, by generation and by the attention maps).

Serving — tokenizers, image cache, requests, batching, stop — lives beside it, in ``service.py``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import InstructBlipConfig

from .qformer import QFormerModel
from .vision import VisionModel


class VisionLanguageModel(nn.Module):
    """An InstructBLIP or BLIP-2 model: weights and forward. ``blipdemo.load`` serves one (``service.Service``)."""

    def __init__(self, config, language_model: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.family = "instructblip" if isinstance(config, InstructBlipConfig) else "blip2"
        self.is_encoder_decoder = not config.use_decoder_only_language_model
        qcfg = config.qformer_config
        self.vision_model = VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qcfg.hidden_size))
        self.qformer = QFormerModel(qcfg, text_input=self.family == "instructblip")
        self.language_projection = nn.Linear(qcfg.hidden_size, config.text_config.hidden_size)
        self.language_model = language_model

    # ----------------------------------------------------------------------------------------------
    # The stack
    @property
    def device(self) -> torch.device:
        """Where the vision encoder, Q-Former and projection live."""
        return self.query_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.query_tokens.dtype

    def core_modules(self) -> dict[str, nn.Module]:
        """Our own parts, by checkpoint prefix (everything but ``language_model``)."""
        return {
            "vision_model": self.vision_model,
            "qformer": self.qformer,
            "language_projection": self.language_projection,
        }

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → image tokens (B, 1 + gh*gw, Dv)."""
        return self.vision_model(pixel_values.to(self.device, self.dtype))

    def query_outputs(
        self,
        image_embeds: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image tokens (B, N, Dv) [+ instruction] → Q-Former query outputs (B, Q, Dq)."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        if self.family == "blip2":
            qformer_input_ids = qformer_attention_mask = None  # BLIP-2's Q-Former never sees the text
        elif qformer_input_ids is not None:
            qformer_input_ids = qformer_input_ids.to(self.device)
        return self.qformer(queries, image_embeds.to(self.device), qformer_input_ids, qformer_attention_mask)

    def language_inputs(
        self, query_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query outputs (B, Q, Dq) + prompt ids (B, T) → the LM's ``inputs_embeds`` (B, Q + T, D) = [projected
        queries ; prompt embeddings] and the matching mask (B, Q + T), on the LM's input device."""
        text_embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, T, D) where the LM wants it
        queries = self.language_projection(query_embeds).to(text_embeds.device, text_embeds.dtype)  # (B, Q, D)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(text_embeds.device)
        query_mask = torch.ones(queries.shape[:2], dtype=attention_mask.dtype, device=text_embeds.device)
        return torch.cat([queries, text_embeds], dim=1), torch.cat([query_mask, attention_mask], dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ):
        """The whole stack; returns the LM's output (``.logits``, and ``.loss`` when ``labels`` are given).

        Decoder-only LMs: logits cover ``num_query_tokens + len(input_ids)`` positions, queries first, and
        ``labels`` (B, T) align with ``input_ids`` (-100 = ignored). Encoder-decoder LMs: logits cover
        ``decoder_input_ids`` (or the right-shifted ``labels``). ``image_embeds`` (B, N, Dv), if given, stands
        in for ``pixel_values`` (training with a frozen, pre-computed vision encoder).
        """
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("forward needs pixel_values (or image_embeds).")
            image_embeds = self.encode_image(pixel_values)
        if input_ids is None:
            raise ValueError("forward needs input_ids (the prompt's LM token ids).")
        query_embeds = self.query_outputs(image_embeds, qformer_input_ids, qformer_attention_mask)
        inputs_embeds, mask = self.language_inputs(query_embeds, input_ids, attention_mask)
        if not self.is_encoder_decoder:
            if labels is not None:
                ignore = torch.full(query_embeds.shape[:2], -100, dtype=labels.dtype, device=labels.device)
                labels = torch.cat([ignore, labels], dim=1)  # queries are never predicted
            return self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            labels=labels,
        )
