"""The service processes' environment (allocator settings added, an operator's own kept),
stopping a whole process group (grandchildren included) within its grace, and waiting for a
stop signal or a dead child."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.procenv import (
    MALLOC_TUNABLES,
    StopSignals,
    group_alive,
    service_env,
    start_group,
    stop_group,
)
from tests.helpers.procs import group_members, pid_alive, wait_until


def test_the_allocator_settings_are_added_and_an_operators_own_are_kept() -> None:
    env = service_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": MALLOC_TUNABLES}
    assert (
        service_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
        == "glibc.malloc.arena_max=2"
    )


FAULTS = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 40 << 20
def once():
    p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(env: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_with_the_settings_a_freed_40_mib_buffer_is_reused_without_page_faults() -> None:
    """40 MiB: eight frames of 576x4096 FP16 features. By default glibc maps such a buffer fresh
    on every malloc (above its 32 MiB dynamic threshold) and unmaps it on free, so writing it
    faults in 10240 pages each time; with the settings the next one reuses the heap."""
    default = faults({k: v for k, v in service_env({}).items() if k != "GLIBC_TUNABLES"})
    tuned = faults(service_env({}))
    assert default > 10 * 5000, default
    assert tuned < 200, tuned


# -- process groups (the trainer's launcher and `modalmesh up`) ---------------------------------


@pytest.fixture
def group() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Started groups; whatever a test leaves is SIGKILLed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for popen in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=5)


def spawn(started: list[subprocess.Popen[bytes]], script: str, members: int) -> subprocess.Popen[bytes]:
    popen = subprocess.Popen(["bash", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL)
    started.append(popen)
    wait_until(lambda: len(group_members(popen.pid)) >= members, timeout=5, what=f"{members} processes")
    return popen


def test_stop_group_terminates_the_leader_and_its_children_within_the_grace(
    group: list[subprocess.Popen[bytes]],
) -> None:
    # Like torchrun: the leader traps SIGTERM and waits for its children (our grandchildren), so
    # it only exits once they are gone; signalling the leader alone would leave it waiting.
    popen = spawn(group, 'trap "wait; exit 143" TERM; sleep 100 & sleep 100 & wait', members=3)
    pids = group_members(popen.pid)
    assert group_alive(popen.pid)
    started = time.monotonic()
    rc = stop_group(popen.pid, grace_s=30.0, wait=popen)
    assert time.monotonic() - started < 15  # SIGTERM was enough: no wait for the (long) grace
    assert rc == 143
    assert not any(pid_alive(p) for p in pids)
    assert not group_alive(popen.pid)


def test_stop_group_kills_a_group_that_ignores_sigterm_after_the_grace(
    group: list[subprocess.Popen[bytes]],
) -> None:
    # exec: a single process, so that no orphan is left for init to reap (which can be slow).
    popen = spawn(group, "trap '' TERM; exec sleep 100", members=1)
    # The trap is in place once bash has exec'd into sleep (an ignored signal stays ignored).
    wait_until(lambda: Path(f"/proc/{popen.pid}/comm").read_text().strip() == "sleep", timeout=5, what="exec")
    started = time.monotonic()
    rc = stop_group(popen.pid, grace_s=0.3, wait=popen)
    assert 0.3 <= time.monotonic() - started < 10  # SIGKILL only after the grace
    assert rc == -9
    assert not group_alive(popen.pid)


def test_stop_group_of_a_gone_group_returns_at_once() -> None:
    popen = subprocess.Popen(["true"], start_new_session=True)
    popen.wait(timeout=5)
    assert not group_alive(popen.pid)
    assert stop_group(popen.pid, grace_s=5.0) == 0


def test_start_group_leads_a_new_session_with_its_output_in_the_log(tmp_path: Path) -> None:
    log_path = tmp_path / "child.log"
    with log_path.open("ab") as log:
        popen = start_group(
            ["bash", "-c", 'echo "out $MARK"; echo err >&2; exec sleep 100'], env={"MARK": "m1"}, log=log
        )
    try:
        assert os.getpgid(popen.pid) == popen.pid  # the leader: its pid is the group id
        wait_until(lambda: "err" in log_path.read_text(), timeout=5, what="the child's output")
        assert log_path.read_text().splitlines() == ["out m1", "err"]
    finally:
        assert stop_group(popen.pid, grace_s=5.0, wait=popen) == -signal.SIGTERM
    assert not group_alive(popen.pid)


def test_stop_signals_end_the_watch_and_the_old_handlers_come_back() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    named: list[str] = []
    with StopSignals(on_signal=named.append) as signals:
        assert signals.watch(lambda: False, poll_s=0.01) is False  # what was watched died
        os.kill(os.getpid(), signal.SIGTERM)
        started = time.monotonic()
        assert signals.watch(lambda: True, poll_s=0.05) is True
        assert time.monotonic() - started < 5
    assert signals.received == "SIGTERM" and named == ["SIGTERM"]
    assert signal.getsignal(signal.SIGTERM) is previous
