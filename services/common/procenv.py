"""How modalmesh starts, watches and stops processes: the environment a service starts with,
a child in its own process group that dies with its parent, stopping that group (SIGTERM, then
SIGKILL after a grace period), and serving until SIGTERM/SIGINT or until what is served dies.

Written once here for the three places that start or stop processes: `modalmesh up`
(`modalmesh.stack`, one group per service), the trainer's launcher (`services.trainer.launcher`,
one group per training run) and the Triton services' serve loop
(`services.common.triton_service`, which stops on a signal or when Triton dies).

The allocator: glibc's allocator serves a request of more than 128 KiB (its dynamic threshold
grows to at most 32 MiB) from a fresh mmap and gives it back on free, and gives back free heap
above 128 KiB; so every MB-sized buffer a request makes (feature tensors, their protobuf bytes,
gRPC's receive buffers) starts with a page fault per 4 KiB page. Measured with
`python -m bench --only transport`: a 576x4096 FP16 feature tensor (4.7 MB) crosses gRPC in
about 11 ms by default and about 5.5 ms with buffers below 64 MiB kept in the heap and up to
128 MiB of free heap kept. `GLIBC_TUNABLES` is read at process start, so it has to be in the
environment a service starts with; an operator's own setting is kept.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

logger = logging.getLogger(__name__)

MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=134217728"
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def service_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with modalmesh's allocator settings, unless it sets GLIBC_TUNABLES itself."""
    out = dict(env)
    out.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
    return out


# -- start ---------------------------------------------------------------------------------------
def set_parent_death_signal(sig: int) -> None:
    """Ask Linux to send `sig` to this process when its parent exits (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())


def start_group(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log: IO[bytes],
    cwd: str | Path | None = None,
    parent_death_signal: int = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    """Start `argv` as the leader of a new session (its pid is the group id), stdin closed,
    stdout and stderr into `log`, told `parent_death_signal` if this process dies first.

    `stop_group(popen.pid, wait=popen)` then stops it and every process it started.
    """
    return subprocess.Popen(
        list(argv),
        env=dict(env),
        cwd=None if cwd is None else str(cwd),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: set_parent_death_signal(parent_death_signal),  # between fork and exec
    )


# -- stop ----------------------------------------------------------------------------------------
def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` still exists (zombies count until reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pgid: int, *, grace_s: float = 10.0, wait: subprocess.Popen[bytes] | None = None) -> int:
    """Stop every process of group `pgid`: SIGTERM, then SIGKILL after `grace_s`.

    The group, not only its leader, is waited for, so children the leader left behind (e.g.
    tritonserver, a rank) are stopped too; what still runs after the grace is killed.

    Args:
        pgid: The group, i.e. the pid of a `start_group` leader.
        grace_s: How long the group has after SIGTERM (to drain, to write a checkpoint).
        wait: The leader's Popen, reaped here; its exit code is returned.

    Returns:
        The leader's exit code (-9 when killed), or 0 without `wait`.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if wait is not None:
                wait.poll()
            if not group_alive(pgid):
                break
            time.sleep(0.1)
        else:
            if sig == signal.SIGTERM:
                logger.warning("process group %s still alive %.0fs after SIGTERM; killing it", pgid, grace_s)
            continue
        break
    if wait is not None:
        try:
            return wait.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return -9
    return 0


# -- serve until stopped -------------------------------------------------------------------------
class StopSignals:
    """While entered, SIGTERM and SIGINT set `event` (and name the signal) instead of raising;
    the previous handlers come back on exit. Install from the main thread.

    Args:
        on_signal: Called in the handler with the signal's name (e.g. to log it).
    """

    def __init__(self, on_signal: Callable[[str], None] | None = None) -> None:
        self.event = threading.Event()
        self.received: str | None = None
        self._on_signal = on_signal
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        if self._on_signal is not None:
            self._on_signal(self.received)
        self.event.set()

    def __enter__(self) -> StopSignals:
        self._old = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def watch(self, alive: Callable[[], bool], *, poll_s: float) -> bool:
        """Block until a stop signal (True) or until `alive()` turns false (False)."""
        while not self.event.is_set():
            if not alive():
                return False
            self.event.wait(poll_s)
        return True
