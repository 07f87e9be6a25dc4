"""The scheduler: which requests wait, which join the running batches each iteration, the
limits, and the bookkeeping that cancellation and shutdown need. No tensors, no torch.

As vLLM v1 keeps its `Scheduler` (`vllm/v1/core/sched/scheduler.py`) apart from the model
runner, the engine's loop asks this one what to do and has the runner do it
(`services.llm.engine`):

- **Back-pressure** (event loop): at most `max_queued` requests are held, from the check in
  `Engine.generate` (`hold`) to their end (`unhold`), waiting or running; one more is refused
  at once with ResourceExhaustedError rather than left waiting. A closed scheduler refuses
  every new request (UnavailableError).
- **Queue** (event loop): prepared requests wait in arrival order (`submit`). The submit that
  finds the loop stopped says so, and the engine starts the loop on its worker thread; the
  loop ends in the iteration that finds nothing waiting or running (`idle`), under the same
  lock, so a request is never left queued with no loop to take it.
- **Admission** (worker thread, each iteration, `admit`): waiting requests in order while the
  running batches have room (`max_batch_size` rows in all) and this iteration's prefill
  budget (`max_prefill_tokens` prompt tokens) lasts. The first request of an iteration is
  admitted whatever its size, so none waits forever, and the budget bounds the pause a wave
  of new requests puts on the running ones. A request still queued when the engine closes is
  ended (UnavailableError), never prefilled.
- **Running** (worker thread): the rows of each adapter version, keyed by "name@version", in
  the order they joined (`join`). Each key is one batch, stepped (one forward) in turn every
  iteration, so no version starves; after its step the rows that go on are kept (`keep`) and
  a batch with none left goes. A row is the runner's (`services.llm.runner.Row`): the
  scheduler only holds and orders them.
- **Cancellation**: every request held is tracked (`track` / `untrack`) so that `close` can
  cancel them; a running row asks `check_cancelled` after each of its tokens, which ends it
  with CancelledError (its consumer went away) or UnavailableError (the engine closed).

What it must not do: touch tensors or the model, select or release adapter versions (a
request's channel releases its version when the request ends), or look at the text. Requests
are anything with `prompt_tokens` and a `cancel` event (`Job`; `PreparedRequest` is one), so
it is tested on its own, fast.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from services.common.errors import CancelledError, ResourceExhaustedError, UnavailableError

if TYPE_CHECKING:
    from services.llm.domain import GenerationEvent

logger = logging.getLogger(__name__)

SHUTTING_DOWN = "the LLM engine is shutting down"


class Job(Protocol):
    """What the scheduler reads of a request (`services.llm.request.PreparedRequest` is one)."""

    @property
    def cancel(self) -> threading.Event:
        """Set when the request's consumer goes away (or the engine closes)."""
        ...

    @property
    def prompt_tokens(self) -> int:
        """Its prompt's length: what its prefill costs this iteration's budget."""
        ...


class Channel(Protocol):
    """Where a request's events go (`services.llm.stream.RequestChannel` is one); the
    scheduler itself only ends requests, the runner's output stream sends their events."""

    def send(self, event: GenerationEvent) -> None:
        """Hand an event to the request's consumer."""
        ...

    def finish(self, error: BaseException | None = None) -> None:
        """End the request: its error (if any), then the end; what it holds is released."""
        ...


J = TypeVar("J", bound=Job)
R = TypeVar("R")


@dataclass(eq=False)
class Waiting(Generic[J]):
    """A request queued for admission: where its events go, its logging context."""

    job: J
    channel: Channel
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


