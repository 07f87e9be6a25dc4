"""Start the ranks of a run as a subprocess in its own process group, and stop them all.

Single host: `torchrun` (python -m torch.distributed.run) with --nproc-per-node = world size.
Several hosts, from one worker: the `deepspeed` launcher with a hostfile (pdsh + passwordless
ssh, as DeepSpeed documents). Several hosts without ssh: one `deepspeed --no_ssh` launcher per
node, each started by `python -m services.trainer.node` with its node rank (a `Node`); they meet
at node 0's master address and port. The launcher process leads a new session, so cancelling kills the whole group:
launcher and every rank, never leaving orphans holding memory or GPUs. It also gets
PR_SET_PDEATHSIG, so if the worker process running the job dies the launcher is told to stop
(torchrun forwards SIGTERM to its ranks; each rank also dies with its launcher, see run.py).
Starting and stopping a process group are `services.common.procenv`'s, shared with
`modalmesh up`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from services.common.procenv import start_group, stop_group
from services.trainer.runconfig import TRAIN_LOG, RunConfig

logger = logging.getLogger(__name__)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Node:
    """This launcher's place in a job run as one launcher per node, without ssh.

    Attributes:
        nnodes: How many nodes (launchers) the job has; the job's `deepspeed.nodes`.
        node_rank: This node's index in [0, nnodes); node 0 holds global rank 0.
        master_addr: Where every node reaches node 0 (an address or DNS name).
        master_port: The port node 0's rank 0 listens on for the rendezvous.
    """

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


def node_hostfile(cfg: RunConfig, node: Node) -> Path:
    """The DeepSpeed hostfile that one node's `--no_ssh` launcher reads (one per node, so that
    nodes sharing the job folder never write the same file)."""
    return cfg.job_dir / f"hostfile.node{node.node_rank}"


def node_hostfile_text(cfg: RunConfig, node: Node) -> str:
    """`node-<i> slots=<world_size>` for every node: with --no_ssh DeepSpeed takes the world's
    shape (how many nodes, ranks on each) from a hostfile and never dials the names in it."""
    slots = cfg.spec.deepspeed.world_size
    return "".join(f"node-{i} slots={slots}\n" for i in range(node.nnodes))


def log_name(node: Node | None) -> str:
    """The launcher log's file name in the job folder: train.log, or train.node<r>.log."""
    return TRAIN_LOG if node is None else f"train.node{node.node_rank}.log"


def command(cfg: RunConfig, *, master_port: int | None = None, node: Node | None = None) -> list[str]:
    """The launcher command line for this job (for one node of it when `node` is given)."""
    ds = cfg.spec.deepspeed
    port = str(master_port or _free_port())
    entry = ["services.trainer.run", "--job-dir", str(cfg.job_dir)]
    per_node = (
        f"--num_gpus={ds.world_size}" if cfg.hardware != "cpu" else f"--num_accelerators={ds.world_size}"
    )
    if node is not None:
        return [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--no_ssh",
            f"--node_rank={node.node_rank}",
            f"--hostfile={node_hostfile(cfg, node)}",
            f"--num_nodes={node.nnodes}",
            f"--master_addr={node.master_addr}",
            f"--master_port={node.master_port}",
            per_node,
            "--module",
            *entry,
        ]
    if ds.launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={ds.world_size}",
            "--nnodes=1",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "--module",
            *entry,
        ]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--master_port={port}"]
    if ds.hostfile is not None:
        cmd += [f"--hostfile={ds.hostfile}", f"--num_nodes={ds.nodes}"]
    else:
        cmd += ["--num_nodes=1"]
    return [*cmd, per_node, "--module", *entry]


def environment(cfg: RunConfig) -> dict[str, str]:
    """The ranks' environment: CPU accelerator + gloo on CPU workers, thread counts split."""
    env = dict(os.environ)
    if cfg.hardware == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
        threads = max(1, (os.cpu_count() or 1) // cfg.spec.deepspeed.world_size)
        env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Launch:
    """A running launcher and its ranks (one process group)."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.popen = popen
        self.log_path = log_path

    @property
    def pgid(self) -> int:
        return self.popen.pid  # the session leader: its pid is the group id

    def poll(self) -> int | None:
        return self.popen.poll()

    def stop(self, *, grace_s: float = 10.0) -> int:
        """SIGTERM the group, SIGKILL what is left after `grace_s`; returns the exit code."""
        return stop_group(self.pgid, grace_s=grace_s, wait=self.popen)


def start(cfg: RunConfig, *, node: Node | None = None) -> Launch:
    """Start the launcher for `cfg` (its output appended to <job_dir>/train.log), or for this
    node of it (to <job_dir>/train.node<r>.log)."""
    log_path = cfg.job_dir / log_name(node)
    if node is not None:
        path = node_hostfile(cfg, node)
        path.write_text(node_hostfile_text(cfg, node))
    cmd = command(cfg, node=node)
    logger.info("launching %s", " ".join(cmd))
    with log_path.open("ab") as log:
        popen = start_group(cmd, env=environment(cfg), log=log, cwd=cfg.job_dir)
    return Launch(popen, log_path)


def last_error(log_path: Path, *, lines: int = 400) -> str:
    """The most telling line of a failed run's log: the last exception message, else the tail.

    torchrun's own report of a failed rank (`...errors.ChildFailedError:`, `...elastic...`
    lines) says only that a rank failed, so the rank's exception above it is taken instead. A
    line over 600 characters keeps its beginning (where an exception says what went wrong) and
    its end.
    """
    try:
        text = log_path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "no log"
    for line in reversed(text):
        stripped = line.strip()
        if (
            ("Error" in stripped or "Exception" in stripped)
            and ":" in stripped
            and not stripped.startswith("File ")
            and not stripped.endswith(":")
            and "torch.distributed.elastic" not in stripped
            and "ChildFailedError" not in stripped
        ):
            return stripped if len(stripped) <= 600 else f"{stripped[:400]} ... {stripped[-195:]}"
    return " | ".join(line.strip() for line in text[-5:])[-600:]
