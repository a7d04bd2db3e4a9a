"""Multimodal embeddings: the Q-Former as an image (+ text) encoder, on its own.

BLIP-Diffusion feeds an image and a subject word through a BLIP-2 Q-Former and takes the query outputs,
passed through a small residual MLP (``ProjLayer``), as the embeddings that condition its image generator.
``BlipDiffusionQFormer`` is that model in the layout diffusers saves (``Salesforce/blipdiffusion``, folder
``qformer/``): our ``VisionModel`` in its CLIP style as ``visual_encoder``, our ``QFormerModel`` with BERT's
``embeddings.LayerNorm``, and ``proj_layer``.

``Blip2TextQFormer`` is the Q-Former of a BLIP-2 image–text checkpoint (``Blip2ForImageTextRetrieval``, e.g.
``Salesforce/blip2-itm-vit-g``): BLIP-2's own Q-Former with its word embeddings, where queries and text share
self-attention as in BLIP-Diffusion. Load either with ``blipdemo.load_qformer``.

InstructBLIP / BLIP-2 generation checkpoints give the same kind of embedding through
``VisionLanguageModel.embed``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .images import load_image
from .qformer import QFormerModel
from .vision import VisionModel


def text_ids(tokenizer, text: str, limit: int) -> torch.Tensor:
    """Q-Former token ids (1, T) of ``text``, as generation tokenizes an instruction ([CLS] … [SEP]).

    Text is plain text: "[SEP]" or "[DEC]" typed by a user never becomes a control token.
    """
    if not isinstance(text, str):
        raise ValueError(f"The text must be a string (or None for the image alone), got {type(text).__name__}.")
    text = text.strip()
    if not text:
        raise ValueError("The text is empty: give text=None to embed the image alone.")
    ids = tokenizer(text, split_special_tokens=True)["input_ids"]
    if len(ids) > limit:
        raise ValueError(f"The text is too long for the Q-Former: {len(ids)} tokens, at most {limit}.")
    return torch.tensor([ids])


class ProjLayer(nn.Module):
    """BLIP-Diffusion's residual MLP on the query outputs: x + Dropout(dense2(QuickGELU(dense1(LayerNorm(x)))))."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, drop_p: float = 0.1, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense1 = nn.Linear(in_dim, hidden_dim)
        self.act_fn = ACT2FN["quick_gelu"]
        self.dense2 = nn.Linear(hidden_dim, out_dim)
        self.dropout = nn.Dropout(drop_p)
        self.LayerNorm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, in_dim) → (…, out_dim); the residual is taken before the LayerNorm, as in diffusers."""
        return x + self.dropout(self.dense2(self.act_fn(self.dense1(self.LayerNorm(x)))))


class _Embedder:
    """``embed`` for a model with ``query_tokens``, ``image_processor``, ``tokenizer`` and
    ``embeddings_from_pixels``."""

    image_processor = None
    tokenizer = None

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.query_tokens.dtype

    @torch.inference_mode()
    def embed(self, image, text: str | None = None) -> torch.Tensor:
        """The multimodal embedding (num_query_tokens, hidden) of ``image``, its queries attending to ``text``
        (e.g. a subject word such as "dog", as BLIP-Diffusion uses it) where given."""
        pixel_values = self.image_processor(images=load_image(image), return_tensors="pt")["pixel_values"]
        ids = None if text is None else text_ids(self.tokenizer, text, self.text_limit)
        return self.embeddings_from_pixels(pixel_values, ids)[0]


class BlipDiffusionQFormer(_Embedder, QFormerModel):
    """BLIP-Diffusion's Q-Former: image (+ subject text) → multimodal embeddings (Q, D).

    Keys equal diffusers' ``Blip2QFormerModel``: ``visual_encoder.*``, ``query_tokens``, ``embeddings.*``
    (word and position embeddings, ``LayerNorm``), ``encoder.layer.N.*`` and ``proj_layer.*``.
    """

    def __init__(self, config, tokenizer=None, image_processor=None) -> None:
        qcfg = config.qformer_config
        super().__init__(qcfg, text_input=True, norm_name="LayerNorm")
        self.blip2_config = config
        self.visual_encoder = VisionModel(config.vision_config, clip_style=True)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qcfg.hidden_size))
        self.proj_layer = ProjLayer(qcfg.hidden_size, qcfg.hidden_size, 4 * qcfg.hidden_size)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.load_info: dict = {}

    @property
    def text_limit(self) -> int:
        return self.config.max_position_embeddings

    def embeddings_from_pixels(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``pixel_values`` (B, 3, H, W) [+ text ids (B, T)] → multimodal embeddings (B, Q, D).

        What diffusers' ``Blip2QFormerModel(text_input=…, image_input=…, return_dict=False)`` returns.
        """
        image_embeds = self.visual_encoder(pixel_values.to(self.device, self.dtype))  # (B, N, Dv)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        if input_ids is not None:
            input_ids = input_ids.to(self.device)
        return self.proj_layer(self(queries, image_embeds, input_ids))  # (B, Q, D)


class TextEmbeddings(nn.Module):
    """Word + position embeddings of a BLIP-2 image–text checkpoint (``embeddings.*``). No LayerNorm here: the
    Q-Former's own ``layernorm`` normalises [queries ; text]."""

    def __init__(self, config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) → (B, T, D); positions count from 0 at the first text token."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)


class Blip2TextQFormer(_Embedder, nn.Module):
    """The Q-Former of a BLIP-2 image–text checkpoint: image (+ text) → query outputs (Q, D).

    Keys equal ``Blip2ForImageTextRetrieval``'s: ``vision_model.*``, ``query_tokens``, ``embeddings.*`` and
    ``qformer.*``. Its matching and contrastive heads (``HEADS``) are not part of the embedding: the loader
    leaves exactly those out and is strict about everything else.
    """

    HEADS = ("vision_projection.", "text_projection.", "itm_head.")

    def __init__(self, config, tokenizer=None, image_processor=None) -> None:
        super().__init__()
        qcfg = config.qformer_config
        self.config = config
        self.vision_model = VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qcfg.hidden_size))
        self.embeddings = TextEmbeddings(qcfg)
        self.qformer = QFormerModel(qcfg, text_input=False)  # with the text feed-forward: use_qformer_text_input
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.load_info: dict = {}

    @property
    def text_limit(self) -> int:
        return self.config.qformer_config.max_position_embeddings

    def embeddings_from_pixels(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``pixel_values`` (B, 3, H, W) [+ text ids (B, T)] → query outputs (B, Q, D)."""
        image_embeds = self.vision_model(pixel_values.to(self.device, self.dtype))  # (B, N, Dv)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        text = None if input_ids is None else self.embeddings(input_ids.to(self.device))
        return self.qformer(queries, image_embeds, text_embeds=text)  # (B, Q, D)
