"""The launcher: command lines for torchrun and the deepspeed launcher, the ranks' environment,
starting in a new session, and picking the telling line out of a failed run's log. Stopping a
whole process group is `services.common.procenv`'s (tests/unit/services/common/test_procenv.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from services.trainer import launcher
from services.trainer.jobs import parse_job
from services.trainer.runconfig import RunConfig
from tests.helpers.procs import wait_until


def run_config(tmp_path: Path, *, hardware: str = "cpu", **deepspeed: Any) -> RunConfig:
    spec = parse_job(
        {
            "preset": "tiny",
            "stage": "stage1",
            "datasets": [{"format": "captions", "path": str(tmp_path / "caps.jsonl")}],
            "deepspeed": {"hardware": hardware, **deepspeed},
        }
    )
    return RunConfig(
        job_id="j",
        spec=spec,
        job_dir=tmp_path / "job",
        cache_dir=tmp_path,
        adapter_name="tiny",
        init_bundle=tmp_path / "bundle",
        hardware=hardware,
    )


ENTRY = ["--module", "services.trainer.run", "--job-dir"]


# -- command --------------------------------------------------------------------------------------


def test_torchrun_command_runs_world_size_ranks_on_this_host(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, world_size=3)
    cmd = launcher.command(cfg, master_port=29123)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nproc-per-node=3", "--nnodes=1", "--master-addr=127.0.0.1", "--master-port=29123"} <= set(cmd)
    assert cmd[-4:] == [*ENTRY, str(tmp_path / "job")]


def test_without_a_port_a_free_one_is_picked(tmp_path: Path) -> None:
    cmd = launcher.command(run_config(tmp_path))
    (port,) = [int(a.split("=", 1)[1]) for a in cmd if a.startswith("--master-port=")]
    assert 0 < port < 65536


def test_deepspeed_command_with_a_hostfile_on_gpus(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    cfg = run_config(
        tmp_path, hardware="gpu", launcher="deepspeed", nodes=2, world_size=4, hostfile=str(hosts)
    )
    cmd = launcher.command(cfg, master_port=29500)
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert {"--master_port=29500", f"--hostfile={hosts}", "--num_nodes=2", "--num_gpus=4"} <= set(cmd)
    assert not any(a.startswith("--num_accelerators") for a in cmd)
    assert cmd[-4:] == [*ENTRY, str(tmp_path / "job")]


def test_deepspeed_command_on_cpu_counts_accelerators_on_one_node(tmp_path: Path) -> None:
    cmd = launcher.command(run_config(tmp_path, launcher="deepspeed", world_size=2), master_port=29500)
    assert {"--num_nodes=1", "--num_accelerators=2"} <= set(cmd)
    assert not any(a.startswith(("--hostfile", "--num_gpus")) for a in cmd)


# -- environment ----------------------------------------------------------------------------------


def test_cpu_environment_selects_the_cpu_accelerator_and_splits_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    env = launcher.environment(run_config(tmp_path, world_size=2))
    assert (env["DS_ACCELERATOR"], env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"]) == ("cpu", "", "4")
    assert env["PYTHONUNBUFFERED"] == "1"
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert launcher.environment(run_config(tmp_path, world_size=4))["OMP_NUM_THREADS"] == "1"  # at least one


def test_an_explicit_thread_count_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launcher.environment(run_config(tmp_path, world_size=2))["OMP_NUM_THREADS"] == "3"


def test_gpu_environment_leaves_the_accelerator_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    env = launcher.environment(run_config(tmp_path, hardware="gpu"))
    assert "DS_ACCELERATOR" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_start_runs_the_command_in_its_own_session_with_the_ranks_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = run_config(tmp_path)
    cfg.write()
    script = 'echo "accel=$DS_ACCELERATOR cwd=$PWD"; exec sleep 100'
    monkeypatch.setattr(launcher, "command", lambda _cfg, **_: ["bash", "-c", script])
    launch = launcher.start(cfg)
    try:
        assert launch.log_path == cfg.job_dir / "train.log"
        assert os.getpgid(launch.pgid) == launch.pgid == os.getsid(launch.pgid) != os.getpgid(0)
        wait_until(lambda: "accel=" in launch.log_path.read_text(), timeout=5, what="the launcher's output")
        assert launch.log_path.read_text().strip() == f"accel=cpu cwd={cfg.job_dir}"
        assert launch.poll() is None
        assert launch.stop(grace_s=2.0) == -15
        assert launch.poll() == -15
    finally:
        launch.stop(grace_s=0.1)


# -- last_error -----------------------------------------------------------------------------------


def test_last_error_picks_the_last_exception_line(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text(
        "[rank0] loading\n"
        "RuntimeError: an earlier warning-turned-error\n"
        "Traceback (most recent call last):\n"
        '  File "/x/run.py", line 3, in main\n'
        "    raise ValueError('bad sample: 3')\n"
        "ValueError: bad sample: 3\n"
        "[rank1] exiting\n"
    )
    assert launcher.last_error(log) == "ValueError: bad sample: 3"


def test_last_error_skips_torchruns_report_for_the_ranks_exception(tmp_path: Path) -> None:
    # As a DeepSpeed op build that failed in a rank reads (seen in the compose stack's trainer).
    log = tmp_path / "train.log"
    reason = (
        "RuntimeError: Error building extension 'deepspeed_shm_comm': fatal error: Python.h: No such file"
    )
    log.write_text(
        "Traceback (most recent call last):\n"
        f"{reason} {'x' * 700}\n"
        "E1208 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 0\n"
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3.11/runpy.py", line 198, in _run_module_as_main\n'
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
        "============================================================\n"
        "services.trainer.run FAILED\n"
    )
    got = launcher.last_error(log)
    assert got.startswith(reason) and len(got) == 600


def test_last_error_without_an_exception_quotes_the_tail(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("\n".join(f"line {i}" for i in range(10)) + "\n")
    assert launcher.last_error(log) == "line 5 | line 6 | line 7 | line 8 | line 9"


def test_last_error_keeps_both_ends_of_a_long_line_and_handles_no_log(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("KeyError: " + "x" * 1000 + "END\n")
    picked = launcher.last_error(log)
    assert len(picked) == 600 and picked.startswith("KeyError: xx") and picked.endswith("END")
    assert launcher.last_error(tmp_path / "missing.log") == "no log"
