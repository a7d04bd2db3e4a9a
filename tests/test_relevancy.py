"""Relevancy maps (``explain(..., method="relevancy")``): the propagation rules on hand-built tensors, gradients with
respect to the recorded attention that are those of the output (checked against transformers' eager attention), the
whole map against Chefer et al.'s rule run by plain autograd on transformers' own model, the hand-built pattern of
test_attention through both hops, threads, and 8-bit LMs."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from reference import reference
from test_attention import (
    ANSWER,
    PROMPT,
    QUERY_PATCH,
    STEP_QUERY,
    _check_hops,
    _rig_qformer,
    _rigged,
    _steer_lm,
)

import blipdemo
from blipdemo import lm_attention, relevancy
from blipdemo.attention import explain_answer
from blipdemo.qformer import recording
from blipdemo.relevancy import encoder_decoder_row, gradcam, normalize_rows, query_relevancy, relevancy_row
from blipdemo.teacher_forced import Stopped


def _cams(generator: torch.Generator, count: int, size: int, columns: int | None = None) -> list[torch.Tensor]:
    """Random non-negative maps (size, columns), rows summing to at most 1, as gradient-weighted attention is."""
    maps = [torch.rand(size, columns or size, generator=generator) for _ in range(count)]
    return [m / m.sum(-1, keepdim=True) * 0.8 for m in maps]


def test_gradcam_is_the_mean_over_heads_of_the_positive_part():
    attention = torch.tensor([[[[0.5, 0.5]], [[0.2, 0.8]], [[1.0, 0.0]]]])  # (1, 3 heads, 1, 2)
    gradient = torch.tensor([[[[2.0, -1.0]], [[1.0, 1.0]], [[-3.0, 5.0]]]])
    np.testing.assert_allclose(gradcam(attention, gradient, None), [[(1.0 + 0.2 + 0) / 3, (0 + 0.8 + 0) / 3]])
    np.testing.assert_allclose(gradcam(attention, gradient, [0, 2]), [[0.5, 0.0]])
    assert (gradcam(attention, None, None) == 0).all()  # the logit does not depend on this map


def test_relevancy_row_is_the_row_of_the_rolled_out_product():
    gen = torch.Generator().manual_seed(0)
    cams = _cams(gen, 3, 6)
    full = torch.eye(6)
    for cam in cams:  # R ← R + Ā R, layer by layer (Chefer et al., eq. 6–7)
        full = full + cam @ full
    for row in range(6):
        torch.testing.assert_close(relevancy_row(cams, row), full[row])
    assert relevancy_row([], 2).tolist() == [0, 0, 1]  # no layer chosen: the position itself only


def test_relevancy_reaches_a_query_through_an_intermediate_position():
    """Position 5 attends to position 3 in the last layer, position 3 attends to query 1 in the first: relevancy
    finds query 1 for position 5, the last layer's raw attention row does not (it sees position 3 only)."""
    first, last = torch.zeros(6, 6), torch.zeros(6, 6)
    first[3, 1] = 1.0
    last[5, 3] = 1.0
    row = relevancy_row([first, last], 5)
    assert row[1] == 1.0 and row[3] == 1.0 and row[[0, 2, 4]].sum() == 0
    assert last[5, :3].sum() == 0


def test_query_relevancy_follows_the_recurrence_and_mixes_queries():
    gen = torch.Generator().manual_seed(1)
    q, text, image = 3, 2, 5
    self_cams = _cams(gen, 3, q + text)
    cross = dict(zip([0, 2], _cams(gen, 2, q, image), strict=True))
    full = torch.zeros(q + text, image)
    for i, cam in enumerate(self_cams):  # R ← (I + Ā_self) R; R[:Q] += Ā_cross
        full = full + cam @ full
        if i in cross:
            full[:q] += cross[i]
    torch.testing.assert_close(query_relevancy(self_cams, cross, q), full[:q])
    # Query 0 reads nothing itself, but in the last layer attends to query 1, which read image token 4 before.
    self_cams = [torch.zeros(q + text, q + text) for _ in range(2)]
    self_cams[1][0, 1] = 1.0
    read = torch.zeros(q, image)
    read[1, 4] = 1.0
    assert query_relevancy(self_cams, {0: read}, q)[0].tolist() == [0, 0, 0, 0, 1.0]


