"""Rows of transformers' key/value caches: merge two running batches, drop rows, trim common padding.

The decode loop (``decode_loop.py``) keeps one cache for all the rows it runs. A cache here is transformers' own
``DynamicCache`` (decoder-only LMs) or ``EncoderDecoderCache`` (T5: the decoder's self-attention cache plus the
cross-attention cache of the encoder's output); each layer holds keys and values of shape (B, H, L, Dh) on that
layer's device (a device map spreads them). Nothing here computes anything: rows are only padded, concatenated and
selected, so a row's numbers are the ones its prefill produced.

- Self-attention columns are *left*-padded when two batches of different lengths merge: every row's newest position
  stays in the last column, where the next step writes. Padded columns are masked out by the caller's attention
  mask; positions are given explicitly (decoder-only) or are relative (T5), so the padding shifts nothing.
- Cross-attention columns (T5, one per encoder position) are *right*-padded, as the encoder mask is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, EncoderDecoderCache
from transformers.cache_utils import DynamicLayer


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) of every layer, each (B, H, L, Dh)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_of(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding these (keys, values) per layer as they are (``DynamicCache(pairs)`` would copy them
    once more, through its update)."""
    cache = DynamicCache()
    for keys, values in pairs:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)  # device and dtype, as a first update would set them
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def _pad(t: torch.Tensor, width: int, *, left: bool) -> torch.Tensor:
    """(B, H, L, Dh) → (B, H, width, Dh) with zero columns on the left or the right."""
    missing = width - t.shape[-2]
    if missing == 0:
        return t
    return F.pad(t, (0, 0, missing, 0) if left else (0, 0, 0, missing))


def _merge_dynamic(a: DynamicCache, b: DynamicCache, *, left: bool) -> DynamicCache:
    """Rows of ``a`` then rows of ``b``, every layer padded to the longer of the two."""
    merged = []
    for (ka, va), (kb, vb) in zip(_layers(a), _layers(b), strict=True):
        width = max(ka.shape[-2], kb.shape[-2])
        kb, vb = kb.to(ka.device), vb.to(va.device)  # the same layer lives on the same device in both
        merged.append(
            (
                torch.cat([_pad(ka, width, left=left), _pad(kb, width, left=left)]),
                torch.cat([_pad(va, width, left=left), _pad(vb, width, left=left)]),
            )
        )
    return _cache_of(merged)


def merge(a, b):
    """One cache holding the rows of ``a`` followed by those of ``b`` (both DynamicCache, or both
    EncoderDecoderCache); self-attention left-padded, cross-attention right-padded to the longer one."""
    if isinstance(a, EncoderDecoderCache):
        return EncoderDecoderCache(
            _merge_dynamic(a.self_attention_cache, b.self_attention_cache, left=True),
            _merge_dynamic(a.cross_attention_cache, b.cross_attention_cache, left=False),
        )
    return _merge_dynamic(a, b, left=True)


def _select_dynamic(cache: DynamicCache, rows: list[int], first: int, last: int | None) -> DynamicCache:
    """Keep ``rows`` and the columns [first, last) of every layer."""
    kept = []
    for keys, values in _layers(cache):
        index = torch.tensor(rows, device=keys.device)
        kept.append((keys[index, :, first:last], values[index, :, first:last]))
    return _cache_of(kept)


def select(cache, rows: list[int], first_column: int = 0, cross_columns: int | None = None):
    """The cache of ``rows`` only (in that order), self-attention columns from ``first_column`` on (leading columns
    that are padding in every kept row are dropped), cross-attention columns up to ``cross_columns`` (T5)."""
    if isinstance(cache, EncoderDecoderCache):
        return EncoderDecoderCache(
            _select_dynamic(cache.self_attention_cache, rows, first_column, None),
            _select_dynamic(cache.cross_attention_cache, rows, 0, cross_columns),
        )
    return _select_dynamic(cache, rows, first_column, None)


def width(cache) -> int:
    """Self-attention columns (the decoder's length so far, padding included)."""
    return cache.get_seq_length()
