"""The client the gateway uses to call the decoder service (KServe v2 over gRPC, tritonclient).

`DecoderClient.decode` sends one item (conditioning + JSON parameters) to the Triton model of
its modality and returns the file as `DecodedMedia`. Concurrent calls are batched by Triton's
dynamic batcher. It reads the model's in-band `error` output and raises `InvalidArgumentError`
with the decoder's message, maps transport failures to `UnavailableError` /
`DeadlineExceededError`, and forwards the request id as the `x-request-id` header. The gRPC
channel reconnects on its own after the server restarts (backoff capped at about a second).

Several replicas: `target` may list several addresses or name a `dns:` name
(`services.common.replicas`); each decode goes to the next replica in turn, skipping one that
answered UNAVAILABLE a moment ago. A decode that fails as UNAVAILABLE (the replica refused the
connection or died mid-call, so no media came back) is retried once on another replica:
decoding is costly but deterministic for a given seed, and the failed replica's work is lost
either way, so the retry costs at most one more decode, and the reply (which carries the seed
used) is what the request asked for. A timeout or any other error is not retried: the replica
may still be working on it, and a second decode would double the cost of the slowest requests.

Imports neither torch nor PyTriton.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

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
from services.decoders.protocol import (
    EMBEDS_INPUT,
    ERROR_OUTPUT,
    MEDIA_OUTPUT,
    MIME_OUTPUT,
    OUTPUTS,
    PARAMS_INPUT,
    SEED_OUTPUT,
    DecodedMedia,
)

logger = logging.getLogger(__name__)

_TRITON_PREFIX = re.compile(r"^\[request id: [^\]]*\] ")
_TRITON_NOTE = " NOTE: Setting a non-zero max_batch_size"


def _triton_message(message: str) -> str:
    """Triton's message without its request-id prefix and its long note on batch dimensions."""
    return _TRITON_PREFIX.sub("", message).split(_TRITON_NOTE)[0]


