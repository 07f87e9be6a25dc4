"""The bounded worker lifetime (services/trainer/lifetime.py) and its command-line flags."""

from __future__ import annotations

import threading

import pytest

from services.trainer.__main__ import parse_args
from services.trainer.lifetime import Lifetime, watch


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_unbounded_never_stops() -> None:
    life = Lifetime()
    assert not life.bounded
    assert life.stop_reason(taken=1000, busy=False, idle_for_s=1e9) is None


def test_max_jobs_stops_only_when_the_last_job_has_ended() -> None:
    life = Lifetime(max_jobs=1)
    assert life.stop_reason(taken=0, busy=False, idle_for_s=1e9) is None  # no idle bound
    assert life.stop_reason(taken=1, busy=True, idle_for_s=0) is None  # the job runs
    assert life.stop_reason(taken=1, busy=False, idle_for_s=0) == "1 of max 1 jobs done"


def test_idle_exit_counts_from_the_last_activity_and_never_interrupts_a_job() -> None:
    life = Lifetime(idle_exit_s=60)
    assert life.stop_reason(taken=0, busy=False, idle_for_s=59.9) is None
    assert life.stop_reason(taken=0, busy=True, idle_for_s=600) is None
    reason = life.stop_reason(taken=0, busy=False, idle_for_s=60)
    assert reason is not None and "idle" in reason


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_jobs": 0}, "max_jobs: expected a positive"), ({"idle_exit_s": -1.0}, "idle_exit_s: expected")],
)
def test_bad_bounds_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Lifetime(**kwargs)  # type: ignore[arg-type]


def test_watch_waits_for_the_job_then_shuts_down_once() -> None:
    """Idle bound 10 s, a job arrives after 5 s and runs 30 s: the stop comes 10 s after its end."""
    clock = FakeClock()
    timeline = [(0, False)] * 5 + [(1, True)] * 30 + [(1, False)] * 20  # one entry per poll
    reasons: list[str] = []
    stop_times: list[float] = []
    polls = iter(timeline)

    def counts() -> tuple[int, bool]:
        clock.now += 1.0
        return next(polls)

    def shutdown(reason: str) -> None:
        reasons.append(reason)
        stop_times.append(clock.now)

    watch(
        Lifetime(idle_exit_s=10), threading.Event(), counts=counts, shutdown=shutdown, clock=clock, poll_s=0
    )
    assert len(reasons) == 1 and "idle" in reasons[0]
    last_busy = 100.0 + 35  # the 35th poll is the job's last
    assert stop_times == [last_busy + 10]


def test_watch_returns_when_the_worker_stops_first() -> None:
    stop = threading.Event()
    stop.set()
    called: list[str] = []
    watch(Lifetime(max_jobs=1), stop, counts=lambda: (1, False), shutdown=called.append, poll_s=0)
    assert called == []


def test_command_line_flags() -> None:
    args, life = parse_args(["--hardware", "gpu", "--max-jobs", "1", "--idle-exit-s", "600"])
    assert args.hardware == "gpu" and life == Lifetime(max_jobs=1, idle_exit_s=600.0)
    assert parse_args([])[1] == Lifetime()


def test_bad_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--max-jobs", "0"])
    assert exc.value.code == 2
    assert "max_jobs: expected a positive number of jobs, got 0" in capsys.readouterr().err
