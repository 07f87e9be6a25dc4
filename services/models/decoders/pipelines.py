"""Diffusion decoders: load a diffusers pipeline once, validate a request, generate one item.

A `Decoder` wraps one loaded pipeline (Stable Diffusion for images, AudioLDM for audio,
text-to-video SD / ZeroScope for video) with what a request is checked against: the
conditioning shape and dtype the pipeline takes (NExT-GPT's output projectors produce it in
place of the text encoder), the parameter limits, and the negative embedding used for
classifier-free guidance. `load_decoder` is called once per process by the owner of the
decoder (never per request); `decode` runs one item and returns raw media (`media_out`
encodes it) and `decode_batch` runs several, one pipeline call per group of compatible
items. Nothing here knows about transports.

What differs between the pipelines (how the conditioning enters, the defaults, the call's
arguments and what comes out) is one `PipelineKind` object per output modality (`IMAGE`,
`AUDIO`, `VIDEO`), named by that modality's registry record (`output.behaviour`) together with
the diffusers class and default steps and guidance.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image

from services.common import modalities
from services.common.decode_params import check_params, kind_fields
from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.presets import DecodeLimits

logger = logging.getLogger(__name__)

DecoderKind = str  # an output modality of the registry ("image", "audio", "video")


@dataclass(frozen=True)
class DecodeParams:
    """Per-request decoding parameters; None takes the decoder's default.

    `height`/`width` apply to images and video, `duration_s` to audio, `num_frames` and `fps`
    to video. `guidance_scale <= 1` turns classifier-free guidance off.
    """

    steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    duration_s: float | None = None
    num_frames: int | None = None
    fps: int | None = None


@dataclass(frozen=True)
class ImageOut:
    modality: ClassVar[str] = "image"
    image: Image.Image  # RGB, height x width
    seed: int


@dataclass(frozen=True)
class AudioOut:
    modality: ClassVar[str] = "audio"
    waveform: np.ndarray  # (samples,) float32 in [-1, 1], mono
    sample_rate: int
    seed: int


@dataclass(frozen=True)
class VideoOut:
    modality: ClassVar[str] = "video"
    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: int
    seed: int


Media = ImageOut | AudioOut | VideoOut


@dataclass
class Decoder:
    """One loaded pipeline and what requests to it are validated against.

    Generation holds `lock` for the whole pipeline call: a diffusers scheduler keeps per-call state,
    so one pipeline runs one generation at a time.
    """

    kind: DecoderKind
    pipe: Any
    conditioning_shape: tuple[int, ...]  # per item, e.g. (77, 768) for SD 1.5
    dtype: torch.dtype
    device: torch.device
    negative: torch.Tensor  # (1, *conditioning_shape), the unconditional embedding for CFG
    defaults: DecodeParams
    limits: DecodeLimits
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def load_decoder(
    kind: str,
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    limits: DecodeLimits | None = None,
    negative: Literal["empty_prompt", "zeros"] = "empty_prompt",
    defaults: DecodeParams | None = None,
) -> Decoder:
    """Load a diffusers pipeline folder as the decoder of `kind` (once per process).

    Args:
        kind: "image" (StableDiffusionPipeline), "audio" (AudioLDMPipeline) or "video"
            (TextToVideoSDPipeline); the folder's `model_index.json` must name that class.
        folder: The pipeline folder (`save_pretrained` layout).
        dtype: The weights' dtype; conditioning tensors must come in this dtype.
        device: Where the pipeline runs.
        limits: Request limits; `DecodeLimits()` when None.
        negative: The unconditional embedding for classifier-free guidance: the pipeline's
            own text encoder on "" (NExT-GPT's choice) or zeros.
        defaults: Request defaults over the pipeline's own (e.g. fewer steps for a tiny
            twin); they are checked against `limits` like a request.

    Raises:
        NotFoundError: The folder or its `model_index.json` does not exist.
        FailedPreconditionError: The folder holds another pipeline class than `kind` needs.
    """
    import diffusers

    kind_fields(kind)  # an output modality, else InvalidArgumentError naming them
    output = modalities.get(kind).output
    assert output is not None
    behaviour = behaviour_of(kind)
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise NotFoundError(f"decoder folder {folder}: no model_index.json")
    cls = getattr(diffusers, output.pipeline)
    found = diffusers.DiffusionPipeline.load_config(folder)["_class_name"]
    if found != cls.__name__:
        raise FailedPreconditionError(
            f"{kind} decoder at {folder}: expected a {cls.__name__}, got {found}", param="folder"
        )
    pipe = cls.from_pretrained(folder, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    shape = behaviour.conditioning_shape(pipe)
    with torch.inference_mode():
        neg = behaviour.encode_text(pipe, "") if negative == "empty_prompt" else torch.zeros(1, *shape)
    decoder = Decoder(
        kind=kind,
        pipe=pipe,
        conditioning_shape=shape,
        dtype=dtype,
        device=torch.device(device),
        negative=neg.to(device=device, dtype=dtype).reshape(1, *shape),
        defaults=behaviour.defaults(pipe, DecodeParams(steps=output.steps, guidance_scale=output.guidance)),
        limits=limits or DecodeLimits(),
    )
    if defaults is not None:
        decoder.defaults = resolve_params(decoder, defaults)
    logger.info("loaded %s decoder %s from %s (conditioning %s)", kind, found, folder, shape)
    return decoder


class PipelineKind:
    """What one output modality's pipeline does differently: the cross-attention pipelines
    (Stable Diffusion, text-to-video SD) by default; `_Audio` overrides for AudioLDM."""

    def conditioning_shape(self, pipe: Any) -> tuple[int, ...]:
        """One item's conditioning: the text encoder's hidden states, (tokens, width)."""
        return (int(pipe.tokenizer.model_max_length), int(pipe.unet.config.cross_attention_dim))

    def encode_text(self, pipe: Any, prompt: str | list[str]) -> torch.Tensor:
        """The pipeline's own text conditioning of `prompt` (the negative embedding of "")."""
        embeds: torch.Tensor = pipe.encode_prompt(prompt, pipe.device, 1, False)[0]
        return embeds  # (B, 77, D)

    def defaults(self, pipe: Any, base: DecodeParams) -> DecodeParams:
        """The pipeline's defaults over `base` (steps and guidance from the registry)."""
        side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        return dataclasses.replace(base, height=side, width=side)

    def call_args(self, p: DecodeParams, cond: torch.Tensor, negs: torch.Tensor) -> dict[str, Any]:
        """The pipeline call's conditioning and size arguments."""
        return {"prompt_embeds": cond, "negative_prompt_embeds": negs, "height": p.height, "width": p.width}

    def outputs(self, decoder: Decoder, out: Any, p: DecodeParams, seeds: list[int]) -> list[Media]:
        """The pipeline's output as one item per seed."""
        raise NotImplementedError


