"""Stage 2: decoding-side alignment, the output projectors alone (NExT-GPT `pretrain_dec`).

Everything is frozen but the output projectors: the LLM (with the start bundle's LoRA, if it
has one, applied and frozen) and the connectors. Data are text-to-X captions with the
decoders' own caption embeddings (`format: t2x`, `modalmesh embed-captions`); each sequence
is `### Human: {caption}\\n### Assistant: {caption}[IMG0]...[IMG3]\\n###` with the reply
supervised, and the loss is the LM loss (nothing trainable receives it; kept for logging,
SEEDS_SPEC 9.3) plus, per output modality, `loss_weight` x the mean per-token distance
between its projector's output at the signal tokens and the caption embedding. LR 2e-4 by
default (NExT-GPT's pretrain_dec.sh). The bundle carries the start bundle's connectors and
LoRA unchanged and the trained projectors as its heads.
"""

from __future__ import annotations

from services.models.lm.model import feature_layouts
from services.models.lm.training import TrainingModel
from services.models.lm.training_outputs import OutputHeads, signal_specs
from services.models.lm.training_params import ParamGroup, select_trainable
from services.trainer.build import (
    build_examples,
    initial_connectors,
    initial_output_projectors,
    load_llm,
    load_run_preset,
    load_start_bundle,
    with_start_lora,
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
    llm_dim = lm.config.hidden_size
    connectors = initial_connectors(preset, bundle, llm_dim=llm_dim)
    projectors = initial_output_projectors(preset, bundle, llm_dim=llm_dim)
    examples, data_report = build_examples(cfg, preset, tokenizer, connectors)
    model = TrainingModel(
        with_start_lora(lm, bundle),
        connectors,
        feature_layouts(preset),
        outputs=OutputHeads(projectors, signal_specs(preset, tokenizer, "stage2")),
    )
    groups, counts = select_trainable(
        model,
        [ParamGroup("projectors", ("outputs.projectors.*",), hp.lr or STAGE_DEFAULTS["stage2"].lr)],
        weight_decay=hp.weight_decay,
    )
    _, result = fit(
        cfg, model, groups, examples, pad_id=tokenizer.pad_token_id or 0,
        on_start=lambda: {"data": data_report, "trainable": counts},
    )  # fmt: skip
    if result.completed:
        export_bundle(cfg, model, preset=preset, metrics=result.metrics, start=bundle)
