"""`modalmesh adapters list|rollback` against a private redis-server."""

from __future__ import annotations

from pathlib import Path

import pytest

from modalmesh.cli import main
from services.common.adapter_registry import AdapterRegistry, VersionInfo
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
