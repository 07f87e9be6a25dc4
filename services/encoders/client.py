"""The client the gateway uses to call the encoder service (KServe v2 over gRPC, tritonclient).

`EncoderClient.encode` sends each item as its own request, concurrently, so that Triton's
dynamic batcher groups them (with other clients' items) into batches, and returns per item its
`MediaFeatures` (features and frame times). It reads the model's in-band `error` output (see `services.encoders.protocol`) and raises `EncoderItemError` naming
the item, maps transport failures to `UnavailableError` / `DeadlineExceededError`, and
forwards the request id as the `x-request-id` header. The underlying gRPC channel reconnects
on its own after the server restarts; the reconnect backoff is capped so that it does so
within about a second.

Several replicas: `target` may list several addresses or name a `dns:` name
(`services.common.replicas`). Each item is sent to the next replica in turn (so one call's
items spread over the replicas), a replica that answers UNAVAILABLE is skipped for a while,
and since encoding is idempotent an item that failed as UNAVAILABLE is sent once more to
another replica: with one replica killed, requests another replica can serve do not fail.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np

from services.common.content import MediaFeatures
from services.common.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ModalmeshError,
    UnavailableError,
    error_for_code,
)
from services.common.log import REQUEST_ID_HEADER
from services.common.replicas import Replica, ReplicaPool, parse_replicas, triton_model_not_loaded
from services.common.settings import Settings
from services.encoders.protocol import ERROR_OUTPUT, FEATURES_OUTPUT, MEDIA_INPUT, TIMES_OUTPUT

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def _all(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run the calls concurrently; on the first failure cancel the rest and raise that error."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except BaseExceptionGroup as eg:
        first = eg.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [task.result() for task in tasks]


def _item(modality: str, features: np.ndarray, times: np.ndarray) -> MediaFeatures[np.ndarray]:
    """One item's outputs without padding: its frames are the leading non-NaN times."""
    valid = ~np.isnan(times)
    frames = int(np.argmin(valid)) if not valid.all() else len(times)
    rows = features.shape[0] // max(len(times), 1) * frames
    return MediaFeatures(
        modality,
        np.ascontiguousarray(features[:rows], dtype=np.float32),  # (frames * tokens, D)
        tuple(times[:frames].astype(np.float32).tolist()),  # (frames,)
    )


class EncoderItemError(InvalidArgumentError):
    """One item of an `encode` call was refused by the encoder (not an image, truncated, ...).

    Attributes:
        index: The item's position in the `items` list.
    """

    def __init__(self, message: str, *, index: int) -> None:
        super().__init__(message)
        self.index = index