class _Image(PipelineKind):
    def outputs(self, decoder: Decoder, out: Any, p: DecodeParams, seeds: list[int]) -> list[Media]:
        return [
            ImageOut(Image.fromarray(_to_uint8(out.images[i])), s) for i, s in enumerate(seeds)
        ]  # (H, W, 3)


class _Video(PipelineKind):
    def defaults(self, pipe: Any, base: DecodeParams) -> DecodeParams:
        return dataclasses.replace(super().defaults(pipe, base), num_frames=16, fps=8)

    def call_args(self, p: DecodeParams, cond: torch.Tensor, negs: torch.Tensor) -> dict[str, Any]:
        return {**super().call_args(p, cond, negs), "num_frames": p.num_frames}

    def outputs(self, decoder: Decoder, out: Any, p: DecodeParams, seeds: list[int]) -> list[Media]:
        assert p.fps is not None  # resolved from the defaults
        frames = np.asarray(out.frames)  # (B, F, H, W, 3)
        return [VideoOut(_to_uint8(frames[i]), p.fps, s) for i, s in enumerate(seeds)]


class _Audio(PipelineKind):
    """AudioLDM: one pooled, L2-normalised CLAP text embedding enters the UNet as its class
    embedding, (1, D) per item; the call takes (B, D) and a length in seconds."""

    def conditioning_shape(self, pipe: Any) -> tuple[int, ...]:
        return (1, int(pipe.unet.config.projection_class_embeddings_input_dim))

    def encode_text(self, pipe: Any, prompt: str | list[str]) -> torch.Tensor:
        embeds: torch.Tensor = pipe._encode_prompt(prompt, pipe.device, 1, False)
        return embeds  # (B, D); of "": AudioLDM's own negative prompt

    def defaults(self, pipe: Any, base: DecodeParams) -> DecodeParams:
        side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        hop_s = float(np.prod(pipe.vocoder.config.upsample_rates)) / pipe.vocoder.config.sampling_rate
        return dataclasses.replace(base, duration_s=side * hop_s)

    def call_args(self, p: DecodeParams, cond: torch.Tensor, negs: torch.Tensor) -> dict[str, Any]:
        return {
            "prompt_embeds": cond[:, 0],
            "negative_prompt_embeds": negs[:, 0],
            "audio_length_in_s": p.duration_s,
        }

    def outputs(self, decoder: Decoder, out: Any, p: DecodeParams, seeds: list[int]) -> list[Media]:
        rate = int(decoder.pipe.vocoder.config.sampling_rate)
        return [
            AudioOut(np.clip(np.asarray(out.audios[i], dtype=np.float32), -1.0, 1.0), rate, s)  # (samples,)
            for i, s in enumerate(seeds)
        ]


