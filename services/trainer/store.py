"""Job records in Redis: our own store, so that Celery only carries the message.

Keys (prefix `mm:jobs`):
    mm:jobs:index            sorted set, job id -> created time
    mm:jobs:<id>             the whole JobRecord as JSON (one document: any write restores it)
    mm:jobs:<id>:cancel      set when a user asks to cancel
    mm:jobs:<id>:lease       the worker running it; expires unless renewed (heartbeat)

Writes retry while Redis is unreachable (a restart): the worker keeps the authoritative record
in memory and rewrites it whole, so a record lost with a non-persistent Redis comes back with
the next write.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from services.common.errors import NotFoundError, UnavailableError
from services.trainer.jobs import JobRecord

logger = logging.getLogger(__name__)

T = TypeVar("T")
PREFIX = "mm:jobs"


class JobStore:
    """Reads and writes job records.

    Args:
        client: A redis client (decode_responses=True).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(
            redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5)
        )

    def _retry(self, what: str, fn: Callable[[], T], deadline_s: float) -> T:
        end = time.monotonic() + deadline_s
        delay = 0.2
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                if time.monotonic() >= end:
                    raise UnavailableError(f"job store: Redis unreachable while {what}: {e}") from e
                logger.warning("job store: Redis unreachable while %s (%s); retrying", what, e)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def save(self, record: JobRecord, *, deadline_s: float = 5.0) -> None:
        """Write the whole record (retrying up to `deadline_s` while Redis is down)."""

        def write() -> None:
            pipe = self.client.pipeline()
            pipe.set(f"{PREFIX}:{record.id}", record.model_dump_json())
            pipe.zadd(f"{PREFIX}:index", {record.id: record.created})
            pipe.execute()

        self._retry(f"saving job {record.id}", write, deadline_s)

    def get(self, job_id: str) -> JobRecord:
        """Raises NotFoundError for an unknown id."""
        raw = self._retry(f"reading job {job_id}", lambda: self.client.get(f"{PREFIX}:{job_id}"), 5.0)
        if raw is None:
            raise NotFoundError(f"training job {job_id!r} not found", param="job_id")
        return JobRecord.model_validate_json(raw)

    def find(self, job_id: str) -> JobRecord | None:
        try:
            return self.get(job_id)
        except NotFoundError:
            return None

    def list(self, *, limit: int = 100) -> list[JobRecord]:
        """Most recent first."""
        ids = self._retry("listing jobs", lambda: self.client.zrevrange(f"{PREFIX}:index", 0, limit - 1), 5.0)
        out = []
        for job_id in ids:
            record = self.find(str(job_id))
            if record is not None:
                out.append(record)
        return out

    # -- cancel flag ------------------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> None:
        self._retry("setting a cancel flag", lambda: self.client.set(f"{PREFIX}:{job_id}:cancel", "1"), 5.0)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.client.exists(f"{PREFIX}:{job_id}:cancel"))

    # -- lease (heartbeat) ------------------------------------------------------------------------

    def acquire_lease(self, job_id: str, owner: str, ttl_s: float) -> bool:
        """Take the job's lease if nobody holds it (or we already do)."""
        key = f"{PREFIX}:{job_id}:lease"
        if self.client.set(key, owner, nx=True, px=int(ttl_s * 1000)):
            return True
        if self.client.get(key) == owner:
            self.client.pexpire(key, int(ttl_s * 1000))
            return True
        return False

    def renew_lease(self, job_id: str, owner: str, ttl_s: float) -> None:
        """Extend our lease; re-take it if Redis lost it (restart)."""
        key = f"{PREFIX}:{job_id}:lease"
        holder = self.client.get(key)
        if holder in (None, owner):
            self.client.set(key, owner, px=int(ttl_s * 1000))
        else:
            logger.error("job %s: lease is held by %s, not %s", job_id, holder, owner)

    def lease_holder(self, job_id: str) -> str | None:
        value = self.client.get(f"{PREFIX}:{job_id}:lease")
        return str(value) if value is not None else None

    def release_lease(self, job_id: str, owner: str) -> None:
        key = f"{PREFIX}:{job_id}:lease"
        if self.client.get(key) == owner:
            self.client.delete(key)

    def claim_requeue(self, job_id: str, ttl_s: float) -> bool:
        """One reconciler (of several workers) wins the right to requeue a job."""
        return bool(self.client.set(f"{PREFIX}:{job_id}:requeue", "1", nx=True, px=int(ttl_s * 1000)))
