"""Service: what ``blipdemo.load`` returns — the model (``model.VisionLanguageModel``) and everything serving needs.

- tokenizers and image processor; ``prepare`` checks and encodes one request in its caller's thread (image,
  prompt, history that fits the limits, decoding options), so a bad request fails alone and before model work;
- a bounded, content-keyed cache of image tokens: follow-up questions about an image skip the ViT;
- ``ask`` / ``stream`` / ``explain`` / ``embed``, and the forward call (``service(...)`` is the model's forward);
- requests decode through ``batching.run_batch``: in the caller's thread (``max_batch_size=1``, the default), or,
  with ``max_batch_size > 1``, merged with concurrent requests by a ``batching.Scheduler``.
Nothing a request does changes state another request depends on: stops are per request, and the attention maps
record weights in their own thread (``lm_attention``) without switching the LM's attention implementation.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
from transformers import TextIteratorStreamer

from . import lm_attention
from .attention import Explanation, explain_answer, map_selection
from .batching import PreparedInputs, Request, Scheduler, run_batch
from .decoding import DecodingOptions
from .embedding import text_ids
from .images import load_image
from .model import VisionLanguageModel
from .prompts import check_template, fit_history, normalize_history

MAX_BATCH_SIZE = 64


def check_max_batch_size(value) -> int:
    """``value`` if it is a whole number of rows from 1 to MAX_BATCH_SIZE, else a ValueError that says so."""
    if type(value) is not int or not 1 <= value <= MAX_BATCH_SIZE:
        raise ValueError(f"max_batch_size must be an integer from 1 to {MAX_BATCH_SIZE}, got {value!r}.")
    return value


class Answer:
    """One generation in progress: iterate for its text increments; ``ids`` and ``inputs`` serve ``explain`` after.

    Closing the iterator (or leaving the loop) stops it; so does the caller's ``stop_event``.
    """

    def __init__(self, service: Service, request: Request) -> None:
        self.service = service
        self.request = request
        self.inputs = request.inputs

    @property
    def ids(self) -> torch.Tensor:
        """The generated token ids (1-D, special tokens included), once the iteration has ended."""
        return torch.tensor(self.request.ids, dtype=torch.long)

    def __iter__(self) -> Iterator[str]:
        request, streamer = self.request, self.request.streamer
        thread = None
        if self.service.scheduler is None:
            thread = threading.Thread(target=run_batch, args=(self.service, [request]), name="blipdemo-generate")
            thread.daemon = True
            thread.start()
        else:
            self.service.scheduler.submit(request)
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
                yield piece
        finally:
            request.stop.set()  # ends this row only; its batch goes on for the others
            if thread is not None:
                thread.join()
        request.done.wait()
        if request.error is not None:
            raise request.error


class Service:
    """An InstructBLIP or BLIP-2 model served: build it with ``blipdemo.load``."""

    def __init__(
        self,
        model: VisionLanguageModel,
        tokenizer,
        qformer_tokenizer=None,
        image_processor=None,
        *,
        cache_size: int = 16,
        max_batch_size: int = 1,
        load_info: dict | None = None,
    ) -> None:
        check_max_batch_size(max_batch_size)
        self.model = model
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.image_processor = image_processor
        self.cache_size = cache_size
        self.generation_time_limit: float | None = None  # seconds per generation, besides max_new_tokens
        self.load_info: dict = load_info or {}
        self.vision_calls = 0  # how often the ViT really ran (the cache's effect is visible in tests)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.max_batch_size = max_batch_size
        self.scheduler = None
        if max_batch_size > 1:
            self.scheduler = Scheduler(lambda batch, regroup: run_batch(self, batch, regroup), max_batch_size)
        if model.language_model is not None:
            lm_attention.install(model.language_model)  # once, before any request: maps never switch it later

    # ----------------------------------------------------------------------------------------------
    # The model
    @property
    def config(self):
        """The checkpoint's transformers config."""
        return self.model.config

    @property
    def family(self) -> str:
        """ "instructblip" or "blip2"."""
        return self.model.family

    @property
    def is_encoder_decoder(self) -> bool:
        return self.model.is_encoder_decoder

    @property
    def language_model(self):
        """The transformers LM (bitsandbytes layers and accelerate hooks included)."""
        return self.model.language_model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def __call__(self, *args, **kwargs):
        """The model's forward (see ``VisionLanguageModel.forward``)."""
        return self.model(*args, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # Images
    def preprocess(self, image) -> torch.Tensor:
        """Any accepted image input → ``pixel_values`` (1, 3, H, W) float32, by the checkpoint's processor."""
        return self._pixels(load_image(image))

    def _pixels(self, pil) -> torch.Tensor:
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    @staticmethod
    def _key(pixel_values: torch.Tensor) -> str:
        return hashlib.blake2b(pixel_values.numpy().tobytes(), digest_size=16).hexdigest()

    def image_tokens(self, inputs: Sequence[PreparedInputs]) -> torch.Tensor:
        """Image tokens (B, 1 + gh*gw, Dv) for prepared requests: cached ones from the cache, the others through the
        ViT together (one call), then cached."""
        found: dict[str, torch.Tensor] = {}
        with self._cache_lock:
            for item in inputs:
                if item.image_key in self._cache:
                    self._cache.move_to_end(item.image_key)
                    found[item.image_key] = self._cache[item.image_key]
        missing: dict[str, torch.Tensor] = {}
        for item in inputs:
            if item.image_key not in found:
                missing.setdefault(item.image_key, item.pixel_values)
        if missing:
            with torch.inference_mode():
                self.vision_calls += 1
                embeds = self.model.encode_image(torch.cat(list(missing.values())))  # (M, N, Dv)
            with self._cache_lock:
                for key, row in zip(missing, embeds, strict=True):
                    found[key] = self._cache[key] = row[None]
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return torch.cat([found[item.image_key] for item in inputs])

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens (1, 1 + gh*gw, Dv) for one image's ``pixel_values``, from the cache when seen recently."""
        item = PreparedInputs(None, pixel_values, self._key(pixel_values), "", torch.zeros(1, 0), None, 0)
        return self.image_tokens([item])

    def clear_cache(self) -> None:
        """Forget all cached image tokens."""
        with self._cache_lock:
            self._cache.clear()

    # ----------------------------------------------------------------------------------------------
    # Requests
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
        """Validate and encode one request: the picture's pixels and the prompt ids that fit every limit.

        ``template``: BLIP-2 wraps the prompt (stripped) in ``Question: … Answer:``; ``template=False`` sends it
        exactly as written (no strip, earlier turns as typed). InstructBLIP has no template: no effect there.
        """
        if self.model.language_model is None:
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
            image_key=self._key(pixel_values),
            prompt=text,
            input_ids=torch.tensor([encoded["lm"]]),
            qformer_input_ids=torch.tensor([encoded["q"]]) if self.family == "instructblip" else None,
            max_new_tokens=max_new_tokens,
        )

    def _request(self, inputs: PreparedInputs, options: DecodingOptions, stop_event=None, streamer=None) -> Request:
        return Request(
            inputs=inputs,
            options=options,
            key=options.batch_key(self.model.language_model.generation_config),
            external_stop=stop_event,
            time_limit=self.generation_time_limit,
            streamer=streamer,
        )

    def _submit_and_wait(self, request: Request) -> Request:
        if self.scheduler is None:
            run_batch(self, [request])
        else:
            self.scheduler.submit(request)
            try:
                request.done.wait()
            finally:
                request.stop.set()  # a caller interrupted while waiting: its row ends, nobody else's
        if request.error is not None:
            raise request.error
        return request

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Answer ids → text (special tokens skipped, stripped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate_ids(
        self, image, prompt: str, *, history: Sequence = (), template: bool = True, **options
    ) -> torch.Tensor:
        """Token ids of the answer (1-D, special tokens included); ``template`` as in ``ask``."""
        return self._generate(image, prompt, history, DecodingOptions.of(options), template)[1]

    def _generate(
        self, image, prompt: str, history: Sequence, options: DecodingOptions, template: bool = True
    ) -> tuple[PreparedInputs, torch.Tensor]:
        inputs = self.prepare(image, prompt, history, options.max_new_tokens, template=template)
        request = self._submit_and_wait(self._request(inputs, options))
        return inputs, torch.tensor(request.ids, dtype=torch.long)

    def ask(self, image, prompt: str, *, history: Sequence = (), template: bool = True, **options) -> str:
        """Answer ``prompt`` about ``image``; ``history`` holds earlier (question, answer) turns.

        ``template``: BLIP-2 wraps each round in its VQA template ``Question: … Answer:`` (the prompt stripped);
        ``template=False`` sends the prompt exactly as written — a prefix to complete ("a photo of") or a template
        of the user's own — with earlier turns as typed ("question answer", joined by spaces). InstructBLIP has no
        template, so the flag changes nothing there. ``options``: decoding options (see ``DecodingOptions``).
        """
        return self.decode(self.generate_ids(image, prompt, history=history, template=template, **options))

    def start(
        self,
        image,
        prompt: str,
        *,
        history: Sequence = (),
        options: DecodingOptions | dict | None = None,
        template: bool = True,
        stop_event: threading.Event | None = None,
        heartbeat: float | None = None,
    ) -> Answer:
        """Check and prepare a request now (errors raise here), and return its ``Answer`` to iterate; after the
        iteration, ``answer.inputs`` and ``answer.ids`` let ``explain_prepared`` map it without preparing again."""
        options = DecodingOptions.of(options)
        inputs = self.prepare(image, prompt, history, options.max_new_tokens, template=template)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=False, skip_special_tokens=True, timeout=heartbeat)
        return Answer(self, self._request(inputs, options, stop_event, streamer))

    def stream(
        self,
        image,
        prompt: str,
        *,
        history: Sequence = (),
        stop_event: threading.Event | None = None,
        heartbeat: float | None = None,
        template: bool = True,
        **options,
    ) -> Iterator[str]:
        """Yield the answer in text increments as it is generated (beam search: the final text once).

        Closing the iterator (or setting ``stop_event``, which is only watched) stops this generation and no other.
        With ``heartbeat``, an empty increment ``""`` comes whenever nothing new arrived for that many seconds (a beam
        search sends nothing until its end), so that a reader that can only stop between items (a ZeroGPU worker)
        can stop at any time. ``template`` as in ``ask``.
        """
        answer = self.start(
            image,
            prompt,
            history=history,
            options=options,
            template=template,
            stop_event=stop_event,
            heartbeat=heartbeat,
        )
        yield from answer

    def explain(
        self,
        image,
        prompt: str,
        *,
        history: Sequence = (),
        answer: str | None = None,
        template: bool = True,
        method: str = "attention",
        qformer_layers: Sequence[int] | int | None = None,
        qformer_heads: Sequence[int] | int | None = None,
        lm_layers: Sequence[int] | int | None = None,
        lm_heads: Sequence[int] | int | None = None,
        **options,
    ) -> Explanation:
        """``ask`` plus attention maps: per generated token and for the whole answer (see ``attention.py``).

        With ``answer`` (text the model already gave, e.g. a streamed answer), nothing is generated: the maps
        are those of the model producing exactly that answer (one teacher-forced pass). ``template`` as in ``ask``.
        ``method``: "attention" (raw attention) or "relevancy" (gradient-weighted, ``relevancy.py``); the layers and
        heads of each hop: None = all (their mean), else a list of indices (negative from the end); checked before
        any model work.
        """
        maps = {
            "method": method,
            "qformer_layers": qformer_layers,
            "qformer_heads": qformer_heads,
            "lm_layers": lm_layers,
            "lm_heads": lm_heads,
        }
        map_selection(self.model, **maps)  # a bad choice fails here, before generation
        decoding = DecodingOptions.of(options)
        if answer is None:
            inputs, ids = self._generate(image, prompt, history, decoding, template)
            return self.explain_prepared(inputs, ids, **maps)
        inputs = self.prepare(image, prompt, history, decoding.max_new_tokens, template=template)
        text = answer.strip()
        return self.explain_prepared(inputs, self._answer_ids(inputs, text), text, **maps)

    def explain_prepared(
        self,
        inputs: PreparedInputs,
        ids: torch.Tensor,
        text: str | None = None,
        *,
        method: str = "attention",
        qformer_layers: Sequence[int] | int | None = None,
        qformer_heads: Sequence[int] | int | None = None,
        lm_layers: Sequence[int] | int | None = None,
        lm_heads: Sequence[int] | int | None = None,
    ) -> Explanation:
        """Maps for answer ``ids`` to the prepared request ``inputs`` (from ``start`` or ``prepare``): no new
        preparation, the image tokens from the cache. The map options as in ``explain``."""
        return explain_answer(
            self,
            inputs,
            ids,
            self.decode(ids) if text is None else text,
            method=method,
            qformer_layers=qformer_layers,
            qformer_heads=qformer_heads,
            lm_layers=lm_layers,
            lm_heads=lm_heads,
        )

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

    # ----------------------------------------------------------------------------------------------
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
            return self.model.query_outputs(image_embeds, ids)[0]
