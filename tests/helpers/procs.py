"""Starting and stopping real service processes in tests.

    port = free_port()
    proc = start_process([sys.executable, "-m", "services.encoders", ...], log_path=tmp / "enc.log",
                         env={"MODALMESH_CACHE_DIR": str(tmp)})
    wait_until(lambda: is_ready(port), timeout=60, what="encoder ready", proc=proc)
    ...
    assert proc.terminate(timeout=30) == 0
    proc.kill_group()   # teardown: whatever is left of its process group

Each process runs in its own session (so its whole tree shares one process group that
teardown can kill) with stdout and stderr captured to a log file, which timeout messages quote.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from modalmesh.stack import free_port  # noqa: F401 - re-exported for the tests
from services.common.procenv import service_env

T = TypeVar("T")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports (all held open together while they are picked)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def listen_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports below Linux's ephemeral range (32768-60999 by default), for a stack
    that binds them minutes later: a port from `free_ports` (picked from the ephemeral range) can
    meanwhile become the local end of some process's outgoing connection."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(max(1024, low - 12000), low)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        ports.append(port)
    return ports


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, ... ([] if gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def pid_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def descendants(pid: int) -> set[int]:
    """Every live process whose parent chain leads to `pid` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for p in _pids():
        fields = _stat(p)
        if fields:
            children.setdefault(int(fields[1]), []).append(p)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {p for p in found if pid_alive(p)}


def group_members(pgid: int) -> set[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    members = set()
    for p in _pids():
        fields = _stat(p)
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.add(p)
    return members


def command_line(pid: int) -> str:
    """The command line of `pid` ("" if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


class Process:
    """A started process with its log file; see `start_process`."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def group_members(self) -> set[int]:
        """Live processes of its process group (itself and every child that did not leave it)."""
        return group_members(self.pid)

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to the process itself (not its group), as an orchestrator would."""
        if self.alive():
            self.popen.send_signal(sig)

    def terminate(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int:
        """Send `sig` (SIGTERM) to the process and wait for its exit code.

        Raises:
            subprocess.TimeoutExpired: It did not exit in time (it is then left running).
        """
        self.send_signal(sig)
        return self.popen.wait(timeout=timeout)

    def kill_group(self) -> None:
        """SIGKILL its whole process group and reap it (teardown; safe to call twice)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


def start_process(
    args: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None, cwd: str | Path | None = None
) -> Process:
    """Start `args` in a new session with stdout+stderr appended to `log_path`.

    Args:
        args: The command line.
        log_path: File that receives the output (appended; created with its folder).
        env: Variables added to (overriding) this process's environment.
        cwd: Working directory; default the current one.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = service_env({**os.environ, **(env or {})})  # as `modalmesh up` starts services
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    return Process(popen, log_path)


@contextlib.contextmanager
def running_process(
    args: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None, cwd: str | Path | None = None
) -> Iterator[Process]:
    """`start_process` as a context manager that kills the process group on exit."""
    proc = start_process(args, log_path=log_path, env=env, cwd=cwd)
    try:
        yield proc
    finally:
        proc.kill_group()


def stop_all(procs: Iterable[Process], *, timeout: float = 30.0) -> None:
    """Teardown of several processes, in the order given (pass them newest first): SIGTERM
    and wait up to `timeout` for each (a failure is ignored: its group is killed next), then
    SIGKILL what is left of its process group."""
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.terminate(timeout=timeout)
        proc.kill_group()


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float,
    interval: float = 0.2,
    what: str = "condition",
    proc: Process | None = None,
) -> T:
    """Poll `predicate` until it returns something truthy (returned); exceptions count as False.

    Args:
        predicate: What to poll.
        timeout: Seconds before giving up.
        interval: Seconds between polls.
        what: Named in the timeout message.
        proc: A process to watch: if it exits, fail at once; its log tail goes in the message.

    Raises:
        AssertionError: Timed out, or `proc` exited first.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:
            last_error = e
        if proc is not None and not proc.alive():
            raise AssertionError(
                f"{what}: process exited with {proc.popen.returncode} first; log:\n{proc.log_tail()}"
            )
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            log = f"; log:\n{proc.log_tail()}" if proc is not None else ""
            raise AssertionError(f"{what}: not true after {timeout}s{detail}{log}")
        time.sleep(interval)
