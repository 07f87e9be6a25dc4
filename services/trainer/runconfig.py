"""What the worker hands each rank: the job plus everything resolved at launch, as one file.

The worker writes `<job_dir>/config.json`; every rank reads it. Paths inside are absolute, so
a rank needs nothing else from the worker's environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from services.trainer.jobs import JobSpec

CONFIG_FILE = "config.json"
PROGRESS_FILE = "progress.jsonl"
CANCEL_FILE = "CANCEL"
CHECKPOINTS = "checkpoints"
BUNDLE = "bundle"
TRAIN_LOG = "train.log"


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    spec: JobSpec
    job_dir: Path
    cache_dir: Path
    presets_dir: Path | None = None
    adapter_name: str
    init_bundle: Path  # connector weights (and the base fingerprint) to start from
    hardware: str = "cpu"

    @property
    def progress_path(self) -> Path:
        return self.job_dir / PROGRESS_FILE

    @property
    def cancel_path(self) -> Path:
        return self.job_dir / CANCEL_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.job_dir / CHECKPOINTS

    @property
    def bundle_dir(self) -> Path:
        return self.job_dir / BUNDLE

    def write(self) -> Path:
        self.job_dir.mkdir(parents=True, exist_ok=True)
        path = self.job_dir / CONFIG_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, job_dir: Path) -> RunConfig:
        return cls.model_validate_json((job_dir / CONFIG_FILE).read_text())

    def summary(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "stage": self.spec.stage, "preset": self.spec.preset}