def test_encoder_decoder_row_follows_the_recurrence():
    gen = torch.Generator().manual_seed(2)
    te, td = 5, 4
    encoder = _cams(gen, 2, te)
    decoder = list(zip(_cams(gen, 2, td), _cams(gen, 2, td, te), strict=True))
    r_ee = torch.eye(te)
    for cam in encoder:
        r_ee = r_ee + cam @ r_ee
    r_dd, r_de = torch.eye(td), torch.zeros(td, te)
    for self_cam, cross_cam in decoder:  # self-attention, then cross-attention to the encoder's outputs
        r_dd, r_de = r_dd + self_cam @ r_dd, r_de + self_cam @ r_de
        r_de = r_de + cross_cam @ r_ee
    for row in range(td):
        torch.testing.assert_close(encoder_decoder_row(encoder, decoder, row, te), r_de[row])


def test_rows_without_relevancy_become_uniform():
    x = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    assert normalize_rows(x).tolist() == [[0.25, 0.75], [0.5, 0.5]]


class _NoBatchingRule(torch.autograd.Function):
    """× 2, with a backward that reads a value (``.item()``): vmap cannot batch it, as some custom kernels."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2 * (1.0 if grad.sum().item() == grad.sum().item() else 0.0)


@pytest.mark.parametrize("batching", ["batched", "no batching rule"])
def test_gradients_of_several_targets_are_each_targets_own(batching):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 5, generator=gen, requires_grad=True)
    first = (x @ x.T).softmax(-1)  # (4, 4): a recorded map
    used = _NoBatchingRule.apply(first) if batching == "no batching rule" else first * 2
    second = (used @ x).tanh()  # (4, 5)
    unused = x * 3
    targets = torch.cat([second[:, 0], first[1:3, 2]])  # 6 logits
    records = [first, second, unused]
    grads = relevancy.gradients(targets, records)
    assert grads[2] is None
    for i, target in enumerate(targets):
        expected = torch.autograd.grad(target, records[:2], retain_graph=True)
        for g, e in zip(grads[:2], expected, strict=True):
            assert g.shape == (len(targets), *e.shape)
            torch.testing.assert_close(g[i], e)


def test_tokens_in_chunks_give_the_same_maps(loaded, images, monkeypatch):
    """A gradient budget of two tokens at a time: the same maps as all tokens in one batched pass."""
    vlm = loaded("instructblip", "llama")
    whole = vlm.explain(images[0], PROMPT, answer=ANSWER, method="relevancy")
    passes = []
    batched = relevancy.gradients
    monkeypatch.setattr(relevancy, "gradients", lambda t, r: passes.append(len(t)) or batched(t, r))
    monkeypatch.setattr(relevancy, "chunk_size", lambda records: 2)
    chunked = vlm.explain(images[0], PROMPT, answer=ANSWER, method="relevancy")
    assert passes == [2] * (len(whole.tokens) // 2) + [1] * (len(whole.tokens) % 2)
    np.testing.assert_allclose(chunked.token_maps, whole.token_maps, atol=1e-6)
    np.testing.assert_allclose(chunked.query_weights, whole.query_weights, atol=1e-6)


def test_a_stop_between_gradient_chunks_ends_the_pass(loaded, images, monkeypatch):
    """Two tokens' gradients at a time; Stop is set while the first chunk is taken: ``Stopped`` before the next chunk,
    and the thread is left as it was (gradients on, nothing recorded), so that the next map pass runs as ever."""
    vlm = loaded("instructblip", "llama")
    inputs = vlm.prepare(vlm.question(images[0], PROMPT))
    ids = vlm._answer_ids(inputs, ANSWER)
    assert len(ids) > 4, "the answer must need more than two chunks"
    whole = explain_answer(vlm, inputs, ids, ANSWER, method="relevancy")
    stop, passes = threading.Event(), []
    batched = relevancy.gradients

    def first_then_stop(targets, records):
        passes.append(len(targets))
        stop.set()  # the caller's Stop arrives while this chunk's backward pass runs
        return batched(targets, records)

    monkeypatch.setattr(relevancy, "gradients", first_then_stop)
    monkeypatch.setattr(relevancy, "chunk_size", lambda records: 2)
    with pytest.raises(Stopped):
        explain_answer(vlm, inputs, ids, ANSWER, method="relevancy", stop=stop)
    assert passes == [2], "no chunk may be taken after the stop"
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert getattr(lm_attention._local, "records", None) is None
    monkeypatch.setattr(relevancy, "gradients", batched)
    again = explain_answer(vlm, inputs, ids, ANSWER, method="relevancy", stop=threading.Event())
    np.testing.assert_allclose(again.token_maps, whole.token_maps, atol=1e-6)


def test_chunk_size_follows_the_gradient_budget(monkeypatch):
    records = [torch.zeros(1, 4, 10, 10), torch.zeros(1, 4, 5, 20)]  # 800 values: 3,200 bytes a target
    monkeypatch.setattr(relevancy, "GRADIENT_BUDGET", 10_000)
    assert relevancy.chunk_size(records) == 3
    monkeypatch.setattr(relevancy, "GRADIENT_BUDGET", 1_000)
    assert relevancy.chunk_size(records) == 1  # never less than one target


# ---------------------------------------------------------------------------------------------------------------
# Gradients: the recorded weights are the ones the output was computed from.


def _logit_and_weights(lm, embeds: torch.Tensor, decoder_ids: torch.Tensor | None, eager: bool):
    """(the logit of token 7 at the last position, the attention weights per module in layer order) — ours through
    ``lm_attention.recording(in_graph=True)``, or transformers' eager attention with ``output_attentions``."""
    kwargs = {"inputs_embeds": embeds}
    if decoder_ids is not None:
        kwargs["decoder_input_ids"] = decoder_ids
    with torch.enable_grad():
        if eager:
            out = lm(**kwargs, output_attentions=True)
            if decoder_ids is None:
                weights = list(out.attentions)
            else:
                weights = [*out.encoder_attentions, *out.decoder_attentions, *out.cross_attentions]
        else:
            groups = relevancy.lm_modules(lm)
            modules = [m for key in ("encoder", "self", "cross") for m in groups.get(key, [])]
            with lm_attention.recording(modules, in_graph=True) as records:
                out = lm(**kwargs)
            weights = [records[m][0] for m in modules]
        return out.logits[0, -1, 7], weights, out.logits.detach()


