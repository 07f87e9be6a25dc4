"""The encoder service's Triton side: one PyTriton model per modality of the preset.

Each modality's `ImageEncoder` is bound as a Triton model named `preset.triton_model(modality)`
(e.g. "image_clip_vision") with Triton's dynamic batcher (`max_batch_size` and
`batch_delay_us` from the modality's `EncoderSpec`). Clients speak KServe v2 (stock
`tritonclient.grpc` works). The model's tensors, per item along the batch dimension:

    input   media     BYTES  (1,)            the compressed file (PNG, JPEG, ...)
    output  features  FP32   (tokens, dim)   the backbone's tokens; zeros where `error` is set
    output  error     BYTES  (1,)            empty for a good item, else why it was refused

Why `error` exists: PyTriton 0.7.0 fails every request of a dynamic batch when the inference
callable raises (pytriton/proxy/model.py turns the exception into one TritonModelException for
the whole batch), so a bad image would fail the good images batched with it. Per-item failures
(not an image, truncated, too large) therefore travel in-band: the request itself succeeds, its
`error` holds the message and its `features` are zeros. Only a server fault (the backbone's
forward failing) raises and fails the batch with Triton's INTERNAL status.

The `x-request-id` gRPC/HTTP header is forwarded by Triton into the request parameters
(`grpc_header_forward_pattern`) and bound to the log lines of that request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.errors import ModalmeshError
from services.common.log import REQUEST_ID_HEADER, bound_request_id
from services.common.presets import EncoderSpec, Preset
from services.common.settings import Settings
from services.encoders.model import ImageEncoder
from services.encoders.protocol import ERROR_OUTPUT, FEATURES_OUTPUT, MEDIA_INPUT

logger = logging.getLogger(__name__)

InferFn = Callable[[list[Any]], list[dict[str, np.ndarray]]]


@dataclass
class BoundEncoder:
    """A modality's encoder and the Triton model that serves it."""

    modality: str
    model_name: str
    spec: EncoderSpec
    encoder: ImageEncoder


def load_encoders(preset: Preset, settings: Settings) -> list[BoundEncoder]:
    """Load every modality's encoder of the preset (checkpoints must exist)."""
    bound = []
    for modality, mspec in preset.modalities.items():
        encoder = ImageEncoder.from_spec(mspec.encoder, max_pixels=settings.image_max_pixels)
        bound.append(BoundEncoder(modality, preset.triton_model(modality), mspec.encoder, encoder))
    return bound


def _items(media: np.ndarray) -> list[bytes]:
    """A request's `media` input, (n, 1) BYTES, as n byte strings."""
    return [bytes(x) for x in media.reshape(-1)]


def make_infer_fn(encoder: ImageEncoder, *, model_name: str) -> InferFn:
    """The inference callable of one model, over PyTriton's raw list of requests.

    All requests' items are encoded in one `encoder.encode` call (one forward pass), then split
    back per request. A request may carry several items along its batch dimension.
    """
    tokens, dim = encoder.tokens, encoder.dim

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        per_request = [_items(request[MEDIA_INPUT]) for request in requests]
        flat = [item for items in per_request for item in items]
        start = time.perf_counter()
        results = encoder.encode(flat)
        elapsed_ms = (time.perf_counter() - start) * 1000
        responses: list[dict[str, np.ndarray]] = []
        offset = 0
        for request, items in zip(requests, per_request, strict=True):
            n = len(items)
            features = np.zeros((n, tokens, dim), dtype=np.float32)  # (n, T, D)
            errors = np.empty((n, 1), dtype=object)  # (n, 1) BYTES
            with bound_request_id(_request_id(request)):
                for k, result in enumerate(results[offset : offset + n]):
                    if isinstance(result, ModalmeshError):
                        errors[k, 0] = result.message.encode()
                        logger.info("%s: item %d refused: %s", model_name, k, result.message)
                    else:
                        features[k] = result
                        errors[k, 0] = b""
                logger.info(
                    "%s: encoded %d item(s) in a batch of %d (%.1f ms)", model_name, n, len(flat), elapsed_ms
                )
            responses.append({FEATURES_OUTPUT: features, ERROR_OUTPUT: errors})
            offset += n
        return responses

    return infer


