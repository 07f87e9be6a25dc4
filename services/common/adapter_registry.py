"""The adapter registry in Redis: published versions, the current pointer, and change events.

Keys (every name is an adapter name such as "tiny"; versions are decimal strings):

    mm:adapters:names                 set of adapter names ever recorded
    mm:adapters:<name>:versions       hash version -> JSON VersionInfo {path, stage, preset,
                                      base_fingerprint, job_id, created, metrics}
    mm:adapters:<name>:current        string: the version new requests get
    mm:adapters:<name>:seq            the last version number handed out by allocate_version
    mm:adapters:events                pub/sub channel of JSON AdapterEvent
                                      {"event": "published"|"current", "name", "version",
                                       "path", "preset"}

The bundles themselves live in the artifact store (a folder or shared volume); the registry
only points at them. A rollback is a pointer move. Nothing here imports torch, so the trainer,
the CLI and the gateway can use it cheaply. Redis calls raise redis' own errors; wrap calls
that must survive a Redis restart in `retry_redis`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import WatchError
from redis.retry import Retry

from services.common.errors import InvalidArgumentError, NotFoundError, UnavailableError

logger = logging.getLogger(__name__)

PREFIX = "mm:adapters:"
NAMES_KEY = PREFIX + "names"
EVENTS_CHANNEL = PREFIX + "events"
EventKind = Literal["published", "current"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
T = TypeVar("T")


def versions_key(name: str) -> str:
    return f"{PREFIX}{name}:versions"


def current_key(name: str) -> str:
    return f"{PREFIX}{name}:current"


def seq_key(name: str) -> str:
    return f"{PREFIX}{name}:seq"


def version_order(version: str) -> tuple[int, int, str]:
    """Sort key: integer versions numerically ("2" < "10"), then any others by name."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def sorted_versions(versions: Iterable[str]) -> list[str]:
    return sorted(versions, key=version_order)


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise InvalidArgumentError(f"adapter name: expected letters, digits, '_', '.', '-', got {name!r}")


def _check_version(version: str) -> None:
    if not _VERSION.match(version):
        raise InvalidArgumentError(f"adapter version: expected e.g. '3', got {version!r}")


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class VersionInfo:
    """What the registry knows of one published version."""

    path: str
    stage: str = ""
    preset: str = ""
    base_fingerprint: str = ""
    job_id: str | None = None
    created: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> VersionInfo:
        """Parse a stored entry; unknown fields are ignored (newer writers may add some)."""
        raw = json.loads(text)
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)


@dataclass(frozen=True)
class AdapterEvent:
    """A message on the events channel."""

    event: EventKind
    name: str
    version: str
    path: str
    preset: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def parse(cls, data: str | bytes) -> AdapterEvent | None:
        """The event in a pub/sub message's data, or None (logged) if it is not one."""
        try:
            raw = json.loads(data)
            event = cls(
                event=raw["event"],
                name=str(raw["name"]),
                version=str(raw["version"]),
                path=str(raw.get("path", "")),
                preset=str(raw.get("preset", "")),
            )
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring a malformed adapter event %r: %s", data, e)
            return None
        if event.event not in ("published", "current"):
            logger.warning("ignoring an adapter event of unknown kind %r", event.event)
            return None
        return event


