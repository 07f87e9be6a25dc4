"""Training jobs: the spec a user submits, its validation before queuing, and its record.

A job names a preset, a stage, datasets, hyperparameters and DeepSpeed settings. It is
validated in full before it is queued (`validate_job`), so a bad job is refused at submission
with a message that says what is wrong; the worker validates it again when it starts (a job
sent to the Celery task by name skips the client). Stage defaults (learning rates, template)
live in `STAGE_DEFAULTS`, in one place.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.common.errors import InvalidArgumentError, ModalmeshError, NotFoundError, validation_problems
from services.common.presets import Preset, load_preset
from services.common.settings import Settings
from services.trainer.dataspec import DatasetSpec, sniff

Stage = Literal["stage1", "stage2", "stage3"]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
TASK_NAME = "modalmesh.train"


def queue_for(hardware: str) -> str:
    """The Celery queue of a hardware class: one queue per class (train.cpu, train.gpu, ...)."""
    return f"train.{hardware}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hyperparameters(_Strict):
    """Optimisation settings; None means the stage's default (STAGE_DEFAULTS)."""

    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = Field(default=None, description="Optimizer steps; overrides epochs.")
    micro_batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    lr: PositiveFloat | None = Field(
        default=None,
        description="Stage 1: connector LR. Stage 2: output projectors' LR. Stage 3: LoRA LR.",
    )
    connector_lr: PositiveFloat | None = Field(default=None, description="Stage 3: the connectors' LR.")
    projector_lr: PositiveFloat | None = Field(
        default=None, description="Stage 3: the output projectors' LR (default connector_lr)."
    )
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    max_grad_norm: PositiveFloat = 1.0
    max_length: PositiveInt = 512
    seed: int = 42
    max_bad_ratio: Annotated[float, Field(ge=0, le=1)] = 0.05
    checkpoint_every: PositiveInt = Field(
        default=50, description="Save a resumable checkpoint every N steps."
    )
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 1


class DeepSpeedSpec(_Strict):
    """How the run is launched and sharded."""

    zero_stage: Literal[2, 3] = 2
    world_size: PositiveInt = Field(default=1, description="Ranks per node.")
    nodes: PositiveInt = 1
    hostfile: Path | None = Field(
        default=None, description="DeepSpeed hostfile (`host slots=N` lines) for several hosts."
    )
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 where the GPU has it."
    )
    hardware: str = Field(
        default="cpu", pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Queue train.<hardware>."
    )
    dist_timeout_s: PositiveInt = 300

    @model_validator(mode="after")
    def _multi_host(self) -> DeepSpeedSpec:
        if (self.nodes > 1 or self.hostfile is not None) and self.launcher != "deepspeed":
            raise ValueError("several hosts (nodes > 1 or a hostfile) need launcher: deepspeed")
        return self


class LoraOverride(_Strict):
    enabled: bool | None = None
    r: PositiveInt | None = None
    alpha: PositiveInt | None = None
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    targets: list[str] | None = None


class JobSpec(_Strict):
    """What a user submits (YAML/JSON)."""

    preset: str = Field(min_length=1)
    stage: Stage
    datasets: list[DatasetSpec] = Field(min_length=1)
    hyperparameters: Hyperparameters = Field(default_factory=lambda: Hyperparameters())
    deepspeed: DeepSpeedSpec = Field(default_factory=lambda: DeepSpeedSpec())
    lora: LoraOverride = Field(default_factory=lambda: LoraOverride())
    adapter_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    init_from: str = Field(
        default="current",
        description='Connector weights to start from: "current" (the registry\'s current version, '
        'else the preset\'s bundle), "preset", "<name>@<version>", or a bundle folder.',
    )
    publish: bool = True
    description: str = ""


@dataclass(frozen=True)
class StageDefaults:
    template: str | None  # None: the preset's template
    lr: float
    connector_lr: float | None
    lora: bool


STAGE_DEFAULTS: dict[str, StageDefaults] = {
    # LLaVA / NExT-GPT: stage 1 trains the connector alone at 1e-3 on caption pairs, plain template.
    "stage1": StageDefaults(template="plain", lr=1e-3, connector_lr=None, lora=False),
    # Stage 2 (NExT-GPT pretrain_dec.sh): the output projectors alone at 2e-4 on text-to-X
    # captions, the preset's template (vicuna_v0 for NExT-GPT).
    "stage2": StageDefaults(template=None, lr=2e-4, connector_lr=None, lora=False),
    # Stage 3: LoRA at 2e-4, connectors at 2e-5 (LLaVA's mm_projector_lr), the preset's template.
    "stage3": StageDefaults(template=None, lr=2e-4, connector_lr=2e-5, lora=True),
}


