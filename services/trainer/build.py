"""Builders the recipes share: the frozen LLM, the starting connectors, the training examples.

Encoder features are computed here, once, before training: the encoders are frozen and the
preprocessing deterministic, so each media file is encoded once per run (batched, with
`services.models.media.encode.MediaEncoder`; modalities of one checkpoint share one backbone)
instead of every epoch. Features come before tokenizing: an item's LLM tokens follow its frame
count (fps sampling), and its frame times place E.T. Chat's `<vid>` targets. Every rank
computes the same examples in the same order (the schedule then shards them), so a file that fails to decode is skipped and counted identically everywhere.
The features of the whole data set are held in memory; data sets larger than memory need a
feature store (sharded precompute) that this first version leaves out.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.content import MediaFeatures
from services.common.errors import FailedPreconditionError, InvalidArgumentError, ModalmeshError
from services.common.presets import Preset, load_preset
from services.common.settings import Settings
from services.models.backbones.base import Backbone
from services.models.backbones.build import build_backbone
from services.models.checkpoints.bundle import Bundle, base_fingerprint, load_bundle
from services.models.connectors.connector import Connector, bundle_state
from services.models.lm.loading import DTYPES, load_connectors, load_lm
from services.models.lm.model import feature_layouts
from services.models.lm.output_projector import OutputProjector, load_projectors, signal_token_ids
from services.models.lm.timestamps import (
    HEAD_NAME,
    TimestampHeads,
    load_timestamp_heads,
    seconds_to_frames,
    time_token_item,
)
from services.models.media.encode import EncoderLimits, MediaEncoder, preprocessor_for
from services.models.prompt.templates import get_template
from services.trainer._t2x import load_t2x
from services.trainer.datasets import (
    IGNORE_INDEX,
    EncodedSample,
    SupervisedEncoder,
    load_supervised,
    media_files,
    modality_slots,
)
from services.trainer.jobs import STAGE_DEFAULTS
from services.trainer.loop import MediaInExample, TimeInExample, TrainExample
from services.trainer.runconfig import RunConfig

logger = logging.getLogger(__name__)

ENCODE_BATCH = 16


def load_run_preset(cfg: RunConfig) -> Preset:
    return load_preset(cfg.spec.preset, cache_dir=cfg.cache_dir, presets_dir=cfg.presets_dir)


def load_llm(preset: Preset) -> tuple[Any, Any]:
    """The tokenizer and the base LM, frozen, in the preset's dtype (fp32 on CPU)."""
    dtype = DTYPES[preset.llm.dtype] if torch.cuda.is_available() else torch.float32
    tokenizer, lm = load_lm(preset, dtype=dtype)  # as the LLM service loads it (seed configs mapped)
    lm.config.use_cache = False
    lm.requires_grad_(False)
    return tokenizer, lm


def load_start_bundle(preset: Preset, bundle_dir: Path) -> Bundle:
    """The bundle the job starts from, checked against this base LLM."""
    bundle = load_bundle(bundle_dir, expected_fingerprint=base_fingerprint(preset.llm.checkpoint))
    logger.info("starting from %s (%s)", bundle.ref, bundle_dir)
    return bundle


def with_start_lora(lm: Any, bundle: Bundle) -> Any:
    """The LM with the start bundle's LoRA applied (frozen), so the signal-token states are
    the ones serving computes with that bundle; the LM itself when the bundle has none."""
    if bundle.lora_dir is None:
        return lm
    from peft import PeftModel

    return PeftModel.from_pretrained(lm, str(bundle.lora_dir), is_trainable=False)


def initial_connectors(preset: Preset, bundle: Bundle, *, llm_dim: int) -> dict[str, Connector]:
    """Per connector name, the connector: its frozen base (`connector.base`) under the bundle's
    tensors; in train mode, every parameter frozen (`select_trainable` picks)."""
    connectors = load_connectors(preset, bundle.connectors, llm_dim=llm_dim, dtype=torch.float32)
    return {name: c.train() for name, c in connectors.items()}


def trainable_connector_params(connectors: Mapping[str, Connector]) -> tuple[str, ...]:
    """Names (under the TrainingModel) of the connectors' trained parameters: all but the frozen
    pretrained parts that come from `connector.base` (the Q-Former, its queries, ln_vision)."""
    return tuple(
        f"connectors.{name}.{key}"
        for name, c in connectors.items()
        for key, _ in c.named_parameters()
        if not c.is_base_key(key)
    )