def _request_id(request: Any) -> str | None:
    params = getattr(request, "parameters", None) or {}
    value = params.get(REQUEST_ID_HEADER)
    return str(value) if value else None


def triton_config(settings: Settings) -> Any:
    """Triton's server settings: addresses and ports from `settings`, request-id forwarding.

    Triton's own gRPC server already accepts messages up to 2 GiB (INT32_MAX); TritonConfig has
    no message-size option to raise.
    """
    from pytriton.triton import TritonConfig

    forward = f"^{REQUEST_ID_HEADER}$"
    return TritonConfig(
        http_address=settings.host,
        http_port=settings.encoder_http_port,
        grpc_address=settings.host,
        grpc_port=settings.encoder_grpc_port,
        metrics_address=settings.host,
        metrics_port=settings.encoder_metrics_port,
        grpc_header_forward_pattern=forward,
        http_header_forward_pattern=forward,
        exit_timeout_secs=max(1, int(settings.drain_seconds)),
    )


def bind_encoder(triton: Any, bound: BoundEncoder) -> None:
    """Bind one encoder to a (not yet running) `pytriton.triton.Triton` as a batched model."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    triton.bind(
        model_name=bound.model_name,
        infer_func=make_infer_fn(bound.encoder, model_name=bound.model_name),
        inputs=[Tensor(name=MEDIA_INPUT, dtype=bytes, shape=(1,))],
        outputs=[
            Tensor(name=FEATURES_OUTPUT, dtype=np.float32, shape=(bound.spec.tokens, bound.spec.dim)),
            Tensor(name=ERROR_OUTPUT, dtype=bytes, shape=(1,)),
        ],
        config=ModelConfig(
            max_batch_size=bound.spec.max_batch_size,
            batcher=DynamicBatcher(max_queue_delay_microseconds=bound.spec.batch_delay_us),
        ),
        strict=True,
    )


class EncoderServer:
    """Triton serving the preset's encoders: load -> warm up -> start -> serve -> stop.

    Args:
        encoders: The loaded encoders, one per modality.
        settings: Addresses and ports (`host`, `encoder_{http,grpc,metrics}_port`).
    """

    def __init__(self, encoders: list[BoundEncoder], settings: Settings) -> None:
        self.encoders = encoders
        self.settings = settings
        self._triton: Any = None
        self._lock = threading.Lock()

    @property
    def models(self) -> Mapping[str, BoundEncoder]:
        """The served Triton model names and their encoders."""
        return {b.model_name: b for b in self.encoders}

    def start(self) -> None:
        """Warm every encoder up, then start Triton (it accepts requests only after this)."""
        from pytriton.triton import Triton

        for bound in self.encoders:
            bound.encoder.warmup()
        started = time.perf_counter()
        triton = Triton(config=triton_config(self.settings))
        for bound in self.encoders:
            bind_encoder(triton, bound)
        with self._lock:
            self._triton = triton
        triton.run()
        logger.info(
            "Triton serving %s on %s (http %d, grpc %d, metrics %d) after %.1fs",
            ", ".join(self.models),
            self.settings.host,
            self.settings.encoder_http_port,
            self.settings.encoder_grpc_port,
            self.settings.encoder_metrics_port,
            time.perf_counter() - started,
        )

    def is_alive(self) -> bool:
        """Whether Triton and every model's proxy are still running."""
        with self._lock:
            return self._triton is not None and bool(self._triton.is_alive())

    def stop(self) -> None:
        """Stop Triton (in-flight requests finish, child processes exit) and the encoders' threads."""
        with self._lock:
            triton, self._triton = self._triton, None
        if triton is not None:
            logger.info("stopping Triton")
            triton.stop()
        for bound in self.encoders:
            bound.encoder.close()
        logger.info("stopped")
