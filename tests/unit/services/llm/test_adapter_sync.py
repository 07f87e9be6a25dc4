"""Following the registry: start-up seeding and catch-up, events, refusals, Redis going away."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.adapter_registry import AdapterEvent, AdapterRegistry, VersionInfo
from services.common.presets import Preset
from services.llm.adapter_manager import AdapterManager
from services.llm.adapter_sync import AdapterSync
from services.models.lm.loading import load_model
from tests.helpers.bundles import make_bundle
from tests.helpers.procs import Process, free_port, wait_until
from tests.helpers.services import start_redis


@pytest.fixture(scope="module")
def bundles(tiny_preset: Preset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("store")
    return {
        "2": make_bundle(root / "2", tiny_preset, version="2", seed=2, lora=True),
        "3": make_bundle(root / "3", tiny_preset, version="3", seed=3),
        "4": make_bundle(root / "4", tiny_preset, version="4", seed=4, fingerprint="0" * 64),  # wrong base
    }


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[Process, str]]:
    proc, url = start_redis(tmp_path / "redis", appendonly=True)
    try:
        yield proc, url
    finally:
        proc.kill_group()


@pytest.fixture
def manager(tiny_preset: Preset) -> AdapterManager:
    return AdapterManager(load_model(tiny_preset))


def record(registry: AdapterRegistry, version: str, path: Path, preset: str = "tiny") -> None:
    registry.record("tiny", version, VersionInfo(path=str(path), preset=preset), announce=False)


def test_start_up_seeds_the_registry_then_follows_its_current_version(
    manager: AdapterManager, redis_server: tuple[Process, str], bundles: dict[str, Path], tiny_preset: Preset
) -> None:
    registry = AdapterRegistry.from_url(redis_server[1])
    sync = AdapterSync(manager, registry)
    assert sync.initial_sync()
    assert registry.current("tiny") == "1"
    assert registry.versions("tiny")["1"].path == str(tiny_preset.adapter.path)
    record(registry, "3", bundles["3"])
    registry.set_current("tiny", "3", announce=False)
    fresh = AdapterManager(load_model(tiny_preset))  # a replica starting now
    assert AdapterSync(fresh, registry).initial_sync()
    assert fresh.current.ref == "tiny@3" and fresh.refs() == ("tiny@1", "tiny@3")
    assert registry.versions("tiny")["1"].path == str(tiny_preset.adapter.path)  # not overwritten


def test_events(
    manager: AdapterManager,
    redis_server: tuple[Process, str],
    bundles: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = AdapterRegistry.from_url(redis_server[1])
    sync = AdapterSync(manager, registry)
    record(registry, "2", bundles["2"])
    sync.handle(AdapterEvent("published", "tiny", "2", str(bundles["2"]), "tiny"))
    assert (manager.current.ref, manager.refs()) == ("tiny@1", ("tiny@1", "tiny@2"))
    sync.handle(AdapterEvent("current", "tiny", "2", str(bundles["2"]), "tiny"))
    assert manager.current.ref == "tiny@2"
    sync.handle(AdapterEvent("current", "other", "3", str(bundles["3"]), "tiny"))
    sync.handle(AdapterEvent("current", "tiny", "3", str(bundles["3"]), "other-preset"))
    assert (manager.current.ref, manager.refs()) == ("tiny@2", ("tiny@1", "tiny@2"))
    sync.handle(AdapterEvent("current", "tiny", "1", "", "tiny"))  # a rollback: a pointer move
    assert manager.current.ref == "tiny@1"
    with caplog.at_level(logging.ERROR, logger="services.llm.adapter_sync"):
        sync.handle(AdapterEvent("published", "tiny", "4", str(bundles["4"]), "tiny"))
        sync.handle(AdapterEvent("current", "tiny", "4", str(bundles["4"]), "tiny"))
    assert [r.getMessage() for r in caplog.records] == [
        f"refused adapter tiny@4: adapter bundle {bundles['4']}: built for base model 000000000000..., "
        f"serving {manager.fingerprint[:12]}...; still serving tiny@1",
        f"adapter tiny@4 stays refused: adapter bundle {bundles['4']}: built for base model 000000000000..., "
        f"serving {manager.fingerprint[:12]}...; still serving tiny@1",
    ]
    assert (manager.current.ref, manager.refs()) == ("tiny@1", ("tiny@1", "tiny@2"))
    record(registry, "3", bundles["3"])
    assert sync.catalog() == {"2": bundles["2"], "3": bundles["3"]}


def test_the_thread_follows_events_and_survives_redis_restarts(
    manager: AdapterManager, bundles: dict[str, Path], tmp_path: Path
) -> None:
    port = free_port()
    down = AdapterRegistry.from_url(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    sync = AdapterSync(manager, down, max_backoff_s=0.5)
    assert not sync.initial_sync()  # no Redis yet: keep serving the start bundle
    sync.start()
    proc, url = start_redis(tmp_path / "redis", port=port, appendonly=True)
    try:
        registry = AdapterRegistry.from_url(url)
        wait_until(
            lambda: registry.current("tiny") == "1", timeout=10, what="the replica seeded the registry"
        )
        record(registry, "2", bundles["2"])
        registry.set_current("tiny", "2")
        wait_until(lambda: manager.current.ref == "tiny@2", timeout=20, what="switched to tiny@2")
        proc.terminate(timeout=10)  # Redis goes away; the replica keeps serving
        proc, url = start_redis(tmp_path / "redis", port=port, appendonly=True)
        record(registry, "3", bundles["3"])
        registry.set_current("tiny", "3")  # maybe before the thread is back: caught up on resubscribe
        wait_until(lambda: manager.current.ref == "tiny@3", timeout=20, what="switched to tiny@3")
    finally:
        sync.stop()
        proc.kill_group()
    assert sync._thread is not None and not sync._thread.is_alive()