IMAGE: PipelineKind = _Image()
VIDEO: PipelineKind = _Video()
AUDIO: PipelineKind = _Audio()


def behaviour_of(kind: str) -> PipelineKind:
    """The `PipelineKind` of an output modality (its registry record's `output.behaviour`)."""
    found: PipelineKind = modalities.get(kind).hook("behaviour")
    return found


def resolve_params(decoder: Decoder, params: DecodeParams) -> DecodeParams:
    """The request's parameters over the decoder's defaults, checked against its limits.

    The checks are `params.check_params`, the gateway's own, so a request gets the same message
    wherever it is refused.

    Raises:
        InvalidArgumentError: A parameter that does not apply to this kind, or one out of
            range; the message names the field, the allowed range and the value.
    """
    merged = DecodeParams(
        **{
            f.name: _first(getattr(params, f.name), getattr(decoder.defaults, f.name))
            for f in dataclasses.fields(params)
        }
    )
    values = dataclasses.asdict(merged)
    check_params(decoder.kind, values, decoder.limits)
    # The kind's own fields must be set (from the defaults when the request leaves them out).
    for name in ("steps", "guidance_scale", *sorted(kind_fields(decoder.kind))):
        if values[name] is None:
            raise InvalidArgumentError(f"{name}: expected a value, got none (no default either)", param=name)
    return merged


def _first(value: Any, default: Any) -> Any:
    return default if value is None else value


def check_conditioning(decoder: Decoder, embeds: torch.Tensor, name: str = "prompt_embeds") -> torch.Tensor:
    """Check one item's conditioning tensor and return it as a batch of one on the device.

    Accepts `conditioning_shape` or `(1, *conditioning_shape)` in the decoder's dtype.

    Raises:
        InvalidArgumentError: Wrong type, shape or dtype, or non-finite values.
    """
    shape = decoder.conditioning_shape
    if not isinstance(embeds, torch.Tensor):
        raise InvalidArgumentError(
            f"{name}: expected a torch.Tensor, got {type(embeds).__name__}", param=name
        )
    if tuple(embeds.shape) not in (shape, (1, *shape)):
        raise InvalidArgumentError(
            f"{name} for the {decoder.kind} decoder: expected shape {shape} or {(1, *shape)}, got {tuple(embeds.shape)}",
            param=name,
        )
    if embeds.dtype != decoder.dtype:
        raise InvalidArgumentError(f"{name}: expected dtype {decoder.dtype}, got {embeds.dtype}", param=name)
    if not torch.isfinite(embeds).all():
        raise InvalidArgumentError(f"{name}: expected finite values, got NaN or infinity", param=name)
    return embeds.reshape(1, *shape).to(decoder.device)  # (1, *shape)


Outcome = Media | InvalidArgumentError


