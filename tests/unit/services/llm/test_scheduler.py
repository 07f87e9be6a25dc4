"""The scheduler on its own: back-pressure, the queue and the loop's lifecycle, admission (room,
prefill budget, FIFO), the running batches, cancellation and shutdown. No model, no tensors:
requests are plain jobs with a prompt length, and channels record how each request ended."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.common.errors import CancelledError, ResourceExhaustedError, UnavailableError
from services.llm.domain import GenerationEvent
from services.llm.scheduler import Scheduler, Waiting


@dataclass(eq=False)
class Job:
    prompt_tokens: int
    name: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class Ends:
    """A channel that records how its request ended (the scheduler never sends events)."""

    ended: list[BaseException | None] = field(default_factory=list)

    def send(self, event: GenerationEvent) -> None:
        raise AssertionError(f"the scheduler sent an event: {event}")

    def finish(self, error: BaseException | None = None) -> None:
        self.ended.append(error)


def scheduler(*, queued: int = 8, batch: int = 4, prefill: int = 100) -> Scheduler[Job, str]:
    return Scheduler(max_queued=queued, max_batch_size=batch, max_prefill_tokens=prefill)


def queue(s: Scheduler[Job, str], *sizes: int) -> list[Waiting[Job]]:
    waiting = [Waiting(Job(size, f"r{i}"), Ends()) for i, size in enumerate(sizes)]
    for w in waiting:
        s.submit(w)
    return waiting


def names(waiting: list[Waiting[Job]]) -> list[str]:
    return [w.job.name for w in waiting]


# -- back-pressure --------------------------------------------------------------------------


def test_one_request_over_max_queued_is_refused_at_once_and_a_freed_place_is_taken_again() -> None:
    s = scheduler(queued=2)
    s.hold()
    s.hold()
    with pytest.raises(ResourceExhaustedError) as e:
        s.hold()
    assert e.value.message == (
        "the LLM service holds 2 requests (queued or running), its limit "
        "(MODALMESH_LLM_MAX_QUEUED=2); retry later"
    )
    assert s.held == 2
    s.unhold()
    s.hold()
    assert s.held == 2


def test_a_closed_scheduler_refuses_new_requests_and_cancels_the_tracked_ones() -> None:
    s = scheduler()
    kept, done = Job(1), Job(1)
    s.track(kept)
    s.track(done)
    s.untrack(done)
    s.close()
    assert kept.cancel.is_set() and not done.cancel.is_set()
    with pytest.raises(UnavailableError, match="shutting down"):
        s.hold()


# -- the queue and the loop -----------------------------------------------------------------


def test_the_first_submit_starts_the_loop_and_the_loop_stops_only_when_nothing_waits_or_runs() -> None:
    s = scheduler()
    first, second = Waiting(Job(5), Ends()), Waiting(Job(5), Ends())
    assert s.submit(first) is True  # the caller starts the loop
    assert s.submit(second) is False  # it is running already
    assert not s.idle()  # waiting requests
    admitted = list(s.admit())
    assert admitted == [first, second]
    s.join("a@1", "row")
    assert not s.idle()  # a running row
    s.keep("a@1", [])
    assert s.idle()  # the loop returns ...
    assert s.submit(Waiting(Job(5), Ends())) is True  # ... so the next request starts a new one


def test_a_loop_that_ended_early_fails_the_waiting_requests_and_the_next_submit_starts_one() -> None:
    s = scheduler()
    waiting = queue(s, 1, 2)
    error = UnavailableError("the LLM engine is shutting down")
    s.loop_ended(error)
    assert [w.channel.ended for w in waiting] == [[error], [error]]  # type: ignore[attr-defined]
    assert list(s.admit()) == []
    assert s.submit(Waiting(Job(1), Ends())) is True


# -- admission ------------------------------------------------------------------------------


def test_admission_is_fifo_and_stops_when_the_batches_are_full() -> None:
    s = scheduler(batch=3)
    s.join("a@1", "running")
    waiting = queue(s, 1, 1, 1, 1)
    admitted = []
    for w in s.admit():
        admitted.append(w)
        s.join("a@1", w.job.name)
    assert names(admitted) == ["r0", "r1"]  # 1 running + 2 = max_batch_size
    assert s.running == 3
    s.keep("a@1", ["r1"])  # two rows ended in the step
    assert names(list(s.admit())) == ["r2", "r3"]
    assert all(w.channel.ended == [] for w in waiting)  # type: ignore[attr-defined]


def test_a_request_that_ends_at_its_first_token_takes_no_row() -> None:
    s = scheduler(batch=1)
    queue(s, 1, 1, 1)
    assert names(list(s.admit())) == ["r0", "r1", "r2"]  # none joined: the room never filled


def test_the_prefill_budget_admits_the_first_request_whatever_its_size_then_what_fits() -> None:
    s = scheduler(prefill=10)
    queue(s, 30, 4)
    assert names(list(s.admit())) == ["r0"]  # over the budget alone, but first: admitted
    assert names(list(s.admit())) == ["r1"]
    queue(s, 4, 5, 2, 1)
    assert names(list(s.admit())) == ["r0", "r1"]  # 4 + 5 = 9; 2 more would be 11
    assert names(list(s.admit())) == ["r2", "r3"]  # FIFO: the small one never overtook


def test_a_request_still_queued_when_the_engine_closes_is_ended_not_admitted() -> None:
    s = scheduler()
    waiting = queue(s, 1, 1)
    s.close()
    assert list(s.admit()) == []
    for w in waiting:
        (error,) = w.channel.ended  # type: ignore[attr-defined]
        assert isinstance(error, UnavailableError) and "shutting down" in error.message
    s2 = scheduler()
    waiting = queue(s2, 1)
    s2.fail_waiting(UnavailableError("the LLM engine is shutting down"))
    assert len(waiting[0].channel.ended) == 1 and list(s2.admit()) == []  # type: ignore[attr-defined]


# -- the running batches --------------------------------------------------------------------


def test_rows_run_in_one_batch_per_adapter_version_in_the_order_they_joined() -> None:
    s = scheduler(batch=8)
    for key, row in [("a@1", "x"), ("b@2", "y"), ("a@1", "z")]:
        s.join(key, row)
    assert s.batches() == [("a@1", ["x", "z"]), ("b@2", ["y"])]
    assert s.running == 3
    s.keep("a@1", ["z"])
    s.keep("b@2", [])
    assert s.batches() == [("a@1", ["z"])]
    s.join("b@2", "w")  # a new batch of that version goes after the ones running
    assert [key for key, _ in s.batches()] == ["a@1", "b@2"]
    assert s.drop_running() == ["z", "w"]
    assert s.batches() == [] and s.running == 0


# -- cancellation ---------------------------------------------------------------------------


def test_a_cancelled_request_ends_with_what_cancelled_it() -> None:
    s = scheduler()
    job = Job(1)
    s.check_cancelled(job, None)
    s.check_cancelled(job, 3)  # not cancelled: nothing happens
    job.cancel.set()
    with pytest.raises(CancelledError, match="request cancelled before it started"):
        s.check_cancelled(job, None)
    with pytest.raises(CancelledError, match="request cancelled after 3 tokens"):
        s.check_cancelled(job, 3)
    s.close()
    with pytest.raises(UnavailableError, match="the LLM engine shut down during this request"):
        s.check_cancelled(job, 3)


def test_the_scheduler_module_imports_no_torch() -> None:
    code = (
        "import sys, services.llm.scheduler; print(sorted(m for m in sys.modules if m.startswith('torch')))"
    )
    root = Path(__file__).resolve().parents[4]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