def initial_heads(preset: Preset, bundle: Bundle, *, llm_dim: int) -> TimestampHeads | None:
    """The timestamp heads of a preset that has them: from the bundle, else freshly initialised."""
    if preset.heads.timestamps is None:
        return None
    if any(k.startswith(f"{HEAD_NAME}.") for k in bundle.heads):
        heads = load_timestamp_heads(bundle.heads, hidden_size=llm_dim)
        logger.info("timestamp heads start from %s", bundle.ref)
    else:
        heads = TimestampHeads(llm_dim)
        logger.info("timestamp heads start from a fresh initialisation (the bundle has none)")
    return heads.train()


def initial_output_projectors(preset: Preset, bundle: Bundle, *, llm_dim: int) -> dict[str, OutputProjector]:
    """Per output modality of the preset, its projector from the bundle's heads (a bundle that
    lacks one gets the fixed fresh initialisation serving uses too), in train mode, frozen
    (`select_trainable` picks)."""
    projectors = load_projectors(preset, bundle.heads, llm_dim=llm_dim, dtype=torch.float32)
    return {m: p.train() for m, p in projectors.items()}


def connector_states(connectors: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """What a bundle holds per connector name (`bundle_state`: no frozen base), as float32 CPU."""
    return {
        name: {k: v.detach().float().cpu().clone() for k, v in bundle_state(c).items()}
        for name, c in connectors.items()
    }


def _backbones(preset: Preset, modalities: list[str]) -> dict[str, Backbone]:
    """One backbone per distinct checkpoint and architecture, shared by its modalities."""
    keys = {
        m: preset.modalities[m].encoder.model_dump_json(
            exclude={"sampling", "preprocess", "max_batch_size", "batch_delay_us", "triton_model", "tokens"}
        )
        for m in modalities
    }
    built: dict[str, Backbone] = {}
    out: dict[str, Backbone] = {}
    for m, key in keys.items():
        if key not in built:
            users = [other for other, k in keys.items() if k == key]
            spec = preset.modalities[m].encoder
            built[key] = build_backbone(spec, modalities=users, device="cpu")
        out[m] = built[key]
    return out


def encode_media(
    preset: Preset, files: Mapping[str, list[Path]]
) -> tuple[dict[Path, MediaFeatures[np.ndarray]], dict[Path, str]]:
    """Per media file, its features and frame times, and the error of each file that failed."""
    encoded: dict[Path, MediaFeatures[np.ndarray]] = {}
    errors: dict[Path, str] = {}
    limits = EncoderLimits.from_settings(Settings())
    backbones = _backbones(preset, [m for m, paths in files.items() if paths])
    for modality, backbone in backbones.items():
        spec = preset.modalities[modality].encoder
        encoder = MediaEncoder(
            modality, spec, backbone, preprocessor_for(spec, backbone), limits=limits, decode_workers=1
        )
        paths = files[modality]
        try:
            for i in range(0, len(paths), ENCODE_BATCH):
                chunk = []
                for path in paths[i : i + ENCODE_BATCH]:  # missing files are reported by the readers
                    try:
                        chunk.append((path, path.read_bytes()))
                    except OSError as e:
                        errors[path] = f"cannot read ({e.strerror})"
                results = encoder.encode([data for _, data in chunk]) if chunk else []
                for (path, _), result in zip(chunk, results, strict=True):
                    if isinstance(result, ModalmeshError):
                        errors[path] = result.message
                    else:
                        encoded[path] = result
        finally:
            encoder.close()
    return encoded, errors


def build_examples(
    cfg: RunConfig, preset: Preset, tokenizer: Any, connectors: Mapping[str, Connector]
) -> tuple[list[TrainExample], dict[str, Any]]:
    """Load, check, encode (features first: the token count of an item follows its frames),
    tokenize (with label masking) every dataset of the job.

    Raises:
        InvalidArgumentError: A dataset is unusable or has too many bad samples.
    """
    hp = cfg.spec.hyperparameters
    defaults = STAGE_DEFAULTS[cfg.spec.stage]
    layouts = feature_layouts(preset)
    files: dict[str, dict[Path, None]] = {}
    for ds in cfg.spec.datasets:
        if ds.format != "t2x":  # t2x records hold no input media
            files.setdefault(ds.modality, {}).update(dict.fromkeys(media_files(ds)))
    encoded, errors = encode_media(preset, {m: list(paths) for m, paths in files.items()})
    by_modality = {m: connectors[lay.connector] for m, lay in layouts.items()}
    ts = preset.heads.timestamps
    encoder = SupervisedEncoder(
        tokenizer,
        get_template(defaults.template or preset.llm.template),
        modality_slots(
            preset,
            tokenizer,
            llm_tokens={m: c.num_tokens(layouts[m].typical_frames) for m, c in by_modality.items()},
            tokens_for_frames={m: c.num_tokens for m, c in by_modality.items()},
        ),
        max_length=hp.max_length,
        combine=preset.media_combine,
        time_token=ts.token if ts is not None else None,
        frames={p: len(item.times) for p, item in encoded.items()},  # one time per frame
        errors=errors,
    )
    samples: list[EncodedSample] = []
    reports = []
    t2x: list[TrainExample] = []
    for ds in cfg.spec.datasets:
        if ds.format == "t2x":
            out = load_t2x(
                ds,
                encoder,
                {str(m): s for m, s in preset.outputs.items()},
                _signal_ids(preset, tokenizer),
                max_bad_ratio=hp.max_bad_ratio,
            )
            t2x += out.examples
            reports.append(out.report)
            continue
        data = load_supervised(ds, encoder, max_bad_ratio=hp.max_bad_ratio)
        samples += data.encoded
        reports.append(data.report)
    examples, skipped = list(t2x), Counter[str]()
    for e in samples:
        example = _example(e, encoded, ts.modality if ts is not None else None)
        if example is None:
            skipped["time_token_without_media"] += 1
            logger.warning(
                "skipping sample %s: time tokens but no %s item to match", e.id, ts and ts.modality
            )
            continue
        examples.append(example)
    return examples, _summary(reports, examples, skipped, hp.max_bad_ratio)


def _signal_ids(preset: Preset, tokenizer: Any) -> dict[str, tuple[int, ...]]:
    return {str(m): tuple(signal_token_ids(tokenizer, s.signal_tokens)) for m, s in preset.outputs.items()}


def _example(
    e: EncodedSample, encoded: Mapping[Path, MediaFeatures[np.ndarray]], time_modality: str | None
) -> TrainExample | None:
    media = [
        MediaInExample(start, length, f.modality, torch.from_numpy(encoded[f.path].features).clone(), text)
        for (start, length), f, text in zip(e.media_spans, e.media, e.instructions, strict=True)
    ]
    times: list[TimeInExample] = []
    if e.time_tokens:
        # Each time token names a frame of the visual span after it, else of the last one
        # (E.T. Chat; `time_token_item`, as serving); replies' tokens name the last span's.
        which = [i for i, f in enumerate(e.media) if f.modality == time_modality]
        if not which:
            return None
        spans = [e.media_spans[i] for i in which]
        for pos, seconds in e.time_tokens:
            item = which[time_token_item(pos, spans)]
            frame = seconds_to_frames([seconds], encoded[e.media[item].path].times)[0]
            times.append(TimeInExample(pos, item, float(frame), e.labels[pos] != IGNORE_INDEX))
    return TrainExample(e.input_ids, e.labels, media, times)


def _summary(
    reports: list[Any], examples: list[TrainExample], skipped: Counter[str], max_bad_ratio: float
) -> dict[str, Any]:
    total = sum(r.total for r in reports)
    bad = sum(r.bad for r in reports) + sum(skipped.values())
    if total and bad / total > max_bad_ratio:
        raise InvalidArgumentError(
            f"datasets: {bad} of {total} samples are bad ({bad / total:.1%}), expected at most "
            f"{max_bad_ratio:.1%} (max_bad_ratio); skipped after loading: {dict(skipped)}"
        )
    reasons: Counter[str] = Counter(skipped)
    for r in reports:
        reasons.update(r.reasons)
    if not examples:
        raise FailedPreconditionError("datasets: no usable sample")
    return {
        "total": total,
        "kept": len(examples),
        "bad": bad,
        "reasons": dict(reasons),
        "examples": [x for r in reports for x in r.examples][:5],
        "supervised_tokens": sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in examples),
        "time_tokens": sum(len(e.times) for e in examples),
    }
