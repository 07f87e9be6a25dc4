"""The gateway's ASGI middleware: request id, request metrics, API keys, limits, body size.

Pure ASGI (no BaseHTTPMiddleware) so that streamed responses pass through untouched and the
client's disconnect still reaches the endpoint. The API key and the caller's limits
(`gateway.auth.Guard`) are checked before the body is read, so a caller without a key cannot
make the gateway buffer a large body.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import Guard, Permit, error_headers
from gateway.metrics import GatewayMetrics
from services.common.errors import ModalmeshError, PayloadTooLargeError
from services.common.log import REQUEST_ID_HEADER, bound_request_id

logger = logging.getLogger(__name__)

ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/v1/training/jobs")
TRAINING_JOB = "/v1/training/jobs/{id}"  # one label for every job id
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_BODY_METHODS = ("POST", "PUT", "PATCH")
_UNCOUNTED = ("/v1/models",)  # needs a key but takes no rate token nor slot: a cheap listing


def guarded(path: str) -> bool:
    """Whether a path needs the API key: the /v1 API (not /health, /metrics, /docs)."""
    return path == "/v1" or path.startswith("/v1/")


def new_request_id() -> str:
    """A fresh request id (32 hex digits)."""
    return uuid.uuid4().hex


def valid_request_id(value: str | None) -> str | None:
    """`value` if it is a usable request id (1-128 URL-safe characters), else None."""
    return value if value and _VALID_REQUEST_ID.match(value) else None


class GatewayMiddleware:
    """Assigns the request id, counts requests by route and status, enforces max_body_bytes.

    The request id is the client's `X-Request-Id` when it is usable, else a fresh one; the
    endpoint may replace it (scope["state"]["request_id"]) before the response starts. It is
    bound to every log line of the request and returned in the `X-Request-Id` header.

    Requests to /v1/* (except CORS preflights, OPTIONS) pass `guard` first: a missing or
    wrong key is 401, a caller over its limits 429, both before the body is read. Every /v1/*
    route but /v1/models counts against the limits; the slot is held until the app returns,
    that is until a streamed reply's last byte is sent or the client has gone.

    Args:
        app: The wrapped application.
        max_body_bytes: Largest request body; larger ones get 413 before the app runs.
        metrics: Where request counts go.
        guard: API keys and per-caller limits; None = neither.
    """

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, metrics: GatewayMetrics, guard: Guard | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        from_client = valid_request_id(headers.get(REQUEST_ID_HEADER))
        request_id = from_client or new_request_id()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["request_id_from_header"] = from_client is not None
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = state["request_id"]
            await send(message)

        path = scope["path"]
        route = path if path in ROUTES else TRAINING_JOB if path.startswith("/v1/training/jobs/") else "other"
        with bound_request_id(request_id):
            permit: Permit | None = None
            try:
                if self.guard is not None and guarded(path) and scope["method"] != "OPTIONS":
                    try:
                        permit = self._admit(scope, headers)
                    except ModalmeshError as e:
                        await _send_error(send_with_id, e)
                        return
                if scope["method"] in _BODY_METHODS:
                    replay = await self._read_body(headers, receive, send_with_id)
                    if replay is None:
                        return
                    receive = replay
                await self.app(scope, receive, send_with_id)
            finally:
                if permit is not None:
                    permit.release()
                self.metrics.requests.labels(route=route, status=str(status)).inc()

    def _admit(self, scope: Scope, headers: Headers) -> Permit:
        assert self.guard is not None
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        counted = scope["path"] not in _UNCOUNTED
        return self.guard.admit(headers.get("authorization"), headers.get("x-api-key"), peer, counted=counted)

    async def _read_body(self, headers: Headers, receive: Receive, send: Send) -> Receive | None:
        """Buffer the body within the limit and return a receive that replays it.

        Returns None after answering 413.
        """
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_error(
                send,
                PayloadTooLargeError(
                    f"request body is {declared} bytes, over the limit of {self.max_body_bytes} bytes"
                ),
            )
            return None
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                await _send_error(
                    send,
                    PayloadTooLargeError(
                        f"request body is over the limit of {self.max_body_bytes} bytes (read at least {size})"
                    ),
                )
                return None
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return replay


async def _send_error(send: Send, error: ModalmeshError) -> None:
    """Answer with `error` before the app ran; the connection closes (the body may be unread)."""
    logger.info("request refused (%d): %s", error.http_status, error.message)
    body = json.dumps(error.to_openai()).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in error_headers(error).items()]
    await send(
        {
            "type": "http.response.start",
            "status": error.http_status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
