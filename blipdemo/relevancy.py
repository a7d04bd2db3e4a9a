"""Relevancy maps: gradient-weighted attention propagated through both hops (``explain(..., method="relevancy")``).

After Chefer, Gur and Wolf 2021, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers". For each answer token t, with ∇A the gradient of the logit of token t at the position
that produced it with respect to an attention map A (B, heads, Tq, Tk):

- per layer, Ā = mean over the chosen heads of (∇A ⊙ A), negatives clamped to 0 (``gradcam``);
- the LM hop: R = Π_l (I + Ā_l) over the chosen layers (a residual stream plus what each layer gathered), and the
  token's row R[producing position, :Q] says how much it drew on each query position (decoder-only: self-attention;
  T5: the encoder's self-attention, then per decoder block self-attention and cross-attention to the encoder's
  outputs, ``encoder_decoder_row``);
- the Q-Former hop: each cross-attention layer adds Ā_cross (queries → image tokens) to the queries' relevancy on the
  image, and each self-attention layer (queries and instruction together) mixes what the queries had gathered so far,
  R ← (I + Ā_self) R (``query_relevancy``): a query's map includes what it learned from the others. Cross-attention
  direct (R += Ā_cross), without the rule's (R̄ˢˢ)ᵀ factor: the same residual accounting as the self-attention rule.

Gradients come from ``torch.autograd.grad`` on activations only (the attention maps recorded by the teacher-forced
pass raw attention uses too, ``teacher_forced.teacher_forced`` with ``in_graph=True``: there they are in the graph of
the logits), the answer's tokens sharing batched backward passes on one retained graph, a chunk at a time; parameters
are never changed, and no ``.grad`` is accumulated. A ``stop`` event is checked before each chunk (``Stopped``).
Unselected layers of a hop count as identity (their residual stream only); the Q-Former's self-attention always takes
all its layers and heads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from .teacher_forced import stop_if_set, teacher_forced


def gradcam(attention: torch.Tensor, gradient: torch.Tensor | None, heads: Sequence[int] | None) -> torch.Tensor:
    """Ā = mean over ``heads`` (None: all) of (∇A ⊙ A) clamped at 0: (1, nh, Tq, Tk) twice → (Tq, Tk) float32."""
    if gradient is None:  # the logit does not depend on this map
        return torch.zeros(attention.shape[-2:], device=attention.device)
    heads = list(range(attention.shape[1])) if heads is None else list(heads)
    cam = gradient[0, heads].float() * attention[0, heads].detach().float()  # (h, Tq, Tk)
    return cam.clamp_min(0).mean(0)


def relevancy_row(cams: Sequence[torch.Tensor], row: int) -> torch.Tensor:
    """Row ``row`` of R = (I + Ā_L) ⋯ (I + Ā_1) for self-attention cams (S, S) in layer order → (S,).

    Multiplied from the left, one row vector at a time: O(L·S²) instead of the full matrices' O(L·S³)."""
    size = cams[0].shape[-1] if cams else row + 1
    device = cams[0].device if cams else None
    v = torch.zeros(size, device=device)
    v[row] = 1.0
    for cam in reversed(cams):
        v = v + v @ cam
    return v


def encoder_decoder_row(
    encoder_cams: Sequence[torch.Tensor],
    decoder_cams: Sequence[tuple[torch.Tensor, torch.Tensor]],
    row: int,
    encoder_size: int,
) -> torch.Tensor:
    """T5: decoder position ``row``'s relevancy on the encoder's inputs (Te,).

    ``encoder_cams``: (Te, Te) per encoder layer; ``decoder_cams``: (self (Td, Td), cross (Td, Te)) per decoder
    block, in order. R_de ← (I + Ā_self) R_de + Ā_cross R_ee per block, with R_ee = Π (I + Ā_enc); row by row."""
    device = encoder_cams[0].device if encoder_cams else (decoder_cams[0][1].device if decoder_cams else None)
    size = decoder_cams[0][0].shape[-1] if decoder_cams else row + 1
    v = torch.zeros(size, device=device)
    v[row] = 1.0
    u = torch.zeros(encoder_size, device=device)  # Σ over blocks of (row of the later blocks' self part) · Ā_cross
    for self_cam, cross_cam in reversed(decoder_cams):  # within a block, self-attention comes before cross
        u = u + v @ cross_cam
        v = v + v @ self_cam
    for cam in reversed(encoder_cams):  # u · R_ee
        u = u + u @ cam
    return u


