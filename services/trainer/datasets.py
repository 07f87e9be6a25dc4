"""Training datasets: the spec jobs name, reading LLaVA JSON, caption pairs and E.T. Instruct,
skip-and-count.

Three formats, each a JSON list or JSONL (one object per line); the media key is the
dataset's modality ("image", "video", "audio", "event"), "media", "<modality>_name"
(NExT-GPT) or "input_<modality>" (NExT-GPT's new code base):

- `llava`: {"id", "image": path | [paths] | absent, "conversations": [{"from": "human",
  "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}; PandaGPT's
  "conversation" is accepted too; EventGPT-style event chat is this with "event": "x.npy" and
  the preset's event placeholder.
- `captions`: {"image" | "video" | "audio" | "event" | "media" | "video_name" ...: path,
  "caption": text}, e.g. CC3M, WebVid, AudioCaps pairs.
- `etinstruct`: E.T. Instruct, {"video": path, "duration": s, "src": [s, ...], "tgt": [s, ...],
  "conversations": [...]} with the preset's time token ("<vid>") in the text, src for the
  user turns' ones and tgt for the replies' ones (needs a preset with heads.timestamps).

A file that cannot be read as a list of records is a dataset-level error. A record that breaks
a rule is logged, counted by reason and skipped; only when more than `max_bad_ratio` of the
records are bad does loading fail, with the counts and a few examples in the message.

The public names of the trainer's data path are all importable from here.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgumentError
from services.trainer._samples import (
    BadSampleError,
    MediaFile,
    RecordRules,
    Sample,
    _media_paths,
    check_media_files,
    media_keys,
    parse_caption,
    parse_etinstruct,
    parse_llava,
    record_id,
)
from services.trainer._supervised import (
    IGNORE_INDEX,
    Batch,
    EncodedSample,
    MediaRow,
    MediaSlots,
    SupervisedEncoder,
    collate,
    instruction_texts,
    modality_slots,
    render_supervised,
)
from services.trainer.dataspec import EXPECTED, DatasetSpec, sniff

__all__ = [
    "IGNORE_INDEX",
    "BadSampleError",
    "Batch",
    "DatasetSpec",
    "EncodedSample",
    "LoadReport",
    "MediaFile",
    "MediaRow",
    "MediaSlots",
    "Sample",
    "SupervisedDataset",
    "SupervisedEncoder",
    "collate",
    "instruction_texts",
    "load_samples",
    "load_supervised",
    "media_files",
    "media_keys",
    "modality_slots",
    "render_supervised",
    "sniff",
]

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 5  # examples kept in a LoadReport
MAX_LOGGED = 50  # bad samples logged at WARNING per dataset; the rest at DEBUG


@dataclass
class LoadReport:
    """What loading a dataset kept and skipped.

    Attributes:
        name: The dataset's name in logs and messages.
        total: Records read.
        kept: Records that became samples.
        bad: Records skipped.
        reasons: Skipped records by reason kind, e.g. {"media_missing": 3}.
        examples: The first few skips, "name[i] (id): message".
    """

    name: str
    total: int = 0
    kept: int = 0
    bad: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def bad_ratio(self) -> float:
        """Share of records skipped (0 for an empty dataset)."""
        return self.bad / self.total if self.total else 0.0

    def summary(self) -> str:
        """One line: counts, then reasons by frequency."""
        reasons = ", ".join(f"{k} {n}" for k, n in self.reasons.most_common()) or "none"
        return f"dataset {self.name}: kept {self.kept} of {self.total} samples; bad by reason: {reasons}"

    def _skip(self, index: int, sample_id: str, error: BadSampleError) -> None:
        self.bad += 1
        self.reasons[error.reason] += 1
        line = f"{self.name}[{index}]{f' ({sample_id})' if sample_id else ''}: {error.message}"
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(line)
        level = logging.WARNING if self.bad <= MAX_LOGGED else logging.DEBUG
        logger.log(level, "skipping bad sample %s [%s]", line, error.reason)
        if self.bad == MAX_LOGGED + 1:
            logger.warning("dataset %s: more bad samples; further ones are logged at DEBUG", self.name)


@dataclass(frozen=True)
class SupervisedDataset:
    """Encoded samples of one dataset; a map-style dataset for torch's DataLoader.

    Attributes:
        spec: Where it came from.
        samples: The kept samples.
        encoded: Their encodings, in the same order.
        report: What was kept and skipped.
    """

    spec: DatasetSpec
    samples: list[Sample]
    encoded: list[EncodedSample]
    report: LoadReport

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> EncodedSample:
        return self.encoded[index]


def load_samples(
    spec: DatasetSpec,
    *,
    placeholder: str = "<image>",
    max_per_prompt: int = 4,
    max_bad_ratio: float = 0.05,
    name: str | None = None,
    time_token: str | None = None,
) -> tuple[list[Sample], LoadReport]:
    """Read and check a dataset's records, skipping and counting bad ones.

    Args:
        spec: The dataset.
        placeholder: The modality's placeholder string in the preset.
        max_per_prompt: Most media items one sample may hold.
        max_bad_ratio: Largest share of bad records tolerated.
        name: The dataset's name in logs and messages; default the file name.
        time_token: The preset's time token (E.T. Chat's "<vid>"), or None.

    Returns:
        The kept samples and the report.

    Raises:
        InvalidArgumentError: The file is missing, empty, not JSON/JSONL or not a list; or
            more than `max_bad_ratio` of its records (or all of them) are bad.
    """
    rules = RecordRules(spec.modality, placeholder, max_per_prompt, spec.root, time_token)
    samples, _, report = _load(spec, rules, None, max_bad_ratio, name)
    return samples, report


def load_supervised(
    spec: DatasetSpec, encoder: SupervisedEncoder, *, max_bad_ratio: float = 0.05, name: str | None = None
) -> SupervisedDataset:
    """Read, check and encode a dataset; samples the encoder refuses count as bad too.

    Args:
        spec: The dataset.
        encoder: Tokenizes with the stage's template; its slots give the placeholder and limit.
        max_bad_ratio: Largest share of bad records tolerated.
        name: The dataset's name in logs and messages; default the file name.

    Raises:
        InvalidArgumentError: As `load_samples`, or the spec's modality has no slots.
    """
    slots = encoder.slots.get(spec.modality)
    if slots is None:
        raise InvalidArgumentError(
            f"dataset {spec.path}: modality: expected one of {sorted(encoder.slots)}, got {spec.modality!r}",
            param="modality",
        )
    rules = RecordRules(spec.modality, slots.placeholder, slots.max_per_prompt, spec.root, encoder.time_token)
    samples, encoded, report = _load(spec, rules, encoder.encode, max_bad_ratio, name)
    return SupervisedDataset(spec=spec, samples=samples, encoded=encoded, report=report)


def media_files(spec: DatasetSpec) -> list[Path]:
    """The media files a dataset's records name, each once, in first-seen order.

    A quiet first pass, before the features are computed: records that are malformed are
    skipped here without a word (`load_supervised` counts and reports them afterwards).

    Raises:
        InvalidArgumentError: The file is not a JSON list or JSONL.
    """
    found: dict[Path, None] = {}
    for record in _records(spec.path):
        if not isinstance(record, dict):
            continue
        try:
            paths = _media_paths(record, spec.modality)
        except BadSampleError:
            continue
        found.update({spec.root / p: None for p in paths})
    return list(found)


def _load(
    spec: DatasetSpec,
    rules: RecordRules,
    encode: Callable[[Sample], EncodedSample] | None,
    max_bad_ratio: float,
    name: str | None,
) -> tuple[list[Sample], list[EncodedSample], LoadReport]:
    if not 0.0 <= max_bad_ratio <= 1.0:
        raise InvalidArgumentError(f"max_bad_ratio: expected a value in [0, 1], got {max_bad_ratio}")
    report = LoadReport(name or spec.path.name)
    parse = {"llava": parse_llava, "captions": parse_caption, "etinstruct": parse_etinstruct}[spec.format]
    if spec.format == "etinstruct" and rules.time_token is None:
        raise InvalidArgumentError(
            f"dataset {spec.path}: format etinstruct needs a preset with timestamp heads "
            "(heads.timestamps), whose time token its text holds",
            param="format",
        )
    seen: dict[Path, BadSampleError | None] = {}
    samples: list[Sample] = []
    encoded: list[EncodedSample] = []
    for index, record in enumerate(_records(spec.path)):
        report.total += 1
        try:
            if isinstance(record, BadSampleError):
                raise record
            sample = parse(record, rules, index=index)
            check_media_files(sample, seen)
            if encode is not None:
                encoded.append(encode(sample))
        except BadSampleError as e:
            report._skip(index, record_id(record), e)
            continue
        samples.append(sample)
    report.kept = len(samples)
    if report.total == 0:
        raise InvalidArgumentError(f"dataset {spec.path}: {EXPECTED}, got no samples", param="path")
    _check_ratio(report, max_bad_ratio)
    if report.bad:
        logger.warning("%s", report.summary())
    else:
        logger.info("dataset %s: %s samples", report.name, report.kept)
    return samples, encoded, report


def _check_ratio(report: LoadReport, max_bad_ratio: float) -> None:
    if report.kept and report.bad_ratio <= max_bad_ratio:
        return
    limit = f"expected at most {max_bad_ratio:.1%} (max_bad_ratio)" if report.kept else "none is usable"
    reasons = ", ".join(f"{k} {n}" for k, n in report.reasons.most_common())
    examples = "; ".join(report.examples[:3])
    raise InvalidArgumentError(
        f"dataset {report.name}: {report.bad} of {report.total} samples are bad "
        f"({report.bad_ratio:.1%}), {limit}; by reason: {reasons}; e.g. {examples}"
    )


def _records(path: Path) -> Iterator[Any]:
    """Decoded records of a JSON list or JSONL file; a bad JSONL line yields a BadSampleError."""
    text = _read_text(path)
    stripped = text.strip()
    if not stripped:
        raise InvalidArgumentError(f"dataset {path}: {EXPECTED}, got an empty file", param="path")
    if stripped[0] == "[":
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(
                f"dataset {path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); {EXPECTED}",
                param="path",
            ) from None
        yield from data
        return
    if stripped[0] != "{":
        raise InvalidArgumentError(f"dataset {path}: {_not_records(stripped)}; {EXPECTED}", param="path")
    _refuse_one_object(path, stripped)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            yield BadSampleError("invalid_json", f"line {number}: not valid JSON (column {e.colno}: {e.msg})")


def _not_records(text: str) -> str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not valid JSON (line {e.lineno} column {e.colno}: {e.msg})"
    return f"got a JSON {type(value).__name__.replace('str', 'string')} instead of a list"


def _refuse_one_object(path: Path, text: str) -> None:
    """A whole file that is one multi-line JSON object is neither a list nor JSONL."""
    if "\n" not in text:
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return  # JSONL
    keys = ", ".join(repr(k) for k in list(data)[:5]) if isinstance(data, dict) else ""
    raise InvalidArgumentError(
        f"dataset {path}: {EXPECTED}, got one JSON object spanning several lines (keys {keys})",
        param="path",
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidArgumentError(f"dataset {path}: expected a file, found nothing", param="path") from None
    except IsADirectoryError:
        raise InvalidArgumentError(
            f"dataset {path}: expected a file, found a directory", param="path"
        ) from None
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(
            f"dataset {path}: expected UTF-8 text, got byte {e.object[e.start]:#x} at offset {e.start}",
            param="path",
        ) from None
    except OSError as e:
        raise InvalidArgumentError(f"dataset {path}: cannot read ({e.strerror})", param="path") from None
