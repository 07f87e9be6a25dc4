"""Builders the recipes share: the frozen LLM, the starting connectors, the training examples.

Encoder features are computed here, once, before training: the encoders are frozen and the
preprocessing deterministic, so each media file is encoded once per run (batched) instead of
every epoch. Every rank computes the same examples in the same order (the schedule then
shards them), so a file that fails to decode is skipped and counted identically everywhere.
The features of the whole data set are held in memory; data sets larger than memory need a
feature store (sharded precompute) that this first version leaves out.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from services.common.errors import FailedPreconditionError, InvalidArgumentError, ModalmeshError
from services.common.presets import Preset, load_preset
from services.common.settings import Settings
from services.encoders.model import ImageEncoder
from services.llm.adapters import base_fingerprint, load_bundle
from services.llm.connectors import Connector
from services.llm.loading import DTYPES, load_connectors
from services.llm.templates import get_template
from services.trainer.datasets import EncodedSample, SupervisedEncoder, load_supervised, modality_slots
from services.trainer.jobs import STAGE_DEFAULTS
from services.trainer.loop import TrainExample
from services.trainer.runconfig import RunConfig

logger = logging.getLogger(__name__)

ENCODE_BATCH = 64


def feature_shapes(preset: Preset) -> dict[str, tuple[int, int]]:
    """Per modality, the (tokens, dim) of its encoder features."""
    return {str(m): (s.encoder.tokens, s.encoder.dim) for m, s in preset.modalities.items()}


def load_run_preset(cfg: RunConfig) -> Preset:
    return load_preset(cfg.spec.preset, cache_dir=cfg.cache_dir, presets_dir=cfg.presets_dir)


def load_llm(preset: Preset) -> tuple[Any, Any]:
    """The tokenizer and the base LM, frozen, in the preset's dtype (fp32 on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(preset.llm.checkpoint)
    dtype = DTYPES[preset.llm.dtype] if torch.cuda.is_available() else torch.float32
    lm = AutoModelForCausalLM.from_pretrained(preset.llm.checkpoint, dtype=dtype)
    lm.config.use_cache = False
    lm.requires_grad_(False)
    return tokenizer, lm


def initial_connectors(preset: Preset, bundle_dir: Path, *, llm_dim: int) -> dict[str, Connector]:
    """Connectors loaded from the bundle the job starts from (checked against this base LLM)."""
    bundle = load_bundle(bundle_dir, expected_fingerprint=base_fingerprint(preset.llm.checkpoint))
    connectors = load_connectors(preset, bundle.connectors, llm_dim=llm_dim, dtype=torch.float32)
    logger.info("connectors start from %s (%s)", bundle.ref, bundle_dir)
    return {m: c.train() for m, c in connectors.items()}


def _encode_media(
    preset: Preset, files: dict[str, list[Path]]
) -> tuple[dict[Path, torch.Tensor], dict[Path, str]]:
    """Features per media file, and the error of each file that failed to decode."""
    features: dict[Path, torch.Tensor] = {}
    errors: dict[Path, str] = {}
    settings = Settings()
    for modality, paths in files.items():
        encoder = ImageEncoder.from_spec(
            preset.modalities[modality].encoder,  # type: ignore[index]
            max_pixels=settings.image_max_pixels,
            decode_workers=1,
        )
        try:
            with torch.inference_mode():
                for i in range(0, len(paths), ENCODE_BATCH):
                    chunk = paths[i : i + ENCODE_BATCH]
                    for path, result in zip(
                        chunk, encoder.encode([p.read_bytes() for p in chunk]), strict=True
                    ):
                        if isinstance(result, ModalmeshError):
                            errors[path] = result.message
                        else:
                            features[path] = torch.from_numpy(result).clone()  # (T_in, D_in)
        finally:
            encoder.close()
    return features, errors


def build_examples(
    cfg: RunConfig, preset: Preset, tokenizer: Any, connectors: dict[str, Connector]
) -> tuple[list[TrainExample], dict[str, Any]]:
    """Load, check, tokenize (with label masking) and encode every dataset of the job.

    Raises:
        InvalidArgumentError: A dataset is unusable or has too many bad samples.
    """
    hp = cfg.spec.hyperparameters
    defaults = STAGE_DEFAULTS[cfg.spec.stage]
    template = get_template(defaults.template or preset.llm.template)
    llm_tokens = {m: c.num_tokens(preset.modalities[m].encoder.tokens) for m, c in connectors.items()}  # type: ignore[index]
    encoder = SupervisedEncoder(
        tokenizer,
        template,
        modality_slots(preset, tokenizer, llm_tokens=llm_tokens),
        max_length=hp.max_length,
    )
    encoded: list[EncodedSample] = []
    reports = []
    for ds in cfg.spec.datasets:
        data = load_supervised(ds, encoder, max_bad_ratio=hp.max_bad_ratio)
        encoded += data.encoded
        reports.append(data.report)
    files: dict[str, dict[Path, None]] = {}  # per modality, each file once, in first-seen order
    for e in encoded:
        for f in e.media:
            files.setdefault(f.modality, {})[f.path] = None
    features, errors = _encode_media(preset, {m: list(paths) for m, paths in files.items()})
    examples = []
    undecodable: Counter[str] = Counter()
    for e in encoded:
        broken = [f.path for f in e.media if f.path in errors]
        if broken:
            undecodable["media_undecodable"] += 1
            logger.warning("skipping sample %s: %s: %s", e.id, broken[0], errors[broken[0]])
            continue
        media = [
            (start, f.modality, features[f.path])
            for (start, _), f in zip(e.media_spans, e.media, strict=True)
        ]
        examples.append(TrainExample(e.input_ids, e.labels, media))
    total = sum(r.total for r in reports)
    bad = sum(r.bad for r in reports) + sum(undecodable.values())
    if total and bad / total > hp.max_bad_ratio:
        raise InvalidArgumentError(
            f"datasets: {bad} of {total} samples are bad ({bad / total:.1%}), expected at most "
            f"{hp.max_bad_ratio:.1%} (max_bad_ratio); undecodable media: {undecodable['media_undecodable']}"
        )
    reasons: Counter[str] = Counter(undecodable)
    for r in reports:
        reasons.update(r.reasons)
    summary = {
        "total": total,
        "kept": len(examples),
        "bad": bad,
        "reasons": dict(reasons),
        "examples": [x for r in reports for x in r.examples][:5],
        "supervised_tokens": sum(sum(1 for t in e.labels if t != -100) for e in examples),
    }
    if not examples:
        raise FailedPreconditionError("datasets: no usable sample")
    return examples, summary
