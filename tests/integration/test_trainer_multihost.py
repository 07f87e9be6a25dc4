"""One training job over two "hosts" without ssh: two `python -m services.trainer.node`
launchers on loopback (node ranks 0 and 1, one DeepSpeed rank each, CPU + gloo) that meet at
node 0's master port and train one job together in one shared job folder, as the pods of the
multihost-training Kubernetes Job do (docs/training.md, "Several hosts").
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.settings import Settings
from tests.helpers.procs import Process, start_process, stop_all, wait_until
from tests.helpers.services import start_redis

pytestmark = pytest.mark.integration

STEPS = 6


@pytest.fixture()
def redis_url(tmp_path: Path) -> Iterator[str]:
    proc, url = start_redis(tmp_path / "redis")
    try:
        yield url
    finally:
        proc.kill_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "MODALMESH_REDIS_URL": settings.redis_url,
        "MODALMESH_CACHE_DIR": str(settings.cache_dir),
        "MODALMESH_JOBS_DIR": str(settings.jobs_root()),
        "MODALMESH_ARTIFACT_DIR": str(settings.artifact_root()),
        "MODALMESH_LOG_JSON": "false",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def job_file(tmp_path: Path) -> Path:
    from services.trainer.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, train=16, heldout=2, seed=3)
    spec: dict[str, Any] = {
        "preset": "tiny",
        "stage": "stage1",
        "datasets": [{"format": "captions", "path": "data/captions.json"}],  # relative to the file
        "hyperparameters": {
            "max_steps": STEPS, "micro_batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0,
            "checkpoint_every": 3, "log_every": 1,
        },
        "deepspeed": {"launcher": "deepspeed", "nodes": 2, "world_size": 1, "zero_stage": 2,
                      "dist_timeout_s": 120},
    }  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_two_node_launchers_on_loopback_train_one_job(
    redis_url: str, tiny_cache_dir: Path, tmp_path: Path
) -> None:
    from services.common.adapter_registry import AdapterRegistry
    from services.trainer.client import TrainingClient

    settings = Settings(
        redis_url=redis_url,
        cache_dir=tiny_cache_dir,
        jobs_dir=tmp_path / "jobs",
        artifact_dir=tmp_path / "artifacts",
    )
    job = job_file(tmp_path)
    port = str(free_port())
    common = [sys.executable, "-m", "services.trainer.node", "--job", str(job), "--job-id", "mh-1",
              "--master-addr", "127.0.0.1", "--master-port", port]  # fmt: skip
    procs: list[Process] = []
    try:  # node 1 first: it waits for node 0's config.json; node 0's rank comes from the Job index
        procs.append(start_process([*common, "--node-rank", "1"], log_path=tmp_path / "node1.log",
                                   env=node_env(settings)))  # fmt: skip
        procs.append(start_process(common, log_path=tmp_path / "node0.log",
                                   env=node_env(settings, JOB_COMPLETION_INDEX="0")))  # fmt: skip
        wait_until(lambda: all(not p.alive() for p in procs), timeout=360, interval=0.5,
                   what="both node launchers to finish")  # fmt: skip
        codes = [p.popen.returncode for p in procs]
        assert codes == [0, 0], f"node exit codes {codes}:\n" + "\n".join(p.log_text()[-3000:] for p in procs)
    finally:
        stop_all(reversed(procs))

    record = TrainingClient(settings).get("mh-1")
    assert record.state == "SUCCEEDED", record.error
    assert record.queue == "nodes"  # no queue worker's recovery loop takes it
    job_dir = settings.jobs_root() / "mh-1"
    events = [json.loads(line) for line in (job_dir / "progress.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    # one job: one start (world size 2 = both nodes' ranks), each step once, one done
    assert kinds.count("start") == 1 and kinds.count("done") == 1, kinds
    start = next(e for e in events if e["event"] == "start")
    assert start["world_size"] == 2 and start["total_steps"] == STEPS
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, STEPS + 1))
    done = next(e for e in events if e["event"] == "done")
    assert done["metrics"]["steps"] == STEPS
    assert record.metrics["steps"] == STEPS and record.progress["step"] == STEPS
    # each node's launcher ran its own global rank (deepspeed's launch log + the rank's logger)
    node0, node1 = (job_dir / "train.node0.log").read_text(), (job_dir / "train.node1.log").read_text()
    assert "node_rank=0" in node0 and "dist_world_size=2" in node0 and "trainer-rank0" in node0
    assert "node_rank=1" in node1 and "dist_world_size=2" in node1 and "trainer-rank1" in node1
    assert "trainer-rank1" not in node0 and "trainer-rank0" not in node1
    # the checkpoint at step 3: one model file (rank 0), one ZeRO optimizer shard per rank
    step3 = sorted(p.name for p in (job_dir / "checkpoints" / "step3").iterdir())
    assert [n for n in step3 if "model_states" in n] == ["mp_rank_00_model_states.pt"], step3
    assert [n for n in step3 if "optim_states" in n] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ], step3
    # the bundle written once and published once, by node 0
    assert (job_dir / "bundle" / "manifest.json").is_file()
    assert record.published is not None
    registry = AdapterRegistry.from_url(redis_url)
    assert list(registry.versions(record.published["name"])) == [record.published["version"]]
    # the same job on one host with 2 ranks (torchrun) trains on the same global batches: the
    # same loss at every step, so the two nodes ran one job, not two halves or two copies
    from tests.integration.test_trainer import run_ranks

    spec = yaml.safe_load(job.read_text())
    spec["datasets"][0]["path"] = str(tmp_path / "data" / "captions.json")
    spec["deepspeed"] = {"world_size": 2, "zero_stage": 2}
    spec["hyperparameters"]["checkpoint_every"] = 100
    one_host = run_ranks(tiny_cache_dir, tmp_path / "one-host", spec, timeout=300)
    ref = [json.loads(line) for line in (tmp_path / "one-host" / "progress.jsonl").read_text().splitlines()]
    two_nodes_losses = [e["loss"] for e in events if e["event"] == "step"]
    one_host_losses = [e["loss"] for e in ref if e["event"] == "step"]
    assert two_nodes_losses == pytest.approx(one_host_losses, abs=1e-4), (two_nodes_losses, one_host_losses)
    assert one_host["metrics"]["steps"] == done["metrics"]["steps"]
    print(
        f"two nodes x 1 rank: steps {done['metrics']['steps']:.0f}, world size {start['world_size']}, "
        f"loss {done['metrics']['loss_first']:.4f} -> {done['metrics']['loss_last10']:.4f}; "
        f"one host x 2 ranks: per-step losses {one_host_losses}"
    )
