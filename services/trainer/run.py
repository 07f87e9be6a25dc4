"""One rank of a training run: `python -m services.trainer.run --job-dir DIR` under torchrun
or the deepspeed launcher (which set RANK, WORLD_SIZE, MASTER_ADDR/PORT).

It dies with its launcher (PR_SET_PDEATHSIG), joins the process group (gloo on CPU, NCCL on
GPU), runs the stage's recipe, and on rank 0 appends the final "done" event to the progress
log. Its exit code is what the worker judges the run by.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import sys
from pathlib import Path

from services.common.errors import ModalmeshError
from services.common.log import setup_logging
from services.common.procenv import set_parent_death_signal
from services.trainer.runconfig import RunConfig


def main(argv: list[str] | None = None) -> int:
    set_parent_death_signal(signal.SIGKILL)
    parser = argparse.ArgumentParser(prog="python -m services.trainer.run")
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    cfg = RunConfig.read(args.job_dir)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(
        f"trainer-rank{rank}", level=os.environ.get("MODALMESH_LOG_LEVEL", "INFO"), json_lines=False
    )
    import deepspeed
    import torch

    from services.trainer.loop import Progress
    from services.trainer.recipes import RECIPES

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    backend = "nccl" if torch.cuda.is_available() and cfg.hardware != "cpu" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(
        dist_backend=backend, timeout=datetime.timedelta(seconds=cfg.spec.deepspeed.dist_timeout_s)
    )
    torch.manual_seed(cfg.spec.hyperparameters.seed)
    recipe = RECIPES.get(cfg.spec.stage)
    if recipe is None:
        raise SystemExit(f"stage {cfg.spec.stage} has no recipe in this version")
    try:
        recipe(cfg)
    except Exception as e:  # tell the worker why, in words, then fail the rank
        message = e.message if isinstance(e, ModalmeshError) else f"{type(e).__name__}: {e}"
        Progress(cfg.progress_path, enabled=True).emit("error", rank=rank, message=message)
        raise
    if rank == 0 and (cfg.bundle_dir / "manifest.json").is_file():
        import json

        manifest = json.loads((cfg.bundle_dir / "manifest.json").read_text())
        Progress(cfg.progress_path, enabled=True).emit(
            "done", bundle=str(cfg.bundle_dir), metrics=manifest["metrics"]
        )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


def _exit_now(code: int) -> None:
    """Flush and leave without running native destructors at interpreter teardown.

    A rank whose work is done (bundle exported, barrier passed, process group destroyed) has
    been seen to abort in teardown ("terminate called without an active exception", SIGABRT)
    about once in a few runs, which made torchrun fail a finished job. Nothing is left to
    clean up at that point, so the rank exits with os._exit after flushing its output.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
