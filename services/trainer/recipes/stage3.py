"""Stage 3: instruction tuning, LoRA on the LLM plus the connectors [+ timestamp heads]
[+ output projectors].

LoRA r/alpha/targets come from the preset (overridable per job). A preset with `lora:
{enabled: false}` (VideoChat, whose instruction tuning freezes the LLM: `models/videochat.py`
freezes every LLaMA parameter and adds no LoRA) trains the connectors alone, the start
bundle's LoRA (if any) applied frozen and carried over; a job's `lora: {enabled: true}` turns
LoRA on again. The conversation uses the
preset's template with only assistant replies supervised; LoRA trains at 2e-4 and the
connectors at 2e-5 by default. A preset with timestamp heads (E.T. Chat) trains them too, with
the frame-matching loss, at the connectors' LR (E.T. Chat's non-LoRA group), on E.T.
Instruct-format data. A preset with outputs (NExT-GPT) trains its output projectors too, at
`projector_lr` (default the connectors' LR; NExT-GPT's mm_output_projector_lr 2e-5), with
each modality's `stage3_loss_weight` on the distance of t2x records mixed into the data
(`format: t2x`); batches without such records keep the projectors in the graph with a
zero-weighted dummy forward. Trainable parameters are selected after LoRA injection.
Items of a modality with `attention: bidirectional` (E.T. Chat) attend bidirectionally within
their span, as the seed's stage 3 trains (`scripts/train_stage_3.sh`, `--bi_attention True`);
stages 1 and 2 stay causal, as its `train_stage_1.sh` / `train_stage_2.sh` (`--bi_attention
False`).
"""

from __future__ import annotations

from services.models.lm.training import TrainingModel
from services.models.lm.training_outputs import OutputHeads, signal_specs
from services.models.lm.training_params import ParamGroup, add_lora
from services.trainer.build import (
    feature_layouts,
    initial_heads,
    initial_output_projectors,
    trainable_connector_params,
    with_start_lora,
)
from services.trainer.jobs import STAGE_DEFAULTS
from services.trainer.recipes._run import fit_and_export, start
from services.trainer.runconfig import RunConfig


def run(cfg: RunConfig) -> None:
    hp, defaults = cfg.spec.hyperparameters, STAGE_DEFAULTS["stage3"]
    state = start(cfg)
    preset = state.preset
    lora = preset.lora.model_copy(update=cfg.spec.lora.model_dump(exclude_none=True))
    heads = initial_heads(preset, state.bundle, llm_dim=state.llm_dim)
    outputs = None
    if preset.outputs:
        projectors = initial_output_projectors(preset, state.bundle, llm_dim=state.llm_dim)
        outputs = OutputHeads(projectors, signal_specs(preset, state.tokenizer, "stage3"))
    state.load_examples()
    ts = preset.heads.timestamps
    bidirectional = preset.bidirectional_modalities()
    model = TrainingModel(
        add_lora(state.lm, lora) if lora.enabled else with_start_lora(state.lm, state.bundle),
        state.connectors,
        feature_layouts(preset),
        heads=heads,
        alpha=ts.alpha if ts is not None else 2.0,
        outputs=outputs,
        bidirectional=bidirectional,  # E.T. Chat's stage 3 only (--bi_attention True)
    )
    connector_lr = hp.connector_lr or defaults.connector_lr or defaults.lr
    groups = [ParamGroup("connectors", trainable_connector_params(state.connectors), connector_lr)]
    if lora.enabled:
        groups.insert(0, ParamGroup("lora", ("lm.*.lora_A.*", "lm.*.lora_B.*"), hp.lr or defaults.lr))
    if heads is not None:
        groups.append(ParamGroup("heads", ("heads.*",), connector_lr))
    if outputs is not None:
        groups.append(ParamGroup("projectors", ("outputs.projectors.*",), hp.projector_lr or connector_lr))
    report = {"lora": lora.model_dump(), "bidirectional": sorted(bidirectional)}
    fit_and_export(state, model, groups, report=report)