class DecoderClient:
    """Async client of the decoder service's Triton models.

    Create it inside the event loop that will use it (grpc.aio binds the channel to that loop);
    one client serves any number of concurrent `decode` calls.

    Args:
        target: The service's gRPC replicas (`settings.decoder_target()`): host:port, a
            comma-separated list of them, or `dns:name:port`.
        timeout_s: Deadline of one `decode` call (`settings.decoder_timeout_s`).
        models: Triton model name per output modality (`preset.decoder_model(m)`); the default
            names "<modality>_decoder" when None.
        settings: Supplies the gRPC message limits (a clip is several MiB; gRPC's default
            limit is 4 MiB); `Settings()` when None.
        down_s: How long a replica that answered UNAVAILABLE is skipped.

    Raises:
        InvalidArgumentError: `target` has a bad address.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float,
        models: Mapping[str, str] | None = None,
        settings: Settings | None = None,
        down_s: float = 2.0,
    ) -> None:
        from tritonclient.grpc.aio import InferenceServerClient

        self.target = target
        self.timeout_s = timeout_s
        self.models = dict(models) if models is not None else None
        options = (settings or Settings()).client_channel_options()
        self.replicas: ReplicaPool[Any] = ReplicaPool(
            parse_replicas(target, setting="MODALMESH_DECODER_ADDRESS"),
            lambda address: InferenceServerClient(address, channel_args=options),
            tier="decoder",
            down_s=down_s,
        )

    def model(self, modality: str) -> str:
        """The Triton model of `modality`.

        Raises:
            InvalidArgumentError: The preset has no decoder for `modality`.
        """
        if self.models is None:
            return f"{modality}_decoder"
        if modality not in self.models:
            raise InvalidArgumentError(
                f"output modality: expected one of {sorted(self.models)}, got {modality!r}", param="modality"
            )
        return self.models[modality]

    def _error(self, e: Exception, address: str) -> ModalmeshError:
        """The modalmesh error for a tritonclient failure of the replica at `address`."""
        status = getattr(e, "status", lambda: None)() or ""
        code = status.removeprefix("StatusCode.")
        message = _triton_message((e.message() if hasattr(e, "message") else None) or str(e))
        if code == "UNAVAILABLE":
            return UnavailableError(f"decoder service at {address}: {message}")
        if triton_model_not_loaded(message):
            return UnavailableError(
                f"decoder service at {address}: its model is not loaded (starting?): {message}"
            )
        if code == "DEADLINE_EXCEEDED":
            return DeadlineExceededError(f"decoder service at {address} did not answer in time: {message}")
        return error_for_code(code or "INTERNAL", f"decoder service: {message}")

    async def decode(
        self,
        modality: str,
        conditioning: np.ndarray,
        params: Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
    ) -> DecodedMedia:
        """Generate one image, sound or clip from its conditioning.

        Args:
            modality: "image", "audio" or "video" (one of `models`).
            conditioning: The output projector's output, (rows, width), e.g. (77, 768); any
                floating dtype (sent as float32).
            params: Decoding parameters (steps, guidance_scale, height, width, seed,
                duration_s, num_frames, fps, format); None or {} takes the decoder's defaults.
            request_id: Sent as the `x-request-id` header so the service logs it.

        Raises:
            InvalidArgumentError: The decoder refused the item (its message, e.g. "steps:
                expected a number in [1, 100], got 500"), or the conditioning is not a 2-D
                float array of the model's shape.
            UnavailableError: The service cannot be reached.
            DeadlineExceededError: No answer within `timeout_s`.
        """
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        model = self.model(modality)
        array = np.asarray(conditioning)
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
            raise InvalidArgumentError(
                f"{modality} conditioning: expected a 2-D float array (rows, width), "
                f"got shape {array.shape} of {array.dtype}",
                param="conditioning",
            )
        embeds = grpcclient.InferInput(EMBEDS_INPUT, [1, *array.shape], "FP32")
        embeds.set_data_from_numpy(np.ascontiguousarray(array[None], dtype=np.float32))  # (1, rows, width)
        body = json.dumps(dict(params or {})).encode()
        params_in = grpcclient.InferInput(PARAMS_INPUT, [1, 1], "BYTES")
        params_in.set_data_from_numpy(np.array([[body]], dtype=np.object_))  # (1, 1)
        headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
        outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]

        async def on(replica: Replica[Any]) -> Any:
            try:
                return await replica.client.infer(
                    model,
                    [embeds, params_in],
                    outputs=outputs,
                    headers=headers,
                    client_timeout=self.timeout_s,
                )
            except InferenceServerException as e:
                raise self._error(e, replica.address) from e

        try:
            async with asyncio.timeout(self.timeout_s):
                result = await self.replicas.call(on, retry=True)
        except TimeoutError:
            raise DeadlineExceededError(
                f"decoder service at {self.target} did not answer within {self.timeout_s}s"
            ) from None
        values = {name: result.as_numpy(name) for name in OUTPUTS}
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise ModalmeshError(f"decoder service: model {model} did not return {missing}")
        error = bytes(values[ERROR_OUTPUT].reshape(-1)[0]).decode("utf-8", errors="replace")
        if error:
            raise InvalidArgumentError(error)
        return DecodedMedia(
            data=bytes(values[MEDIA_OUTPUT].reshape(-1)[0]),
            mime_type=bytes(values[MIME_OUTPUT].reshape(-1)[0]).decode(),
            seed=int(values[SEED_OUTPUT].reshape(-1)[0]),
        )

    async def ready(self, model: str, *, timeout_s: float = 5.0) -> bool:
        """Whether a replica answers and has Triton model `model` (e.g. "image_decoder") ready.

        False when no replica can be reached; replicas that are not ready are marked down.
        """
        from tritonclient.utils import InferenceServerException

        async def check(client: Any) -> bool:
            try:
                return bool(await client.is_model_ready(model, client_timeout=timeout_s))
            except InferenceServerException as e:
                logger.debug("decoder replica not ready: %s", e)
                return False

        return await self.replicas.ready(check)

    async def close(self) -> None:
        """Close every replica's channel."""
        await asyncio.gather(*(client.close() for client in self.replicas.clients()))

    async def __aenter__(self) -> DecoderClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
