"""One node of a training job run over several hosts without ssh: one launcher per node.

    python -m services.trainer.node --job JOB.yaml --job-id ID --master-addr HOST \\
        [--master-port 29500] [--node-rank R] [--nnodes N]

Every node runs this with the same job file and job id; the node rank comes from
`--node-rank`, else from JOB_COMPLETION_INDEX (a Kubernetes Indexed Job's pod index). Each
node starts DeepSpeed's launcher with `--no_ssh --node_rank R` for `deepspeed.world_size`
ranks on this host; all of them meet at node 0's `--master-addr:--master-port`, so the job has
`deepspeed.nodes x deepspeed.world_size` ranks.

Node 0 does what a queue worker does for a one-host job (`runner.JobRunner`): validates the
job, writes the job folder's config.json, records the job in the job store (state, progress,
cancel), follows the ranks and publishes the bundle. The other nodes wait for that config.json
in the same job folder, which must therefore be shared by every node (the ReadWriteMany volume
on Kubernetes, NFS by hand), as are the dataset paths, the cache and the checkpoints. Global
rank 0, on node 0, writes the progress log, the checkpoints' shared files and the bundle; every
rank writes its own ZeRO shard of a checkpoint. Jobs are not taken from the Celery queue: a
queue worker refuses `nodes > 1` without a hostfile (`jobs.check_one_launcher`).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from services.common.errors import InvalidArgumentError, ModalmeshError
from services.common.log import setup_logging
from services.common.settings import Settings
from services.trainer import launcher
from services.trainer.jobs import JobRecord, JobSpec, read_job_file
from services.trainer.runconfig import CONFIG_FILE, RunConfig

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500
# The job store's queue name for jobs run this way: no Celery queue has it, so no worker's
# recovery loop requeues one whose node 0 went away (the nodes' restart is the Job's business).
NODES_QUEUE = "nodes"
_JOB_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.trainer.node",
        description="Run one node of a multi-host training job (DeepSpeed --no_ssh).",
    )
    p.add_argument(
        "--job", type=Path, required=True, help="The job file (YAML/JSON), the same on every node."
    )
    p.add_argument("--job-id", required=True, help="The job's id, the same on every node (its job folder).")
    p.add_argument(
        "--master-addr", default=None, help="Node 0's address or DNS name, reachable from every node."
    )
    p.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT, help="Node 0's rendezvous port.")
    p.add_argument(
        "--node-rank", type=int, default=None, help="This node's index (default: $JOB_COMPLETION_INDEX)."
    )
    p.add_argument("--nnodes", type=int, default=None, help="How many nodes; must equal deepspeed.nodes.")
    p.add_argument(
        "--config-wait-s",
        type=float,
        default=None,
        help="How long a node other than 0 waits for node 0's config.json (default: dist_timeout_s).",
    )
    return p


def plan(args: argparse.Namespace, spec: JobSpec, env: Mapping[str, str]) -> launcher.Node:
    """This node's place in the job, from the flags, the job's `deepspeed` section and `env`.

    Raises:
        InvalidArgumentError: Naming the flag or field that does not fit: the launcher is not
            deepspeed, a hostfile is set, --nnodes differs from deepspeed.nodes, no node rank
            or one outside [0, nnodes), no master address, a port outside 1..65535.
    """
    ds = spec.deepspeed
    if not re.match(_JOB_ID, args.job_id):
        raise InvalidArgumentError(f"--job-id: expected letters, digits, '_', '.', '-', got {args.job_id!r}")
    if ds.launcher != "deepspeed":
        raise InvalidArgumentError(
            f"job.deepspeed.launcher: one launcher per node is DeepSpeed's (--no_ssh); expected "
            f"'deepspeed', got {ds.launcher!r}"
        )
    if ds.hostfile is not None:
        raise InvalidArgumentError(
            f"job.deepspeed.hostfile: {ds.hostfile} is for the ssh launch from one worker; a job run "
            "one launcher per node takes its shape from deepspeed.nodes and world_size: expected none"
        )
    nnodes = ds.nodes if args.nnodes is None else args.nnodes
    if nnodes != ds.nodes:
        raise InvalidArgumentError(f"--nnodes: the job has deepspeed.nodes {ds.nodes}, got {args.nnodes}")
    rank = args.node_rank
    if rank is None:
        index = env.get("JOB_COMPLETION_INDEX", "")
        if not index:
            raise InvalidArgumentError("--node-rank: expected the flag or JOB_COMPLETION_INDEX, got neither")
        try:
            rank = int(index)
        except ValueError:
            raise InvalidArgumentError(
                f"JOB_COMPLETION_INDEX: expected an integer node rank, got {index!r}"
            ) from None
    if not 0 <= rank < nnodes:
        raise InvalidArgumentError(f"--node-rank: expected 0..{nnodes - 1} (nnodes {nnodes}), got {rank}")
    if not args.master_addr:
        raise InvalidArgumentError("--master-addr: expected node 0's address or DNS name, got none")
    if not 0 < args.master_port < 65536:
        raise InvalidArgumentError(f"--master-port: expected 1..65535, got {args.master_port}")
    return launcher.Node(
        nnodes=nnodes, node_rank=rank, master_addr=args.master_addr, master_port=args.master_port
    )


def wait_for_config(job_dir: Path, *, timeout_s: float, interval_s: float = 0.5) -> RunConfig:
    """Node 0's config.json for the job, once it is there (`timeout_s` at most).

    Raises:
        ModalmeshError: (a DeadlineExceededError) node 0 wrote none in time.
    """
    from services.common.errors import DeadlineExceededError

    deadline = time.monotonic() + timeout_s
    path = job_dir / CONFIG_FILE
    while not path.is_file():
        if time.monotonic() > deadline:
            raise DeadlineExceededError(
                f"{path}: node 0 wrote no config.json in {timeout_s:.0f}s; is the job folder shared "
                "by every node and is node 0 running?"
            )
        time.sleep(interval_s)
    return RunConfig.read(job_dir)


def run_node0(settings: Settings, spec: JobSpec, job_id: str, node: launcher.Node) -> int:
    """Node 0: the job's record, config, launcher (this node's), progress and publishing."""
    from services.trainer.runner import JobRunner
    from services.trainer.store import JobStore

    store = JobStore.from_url(settings.redis_url)
    job = spec.model_dump(mode="json")
    if store.find(job_id) is None:
        store.save(JobRecord(id=job_id, spec=job, queue=NODES_QUEUE, message="started by node 0"))
    result = JobRunner(settings, store, node=node).run(job, job_id)
    logger.info(
        "job %s: %s%s", job_id, result["state"], f" ({result.get('error')})" if result.get("error") else ""
    )
    return 0 if result["state"] == "SUCCEEDED" else 1


def run_other_node(settings: Settings, spec: JobSpec, job_id: str, node: launcher.Node, wait_s: float) -> int:
    """Node r > 0: this node's launcher for the job node 0 set up; returns its exit code."""
    cfg = wait_for_config(settings.jobs_root() / job_id, timeout_s=wait_s)
    mine, theirs = spec.deepspeed, cfg.spec.deepspeed
    if (mine.nodes, mine.world_size) != (theirs.nodes, theirs.world_size):
        raise InvalidArgumentError(
            f"--job: node 0 runs job {job_id} with nodes {theirs.nodes} x world_size "
            f"{theirs.world_size}, this node's job file says {mine.nodes} x {mine.world_size}"
        )
    launch = launcher.start(cfg, node=node)
    logger.info("job %s: node %s launched (group %s)", job_id, node.node_rank, launch.pgid)
    rc = launch.popen.wait()
    if rc != 0:
        logger.error("job %s: node %s exited with %s: %s", job_id, node.node_rank, rc,
                     launcher.last_error(launch.log_path))  # fmt: skip
    else:
        logger.info("job %s: node %s done", job_id, node.node_rank)
    return rc


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = parser().parse_args(argv)
    env = os.environ if env is None else env
    settings = Settings()
    setup_logging("trainer-node", level=settings.log_level, json_lines=settings.log_json)
    try:
        spec = read_job_file(args.job)
        node = plan(args, spec, env)
        logger.info(
            "job %s: node %s of %s, %s ranks each, master %s:%s", args.job_id, node.node_rank,
            node.nnodes, spec.deepspeed.world_size, node.master_addr, node.master_port,
        )  # fmt: skip
        if node.node_rank == 0:
            return run_node0(settings, spec, args.job_id, node)
        wait_s = args.config_wait_s if args.config_wait_s is not None else spec.deepspeed.dist_timeout_s
        return run_other_node(settings, spec, args.job_id, node, wait_s)
    except ModalmeshError as e:
        logger.error("%s", e.message)
        return 2


if __name__ == "__main__":
    sys.exit(main())
