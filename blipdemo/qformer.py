"""The Q-Former: a BERT-style encoder whose learned query tokens read the image through cross-attention.

Notable features:
- one class for both families: InstructBLIP's Q-Former also embeds the instruction and lets queries and
  instruction tokens share self-attention (``qformer.embeddings.*``); BLIP-2's sees the queries only
  (``qformer.layernorm``);
- cross-attention to the image tokens every ``cross_attention_frequency`` layers, and a separate
  feed-forward for query positions (``intermediate_query`` / ``output_query``), as in the checkpoints;
- attention through ``F.scaled_dot_product_attention``; a cross-attention module computes its weights
  explicitly only while the calling thread records them (``recording()``), for attention maps;
- the text feed-forward of the last layer is skipped: only query outputs leave the Q-Former;
- BLIP-Diffusion's Q-Former (diffusers' layout, see ``embedding.py``) is this model with BERT's name for the
  embedding LayerNorm (``embeddings.LayerNorm``); BLIP-2 retrieval checkpoints keep their word embeddings
  outside the Q-Former and hand them in as ``text_embeds``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

_recorder = threading.local()  # per thread: .records {module: [probs, ...]} while recording; .in_graph


@contextmanager
def recording(modules: list[nn.Module], in_graph: bool = False) -> Iterator[dict[nn.Module, list[torch.Tensor]]]:
    """Within the block, the calling thread's calls of ``modules`` append their attention probabilities
    (B, nh, Tq, Tk) to ``records[module]``; other threads keep the fast SDPA path.

    The module's output is always computed from the recorded probabilities (``probs @ v``). ``in_graph``: they are
    kept with their autograd graph (run under ``torch.enable_grad()``), so that gradients with respect to them can
    be taken; otherwise they are detached."""
    records: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in modules}
    previous = getattr(_recorder, "records", None), getattr(_recorder, "in_graph", False)
    _recorder.records, _recorder.in_graph = records, in_graph
    try:
        yield records
    finally:
        _recorder.records, _recorder.in_graph = previous


class QFormerMultiHeadAttention(nn.Module):
    """Self- or cross-attention with separate query/key/value projections (BERT naming)."""

    def __init__(self, config, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        width = config.hidden_size
        kv_width = config.encoder_hidden_size if is_cross_attention else width
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, Tq, D); kv: (B, Tk, Dkv) or None for self-attention; mask: bool (B, 1, 1, Tk), True = keep."""
        kv = x if kv is None else kv
        B, Tq, D = x.shape
        hs = D // self.num_heads
        q = self.query(x).view(B, Tq, self.num_heads, hs).transpose(1, 2)  # (B, nh, Tq, hs)
        k = self.key(kv).view(B, -1, self.num_heads, hs).transpose(1, 2)  # (B, nh, Tk, hs)
        v = self.value(kv).view(B, -1, self.num_heads, hs).transpose(1, 2)
        records = getattr(_recorder, "records", None)
        if records is not None and self in records:
            # Explicit path: the only place attention weights are materialised.
            scores = (q @ k.transpose(-1, -2)) * hs**-0.5  # (B, nh, Tq, Tk)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(-1)
            if _recorder.in_graph and torch.is_grad_enabled() and not probs.requires_grad:
                probs.requires_grad_()  # nothing upstream needs a gradient: a leaf of the graph, the output hangs on it
            records[self].append(probs if _recorder.in_graph else probs.detach())
            out = probs @ v
        else:
            dropout = self.dropout_p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return out.transpose(1, 2).reshape(B, Tq, D)


