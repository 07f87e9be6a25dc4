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

from services.models.lm.training import TrainingModel
from services.models.lm.training_outputs import OutputHeads, signal_specs
from services.models.lm.training_params import ParamGroup
from services.trainer.build import feature_layouts, initial_output_projectors, with_start_lora
from services.trainer.jobs import STAGE_DEFAULTS
from services.trainer.recipes._run import fit_and_export, start
from services.trainer.runconfig import RunConfig


def run(cfg: RunConfig) -> None:
    hp = cfg.spec.hyperparameters
    state = start(cfg)
    projectors = initial_output_projectors(state.preset, state.bundle, llm_dim=state.llm_dim)
    state.load_examples()
    model = TrainingModel(
        with_start_lora(state.lm, state.bundle),
        state.connectors,
        feature_layouts(state.preset),
        outputs=OutputHeads(projectors, signal_specs(state.preset, state.tokenizer, "stage2")),
    )
    lr = hp.lr or STAGE_DEFAULTS["stage2"].lr
    fit_and_export(state, model, [ParamGroup("projectors", ("outputs.projectors.*",), lr)])