class Scheduler(Generic[J, R]):
    """Queues, admission, the running rows per adapter version, limits and cancellation.

    Args:
        max_queued: Most requests held, waiting or running; one more is refused at once.
        max_batch_size: Most rows running together (all versions); more wait for a row to free.
        max_prefill_tokens: Prompt tokens admitted per iteration (at least one request's).
    """

    def __init__(self, *, max_queued: int, max_batch_size: int, max_prefill_tokens: int) -> None:
        self.max_queued = max_queued
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.closed = False
        self.held = 0  # requests between the check in `hold` and their end (event loop only)
        self._active: set[J] = set()  # held and queued or running: cancelled by close()
        self._lock = threading.Lock()  # guards _waiting and _looping
        self._waiting: deque[Waiting[J]] = deque()
        self._looping = False  # the loop is submitted or running
        self._running: dict[str, list[R]] = {}  # worker thread only: rows by adapter version

    # -- the event loop's side ----------------------------------------------------------------

    def hold(self) -> None:
        """Count a new request in, or refuse it.

        Raises:
            UnavailableError: The engine is closing.
            ResourceExhaustedError: `max_queued` requests are held already.
        """
        if self.closed:
            raise UnavailableError(SHUTTING_DOWN)
        if self.held >= self.max_queued:
            raise ResourceExhaustedError(
                f"the LLM service holds {self.held} requests (queued or running), its limit "
                f"(MODALMESH_LLM_MAX_QUEUED={self.max_queued}); retry later"
            )
        self.held += 1

    def unhold(self) -> None:
        """A held request has ended (or was refused after `hold`)."""
        self.held -= 1

    def track(self, job: J) -> None:
        """A request that `close` must cancel from now on."""
        self._active.add(job)

    def untrack(self, job: J) -> None:
        """A request whose consumer is done with it."""
        self._active.discard(job)

    def submit(self, waiting: Waiting[J]) -> bool:
        """Queue a request; whether the caller must start the loop (it was not running)."""
        with self._lock:
            self._waiting.append(waiting)
            if self._looping:
                return False
            self._looping = True
            return True

    def close(self) -> None:
        """Refuse new requests and cancel every one held (their rows end after their next token)."""
        self.closed = True
        for job in list(self._active):
            job.cancel.set()

    # -- the worker thread's side -------------------------------------------------------------

    def idle(self) -> bool:
        """Whether nothing waits or runs; if so the loop is marked stopped (it must return)."""
        with self._lock:
            if self._waiting or self._running:
                return False
            self._looping = False
            return True

    @property
    def running(self) -> int:
        """Rows running, in all batches."""
        return sum(len(rows) for rows in self._running.values())

    def admit(self) -> Iterator[Waiting[J]]:
        """This iteration's admissions, in arrival order, for the caller to prefill.

        Each is yielded while the batches have room and the prefill budget lasts (at least one
        per iteration); the room is counted again after each, so a request that the caller
        `join`s takes a row and one that ended at its first token does not.
        """
        budget = self.max_prefill_tokens
        while self.running < self.max_batch_size:
            with self._lock:
                if not self._waiting:
                    return
                waiting = self._waiting[0]
                size = waiting.job.prompt_tokens
                if budget < self.max_prefill_tokens and size > budget:
                    return
                self._waiting.popleft()
            budget -= size
            if self.closed:
                waiting.channel.finish(UnavailableError(SHUTTING_DOWN))
                continue
            yield waiting

    def join(self, key: str, row: R) -> None:
        """A prefilled request's row joins the batch of its adapter version `key`."""
        self._running.setdefault(key, []).append(row)

    def batches(self) -> list[tuple[str, list[R]]]:
        """The running batches to step this iteration, in turn: (version key, rows in order)."""
        return list(self._running.items())

    def keep(self, key: str, rows: list[R]) -> None:
        """After a step of batch `key`: the rows that go on (in order); an empty batch goes."""
        if rows:
            self._running[key] = rows
        else:
            del self._running[key]

    def check_cancelled(self, job: J, tokens: int | None) -> None:
        """End a request whose consumer went away (or the engine closed).

        Args:
            job: The request.
            tokens: Tokens it has generated; None before its prefill.

        Raises:
            CancelledError: It was cancelled.
            UnavailableError: It was running when the engine closed.
        """
        if not job.cancel.is_set():
            return
        if tokens is None:
            raise CancelledError("request cancelled before it started")
        logger.info("cancelled after %s tokens", tokens)
        if self.closed:
            raise UnavailableError("the LLM engine shut down during this request")
        raise CancelledError(f"request cancelled after {tokens} tokens")

    def drop_running(self) -> list[R]:
        """Every running row, removed (the loop failed: the caller ends them)."""
        rows = [row for batch in self._running.values() for row in batch]
        self._running.clear()
        return rows

    def loop_ended(self, error: BaseException) -> None:
        """The loop stopped with requests left (it failed, or could not start): the next
        submit starts a new one; the requests waiting now end with `error`."""
        with self._lock:
            self._looping = False
        self.fail_waiting(error)

    def fail_waiting(self, error: BaseException) -> None:
        """End every waiting request with `error` (the engine closed, or its loop failed)."""
        while True:
            with self._lock:
                if not self._waiting:
                    return
                waiting = self._waiting.popleft()
            waiting.channel.finish(error)
