"""Stage 1: align each connector to the frozen LLM on caption pairs (LLaVA's pretraining).

Everything is frozen but the connectors' trained parts (the Q-Former types keep their
pretrained Q-Former, queries and ln_vision frozen, as E.T. Chat's `projector` mode and
VideoChat's stage 1); `plain` template (media then caption); LR 1e-3 by default; ZeRO-2 is
enough (the trainable part is small). Modalities that share a connector train it together.
"""

from __future__ import annotations

from services.models.lm.training import TrainingModel
from services.models.lm.training_params import ParamGroup
from services.trainer.build import feature_layouts, trainable_connector_params
from services.trainer.jobs import STAGE_DEFAULTS
from services.trainer.recipes._run import fit_and_export, start
from services.trainer.runconfig import RunConfig


def run(cfg: RunConfig) -> None:
    hp = cfg.spec.hyperparameters
    state = start(cfg)
    state.load_examples()
    model = TrainingModel(state.lm, state.connectors, feature_layouts(state.preset))
    lr = hp.lr or STAGE_DEFAULTS["stage1"].lr
    fit_and_export(state, model, [ParamGroup("connectors", trainable_connector_params(state.connectors), lr)])
