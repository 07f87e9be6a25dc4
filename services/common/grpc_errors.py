"""Mapping between the modalmesh exception family and gRPC status codes, both ways."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from services.common.errors import ModalmeshError, UnavailableError, error_for_code

logger = logging.getLogger(__name__)

T = TypeVar("T")


def grpc_status(error: ModalmeshError) -> grpc.StatusCode:
    """The gRPC status code for a modalmesh error."""
    return grpc.StatusCode[error.code.name]


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> None:
    """End an RPC with the status that matches `error`; unknown exceptions become INTERNAL.

    Unknown exceptions are logged with their traceback; their text does not reach the client.
    """
    if isinstance(error, ModalmeshError):
        await context.abort(grpc_status(error), error.message)
    logger.exception("internal error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")


def error_from_rpc(error: grpc.RpcError, *, service: str) -> ModalmeshError:
    """The modalmesh error for a failed call to another service.

    UNAVAILABLE (connection refused, server gone) names the service so that the client sees
    which hop is down.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return UnavailableError(f"the {service} service is unavailable: {details}")
    return error_for_code(code.name, details)


async def call_mapped(service: str, call: Callable[[], Awaitable[T]]) -> T:
    """Await a unary gRPC call, turning its failure into a modalmesh error."""
    try:
        return await call()
    except grpc.RpcError as e:
        raise error_from_rpc(e, service=service) from e


async def stream_mapped(service: str, stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Iterate a server-streaming gRPC call, turning its failure into a modalmesh error."""
    try:
        async for item in stream:
            yield item
    except grpc.RpcError as e:
        raise error_from_rpc(e, service=service) from e
