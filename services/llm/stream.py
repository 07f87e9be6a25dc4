"""The output stream: one request's sampled tokens -> `GenerationEvent`s -> its consumer.

Two parts, one per side of the worker thread:

- `OutputStream` (worker thread) turns each sampled token into the event to send, if any: the
  text delta (`IncrementalDetokenizer`), held back and cut by the stop strings (`StopMatcher`)
  and the preset's text rules (`GenerationSpec`: stop text kept or not, the last tokens
  dropped, leading and trailing whitespace stripped, `Strip`), the end (end-of-sequence, a
  stop string or stop token id, the token budget) with its usage, a time token's `Timestamp`
  (its text is the matched time, "12.5", `services.models.lm.timestamps.format_seconds`) and
  the output signals (`OutputSignal`) that completed by then. Each timestamp travels with the
  event whose text holds its time; one the stop cut off is never sent. It also keeps the
  request's timing (TTFT, inter-token time) and logs its summary when it ends.
- `RequestChannel` (both sides) is the per-request asyncio queue between the worker thread
  and `Engine.generate` on the event loop: `send` an event, `finish` with or without an
  error, and `get` on the event loop raises the error where the consumer reads. Ending a
  request releases what it holds (its adapter version) exactly once, whoever ends it. When
  the event loop is gone (nobody is listening) the request is cancelled instead.

What it must not do: run the model, choose tokens (the runner does, `services.llm.runner`), or
decide when a request runs (`services.llm.scheduler`). It knows the request only through its
`PreparedRequest` (stop strings and ids, budget, prompt, adapter).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Any

from services.common.content import Timestamp
from services.common.presets import GenerationSpec
from services.llm.detokenize import IncrementalDetokenizer, StopMatcher, Strip
from services.llm.domain import FinishReason, GenerationEvent, OutputSignal, Usage
from services.llm.metrics import LLMMetrics
from services.llm.request import PreparedRequest
from services.llm.scheduler import Channel
from services.models.lm.timestamps import format_seconds

logger = logging.getLogger(__name__)

Item = GenerationEvent | BaseException | None  # an event, the request's error, or its end


class RequestChannel:
    """One request's events from the worker thread to its consumer on the event loop.

    Made on the event loop that will `get` from it.

    Args:
        cancel: The request's cancel flag, set if its event loop has closed.
        on_end: Called once, by `finish` (releases the request's adapter version).
    """

    def __init__(self, cancel: threading.Event, on_end: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._cancel = cancel
        self._on_end = on_end

    def send(self, event: GenerationEvent) -> None:
        """Queue an event (any thread)."""
        self._put(event)

    def finish(self, error: BaseException | None = None) -> None:
        """End the request (any thread): release what it holds, then its error if any, then the end."""
        self._on_end()
        if error is not None:
            self._put(error)
        self._put(None)

    async def get(self) -> GenerationEvent | None:
        """The next event, or None at the end (event loop).

        Raises:
            BaseException: The error the request ended with.
        """
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _put(self, item: Item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening
            self._cancel.set()


class OutputStream:
    """Per-request text state: detokenizer, stop strings and ids, the preset's text rules
    (`GenerationSpec`: stop text kept, last tokens dropped, strip), token counts, finish
    reason, timestamps, outputs, timing; the events go to `channel`.

    Args:
        job: The request.
        channel: Where its events go.
        tokenizer: The served tokenizer.
        eos_ids: End-of-sequence ids (end the reply, never in its text).
        rules: The preset's `generation:` text rules.
        metrics: Where TTFT, inter-token times and token counts go.
        start: perf_counter() when its prefill started.
    """

    def __init__(
        self,
        job: PreparedRequest,
        channel: Channel,
        tokenizer: Any,
        eos_ids: Collection[int],
        rules: GenerationSpec,
        metrics: LLMMetrics,
        start: float,
    ) -> None:
        self.job, self.channel, self.metrics = job, channel, metrics
        self.eos_ids = eos_ids
        self.keep_stop = rules.include_stop_str_in_output
        self.hold = rules.drop_last_tokens  # the text of this many newest tokens waits (or is dropped)
        self.held: deque[int] = deque()
        self.detok = IncrementalDetokenizer(
            tokenizer, () if rules.decode_reply_alone else job.prompt.input_ids
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
        self.start, self.first, self.last = start, 0.0, 0.0

    @property
    def text_length(self) -> int:
        """Characters of reply text so far (sent, or held back by the stop matcher or strip)."""
        return self.sent_chars + len(self.stops.pending) + len(self.strip.pending)

    def clock(self) -> None:
        """A token was chosen now: TTFT for the first, the inter-token time for the others."""
        now = time.perf_counter()
        if self.count == 0:
            self.metrics.ttft.observe(now - self.job.admitted)
            self.first = now
        else:
            self.metrics.inter_token.observe(now - self.last)
        self.last = now
        self.metrics.generation_tokens.inc()

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

    def with_outputs(self, event: GenerationEvent | None, outputs: Sequence[OutputSignal]) -> GenerationEvent:
        """`event` (None: a new one with no text) carrying `outputs` too, completed after it was made."""
        self.outputs += outputs
        if event is None:
            return self._event("")
        event = dataclasses.replace(event, outputs=event.outputs + tuple(self.outputs))
        self.outputs = []
        return event

    def send(self, event: GenerationEvent) -> None:
        """Hand an event to the request's consumer."""
        self.channel.send(event)

    def end(self, error: BaseException | None) -> None:
        """The request leaves: its summary is logged (or its error sent), then its end."""
        if error is None:
            self._log_done()
        self.channel.finish(error)

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

    def _log_done(self) -> None:
        end = time.perf_counter()
        logger.info(
            "generated %s tokens (prompt %s) in %.3fs: prefill %.3fs, %.1f tokens/s, finish %s",
            self.count,
            len(self.job.prompt.input_ids),
            end - self.start,
            self.first - self.start,
            (self.count - 1) / (end - self.first) if self.count > 1 and end > self.first else 0.0,
            self.finish.value if self.finish else "none",
        )
