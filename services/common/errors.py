"""The one exception family of modalmesh and its mapping to HTTP status and error types.

Every error a request can meet is one of these. Library code raises them without knowing
the transport; `services.common.grpc_errors` maps them to gRPC status codes and back, and the
gateway maps them to HTTP status and OpenAI-shaped error bodies. Nothing here imports grpc.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any


class Code(enum.Enum):
    """Canonical status codes; the names are gRPC's, so grpc.StatusCode[code.name] works."""

    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"


class ModalmeshError(Exception):
    """Base of every modalmesh error; on its own it means an internal failure (500).

    Args:
        message: What went wrong, phrased for the client: what was expected and what came.
        param: The request field at fault (OpenAI's `param`), e.g. "messages[0].content[1]".
    """

    code: Code = Code.INTERNAL
    http_status: int = 500
    error_type: str = "InternalServerError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.http_status,
            }
        }


class InvalidArgumentError(ModalmeshError):
    """The request is malformed or asks for something the model cannot take (400)."""

    code = Code.INVALID_ARGUMENT
    http_status = 400
    error_type = "BadRequestError"


class PayloadTooLargeError(InvalidArgumentError):
    """A body or media item is over its size limit (413; INVALID_ARGUMENT over gRPC)."""

    http_status = 413
    error_type = "PayloadTooLargeError"


class UnauthenticatedError(ModalmeshError):
    """The request carries no API key, or one that is not configured (401)."""

    code = Code.UNAUTHENTICATED
    http_status = 401
    error_type = "AuthenticationError"


class NotFoundError(ModalmeshError):
    """A named model, adapter or route does not exist (404)."""

    code = Code.NOT_FOUND
    http_status = 404
    error_type = "NotFoundError"


class FailedPreconditionError(ModalmeshError):
    """The system is not in a state to serve this (e.g. an adapter that does not fit) (409)."""

    code = Code.FAILED_PRECONDITION
    http_status = 409
    error_type = "ConflictError"


class ResourceExhaustedError(ModalmeshError):
    """A queue or rate limit is full; retry later (429)."""

    code = Code.RESOURCE_EXHAUSTED
    http_status = 429
    error_type = "RateLimitError"


class UnavailableError(ModalmeshError):
    """A service this request needs cannot be reached (503)."""

    code = Code.UNAVAILABLE
    http_status = 503
    error_type = "ServiceUnavailableError"


class DeadlineExceededError(ModalmeshError):
    """A stage ran past its deadline (504)."""

    code = Code.DEADLINE_EXCEEDED
    http_status = 504
    error_type = "GatewayTimeoutError"


class CancelledError(ModalmeshError):
    """The client went away or cancelled (499, nginx's convention)."""

    code = Code.CANCELLED
    http_status = 499
    error_type = "CancelledError"


class UnimplementedError(ModalmeshError):
    """The feature exists in the API but not in this deployment (501)."""

    code = Code.UNIMPLEMENTED
    http_status = 501
    error_type = "NotImplementedError"


_BY_CODE: dict[Code, type[ModalmeshError]] = {
    Code.CANCELLED: CancelledError,
    Code.INVALID_ARGUMENT: InvalidArgumentError,
    Code.DEADLINE_EXCEEDED: DeadlineExceededError,
    Code.NOT_FOUND: NotFoundError,
    Code.FAILED_PRECONDITION: FailedPreconditionError,
    Code.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    Code.UNIMPLEMENTED: UnimplementedError,
    Code.INTERNAL: ModalmeshError,
    Code.UNAVAILABLE: UnavailableError,
    Code.UNAUTHENTICATED: UnauthenticatedError,
}


def error_for_code(code_name: str, message: str) -> ModalmeshError:
    """Rebuild the error a remote service reported, from its status code name.

    Unknown codes (UNKNOWN, DATA_LOSS, ...) become internal errors.
    """
    try:
        cls = _BY_CODE[Code[code_name]]
    except KeyError:
        cls = ModalmeshError
    return cls(message)


def validation_problems(errors: Iterable[Mapping[str, Any]]) -> str:
    """Pydantic's `ValidationError.errors()` as one line: "field.path: message; ..."."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in errors)
