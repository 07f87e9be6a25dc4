"""The encoder service's Triton side: one PyTriton model per modality of the preset.

Each modality's `MediaEncoder` is bound as a Triton model named `preset.triton_model(modality)`
(e.g. "video_eva_vit") with Triton's dynamic batcher (`max_batch_size` and `batch_delay_us`
from the modality's `EncoderSpec`). Clients speak KServe v2 (stock `tritonclient.grpc` works).
The model's tensors, per item along the batch dimension (see `services.encoders.protocol`):

    input   media     BYTES  (1,)           the compressed file
    output  features  FP32   (-1, dim)      frames * tokens_per_frame rows, frame-major
    output  times     FP32   (-1,)          each frame's time in seconds
    output  error     BYTES  (1,)           empty for a good item, else why it was refused

Rows vary per item (fps sampling), so the inference callable uses PyTriton's raw interface:
it receives the batch's requests as a list and answers one dict per request, each with its own
shapes; only the items of one request share arrays (padded: zero rows, NaN times).

Why `error` exists: PyTriton 0.7.0 fails every request of a dynamic batch when the inference
callable raises (pytriton/proxy/model.py turns the exception into one TritonModelException for
the whole batch), so a bad file would fail the good files batched with it. Per-item failures
(not a video, truncated, too long) therefore travel in-band: the request itself succeeds, its
`error` holds the message and its `features` are zeros. Only a server fault (the backbone's
forward failing) raises and fails the batch with Triton's INTERNAL status.

Modalities whose specs differ only in sampling and serving options (PandaGPT's ImageBind for
image, video and audio) share one loaded backbone. The `x-request-id` gRPC/HTTP header is
forwarded by Triton into the request parameters (`grpc_header_forward_pattern`) and bound to
the log lines of that request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.errors import ModalmeshError
from services.common.presets import EncoderSpec, Preset
from services.common.settings import Settings
from services.common.triton_service import (
    InferFn,
    PortFields,
    TensorSpec,
    TritonServer,
    bind_batched,
    respond_per_request,
)
from services.encoders.protocol import ERROR_OUTPUT, FEATURES_OUTPUT, MEDIA_INPUT, TIMES_OUTPUT
from services.models.media.encode import EncoderLimits, MediaEncoder

logger = logging.getLogger(__name__)


@dataclass
class BoundEncoder:
    """A modality's encoder and the Triton model that serves it."""

    modality: str
    model_name: str
    spec: EncoderSpec
    encoder: MediaEncoder


def _shared_key(spec: EncoderSpec) -> str:
    """Specs with equal keys can share one loaded backbone (they differ in sampling, preprocessing
    or serving only)."""
    return spec.model_dump_json(
        exclude={"sampling", "preprocess", "max_batch_size", "batch_delay_us", "triton_model"}
    )


def load_encoders(
    preset: Preset, settings: Settings, *, device: str | None = None, decode_workers: int | None = None
) -> list[BoundEncoder]:
    """Load every modality's encoder of the preset (checkpoints must exist).

    `decode_workers` (default: `settings.encoder_decode_workers`, 0 = min(4, CPU count)) sizes
    each encoder's decode pool.

    Modalities whose encoder specs are equal apart from sampling and serving options share
    one backbone, built with the towers all of them need.
    """
    from services.models.backbones.build import build_backbone

    limits = EncoderLimits.from_settings(settings)
    if decode_workers is None and settings.encoder_decode_workers:
        decode_workers = settings.encoder_decode_workers
    groups: dict[str, list[str]] = {}
    for modality, mspec in preset.modalities.items():
        groups.setdefault(_shared_key(mspec.encoder), []).append(modality)
    backbones = {}
    for key, modalities in groups.items():
        spec = preset.modalities[modalities[0]].encoder
        backbones[key] = build_backbone(spec, modalities=modalities, device=device)
    bound = []
    for modality, mspec in preset.modalities.items():
        encoder = MediaEncoder.from_spec(
            modality,
            mspec.encoder,
            limits=limits,
            backbone=backbones[_shared_key(mspec.encoder)],
            decode_workers=decode_workers,
        )
        bound.append(BoundEncoder(modality, preset.triton_model(modality), mspec.encoder, encoder))
    return bound


def _items(media: np.ndarray) -> list[bytes]:
    """A request's `media` input, (n, 1) BYTES, as n byte strings."""
    return [bytes(x) for x in media.reshape(-1)]


