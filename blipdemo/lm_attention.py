"""The LM's attention weights for one pass in one thread, while other threads generate with the same LM.

transformers dispatches attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``, a value shared by
every thread that runs the model. Switching it to "eager" for a map pass (the only implementation that returns its
weights) would switch it for concurrent generations too. Instead, ``install`` registers once, at load time, a thin
wrapper around the implementation the LM already uses ("blipdemo:sdpa" around "sdpa", with sdpa's masks): generation
runs exactly the wrapped function. Inside ``recording(modules)``, and only in the calling thread, the wrapper also
computes softmax(q·kᵀ·scale + bias + mask) for those attention modules and keeps it (a function that returns its
weights, eager, gives its own).

``recording(modules, in_graph=True)`` is the mode relevancy maps need (gradients of the output with respect to the
weights): there the wrapper computes the output itself from the weights it keeps (output = A·V), so the weights are
in the autograd graph of what the LM returns. Still only in the calling thread: other threads run the wrapped
function exactly as before.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "blipdemo:"
_local = threading.local()  # .records: {module: [weights, …]} while this thread records; .in_graph: the mode


def _base_function(name: str, module: torch.nn.Module):
    if name == "eager":  # the model's own eager function (not in the global mapping)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _weights(module, query, key, attention_mask, scaling, is_causal, position_bias) -> torch.Tensor:
    """Attention probabilities (B, heads, Tq, Tk) as the wrapped implementation computes them, in float32."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: each key head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale  # (B, nh, Tq, Tk)
    if position_bias is not None:  # T5's relative position bias
        scores = scores + position_bias.float()
    q_len, k_len = scores.shape[-2:]
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and q_len > 1:  # what sdpa's is_causal does (no cache here: Tq == Tk)
            keep = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask.float()
    return scores.softmax(dim=-1)


def _output(module, weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weights (B, nh, Tq, Tk) float32 · value (B, nkv, Tk, hd) → output (B, Tq, nh, hd), as SDPA returns it."""
    groups = weights.shape[1] // value.shape[1]
    if groups > 1:  # grouped-query attention: each value head serves `groups` query heads
        value = value.repeat_interleave(groups, dim=1)
    output = torch.matmul(weights.to(value.dtype), value)  # (B, nh, Tq, hd)
    return output.transpose(1, 2).contiguous()


def _in_graph(base: str, module, query, key, value, attention_mask, *args, **kwargs):
    """(output, weights) with the output computed from the weights, both in the autograd graph.

    A function that returns its weights (eager) already computed its output from them; for one that does not (SDPA),
    the weights are computed as ``_weights`` does and the output from them, instead of the function's own."""
    output, weights = _base_function(base, module)(module, query, key, value, attention_mask, *args, **kwargs)
    if weights is not None:
        return output, weights
    weights = _weights(
        module, query, key, attention_mask, kwargs.get("scaling"), kwargs.get("is_causal"), kwargs.get("position_bias")
    )
    if torch.is_grad_enabled() and not weights.requires_grad:  # nothing upstream needs a gradient (8-bit, T5's
        weights.requires_grad_()  # first decoder layer): the weights become a leaf of the graph, the output hangs on it
    return _output(module, weights, value), weights


def _wrapper(base: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        records = getattr(_local, "records", None)
        if records is None or module not in records:  # generation, and every other thread: the function as it is
            return _base_function(base, module)(module, query, key, value, attention_mask, *args, **kwargs)
        if getattr(_local, "in_graph", False):
            output, weights = _in_graph(base, module, query, key, value, attention_mask, *args, **kwargs)
            records[module].append(weights)  # with its graph: gradients reach it
            return output, weights
        output, weights = _base_function(base, module)(module, query, key, value, attention_mask, *args, **kwargs)
        if weights is None:
            weights = _weights(
                module,
                query,
                key,
                attention_mask,
                kwargs.get("scaling"),
                kwargs.get("is_causal"),
                kwargs.get("position_bias"),
            )
        records[module].append(weights.detach().float())
        return output, weights

    return attention


def install(lm: torch.nn.Module) -> None:
    """Route ``lm``'s attention through the recording wrapper of its current implementation (once, at load)."""
    base = lm.config._attn_implementation or "eager"
    if base.startswith(PREFIX):
        return
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _wrapper(base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    lm.set_attn_implementation(name)


@contextmanager
def recording(
    modules: list[torch.nn.Module], in_graph: bool = False
) -> Iterator[dict[torch.nn.Module, list[torch.Tensor]]]:
    """Within the block, in this thread only: each call of these attention modules adds its weights
    (B, heads, Tq, Tk), float32, to the yielded ``{module: [weights, …]}``.

    ``in_graph``: the module's output is computed from exactly these weights, and they keep their autograd graph
    (run the pass under ``torch.enable_grad()``): ``torch.autograd.grad(logit, weights)`` is the gradient of the
    logit with respect to them. Otherwise the weights are detached and the output is the wrapped function's own."""
    previous = getattr(_local, "records", None), getattr(_local, "in_graph", False)
    _local.records = records = {module: [] for module in modules}
    _local.in_graph = in_graph
    try:
        yield records
    finally:
        _local.records, _local.in_graph = previous
