"""The modality registry: one frozen record per modality, looked up by name everywhere.

A modality is everything modalmesh does with one kind of media, in one place: the content
parts and inline formats a client sends it in (REST and gRPC), the media types a data URL may
declare, the settings that bound it, the backbones that read it, what its preset section must
hold, how an item is decoded and preprocessed, the dummy item that warms its encoder up, and,
for the modalities modalmesh can also produce, the output pipeline. The gateway, the preset
schema, the encoders, the decoders and the trainer ask the record instead of testing the name
(as vLLM's `MULTIMODAL_REGISTRY` and the part-parser map of `vllm/entrypoints/chat_utils.py`):

    from services.common import modalities
    video = modalities.get("video")           # InvalidArgumentError naming the known ones
    video.url_part, video.data_url_types      # "video_url", ("video/",)
    video.hook("prepare")(preprocessor, data) # services.models.media.prepare:prepare_video

Adding a modality is one `register(Modality(...))` here plus the functions its hooks name;
every part type, preset rule and table below is read from the records. Generic wire parts
carry any registered modality by name (REST `{"type": "input_media", "input_media":
{"modality": ...}}`, gRPC `ChatContentPart.media`), so a new one needs no new field.

This module imports no torch, numpy or decoder library (the gateway image has none of them):
heavy behaviour is named by import strings ("package.module:function") that `hook` resolves
on first use, in the process that calls it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import Any, Literal

from services.common.errors import InvalidArgumentError

PREPARE = "services.models.media.prepare"
DUMMIES = "services.models.media.dummies"
PIPELINES = "services.models.decoders.pipelines"
PRESET_RULES = "services.common.presets"


@dataclass(frozen=True)
class OutputPipeline:
    """How modalmesh produces a modality (NExT-GPT's decoders): a diffusers pipeline.

    Attributes:
        pipeline: The diffusers class a decoder folder's `model_index.json` must name.
        formats: The file formats generated items are written in; the first is the default.
        params: The decoding parameters this modality takes beyond steps, guidance_scale and
            seed (`services.common.decode_params`).
        steps: The pipeline's own default number of denoising steps (its `__call__` default).
        guidance: The pipeline's own default guidance scale.
        conditioning_rows: The rows of the conditioning every decoder of this modality takes,
            where it is fixed (AudioLDM: 1, one pooled CLAP text embedding), else None.
        behaviour: Import string of the pipeline's conditioning, defaults and call
            (`services.models.decoders.pipelines.PipelineKind`).
    """

    pipeline: str
    formats: tuple[str, ...]
    params: frozenset[str]
    steps: int
    guidance: float
    behaviour: str
    conditioning_rows: int | None = None


@dataclass(frozen=True)
class Modality:
    """One modality: what the gateway, presets, encoders and decoders need to know of it.

    Attributes:
        name: The name used in presets, requests and the registry ("image").
        noun: Singular and plural of one item in messages ("audio clip", "audio clips").
        url_part: The typed REST content-part type carrying a URL (`{"type": "video_url",
            ...}`), or None. Typed parts are part of the wire schema (`gateway.protocol.
            ContentPart` has a field for each, as gRPC's `ChatContentPart` has a case named
            after image, video, audio and event); a new modality leaves them None and rides
            the generic parts.
        inline_part: The typed REST content-part type carrying base64 data and a format
            (`input_audio`), or None.
        inline_formats: The `format` values an inline item may declare; empty: none may be
            declared (the encoder reads the format from the bytes).
        data_url_types: Media types (or type prefixes ending in "/") a `data:` URL of this
            modality may declare.
        fetch_timeout_setting: The `Settings` field bounding one fetch of an item's URL.
        limit_settings: The `Settings` fields that bound one item in the encoder (read into
            `services.models.media.prepare.EncoderLimits`, which its `prepare` hook reads).
        backbones: The encoder backbones that read it (`EncoderSpec.backbone`).
        sampling: Whether its preset section needs an `encoder.sampling` ("required"), must
            not have one ("none").
        frames_field: The `SamplingSpec` field that fixes how many frames an item yields, if
            one does ("num_frames", "event_frames").
        frame_sampled: Whether items are decoded streams of frames picked by the spec's
            sampling (`FrameSampling`: num_frames, fps or ImageBind clips), as video.
        pictures: Whether items become pictures for the CLIP-style picture preprocessing
            (images, video frames, event frames), which its encoder then needs.
        adaptors: Connector types that read only this modality ("event_adaptor").
        preset_rules: Import string of a function `(where, spec) -> None` raising ValueError
            with the preset rules of this modality beyond the fields above, or None.
        prepare: Import string of `(MediaPreprocessor, bytes) -> Prepared`: decode and
            preprocess one item.
        dummy: Import string of `() -> bytes`: a small valid item, for warm-up and probes.
        output: How modalmesh produces it, if it can.
        inputs: Whether presets may take it in (False: an output-only modality).
    """

    name: str
    noun: tuple[str, str]
    url_part: str | None = None
    inline_part: str | None = None
    inline_formats: tuple[str, ...] = ()
    data_url_types: tuple[str, ...] = ()
    fetch_timeout_setting: str = "image_fetch_timeout_s"
    limit_settings: tuple[str, ...] = ()
    backbones: tuple[str, ...] = ()
    sampling: Literal["none", "required"] = "none"
    frames_field: str | None = None
    frame_sampled: bool = False
    pictures: bool = True
    adaptors: tuple[str, ...] = ()
    preset_rules: str | None = None
    prepare: str | None = None
    dummy: str | None = None
    output: OutputPipeline | None = None
    inputs: bool = True

    def hook(self, which: Literal["prepare", "dummy", "preset_rules", "behaviour"]) -> Any:
        """The function (or object) a hook's import string names, imported on first use.

        Raises:
            InvalidArgumentError: This modality has no such hook.
        """
        target = self.output.behaviour if which == "behaviour" and self.output else getattr(self, which, None)
        if not target:
            raise InvalidArgumentError(f"modality {self.name}: has no {which} hook")
        return resolve(target)

    def count(self, n: int) -> str:
        """`n` items in words: "1 video", "2 audio clips"."""
        return f"{n} {self.noun[0] if n == 1 else self.noun[1]}"

    def part_types(self) -> tuple[str, ...]:
        """The REST content-part types that carry this modality (besides `input_media`)."""
        return tuple(p for p in (self.url_part, self.inline_part) if p)


@cache
def resolve(target: str) -> Any:
    """The object an import string "package.module:attribute" names (imported once)."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


_REGISTRY: dict[str, Modality] = {}
MODALITIES: Mapping[str, Modality] = MappingProxyType(_REGISTRY)


def register(modality: Modality) -> Modality:
    """Add a modality to the registry.

    Raises:
        ValueError: The name, or one of its part types, is taken.
    """
    if modality.name in _REGISTRY:
        raise ValueError(f"modality {modality.name!r} is registered already")
    taken = {p for m in _REGISTRY.values() for p in m.part_types()}
    clash = [p for p in modality.part_types() if p in taken or p in RESERVED_PARTS]
    if clash:
        raise ValueError(f"modality {modality.name!r}: part types {clash} are taken")
    _REGISTRY[modality.name] = modality
    return modality


def get(name: str, *, where: str = "modality") -> Modality:
    """The record of a registered modality.

    Raises:
        InvalidArgumentError: No such modality; the message lists the registered ones.
    """
    found = _REGISTRY.get(name)
    if found is None:
        raise InvalidArgumentError(f"{where}: expected one of {sorted(_REGISTRY)}, got {name!r}", param=where)
    return found


def input_names() -> tuple[str, ...]:
    """The modalities a preset may take in, in registration order."""
    return tuple(m.name for m in _REGISTRY.values() if m.inputs)


def output_names() -> tuple[str, ...]:
    """The modalities modalmesh can produce, in registration order."""
    return tuple(m.name for m in _REGISTRY.values() if m.output is not None)


def by_part(part_type: str) -> Modality | None:
    """The modality a typed REST content part ("video_url", "input_audio") carries, if any."""
    return next((m for m in _REGISTRY.values() if part_type in m.part_types()), None)


def backbone_modalities(backbone: str) -> tuple[str, ...]:
    """The input modalities a backbone reads, in registration order."""
    return tuple(m.name for m in _REGISTRY.values() if m.inputs and backbone in m.backbones)


# Content-part types of the chat APIs that are not a modality's own.
GENERIC_PART = "input_media"
RESERVED_PARTS = frozenset({"text", "time", GENERIC_PART})

_SD_PARAMS = frozenset({"height", "width"})


register(
    Modality(
        name="image",
        noun=("image", "images"),
        url_part="image_url",
        data_url_types=("image/",),
        fetch_timeout_setting="image_fetch_timeout_s",
        limit_settings=("image_max_pixels",),
        backbones=("clip_vision", "eva_vit", "imagebind"),
        prepare=f"{PREPARE}:prepare_image",
        dummy=f"{DUMMIES}:dummy_png",
        output=OutputPipeline(
            pipeline="StableDiffusionPipeline",
            formats=("png",),
            params=_SD_PARAMS,
            steps=50,
            guidance=7.5,
            behaviour=f"{PIPELINES}:IMAGE",
        ),
    )
)
register(
    Modality(
        name="video",
        noun=("video", "videos"),
        url_part="video_url",
        data_url_types=("video/",),
        fetch_timeout_setting="video_fetch_timeout_s",
        limit_settings=("video_max_bytes", "video_max_seconds", "video_max_frames", "video_max_pixels"),
        backbones=("clip_vision", "eva_vit", "imagebind"),
        sampling="required",
        frames_field="num_frames",
        frame_sampled=True,
        preset_rules=f"{PRESET_RULES}:video_rules",
        prepare=f"{PREPARE}:prepare_video",
        dummy=f"{DUMMIES}:dummy_video",
        output=OutputPipeline(
            pipeline="TextToVideoSDPipeline",
            formats=("mp4", "gif"),
            params=_SD_PARAMS | {"num_frames", "fps"},
            steps=50,
            guidance=9.0,
            behaviour=f"{PIPELINES}:VIDEO",
        ),
    )
)
register(
    Modality(
        name="audio",
        noun=("audio clip", "audio clips"),
        url_part="audio_url",
        inline_part="input_audio",
        inline_formats=("wav", "mp3", "flac", "ogg"),
        data_url_types=("audio/",),
        fetch_timeout_setting="audio_fetch_timeout_s",
        limit_settings=("audio_max_bytes", "audio_max_seconds"),
        backbones=("imagebind",),
        sampling="required",
        pictures=False,
        preset_rules=f"{PRESET_RULES}:audio_rules",
        prepare=f"{PREPARE}:prepare_audio",
        dummy=f"{DUMMIES}:dummy_audio",
        output=OutputPipeline(
            pipeline="AudioLDMPipeline",
            formats=("wav",),
            params=frozenset({"duration_s"}),
            steps=10,
            guidance=2.5,
            behaviour=f"{PIPELINES}:AUDIO",
            conditioning_rows=1,
        ),
    )
)
register(
    Modality(
        name="event",
        noun=("event stream", "event streams"),
        url_part="event_url",
        inline_part="input_event",
        inline_formats=("npy", "npz"),
        # event files have no registered media type
        data_url_types=(
            "application/octet-stream",
            "application/x-npy",
            "application/x-npz",
            "application/npy",
        ),
        fetch_timeout_setting="event_fetch_timeout_s",
        limit_settings=("event_max_bytes", "event_max_events"),
        backbones=("clip_vision",),
        sampling="required",
        frames_field="event_frames",
        adaptors=("event_adaptor",),
        prepare=f"{PREPARE}:prepare_event",
        dummy=f"{DUMMIES}:dummy_events",
    )
)
register(
    Modality(
        name="thermal",
        noun=("thermal image", "thermal images"),
        # no typed part: thermal images ride the generic `input_media` part
        data_url_types=("image/",),
        fetch_timeout_setting="image_fetch_timeout_s",
        limit_settings=("image_max_pixels",),
        backbones=("imagebind",),
        pictures=False,  # one grey channel through ImageBind's thermal stem, not CLIP's pictures
        prepare="services.models.media.thermal:prepare_thermal_item",
        dummy="services.models.media.thermal:dummy_thermal",
    )
)