def parse_job(data: str | bytes | dict[str, Any], *, source: str = "job") -> JobSpec:
    """Parse a job from YAML/JSON text or a mapping; errors name the field.

    Raises:
        InvalidArgumentError: Not YAML/JSON, not a mapping, or a field is wrong.
    """
    raw: Any = data
    if isinstance(data, str | bytes):
        try:
            raw = yaml.safe_load(data)
        except yaml.YAMLError as e:
            raise InvalidArgumentError(f"{source}: not valid YAML or JSON: {' '.join(str(e).split())}") from e
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"{source}: expected a mapping of job fields, got {type(raw).__name__}")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise InvalidArgumentError(f"{source}: {validation_problems(e.errors())}") from e


def resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    """The job with relative dataset paths, media roots and hostfile made absolute under `base`."""

    def absolute(path: Path | None) -> Path | None:
        return (
            None if path is None else (path.expanduser() if path.expanduser().is_absolute() else base / path)
        )

    datasets = [
        d.model_copy(update={"path": absolute(d.path), "media_root": absolute(d.media_root)})
        for d in spec.datasets
    ]
    deepspeed = spec.deepspeed.model_copy(update={"hostfile": absolute(spec.deepspeed.hostfile)})
    return spec.model_copy(update={"datasets": datasets, "deepspeed": deepspeed})


