"""VisionLanguageModel: image → ViT → Q-Former → projection → transformers LM, and its generation.

Notable features:
- the vision encoder, Q-Former and projection are our own modules (``vision.py``, ``qformer.py``); the
  LM stays a transformers model, so bitsandbytes layers and accelerate device maps work on it;
- the query embeddings go first, then the prompt (decoder-only: into the decoder; T5: into the encoder),
  and they are moved to whatever device the LM's input embeddings live on;
- a bounded, content-keyed cache of image tokens: follow-up questions about an image skip the ViT;
- ``ask`` / ``stream`` validate decoding options before any model work, and generation stops as soon
  as a streaming caller goes away.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import InstructBlipConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from . import decoding
from .attention import Explanation, explain_answer
from .embedding import text_ids
from .images import load_image
from .prompts import check_template, fit_history, normalize_history
from .qformer import QFormerModel
from .vision import VisionModel


@dataclass
class PreparedInputs:
    """Everything generation needs for one request (batch of 1)."""

    image: Image.Image  # the upright RGB picture, as the user gave it (size and orientation)
    pixel_values: torch.Tensor  # (1, 3, H, W)
    image_embeds: torch.Tensor  # (1, 1 + gh*gw, Dv)
    prompt: str  # the full text given to the LM (and to the Q-Former for InstructBLIP)
    input_ids: torch.Tensor  # (1, T) LM prompt ids, no image placeholders
    qformer_input_ids: torch.Tensor | None  # (1, Tq) InstructBLIP only
    max_new_tokens: int


class _StopOnEvent(StoppingCriteria):
    """Ends ``generate`` when ``event`` is set (the reader left), when the caller's ``external`` event is set (the
    user pressed Stop), or when the reader has not come back for the next piece within ``idle_timeout`` seconds
    (it went away without a word). Only ``event`` is ever set here: the caller's event stays the caller's."""

    def __init__(
        self, event: threading.Event, idle_timeout: float | None = None, external: threading.Event | None = None
    ) -> None:
        self.event = event
        self.external = external
        self.idle_timeout = idle_timeout
        self.suspended_since: float | None = None  # set while the reader holds a piece and has not asked again

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        since = self.suspended_since
        if self.idle_timeout is not None and since is not None and time.monotonic() - since > self.idle_timeout:
            self.event.set()
        stopped = self.event.is_set() or (self.external is not None and self.external.is_set())
        return torch.full((input_ids.shape[0],), stopped, dtype=torch.bool, device=input_ids.device)


class VisionLanguageModel(nn.Module):
    """An InstructBLIP or BLIP-2 model. Build it with ``blipdemo.load``."""

    def __init__(
        self,
        config,
        language_model: nn.Module | None = None,
        tokenizer=None,
        qformer_tokenizer=None,
        image_processor=None,
        cache_size: int = 16,
    ) -> None:
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
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.image_processor = image_processor
        self.cache_size = cache_size
        self.generation_time_limit: float | None = None  # seconds per generation, besides max_new_tokens
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.vision_calls = 0  # how often the ViT really ran (the cache's effect is visible in tests)
        self.load_info: dict = {}

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
        self.vision_calls += 1
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

    def _language_inputs(
        self, query_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[projected queries ; prompt embeddings] and the matching mask, on the LM's input device."""
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
        inputs_embeds, mask = self._language_inputs(query_embeds, input_ids, attention_mask)
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

    # ----------------------------------------------------------------------------------------------
    # Requests
    def preprocess(self, image) -> torch.Tensor:
        """Any accepted image input → ``pixel_values`` (1, 3, H, W) float32, by the checkpoint's processor."""
        return self._pixels(load_image(image))

    def _pixels(self, pil: Image.Image) -> torch.Tensor:
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens for one image, from the cache when this exact picture was seen recently."""
        key = hashlib.blake2b(pixel_values.numpy().tobytes(), digest_size=16).hexdigest()
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        with torch.inference_mode():
            embeds = self.encode_image(pixel_values)
        with self._cache_lock:
            self._cache[key] = embeds
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embeds

    def clear_cache(self) -> None:
        """Forget all cached image tokens."""
        with self._cache_lock:
            self._cache.clear()

    def _limits(self) -> tuple[int, int]:
        """(LM token limit incl. queries and answer, Q-Former text limit)."""
        text_cfg = self.config.text_config
        lm_limit = getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None)
        tok_limit = getattr(self.tokenizer, "model_max_length", None)
        if not lm_limit and tok_limit and tok_limit < 1_000_000:
            lm_limit = tok_limit  # T5: relative positions; the tokenizer states the trained length
        q_limit = self.config.qformer_config.max_position_embeddings
        return int(lm_limit or 1_000_000), int(q_limit)

    def _tokenize(self, tokenizer, text: str) -> list[int]:
        # User text is plain text: "<image>", "</s>" or "[SEP]" typed in a question never become control tokens.
        return tokenizer(text, split_special_tokens=True)["input_ids"]

    def prepare(
        self, image, prompt: str, history: Sequence = (), max_new_tokens: int = 256, *, template: bool = True
    ) -> PreparedInputs:
        """Validate and encode one request: image tokens (cached), prompt ids that fit every limit.

        ``template``: BLIP-2 wraps the prompt (stripped) in ``Question: … Answer:``; ``template=False`` sends it
        exactly as written (no strip, earlier turns as typed). InstructBLIP has no template: no effect there.
        """
        if self.language_model is None:
            raise ValueError(
                "This model was loaded without its language model (blipdemo.load_qformer): it embeds, it does "
                "not answer. Load it with blipdemo.load to ask questions."
            )
        if not isinstance(prompt, str):
            raise ValueError(f"The instruction must be text, got {type(prompt).__name__}.")
        check_template(template)
        if self.family == "instructblip" and not prompt.strip():
            raise ValueError("The instruction is empty: type a question or an instruction.")
        turns = normalize_history(history)
        pil = load_image(image)
        pixel_values = self._pixels(pil)
        lm_limit, q_limit = self._limits()
        num_queries = self.config.num_query_tokens
        # Decoder-only LMs hold queries, prompt and answer in one sequence; reserve room for the answer.
        reserve = 0 if self.is_encoder_decoder else min(max_new_tokens, lm_limit // 2)
        encoded: dict[str, list[int]] = {}

        def fits(text: str) -> bool:
            encoded["lm"] = self._tokenize(self.tokenizer, text)
            if num_queries + len(encoded["lm"]) + reserve > lm_limit:
                return False
            if self.family == "instructblip":
                encoded["q"] = self._tokenize(self.qformer_tokenizer, text)
                return len(encoded["q"]) <= q_limit
            return True

        # A prefix prompt is kept as typed: "a photo of " and "a photo of" tokenize differently, as users intend.
        as_written = self.family == "blip2" and not template
        text, _ = fit_history(self.family, prompt if as_written else prompt.strip(), turns, fits, template)
        if not self.is_encoder_decoder:
            max_new_tokens = min(max_new_tokens, lm_limit - num_queries - len(encoded["lm"]))
        return PreparedInputs(
            image=pil,
            pixel_values=pixel_values,
            image_embeds=self.image_embeddings(pixel_values),
            prompt=text,
            input_ids=torch.tensor([encoded["lm"]]),
            qformer_input_ids=torch.tensor([encoded["q"]]) if self.family == "instructblip" else None,
            max_new_tokens=max_new_tokens,
        )

    def embed(self, image, text: str | None = None) -> torch.Tensor:
        """The Q-Former's query outputs (num_query_tokens, hidden) for ``image``: a multimodal embedding.

        InstructBLIP: ``text`` is the instruction, embedded by the Q-Former exactly as in generation (None: the
        queries read the image alone). BLIP-2: the Q-Former of a generation checkpoint has no text embeddings,
        so ``text`` must be None (image-text and BLIP-Diffusion Q-Formers, ``blipdemo.load_qformer``, take text).
        The image tokens come from the same cache as generation's.
        """
        ids = None
        if text is not None:
            if self.family == "blip2":
                raise ValueError(
                    "This BLIP-2 checkpoint's Q-Former has no text embeddings (its queries never read text): "
                    "embed the image alone (text=None), or load a Q-Former made for text with blipdemo.load_qformer "
                    "(BLIP-2 image-text checkpoints such as Salesforce/blip2-itm-vit-g, or Salesforce/blipdiffusion)."
                )
            ids = text_ids(self.qformer_tokenizer, text, self._limits()[1])
        image_embeds = self.image_embeddings(self.preprocess(image))
        with torch.inference_mode():
            return self.query_outputs(image_embeds, ids)[0]

    def _generate_kwargs(self, inputs: PreparedInputs, options: dict) -> dict:
        """``generate`` arguments: query+prompt embeddings, mask, and (decoder-only) the matching ids."""
        query_embeds = self.query_outputs(inputs.image_embeds, inputs.qformer_input_ids)
        embeds, mask = self._language_inputs(query_embeds, inputs.input_ids, None)
        kwargs = dict(options, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=inputs.max_new_tokens)
        if "min_new_tokens" in kwargs:  # the answer room may have shrunk to fit the LM's limit
            kwargs["min_new_tokens"] = min(kwargs["min_new_tokens"], inputs.max_new_tokens)
        gen_cfg = self.language_model.generation_config
        if gen_cfg.pad_token_id is None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id or gen_cfg.eos_token_id or self.tokenizer.eos_token_id
        if self.generation_time_limit:
            kwargs["max_time"] = self.generation_time_limit
        if not self.is_encoder_decoder:
            # The reference passes ids for the query positions too (its <image> placeholders): generate's
            # repetition penalty and the returned sequence see the same ids here.
            placeholder = self.config.image_token_index
            if placeholder is None:
                placeholder = self.tokenizer.pad_token_id or 0
            ids = torch.cat([torch.full((1, self.config.num_query_tokens), placeholder), inputs.input_ids], dim=1)
            kwargs["input_ids"] = ids.to(embeds.device)
        return kwargs

    def _new_tokens(self, output: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if self.is_encoder_decoder:
            return output[0]
        return output[0, kwargs["input_ids"].shape[1] :]

    def _decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @torch.inference_mode()
    def _generate(
        self, image, prompt: str, history: Sequence, options: dict, template: bool = True
    ) -> tuple[PreparedInputs, torch.Tensor]:
        opts = decoding.validate(options)
        inputs = self.prepare(image, prompt, history, opts["max_new_tokens"], template=template)
        kwargs = self._generate_kwargs(inputs, opts)
        return inputs, self._new_tokens(self.language_model.generate(**kwargs), kwargs)

    def generate_ids(
        self, image, prompt: str, *, history: Sequence = (), template: bool = True, **options
    ) -> torch.Tensor:
        """Token ids of the answer (1-D, special tokens included); ``template`` as in ``ask``."""
        return self._generate(image, prompt, history, options, template)[1]

    def explain(
        self,
        image,
        prompt: str,
        *,
        history: Sequence = (),
        answer: str | None = None,
        template: bool = True,
        **options,
    ) -> Explanation:
        """``ask`` plus attention maps: per generated token and for the whole answer (see ``attention.py``).

        With ``answer`` (text the model already gave, e.g. a streamed answer), nothing is generated: the maps
        are those of the model producing exactly that answer (one teacher-forced pass). ``template`` as in ``ask``.
        """
        if answer is None:
            inputs, ids = self._generate(image, prompt, history, options, template)
            return explain_answer(self, inputs, ids, self._decode(ids), inputs.image)
        with torch.inference_mode():
            max_new_tokens = decoding.validate(options)["max_new_tokens"]
            inputs = self.prepare(image, prompt, history, max_new_tokens, template=template)
        text = answer.strip()
        return explain_answer(self, inputs, self._answer_ids(inputs, text), text, inputs.image)

    def _answer_ids(self, inputs: PreparedInputs, text: str) -> torch.Tensor:
        """Token ids of a given answer as the model would have produced them, EOS included."""
        if self.is_encoder_decoder:
            ids = self._tokenize(self.tokenizer, text)  # T5 appends EOS itself
            return torch.tensor(ids)
        # Tokenize prompt and answer together so the boundary is what generation saw (" red", not "red").
        prompt_ids = inputs.input_ids[0].tolist()
        joint = self._tokenize(self.tokenizer, inputs.prompt + " " + text)
        if joint[: len(prompt_ids)] == prompt_ids:
            ids = joint[len(prompt_ids) :]
        else:
            ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        eos = self.language_model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        return torch.tensor(ids + ([eos] if eos is not None else []))

    def ask(self, image, prompt: str, *, history: Sequence = (), template: bool = True, **options) -> str:
        """Answer ``prompt`` about ``image``; ``history`` holds earlier (question, answer) turns.

        ``template``: BLIP-2 wraps each round in its VQA template ``Question: … Answer:`` (the prompt stripped);
        ``template=False`` sends the prompt exactly as written — a prefix to complete ("a photo of") or a template
        of the user's own — with earlier turns as typed ("question answer", joined by spaces). InstructBLIP has no
        template, so the flag changes nothing there.
        """
        return self._decode(self.generate_ids(image, prompt, history=history, template=template, **options))

    def stream(
        self,
        image,
        prompt: str,
        *,
        history: Sequence = (),
        stop_event: threading.Event | None = None,
        idle_timeout: float | None = None,
        heartbeat: float | None = None,
        template: bool = True,
        **options,
    ) -> Iterator[str]:
        """Yield the answer in text increments as it is generated (beam search: the final text once).

        Generation runs in a worker thread; closing the iterator (or setting ``stop_event``) stops it. With
        ``idle_timeout``, generation also stops when the reader leaves a piece unread-after for that many seconds
        (a server whose client vanished without closing the iterator). With ``heartbeat``, an empty increment
        ``""`` comes whenever nothing new arrived for that many seconds (a beam search sends nothing until its
        end), so that a reader that can only stop between items (a ZeroGPU worker) can stop at any time.
        ``template`` as in ``ask``.
        """
        opts = decoding.validate(options)
        with torch.inference_mode():
            inputs = self.prepare(image, prompt, history, opts["max_new_tokens"], template=template)
        stop = threading.Event()  # set when the reader leaves; ends the generation thread
        criterion = _StopOnEvent(stop, idle_timeout, external=stop_event)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=heartbeat)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    kwargs = self._generate_kwargs(inputs, opts)
                    kwargs["stopping_criteria"] = StoppingCriteriaList([criterion])
                    if opts.get("num_beams", 1) > 1:  # beams change their mind: only the end is final
                        text = self._decode(self._new_tokens(self.language_model.generate(**kwargs), kwargs))
                        streamer.text_queue.put(text)
                        streamer.text_queue.put(streamer.stop_signal)
                    else:
                        self.language_model.generate(**kwargs, streamer=streamer)
            except BaseException as e:  # handed to the consumer thread below
                failure.append(e)
                streamer.end()

        thread = threading.Thread(target=work, name="blipdemo-generate", daemon=True)
        thread.start()
        started = False
        try:
            while True:
                try:
                    piece = next(streamer)
                except StopIteration:
                    break
                except queue.Empty:  # nothing new for `heartbeat` seconds: the heartbeat
                    piece = ""
                else:
                    if not started:
                        piece = piece.lstrip()
                        started = bool(piece)
                    if not piece:
                        continue
                criterion.suspended_since = time.monotonic()
                yield piece
                criterion.suspended_since = None
        finally:
            stop.set()
            thread.join()
        if failure:
            raise failure[0]
