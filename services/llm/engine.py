"""The generation engine: validates a request, builds its prompt, decodes it with continuous
batching and streams its events. `Engine` is the `GenerationEngine` the servicer serves.

It composes three parts, as vLLM v1 keeps its scheduler (`vllm/v1/core/sched/scheduler.py`)
apart from its model runner and its output processing:
- the scheduler (`services.llm.scheduler`, no tensors): the queue, back-pressure, admission,
  the running rows of each adapter version, cancellation and shutdown bookkeeping;
- the model runner (`services.llm.runner`): prefill, the batched decode step over each
  version's KV cache (`services.llm.batching`), sampling (`services.llm.sampling`) and the
  hidden-state capture of time tokens and output signals;
- the output stream (`services.llm.stream`): sampled tokens -> `GenerationEvent`s (text
  deltas, stop strings, timestamps, outputs, usage) and the per-request queue `generate`
  reads.
What the engine itself keeps is the request's way in: `prepare` (validation and prompt, on the
event loop, before the request queues, so a bad request fails at once and never touches the
model), `generate` (hold, queue, stream), `info`, and the worker thread that runs the loop.

Scheduling is iteration-level (continuous batching, as in Orca and vLLM). One worker thread
runs the loop (`_loop`) while there is work; each iteration
- admits waiting requests (FIFO) while the running batches have room (`max_batch_size`) and
  this iteration's prefill budget lasts (`max_prefill_tokens`, at least one request): each is
  prefilled alone, takes its first token at once and joins the running batch of its adapter
  version;
- then runs one decode step of every running batch (one forward for all its rows), and each
  row samples with its own parameters and stop conditions; a finished, failed or cancelled
  row leaves at once without stalling the others.
So a request that arrives while others decode streams its first token after one iteration,
not after they finish. Requests of different adapter versions decode in separate batches,
stepped in turn every iteration, so none starves. The engine holds at most `max_queued`
requests (waiting or running); one more is refused at once (back-pressure). A cancelled
request (the consumer of `generate()` went away) sets a flag its row checks after each token.

Adapter versions (`services.llm.adapter_manager`): a request resolves and holds its version
before it queues and decodes with that version's connectors and LoRA to the end, whatever
the current pointer does meanwhile; its channel releases the version when it ends. Model
mutations for new versions (LoRA injection) run on the worker thread between two iterations
(`run_pending`); each batch selects its version's LoRA before its step.

Sampling (`services.llm.sampling`): a request's unset sampling fields take the preset's
`generation:` values (`prepare`). A reply ends at end-of-sequence, a stop string (the
request's, then the preset's or else the template's) or a stop token id (the request's and the
preset's); the preset's text rules (`GenerationSpec`) decide what of its last tokens, the stop
included, reaches the text, and whether it is stripped (`services.llm.stream`).

Time tokens (presets with `heads.timestamps`, `services.models.lm.time_matching`): a request with
media of the heads' modality decodes through a `TimedDecode`; a sampled time token is written
into the reply as the matched frame's time in seconds ("12", "12.5") and reported as a
`Timestamp` on the event carrying that text. A request's time parts (E.T. Bench's `<vid>` in a
question, with its source time) render as the time token, and the runner adds the LLM
embedding of the frame at that time to each one's input embedding; a preset without the heads,
or a request without media of their modality, is refused.

The request's media are read in one place, `request_media` (the items' features in order and
each one's instruction text); everything after `prepare` reads them from the PreparedRequest.

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
import time
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import torch

from services.common.content import MediaFeatures, MediaPart, Part, TextPart, Turn
from services.common.errors import (
    InvalidArgumentError,
    ModalmeshError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from services.common.presets import Preset
from services.llm.adapter_manager import AdapterManager, AdapterVersion, WorkerCalls
from services.llm.domain import (
    GenerationEvent,
    GenerationRequest,
    ModalityInfo,
    ModelInfo,
    OutputInfo,
)
from services.llm.metrics import LLMMetrics
from services.llm.request import PreparedRequest
from services.llm.runner import ModelRunner, Row
from services.llm.sampling import DEFAULT_MAX_TOKENS, SamplingParams
from services.llm.scheduler import SHUTTING_DOWN, Scheduler, Waiting
from services.llm.signals import check_requested
from services.llm.stream import RequestChannel
from services.models.lm.loading import LoadedModel, load_model
from services.models.prompt.builder import request_prompt
from services.models.prompt.templates import get_template, turn_text

__all__ = ["Engine", "PreparedRequest", "media_instructions", "request_media"]

logger = logging.getLogger(__name__)


def request_media(
    request: GenerationRequest, time_token: str = ""
) -> tuple[Sequence[MediaFeatures[torch.Tensor]], tuple[str, ...]]:
    """The request's media items in prompt order, and per item its instruction text
    (`media_instructions`, time parts written as `time_token`).

    The one place that reads the media parts of the turns: after `Engine.prepare` everything
    reads the media from the PreparedRequest.
    """
    return request.media, media_instructions(request.turns, time_token)


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


class Engine:
    """Serves one loaded model with continuous batching (many requests decode together) and
    several adapter versions: the scheduler, the model runner and the output streams composed.

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
        self.metrics = metrics if metrics is not None else LLMMetrics()
        self.scheduler: Scheduler[PreparedRequest, Row] = Scheduler(
            max_queued=max_queued, max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens
        )
        llm = loaded.preset.llm
        self.template = get_template(llm.inference_template or llm.template)
        self._worker = worker = WorkerCalls()
        self.adapters = AdapterManager(loaded, max_loaded=max_loaded_adapters, worker=worker)
        self.runner = ModelRunner(loaded, self.adapters, self.metrics, self.scheduler.check_cancelled)
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="llm-decode", initializer=worker.mark_worker_thread
        )
        worker.bind(self._executor)
        self._created = int(loaded.bundle.manifest.get("created", time.time()))

    @classmethod
    def from_preset(cls, preset: Preset, **options: Any) -> Engine:
        """Load the preset's model and adapter and wrap them in an engine (`options`: the
        constructor's keywords)."""
        return cls(load_model(preset), **options)

    def close(self) -> None:
        """Cancel the requests still queued or running and wait for the worker thread to end."""
        self.scheduler.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.scheduler.fail_waiting(UnavailableError(SHUTTING_DOWN))  # a loop never started
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
        spec = self.loaded.preset.heads.timestamps
        model = self.loaded.model
        media, instructions = request_media(request, spec.token if spec else "")
        outputs = check_requested(self.loaded.preset, request.outputs)
        model.check_media(media)
        prompt = request_prompt(
            self.loaded.preset,
            self.template,
            self.loaded.prompt_builder,
            request.turns,
            [model.frames(m) for m in media],
        )
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
            media=media,
            stop=tuple(dict.fromkeys((*sampling.stop, *defaults.stop))),
            stop_token_ids=frozenset((*sampling.stop_token_ids, *defaults.stop_token_ids)),
            instructions=instructions,
            outputs=outputs,
        )

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream the events of one generation.

        The last event carries finish_reason and usage. Closing the iterator early (client
        gone) stops the decode loop before its next token.

        Raises:
            ModalmeshError: The request is invalid (before any event is produced), the engine
                holds `max_queued` requests already (ResourceExhaustedError), or it is closed
                (UnavailableError).
        """
        try:
            self.scheduler.hold()  # counted from here, so requests between the check and the queue count too
        except ResourceExhaustedError:
            self.metrics.requests.labels(status="RESOURCE_EXHAUSTED").inc()
            raise
        self.metrics.held.set(self.scheduler.held)
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
            self.scheduler.unhold()
            self.metrics.held.set(self.scheduler.held)
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
        # from here whoever ends the request (the scheduler or the runner) releases the version
        channel = RequestChannel(job.cancel, on_end=functools.partial(self.adapters.release, version))
        self.scheduler.track(job)
        try:
            self._submit(Waiting(job, channel, contextvars.copy_context()))
            while (event := await channel.get()) is not None:
                yield event
        finally:
            job.cancel.set()
            self.scheduler.untrack(job)

    async def _acquire(self, ref: str) -> AdapterVersion:
        """Hold the version `ref` selects; a pinned one the registry knows is loaded first."""
        try:
            return self.adapters.acquire(ref)
        except NotFoundError:
            if "@" not in ref or self.adapters.catalog is None:
                raise
        return await asyncio.to_thread(self.adapters.acquire_or_load, ref)

    # -- the loop (worker thread) ------------------------------------------------------------

    def _submit(self, waiting: Waiting[PreparedRequest]) -> None:
        """Queue a prepared request; start the loop if it is not running."""
        if not self.scheduler.submit(waiting):
            return
        try:
            self._executor.submit(self._loop)
        except RuntimeError:  # the executor is shut down: the engine is closing
            self.scheduler.loop_ended(UnavailableError(SHUTTING_DOWN))

    def _loop(self) -> None:
        """Iterations until nothing waits or runs: the scheduler admits waiting requests and the
        runner prefills them, then the runner steps every running batch (one per adapter
        version, in turn) and the scheduler keeps the rows that go on."""
        scheduler, runner = self.scheduler, self.runner
        try:
            while True:
                self.adapters.run_pending()  # new adapter versions go in between two steps
                if scheduler.idle():
                    return
                for waiting in scheduler.admit():
                    row = waiting.context.run(runner.prefill, waiting)
                    if row is not None:
                        scheduler.join(row.job.adapter, row)
                for key, rows in scheduler.batches():
                    scheduler.keep(key, runner.step(key, rows))
        except BaseException as e:  # a bug in the loop itself: fail everyone rather than hang
            logger.exception("the decode loop failed")
            for row in scheduler.drop_running():
                row.out.end(e)
            runner.reset()
            scheduler.loop_ended(e)

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
