"""Publishing bundles: verify, allocate, atomic copy, record, announce; rollback; Redis outages."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from services.common.adapter_registry import AdapterEvent, AdapterRegistry
from services.common.errors import FailedPreconditionError, NotFoundError
from services.models.checkpoints.bundle import load_bundle, write_bundle
from services.trainer import publisher
from services.trainer.publisher import publish_bundle, rollback
from tests.helpers.bundles import rehash
from tests.helpers.procs import free_port
from tests.helpers.services import start_redis

FP = "ab" * 32


@pytest.fixture
def registry(redis_url: str) -> AdapterRegistry:
    reg = AdapterRegistry.from_url(redis_url)
    reg.client.flushdb()
    return reg


def bundle(path: Path, *, name: str = "tiny", fingerprint: str = FP, mb: int = 0) -> Path:
    weights = {"fc.weight": torch.randn(4, 4)}
    if mb:
        weights["big"] = torch.zeros(mb * 256 * 1024)  # float32: mb MiB
    return write_bundle(
        path, name=name, version="unpublished", preset="tiny", base_fingerprint=fingerprint,
        connectors={"image": weights}, stage="stage1", metrics={"loss": 0.25},
    )  # fmt: skip


def publish(src: Path, registry: AdapterRegistry, store: Path, **kw: object) -> publisher.PublishedVersion:
    return publish_bundle(src, registry=registry, artifact_dir=store, name="tiny", base_fingerprint=FP, **kw)  # type: ignore[arg-type]


def test_publish_copies_stamps_records_and_announces(registry: AdapterRegistry, tmp_path: Path) -> None:
    src = bundle(tmp_path / "export")
    before = (src / "manifest.json").read_text()
    pubsub = registry.subscribe()
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    out = publish(src, registry, tmp_path / "store", job_id="job-7")
    assert (out.name, out.version, out.path, out.ref) == (
        "tiny",
        "2",
        tmp_path / "store" / "tiny" / "2",
        "tiny@2",
    )
    published = load_bundle(out.path, expected_fingerprint=FP)
    assert (published.version, published.manifest["job_id"], published.stage) == ("2", "job-7", "stage1")
    assert (src / "manifest.json").read_text() == before  # the export is left as it was
    info = registry.versions("tiny")["2"]
    assert (info.path, info.job_id, info.stage, info.metrics, info.preset) == (
        str(out.path), "job-7", "stage1", {"loss": 0.25}, "tiny",
    )  # fmt: skip
    assert registry.current("tiny") == "2"
    events = []
    while (message := pubsub.get_message(timeout=2)) is not None:
        events.append(AdapterEvent.parse(message["data"]))
    pubsub.close()
    assert [(e.event, e.version) for e in events if e] == [("published", "2"), ("current", "2")]
    assert [p.name for p in (tmp_path / "store" / "tiny").iterdir()] == ["2"]  # no temporary left


def test_publish_without_make_current_and_rollback(registry: AdapterRegistry, tmp_path: Path) -> None:
    first = publish(bundle(tmp_path / "a"), registry, tmp_path / "store")
    second = publish(bundle(tmp_path / "b"), registry, tmp_path / "store", make_current=False)
    assert (first.version, second.version, registry.current("tiny")) == ("2", "3", "2")
    rollback(registry, "tiny", "3")
    assert registry.current("tiny") == "3"
    with pytest.raises(NotFoundError, match=r"no version '9'; known versions: \['2', '3'\]"):
        rollback(registry, "tiny", "9")
    assert registry.current("tiny") == "3"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: bundle(p, fingerprint="cd" * 32), "built for base model cdcdcdcdcdcd"),
        (lambda p: bundle(p, name="other"), "named 'other', publishing as 'tiny'"),
        (
            lambda p: (bundle(p), (p / "connectors.safetensors").write_bytes(b"junk"), rehash(p, "connectors.safetensors")),
            r"connectors\.safetensors is not a valid safetensors file",
        ),
    ],
)  # fmt: skip
def test_a_bad_bundle_is_refused_before_a_version_is_taken(
    registry: AdapterRegistry, tmp_path: Path, make, message: str
) -> None:
    make(tmp_path / "bad")
    with pytest.raises(FailedPreconditionError, match=message):
        publish(tmp_path / "bad", registry, tmp_path / "store")
    assert registry.versions("tiny") == {} and registry.current("tiny") is None
    assert not (tmp_path / "store" / "tiny").exists() or not any((tmp_path / "store" / "tiny").iterdir())
    assert registry.allocate_version("tiny") == "2"


def test_a_failure_mid_copy_leaves_no_folder(
    registry: AdapterRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(path: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(publisher, "_fsync_tree", fail)
    with pytest.raises(OSError, match="disk full"):
        publish(bundle(tmp_path / "a"), registry, tmp_path / "store")
    assert list((tmp_path / "store" / "tiny").iterdir()) == []
    assert registry.versions("tiny") == {}


def test_a_reader_never_sees_a_partial_folder(registry: AdapterRegistry, tmp_path: Path) -> None:
    src = bundle(tmp_path / "big", mb=32)
    dest = tmp_path / "store" / "tiny" / "2"
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if dest.exists():
                seen.append(load_bundle(dest).version)
                return
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        publish(src, registry, tmp_path / "store")
    finally:
        done.set()
        watcher.join()
    assert seen == ["2"]  # complete and stamped the first time it was visible


def test_two_publishers_get_different_versions(
    registry: AdapterRegistry, redis_url: str, tmp_path: Path
) -> None:
    sources = [bundle(tmp_path / f"src{i}") for i in range(4)]
    results: list[str] = []

    def run(src: Path) -> None:
        results.append(publish(src, AdapterRegistry.from_url(redis_url), tmp_path / "store").version)

    threads = [threading.Thread(target=run, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=int) == ["2", "3", "4", "5"]
    assert sorted(p.name for p in (tmp_path / "store" / "tiny").iterdir()) == ["2", "3", "4", "5"]


def test_publish_waits_for_redis_to_come_back(tmp_path: Path) -> None:
    port = free_port()
    registry = AdapterRegistry.from_url(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    started: list[object] = []
    timer = threading.Timer(1.5, lambda: started.append(start_redis(tmp_path / "redis", port=port)[0]))
    timer.start()
    try:
        begin = time.monotonic()
        out = publish(bundle(tmp_path / "src"), registry, tmp_path / "store")
        assert out.version == "2" and registry.current("tiny") == "2"
        assert 1.0 < time.monotonic() - begin < 20
    finally:
        timer.join()
        for proc in started:
            proc.kill_group()  # type: ignore[attr-defined]
