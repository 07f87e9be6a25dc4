"""The dataset part of a job spec and its cheap pre-queue check (no torch: the gateway and CLI
import this to validate jobs)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from services.common.errors import InvalidArgumentError

EXPECTED = "expected a JSON list of samples or JSONL (one object per line)"


class DatasetSpec(BaseModel):
    """A dataset as a job names it.

    Attributes:
        format: "llava" (conversations), "captions" (media + caption pairs), "etinstruct"
            (E.T. Instruct: conversations with "<vid>" times, src/tgt in seconds) or "t2x"
            (NExT-GPT text-to-X: caption + output modality + the decoder's caption embedding,
            as `modalmesh embed-captions` writes).
        path: The JSON or JSONL file.
        media_root: Folder relative media paths are resolved against; default the file's folder.
        modality: The modality of every media item; for "t2x", the output modality of
            records that name none.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["llava", "captions", "etinstruct", "t2x"]
    path: Path
    media_root: Path | None = None
    modality: str = "image"

    @property
    def root(self) -> Path:
        """The folder media paths are relative to."""
        return self.media_root if self.media_root is not None else self.path.parent


def sniff(spec: DatasetSpec) -> None:
    """Cheap checks before a job is queued: the file exists and looks like JSON or JSONL.

    Raises:
        InvalidArgumentError: Naming the path and what was expected vs found.
    """
    where = f"dataset {spec.path}"
    if not spec.path.exists():
        raise InvalidArgumentError(f"{where}: expected a file, found nothing", param="path")
    if not spec.path.is_file():
        raise InvalidArgumentError(f"{where}: expected a file, found a directory", param="path")
    if spec.media_root is not None and not spec.media_root.is_dir():
        raise InvalidArgumentError(
            f"{where}: media_root {spec.media_root}: expected a directory, found none", param="media_root"
        )
    try:
        with spec.path.open("rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    except OSError as e:
        raise InvalidArgumentError(f"{where}: cannot read ({e.strerror})", param="path") from e
    if not head:
        raise InvalidArgumentError(f"{where}: {EXPECTED}, got an empty file", param="path")
    if head[0] not in "[{":
        raise InvalidArgumentError(f"{where}: {EXPECTED}, got text starting with {head[0]!r}", param="path")
