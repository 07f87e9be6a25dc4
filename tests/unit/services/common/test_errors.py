import grpc
import pytest

from services.common import errors
from services.common.grpc_errors import error_from_rpc, grpc_status


@pytest.mark.parametrize(
    ("cls", "http", "grpc_code"),
    [
        (errors.InvalidArgumentError, 400, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.PayloadTooLargeError, 413, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFoundError, 404, grpc.StatusCode.NOT_FOUND),
        (errors.FailedPreconditionError, 409, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ResourceExhaustedError, 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.UnauthenticatedError, 401, grpc.StatusCode.UNAUTHENTICATED),
        (errors.UnavailableError, 503, grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceededError, 504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.CancelledError, 499, grpc.StatusCode.CANCELLED),
        (errors.UnimplementedError, 501, grpc.StatusCode.UNIMPLEMENTED),
        (errors.ModalmeshError, 500, grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_maps_to_one_http_and_one_grpc_status(cls, http, grpc_code):
    err = cls("expected x, got y", param="messages[0]")
    assert err.http_status == http
    assert grpc_status(err) == grpc_code
    body = err.to_openai()
    assert body == {
        "error": {
            "message": "expected x, got y",
            "type": err.error_type,
            "param": "messages[0]",
            "code": http,
        }
    }


@pytest.mark.parametrize("code", list(errors.Code))
def test_error_for_code_round_trips_every_code(code):
    err = errors.error_for_code(code.name, "msg")
    assert err.code == code
    assert err.message == "msg"


def test_unknown_remote_code_is_internal():
    assert type(errors.error_for_code("DATA_LOSS", "x")) is errors.ModalmeshError
    assert type(errors.error_for_code("no such code", "x")) is errors.ModalmeshError


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_error_from_rpc_names_the_unavailable_service():
    err = error_from_rpc(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"), service="llm")
    assert isinstance(err, errors.UnavailableError)
    assert err.message == "the llm service is unavailable: connection refused"


def test_error_from_rpc_keeps_remote_invalid_argument():
    err = error_from_rpc(_FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad shape"), service="llm")
    assert isinstance(err, errors.InvalidArgumentError)
    assert err.http_status == 400
    assert err.message == "bad shape"
