"""One launcher per node without ssh: the node's plan from flags, the job and the Indexed Job's
index; the `deepspeed --no_ssh` command line and hostfile it runs; the refusals, by name; and
the queue's refusal of a job that needs one launcher per node."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import InvalidArgumentError
from services.trainer import launcher, node
from services.trainer.jobs import JobSpec, check_one_launcher, parse_job
from services.trainer.runconfig import RunConfig


def spec(**deepspeed: Any) -> JobSpec:
    return parse_job(
        {
            "preset": "tiny",
            "stage": "stage1",
            "datasets": [{"format": "captions", "path": "/data/caps.json"}],
            "deepspeed": {"launcher": "deepspeed", "nodes": 2, "world_size": 1, **deepspeed},
        }
    )


def args(*extra: str) -> Any:
    return node.parser().parse_args(["--job", "job.yaml", "--job-id", "mh-1", *extra])


def run_config(tmp_path: Path, job: JobSpec, hardware: str = "cpu") -> RunConfig:
    return RunConfig(
        job_id="mh-1",
        spec=job,
        job_dir=tmp_path / "job",
        cache_dir=tmp_path,
        adapter_name="tiny",
        init_bundle=tmp_path / "bundle",
        hardware=hardware,
    )


# -- the plan ------------------------------------------------------------------------------------


def test_node_rank_comes_from_the_flag_else_the_indexed_jobs_completion_index() -> None:
    flagged = node.plan(
        args("--master-addr", "h0", "--node-rank", "1"), spec(), {"JOB_COMPLETION_INDEX": "0"}
    )
    assert flagged == launcher.Node(nnodes=2, node_rank=1, master_addr="h0", master_port=29500)
    indexed = node.plan(
        args("--master-addr", "h0", "--master-port", "29600"), spec(), {"JOB_COMPLETION_INDEX": "1"}
    )
    assert indexed == launcher.Node(nnodes=2, node_rank=1, master_addr="h0", master_port=29600)


@pytest.mark.parametrize(
    ("flags", "job", "env", "named"),
    [
        (("--master-addr", "h0"), spec(), {}, "--node-rank: expected the flag or JOB_COMPLETION_INDEX"),
        (("--master-addr", "h0"), spec(), {"JOB_COMPLETION_INDEX": "x"}, "JOB_COMPLETION_INDEX: expected an integer"),
        (("--master-addr", "h0", "--node-rank", "2"), spec(), {}, "--node-rank: expected 0..1 (nnodes 2), got 2"),
        (("--master-addr", "h0", "--node-rank", "-1"), spec(), {}, "--node-rank: expected 0..1"),
        (("--node-rank", "0",), spec(), {}, "--master-addr: expected node 0's address"),
        (("--master-addr", "h0", "--node-rank", "0", "--nnodes", "3"), spec(), {},
         "--nnodes: the job has deepspeed.nodes 2, got 3"),
        (("--master-addr", "h0", "--node-rank", "0", "--master-port", "70000"), spec(), {}, "--master-port"),
        (("--master-addr", "h0", "--node-rank", "0"), spec(hostfile="/etc/hostfile"), {},
         "job.deepspeed.hostfile"),
        (("--master-addr", "h0", "--node-rank", "0"),
         parse_job({"preset": "tiny", "stage": "stage1", "datasets": [{"format": "captions", "path": "/c"}]}),
         {}, "job.deepspeed.launcher: one launcher per node is DeepSpeed's"),
    ],
)  # fmt: skip
def test_inconsistent_input_is_refused_by_name(
    flags: tuple[str, ...], job: JobSpec, env: dict[str, str], named: str
) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        node.plan(args(*flags), job, env)
    assert named in e.value.message


def test_a_bad_job_id_is_refused() -> None:
    bad = node.parser().parse_args(
        ["--job", "j.yaml", "--job-id", "../x", "--master-addr", "h", "--node-rank", "0"]
    )
    with pytest.raises(InvalidArgumentError, match="--job-id"):
        node.plan(bad, spec(), {})


# -- the command line ----------------------------------------------------------------------------


def test_node_command_is_deepspeeds_no_ssh_launcher_for_this_node(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, spec(world_size=3))
    me = launcher.Node(nnodes=2, node_rank=1, master_addr="train-0.train", master_port=29555)
    cmd = launcher.command(cfg, node=me)
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    flags = cmd[3:-4]
    assert set(flags) == {
        "--no_ssh",
        "--node_rank=1",
        f"--hostfile={tmp_path / 'job' / 'hostfile.node1'}",
        "--num_nodes=2",
        "--master_addr=train-0.train",
        "--master_port=29555",
        "--num_accelerators=3",
    }
    assert cmd[-4:] == ["--module", "services.trainer.run", "--job-dir", str(tmp_path / "job")]
    assert "--num_gpus=3" in launcher.command(run_config(tmp_path, spec(world_size=3), "gpu"), node=me)


def test_every_flag_is_one_the_installed_deepspeed_runner_parses(tmp_path: Path) -> None:
    from deepspeed.launcher.runner import parse_args

    cfg = run_config(tmp_path, spec(world_size=2))
    me = launcher.Node(nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29555)
    parsed = parse_args(launcher.command(cfg, node=me)[3:])
    assert parsed.no_ssh and parsed.node_rank == 1 and parsed.num_nodes == 2 and parsed.num_gpus == 2
    assert parsed.master_addr == "10.0.0.1" and parsed.master_port == 29555 and parsed.module
    assert parsed.user_script == "services.trainer.run"


def test_the_hostfile_lists_every_node_with_world_size_slots(tmp_path: Path) -> None:
    from deepspeed.launcher.runner import _parse_hostfile

    cfg = run_config(tmp_path, spec(nodes=3, world_size=2))
    me = launcher.Node(nnodes=3, node_rank=2, master_addr="h0", master_port=29500)
    pool = _parse_hostfile(launcher.node_hostfile_text(cfg, me).splitlines())
    assert list(pool.values()) == [2, 2, 2]
    assert launcher.log_name(me) == "train.node2.log" and launcher.log_name(None) == "train.log"


def test_the_single_host_command_is_unchanged(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, spec(nodes=1, world_size=2))
    cmd = launcher.command(cfg, master_port=29123)
    assert "--no_ssh" not in cmd and "--num_nodes=1" in cmd and "--num_accelerators=2" in cmd


# -- the queue -----------------------------------------------------------------------------------


def test_the_queue_refuses_several_nodes_without_a_hostfile() -> None:
    with pytest.raises(InvalidArgumentError, match=r"services\.trainer\.node"):
        check_one_launcher(spec())
    check_one_launcher(spec(nodes=1))
    check_one_launcher(spec(hostfile="/etc/hostfile"))


def test_a_node_other_than_0_waits_for_node_0s_config_and_gives_up_by_name(tmp_path: Path) -> None:
    from services.common.errors import DeadlineExceededError

    with pytest.raises(DeadlineExceededError, match=r"node 0 wrote no config\.json"):
        node.wait_for_config(tmp_path / "job", timeout_s=0.3, interval_s=0.1)
    cfg = run_config(tmp_path, spec())
    cfg.write()
    assert node.wait_for_config(tmp_path / "job", timeout_s=1).job_id == "mh-1"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """main() sets up logging as a service does; give the root logger back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_main_refuses_bad_input_with_exit_code_2_and_says_why(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(spec().model_dump_json())
    argv = ["--job", str(job), "--job-id", "mh-1", "--master-addr", "h0"]
    assert node.main(argv, env={}) == 2
    assert node.main([*argv[:2], "--job-id", "mh-1", "--node-rank", "1"], env={}) == 2
    assert node.main(["--job", str(tmp_path / "none.yaml"), *argv[2:], "--node-rank", "0"], env={}) == 2
    err = capfd.readouterr().err
    assert "--node-rank: expected the flag or JOB_COMPLETION_INDEX, got neither" in err
    assert "--master-addr: expected node 0's address or DNS name, got none" in err
    assert "no such job file" in err
