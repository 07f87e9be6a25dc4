"""`modalmesh adapters list|rollback|publish` against a private redis-server."""

from __future__ import annotations

from pathlib import Path

import pytest

from modalmesh.cli import main
from services.common.adapter_registry import AdapterRegistry, VersionInfo
from services.common.presets import Preset
from tests.helpers.bundles import make_bundle
from tests.helpers.procs import free_port


@pytest.fixture
def registry(redis_url: str) -> AdapterRegistry:
    reg = AdapterRegistry.from_url(redis_url)
    reg.client.flushdb()
    return reg


def test_list_and_rollback(
    registry: AdapterRegistry, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["adapters", "list", "--redis-url", redis_url]) == 0
    assert capsys.readouterr().out == "no adapters recorded\n"
    for v, stage in [("1", "init"), ("2", "stage1"), ("10", "stage3")]:
        info = VersionInfo(path=f"/store/tiny/{v}", stage=stage, job_id="job-a" if v == "10" else None)
        registry.record("tiny", v, info, announce=False)
    registry.set_current("tiny", "10", announce=False)
    assert main(["adapters", "list", "tiny", "--redis-url", redis_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tiny (current: 10)"
    assert [line.split()[:2] for line in lines[2:]] == [["1", "init"], ["2", "stage1"], ["*", "10"]]
    assert lines[-1].split()[-2:] == ["job-a", "/store/tiny/10"]
    assert main(["adapters", "rollback", "tiny", "2", "--redis-url", redis_url]) == 0
    assert capsys.readouterr().out == "tiny: current is now 2 (was 10); replicas swap to it\n"
    assert registry.current("tiny") == "2"


def test_rollback_to_an_unknown_version_is_refused(
    registry: AdapterRegistry, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.record("tiny", "1", VersionInfo(path="/p"), announce=False)
    registry.set_current("tiny", "1", announce=False)
    assert main(["adapters", "rollback", "tiny", "5", "--redis-url", redis_url]) == 2
    assert "adapter tiny: no version '5'; known versions: ['1']" in capsys.readouterr().err
    assert registry.current("tiny") == "1"


def test_no_redis_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["adapters", "list", "--redis-url", url]) == 2
    assert "reading: redis is unavailable" in capsys.readouterr().err


# -- publish: a bundle folder (an imported delta, a bundle copied from another host) -----------


def _publish(*argv: str, cache: Path, redis_url: str, store: Path) -> list[str]:
    return ["adapters", "publish", *argv, "--cache-dir", str(cache), "--redis-url", redis_url,
            "--artifact-dir", str(store)]  # fmt: skip


def test_publish_copies_records_and_makes_current(
    registry: AdapterRegistry,
    redis_url: str,
    tiny_cache_dir: Path,
    tiny_preset: Preset,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from services.models.checkpoints.bundle import base_fingerprint, load_bundle

    bundle = make_bundle(tmp_path / "imported", tiny_preset, seed=5, stage="imported")
    store = tmp_path / "store"
    assert main(_publish(str(bundle), cache=tiny_cache_dir, redis_url=redis_url, store=store)) == 0
    assert (
        capsys.readouterr().out
        == f"published tiny@2 at {store / 'tiny' / '2'} (current; replicas swap to it)\n"
    )
    assert registry.current("tiny") == "2"
    info = registry.info("tiny", "2")
    assert info is not None and (info.path, info.stage, info.preset) == (
        str(store / "tiny" / "2"),
        "imported",
        "tiny",
    )
    served = load_bundle(
        store / "tiny" / "2", expected_fingerprint=base_fingerprint(tiny_preset.llm.checkpoint)
    )
    assert served.version == "2"
    # --no-current records the next version without moving the pointer
    argv = _publish(str(bundle), "--no-current", cache=tiny_cache_dir, redis_url=redis_url, store=store)
    assert main(argv) == 0
    assert "published tiny@3" in capsys.readouterr().out and registry.current("tiny") == "2"
    assert sorted(registry.versions("tiny")) == ["2", "3"]


def test_publish_refuses_what_the_llm_service_would_refuse(
    registry: AdapterRegistry,
    redis_url: str,
    tiny_cache_dir: Path,
    tiny_preset: Preset,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = tmp_path / "store"
    cases = {
        "no manifest.json": tmp_path / "missing",
        "built for base model": make_bundle(tmp_path / "other-base", tiny_preset, fingerprint="0" * 64),
    }
    damaged = make_bundle(tmp_path / "damaged", tiny_preset)
    (damaged / "connectors.safetensors").write_bytes(b"not what the manifest hashed")
    cases["sha256"] = damaged
    for expected, path in cases.items():
        assert main(_publish(str(path), cache=tiny_cache_dir, redis_url=redis_url, store=store)) == 2
        err = capsys.readouterr().err
        assert expected in err and str(path) in err, err
    url = f"redis://127.0.0.1:{free_port()}/0"
    good = make_bundle(tmp_path / "good", tiny_preset)
    assert main(_publish(str(good), cache=tiny_cache_dir, redis_url=url, store=store)) == 2
    assert "redis is unavailable" in capsys.readouterr().err
    assert registry.versions("tiny") == {} and not (store / "tiny").exists()
