"""Caption embeddings: a decoder's own text-encoder conditioning of captions, for stage 2.

NExT-GPT's `process_embeddings.py` (SEEDS_SPEC 2.A): each diffusion pipeline encodes the
captions of a text-to-X set with its own text encoder, classifier-free guidance off, and the
result is what the output projector learns to produce from the signal tokens:

    image (Stable Diffusion)   `encode_prompt` last hidden state   (rows, width), (77, 768) for SD 1.5
    video (text-to-video SD)   `encode_prompt` last hidden state   (rows, width), (77, 1024) for ZeroScope
    audio (AudioLDM)           the normalised CLAP `text_embeds`   (width,), (512,); (1, width) for the loss

The pipeline is loaded once (`CaptionEmbedder`) and captions are encoded in batches. Files
keep the seed's shapes (`file_shape`); `load_caption_embedding` reads one back in the
conditioning's (rows, width). `embed_captions` is what `modalmesh embed-captions` and the
trainer's synthetic data both call: it reads a caption file (JSONL or a JSON list of
{"caption", "name" | "id" | media path}), writes `<out>/<name>.npy` per record and a `t2x`
dataset file (JSONL: {"id", "caption", "output_modality", "embedding"}) the trainer reads.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common import modalities
from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.presets import OutputSpec, Preset

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 32
DATASET_FILE = "t2x.jsonl"
NAME_KEYS = ("name", "id")
_OUTPUTS = modalities.output_names()
MEDIA_NAME_KEYS = (*_OUTPUTS, "media", *(f"{m}_name" for m in _OUTPUTS))
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def output_spec(preset: Preset, modality: str) -> OutputSpec:
    """The preset's output spec of `modality`.

    Raises:
        InvalidArgumentError: The preset cannot produce that modality.
    """
    spec = preset.outputs.get(modality)
    if spec is None:
        raise InvalidArgumentError(
            f"output modality: preset {preset.name} produces {sorted(preset.outputs) or 'text only'}, "
            f"got {modality!r}",
            param="modality",
        )
    return spec


def file_shape(modality: str, conditioning: Sequence[int]) -> tuple[int, ...]:
    """The shape one caption's embedding is stored in: (width,) for a pipeline whose conditioning
    is one pooled row (AudioLDM: its record's `output.conditioning_rows` is 1), else (rows, width)."""
    rows, width = conditioning
    out = modalities.get(modality).output
    pooled = out is not None and out.conditioning_rows == 1
    return (width,) if pooled and rows == 1 else (rows, width)


def load_caption_embedding(path: Path, modality: str, conditioning: Sequence[int]) -> np.ndarray:
    """One stored caption embedding as float32 (rows, width), checked against the conditioning.

    Raises:
        InvalidArgumentError: Missing or unreadable file, a shape other than the stored shape
            (or (rows, width)), or non-finite values. The message names the file.
    """
    rows, width = conditioning
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InvalidArgumentError(f"caption embedding {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"caption embedding {path}: not a .npy array ({e})") from None
    allowed = {file_shape(modality, conditioning), (rows, width)}
    if tuple(array.shape) not in allowed:
        raise InvalidArgumentError(
            f"caption embedding {path}: expected shape {' or '.join(str(s) for s in sorted(allowed))} "
            f"(the {modality} decoder's conditioning), got {tuple(array.shape)}"
        )
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise InvalidArgumentError(
            f"caption embedding {path}: expected finite floats, got dtype {array.dtype}"
            + ("" if not np.issubdtype(array.dtype, np.floating) else " with NaN or infinity")
        )
    return array.astype(np.float32).reshape(rows, width)  # (rows, width)


class CaptionEmbedder:
    """One output modality's decoder pipeline, loaded once, encoding captions in batches.

    Args:
        preset: A preset with `outputs`.
        modality: "image", "audio" or "video": one of the preset's outputs.
        device: Where the text encoder runs.

    Raises:
        InvalidArgumentError: The preset cannot produce `modality`.
        FailedPreconditionError: The decoder's conditioning is not the preset's
            `outputs.<modality>.conditioning`.
    """

    def __init__(self, preset: Preset, modality: str, *, device: str = "cpu") -> None:
        from services.models.decoders.pipelines import load_decoder

        self.modality = modality
        self.spec = output_spec(preset, modality)
        self.decoder = load_decoder(
            modality, self.spec.decoder.checkpoint, dtype=torch.float32, device=device
        )
        if tuple(self.decoder.conditioning_shape) != tuple(self.spec.conditioning):
            raise FailedPreconditionError(
                f"{modality} decoder at {self.spec.decoder.checkpoint}: conditioning "
                f"{tuple(self.decoder.conditioning_shape)}, expected {tuple(self.spec.conditioning)} "
                f"(preset {preset.name} outputs.{modality}.conditioning)"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """The stored shape of one caption's embedding (`file_shape`)."""
        return file_shape(self.modality, self.spec.conditioning)

    def encode(self, captions: Sequence[str]) -> np.ndarray:
        """The conditioning of each caption, float32 (B, *self.shape).

        Raises:
            InvalidArgumentError: An empty caption list or an empty caption.
        """
        if not captions:
            raise InvalidArgumentError("captions: expected at least one caption, got none")
        empty = [i for i, c in enumerate(captions) if not c.strip()]
        if empty:
            raise InvalidArgumentError(f"captions[{empty[0]}]: expected non-empty text")
        from services.models.decoders.pipelines import behaviour_of

        pipe = self.decoder.pipe
        with torch.inference_mode():
            # the pipeline's own text conditioning: the text encoder's last hidden state (B, 77, D),
            # or AudioLDM's L2-normalised CLAP text_embeds (B, D)
            out = behaviour_of(self.modality).encode_text(pipe, list(captions))
        array = out.detach().float().cpu().numpy()
        want = (len(captions), *self.shape)
        if array.shape != want:
            raise FailedPreconditionError(
                f"{self.modality} decoder text encoder: expected embeddings {want}, got {array.shape}"
            )
        return array


@dataclass(frozen=True)
class CaptionRecord:
    """One caption to embed: where it came from, its file name stem and its text."""

    line: int  # 1-based line (JSONL) or item (JSON list) number
    name: str
    caption: str


def read_captions(path: Path) -> list[CaptionRecord]:
    """The records of a caption file: JSONL or a JSON list of objects with a "caption".

    A record's name (its embedding's file stem) is its "name" or "id", else the file name of
    its media path ("image", "video", "audio", "media", "<modality>_name": NExT-GPT's
    `<name>.npy` next to `<name>`), else its line number.

    Raises:
        InvalidArgumentError: Missing or unreadable file, bad JSON, a record that is not an
            object, a missing or empty caption, a bad or repeated name; the message names the line.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidArgumentError(f"captions {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"captions {path}: cannot read ({e})") from None
    records: list[CaptionRecord] = []
    seen: dict[str, int] = {}
    for line, raw in _json_records(path, text):
        where = f"captions {path} line {line}"
        if not isinstance(raw, dict):
            raise InvalidArgumentError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        caption = raw.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise InvalidArgumentError(f"{where}: expected a non-empty 'caption' string, got {caption!r}")
        name = _record_name(raw, line)
        if not _NAME.match(name):
            raise InvalidArgumentError(
                f"{where}: name {name!r}: expected letters, digits, '.', '_' or '-' (it names the .npy file)"
            )
        if name in seen:
            raise InvalidArgumentError(f"{where}: name {name!r} repeats line {seen[name]}")
        seen[name] = line
        records.append(CaptionRecord(line, name, " ".join(caption.split())))
    if not records:
        raise InvalidArgumentError(f"captions {path}: expected at least one record, got none")
    return records


def _json_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(
                f"captions {path} line {e.lineno}: not valid JSON (column {e.colno}: {e.msg})"
            ) from None
        yield from enumerate(data, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(
                f"captions {path} line {number}: not valid JSON (column {e.colno}: {e.msg})"
            ) from None


def _record_name(raw: dict[str, Any], line: int) -> str:
    for key in NAME_KEYS:
        value = raw.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
    for key in MEDIA_NAME_KEYS:
        value = raw.get(key)
        if isinstance(value, str) and value:
            return Path(value).name
    return f"{line:06d}"


@dataclass(frozen=True)
class EmbedReport:
    """What `embed_captions` wrote: the dataset file, the count and the stored shape."""

    dataset: Path
    count: int
    shape: tuple[int, ...]


def embed_captions(
    embedder: CaptionEmbedder,
    records: Sequence[CaptionRecord],
    out_dir: Path,
    *,
    batch_size: int = DEFAULT_BATCH,
    dataset_name: str = DATASET_FILE,
    prefix: str = "",
) -> EmbedReport:
    """Write `<out_dir>/<name>.npy` per record and the t2x dataset file `<out_dir>/<dataset_name>`.

    Args:
        embedder: The loaded decoder of the output modality.
        records: From `read_captions`.
        out_dir: The output folder (created).
        batch_size: Captions per text-encoder call.
        dataset_name: The dataset file's name in `out_dir`.
        prefix: Prepended to each record's embedding path in the dataset file (when the
            dataset file lives above `out_dir`).

    Raises:
        InvalidArgumentError: batch_size below 1.
    """
    if batch_size < 1:
        raise InvalidArgumentError(f"batch size: expected at least 1, got {batch_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        embeddings = embedder.encode([r.caption for r in chunk])  # (B, *shape)
        for record, embedding in zip(chunk, embeddings, strict=True):
            np.save(out_dir / f"{record.name}.npy", embedding)
            rows.append(
                {
                    "id": record.name,
                    "caption": record.caption,
                    "output_modality": embedder.modality,
                    "embedding": f"{prefix}{record.name}.npy",
                }
            )
    dataset = out_dir / dataset_name
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    logger.info("embedded %s %s captions into %s", len(rows), embedder.modality, out_dir)
    return EmbedReport(dataset, len(rows), embedder.shape)