def query_relevancy(
    self_cams: Sequence[torch.Tensor], cross_cams: dict[int, torch.Tensor], num_queries: int
) -> torch.Tensor:
    """The queries' relevancy on the image tokens (Q, N) through the Q-Former.

    ``self_cams``: (Q + T, Q + T) per layer (queries first); ``cross_cams``: {layer: (Q, N)} for the chosen
    cross-attention layers. Per layer: R ← (I + Ā_self) R, then R[:Q] += Ā_cross; R starts at 0. Computed from the
    end for the query rows only: V = [I_Q 0] (I + Ā_self of later layers)."""
    width = self_cams[0].shape[-1] if self_cams else num_queries
    device = self_cams[0].device if self_cams else None
    v = torch.eye(num_queries, width, device=device)  # (Q, Q + T)
    result = None
    for i in reversed(range(len(self_cams))):
        if i in cross_cams:
            term = v[:, :num_queries] @ cross_cams[i].to(v.device)  # (Q, N)
            result = term if result is None else result + term
        v = v + v @ self_cams[i]
    if result is None:  # no cross-attention layer chosen (cannot happen through map_selection)
        raise ValueError("query_relevancy needs at least one cross-attention layer")
    return result


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to sum 1; a row with no positive relevancy at all becomes uniform (no evidence either way)."""
    total = x.sum(-1, keepdim=True)
    uniform = torch.full_like(x, 1.0 / x.shape[-1])
    return torch.where(total > 0, x / total.clamp_min(1e-30), uniform)


GRADIENT_BUDGET = 256 * 2**20  # bytes of gradients held at once: answer tokens share backward passes up to this


def chunk_size(records: list[torch.Tensor]) -> int:
    """How many targets' gradients fit GRADIENT_BUDGET at once (at least one)."""
    per_target = 4 * sum(r.numel() for r in records)  # float32 bytes of one target's gradients
    return max(1, GRADIENT_BUDGET // max(per_target, 1))


def gradients(targets: torch.Tensor, records: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """∂targets[i]/∂record for each recorded map: (n, *record.shape) per record, or None where no target depends on
    it; the graph is kept. The n targets share one batched backward pass (``is_grads_batched``), or, where an op has
    no batching rule (a custom autograd Function), take one pass each."""
    if len(targets) > 1:
        eye = torch.eye(len(targets), dtype=targets.dtype, device=targets.device)  # one one-hot seed per target
        try:
            grads = torch.autograd.grad(
                targets, records, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
            return list(grads)
        except RuntimeError:
            pass
    each = [torch.autograd.grad(t, records, retain_graph=True, allow_unused=True) for t in targets]
    return [None if g[0] is None else torch.stack(g) for g in zip(*each, strict=True)]


def check_differentiable(lm) -> None:
    """Refuse an LM whose layers pass no gradient back to their inputs, before any model work: bitsandbytes' 4-bit
    layers on the CPU run a kernel without a backward (PyTorch would only warn, and every map would come out flat)."""
    for module in lm.modules():
        if type(module).__name__ == "Linear4bit" and module.weight.device.type == "cpu":
            raise ValueError(
                "method='relevancy' needs gradients through the language model, and bitsandbytes' 4-bit layers on "
                "the CPU compute without any: use method='attention', or load the LM in 8-bit or in floating point."
            )


def lm_modules(lm) -> dict[str, list[torch.nn.Module]]:
    """The LM's attention modules relevancy records, in layer order: decoder-only {"self": …}; T5 {"encoder": …,
    "self": decoder self-attention, "cross": decoder cross-attention}."""
    if not lm.config.is_encoder_decoder:
        return {"self": [m for name, m in lm.named_modules() if name.endswith(".self_attn")]}
    return {
        "encoder": [block.layer[0].SelfAttention for block in lm.get_encoder().block],
        "self": [block.layer[0].SelfAttention for block in lm.get_decoder().block],
        "cross": [block.layer[1].EncDecAttention for block in lm.get_decoder().block],
    }


def relevancy_hops(
    service,
    inputs,
    answer_ids: torch.Tensor,
    selections: Sequence,
    which: Sequence[int],
    stop: threading.Event | None = None,
) -> list:
    """Per selection (``attention.MapSelection``), for the answer tokens in ``which``: (query weights R (n, V*Q), query
    maps C (n, V, Q, P)), both row-normalized, for the V pictures the LM read (``PreparedInputs.views``: 1, or 2 for a
    look-closer answer from the picture and its crop; the Q-Former reads each on its own, so each has its own Q-Former
    relevancy, while the LM's runs over all their queries).

    One teacher-forced pass with every attention map in the graph (``teacher_forced``, this thread only),
    then the tokens' gradients (batched backward passes, ``gradients``, as many tokens at once as GRADIENT_BUDGET
    allows); the selections share them — they only choose what is propagated. ``stop`` set before a chunk of
    gradients: ``teacher_forced.Stopped``, the remaining chunks not taken."""
    model = service.model
    q = model.config.num_query_tokens
    modules = lm_modules(model.language_model)
    qf_self, qf_cross = model.qformer.self_attention_modules(), model.qformer.cross_attention_modules()
    lm_list = [m for group in modules.values() for m in group]
    with torch.inference_mode(False), torch.enable_grad():
        forced = teacher_forced(service, inputs, answer_ids, qf_self + qf_cross, lm_list, in_graph=True)
        maps = forced.qformer | forced.lm  # {module: (V or 1, nh, Tq, Tk) in the graph of the logits}
        views = forced.views
        logits, rows = forced.logits, forced.rows
        answer = answer_ids.reshape(-1).to(logits.device)  # (n,)
        steps = list(which)
        targets = logits[0, rows[steps].to(logits.device), answer[steps]]  # (len(which),) the tokens' own logits
        results = [([], []) for _ in selections]
        reached = False
        chunk = chunk_size(list(maps.values()))
        for start in range(0, len(steps), chunk):  # the tokens' gradients a chunk at a time: memory stays bounded
            stop_if_set(stop)
            found = gradients(targets[start : start + chunk], list(maps.values()))
            grads = dict(zip(maps, found, strict=True))  # {module: (chunk, V or 1, nh, Tq, Tk) or None}
            reached = reached or any(g is not None and bool(g.any()) for g in grads.values())
            with torch.no_grad():
                for k, t in enumerate(steps[start : start + chunk]):
                    cam = _TokenCams(maps, {m: None if g is None else g[k] for m, g in grads.items()})
                    for selection, (weights, query_maps) in zip(selections, results, strict=True):
                        weights.append(_lm_row(modules, cam, selection, int(rows[t]), q * views))
                        per_view = [_query_maps(qf_self, qf_cross, cam, selection, q, model, v) for v in range(views)]
                        query_maps.append(torch.stack(per_view))  # (V, Q, P)
    if not reached:
        raise RuntimeError(
            "Relevancy: no gradient of the answer's logits reached any attention map (a layer of the model computes "
            "without a backward); use method='attention'."
        )
    return [(normalize_rows(torch.stack(w)), normalize_rows(torch.stack(c))) for w, c in results]


class _TokenCams:
    """One token's Ā per (module, heads, picture), computed once and shared by the selections: (Tq, Tk) float32 on
    the CPU. ``view``: which picture's pass of a Q-Former module (its records hold one row per picture read)."""

    def __init__(self, maps: dict, grads: dict) -> None:
        self.maps, self.grads, self.cache = maps, grads, {}

    def __call__(self, module, heads: Sequence[int] | None, view: int = 0) -> torch.Tensor:
        key = (module, None if heads is None else tuple(heads), view)
        if key not in self.cache:
            grad = self.grads[module]
            rows = slice(view, view + 1)
            self.cache[key] = gradcam(self.maps[module][rows], None if grad is None else grad[rows], heads).cpu()
        return self.cache[key]


def _lm_row(modules, cam, selection, row: int, num_queries: int) -> torch.Tensor:
    """The token's relevancy on the query positions (Q,) through the LM's chosen layers and heads."""
    if selection.uniform_lm:
        return torch.full((num_queries,), 1.0 / num_queries)
    heads = selection.lm_heads
    if "encoder" not in modules:
        cams = [cam(modules["self"][i], heads) for i in selection.lm_layers]
        return relevancy_row(cams, row)[:num_queries]
    encoder = [cam(m, None) for m in modules["encoder"]]  # every layer and head: not a choice
    decoder = [(cam(modules["self"][i], heads), cam(modules["cross"][i], heads)) for i in selection.lm_layers]
    return encoder_decoder_row(encoder, decoder, row, encoder[0].shape[-1])[:num_queries]


def _query_maps(qf_self, qf_cross, cam, selection, num_queries: int, model, view: int = 0) -> torch.Tensor:
    """Each query's relevancy on the patches (Q, P) (the CLS token dropped) through the Q-Former's pass over picture
    ``view``."""
    self_cams = [cam(m, None, view) for m in qf_self]  # every layer and head: how queries share what they read
    layer_of = [i for i, layer in enumerate(model.qformer.encoder.layer) if layer.has_cross_attention]
    cross = {layer_of[i]: cam(qf_cross[i], selection.qformer_heads, view) for i in selection.qformer_layers}
    return query_relevancy(self_cams, cross, num_queries)[:, 1:]