@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("blip2", "opt"), ("instructblip", "t5")])
def test_gradients_reach_the_recorded_lm_weights_as_in_eager_attention(checkpoint_dir, family, lm):
    """The same LM twice: our SDPA wrapper recording in the graph, and transformers' eager attention (which returns
    the very weights it multiplies the values with). Same logits, same weights, same gradients."""
    folder = checkpoint_dir(family, lm)
    ours = blipdemo.load(folder, dtype="float32").language_model
    eager = blipdemo.load(folder, dtype="float32").language_model
    eager.set_attn_implementation("eager")
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 9, ours.config.hidden_size if lm != "t5" else ours.config.d_model, generator=gen)
    decoder_ids = torch.tensor([[0, 5, 9, 12]]) if lm == "t5" else None
    logit, weights, logits = _logit_and_weights(ours, embeds, decoder_ids, eager=False)
    ref_logit, ref_weights, ref_logits = _logit_and_weights(eager, embeds, decoder_ids, eager=True)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert len(weights) == len(ref_weights) and all(w.requires_grad for w in weights)
    grads = torch.autograd.grad(logit, weights)
    ref_grads = torch.autograd.grad(ref_logit, ref_weights)
    for w, ref_w, g, ref_g in zip(weights, ref_weights, grads, ref_grads, strict=True):
        torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=1e-4)
        assert g.abs().max() > 0
    assert all(p.grad is None for p in ours.parameters()), "gradients are taken on activations only"