def _response(
    results: list[Any], *, rows_per_frame: int, dim: int, empty_frames: int, model_name: str
) -> dict[str, np.ndarray]:
    """One request's outputs: its items padded to the longest (zero rows, NaN times)."""
    frames = max((len(r.times) for r in results if not isinstance(r, ModalmeshError)), default=empty_frames)
    n = len(results)
    features = np.zeros((n, frames * rows_per_frame, dim), dtype=np.float32)  # (n, rows, D)
    times = np.zeros((n, frames), dtype=np.float32)  # (n, frames)
    errors = np.empty((n, 1), dtype=object)  # (n, 1) BYTES
    for k, result in enumerate(results):
        if isinstance(result, ModalmeshError):
            errors[k, 0] = result.message.encode()
            logger.info("%s: item %d refused: %s", model_name, k, result.message)
            continue
        errors[k, 0] = b""
        features[k, : len(result.features)] = result.features
        times[k, : len(result.times)] = result.times
        times[k, len(result.times) :] = np.nan
    return {FEATURES_OUTPUT: features, TIMES_OUTPUT: times, ERROR_OUTPUT: errors}


def make_infer_fn(encoder: MediaEncoder, *, model_name: str) -> InferFn:
    """The inference callable of one model, over PyTriton's raw list of requests.

    All requests' items are encoded in one `encoder.encode` call (one pass through the
    backbone), then split back per request. A request may carry several items along its
    batch dimension; each request gets its own shapes.
    """
    rows_per_frame = encoder.tokens_per_frame if not encoder.backbone.joint_embedding else 1
    sampling = encoder.spec.sampling
    fixed = sampling.frames_per_item(encoder.modality) if sampling is not None else None
    empty_frames = 1 if encoder.backbone.joint_embedding else (fixed or 1)

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        per_request = [_items(request[MEDIA_INPUT]) for request in requests]
        flat = [item for items in per_request for item in items]
        start = time.perf_counter()
        results = encoder.encode(flat)
        elapsed_ms = (time.perf_counter() - start) * 1000
        return respond_per_request(
            requests,
            [len(items) for items in per_request],
            results,
            lambda outcomes: _response(
                list(outcomes),
                rows_per_frame=rows_per_frame,
                dim=encoder.dim,
                empty_frames=empty_frames,
                model_name=model_name,
            ),
            lambda n: logger.info(
                "%s: encoded %d item(s) in a batch of %d (%.1f ms)", model_name, n, len(flat), elapsed_ms
            ),
        )

    return infer


def bind_encoder(triton: Any, bound: BoundEncoder) -> None:
    """Bind one encoder to a (not yet running) `pytriton.triton.Triton` as a batched model."""
    bind_batched(
        triton,
        model_name=bound.model_name,
        infer_func=make_infer_fn(bound.encoder, model_name=bound.model_name),
        inputs=[TensorSpec(MEDIA_INPUT, bytes, (1,))],
        outputs=[
            TensorSpec(FEATURES_OUTPUT, np.float32, (-1, bound.spec.dim)),
            TensorSpec(TIMES_OUTPUT, np.float32, (-1,)),
            TensorSpec(ERROR_OUTPUT, bytes, (1,)),
        ],
        max_batch_size=bound.spec.max_batch_size,
        batch_delay_us=bound.spec.batch_delay_us,
    )


class EncoderServer(TritonServer[BoundEncoder]):
    """Triton serving the preset's encoders: load -> warm up -> start -> serve -> stop.

    Args:
        encoders: The loaded encoders, one per modality.
        settings: Addresses and ports (`host`, `encoder_{http,grpc,metrics}_port`).
    """

    port_fields = PortFields.named("encoder")
    log = logger

    def warmup_model(self, bound: BoundEncoder) -> None:
        bound.encoder.warmup()

    def bind_model(self, triton: Any, bound: BoundEncoder) -> None:
        bind_encoder(triton, bound)

    def close_model(self, bound: BoundEncoder) -> None:
        """The encoder's decode threads."""
        bound.encoder.close()


def build_server(preset: Preset, settings: Settings) -> EncoderServer:
    """`python -m services.encoders`' server: every modality's encoder of the preset loaded
    (a tiny preset's checkpoints generated on first use), not started."""
    from services.models.tiny import ensure_generated

    ensure_generated(preset)
    return EncoderServer(load_encoders(preset, settings), settings)
