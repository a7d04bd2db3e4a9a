"""The decode loop: rows join a running batch at any step and leave it the step they end; no prompt is computed twice.

Our own loop over the transformers LM (as gpt-fast and nanochat keep generation outside the model), with
transformers' own caches and logits processors:

- ``RunningBatch.admit`` prefills the newcomers of a step together — their [queries ; prompt] embeddings once — and
  merges their key/value rows into the running batch's cache (``kv_cache.merge``: self-attention left-padded so
  every row's newest position is the last column; T5's encoder outputs and cross-attention right-padded);
- ``RunningBatch.step`` feeds every row its newest token: one forward for the batch, the attention mask covering each
  row's real columns and (decoder-only) explicit positions, ``cumsum(mask) - 1`` as ``generate`` computes them;
- each row picks its token as ``generate`` would for that row alone: float32 logits of the last position, then the
  row's own ``LogitsProcessorList`` (built by transformers from the row's options: repetition penalty, min new
  tokens, temperature, top-k, top-p, and whatever the checkpoint's generation config adds) over the ids ``generate``
  would see (decoder-only: [image placeholders ; prompt ; answer], T5: [start ; answer]), then argmax, or a draw from
  the row's own generator (its ``seed``) or the global one;
- a row ends at EOS, its max_new_tokens, its Stop switch or its time limit; its request is finished at once (its
  stream closes) and its cache rows are dropped before the next step; columns that are padding for every row left
  are trimmed.

Beam search does not come here: its beams change their mind and reorder the cache, so it runs through ``generate``
alone (``batching.run_alone``).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, EncoderDecoderCache, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

from . import kv_cache
from .cpu_linear import linear_mode


@dataclass(eq=False)
class Row:
    """One request's place in the running batch."""

    request: object  # batching.Request
    sequence: torch.Tensor  # (1, T) the ids generate's processors would see for this row alone
    processors: LogitsProcessorList
    sample: bool
    eos: frozenset[int]
    generator: torch.Generator | None = None  # the row's own draws (its seed); None: torch's global generator


def eos_ids(generation_config) -> list[int]:
    """The generation config's EOS ids as a list (none, one or several)."""
    eos = generation_config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, list | tuple) else [eos]


def row_config(lm, request, prompt_length: int, device):
    """The generation config ``generate`` would make for this request alone, and its logits processors."""
    options = request.options.kwargs()
    options.pop("seed", None)
    options["max_new_tokens"] = request.inputs.max_new_tokens  # the room the LM's limit leaves
    if options.get("min_new_tokens"):
        options["min_new_tokens"] = min(options["min_new_tokens"], request.inputs.max_new_tokens)
    # transformers' own preparation (private, but it is what makes generate's processors; a drift shows as a
    # difference from generate in the tests, which compare with the transformers reference).
    config, _ = lm._prepare_generation_config(None, **options)
    lm._prepare_special_tokens(config, True, device=device, batch_size=1)
    config.max_length = config.max_new_tokens + prompt_length
    processors = lm._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=prompt_length,
        encoder_input_ids=None,
        prefix_allowed_tokens_fn=None,
        logits_processor=LogitsProcessorList(),
        device=device,
        model_kwargs={},
    )
    return config, processors


