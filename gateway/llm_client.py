"""The gateway's client of the LLM service (gRPC modalmesh.v1.LLM).

One grpc.aio channel per client, made on first use inside the serving event loop, with the
raised message limits of `Settings.grpc_options()`. Every call carries the request id in the
`x-request-id` metadata and a deadline; failures become modalmesh errors through
`services.common.grpc_errors` (UNAVAILABLE -> "the llm service is unavailable: ...").

The deadline of a Generate call is the gateway's `llm_timeout_s`, shortened to what is left of
the caller's own deadline when one is set with `client_deadline` (the gRPC Chat front end's
`context.time_remaining()`): the LLM service then stops generating a reply nobody waits for,
and the call ends with DEADLINE_EXCEEDED (DeadlineExceededError, 504).

`generate_request` is the wire form of an encoded conversation, the mirror of the LLM
servicer's `request_from_proto`: each turn's parts in order, a media part carrying its item's
features (`TurnPart.media`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextvars import ContextVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modalmesh.v1 import llm_pb2, llm_pb2_grpc
from services.common.content import MediaFeatures, MediaPart, TextPart, Turn
from services.common.grpc_errors import error_from_rpc
from services.common.log import REQUEST_ID_HEADER
from services.common.settings import Settings
from services.common.tensor_codec import tensor_fields

logger = logging.getLogger(__name__)

SERVICE = "llm"
LLM_SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LLM"].full_name
_MIN_TIMEOUT_S = 0.001  # an expired deadline still makes the call, which then fails at once

# time.monotonic() by which the current request's caller stops waiting; None: no such deadline.
_caller_deadline: ContextVar[float | None] = ContextVar("modalmesh_llm_caller_deadline", default=None)


@contextlib.contextmanager
def client_deadline(seconds: float | None) -> Iterator[None]:
    """Within this block, Generate calls end at the latest `seconds` from now.

    Args:
        seconds: What is left of the caller's deadline (gRPC: `context.time_remaining()`, which
            is None when the client set none); None keeps the gateway's own timeout only.
    """
    token = _caller_deadline.set(None if seconds is None else time.monotonic() + max(seconds, 0.0))
    try:
        yield
    finally:
        _caller_deadline.reset(token)


def call_timeout(default_s: float, timeout_s: float | None = None) -> float:
    """The deadline in seconds of one call: the least of `default_s`, `timeout_s` and what is
    left of the caller's deadline (`client_deadline`)."""
    timeout = default_s if timeout_s is None else min(default_s, timeout_s)
    deadline = _caller_deadline.get()
    if deadline is not None:
        timeout = min(timeout, deadline - time.monotonic())
    return max(timeout, _MIN_TIMEOUT_S)


def generate_request(
    turns: Sequence[Turn[MediaFeatures[np.ndarray]]],
    *,
    request_id: str,
    adapter: str,
    sampling: llm_pb2.SamplingParams,
    output_modalities: Sequence[str] = (),
) -> llm_pb2.GenerateRequest:
    """The GenerateRequest of an encoded conversation.

    Args:
        turns: The conversation, each media part carrying its features (float32 (rows, dim))
            and frame times.
        request_id: Carried into the LLM service's logs.
        adapter: "" (current) or "name@version".
        sampling: The request's sampling parameters (unset fields take the preset's).
        output_modalities: Output modalities asked for besides text.
    """
    request = llm_pb2.GenerateRequest(
        request_id=request_id, adapter=adapter, sampling=sampling, output_modalities=output_modalities
    )
    for turn in turns:
        out = request.turns.add(role=turn.role)
        for part in turn.parts:
            if isinstance(part, TextPart):
                out.parts.add(text=part.text)
            elif isinstance(part, MediaPart):
                item = part.media
                # built in place from mappings: a message built first and then nested would be
                # copied again (MBs per item)
                media = {"modality": item.modality, "features": tensor_fields(item.features)}
                out.parts.add(media={**media, "frame_times": item.times})
            else:
                out.parts.add(time_seconds=part.seconds)
    return request


class LLMClient:
    """Calls Generate and GetModelInfo on one LLM service address.

    Args:
        target: host:port of the LLM service.
        settings: Supplies the channel options and the Generate deadline.
    """

    def __init__(self, target: str, *, settings: Settings) -> None:
        self.target = target
        self.settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._stub: llm_pb2_grpc.LLMStub | None = None

    def _connect(self) -> grpc.aio.Channel:
        # Made on first use, inside the event loop that serves requests.
        if self._channel is None:
            # round_robin: a target naming several replicas ("dns:///llm:50052" resolving to
            # each, or "ipv4:10.0.0.1:50052,10.0.0.2:50052") gets its calls spread over all of them
            options = [*self.settings.client_channel_options(), ("grpc.lb_policy_name", "round_robin")]
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
            self._stub = llm_pb2_grpc.LLMStub(self._channel)
        return self._channel

    def _llm(self) -> llm_pb2_grpc.LLMStub:
        self._connect()
        assert self._stub is not None
        return self._stub

    async def generate(
        self, request: llm_pb2.GenerateRequest, *, timeout_s: float | None = None
    ) -> AsyncGenerator[llm_pb2.GenerateChunk, None]:
        """Stream the chunks of one generation; closing the iterator cancels the call.

        Args:
            request: The generation.
            timeout_s: The caller's remaining deadline, if it has one; the call's deadline is
                the least of it, `settings.llm_timeout_s` and a `client_deadline` in force.

        Raises:
            ModalmeshError: The call failed (UNAVAILABLE -> UnavailableError naming the llm
                service, DEADLINE_EXCEEDED -> DeadlineExceededError, ...).
        """
        call = self._llm().Generate(
            request,
            timeout=call_timeout(self.settings.llm_timeout_s, timeout_s),
            metadata=((REQUEST_ID_HEADER, request.request_id),),
        )
        try:
            async for chunk in call:
                yield chunk
        except grpc.RpcError as e:
            raise error_from_rpc(e, service=SERVICE) from e
        finally:
            # No-op when the call is complete; cancels it when the consumer went away.
            call.cancel()

    async def model_info(self, *, timeout_s: float = 2.0) -> llm_pb2.ModelInfo:
        """What the LLM service serves (preset, current and loaded adapters).

        Raises:
            ModalmeshError: The call failed.
        """
        try:
            return await self._llm().GetModelInfo(llm_pb2.ModelInfoRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            raise error_from_rpc(e, service=SERVICE) from e

    async def ready(self, *, timeout_s: float = 2.0) -> bool:
        """Whether the LLM service's standard health check reports SERVING."""
        stub = health_pb2_grpc.HealthStub(self._connect())
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=LLM_SERVICE_NAME), timeout=timeout_s
            )
        except grpc.RpcError as e:
            logger.debug("llm health check failed: %s", e)
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stub = None
