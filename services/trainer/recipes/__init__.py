"""Training recipes, one short linear file per stage, and their registry.

stage1: connectors on caption pairs; stage2: output projectors on text-to-X caption
embeddings (NExT-GPT); stage3: LoRA + connectors (+ timestamp heads, + output projectors).
Each recipe builds its model and names its trainable groups; loading the run (preset, LLM,
start bundle, connectors, data) and training and exporting are `_run.py`'s, shared by all.
"""

from __future__ import annotations

from collections.abc import Callable

from services.trainer.runconfig import RunConfig


def _stage1(cfg: RunConfig) -> None:
    from services.trainer.recipes import stage1

    stage1.run(cfg)


def _stage2(cfg: RunConfig) -> None:
    from services.trainer.recipes import stage2

    stage2.run(cfg)


def _stage3(cfg: RunConfig) -> None:
    from services.trainer.recipes import stage3

    stage3.run(cfg)


RECIPES: dict[str, Callable[[RunConfig], None] | None] = {
    "stage1": _stage1,
    "stage2": _stage2,
    "stage3": _stage3,
}