def decode_batch(
    decoder: Decoder,
    embeds_list: Sequence[Any],
    params_list: Sequence[DecodeParams | None],
    *,
    negative_embeds: torch.Tensor | None = None,
) -> list[Outcome]:
    """Generate several items, one pipeline call per group of compatible items.

    Items whose resolved parameters are equal apart from the seed form a group and go through
    the pipeline together: a batch of `prompt_embeds` and one CPU `torch.Generator` per item,
    so each item starts from the noise its own seed gives and comes out as it would alone
    (up to float rounding of batched kernels). An item whose parameters or conditioning are
    refused gets its `InvalidArgumentError` in its place; the others still run.

    Args:
        decoder: From `load_decoder`.
        embeds_list: Per item, its conditioning (see `decode`).
        params_list: Per item, its parameters (None: every default); as long as `embeds_list`.
        negative_embeds: The unconditional embedding of every item; the decoder's by default.

    Returns:
        Per item, in order, `ImageOut` / `AudioOut` / `VideoOut` with the seed used, or the
        `InvalidArgumentError` that refused it.

    Raises:
        InvalidArgumentError: The lists differ in length, or `negative_embeds` is refused.
    """
    if len(embeds_list) != len(params_list):
        raise InvalidArgumentError(
            f"decode_batch: expected as many params as embeds, got {len(params_list)} and {len(embeds_list)}"
        )
    neg = (
        decoder.negative
        if negative_embeds is None
        else check_conditioning(decoder, negative_embeds, "negative_embeds")
    )  # (1, *shape)
    results: list[Outcome | None] = [None] * len(embeds_list)
    groups: dict[DecodeParams, list[tuple[int, torch.Tensor, int]]] = {}
    for index, (embeds, params) in enumerate(zip(embeds_list, params_list, strict=True)):
        try:
            p = resolve_params(decoder, params or DecodeParams())
            cond = check_conditioning(decoder, embeds)  # (1, *shape)
        except InvalidArgumentError as e:
            results[index] = e
            continue
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        groups.setdefault(dataclasses.replace(p, seed=None), []).append((index, cond, seed))
    for p, items in groups.items():
        outs = _generate(decoder, p, torch.cat([c for _, c, _ in items]), neg, [s for _, _, s in items])
        for (index, _, _), out in zip(items, outs, strict=True):
            results[index] = out
    return [r for r in results if r is not None]


def _generate(
    decoder: Decoder, p: DecodeParams, cond: torch.Tensor, neg: torch.Tensor, seeds: list[int]
) -> list[Media]:
    """One pipeline call for `len(seeds)` items sharing the parameters `p` (seed aside)."""
    n = len(seeds)
    # CPU generators: the same seed gives the same initial noise on every device.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    negs = neg.expand(n, *neg.shape[1:])  # (B, *shape)
    common: dict[str, Any] = {
        "num_inference_steps": p.steps,
        "guidance_scale": p.guidance_scale,
        "generator": generators,
        "output_type": "np",
    }
    behaviour = behaviour_of(decoder.kind)
    common |= behaviour.call_args(p, cond, negs)
    with decoder.lock, torch.inference_mode():
        out = decoder.pipe(**common)
    return behaviour.outputs(decoder, out, p, seeds)


def decode(
    decoder: Decoder,
    prompt_embeds: torch.Tensor,
    params: DecodeParams | None = None,
    *,
    negative_embeds: torch.Tensor | None = None,
) -> Media:
    """Generate one image, sound or clip from a conditioning tensor.

    Args:
        decoder: From `load_decoder`.
        prompt_embeds: One item's conditioning, `decoder.conditioning_shape` (optionally with
            a leading batch of 1), in `decoder.dtype`: (77, 768) for SD 1.5, (77, 1024) for
            ZeroScope, (1, 512) for AudioLDM (used as given; AudioLDM's own are L2-normalised).
        params: Decoding parameters; None takes every default.
        negative_embeds: The unconditional embedding for guidance; the decoder's by default.

    Returns:
        `ImageOut`, `AudioOut` or `VideoOut`, with the seed that was used.

    Raises:
        InvalidArgumentError: Bad parameters or conditioning (nothing is generated).
    """
    (out,) = decode_batch(decoder, [prompt_embeds], [params], negative_embeds=negative_embeds)
    if isinstance(out, InvalidArgumentError):
        raise out
    return out


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
