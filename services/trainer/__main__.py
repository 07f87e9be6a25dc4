"""`python -m services.trainer [--hardware cpu] [--name NAME]`: a trainer worker.

The equivalent Celery command line is

    celery -A services.trainer.celery_app worker -Q train.cpu --concurrency 1 \\
        --prefetch-multiplier 1 -O fair --max-tasks-per-child 1

Settings come from MODALMESH_* variables (Redis URL, cache, jobs and artifact folders).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from services.common.log import setup_logging
from services.common.settings import Settings
from services.trainer.jobs import queue_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trainer", description="Run a trainer worker.")
    parser.add_argument("--hardware", default=None, help="Hardware class to serve (queue train.<class>).")
    parser.add_argument("--name", default=None, help="Worker node name (default trainer-<class>-<pid>@host).")
    args = parser.parse_args(argv)
    if args.hardware:
        os.environ["MODALMESH_TRAINER_HARDWARE"] = args.hardware
    settings = Settings()
    setup_logging("trainer", level=settings.log_level, json_lines=settings.log_json)
    from services.trainer.celery_app import app  # reads the settings from the environment

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