def test_qformer_output_is_computed_from_the_recorded_probabilities(loaded, images):
    vlm = loaded("instructblip", "llama")
    inputs = vlm.prepare(vlm.question(images[0], PROMPT))
    image_embeds = vlm.image_tokens([inputs]).clone()
    modules = vlm.model.qformer.self_attention_modules() + vlm.model.qformer.cross_attention_modules()
    with torch.inference_mode():
        plain = vlm.model.query_outputs(image_embeds, inputs.qformer_input_ids)
    with torch.enable_grad(), recording(modules, in_graph=True) as records:
        out = vlm.model.query_outputs(image_embeds, inputs.qformer_input_ids)
    torch.testing.assert_close(out.detach(), plain, atol=1e-5, rtol=1e-5)
    probs = [records[m][0] for m in modules]
    grads = torch.autograd.grad(out[0, 1].sum(), probs)
    assert all(g.abs().max() > 0 for g in grads), "every recorded map must be where the output came from"


# ---------------------------------------------------------------------------------------------------------------
# End to end.


@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("blip2", "opt"), ("instructblip", "t5")])
def test_relevancy_maps_are_probability_maps_and_text_equals_ask(loaded, images, family, lm):
    vlm = loaded(family, lm)
    grid = vlm.config.vision_config.image_size // vlm.config.vision_config.patch_size
    q = vlm.config.num_query_tokens
    requires_grad = [p.requires_grad for p in vlm.model.parameters()]
    e = vlm.explain(images[1], PROMPT, max_new_tokens=6, num_beams=1, method="relevancy")
    assert e.method == "relevancy" and e.text == vlm.ask(images[1], PROMPT, max_new_tokens=6, num_beams=1)
    assert e.token_maps.shape == (len(e.tokens), grid, grid) and e.image_map.shape == (grid, grid)
    assert e.query_maps.shape == (q, grid, grid) and e.query_weights.shape == (len(e.tokens), q)
    np.testing.assert_allclose(e.token_maps.sum(axis=(1, 2)), 1.0, atol=1e-9)
    np.testing.assert_allclose(e.query_maps.sum(axis=(1, 2)), 1.0, atol=1e-9)
    np.testing.assert_allclose(e.query_weights.sum(axis=1), 1.0, atol=1e-9)
    assert abs(e.image_map.sum() - 1) < 1e-9 and (e.token_maps >= 0).all()
    # Gradients were taken on activations only: nothing changed on the model, nothing left behind.
    assert [p.requires_grad for p in vlm.model.parameters()] == requires_grad
    assert all(p.grad is None for p in vlm.model.parameters())
    assert torch.is_grad_enabled()
    assert e.text == vlm.explain(images[1], PROMPT, max_new_tokens=6, num_beams=1).text