class QFormerSelfOutput(nn.Module):
    """Projection + dropout + post-LayerNorm residual (BERT's ``*Output``)."""

    def __init__(self, config, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class QFormerAttention(nn.Module):
    def __init__(self, config, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.attention = QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = QFormerSelfOutput(config, config.hidden_size)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        return self.output(self.attention(x, kv, mask), x)


class QFormerIntermediate(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, config, index: int, text_input: bool) -> None:
        super().__init__()
        self.attention = QFormerAttention(config)
        self.has_cross_attention = index % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, is_cross_attention=True)
        if text_input:
            self.intermediate = QFormerIntermediate(config)
            self.output = QFormerSelfOutput(config, config.intermediate_size)
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerSelfOutput(config, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        num_queries: int,
        image_embeds: torch.Tensor,
        mask: torch.Tensor | None,
        last: bool,
    ) -> torch.Tensor:
        """x: (B, Q + T, D), queries first; returns the same shape ((B, Q, D) for the last layer)."""
        x = self.attention(x, mask=mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.has_cross_attention:
            queries = self.crossattention(queries, kv=image_embeds)
        queries = self.output_query(self.intermediate_query(queries), queries)
        if last or text.shape[1] == 0:
            return queries
        text = self.output(self.intermediate(text), text)
        return torch.cat([queries, text], dim=1)


class QFormerEncoder(nn.Module):
    def __init__(self, config, text_input: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i, text_input) for i in range(config.num_hidden_layers))


class QFormerEmbeddings(nn.Module):
    """Word + position embeddings of the text, LayerNorm over [queries ; text].

    ``norm_name``: the LayerNorm's key — ``layernorm`` in InstructBLIP checkpoints, ``LayerNorm`` (BERT's) in
    BLIP-Diffusion's.
    """

    def __init__(self, config, norm_name: str = "layernorm") -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.norm_name = norm_name
        setattr(self, norm_name, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    @property
    def norm(self) -> nn.LayerNorm:
        return getattr(self, self.norm_name)

    def forward(self, query_embeds: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        x = query_embeds.to(self.norm.weight.dtype)
        if input_ids is not None and input_ids.shape[1] > 0:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            text = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, D)
            x = torch.cat([x, text.to(x.dtype)], dim=1)  # (B, Q + T, D)
        return self.dropout(self.norm(x))


class QFormerModel(nn.Module):
    """Queries (B, Q, D) + image tokens (B, N, Dv) [+ instruction ids (B, T)] → query outputs (B, Q, D)."""

    def __init__(self, config, text_input: bool, norm_name: str = "layernorm") -> None:
        super().__init__()
        self.config = config
        self.text_input = text_input
        if text_input:
            self.embeddings = QFormerEmbeddings(config, norm_name)
        else:
            self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # BLIP-2 checkpoints made for retrieval carry the text feed-forward too; it must exist to load.
        text_ffn = text_input or getattr(config, "use_qformer_text_input", False)
        self.encoder = QFormerEncoder(config, text_ffn)

    def forward(
        self,
        query_embeds: torch.Tensor,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the Q-Former; ``attention_mask`` (B, T) masks text padding (1 = keep).

        The text is ``input_ids`` (B, T) for a Q-Former with its own embeddings (InstructBLIP, BLIP-Diffusion),
        or ready ``text_embeds`` (B, T, D) for one without (BLIP-2 retrieval checkpoints keep word + position
        embeddings outside); either way queries and text share self-attention.
        """
        num_queries = query_embeds.shape[1]
        if self.text_input:
            x = self.embeddings(query_embeds, input_ids)
        else:
            x = query_embeds.to(self.layernorm.weight.dtype)
            if text_embeds is not None:
                x = torch.cat([x, text_embeds.to(x.dtype)], dim=1)  # (B, Q + T, D)
            x = self.dropout(self.layernorm(x))
        image_embeds = image_embeds.to(x.dtype)
        mask = None
        if attention_mask is not None and x.shape[1] > num_queries and not bool(attention_mask.all()):
            keep = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
            keep[:, num_queries:] = attention_mask.to(device=x.device, dtype=torch.bool)
            mask = keep[:, None, None, :]  # (B, 1, 1, Q + T)
        layers = self.encoder.layer
        for i, layer in enumerate(layers):
            x = layer(x, num_queries, image_embeds, mask, last=i == len(layers) - 1)
        return x  # (B, Q, D)

    def cross_attention_modules(self) -> list[QFormerMultiHeadAttention]:
        """The cross-attention modules, in layer order (what attention maps record)."""
        return [layer.crossattention.attention for layer in self.encoder.layer if layer.has_cross_attention]

    def self_attention_modules(self) -> list[QFormerMultiHeadAttention]:
        """The self-attention modules (queries and instruction together), in layer order (relevancy maps record them
        too: it is how queries share what they read)."""
        return [layer.attention.attention for layer in self.encoder.layer]
