"""`python -m services.trainer [--hardware cpu] [--name NAME]`: a trainer worker.

The equivalent Celery command line is

    celery -A services.trainer.celery_app worker -Q train.cpu --concurrency 1 \\
        --prefetch-multiplier 1 -O fair --max-tasks-per-child 1

Settings come from MODALMESH_* variables (Redis URL, cache, jobs and artifact folders).

`--max-jobs N` and `--idle-exit-s S` bound the worker's life (services/trainer/lifetime.py): it
stops by itself, with a warm shutdown and exit status 0, after N jobs or after S seconds without
one; a KEDA ScaledJob pod runs `--max-jobs 1` (docs/deployment.md, "Autoscaling").
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from services.common.log import setup_logging
from services.common.settings import Settings
from services.trainer.jobs import queue_for
from services.trainer.lifetime import Lifetime
from services.trainer.lifetime import install as install_lifetime


def build_parser() -> argparse.ArgumentParser:
    """The worker's command line (`python -m services.trainer --help`)."""
    parser = argparse.ArgumentParser(prog="python -m services.trainer", description="Run a trainer worker.")
    parser.add_argument("--hardware", default=None, help="Hardware class to serve (queue train.<class>).")
    parser.add_argument("--name", default=None, help="Worker node name (default trainer-<class>-<pid>@host).")
    parser.add_argument(
        "--max-jobs", type=int, default=None, metavar="N", help="Stop after N jobs (default: never)."
    )
    parser.add_argument(
        "--idle-exit-s",
        type=float,
        default=None,
        metavar="S",
        help="Stop after S seconds without a job (default: never).",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Lifetime]:
    """The parsed command line and the worker's lifetime; exits with a usage error when bad."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args, Lifetime(max_jobs=args.max_jobs, idle_exit_s=args.idle_exit_s)
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> int:
    args, lifetime = parse_args(argv)
    if args.hardware:
        os.environ["MODALMESH_TRAINER_HARDWARE"] = args.hardware
    settings = Settings()
    setup_logging("trainer", level=settings.log_level, json_lines=settings.log_json)
    from services.trainer.celery_app import app  # reads the settings from the environment

    install_lifetime(app, lifetime)

    hardware = settings.trainer_hardware
    name = args.name or f"trainer-{hardware}-{os.getpid()}@{socket.gethostname()}"
    app.worker_main(
        [
            "worker",
            "--queues", queue_for(hardware),
            "--hostname", name,
            "--concurrency", "1",
            "--prefetch-multiplier", "1",
            "--max-tasks-per-child", "1",
            "-O", "fair",
            "--loglevel", settings.log_level,
            "--without-gossip",
            "--without-mingle",
        ]
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
