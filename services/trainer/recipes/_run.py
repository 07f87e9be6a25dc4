"""What every stage's recipe does around its own part, written once.

`start` loads the run's preset, the frozen base LLM, the bundle the job starts from and the
connectors under its tensors; `RunState.load_examples` loads, checks and encodes the data (a recipe
calls it after building its own extra parts, so each part is initialised in the same order in
every stage); `fit_and_export` freezes everything but the recipe's parameter groups, trains under
DeepSpeed with the run's report as the first progress event, and writes the bundle when the run
completed. Between them a recipe builds its `TrainingModel` and names its `ParamGroup`s: that is
all that differs between stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.common.presets import Preset
from services.models.checkpoints.bundle import Bundle
from services.models.connectors.connector import Connector
from services.models.lm.training import TrainingModel
from services.models.lm.training_params import ParamGroup, select_trainable
from services.trainer.build import (
    build_examples,
    initial_connectors,
    load_llm,
    load_run_preset,
    load_start_bundle,
)
from services.trainer.export import export_bundle
from services.trainer.loop import TrainExample, fit
from services.trainer.runconfig import RunConfig


@dataclass
class RunState:
    """A started run: its config, preset, tokenizer, base LM, start bundle and connectors."""

    cfg: RunConfig
    preset: Preset
    tokenizer: Any
    lm: Any
    bundle: Bundle
    connectors: dict[str, Connector]
    examples: list[TrainExample] = field(default_factory=list)
    data_report: dict[str, Any] = field(default_factory=dict)

    @property
    def llm_dim(self) -> int:
        """The base LLM's hidden size (what connectors and heads project to or from)."""
        return int(self.lm.config.hidden_size)

    def load_examples(self) -> None:
        """Load, check and encode the job's datasets (`build_examples`) into `examples`."""
        self.examples, self.data_report = build_examples(
            self.cfg, self.preset, self.tokenizer, self.connectors
        )


def start(cfg: RunConfig) -> RunState:
    """Load the preset, the frozen base LLM, the start bundle and the connectors under it."""
    preset = load_run_preset(cfg)
    tokenizer, lm = load_llm(preset)
    bundle = load_start_bundle(preset, cfg.init_bundle)
    connectors = initial_connectors(preset, bundle, llm_dim=lm.config.hidden_size)
    return RunState(cfg, preset, tokenizer, lm, bundle, connectors)


def fit_and_export(
    state: RunState, model: TrainingModel, groups: list[ParamGroup], *, report: dict[str, Any] | None = None
) -> None:
    """Train `groups` of `model` on the run's examples, then export the bundle if it completed.

    Args:
        state: The started run, its examples loaded.
        model: The stage's training model.
        groups: The trainable parameter groups (everything else stays frozen).
        report: Extra fields of the first progress event, next to `data` and `trainable`.
    """
    hp = state.cfg.spec.hyperparameters
    param_groups, counts = select_trainable(model, groups, weight_decay=hp.weight_decay)
    _, result = fit(
        state.cfg,
        model,
        param_groups,
        state.examples,
        pad_id=state.tokenizer.pad_token_id or 0,
        on_start=lambda: {"data": state.data_report, "trainable": counts, **(report or {})},
    )
    if result.completed:
        export_bundle(state.cfg, model, preset=state.preset, metrics=result.metrics, start=state.bundle)
