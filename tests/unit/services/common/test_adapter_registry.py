"""The adapter registry against a private redis-server: versions, pointer, events, allocation."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import redis

from services.common.adapter_registry import (
    EVENTS_CHANNEL,
    AdapterEvent,
    AdapterRegistry,
    VersionInfo,
    retry_redis,
    sorted_versions,
)
from services.common.errors import InvalidArgumentError, NotFoundError, UnavailableError
from tests.helpers.procs import free_port


@pytest.fixture
def registry(redis_url: str) -> AdapterRegistry:
    reg = AdapterRegistry.from_url(redis_url)
    reg.client.flushdb()
    return reg


def info(path: str = "/a", **kw: object) -> VersionInfo:
    return VersionInfo(path=path, stage="stage1", preset="tiny", base_fingerprint="f" * 64, **kw)  # type: ignore[arg-type]


def test_record_versions_and_the_key_layout(registry: AdapterRegistry) -> None:
    for v in ["10", "2", "1"]:
        registry.record("tiny", v, info(f"/a/{v}", job_id=f"job-{v}", metrics={"loss": 0.5}), announce=False)
    versions = registry.versions("tiny")
    assert list(versions) == ["1", "2", "10"]  # numeric order
    assert versions["10"] == info("/a/10", job_id="job-10", metrics={"loss": 0.5})
    raw = registry.client.hget("mm:adapters:tiny:versions", "2")
    assert json.loads(raw)["path"] == "/a/2"  # type: ignore[arg-type]
    assert registry.names() == ["tiny"] and registry.info("tiny", "3") is None
    assert sorted_versions(["b", "10", "9", "a"]) == ["9", "10", "a", "b"]


def test_current_pointer_and_unknown_versions(registry: AdapterRegistry) -> None:
    assert registry.current("tiny") is None
    registry.record("tiny", "1", info(), announce=False)
    registry.record("tiny", "2", info(), announce=False)
    registry.set_current("tiny", "2", announce=False)
    assert registry.current("tiny") == "2"
    assert registry.client.get("mm:adapters:tiny:current") == "2"
    with pytest.raises(NotFoundError, match=r"adapter tiny: no version '7'; known versions: \['1', '2'\]"):
        registry.set_current("tiny", "7")
    assert registry.current("tiny") == "2"
    assert not registry.set_current_if_absent("tiny", "1")
    assert registry.record_if_absent("tiny", "3", info("/three"))
    assert not registry.record_if_absent("tiny", "3", info("/other"))
    assert registry.versions("tiny")["3"].path == "/three"
    with pytest.raises(InvalidArgumentError, match="adapter version"):
        registry.record("tiny", "1@2", info())
    with pytest.raises(InvalidArgumentError, match="adapter name"):
        registry.record("a:b", "1", info())


def test_events_are_published_and_parsed(registry: AdapterRegistry) -> None:
    pubsub = registry.subscribe()
    try:
        first = pubsub.get_message(timeout=5)
        assert first is not None and first["type"] == "subscribe" and first["channel"] == EVENTS_CHANNEL
        registry.record("tiny", "2", info("/a/2"))
        registry.set_current("tiny", "2")
        events = []
        deadline = time.monotonic() + 5
        while len(events) < 2 and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1)
            if message and message["type"] == "message":
                events.append(AdapterEvent.parse(message["data"]))
    finally:
        pubsub.close()
    assert events == [
        AdapterEvent("published", "tiny", "2", "/a/2", "tiny"),
        AdapterEvent("current", "tiny", "2", "/a/2", "tiny"),
    ]
    assert AdapterEvent.parse("not json") is None
    assert AdapterEvent.parse('{"event": "deleted", "name": "x", "version": "1"}') is None


def test_version_info_ignores_unknown_fields() -> None:
    assert VersionInfo.from_json('{"path": "/p", "future": 1}') == VersionInfo(path="/p")


def test_allocation_starts_above_1_and_above_recorded_and_on_disk(
    registry: AdapterRegistry, tmp_path: Path
) -> None:
    assert registry.allocate_version("tiny", tmp_path) == "2"  # "1" is the preset's own bundle
    assert registry.allocate_version("tiny", tmp_path) == "3"
    registry.record("tiny", "9", info(), announce=False)
    assert registry.allocate_version("tiny", tmp_path) == "10"
    (tmp_path / "tiny" / "15").mkdir(parents=True)
    (tmp_path / "tiny" / ".tmp-16-x").mkdir()
    assert registry.allocate_version("tiny", tmp_path) == "16"
    assert registry.allocate_version("other") == "2"


def test_two_threads_never_get_the_same_version(registry: AdapterRegistry, redis_url: str) -> None:
    got: list[list[str]] = [[], []]

    def allocate(out: list[str]) -> None:
        own = AdapterRegistry.from_url(redis_url)  # its own connection, as another publisher
        for _ in range(25):
            out.append(own.allocate_version("tiny"))

    threads = [threading.Thread(target=allocate, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = got[0] + got[1]
    assert len(set(every)) == 50
    assert sorted(every, key=int) == [str(v) for v in range(2, 52)]


def test_retry_redis_waits_for_redis_then_gives_up() -> None:
    calls = {"n": 0}
    slept: list[float] = []

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 4:
            raise redis.ConnectionError("refused")
        return "ok"

    assert retry_redis(flaky, what="test", sleep=slept.append) == "ok"
    assert slept == [0.2, 0.4, 0.8]
    down = AdapterRegistry.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(UnavailableError, match="reading: redis is unavailable"):
        retry_redis(lambda: down.current("tiny"), what="reading", deadline_s=1.0)
    assert 0.9 < time.monotonic() - start < 5
    with pytest.raises(NotFoundError):  # other errors are not retried
        retry_redis(lambda: (_ for _ in ()).throw(NotFoundError("x")), what="t")
