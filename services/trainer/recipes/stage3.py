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

from services.models.lm.model import feature_layouts
from services.models.lm.training import TrainingModel
from services.models.lm.training_outputs import OutputHeads, signal_specs
from services.models.lm.training_params import ParamGroup, add_lora, select_trainable
from services.trainer.build import (
    build_examples,
    initial_connectors,
    initial_heads,
    initial_output_projectors,
    load_llm,
    load_run_preset,
    load_start_bundle,
    trainable_connector_params,
    with_start_lora,
)
from services.trainer.export import export_bundle
from services.trainer.jobs import STAGE_DEFAULTS
from services.trainer.loop import fit
from services.trainer.runconfig import RunConfig


def run(cfg: RunConfig) -> None:
    hp, defaults = cfg.spec.hyperparameters, STAGE_DEFAULTS["stage3"]
    preset = load_run_preset(cfg)
    lora = preset.lora.model_copy(update=cfg.spec.lora.model_dump(exclude_none=True))
    tokenizer, lm = load_llm(preset)
    bundle = load_start_bundle(preset, cfg.init_bundle)
    connectors = initial_connectors(preset, bundle, llm_dim=lm.config.hidden_size)
    heads = initial_heads(preset, bundle, llm_dim=lm.config.hidden_size)
    outputs = None
    if preset.outputs:
        projectors = initial_output_projectors(preset, bundle, llm_dim=lm.config.hidden_size)
        outputs = OutputHeads(projectors, signal_specs(preset, tokenizer, "stage3"))
    examples, data_report = build_examples(cfg, preset, tokenizer, connectors)
    ts = preset.heads.timestamps
    bidirectional = preset.bidirectional_modalities()
    model = TrainingModel(
        add_lora(lm, lora) if lora.enabled else with_start_lora(lm, bundle),
        connectors,
        feature_layouts(preset),
        heads=heads,
        alpha=ts.alpha if ts is not None else 2.0,
        outputs=outputs,
        bidirectional=bidirectional,  # E.T. Chat's stage 3 only (--bi_attention True)
    )
    connector_lr = hp.connector_lr or defaults.connector_lr or defaults.lr
    groups = [ParamGroup("connectors", trainable_connector_params(connectors), connector_lr)]
    if lora.enabled:
        groups.insert(0, ParamGroup("lora", ("lm.*.lora_A.*", "lm.*.lora_B.*"), hp.lr or defaults.lr))
    if heads is not None:
        groups.append(ParamGroup("heads", ("heads.*",), connector_lr))
    if outputs is not None:
        groups.append(ParamGroup("projectors", ("outputs.projectors.*",), hp.projector_lr or connector_lr))
    param_groups, counts = select_trainable(model, groups, weight_decay=hp.weight_decay)
    _, result = fit(
        cfg, model, param_groups, examples, pad_id=tokenizer.pad_token_id or 0,
        on_start=lambda: {
            "data": data_report, "trainable": counts, "lora": lora.model_dump(),
            "bidirectional": sorted(bidirectional),
        },
    )  # fmt: skip
    if result.completed:
        export_bundle(cfg, model, preset=preset, metrics=result.metrics, start=bundle)
