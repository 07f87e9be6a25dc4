"""Training recipes, one short linear file per stage, and their registry.

Stage 2 (output-projector alignment, NExT-GPT) arrives with the any-to-any presets; its slot
is named here so a job asking for it gets a clear refusal (jobs.validate_job).
"""

from __future__ import annotations

from collections.abc import Callable

from services.trainer.runconfig import RunConfig


def _stage1(cfg: RunConfig) -> None:
    from services.trainer.recipes import stage1

    stage1.run(cfg)


def _stage3(cfg: RunConfig) -> None:
    from services.trainer.recipes import stage3

    stage3.run(cfg)


RECIPES: dict[str, Callable[[RunConfig], None] | None] = {
    "stage1": _stage1,
    "stage2": None,  # output projectors: the any-to-any issue
    "stage3": _stage3,
}
