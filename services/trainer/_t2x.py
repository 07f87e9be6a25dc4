"""Text-to-X records (NExT-GPT stage 2): caption + output modality + the caption's embedding.

A record (JSONL line or JSON list item), as `modalmesh embed-captions` writes it:

    {"id": "x", "caption": "a red circle", "output_modality": "image", "embedding": "x.npy"}

`embedding` is relative to the dataset's media root (default the file's folder); NExT-GPT's
new code base's `<modality>_caption_embeddings` key is read too, and a record without an
`output_modality` takes the dataset's `modality`. Each record becomes the seed's stage-2
sequence (SEEDS_SPEC 2.A) through the preset's template, with the signal tokens appended to
the repeated caption:

    ### Human: {caption}\\n### Assistant:            (masked)
     {caption}[IMG0][IMG1][IMG2][IMG3]\\n###          (supervised)

and carries its embedding, checked against `outputs.<modality>.conditioning`.

Instruction-style records (stage 3, T->X replies) carry "conversations" instead of the
caption: LLaVA turns without input media, where the assistant's output is marked either by
NExT-GPT's new code base's placeholder in the reply (`"Sure thing! <image>"`, with
`output_image` / `image_caption_embeddings` naming the modality) or by the legacy
`"output_modality"` of a gpt turn (the signal tokens then follow its text); exactly one per
record. Bad records
(unknown output modality, missing or mis-shaped embedding, signal tokens in the caption, too
long) are skipped and counted like every other dataset's (`datasets.LoadReport`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.common import modalities
from services.common.content import TextPart, Turn
from services.common.errors import InvalidArgumentError
from services.common.presets import OutputSpec
from services.models.decoders.embed import load_caption_embedding
from services.models.lm.output_projector import find_signal_spans
from services.trainer._samples import ROLE_NAMES, BadSampleError, Sample, record_id
from services.trainer._supervised import IGNORE_INDEX, SupervisedEncoder
from services.trainer.datasets import LoadReport, _check_ratio, _records
from services.trainer.dataspec import EXPECTED, DatasetSpec
from services.trainer.loop import SignalInExample, TrainExample

logger = logging.getLogger(__name__)

OUTPUT_MODALITIES = modalities.output_names()  # the registry's, in its order


@dataclass(frozen=True)
class T2XDataset:
    """The examples of one t2x dataset and what was kept and skipped."""

    examples: list[TrainExample]
    report: LoadReport
    modalities: dict[str, int] = field(default_factory=dict)  # examples per output modality


def load_t2x(
    spec: DatasetSpec,
    encoder: SupervisedEncoder,
    outputs: Mapping[str, OutputSpec],
    signal_ids: Mapping[str, tuple[int, ...]],
    *,
    max_bad_ratio: float,
) -> T2XDataset:
    """Read, check and encode a t2x dataset.

    Args:
        spec: The dataset (format t2x).
        encoder: Tokenizes with the preset's template (masking all but the reply).
        outputs: The preset's output specs.
        signal_ids: Per output modality, its signal token ids.
        max_bad_ratio: Largest share of bad records tolerated.

    Raises:
        InvalidArgumentError: The file is unusable, or too many records are bad (the message
            gives the counts by reason and the first examples, naming record and file).
    """
    report = LoadReport(spec.path.name)
    examples: list[TrainExample] = []
    counts: dict[str, int] = {}
    for index, record in enumerate(_records(spec.path)):
        report.total += 1
        try:
            if isinstance(record, BadSampleError):
                raise record
            example, modality = _example(record, index, spec, encoder, outputs, signal_ids)
        except BadSampleError as e:
            report._skip(index, record_id(record), e)
            continue
        examples.append(example)
        counts[modality] = counts.get(modality, 0) + 1
    report.kept = len(examples)
    if report.total == 0:
        raise InvalidArgumentError(f"dataset {spec.path}: {EXPECTED}, got no samples", param="path")
    _check_ratio(report, max_bad_ratio)
    logger.info("%s; by output modality %s", report.summary(), counts)
    return T2XDataset(examples, report, counts)


def _example(
    record: Any,
    index: int,
    spec: DatasetSpec,
    encoder: SupervisedEncoder,
    outputs: Mapping[str, OutputSpec],
    signal_ids: Mapping[str, tuple[int, ...]],
) -> tuple[TrainExample, str]:
    if not isinstance(record, dict):
        raise BadSampleError("not_object", f"expected a JSON object, got {type(record).__name__}")
    modality = _output_modality(record, spec.modality)
    if not isinstance(modality, str) or modality not in outputs:
        raise BadSampleError(
            "unknown_output_modality",
            f"output_modality: expected one of {sorted(outputs)} (the preset's outputs), got {modality!r}",
        )
    out = outputs[modality]
    turns = _turns(record, modality, out.signal_tokens)
    path = _embedding_path(record, modality, spec.root)
    if not path.is_file():
        raise BadSampleError("embedding_missing", f"embedding: {path}: no such file")
    try:
        target = load_caption_embedding(path, modality, out.conditioning)  # (rows, width)
    except InvalidArgumentError as e:
        raise BadSampleError("embedding_invalid", e.message) from None
    sample = Sample(id=record_id(record) or str(index), turns=turns)
    encoded = encoder.encode(sample)
    try:
        starts = find_signal_spans(encoded.input_ids, signal_ids[modality])
    except InvalidArgumentError as e:
        raise BadSampleError("signal_tokens", e.message) from None
    if len(starts) != 1 or encoded.labels[starts[0]] == IGNORE_INDEX:
        raise BadSampleError(
            "signal_tokens", f"expected one supervised span of {modality} signal tokens, got {len(starts)}"
        )
    signal = SignalInExample(modality, torch.from_numpy(target))
    return TrainExample(encoded.input_ids, encoded.labels, [], signal=signal), modality


def _output_modality(record: dict[str, Any], default: str) -> Any:
    """`output_modality`, else the one modality an `output_<m>` / `<m>_caption_embeddings` key
    (NExT-GPT's new code base) or the gpt turns' `output_modality` (legacy) names, else the
    dataset's."""
    if "output_modality" in record:
        return record["output_modality"]
    named = {m for m in OUTPUT_MODALITIES if f"output_{m}" in record or f"{m}_caption_embeddings" in record}
    turns = record.get("conversations")
    if isinstance(turns, list):
        named |= {
            t["output_modality"]
            for t in turns
            if isinstance(t, dict) and isinstance(t.get("output_modality"), str)
        }
    return named.pop() if len(named) == 1 else default


def _turns(record: dict[str, Any], modality: str, signal_tokens: Sequence[str]) -> tuple[Turn, ...]:
    """The conversation: the seed's stage-2 pair from "caption", or the record's
    "conversations" with the signal tokens placed in the assistant's turn."""
    signals = "".join(signal_tokens)
    conversations = record.get("conversations")
    if conversations is None:
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise BadSampleError("empty_text", f"caption: expected non-empty text, got {caption!r}")
        caption = " ".join(caption.split())
        _no_signal_tokens(caption, signal_tokens, modality, "caption")
        return (Turn("user", (TextPart(caption),)), Turn("assistant", (TextPart(caption + signals),)))
    if not isinstance(conversations, list) or not conversations:
        raise BadSampleError("bad_field", f"conversations: expected a list of turns, got {conversations!r}")
    placeholder, placed = f"<{modality}>", 0
    turns: list[Turn[Any]] = []  # text only
    for i, turn in enumerate(conversations):
        role = ROLE_NAMES.get(turn.get("from", "")) if isinstance(turn, dict) else None
        text = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(text, str):
            raise BadSampleError(
                "bad_field", f"conversations[{i}]: expected {{'from', 'value'}}, got {turn!r}"
            )
        _no_signal_tokens(text, signal_tokens, modality, f"conversations[{i}]")
        if role == "assistant" and placeholder in text:  # the new code base: "Sure! <image>"
            placed += text.count(placeholder)
            text = text.replace(placeholder, signals)
        elif role == "assistant" and turn.get("output_modality") == modality:  # legacy: value + tokens
            placed += 1
            text = text.rstrip() + signals
        turns.append(Turn(role, (TextPart(text.strip()),)))
    if placed != 1:
        raise BadSampleError(
            "signal_tokens",
            f"conversations: expected one {placeholder} (or output_modality {modality!r}) in the "
            f"assistant's turns, got {placed}",
        )
    return tuple(turns)


def _no_signal_tokens(text: str, signal_tokens: Sequence[str], modality: str, where: str) -> None:
    if any(token in text for token in signal_tokens):
        raise BadSampleError("signal_tokens", f"{where}: holds a signal token of {modality}: {text!r}")


def _embedding_path(record: dict[str, Any], modality: str, root: Path) -> Path:
    keys = [k for k in ("embedding", f"{modality}_caption_embeddings") if record.get(k) is not None]
    if len(keys) != 1:
        raise BadSampleError(
            "missing_field" if not keys else "bad_field",
            f"embedding: expected one of 'embedding', '{modality}_caption_embeddings', got {keys or 'none'}",
        )
    value = record[keys[0]]
    if not isinstance(value, str) or not value.strip():
        raise BadSampleError("bad_field", f"{keys[0]}: expected a path, got {value!r}")
    path = Path(value.strip())
    return path if path.is_absolute() else root / path
