"""Keeping one LLM replica's adapter versions in step with the registry in Redis.

At start (`initial_sync`, before the replica reports SERVING): record the preset's start
bundle in the registry if the registry does not know that version yet (and make it current
if no version is), then switch to the registry's current version if it differs. Then a
background thread (`start`) follows the events channel:

- "published": load and verify the new version in the background (it becomes pinnable);
- "current": switch to that version, loading it first if needed (this is also how a
  rollback arrives).

Events of other adapter names or presets are ignored. A bundle that fails verification is
refused with an ERROR log naming the reason, and the version served so far stays current. If
Redis goes away the thread reconnects with backoff (0.5 s doubling to 30 s) and, once
subscribed again, re-reads the current pointer, so a switch announced meanwhile is not
missed; requests are served throughout. `catalog` gives the engine the registry's versions
for loading a pinned version on demand.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import redis

from services.common.adapter_registry import AdapterEvent, AdapterRegistry, VersionInfo
from services.common.errors import ModalmeshError
from services.llm.adapter_manager import AdapterManager

logger = logging.getLogger(__name__)

_REDIS_ERRORS = (redis.RedisError, OSError)


class AdapterSync:
    """Follows the registry for one replica's adapter name.

    Args:
        manager: The engine's adapter manager.
        registry: The registry (e.g. `AdapterRegistry.from_url(settings.redis_url, timeout_s=2)`).
        max_backoff_s: Longest wait between reconnection attempts.
    """

    def __init__(
        self, manager: AdapterManager, registry: AdapterRegistry, *, max_backoff_s: float = 30.0
    ) -> None:
        self.manager = manager
        self.registry = registry
        self.name = manager.name
        self.preset = manager.preset.name
        self.max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refused: dict[tuple[str, str], str] = {}  # (version, path) -> why

    # -- start-up -------------------------------------------------------------------------

    def initial_sync(self) -> bool:
        """Seed the registry and follow its current pointer once; False if Redis is unreachable."""
        try:
            self._seed()
            self._follow_current()
        except _REDIS_ERRORS as e:
            logger.warning(
                "adapter registry unreachable (%s); serving %s until it answers", e, self.manager.current.ref
            )
            return False
        return True

    def _seed(self) -> None:
        start = self.manager.start
        info = VersionInfo(
            path=str(start.bundle.path),
            stage=start.bundle.stage,
            preset=self.preset,
            base_fingerprint=self.manager.fingerprint,
            created=start.bundle.created,
        )
        if self.registry.record_if_absent(self.name, start.version, info):
            logger.info("recorded the preset's adapter %s in the registry", start.ref)
        self.registry.set_current_if_absent(self.name, start.version)

    def _follow_current(self) -> None:
        version = self.registry.current(self.name)
        if version is not None and version != self.manager.current.version:
            self._switch(version, path=None)

    # -- events ---------------------------------------------------------------------------

    def handle(self, event: AdapterEvent) -> None:
        """Act on one event (called by the thread; public for tests)."""
        if event.name != self.name or (event.preset and event.preset != self.preset):
            logger.debug("ignoring adapter event for %s@%s (%s)", event.name, event.version, event.preset)
            return
        if event.event == "current":
            self._switch(event.version, path=event.path or None)
        elif self.manager.get(event.version) is None:
            self._load(event.version, event.path, make_current=False)

    def _switch(self, version: str, *, path: str | None) -> None:
        if self.manager.get(version) is not None:
            self.manager.set_current(version)
            return
        info = self.registry.info(self.name, version)
        if info is not None:
            if info.preset and info.preset != self.preset:
                logger.warning("not switching to %s@%s: it is for preset %s", self.name, version, info.preset)
                return
            path = info.path
        if not path:
            logger.error("cannot switch to %s@%s: the registry has no path for it", self.name, version)
            return
        self._load(version, path, make_current=True)

    def _load(self, version: str, path: str, *, make_current: bool) -> None:
        ref = f"{self.name}@{version}"
        why = self._refused.get((version, path))
        if why is not None:
            logger.error("adapter %s stays refused: %s; still serving %s", ref, why, self.manager.current.ref)
            return
        try:
            self.manager.load(Path(path), make_current=make_current, expect_version=version)
        except ModalmeshError as e:
            self._refused[(version, path)] = e.message
            logger.error("refused adapter %s: %s; still serving %s", ref, e.message, self.manager.current.ref)
        except Exception as e:  # an unexpected failure must not stop the thread or the service
            logger.error("refused adapter %s: %s: %s", ref, type(e).__name__, e, exc_info=e)

    def catalog(self) -> dict[str, Path]:
        """Versions of this adapter the registry knows (for this preset), with their paths."""
        return {
            v: Path(i.path)
            for v, i in self.registry.versions(self.name).items()
            if not i.preset or i.preset == self.preset
        }

    # -- the thread -----------------------------------------------------------------------

    def start(self) -> None:
        """Follow the events channel on a daemon thread until `stop`."""
        self._thread = threading.Thread(target=self._run, name="adapter-sync", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (it notices within about a second)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        backoff, outage = 0.5, False
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.registry.subscribe()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":  # (re)subscribed: catch up on what was missed
                        self._seed()
                        self._follow_current()
                        if outage:
                            logger.info("adapter registry reachable again; following adapter events")
                        backoff, outage = 0.5, False
                    elif message["type"] == "message" and (event := AdapterEvent.parse(message["data"])):
                        self.handle(event)
            except _REDIS_ERRORS as e:
                log = logger.debug if outage else logger.warning
                log("adapter events: redis unavailable (%s); retrying in %.1fs", e, backoff)
                outage = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(*_REDIS_ERRORS):
                        pubsub.close()
