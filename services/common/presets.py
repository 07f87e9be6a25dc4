"""Presets: one YAML file per system, validated by a typed schema.

A preset names, per input modality, the encoder backbone and its checkpoint, the layer and
tokens it takes, the connector and the placeholder; the LLM (architecture, checkpoint,
conversation template); and the adapter bundle served at start. Paths may use ${VAR}
environment references; ${MODALMESH_CACHE_DIR} defaults to the settings' cache folder.

Shipped presets live in the `presets` package; MODALMESH_PRESETS_DIR adds a folder that is
searched first. A preset can also be named by the path of its YAML file.
"""

from __future__ import annotations

import hashlib
import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.common.errors import InvalidArgumentError, NotFoundError, validation_problems

Modality = Literal["image"]
TemplateName = Literal["vicuna_v1", "llava_v1", "plain", "vicuna_v0", "videochat", "phi3"]
DType = Literal["float32", "float16", "bfloat16"]
PositiveInt = Annotated[int, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EncoderSpec(_Strict):
    """A frozen backbone served by the encoder service as one Triton model."""

    backbone: Literal["clip_vision"]
    checkpoint: Path
    select_layer: int = Field(-2, description="Index into the backbone's hidden states.")
    select_feature: Literal["patch", "cls_patch"] = "patch"
    tokens: PositiveInt = Field(description="Tokens per item the backbone returns.")
    dim: PositiveInt = Field(description="Width of each returned token.")
    dtype: DType = "float32"
    max_batch_size: PositiveInt = 8
    batch_delay_us: Annotated[int, Field(ge=0)] = 5000
    triton_model: str | None = Field(None, description="Triton model name; default <modality>_<backbone>.")


class ConnectorSpec(_Strict):
    """Maps encoder tokens into the LLM's embedding space (trained; part of the adapter bundle)."""

    type: Literal["linear", "mlp2x_gelu"]


class ModalitySpec(_Strict):
    encoder: EncoderSpec
    connector: ConnectorSpec
    placeholder: str = Field("<image>", description="Token standing for one item in the prompt.")
    max_per_prompt: PositiveInt = 4


class LLMSpec(_Strict):
    architecture: Literal["llama"]
    checkpoint: Path = Field(description="A Hugging Face model folder (config, weights, tokenizer).")
    template: TemplateName = "vicuna_v1"
    dtype: DType = "float32"
    max_context_tokens: PositiveInt = 2048


class AdapterSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: Path = Field(description="The adapter bundle folder served at start.")


class LoraSpec(_Strict):
    """LoRA on the LLM for instruction tuning (stage 3): rank, scale, dropout, target modules.

    `targets` are module-name suffixes inside the LLM only (e.g. q_proj): the trainer resolves
    them to full paths under the LLM, so encoder towers never receive LoRA.
    """

    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class Preset(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    generate: Literal["tiny"] | None = Field(
        None, description="Generator that writes the checkpoints on first use (built-in presets)."
    )
    modalities: dict[Modality, ModalitySpec]
    llm: LLMSpec
    adapter: AdapterSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)

    @model_validator(mode="after")
    def _placeholders_distinct(self) -> Preset:
        seen = [m.placeholder for m in self.modalities.values()]
        if len(seen) != len(set(seen)):
            raise ValueError(f"each modality needs its own placeholder, got {seen}")
        return self

    def triton_model(self, modality: str) -> str:
        """The Triton model name of a modality's encoder."""
        enc = self.modalities[modality].encoder  # type: ignore[index]
        return enc.triton_model or f"{modality}_{enc.backbone}"

    def encoder_id(self, modality: str) -> str:
        """Identity of a modality's encoder output, for caching features by content.

        The Triton model name plus a digest of the whole encoder spec (backbone, checkpoint,
        layer, tokens, dtype...), so that features made by another configuration are never
        served for this one.
        """
        spec = self.modalities[modality].encoder  # type: ignore[index]
        digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]
        return f"{self.triton_model(modality)}-{digest}"


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, env: dict[str, str], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                raise InvalidArgumentError(f"{where}: ${{{m.group(1)}}} is not set in the environment")
            return env[m.group(1)]

        return _VAR.sub(sub, value)
    return value


def _candidates(name: str, presets_dir: Path | None) -> list[Path]:
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return [Path(name)]
    out = []
    if presets_dir is not None:
        out.append(presets_dir / f"{name}.yaml")
    out.append(Path(str(resources.files("presets").joinpath(f"{name}.yaml"))))
    return out


def shipped_presets() -> list[str]:
    """Names of the presets that ship with modalmesh."""
    folder = resources.files("presets")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def parse_preset(text: str, *, cache_dir: Path, source: str = "<string>") -> Preset:
    """Validate preset YAML text; errors name the file and the field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidArgumentError(f"preset {source}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"preset {source}: expected a mapping, got {type(raw).__name__}")
    env = dict(os.environ)
    env.setdefault("MODALMESH_CACHE_DIR", str(cache_dir))
    try:
        return Preset.model_validate(_expand(raw, env, ""))
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"preset {source}: {e.message}") from e
    except ValidationError as e:
        problems = validation_problems(e.errors())
        raise InvalidArgumentError(f"preset {source}: {problems}") from e


def load_preset(name: str, *, cache_dir: Path, presets_dir: Path | None = None) -> Preset:
    """Find and validate a preset by name (or YAML path).

    Raises:
        NotFoundError: No such preset; the message lists the shipped ones.
        InvalidArgumentError: The file does not satisfy the schema.
    """
    for path in _candidates(name, presets_dir):
        if path.is_file():
            return parse_preset(path.read_text(), cache_dir=cache_dir, source=str(path))
    raise NotFoundError(f"preset {name!r} not found; shipped presets: {', '.join(shipped_presets())}")
