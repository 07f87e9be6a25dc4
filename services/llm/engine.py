"""The generation engine: validates a request, builds its prompt, decodes with continuous batching.

Scheduling is iteration-level (continuous batching, as in Orca and vLLM). One worker thread
runs the scheduler loop while there is work; each iteration
- admits waiting requests (FIFO) while the running batch has room (`max_batch_size`) and this
  iteration's prefill budget lasts (`max_prefill_tokens`, at least one request): each is
  prefilled alone (causal, or with a 4D mask where the preset's media spans attend
  bidirectionally, `services.models.lm.attention`), takes its first token at once and joins the
  running batch of its adapter version (`services.llm.batching`: left-padded KV cache, per-row
  positions and mask);
- then runs one decode step of every running batch (one forward for all its rows), and each
  row samples with its own parameters and stop conditions; a finished, failed or cancelled
  row leaves at once without stalling the others.
So a request that arrives while others decode streams its first token after one iteration,
not after they finish. Requests of different adapter versions decode in separate batches,
stepped in turn every iteration, so none starves.

Text deltas travel back to the event loop through an asyncio.Queue per request. A request is
validated on the event loop before it queues, so a bad request fails at once and never touches
the model. A cancelled request (the consumer of `generate()` went away) sets a flag the loop
checks after each of its tokens. The engine holds at most `max_queued` requests (waiting or
running); one more is refused at once (back-pressure).

Adapter versions (`services.llm.adapter_manager`): a request resolves and holds its version
before it queues and decodes with that version's connectors and LoRA to the end, whatever
the current pointer does meanwhile. Model mutations for new versions (LoRA injection) run on
the same worker thread between two iterations (`run_pending`); each batch selects its
version's LoRA before its step.

Sampling (`services.llm.sampling`): a request's unset sampling fields take the preset's
`generation:` values (`prepare`). Each step applies the penalties of the batch's penalised rows
in one go, then each row samples with its own parameters. A reply ends at end-of-sequence, a
stop string (the request's, then the preset's or else the template's) or a stop token id (the
request's and the preset's); the preset's text rules (`GenerationSpec`) decide what of its
last tokens, the stop included, reaches the text, and whether it is stripped.

Time tokens (presets with `heads.timestamps`, `services.models.lm.time_matching`): a request with
media of the heads' modality decodes through a `TimedDecode`, which matches every position
against the frames; a sampled time token is written into the reply as the matched frame's
time in seconds ("12", "12.5") and reported as a `Timestamp` on the event carrying that text.
A request's time parts (E.T. Bench's `<vid>` in a question, with its source time) render as
the time token, and at the prefill each one's input embedding gets the LLM embedding of the
frame at that time added (`timestamps.add_source_frames`, shared with training); a preset
without the heads, or a request without media of their modality, is refused.

Serving renders the preset's `llm.inference_template` where it has one (legacy NExT-GPT's
demo form), else `llm.template`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import torch

from services.common.content import MediaFeatures, MediaPart, Part, TextPart, Timestamp, Turn
from services.common.errors import (
    CancelledError,
    InvalidArgumentError,
    ModalmeshError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from services.common.presets import Preset
from services.llm.adapter_manager import AdapterManager, AdapterVersion, WorkerCalls
from services.llm.batching import BatchCache
from services.llm.detokenize import IncrementalDetokenizer, StopMatcher, Strip
from services.llm.domain import (
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    ModalityInfo,
    ModelInfo,
    OutputInfo,
    OutputSignal,
    Usage,
)
from services.llm.metrics import LLMMetrics
from services.llm.sampling import DEFAULT_MAX_TOKENS, Penalties, Sampler, SamplingParams, apply_penalties
from services.llm.signals import SignalCapture, check_requested, output_signal_ids
from services.models.lm.attention import prefill_attention_mask
from services.models.lm.loading import LoadedModel, load_model
from services.models.lm.time_matching import TimedDecode
from services.models.lm.timestamps import add_source_frames, format_seconds, source_frames
from services.models.prompt.builder import Prompt, request_prompt
from services.models.prompt.templates import get_template, turn_text

logger = logging.getLogger(__name__)

_Item = GenerationEvent | BaseException | None


@dataclass(eq=False)
class PreparedRequest:
    """A validated request with its prompt, ready for the decode loop."""

    request: GenerationRequest
    prompt: Prompt
    version: AdapterVersion  # resolved when prepared; kept to the end
    budget: int  # tokens it may generate: max_tokens capped by the context left
    stop: tuple[str, ...] = ()  # the request's stop strings, then the preset's (or the template's)
    stop_token_ids: frozenset[int] = frozenset()  # the request's and the preset's
    instructions: tuple[str, ...] = ()  # per media item, the text of the user turn holding it
    outputs: tuple[str, ...] = ()  # output modalities asked for (appended if not emitted)
    cancel: threading.Event = field(default_factory=threading.Event)
    admitted: float = field(default_factory=time.perf_counter)  # for queue time and TTFT

    @property
    def adapter(self) -> str:
        """ "name@version" serving this request."""
        return self.version.ref


def media_instructions(turns: Sequence[Turn[Any]], time_token: str = "") -> tuple[str, ...]:
    """Per media item, in the order its part appears, the text parts of the turn that holds
    it, its time parts written as `time_token`.

    That is what an instruction-aware connector reads (E.T. Chat's Q-Former gets the user's
    query with the image placeholder removed, its `<vid>` tokens kept).
    """
    return tuple(
        turn_text(turn, time_token).strip()
        for turn in turns
        for part in turn.parts
        if isinstance(part, MediaPart)
    )


class _Stream:
    """Per-request text state: detokenizer, stop strings and ids, the preset's text rules
    (`GenerationSpec`: stop text kept, last tokens dropped, strip), token counts, finish
    reason, timestamps."""

    def __init__(self, loaded: LoadedModel, job: PreparedRequest) -> None:
        rules = loaded.preset.generation
        self.job = job
        self.eos_ids = loaded.eos_ids
        self.keep_stop = rules.include_stop_str_in_output
        self.hold = rules.drop_last_tokens  # the text of this many newest tokens waits (or is dropped)
        self.held: deque[int] = deque()
        self.detok = IncrementalDetokenizer(
            loaded.tokenizer, () if rules.decode_reply_alone else job.prompt.input_ids
        )
        self.stops = StopMatcher(job.stop, include=rules.include_stop_str_in_output)
        self.strip = Strip(enabled=rules.strip)
        self.stop_token: int | None = None
        self.count = 0
        self.unsent: list[int] = []
        self.adapter_sent = False
        self.finish: FinishReason | None = None
        self.sent_chars = 0  # characters of reply text sent so far
        self.stamps: list[Timestamp] = []  # written into the text, not yet sent
        self.outputs: list[OutputSignal] = []  # completed, not yet sent
        self.signal_offset = 0  # where the text stood at the last signal token

    @property
    def text_length(self) -> int:
        """Characters of reply text so far (sent, or held back by the stop matcher or strip)."""
        return self.sent_chars + len(self.stops.pending) + len(self.strip.pending)

    def push(
        self, token: int, stamp: Timestamp | None = None, *, signal: bool = False
    ) -> GenerationEvent | None:
        """Account for one sampled token; returns the event to send, if any.

        Args:
            token: The token.
            stamp: For a time token, its match: the token's text is then the matched time.
            signal: A signal token (NExT-GPT): it adds no text; `signal_offset` records where
                the text stands.
        """
        self.count += 1
        self.unsent.append(token)
        eos = token in self.eos_ids
        if not eos and token in self.job.stop_token_ids:
            self.stop_token = token
        text = ""
        if self.hold:  # drop_last_tokens (no stamps or signals there): a token's text waits
            self.held.append(token)
            if len(self.held) > self.hold:
                text = self._through(self._token_text(self.held.popleft(), None))
        elif not eos and (self.stop_token is None or self.keep_stop):
            text = self._through(self._token_text(token, stamp, signal))
        if eos or self.stop_token is not None or self.stops.matched is not None:
            self.finish = FinishReason.STOP
        elif self.count >= self.job.budget:
            self.finish = FinishReason.LENGTH
        if self.finish is not None:
            text += self._final_text()  # the held tokens' text is dropped
            if self.stops.matched is not None:
                self.finish = FinishReason.STOP
        if not text and self.finish is None and not self.outputs:
            return None
        return self._event(text)

    def final_event(self) -> GenerationEvent:
        """An event with no new text (outputs completed after the last token's event)."""
        return self._event("")

    def _token_text(self, token: int, stamp: Timestamp | None, signal: bool = False) -> str:
        """The token's text delta; a time token's is the held-back text then the time."""
        lead = self.strip.lead  # leading whitespace is dropped before anything counts it
        if signal:  # a signal token stays out of the text; its media go where the text stands
            before = lead(self.detok.flush())
            self.signal_offset = self.text_length + len(before)
            return before
        if stamp is None:
            return lead(self.detok.add(token))
        before = lead(self.detok.flush())  # the time token itself stays out of the decoded text
        offset = self.text_length + len(before)
        self.stamps.append(dataclasses.replace(stamp, char_offset=offset))
        return before + lead(format_seconds(stamp.seconds))

    def _through(self, text: str) -> str:
        """A token's text through the stop matcher and the trailing-whitespace hold."""
        return self.strip.feed(self.stops.feed(text))

    def _final_text(self) -> str:
        """The rest of the text at the end (held tokens' text dropped, trailing space stripped)."""
        text = self.stops.feed(self.strip.lead(self.detok.flush()))
        if self.stops.matched is None:
            text += self.stops.flush()
        return self.strip.finish(text)

    def _event(self, text: str) -> GenerationEvent:
        self.sent_chars += len(text)
        stamps = tuple(t for t in self.stamps if t.char_offset < self.sent_chars)
        self.stamps = [t for t in self.stamps if t.char_offset >= self.sent_chars]  # or cut by a stop
        event = GenerationEvent(
            text=text,
            token_ids=tuple(self.unsent),
            adapter=None if self.adapter_sent else self.job.adapter,
            finish_reason=self.finish,
            usage=Usage(len(self.job.prompt.input_ids), self.count) if self.finish else None,
            stop_reason=self.stops.matched if self.finish else None,
            timestamps=stamps,
            outputs=tuple(self.outputs),
            stop_token_id=self.stop_token if self.finish and self.stops.matched is None else None,
        )
        self.unsent, self.adapter_sent, self.outputs = [], True, []
        return event


@dataclass(eq=False)
class _Waiting:
    """A prepared request queued for the scheduler: where its events go, its logging context."""

    job: PreparedRequest
    emit: Callable[[_Item], None]
    context: contextvars.Context


@dataclass(eq=False)
class _Row:
    """A request in a running batch: its text state, sampler and the token to feed next."""

    job: PreparedRequest
    emit: Callable[[_Item], None]
    context: contextvars.Context
    stream: _Stream
    sampler: Sampler
    penalties: Penalties | None = None  # a request with penalties: its token memory
    timed: TimedDecode | None = None
    capture: SignalCapture | None = None
    token: int = -1  # sampled, not yet fed
    prefilled: Any = None  # its prefill's KV cache until it joins a batch
    start: float = 0.0
    first: float = 0.0
    last: float = 0.0


class _Batch:
    """The running rows of one adapter version and their left-padded KV cache."""

    def __init__(self, version: AdapterVersion) -> None:
        self.version = version
        self.rows: list[_Row] = []
        self.kv = BatchCache()

    def add(self, row: _Row) -> None:
        self.kv.add(row.prefilled)
        row.prefilled = None
        self.rows.append(row)


class Engine:
    """Serves one loaded model, one request at a time, with several adapter versions.

    Args:
        loaded: The model, tokenizer and start adapter to serve (see `loading.load_model`).
        max_loaded_adapters: Most adapter versions kept loaded (see AdapterManager).
        max_queued: Most requests held, queued or running; one more is refused at once
            (ResourceExhaustedError) rather than left waiting: back-pressure to the gateway.
        max_batch_size: Most requests decoding together; more wait for a row to free.
        max_prefill_tokens: Prompt tokens prefilled between two decode steps (at least one
            request's): bounds the pause a wave of new requests puts on the running ones.
        default_max_tokens: max_tokens of a request that sets none, where the preset's
            `generation.max_tokens` is unset too.

    Raises:
        InvalidArgumentError: A `generation.stop_token_ids` entry outside the vocabulary.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_loaded_adapters: int = 4,
        max_queued: int = 64,
        max_batch_size: int = 32,
        max_prefill_tokens: int = 4096,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        metrics: LLMMetrics | None = None,
    ) -> None:
        self.loaded = loaded
        self.default_max_tokens = default_max_tokens
        self.vocab_size = int(loaded.model.lm.config.vocab_size)
        self._check_stop_ids(
            loaded.preset.generation.stop_token_ids, f"preset {loaded.preset.name}: generation.stop_token_ids"
        )
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self._lock = threading.Lock()  # guards _waiting and _looping
        self._waiting: deque[_Waiting] = deque()
        self._looping = False  # the scheduler loop is submitted or running
        self._batches: dict[str, _Batch] = {}  # worker thread only: by adapter version
        self.metrics = metrics if metrics is not None else LLMMetrics()
        self.max_queued = max_queued
        self._held = 0  # requests between the queue check and their end
        llm = loaded.preset.llm
        self.template = get_template(llm.inference_template or llm.template)
        self._worker = worker = WorkerCalls()
        self.adapters = AdapterManager(loaded, max_loaded=max_loaded_adapters, worker=worker)
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="llm-decode", initializer=worker.mark_worker_thread
        )
        worker.bind(self._executor)
        self._active: set[PreparedRequest] = set()  # queued or running; cancelled by close()
        self._closed = False
        self._created = int(loaded.bundle.manifest.get("created", time.time()))
        self.signal_ids = output_signal_ids(loaded.preset, loaded.tokenizer)

    @classmethod
    def from_preset(cls, preset: Preset, **options: Any) -> Engine:
        """Load the preset's model and adapter and wrap them in an engine (`options`: the
        constructor's keywords)."""
        return cls(load_model(preset), **options)

    def close(self) -> None:
        """Cancel the requests still queued or running and wait for the worker thread to end."""
        self._closed = True
        for job in list(self._active):
            job.cancel.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._fail_waiting(UnavailableError("the LLM engine is shutting down"))  # a loop never started
        self._worker.close()  # adapter loads waiting for the worker fail instead of hanging

    def info(self) -> ModelInfo:
        """Preset, adapter, context size and per-modality limits."""
        preset, model = self.loaded.preset, self.loaded.model
        modalities = tuple(
            ModalityInfo(
                modality=m,
                max_per_prompt=s.max_per_prompt,
                feature_tokens=model.layouts[m].tokens_per_frame,
                feature_dim=s.encoder.dim,
                llm_tokens=model.llm_tokens(m, model.layouts[m].typical_frames),
                frames=model.layouts[m].frames,
                max_frames=model.layouts[m].max_frames,
            )
            for m, s in preset.modalities.items()
        )
        current = self.adapters.current
        return ModelInfo(
            preset=preset.name,
            adapter=current.ref,
            adapters=self.adapters.refs(),
            max_context_tokens=self.loaded.max_context_tokens,
            modalities=modalities,
            created=current.bundle.created or self._created,
            outputs=tuple(
                OutputInfo(m, len(o.signal_tokens), (o.conditioning[0], o.conditioning[1]))
                for m, o in preset.outputs.items()
            ),
            sampling_defaults=self.sampling_defaults(),
        )

    def sampling_defaults(self) -> SamplingParams:
        """What a request's unset sampling fields become, with the preset's own stop strings
        (its `generation.stop`, else the template's) and stop token ids."""
        generation = self.loaded.preset.generation
        stop = self.template.stop if generation.stop is None else tuple(generation.stop)
        own = SamplingParams(stop=stop, stop_token_ids=tuple(generation.stop_token_ids))
        return own.resolve(generation, default_max_tokens=self.default_max_tokens)

    def _check_stop_ids(self, ids: Sequence[int], where: str) -> None:
        for i, token in enumerate(ids):
            if not 0 <= token < self.vocab_size:
                raise InvalidArgumentError(
                    f"{where}[{i}]: expected a token id in [0, {self.vocab_size}) (the LLM's vocabulary), "
                    f"got {token}",
                    param="stop_token_ids",
                )

    def resolve_adapter(self, ref: str) -> str:
        """The loaded "name@version" a request's adapter field selects ("" = current).

        Raises:
            NotFoundError: No loaded adapter matches; the message lists the loaded ones.
        """
        return self.adapters.resolve(ref).ref

    def prepare(self, request: GenerationRequest, version: AdapterVersion | None = None) -> PreparedRequest:
        """Validate a request and build its prompt (cheap; runs before it queues).

        Args:
            request: The request.
            version: The adapter version it holds (default: resolved from `request.adapter`).

        Unset sampling fields take the preset's `generation:` values (then the neutral ones).

        Raises:
            InvalidArgumentError: Bad turns, media or sampling parameters (a stop token id
                outside the vocabulary).
            NotFoundError: Unknown adapter.
        """
        if version is None:
            version = self.adapters.resolve(request.adapter)
        model, media = self.loaded.model, request.media
        outputs = check_requested(self.loaded.preset, request.outputs)
        model.check_media(media)
        prompt = request_prompt(
            self.loaded.preset,
            self.template,
            self.loaded.prompt_builder,
            request.turns,
            [model.frames(m) for m in media],
        )
        spec = self.loaded.preset.heads.timestamps
        self._check_stop_ids(request.sampling.stop_token_ids, "sampling.stop_token_ids")
        defaults = self.sampling_defaults()
        generation = self.loaded.preset.generation
        sampling = request.sampling.resolve(generation, default_max_tokens=self.default_max_tokens)
        request = dataclasses.replace(request, sampling=sampling)
        max_tokens = cast(int, sampling.max_tokens)  # resolved
        budget = min(max_tokens, self.loaded.max_context_tokens - len(prompt.input_ids))
        return PreparedRequest(
            request=request,
            prompt=prompt,
            version=version,
            budget=budget,
            stop=tuple(dict.fromkeys((*sampling.stop, *defaults.stop))),
            stop_token_ids=frozenset((*sampling.stop_token_ids, *defaults.stop_token_ids)),
            instructions=media_instructions(request.turns, spec.token if spec else ""),
            outputs=outputs,
        )

    def _add_source_times(self, job: PreparedRequest, embeds: torch.Tensor) -> torch.Tensor:
        """The prompt's time tokens + the LLM embedding of the frame at their time (1, L, D)."""
        spec = self.loaded.preset.heads.timestamps
        if not job.prompt.time_tokens or spec is None:
            return embeds
        media = job.request.media
        items = [i for i, m in enumerate(media) if m.modality == spec.modality]
        spans = [job.prompt.media_spans[i] for i in items]
        chosen = source_frames(job.prompt.time_tokens, spans, [media[i].times for i in items])
        frames = torch.stack([embeds[0, spans[k][0] + frame] for _, k, frame in chosen])  # (N, D)
        return add_source_frames(embeds, [0] * len(chosen), [pos for pos, _, _ in chosen], frames)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream the events of one generation.

        The last event carries finish_reason and usage. Closing the iterator early (client
        gone) stops the decode loop before its next token.

        Raises:
            ModalmeshError: The request is invalid (before any event is produced), the engine
                holds `max_queued` requests already (ResourceExhaustedError), or it is closed
                (UnavailableError).
        """
        if self._closed:
            raise UnavailableError("the LLM engine is shutting down")
        if self._held >= self.max_queued:
            self.metrics.requests.labels(status="RESOURCE_EXHAUSTED").inc()
            raise ResourceExhaustedError(
                f"the LLM service holds {self._held} requests (queued or running), its limit "
                f"(MODALMESH_LLM_MAX_QUEUED={self.max_queued}); retry later"
            )
        self._held += 1  # counted from here, so requests between the check and the queue count too
        self.metrics.held.set(self._held)
        admitted, status = time.perf_counter(), "CANCELLED"  # the consumer left, unless set below
        try:
            async with contextlib.aclosing(self._generate(request, admitted)) as events:
                async for event in events:
                    yield event
            status = "OK"
            self.metrics.e2e.observe(time.perf_counter() - admitted)
        except ModalmeshError as e:
            status = e.code.value
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self._held -= 1
            self.metrics.held.set(self._held)
            self.metrics.requests.labels(status=status).inc()

    async def _generate(
        self, request: GenerationRequest, admitted: float
    ) -> AsyncGenerator[GenerationEvent, None]:
        version = await self._acquire(request.adapter)
        try:
            job = dataclasses.replace(self.prepare(request, version), admitted=admitted)
        except BaseException:
            self.adapters.release(version)
            raise
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Item] = asyncio.Queue()

        def emit(item: _Item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening
                job.cancel.set()

        self._active.add(job)
        try:
            # from here the scheduler releases the version when it is done with the request
            self._submit(_Waiting(job, emit, contextvars.copy_context()))
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancel.set()
            self._active.discard(job)

    async def _acquire(self, ref: str) -> AdapterVersion:
        """Hold the version `ref` selects; a pinned one the registry knows is loaded first."""
        try:
            return self.adapters.acquire(ref)
        except NotFoundError:
            if "@" not in ref or self.adapters.catalog is None:
                raise
        return await asyncio.to_thread(self.adapters.acquire_or_load, ref)

    # -- the scheduler (worker thread) --------------------------------------------------------

    def _submit(self, waiting: _Waiting) -> None:
        """Queue a prepared request; start the scheduler loop if it is not running."""
        with self._lock:
            self._waiting.append(waiting)
            if self._looping:
                return
            self._looping = True
        try:
            self._executor.submit(self._loop)
        except RuntimeError:  # the executor is shut down: the engine is closing
            with self._lock:
                self._looping = False
            self._fail_waiting(UnavailableError("the LLM engine is shutting down"))

    def _loop(self) -> None:
        """Iterations until nothing waits or runs: admit (prefill) waiting requests, then one
        decode step of every running batch (one per adapter version, in turn)."""
        try:
            while True:
                self.adapters.run_pending()  # new adapter versions go in between two steps
                with self._lock:
                    if not self._waiting and not self._batches:
                        self._looping = False
                        return
                self._admit()
                for key, batch in list(self._batches.items()):
                    self._step(batch)
                    if not batch.rows:
                        del self._batches[key]
        except BaseException as e:  # a bug in the loop itself: fail everyone rather than hang
            logger.exception("the decode loop failed")
            for batch in self._batches.values():
                for row in batch.rows:
                    self._retire(row, e)
            self._batches.clear()
            with self._lock:
                self._looping = False
            self._fail_waiting(e)

    def _fail_waiting(self, error: BaseException) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                waiting = self._waiting.popleft()
            self.adapters.release(waiting.job.version)
            waiting.emit(error)
            waiting.emit(None)

    def _admit(self) -> None:
        """Prefill waiting requests while the batch has room and this iteration's prefill
        budget lasts (at least one request per iteration, so none waits forever)."""
        budget, running = self.max_prefill_tokens, sum(len(b.rows) for b in self._batches.values())
        while running < self.max_batch_size:
            with self._lock:
                if not self._waiting:
                    return
                waiting = self._waiting[0]
                size = len(waiting.job.prompt.input_ids)
                if budget < self.max_prefill_tokens and size > budget:
                    return
                self._waiting.popleft()
            budget -= size
            if self._closed:
                self.adapters.release(waiting.job.version)
                waiting.emit(UnavailableError("the LLM engine is shutting down"))
                waiting.emit(None)
                continue
            row = waiting.context.run(self._prefill, waiting)
            if row is not None:
                self._batches.setdefault(row.job.version.ref, _Batch(row.job.version)).add(row)
                running += 1

    @torch.inference_mode()
    def _prefill(self, waiting: _Waiting) -> _Row | None:
        """Prefill one request alone and take its first token; its row, or None if it ended."""
        job, model, metrics = waiting.job, self.loaded.model, self.metrics
        start = time.perf_counter()
        metrics.queue_time.observe(start - job.admitted)
        row: _Row | None = None
        try:
            if job.cancel.is_set():
                raise CancelledError("request cancelled before it started")
            connectors = self.adapters.select(job.version)
            embeds = model.embed(
                job.prompt.input_ids, job.prompt.media_spans, job.request.media, connectors, job.instructions
            )  # (1, L, D)
            embeds = self._add_source_times(job, embeds)
            timed = self._timed(job, embeds)
            capture = self._capture(job)
            mask = self._prefill_mask(job, embeds)  # None: causal
            if timed is None:
                out = model.lm(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    use_cache=True,
                    logits_to_keep=1,
                    output_hidden_states=capture is not None,
                )
            else:
                out = timed.prefill(embeds, mask)
            row = _Row(
                job, waiting.emit, waiting.context, _Stream(self.loaded, job), Sampler(job.request.sampling)
            )
            row.timed, row.capture, row.start = timed, capture, start
            row.penalties = self._penalties(job, out.logits)
            if capture is not None:
                capture.on_states(out.hidden_states)
            metrics.prefill_time.observe(time.perf_counter() - start)
            metrics.prompt_tokens.inc(len(job.prompt.input_ids))
            logits = out.logits[:, -1]  # (1, V)
            if row.penalties is not None:
                logits = apply_penalties(logits, [row.penalties])
            go_on = self._take(row, logits[0], lambda: out.past_key_values)
        except BaseException as e:
            if row is None:
                self.adapters.release(job.version)
                waiting.emit(e)
                waiting.emit(None)
            else:
                self._retire(row, e)
            return None
        if not go_on:
            self._retire(row, None)
            return None
        row.prefilled = out.past_key_values
        return row

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> None:
        """One decode step of every row of `batch` (one forward), then each row's next token."""
        rows, lm = batch.rows, self.loaded.model.lm
        try:
            self.adapters.select(batch.version)
            table = lm.get_input_embeddings()
            tokens = torch.tensor([[row.token] for row in rows], device=table.weight.device)  # (B, 1)
            x = table(tokens)  # (B, 1, D)
            for i, row in enumerate(rows):
                if row.timed is not None:
                    x[i : i + 1] = row.timed.step_input(row.token)
            hidden = any(row.timed is not None or row.capture is not None for row in rows)
            cache, mask, positions = batch.kv.step_inputs()
            out = lm(
                inputs_embeds=x,
                past_key_values=cache,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                output_hidden_states=hidden,
            )
            batch.kv.stepped()
        except BaseException as e:
            for row in rows:
                self._retire(row, e)
            batch.rows, batch.kv = [], BatchCache()
            return
        self.metrics.batch_size.observe(len(rows))
        logits = self._penalised(rows, out.logits[:, -1])  # (B, V)
        keep = [
            i
            for i, row in enumerate(rows)
            if row.context.run(self._advance, batch, i, out, logits[i], hidden)
        ]
        batch.rows = [rows[i] for i in keep]
        batch.kv.keep(keep)

    def _advance(self, batch: _Batch, i: int, out: Any, logits: torch.Tensor, hidden: bool) -> bool:
        """Row `i` of a step's output: its states, then its next token from its (penalised)
        logits (V,); whether it goes on (a row that ends is retired here)."""
        row = batch.rows[i]
        try:
            if hidden:
                states = tuple(h[i : i + 1] for h in out.hidden_states)
                if row.timed is not None:
                    row.timed.after_step(states)
                if row.capture is not None:
                    row.capture.on_states(states)
                    row.stream.outputs += row.capture.ready()
            go_on = self._take(row, logits, functools.partial(batch.kv.row_cache, i))
        except BaseException as e:
            self._retire(row, e)
            return False
        if not go_on:
            self._retire(row, None)
        return go_on

    def _take(self, row: _Row, logits: torch.Tensor, row_cache: Callable[[], Any]) -> bool:
        """Choose and report a row's next token from its logits (V,); whether it goes on.

        Args:
            row: The row.
            logits: Its last position's logits.
            row_cache: Its KV cache alone (batch 1, for the signal tokens fed after the last one).

        Raises:
            CancelledError, UnavailableError: The request was cancelled (or the engine closed).
        """
        stream, capture, metrics = row.stream, row.capture, self.metrics
        forced = None if capture is None else capture.next_forced()
        token = row.sampler(logits) if forced is None else forced
        if row.penalties is not None:
            row.penalties.add(token)
        now = time.perf_counter()
        if stream.count == 0:
            metrics.ttft.observe(now - row.job.admitted)
            row.first = now
        else:
            metrics.inter_token.observe(now - row.last)
        row.last = now
        metrics.generation_tokens.inc()
        if capture is not None and capture.is_signal(token):
            event = stream.push(token, signal=True)
            capture.on_token(token, stream.signal_offset)
        else:
            event = stream.push(token, None if row.timed is None else row.timed.on_token(token))
            if capture is not None:
                capture.on_token(token, stream.text_length)
        if stream.finish is not None and capture is not None:
            self._finish_signals(capture, stream, SimpleNamespace(past_key_values=row_cache()))
            event = (
                stream.final_event()
                if event is None
                else dataclasses.replace(event, outputs=event.outputs + tuple(stream.outputs))
            )
            stream.outputs = []
        if event is not None:
            row.emit(event)
        if stream.finish is not None:
            return False
        if row.job.cancel.is_set():
            logger.info("cancelled after %s tokens", stream.count)
            if self._closed:
                raise UnavailableError("the LLM engine shut down during this request")
            raise CancelledError(f"request cancelled after {stream.count} tokens")
        row.token = token
        return True

    def _retire(self, row: _Row, error: BaseException | None) -> None:
        """A row leaves: its error (if any) and the end go to its consumer; its version is released."""
        self.adapters.release(row.job.version)
        if error is not None:
            row.emit(error)
        else:
            self._log_done(row)
        row.emit(None)

    @staticmethod
    def _log_done(row: _Row) -> None:
        stream, end = row.stream, time.perf_counter()
        logger.info(
            "generated %s tokens (prompt %s) in %.3fs: prefill %.3fs, %.1f tokens/s, finish %s",
            stream.count,
            len(row.job.prompt.input_ids),
            end - row.start,
            row.first - row.start,
            (stream.count - 1) / (end - row.first) if stream.count > 1 and end > row.first else 0.0,
            stream.finish.value if stream.finish else "none",
        )

    def _penalties(self, job: PreparedRequest, logits: torch.Tensor) -> Penalties | None:
        """The token memory of a request with penalties, or None: the prompt's ids outside its
        media spans, less the timestamp token (as E.T. Chat's processor leaves out -200 and
        `<vid>`)."""
        if not job.request.sampling.penalised:
            return None
        time_token = self.loaded.time_token_id
        return Penalties(
            job.request.sampling,
            logits.shape[-1],
            job.prompt.input_ids,
            skip_spans=set(job.prompt.media_spans),
            skip_ids=() if time_token is None else (time_token,),
            device=logits.device,
        )

    @staticmethod
    def _penalised(rows: Sequence[_Row], logits: torch.Tensor) -> torch.Tensor:
        """A step's last-position logits (B, V) with the penalised rows' penalties applied (one
        vectorised call for all of them); unchanged when no row has penalties."""
        which = [(i, row.penalties) for i, row in enumerate(rows) if row.penalties is not None]
        if not which:
            return logits
        out = logits.float()  # (B, V)
        index = torch.tensor([i for i, _ in which], device=logits.device)
        penalised = apply_penalties(out[index], [p for _, p in which])  # (P, V)
        return out.index_copy(0, index, penalised)  # (B, V)

    def _capture(self, job: PreparedRequest) -> SignalCapture | None:
        """The output-signal state of a request, or None (the preset has no outputs)."""
        if not self.loaded.preset.outputs:
            return None
        lm = self.loaded.model.lm
        return SignalCapture(
            self.loaded.preset,
            self.signal_ids,
            job.version.projectors,
            lm.get_input_embeddings(),
            job.outputs,
            eos_ids=self.loaded.eos_ids,
        )

    def _finish_signals(self, capture: SignalCapture, stream: _Stream, out: Any) -> Any:
        """Complete the request's signals after its last token; their events go with the last one."""
        lm, device = self.loaded.model.lm, self.loaded.model.device
        state = {"out": out}

        def feed(tokens: list[int]) -> Any:
            ids = torch.tensor([tokens], device=device)  # (1, n)
            state["out"] = lm(
                input_ids=ids,
                past_key_values=state["out"].past_key_values,
                use_cache=True,
                output_hidden_states=True,
            )
            return state["out"].hidden_states

        stream.outputs += capture.finish(feed, stream.text_length)
        return state["out"]

    def _prefill_mask(self, job: PreparedRequest, embeds: torch.Tensor) -> torch.Tensor | None:
        """The prompt's 4D attention mask where media spans attend bidirectionally (the preset's
        `attention`, `services.models.lm.attention`), or None: causal. Decode steps need none."""
        return prefill_attention_mask(
            self.loaded.preset,
            self.loaded.model.lm,
            [m.modality for m in job.request.media],
            job.prompt.media_spans,
            embeds,
        )

    def _timed(self, job: PreparedRequest, embeds: torch.Tensor) -> TimedDecode | None:
        """The time-token decode state of a request, or None (no heads, or no media to match)."""
        spec = self.loaded.preset.heads.timestamps
        if spec is None:
            return None
        return TimedDecode.for_request(
            self.loaded.model.lm,
            job.version.heads,
            self.loaded.time_token_id,
            spec.modality,
            job.request.media,
            job.prompt.media_spans,
            embeds,
        )

    async def warmup(self) -> None:
        """Run a two-token generation with a dummy (zero) item of every modality.

        Each item has the modality's fixed frame count, or one frame where it varies.
        """
        parts: list[Part[MediaFeatures[torch.Tensor]]] = []
        for m, layout in self.loaded.model.layouts.items():
            frames = layout.frames or 1
            features = torch.zeros(frames * layout.tokens_per_frame, layout.dim)
            parts.append(MediaPart(MediaFeatures(m, features, tuple(float(i) for i in range(frames)))))
        request = GenerationRequest(
            turns=[Turn("user", [*parts, TextPart("Hello")])],
            sampling=SamplingParams(max_tokens=2, temperature=0.0),
        )
        start = time.perf_counter()
        async for _ in self.generate(request):
            pass
        logger.info("warm-up done in %.3fs", time.perf_counter() - start)