class EncoderClient:
    """Async client of the encoder service's Triton models.

    Create it inside the event loop that will use it (grpc.aio binds the channel to that loop);
    one client serves any number of concurrent `encode` calls.

    Args:
        target: The service's gRPC replicas (`settings.encoder_target()`): host:port, a
            comma-separated list of them, or `dns:name:port`.
        settings: Supplies the gRPC message limits.
        down_s: How long a replica that answered UNAVAILABLE is skipped.

    Raises:
        InvalidArgumentError: `target` has a bad address.
    """

    def __init__(self, target: str, *, settings: Settings, down_s: float = 2.0) -> None:
        from tritonclient.grpc.aio import InferenceServerClient

        self.target = target
        options = settings.client_channel_options()
        self.replicas: ReplicaPool[Any] = ReplicaPool(
            parse_replicas(target, setting="MODALMESH_ENCODER_ADDRESS"),
            lambda address: InferenceServerClient(address, channel_args=options),
            tier="encoder",
            down_s=down_s,
        )

    def _error(self, e: Exception, address: str) -> ModalmeshError:
        """The modalmesh error for a tritonclient failure of the replica at `address`."""
        status = getattr(e, "status", lambda: None)() or ""
        code = status.removeprefix("StatusCode.")
        message = (e.message() if hasattr(e, "message") else None) or str(e)
        if code == "UNAVAILABLE":
            return UnavailableError(f"the encoder service is unavailable at {address}: {message}")
        if triton_model_not_loaded(message):
            return UnavailableError(
                f"the encoder service is unavailable at {address}: its model is not loaded (starting?): {message}"
            )
        if code == "DEADLINE_EXCEEDED":
            return DeadlineExceededError(
                f"the encoder service at {address} did not answer in time: {message}"
            )
        return error_for_code(code or "INTERNAL", f"encoder service: {message}")

    async def _infer_one(
        self, model: str, modality: str, data: bytes, headers: dict[str, str], timeout_s: float | None
    ) -> tuple[MediaFeatures[np.ndarray], str]:
        """One item on the next replica; once more on another if that one is unavailable."""

        async def on(replica: Replica[Any]) -> tuple[MediaFeatures[np.ndarray], str]:
            return await self._infer_on(replica, model, modality, data, headers, timeout_s)

        return await self.replicas.call(on, retry=True)

    async def _infer_on(
        self,
        replica: Replica[Any],
        model: str,
        modality: str,
        data: bytes,
        headers: dict[str, str],
        timeout_s: float | None,
    ) -> tuple[MediaFeatures[np.ndarray], str]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        media = grpcclient.InferInput(MEDIA_INPUT, [1, 1], "BYTES")
        media.set_data_from_numpy(np.array([[data]], dtype=np.object_))  # (1, 1)
        outputs = [
            grpcclient.InferRequestedOutput(name) for name in (FEATURES_OUTPUT, TIMES_OUTPUT, ERROR_OUTPUT)
        ]
        try:
            result = await replica.client.infer(
                model, [media], outputs=outputs, headers=headers, client_timeout=timeout_s
            )
        except InferenceServerException as e:
            raise self._error(e, replica.address) from e
        features = result.as_numpy(FEATURES_OUTPUT)  # (1, rows, D)
        times = result.as_numpy(TIMES_OUTPUT)  # (1, frames)
        error = result.as_numpy(ERROR_OUTPUT)  # (1, 1)
        if features is None or times is None or error is None:
            raise ModalmeshError(
                f"encoder service: model {model} did not return all of {FEATURES_OUTPUT!r}, "
                f"{TIMES_OUTPUT!r} and {ERROR_OUTPUT!r}"
            )
        message = bytes(error.reshape(-1)[0]).decode("utf-8", errors="replace")
        return _item(modality, features[0], times[0]), message

    async def encode(
        self,
        model: str,
        items: list[bytes],
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
        modality: str = "image",
    ) -> list[MediaFeatures[np.ndarray]]:
        """Encode media items with one of the service's models.

        Args:
            model: The Triton model name (`preset.triton_model(modality)`).
            items: The files' bytes (an image, video, audio or event file each).
            request_id: Sent as the `x-request-id` header so the service logs it.
            timeout_s: Deadline for the whole call; None waits indefinitely.
            modality: The items' modality (their `MediaFeatures.modality`); it names them in
                error messages ("video 1: not a video: ...").

        Returns:
            Per item, in order, its float32 (frames * tokens_per_frame, dim) features and
            float32 (frames,) frame times.

        Raises:
            EncoderItemError: An item was refused (an InvalidArgumentError naming its index).
            UnavailableError: The service cannot be reached.
            DeadlineExceededError: No answer within `timeout_s`.
        """
        if not items:
            return []
        headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
        try:
            async with asyncio.timeout(timeout_s):
                results = await _all(
                    [self._infer_one(model, modality, data, headers, timeout_s) for data in items]
                )
        except TimeoutError:
            raise DeadlineExceededError(
                f"the encoder service at {self.target} did not answer within {timeout_s}s"
            ) from None
        for index, (_, message) in enumerate(results):
            if message:
                raise EncoderItemError(f"{modality} {index}: {message}", index=index)
        return [item for item, _ in results]

    async def ready(self, model: str, *, timeout_s: float = 5.0) -> bool:
        """Whether a replica answers and has `model` ready; False when none can be reached.

        Replicas that do not are marked down (skipped by `encode` for a while)."""
        from tritonclient.utils import InferenceServerException

        async def check(client: Any) -> bool:
            try:
                return bool(await client.is_model_ready(model, client_timeout=timeout_s))
            except InferenceServerException as e:
                logger.debug("encoder replica not ready: %s", e)
                return False

        return await self.replicas.ready(check)

    async def close(self) -> None:
        """Close every replica's channel."""
        await asyncio.gather(*(client.close() for client in self.replicas.clients()))

    async def __aenter__(self) -> EncoderClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