def _gradcam(attention: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
    """Chefer et al.'s Ā = E_heads[(∇A ⊙ A)⁺] of one map (1, heads, Tq, Tk) → (Tq, Tk), float64."""
    if gradient is None:  # the logit does not depend on this map (T5's encoder for no token, say): Ā = 0
        return torch.zeros(attention.shape[-2:], dtype=torch.float64)
    return (gradient.double() * attention.detach().double()).clamp_min(0).mean(1)[0]


def _to_one(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to sum 1; a row with no positive relevancy at all counts as uniform (no evidence either way)."""
    total = x.sum(-1, keepdim=True)
    return torch.where(total > 0, x / total.clamp_min(1e-300), 1.0 / x.shape[-1])


def _reference_relevancy(folder, image, answer: torch.Tensor, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(token maps (n, P), query weights (n, Q)) of ``answer`` (n,) teacher-forced after PROMPT, computed without
    blipdemo: transformers' own model (eager attention, every map it multiplied with returned in the autograd graph),
    one plain ``torch.autograd.grad`` per token, and the rule written out as whole matrices.

    Target of token t: its logit at the position that produced it, moved back by ``shift`` (``shift=1``: the
    off-by-one bug — the logit one position early, wrapping around for T5's first token).

    The rule (Chefer, Gur and Wolf 2021, with the variant blipdemo documents in relevancy.py's docstring):
    - every map A: Ā = mean over heads of (∇A ⊙ A) clamped at 0;
    - decoder-only LM: R = Π (I + Ā_l), R ← R + Ā_l R layer by layer; token t's row, query columns;
    - T5: R_ee = Π (I + Ā_enc); per decoder block R_dd ← R_dd + Ā_self R_dd, R_de ← R_de + Ā_self R_de, then
      R_de += Ā_cross R_ee; token t's row of R_de, query columns;
    - Q-Former: R (Q + T, 1 + P) = 0; per layer R ← R + Ā_self R, then (layers with cross-attention) R[:Q] += Ā_cross;
      the queries' rows, the CLS column dropped;
    - weights and each query's map scaled to sum 1, the token's map Σ_q w_q C_q scaled to sum 1."""
    model, processor, family = reference(folder)
    # A fresh copy with eager attention: SDPA returns no weights, and the cached reference serves other tests.
    model = type(model).from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    text = PROMPT if family == "instructblip" else f"Question: {PROMPT} Answer:"
    inputs = processor(images=image, text=text, return_tensors="pt")
    queries = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()  # where the queries sit
    qformer = {k: inputs[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in inputs}
    # The Q-Former's probabilities, taken from its attention modules' own outputs: BLIP-2's get_image_features passes
    # no output_attentions to the Q-Former, and InstructBLIP's "attentions" mixes self- and cross-attention.
    layers = model.qformer.encoder.layer
    records: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        for kind, block in (("self", layer.attention), ("cross", getattr(layer, "crossattention", None))):
            if block is not None and (kind == "self" or layer.has_cross_attention):
                keep = lambda module, args, out, key=(kind, i): records.__setitem__(key, out[1])  # noqa: E731
                hooks.append(block.attention.register_forward_hook(keep))
    n = len(answer)
    with torch.enable_grad():
        try:
            if model.config.use_decoder_only_language_model:
                ids = torch.cat([inputs["input_ids"], answer[None, :-1]], dim=1)  # [queries ; prompt ; answer[:-1]]
                out = model(
                    pixel_values=inputs["pixel_values"],
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    output_attentions=True,
                    **qformer,
                )
                lm = [list(out.language_model_outputs.attentions)]
                rows = torch.arange(n) + inputs["input_ids"].shape[1] - 1  # the position before token t produced it
            else:
                start = torch.tensor([model.config.text_config.decoder_start_token_id])
                out = model(
                    pixel_values=inputs["pixel_values"],
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    decoder_input_ids=torch.cat([start, answer[:-1]])[None],
                    output_attentions=True,
                    **qformer,
                )
                lm_out = out.language_model_outputs
                lm = [list(lm_out.encoder_attentions), list(lm_out.decoder_attentions), list(lm_out.cross_attentions)]
                rows = torch.arange(n)  # decoder position t produced token t
        finally:
            for hook in hooks:
                hook.remove()
        self_maps = [records["self", i] for i in range(len(layers))]
        cross_layers = [i for i in range(len(layers)) if ("cross", i) in records]
        maps = self_maps + [records["cross", i] for i in cross_layers] + [a for group in lm for a in group]
        weights, query_maps = [], []
        for t in range(n):
            target = out.logits[0, (rows[t] - shift) % out.logits.shape[1], answer[t]]
            grads = torch.autograd.grad(target, maps, retain_graph=True, allow_unused=True)
            cams = [_gradcam(a, g) for a, g in zip(maps, grads, strict=True)]
            q_self, rest = cams[: len(layers)], cams[len(layers) :]
            q_cross, lm_cams = dict(zip(cross_layers, rest, strict=False)), rest[len(cross_layers) :]
            num_queries = len(queries)
            r = torch.zeros(q_self[0].shape[0], records["cross", cross_layers[0]].shape[-1], dtype=torch.float64)
            for i, cam in enumerate(q_self):
                r = r + cam @ r
                if i in q_cross:
                    r[:num_queries] += q_cross[i]
            query_maps.append(r[:num_queries, 1:])
            if len(lm) == 1:
                r = torch.eye(out.logits.shape[1], dtype=torch.float64)
                for cam in lm_cams:
                    r = r + cam @ r
                weights.append(r[rows[t], queries])
            else:
                encoder, decoder = lm_cams[: len(lm[0])], lm_cams[len(lm[0]) :]
                r_ee = torch.eye(encoder[0].shape[0], dtype=torch.float64)
                for cam in encoder:
                    r_ee = r_ee + cam @ r_ee
                r_dd, r_de = torch.eye(n, dtype=torch.float64), torch.zeros(n, len(r_ee), dtype=torch.float64)
                half = len(decoder) // 2  # decoder self-attention per block, then cross-attention per block
                for self_cam, cross_cam in zip(decoder[:half], decoder[half:], strict=True):
                    r_dd, r_de = r_dd + self_cam @ r_dd, r_de + self_cam @ r_de
                    r_de = r_de + cross_cam @ r_ee
                weights.append(r_de[rows[t], queries])
    w, c = _to_one(torch.stack(weights)), _to_one(torch.stack(query_maps))  # (n, Q), (n, Q, P)
    return _to_one(torch.einsum("tq,tqp->tp", w, c)).numpy(), w.numpy()


@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("blip2", "opt"), ("instructblip", "t5")])
def test_relevancy_maps_equal_chefer_et_al_on_the_transformers_model(
    checkpoint_dir, loaded, images, monkeypatch, family, lm
):
    """The whole map, end to end, against ``_reference_relevancy`` (no blipdemo code in it) on the same checkpoint
    and the same teacher-forced answer; and the off-by-one target: a different map, which is what our code gives when
    it is made to take each token's logit one position early (so this test catches that bug)."""
    folder = checkpoint_dir(family, lm)
    vlm = loaded(family, lm)
    tokenizer = reference(folder)[1].tokenizer
    answer = torch.tensor(tokenizer(" red green", add_special_tokens=False)["input_ids"])  # no EOS: all visible
    expected, expected_weights = _reference_relevancy(folder, images[0], answer, shift=0)
    off_by_one, _ = _reference_relevancy(folder, images[0], answer, shift=1)
    assert np.abs(off_by_one - expected).max() > 0.05, "the two targets must give maps this test can tell apart"
    assert (expected.max(1) - expected.min(1)).min() > 0.01, "maps with something to compare (not flat)"

    inputs = vlm.prepare(vlm.question(images[0], PROMPT))
    ours = explain_answer(vlm, inputs, answer, "red green", method="relevancy")
    assert len(ours.tokens) == len(answer) > 1
    # atol as asked; rtol 5e-4: T5's longer path (encoder rollout times decoder rollout, then normalized) amplifies
    # float32 rounding to ~1.3e-5 on maps ~0.1 with AVX-512 kernels, 2.5e-5 on 0.113 with an AVX2-only CPU's
    # (2026-12-07). A wrong target or hop differs by > 0.05 (checked above).
    tol = {"atol": 1e-5, "rtol": 5e-4}
    np.testing.assert_allclose(ours.token_maps.reshape(len(answer), -1), expected, **tol)
    np.testing.assert_allclose(ours.query_weights, expected_weights, **tol)

    forced = relevancy.teacher_forced

    def one_early(*args, **kwargs):  # the bug: logits[row] read where logits[row - 1] is (the rows themselves kept)
        f = forced(*args, **kwargs)
        return dataclasses.replace(f, logits=f.logits.roll(1, dims=1))

    monkeypatch.setattr(relevancy, "teacher_forced", one_early)
    buggy = explain_answer(vlm, inputs, answer, "red green", method="relevancy").token_maps.reshape(len(answer), -1)
    np.testing.assert_allclose(buggy, off_by_one, **tol)
    assert not np.allclose(buggy, expected, **tol)


def _unit_gradients(monkeypatch) -> None:
    """Every gradient replaced by ones: gradient-weighted attention becomes attention, and relevancy the rollout of
    the hand-built pattern (whose real gradients have random signs in a random model)."""
    unit = lambda targets, records: [torch.ones(len(targets), *r.shape) for r in records]  # noqa: E731
    monkeypatch.setattr(relevancy, "gradients", unit)


@pytest.mark.parametrize("family,lm", [("instructblip", "llama"), ("blip2", "opt"), ("instructblip", "t5")])
def test_relevancy_follows_the_hand_built_pattern_through_both_hops(checkpoint_dir, images, monkeypatch, family, lm):
    """test_attention's rig (query q reads patch QUERY_PATCH[q]; token t is produced looking at query STEP_QUERY[t])
    with unit gradients: relevancy must carry each token to its query and each query to its patch — through the
    right rows and columns, T5's encoder and decoder included."""
    vlm = blipdemo.load(checkpoint_dir(family, lm), dtype="float32")
    inputs = vlm.prepare(vlm.question(images[0], PROMPT))
    _rig_qformer(vlm, inputs)
    first_row = 0 if vlm.is_encoder_decoder else vlm.config.num_query_tokens + inputs.input_ids.shape[1] - 1
    _steer_lm(monkeypatch, vlm, first_row)
    _unit_gradients(monkeypatch)
    e = vlm.explain(images[0], PROMPT, answer=ANSWER, method="relevancy")
    # Lower shares than raw attention's: relevancy also follows the random self-attention that mixes queries (in
    # the Q-Former) and positions (in the LM), which raw attention ignores; the peaks must stay where they were put.
    _check_hops(e, len(QUERY_PATCH), map_share=0.4, weight_share=0.4)
    for t, m in enumerate(e.token_maps):
        expected = QUERY_PATCH[STEP_QUERY[t % len(STEP_QUERY)]]
        assert m.flatten().argmax() == expected and m.flatten()[expected] > 0.3, (t, m.flatten().round(3))


def test_relevancy_layer_and_head_choice(checkpoint_dir, images, monkeypatch):
    """As test_attention's choice tests, with unit gradients: only the rigged Q-Former layer/head and the steered LM
    layer/head carry the pattern; the others do not."""
    vlm = blipdemo.load(checkpoint_dir("instructblip", "llama"), dtype="float32")
    rig = {"qformer_layers": [1], "qformer_heads": [2], "lm_layers": [1], "lm_heads": [3]}
    _, explain = _rigged(vlm, images, monkeypatch, **rig)
    _unit_gradients(monkeypatch)
    chosen = explain(method="relevancy", qformer_layers=[-1], qformer_heads=[2], lm_layers=[1], lm_heads=[-1])
    _check_hops(chosen, len(QUERY_PATCH))
    flat = explain(method="relevancy", qformer_layers=[0], lm_layers=[1], lm_heads=[3])
    np.testing.assert_allclose(flat.query_maps, 1 / flat.query_maps[0].size, rtol=1e-5)
    targets = [STEP_QUERY[t % len(STEP_QUERY)] for t in range(len(chosen.tokens))]
    for options in ({"lm_layers": [0]}, {"lm_layers": [1], "lm_heads": [0, 1]}):
        other = explain(method="relevancy", **options)
        assert (other.query_weights.argmax(1) != targets).any(), other.query_weights.round(2)


def test_relevancy_in_one_thread_leaves_other_threads_on_the_wrapped_function(loaded, images, monkeypatch):
    """While one thread makes relevancy maps (the LM's output computed from its weights, in the graph), a generation
    in another thread runs the wrapped SDPA as ever: same answer, and no weights computed in that thread. The
    relevancy pass waits, inside its first in-graph attention call, until the generation has taken two steps (which
    waits, after its first steps, until the relevancy pass has begun)."""
    vlm = loaded("instructblip", "llama")
    alone = vlm.ask(images[2], PROMPT, max_new_tokens=24, min_new_tokens=24, num_beams=1)
    lm = vlm.language_model
    forward, steps, begun, caller = lm.forward, [], threading.Event(), threading.current_thread()

    def slow(*args, **kwargs):  # 20 ms a step; the generation's fourth on only once the relevancy pass is under way
        steps.append(threading.current_thread())
        if steps[-1] is not caller and len(steps) > 3:
            begun.wait(timeout=30)
        threading.Event().wait(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(lm, "forward", slow)
    answer = vlm.start(vlm.question(images[2], PROMPT, max_new_tokens=24, min_new_tokens=24, num_beams=1))
    pieces = []
    reader = threading.Thread(target=lambda: pieces.extend(answer), daemon=True)
    reader.start()
    for _ in range(3000):  # until the generation has begun
        if steps:
            break
        threading.Event().wait(0.01)
    generating = steps[0]
    made = lambda: sum(t is generating for t in steps)  # noqa: E731
    in_graph, weights, computed, overlap = lm_attention._in_graph, lm_attention._weights, [], []

    def in_graph_spy(*args, **kwargs):
        computed.append(threading.current_thread())
        if not overlap:  # the first in-graph call of the relevancy pass: let the generation step meanwhile
            start = made()
            begun.set()
            for _ in range(500):
                if made() >= start + 2:
                    break
                threading.Event().wait(0.01)
            overlap.append(made() - start)
        return in_graph(*args, **kwargs)

    def weights_spy(*args, **kwargs):
        computed.append(threading.current_thread())
        return weights(*args, **kwargs)

    monkeypatch.setattr(lm_attention, "_in_graph", in_graph_spy)
    monkeypatch.setattr(lm_attention, "_weights", weights_spy)
    e = vlm.explain(images[0], PROMPT, answer="red and green", method="relevancy")
    reader.join(timeout=60)
    assert "".join(pieces).strip() == alone
    assert overlap[0] >= 2 and made() > overlap[0], "the maps were not made during the generation"
    assert computed and all(t is threading.current_thread() for t in computed)
    assert abs(e.image_map.sum() - 1) < 1e-9


@pytest.mark.parametrize("quantization", [None, "bitsandbytes"])
def test_relevancy_with_8bit_lm(checkpoint_dir, images, quantization):
    """PyTorch's int8 layers (the CPU default) and bitsandbytes' 8-bit matmul pass gradients to their inputs:
    relevancy works on an 8-bit LM."""
    folder = checkpoint_dir("instructblip", "llama", lm_width=64)
    vlm = blipdemo.load(folder, dtype="bfloat16", load_in_8bit=True, quantization=quantization)
    e = vlm.explain(images[1], PROMPT, max_new_tokens=4, num_beams=1, method="relevancy")
    assert e.text == vlm.ask(images[1], PROMPT, max_new_tokens=4, num_beams=1)
    assert abs(e.image_map.sum() - 1) < 1e-9 and np.isfinite(e.token_maps).all()
    assert len({row.tobytes() for row in e.query_weights}) > 1, "the tokens' weights differ: gradients came through"


def test_relevancy_refuses_4bit_lms_on_the_cpu(checkpoint_dir, images):
    """bitsandbytes' 4-bit CPU kernel has no backward (PyTorch only warns; every map would be flat): a clear error
    before any model work. Raw attention maps still work there. (PyTorch's int4 layers, the CPU default, pass
    gradients: tests/test_cpu_quantization.py.)"""
    folder = checkpoint_dir("instructblip", "llama", lm_width=64)
    vlm = blipdemo.load(folder, dtype="bfloat16", load_in_4bit=True, quantization="bitsandbytes")
    with pytest.raises(ValueError, match="4-bit layers on the CPU"):
        vlm.explain(images[1], PROMPT, max_new_tokens=4, num_beams=1, method="relevancy")
    e = vlm.explain(images[1], PROMPT, max_new_tokens=4, num_beams=1)
    assert abs(e.image_map.sum() - 1) < 1e-9


def test_relevancy_without_any_gradient_is_an_error(loaded, images, monkeypatch):
    vlm = loaded("instructblip", "llama")
    zeros = lambda targets, records: [torch.zeros(len(targets), *r.shape) for r in records]  # noqa: E731
    monkeypatch.setattr(relevancy, "gradients", zeros)
    with pytest.raises(RuntimeError, match="no gradient of the answer's logits reached any attention map"):
        vlm.explain(images[0], PROMPT, answer="red", method="relevancy")