class AdapterRegistry:
    """Versions, current pointers and events of adapters, in one Redis.

    Args:
        client: A redis.Redis client (string or bytes responses both work).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._r: Any = client  # redis-py's sync return types are unions with Awaitable

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 5.0) -> AdapterRegistry:
        """A registry on the Redis at `url` (connects lazily; no silent retries: see `retry_redis`)."""
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            health_check_interval=10,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client)

    def names(self) -> list[str]:
        """Every adapter name recorded, sorted."""
        return sorted(_str(n) for n in self._r.smembers(NAMES_KEY))

    def record(self, name: str, version: str, info: VersionInfo, *, announce: bool = True) -> None:
        """Record (or overwrite) a version; with `announce`, publish a "published" event."""
        _check_name(name)
        _check_version(version)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(versions_key(name), version, info.to_json())
        pipe.sadd(NAMES_KEY, name)
        pipe.execute()
        if announce:
            self.announce(AdapterEvent("published", name, version, info.path, info.preset))

    def record_if_absent(self, name: str, version: str, info: VersionInfo) -> bool:
        """Record a version unless it is already known (no event); True if it was written."""
        _check_name(name)
        _check_version(version)
        written = bool(self._r.hsetnx(versions_key(name), version, info.to_json()))
        self._r.sadd(NAMES_KEY, name)
        return written

    def versions(self, name: str) -> dict[str, VersionInfo]:
        """Every recorded version of `name`, in version order."""
        raw = {_str(k): v for k, v in self._r.hgetall(versions_key(name)).items()}
        return {v: VersionInfo.from_json(raw[v]) for v in sorted_versions(raw)}

    def info(self, name: str, version: str) -> VersionInfo | None:
        """One version's entry, or None."""
        raw = self._r.hget(versions_key(name), version)
        return None if raw is None else VersionInfo.from_json(raw)

    def current(self, name: str) -> str | None:
        """The current version of `name`, or None if none was set."""
        value = self._r.get(current_key(name))
        return None if value is None else _str(value)

    def set_current(self, name: str, version: str, *, announce: bool = True) -> VersionInfo:
        """Move the current pointer (a rollback is this); with `announce`, publish a "current" event.

        Raises:
            NotFoundError: `version` is not recorded; the message lists the known ones.
        """
        info = self.info(name, version)
        if info is None:
            known = list(self.versions(name))
            raise NotFoundError(f"adapter {name}: no version {version!r}; known versions: {known}")
        self._r.set(current_key(name), version)
        if announce:
            self.announce(AdapterEvent("current", name, version, info.path, info.preset))
        return info

    def set_current_if_absent(self, name: str, version: str) -> bool:
        """Set the current pointer only if none is set (no event); True if it was set."""
        return bool(self._r.set(current_key(name), version, nx=True))

    def allocate_version(self, name: str, artifact_dir: Path | None = None) -> str:
        """Hand out the next version number of `name`; two callers never get the same one.

        Next = max(the last one handed out, the highest recorded, the highest numeric folder
        under `artifact_dir/name`, 1) + 1; "1" is left to the preset's initial bundle.
        Atomic through WATCH/MULTI on the counter and the versions hash.
        """
        _check_name(name)
        on_disk = 0
        folder = artifact_dir / name if artifact_dir is not None else None
        if folder is not None and folder.is_dir():
            on_disk = max((int(p.name) for p in folder.iterdir() if p.name.isdigit()), default=0)
        with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(seq_key(name), versions_key(name))
                    seq = int(_str(pipe.get(seq_key(name)) or 0))
                    recorded = [_str(v) for v in pipe.hkeys(versions_key(name))]
                    known = max((int(v) for v in recorded if v.isdigit()), default=0)
                    allocated = max(seq, known, on_disk, 1) + 1
                    pipe.multi()
                    pipe.set(seq_key(name), allocated)
                    pipe.execute()
                    return str(allocated)
                except WatchError:
                    continue

    def announce(self, event: AdapterEvent) -> int:
        """Publish an event; returns how many subscribers got it."""
        return int(self._r.publish(EVENTS_CHANNEL, event.to_json()))

    def subscribe(self) -> redis.client.PubSub:
        """A PubSub subscribed to the events channel (subscribe confirmations included).

        Read it with `get_message(timeout=...)` and `AdapterEvent.parse(message["data"])` for
        messages of type "message"; a "subscribe" message means (re)subscribed: events may have
        been missed before it, so re-read `current()`.
        """
        pubsub = self.client.pubsub()
        pubsub.subscribe(EVENTS_CHANNEL)
        return pubsub


def retry_redis(
    call: Callable[[], T],
    *,
    what: str,
    deadline_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `call`, retrying with backoff (0.2 s doubling to 2 s) while Redis cannot be reached.

    Only connection failures and timeouts are retried; other errors pass through at once.

    Raises:
        UnavailableError: Redis stayed unreachable for `deadline_s` seconds.
    """
    deadline = time.monotonic() + deadline_s
    delay = 0.2
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UnavailableError(f"{what}: redis is unavailable: {e}") from e
            logger.warning("%s: redis is unavailable (%s); retrying in %.1fs", what, e, min(delay, left))
            sleep(min(delay, left))
            delay = min(delay * 2, 2.0)