class RunningBatch:
    """The rows decoding on the model now, their shared cache and masks. Not thread-safe: one thread runs it (the
    scheduler's, or a lone request's caller)."""

    def __init__(self, service) -> None:
        self.service = service
        self.lm = service.model.language_model
        self.encoder_decoder = service.model.is_encoder_decoder
        self.rows: list[Row] = []
        self.cache = None  # DynamicCache / EncoderDecoderCache, (B, H, L, Dh) per layer
        self.mask: torch.Tensor | None = None  # (B, L) 1 where the cache column is a real position of the row
        self.tokens: torch.Tensor | None = None  # (B,) each row's newest token, not yet fed to the model
        self.encoder: torch.Tensor | None = None  # T5: (B, S, D) encoder outputs, right-padded
        self.encoder_mask: torch.Tensor | None = None  # T5: (B, S)
        # transformers 5.x renamed the forward's ``past_key_values`` to ``cache`` (the old name warns, then goes).
        renamed = "cache" in inspect.signature(type(self.lm).forward).parameters
        self.cache_kwarg = "cache" if renamed else "past_key_values"
        self.steps = 0  # decode steps so far (the batching benchmark's staggered arrivals count them)

    def __len__(self) -> int:
        return len(self.rows)

    # ----------------------------------------------------------------------------------------------
    def admit(self, requests: list) -> None:
        """Prefill ``requests`` together, hand out their first tokens and merge the rows that go on into the batch.
        Never raises an ``Exception``: a failed prefill ends those requests with the error (the batch goes on)."""
        live = []
        for request in requests:
            if request.stopped():  # stopped while it waited
                request.finish()
            else:
                live.append(request)
        if not live:
            return
        try:
            with torch.inference_mode():
                newcomers = self._prefill(live)
        except BaseException as e:
            for request in live:
                request.finish(e)
            if not isinstance(e, Exception):
                raise
            return
        try:
            with torch.inference_mode():
                self._merge(newcomers)
        except BaseException as e:  # out of memory while copying the caches: the batch may be half-merged
            for row in newcomers.rows:
                row.request.finish(e)
            self.fail(e)
            if not isinstance(e, Exception):
                raise

    def step(self) -> None:
        """One token for every row. Never raises an ``Exception``: a failed step ends every row with the error."""
        if not self.rows:
            return
        try:
            with torch.inference_mode():
                self._step()
        except BaseException as e:
            self.fail(e)
            if not isinstance(e, Exception):
                raise

    def fail(self, error: BaseException) -> None:
        """End every row with ``error`` and empty the batch."""
        for row in self.rows:
            row.request.finish(error)
        self._reset()

    # ----------------------------------------------------------------------------------------------
    def _prefill(self, requests: list) -> RunningBatch:
        """The newcomers as a batch of their own: prompts computed once, first tokens chosen and handed out."""
        from .batching import model_inputs  # the one builder of [queries ; prompt] embeddings

        lm = self.lm
        embeds, mask, ids = model_inputs(self.service, requests)  # (B, P, D), (B, P), decoder-only: (B, P)
        new = RunningBatch(self.service)
        now = time.monotonic()
        for request in requests:
            if request._deadline is None and request.time_limit:
                request._deadline = now + request.time_limit
        if self.encoder_decoder:
            config = lm.generation_config
            start = config.decoder_start_token_id
            if start is None:
                start = lm.config.decoder_start_token_id
            decoder_ids = torch.full((len(requests), 1), start, dtype=torch.long, device=embeds.device)
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            with linear_mode(self.service.cpu_linear):  # the LM only: image tokens stay what every other path makes
                out = lm(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    decoder_input_ids=decoder_ids,
                    use_cache=True,
                    **{self.cache_kwarg: cache},
                )
            new.encoder, new.encoder_mask = out.encoder_last_hidden_state, mask
            new.mask = torch.ones((len(requests), 1), dtype=mask.dtype, device=mask.device)
            sequences = [decoder_ids[i : i + 1] for i in range(len(requests))]  # [start]
        else:
            positions = mask.cumsum(-1) - 1
            positions.masked_fill_(mask == 0, 1)
            cache = DynamicCache()
            extra = {"logits_to_keep": 1} if lm._supports_logits_to_keep() else {}
            with linear_mode(self.service.cpu_linear):
                out = lm(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **{self.cache_kwarg: cache},
                    **extra,
                )
            new.mask = mask
            sequences = [ids[i : i + 1, mask[i].bool()] for i in range(len(requests))]  # [placeholders ; prompt]
        new.cache = cache  # filled in place by the forward
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)  # (B, V), as generate takes them
        del out
        for request, sequence in zip(requests, sequences, strict=True):
            sequence = sequence.to(logits.device)
            config, processors = row_config(lm, request, sequence.shape[1], logits.device)
            generator = None
            if request.options.seed is not None:
                generator = torch.Generator(device=logits.device).manual_seed(request.options.seed)
            new.rows.append(
                Row(request, sequence, processors, bool(config.do_sample), frozenset(eos_ids(config)), generator)
            )
        new.tokens = self._choose(new.rows, logits)
        new._hand_out()
        return new

    def _step(self) -> None:
        lm = self.lm
        device = self.mask.device
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=device)], 1)
        tokens = self.tokens.to(device)[:, None]  # (B, 1)
        with linear_mode(self.service.cpu_linear):
            if self.encoder_decoder:
                out = lm(
                    encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder),
                    attention_mask=self.encoder_mask,
                    decoder_input_ids=tokens,
                    decoder_attention_mask=self.mask,
                    use_cache=True,
                    **{self.cache_kwarg: self.cache},
                )
            else:
                positions = (self.mask.cumsum(-1) - 1)[:, -1:]  # (B, 1): each row's own position, no padding
                out = lm(
                    input_ids=tokens,
                    attention_mask=self.mask,
                    position_ids=positions,
                    use_cache=True,
                    **{self.cache_kwarg: self.cache},
                )
        self.steps += 1  # self.cache grew in place
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)  # (B, V)
        del out
        self.tokens = self._choose(self.rows, logits)
        self._hand_out()

    @staticmethod
    def _choose(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token (B,), as generate picks it for that row alone; appended to the row's ids."""
        chosen = []
        for i, row in enumerate(rows):
            scores = row.processors(row.sequence, logits[i : i + 1])  # (1, V)
            if row.sample:
                probs = F.softmax(scores, dim=-1)
                token = torch.multinomial(probs, num_samples=1, generator=row.generator)[:, 0]
            else:
                token = torch.argmax(scores, dim=-1)
            row.sequence = torch.cat([row.sequence, token[:, None]], dim=-1)
            chosen.append(token)
        return torch.cat(chosen)

    def _hand_out(self) -> None:
        """Give each row's newest token to its request (ids and stream); end and drop the rows that are over."""
        now = time.monotonic()
        newest = self.tokens.tolist()
        keep = []
        for i, row in enumerate(self.rows):
            request = row.request
            request.ids.append(newest[i])
            if request.streamer is not None:
                request.streamer.put(torch.tensor([newest[i]]))
            ended = (
                newest[i] in row.eos
                or len(request.ids) >= request.inputs.max_new_tokens
                or request.stopped()
                or (request._deadline is not None and now > request._deadline)
            )
            if ended:
                request.finish()
            else:
                keep.append(i)
        if len(keep) < len(self.rows):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        """Only the rows ``keep`` go on: their cache rows, masks and tokens; columns now padding for all dropped."""
        if not keep:
            self._reset()
            return
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(0).nonzero()[0])  # leading columns that no kept row uses
        cross = None
        if self.encoder_decoder:
            encoder_mask = self.encoder_mask.index_select(0, index)
            cross = int(encoder_mask.any(0).nonzero()[-1]) + 1  # trailing encoder columns that no kept row uses
            self.encoder = self.encoder.index_select(0, index.to(self.encoder.device))[:, :cross]
            self.encoder_mask = encoder_mask[:, :cross]
        self.cache = kv_cache.select(self.cache, keep, first, cross)
        self.mask = mask[:, first:]
        self.tokens = self.tokens.index_select(0, index.to(self.tokens.device))

    def _merge(self, new: RunningBatch) -> None:
        """Take ``new``'s rows (already prefilled) into this batch."""
        if not new.rows:
            return
        if not self.rows:
            self.rows, self.cache, self.mask, self.tokens = new.rows, new.cache, new.mask, new.tokens
            self.encoder, self.encoder_mask = new.encoder, new.encoder_mask
            return
        self.cache = kv_cache.merge(self.cache, new.cache)
        width = max(self.mask.shape[1], new.mask.shape[1])
        self.mask = torch.cat([_pad_columns(self.mask, width, left=True), _pad_columns(new.mask, width, left=True)])
        if self.encoder_decoder:
            width = max(self.encoder.shape[1], new.encoder.shape[1])
            self.encoder = torch.cat([_pad_rows(self.encoder, width), _pad_rows(new.encoder, width)])
            self.encoder_mask = torch.cat(
                [_pad_columns(self.encoder_mask, width, left=False), _pad_columns(new.encoder_mask, width, left=False)]
            )
        self.tokens = torch.cat([self.tokens, new.tokens.to(self.tokens.device)])
        self.rows = self.rows + new.rows

    def _reset(self) -> None:
        self.rows, self.cache, self.mask, self.tokens = [], None, None, None
        self.encoder = self.encoder_mask = None


def _pad_columns(mask: torch.Tensor, width: int, *, left: bool) -> torch.Tensor:
    """(B, L) → (B, width) with zeros on the left or the right."""
    missing = width - mask.shape[1]
    return F.pad(mask, (missing, 0) if left else (0, missing)) if missing else mask


def _pad_rows(states: torch.Tensor, width: int) -> torch.Tensor:
    """(B, S, D) → (B, width, D), zero positions on the right."""
    missing = width - states.shape[1]
    return F.pad(states, (0, 0, 0, missing)) if missing else states