def read_job_file(path: Path) -> JobSpec:
    """A job from a YAML/JSON file, its relative paths resolved against the file's folder.

    Raises:
        InvalidArgumentError: The file is missing or unreadable, or the job is malformed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError(f"{path}: no such job file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{path}: cannot read the job file: {e}") from None
    return resolve_paths(parse_job(text, source=str(path)), path.resolve().parent)


def _check_outputs(spec: JobSpec, preset: Preset) -> None:
    """Stage 2 needs a preset with outputs and t2x data only; t2x data needs outputs."""
    if spec.stage == "stage2":
        if not preset.outputs:
            raise InvalidArgumentError(
                f"job.stage: stage2 aligns the output projectors; preset {preset.name} has no outputs "
                "(image/audio/video generation), expected a preset such as nextgpt",
                param="stage",
            )
        if any(d.format != "t2x" for d in spec.datasets):
            raise InvalidArgumentError(
                "job.datasets: stage2 trains on caption embeddings; expected format 't2x' for every "
                f"dataset, got {[d.format for d in spec.datasets]}",
                param="datasets",
            )
    for i, ds in enumerate(spec.datasets):
        if ds.format != "t2x":
            continue
        if spec.stage == "stage1":
            raise InvalidArgumentError(
                f"job.datasets[{i}].format: t2x data trains output projectors (stage2, stage3), not stage1",
                param=f"datasets[{i}].format",
            )
        if not preset.outputs:
            raise InvalidArgumentError(
                f"job.datasets[{i}].format: t2x needs a preset with outputs; preset {preset.name} has none",
                param=f"datasets[{i}].format",
            )
        if ds.modality not in preset.outputs and "modality" in ds.model_fields_set:
            raise InvalidArgumentError(
                f"job.datasets[{i}].modality: preset {preset.name} produces {sorted(preset.outputs)}, "
                f"got {ds.modality!r}",
                param=f"datasets[{i}].modality",
            )


@dataclass(frozen=True)
class ValidatedJob:
    spec: JobSpec
    preset: Preset
    adapter_name: str


def validate_job(spec: JobSpec, settings: Settings) -> ValidatedJob:
    """Check everything that can be checked before the job is queued.

    Raises:
        InvalidArgumentError: Unknown preset or stage, missing dataset or hostfile, a bad
            `init_from`, ... The message says what was expected and what came.
    """
    try:
        preset = load_preset(spec.preset, cache_dir=settings.cache_dir, presets_dir=settings.presets_dir)
    except NotFoundError as e:
        raise InvalidArgumentError(f"job.preset: {e.message}", param="preset") from e
    except ModalmeshError as e:
        raise InvalidArgumentError(f"job.preset: {e.message}", param="preset") from e
    _check_outputs(spec, preset)
    for i, ds in enumerate(spec.datasets):
        # a t2x dataset's modality is an output modality (checked by _check_outputs)
        if ds.format != "t2x" and ds.modality not in preset.modalities:
            raise InvalidArgumentError(
                f"job.datasets[{i}].modality: preset {preset.name} has {sorted(preset.modalities)}, "
                f"got {ds.modality!r}",
                param=f"datasets[{i}].modality",
            )
        try:
            sniff(ds)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"job.datasets[{i}]: {e.message}", param=f"datasets[{i}]") from e
    if spec.stage == "stage1" and any(d.format != "captions" for d in spec.datasets):
        raise InvalidArgumentError(
            "job.datasets: stage1 aligns the connector on caption pairs; expected format 'captions' "
            f"for every dataset, got {[d.format for d in spec.datasets]}",
            param="datasets",
        )
    ts = preset.heads.timestamps
    for i, ds in enumerate(spec.datasets):
        if ds.format != "etinstruct":
            continue
        if ts is None:
            raise InvalidArgumentError(
                f"job.datasets[{i}].format: etinstruct needs a preset with timestamp heads "
                f"(heads.timestamps); preset {preset.name} has none",
                param=f"datasets[{i}].format",
            )
        if ds.modality != ts.modality:
            raise InvalidArgumentError(
                f"job.datasets[{i}].modality: etinstruct matches {ts.modality} frames "
                f"(heads.timestamps.modality), got {ds.modality!r}",
                param=f"datasets[{i}].modality",
            )
    hostfile = spec.deepspeed.hostfile
    if hostfile is not None and not hostfile.is_file():
        raise InvalidArgumentError(
            f"job.deepspeed.hostfile: {hostfile} does not exist", param="deepspeed.hostfile"
        )
    init = spec.init_from
    if init not in ("current", "preset") and "@" not in init and not (Path(init) / "manifest.json").is_file():
        raise InvalidArgumentError(
            f"job.init_from: expected 'current', 'preset', '<name>@<version>' or a bundle folder "
            f"holding manifest.json, got {init!r}",
            param="init_from",
        )
    return ValidatedJob(spec=spec, preset=preset, adapter_name=spec.adapter_name or preset.adapter.name)


JobState = Literal["QUEUED", "RUNNING", "CANCELLING", "SUCCEEDED", "FAILED", "CANCELLED"]
FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


def check_one_launcher(spec: JobSpec) -> None:
    """A job that a queue worker runs must fit one launcher: one node, or several through a
    hostfile (ssh). Several nodes without a hostfile run one launcher per node
    (`python -m services.trainer.node`), which a worker cannot start on the other hosts.

    Raises:
        InvalidArgumentError: `deepspeed.nodes` > 1 with no `deepspeed.hostfile`.
    """
    ds = spec.deepspeed
    if ds.nodes > 1 and ds.hostfile is None:
        raise InvalidArgumentError(
            f"job.deepspeed: nodes {ds.nodes} without a hostfile runs one launcher per node "
            "(python -m services.trainer.node on each host, or the multihost-training Kubernetes "
            "Job; docs/training.md, 'Several hosts'); a queue worker runs one launcher: expected "
            "nodes 1 or a hostfile",
            param="deepspeed.nodes",
        )


class JobRecord(BaseModel):
    """A job's whole state, stored as one JSON document (so any write restores all of it)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    spec: dict[str, Any]
    state: JobState = "QUEUED"
    queue: str
    created: float = Field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    worker: str | None = None
    pgid: int | None = None
    job_dir: str | None = None
    progress: dict[str, Any] = Field(default_factory=dict)
    loss_history: list[tuple[int, float]] = Field(default_factory=list)
    resumed_from_step: int | None = None
    checkpoint: str | None = None
    bundle: str | None = None
    published: dict[str, Any] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    data_report: dict[str, Any] | None = None
    error: str | None = None
    message: str | None = None

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    def public(self) -> dict[str, Any]:
        """The JSON shape the API and CLI show."""
        return json.loads(self.model_dump_json())


def new_job_id() -> str:
    return uuid.uuid4().hex
