"""`modalmesh eval`: flags reach the runner; exit codes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from modalmesh import cli, eval_cli
from services.eval.runner import RunConfig, RunResult


def _metrics(stopped: bool) -> dict[str, Any]:
    return {
        "benchmark": "shapes",
        "model": "tiny@3",
        "data": "d",
        "samples": 1,
        "finished": 1,
        "answered": 1,
        "bad": {"count": 0, "ratio": 0.0, "max_ratio": 0.05, "by_reason": {}},
        "stopped": stopped,
        "scores": {"main": "accuracy", "value": 1.0, "total": 1, "failed": {}, "metrics": {"accuracy": 1.0}},
        "seconds": 0.1,
    }


@pytest.mark.parametrize("stopped", [False, True])
def test_flags_reach_the_runner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys, stopped: bool
) -> None:
    seen: list[RunConfig] = []

    def fake_run(config: RunConfig, *, progress: Any = None) -> RunResult:
        seen.append(config)
        return RunResult(_metrics(stopped), stopped, 1)

    monkeypatch.setattr(eval_cli, "run_eval", fake_run)
    argv = ["eval", "shapes", "--data", str(tmp_path), "--model", "tiny@3", "--gateway", "http://gw:1"]
    argv += ["--api-key", "k", "--out", str(tmp_path / "o"), "--concurrency", "2", "--limit", "5"]
    argv += ["--media-root", str(tmp_path / "m"), "--max-bad-ratio", "0.5"]
    assert cli.main(argv) == (1 if stopped else 0)
    [config] = seen
    assert (config.benchmark, config.model, config.gateway, config.api_key) == (
        "shapes",
        "tiny@3",
        "http://gw:1",
        "k",
    )
    assert (config.concurrency, config.limit, config.max_bad_ratio) == (2, 5, 0.5)
    assert (config.out, config.media_root, config.temperature, config.seed) == (
        tmp_path / "o",
        tmp_path / "m",
        0.0,
        0,
    )
    assert "accuracy *" in capsys.readouterr().out


def test_missing_data_file_exits_2(tmp_path: Path, capsys) -> None:
    argv = [
        "eval",
        "llava",
        "--data",
        str(tmp_path / "none.json"),
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli.main(argv) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a run that cannot start
