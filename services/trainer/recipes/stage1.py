"""Stage 1: align each connector to the frozen LLM on caption pairs (LLaVA's pretraining).

Everything is frozen but the connectors' trained parts (the Q-Former types keep their
pretrained Q-Former, queries and ln_vision frozen, as E.T. Chat's `projector` mode and
VideoChat's stage 1); `plain` template (media then caption); LR 1e-3 by default; ZeRO-2 is
enough (the trainable part is small). Modalities that share a connector train it together.
"""

from __future__ import annotations

from services.models.lm.model import feature_layouts
from services.models.lm.training import TrainingModel
from services.models.lm.training_params import ParamGroup, select_trainable
from services.trainer.build import (
    build_examples,
    initial_connectors,
    load_llm,
    load_run_preset,
    load_start_bundle,
    trainable_connector_params,
)
from services.trainer.export import export_bundle
from services.trainer.jobs import STAGE_DEFAULTS
from services.trainer.loop import fit
from services.trainer.runconfig import RunConfig


def run(cfg: RunConfig) -> None:
    hp = cfg.spec.hyperparameters
    preset = load_run_preset(cfg)
    tokenizer, lm = load_llm(preset)
    bundle = load_start_bundle(preset, cfg.init_bundle)
    connectors = initial_connectors(preset, bundle, llm_dim=lm.config.hidden_size)
    examples, data_report = build_examples(cfg, preset, tokenizer, connectors)
    model = TrainingModel(lm, connectors, feature_layouts(preset))
    groups, counts = select_trainable(
        model,
        [
            ParamGroup(
                "connectors",
                trainable_connector_params(connectors),
                hp.lr or STAGE_DEFAULTS["stage1"].lr,
            )
        ],
        weight_decay=hp.weight_decay,
    )
    _, result = fit(
        cfg, model, groups, examples, pad_id=tokenizer.pad_token_id or 0,
        on_start=lambda: {"data": data_report, "trainable": counts},
    )  # fmt: skip
    if result.completed:
        export_bundle(cfg, model, preset=preset, metrics=result.metrics, start=bundle)
