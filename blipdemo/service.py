"""Service: what ``blipdemo.load`` returns — the model (``model.VisionLanguageModel``) and everything serving needs.

- tokenizers and image processor; ``question`` checks a request against the model and makes it one value (a
  ``question.Question``: the picture decoded once, instruction, history, template, decoding options, map selection),
  so a bad request fails alone and before model work; ``prepare`` encodes a question in its caller's thread (the
  prompt that fits the limits, the answer's room, pixels only when the image tokens are not cached);
- a bounded, content-keyed cache of image tokens: follow-up questions about an image skip the ViT;
- ``ask`` / ``stream`` / ``explain`` / ``embed``, and the forward call (``service(...)`` is the model's forward);
- requests decode through ``batching.run_batch``: in the caller's thread (``max_batch_size=1``, the default), or,
  with ``max_batch_size > 1``, merged with concurrent requests by a ``batching.Scheduler``.
Nothing a request does changes state another request depends on: stops are per request, and the attention maps
record weights in their own thread (``lm_attention``) without switching the LM's attention implementation.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from transformers import TextIteratorStreamer

from . import lm_attention
from .attention import Explanation, MapSelection, explain_selections, map_selection
from .batching import PreparedInputs, Request, Scheduler, SchedulerError, after_fork_in_child, run_batch
from .cpu_linear import PLAIN, routes_for
from .decoding import DecodingOptions
from .embedding import text_ids
from .heatmap import reduced
from .images import load_image
from .look_closer import LookCloser, look
from .model import VisionLanguageModel
from .prompts import check_template, fit_history, normalize_history
from .question import Picture, Question
from .teacher_forced import Stopped

MAX_BATCH_SIZE = 64
STREAM_POLL = 1.0  # seconds: how often a stream with no heartbeat looks whether its scheduler is still alive


def check_max_batch_size(value) -> int:
    """``value`` if it is a whole number of rows from 1 to MAX_BATCH_SIZE, else a ValueError that says so."""
    if type(value) is not int or not 1 <= value <= MAX_BATCH_SIZE:
        raise ValueError(f"max_batch_size must be an integer from 1 to {MAX_BATCH_SIZE}, got {value!r}.")
    return value


class Answer:
    """One generation in progress: iterate for its text increments; ``ids`` and ``inputs`` serve ``explain`` after.

    Closing the iterator (or leaving the loop) stops it; so does the caller's ``stop_event``.
    """

    def __init__(self, service: Service, request: Request, heartbeat: float | None = None) -> None:
        self.service = service
        self.request = request
        self.inputs = request.inputs
        self.heartbeat = heartbeat  # seconds: an empty increment whenever nothing new came for this long

    @property
    def ids(self) -> torch.Tensor:
        """The generated token ids (1-D, special tokens included), once the iteration has ended."""
        return torch.tensor(self.request.ids, dtype=torch.long)

    def __iter__(self) -> Iterator[str]:
        request, streamer = self.request, self.request.streamer
        scheduler = self.service.scheduler
        thread = None
        if scheduler is None:
            thread = threading.Thread(target=run_batch, args=(self.service, [request]), name="blipdemo-generate")
            thread.daemon = True
            thread.start()
        else:
            scheduler.submit(request)
        started = False
        try:
            while True:
                try:
                    piece = next(streamer)
                except StopIteration:
                    break
                except queue.Empty:  # nothing new for a while: a heartbeat, if asked for; is anyone still serving us?
                    if request.stopped() and scheduler is not None and not request.done.is_set():
                        scheduler.withdraw(request)  # stopped while it waits in the queue: it leaves now
                        continue  # (finished: the stream ends)
                    if scheduler is not None and not scheduler.alive() and not request.done.is_set():
                        scheduler.withdraw(request)
                        raise SchedulerError(
                            "The model's scheduler stopped before this answer ended; ask again."
                        ) from None
                    if not self.heartbeat:
                        continue
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
            elif not request.done.is_set():
                scheduler.withdraw(request)  # still waiting in the queue: it leaves now
        if scheduler is not None:
            scheduler.wait(request)
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
        after_fork_in_child(self, Service._fresh_cache_lock)
        self.max_batch_size = max_batch_size
        self.scheduler = None
        if max_batch_size > 1:
            self.scheduler = Scheduler(self, max_batch_size)
        # How the decode loop computes float32 linear layers (``cpu_linear``): measured at load, once per process,
        # never by a request.
        self.cpu_linear = PLAIN
        if model.language_model is not None:
            lm_attention.install(model.language_model)  # once, before any request: maps never switch it later
            self.cpu_linear = routes_for(model.language_model)
        self.load_info["cpu_linear"] = self.cpu_linear.describe()  # what the measurement chose, for operators

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
        return self._pixels(load_image(image))  # no Picture: its content key would be work for nothing here

    def _pixels(self, pil) -> torch.Tensor:
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    def _pixels_of(self, picture: Picture) -> torch.Tensor:
        """(1, 3, H, W): the model's input of a picture (made from its full image, or kept from it)."""
        return picture.pixel_values if picture.pixel_values is not None else self._pixels(picture.image)

    def kept(self, picture: Picture, max_side: int) -> Picture:
        """A light copy of ``picture`` to keep for later requests about it (a visitor's session holds its last
        answer for an hour; a 12-megapixel photo is 36 MB): the image reduced to ``max_side`` (aspect kept) for
        display, and the model's input made now from the full image, so that the image tokens made from the copy
        equal the full picture's (cached or not by then)."""
        small = reduced(picture.image, max_side)  # the overlay's own rule: painted at max_side, it is not resized again
        if small is picture.image:
            return picture
        return Picture(small, picture.key, self._pixels_of(picture))

    def cached(self, picture: Picture) -> bool:
        """Whether the picture's image tokens are in the cache now."""
        with self._cache_lock:
            return picture.key in self._cache

    def image_tokens(self, inputs: Sequence[PreparedInputs | Picture]) -> torch.Tensor:
        """Image tokens (B, 1 + gh*gw, Dv) for prepared requests (or pictures): cached ones from the cache, the
        others through the ViT together (one call), then cached. Pixels are made only for those not cached."""
        pictures = [item if isinstance(item, Picture) else item.question.picture for item in inputs]
        found: dict[str, torch.Tensor] = {}
        with self._cache_lock:
            for picture in pictures:
                if picture.key in self._cache:
                    self._cache.move_to_end(picture.key)
                    found[picture.key] = self._cache[picture.key]
        missing: dict[str, torch.Tensor] = {}
        for item, picture in zip(inputs, pictures, strict=True):
            if picture.key not in found and picture.key not in missing:
                pixels = None if isinstance(item, Picture) else item.pixel_values
                missing[picture.key] = pixels if pixels is not None else self._pixels_of(picture)
        if missing:
            with torch.inference_mode():
                self.vision_calls += 1
                embeds = self.model.encode_image(torch.cat(list(missing.values())))  # (M, N, Dv)
            with self._cache_lock:
                for key, row in zip(missing, embeds, strict=True):
                    found[key] = self._cache[key] = row[None]
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return torch.cat([found[picture.key] for picture in pictures])

    def _fresh_cache_lock(self) -> None:
        """In a forked child: another thread may have held the image cache's lock at the fork."""
        self._cache_lock = threading.Lock()

    def clear_cache(self) -> None:
        """Forget all cached image tokens."""
        with self._cache_lock:
            self._cache.clear()

    # ----------------------------------------------------------------------------------------------
    # Requests
    def question(
        self,
        image,
        instruction: str,
        *,
        history: Sequence = (),
        template: bool = True,
        maps: MapSelection | dict | None = None,
        look_closer: bool | dict | LookCloser = False,
        **decoding,
    ) -> Question:
        """Check a request against this model and make it the one value that travels down (``question.Question``).

        ``image``: a path, PIL image, bytes, an array or a ``Picture`` (decoded here, once). ``history``: earlier
        (question, answer) turns or chat messages. ``template`` as in ``ask``. ``maps``: None (no maps), or the map
        options of ``attention.map_selection`` as a dict (method, layers and heads of each hop), or a
        ``MapSelection``. ``look_closer``: False, True, or a dict of ``look_closer.LookCloser`` fields (view, map,
        box, min_box, steps).
        ``decoding``: ``DecodingOptions`` fields. Every error a user can cause is raised here
        (``ValueError`` naming the parameter and its range, ``ImageError``, ``TypeError`` for an unknown option),
        the cheap checks before the image is decoded.
        """
        if self.model.language_model is None:
            raise ValueError(
                "This model was loaded without its language model (blipdemo.load_qformer): it embeds, it does "
                "not answer. Load it with blipdemo.load to ask questions."
            )
        if not isinstance(instruction, str):
            raise ValueError(f"The instruction must be text, got {type(instruction).__name__}.")
        check_template(template)
        if self.family == "instructblip" and not instruction.strip():
            raise ValueError("The instruction is empty: type a question or an instruction.")
        turns = tuple(normalize_history(history))
        closer = LookCloser.of(look_closer)
        options = DecodingOptions.of(decoding)
        if isinstance(maps, dict):
            maps = map_selection(self.model, **maps)
        elif maps is not None and not isinstance(maps, MapSelection):
            raise ValueError(f"maps must be None, a dict of map options or a MapSelection, got {maps!r}")
        return Question(Picture.of(image), instruction, turns, template, options, maps, closer)

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

    def prepare(self, question: Question, stop: threading.Event | None = None) -> PreparedInputs:
        """Encode a checked question: the prompt ids that fit every limit (earlier turns dropped, oldest first, until
        they do; an instruction that alone does not fit is a ValueError) and the answer's room; the picture's pixels
        only when its image tokens are not cached. With ``look_closer``, the look too (``look_closer.look``: model
        work, here in the caller's thread; ``stop`` set ends it with ``teacher_forced.Stopped``), unless the
        question carries one already (``question.crop``).

        BLIP-2 wraps the instruction (stripped) in ``Question: … Answer:``; ``template=False`` sends it exactly as
        written (no strip, earlier turns as typed). InstructBLIP has no template.
        """
        lm_limit, q_limit = self._limits()
        num_queries = self.config.num_query_tokens
        if question.look_closer is not None and question.look_closer.view == "both":
            num_queries *= 2  # the original's queries, then the crop's
        max_new_tokens = question.decoding.max_new_tokens
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
        instruction = question.instruction
        as_written = self.family == "blip2" and not question.template
        text, _ = fit_history(
            self.family, instruction if as_written else instruction.strip(), question.history, fits, question.template
        )
        if not self.is_encoder_decoder:
            max_new_tokens = min(max_new_tokens, lm_limit - num_queries - len(encoded["lm"]))
        picture = question.picture
        inputs = PreparedInputs(
            question=question,
            prompt=text,
            input_ids=torch.tensor([encoded["lm"]]),
            qformer_input_ids=torch.tensor([encoded["q"]]) if self.family == "instructblip" else None,
            max_new_tokens=max_new_tokens,
            # Resizing a large photo is work for the caller's thread, not the batch's (which other rows wait on).
            pixel_values=None if self.cached(picture) else self._pixels_of(picture),
        )
        if question.crop is not None:
            inputs.crop = question.crop
        elif question.look_closer is not None:
            try:
                inputs.crop = look(self, inputs, question.look_closer, stop)
            except Stopped:  # stopped before its look: the request ends at once, as any stopped request does
                inputs.crop = None
        crop = inputs.crop
        if crop is not None and crop.picture.pixel_values is None and not self.cached(crop.picture):
            # The crop's pixels too, here: the batch's thread only runs the ViT on them.
            inputs.crop = replace(crop, picture=replace(crop.picture, pixel_values=self._pixels_of(crop.picture)))
        return inputs

    def _request(self, inputs: PreparedInputs, stop_event=None, streamer=None) -> Request:
        return Request(
            inputs=inputs,
            alone=inputs.question.decoding.decodes_alone(self.model.language_model.generation_config),
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
                self.scheduler.wait(request)  # bounded: an error if the scheduler's thread dies
            finally:
                request.stop.set()  # a caller interrupted while waiting: its row ends, nobody else's
                self.scheduler.withdraw(request)
        if request.error is not None:
            raise request.error
        return request

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Answer ids → text (special tokens skipped, stripped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def answer_ids(self, question: Question) -> tuple[PreparedInputs, torch.Tensor]:
        """(the prepared inputs, the answer's token ids (1-D, special tokens included)) for a checked question."""
        inputs = self.prepare(question)
        return inputs, self.generate_prepared(inputs)

    def generate_prepared(self, inputs: PreparedInputs) -> torch.Tensor:
        """The answer's token ids (1-D, special tokens included) for inputs ``prepare`` made (look-closer included)."""
        request = self._submit_and_wait(self._request(inputs))
        return torch.tensor(request.ids, dtype=torch.long)

    def generate_ids(
        self, image, prompt: str, *, history: Sequence = (), template: bool = True, look_closer=False, **options
    ) -> torch.Tensor:
        """Token ids of the answer (1-D, special tokens included); arguments as in ``ask``."""
        question = self.question(image, prompt, history=history, template=template, look_closer=look_closer, **options)
        return self.answer_ids(question)[1]

    def ask(
        self, image, prompt: str, *, history: Sequence = (), template: bool = True, look_closer=False, **options
    ) -> str:
        """Answer ``prompt`` about ``image``; ``history`` holds earlier (question, answer) turns.

        ``template``: BLIP-2 wraps each round in its VQA template ``Question: … Answer:`` (the prompt stripped);
        ``template=False`` sends the prompt exactly as written — a prefix to complete ("a photo of") or a template
        of the user's own — with earlier turns as typed ("question answer", joined by spaces). InstructBLIP has no
        template, so the flag changes nothing there. ``look_closer``: True answers from a crop of the full-size picture
        around where the model looks for this question (``look_closer.py``; a dict of ``LookCloser`` fields picks a
        variant); a small picture is answered whole. ``options``: decoding options (see ``DecodingOptions``).
        """
        ids = self.generate_ids(image, prompt, history=history, template=template, look_closer=look_closer, **options)
        return self.decode(ids)

    def start(
        self, question: Question, *, stop_event: threading.Event | None = None, heartbeat: float | None = None
    ) -> Answer:
        """Prepare a checked question now (an instruction too long for the model raises here) and return its
        ``Answer`` to iterate; after the iteration, ``answer.inputs`` and ``answer.ids`` let ``explain_prepared`` map
        it without preparing again. ``stop_event`` and ``heartbeat`` as in ``stream``."""
        inputs = self.prepare(question, stop_event)
        # The stream is read with a timeout even without heartbeats: a reader never waits on a dead scheduler.
        timeout = heartbeat or STREAM_POLL
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=False, skip_special_tokens=True, timeout=timeout)
        return Answer(self, self._request(inputs, stop_event, streamer), heartbeat)

    def stream(
        self,
        image,
        prompt: str,
        *,
        history: Sequence = (),
        stop_event: threading.Event | None = None,
        heartbeat: float | None = None,
        template: bool = True,
        look_closer=False,
        **options,
    ) -> Iterator[str]:
        """Yield the answer in text increments as it is generated (beam search: the final text once).

        Closing the iterator (or setting ``stop_event``, which is only watched) stops this generation and no other.
        With ``heartbeat``, an empty increment ``""`` comes whenever nothing new arrived for that many seconds (a beam
        search sends nothing until its end), so that a reader that can only stop between items (a ZeroGPU worker)
        can stop at any time. ``template`` and ``look_closer`` as in ``ask`` (the look happens before the first piece).
        """
        question = self.question(image, prompt, history=history, template=template, look_closer=look_closer, **options)
        yield from self.start(question, stop_event=stop_event, heartbeat=heartbeat)

    def explain(
        self,
        image,
        prompt: str,
        *,
        history: Sequence = (),
        answer: str | None = None,
        template: bool = True,
        look_closer=False,
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
        any model work. ``look_closer`` as in ``ask``: the maps then cover the picture and the crop
        (``Explanation.crop`` says where it looked closer, and how much of each word came from the crop).
        """
        maps = {
            "method": method,
            "qformer_layers": qformer_layers,
            "qformer_heads": qformer_heads,
            "lm_layers": lm_layers,
            "lm_heads": lm_heads,
        }
        question = self.question(
            image, prompt, history=history, template=template, maps=maps, look_closer=look_closer, **options
        )
        if answer is None:
            inputs, ids = self.answer_ids(question)
            return self.explain_prepared(inputs, ids)
        inputs = self.prepare(question)
        text = answer.strip()
        return self.explain_prepared(inputs, self._answer_ids(inputs, text), text)

    def explain_prepared(
        self,
        inputs: PreparedInputs,
        ids: torch.Tensor,
        text: str | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> Explanation:
        """Maps for answer ``ids`` to the prepared ``inputs`` (from ``start`` or ``prepare``), as their question's
        ``maps`` selection says (None: the default, attention over every layer and head): no new preparation, the
        image tokens from the cache. ``stop`` (set: Stop, or the client left) ends the pass with ``Stopped``."""
        selection = inputs.question.maps or map_selection(self.model)
        text = self.decode(ids) if text is None else text
        return explain_selections(self, inputs, ids, text, [selection], stop=stop)[0]

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
        image_embeds = self.image_tokens([Picture.of(image)])
        with torch.inference_mode():
            return self.model.query_outputs(image_embeds, ids)[0]
