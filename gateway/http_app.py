"""The OpenAI-compatible REST API: POST /v1/chat/completions, GET /v1/models, /health, /metrics.

Routes only translate between HTTP/JSON and `gateway.serving.ChatService`. Every error is an
OpenAI error body {"error": {"message", "type", "param", "code"}} with the matching status:
malformed JSON and schema violations -> 400 (FastAPI's 422 handler is replaced too), a body over
max_body_bytes -> 413, modalmesh errors -> their http_status, anything else -> 500 without
internals. A streamed reply starts only once the first token is there, so failures before it
still get a proper status; an error after that is sent as `data: {"error": ...}` then
`data: [DONE]`. A client that disconnects cancels the work, streaming or not.

Security (settings, all off by default): API keys and per-caller limits on /v1/* are checked by
`GatewayMiddleware` through a `gateway.auth.Guard` (401 / 429 before the body is read);
/health, /metrics and the web UI's static files (/ui/, docs/ui.md) stay open. `cors_origins`
turns Starlette's CORSMiddleware on, outermost, so that preflights need no key and error replies
carry the CORS headers too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles

from gateway._middleware import GatewayMiddleware, valid_request_id
from gateway.auth import Guard, error_headers
from gateway.domain import ChatRequest, Event, Finished, MediaOutput
from gateway.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelCard,
    ModelList,
    UsageInfo,
    content_chunk,
    media_chunk,
    media_entry,
    parse_chat_request,
    role_chunk,
    timestamp_list,
    usage_chunk,
    validation_error,
)
from gateway.serving import ChatService, PreparedChat
from gateway.training import add_training_routes
from services.common.content import Timestamp
from services.common.errors import (
    CancelledError,
    InvalidArgumentError,
    ModalmeshError,
    UnavailableError,
)
from services.common.log import request_id_var

if TYPE_CHECKING:
    from services.trainer.client import TrainingClient

logger = logging.getLogger(__name__)

T = TypeVar("T")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(error: BaseException) -> JSONResponse:
    """The OpenAI error response for any exception; unknown ones are logged and become 500."""
    if not isinstance(error, ModalmeshError):
        logger.error("internal error", exc_info=error)
        error = ModalmeshError(f"internal error ({type(error).__name__}); see the gateway log")
    elif error.http_status >= 500:
        logger.warning("request failed: %s", error.message)
    else:
        logger.info("request rejected (%d): %s", error.http_status, error.message)
    # 429 says when to come back (RFC 9110 Retry-After, in seconds); 401 says how to log in.
    return JSONResponse(error.to_openai(), status_code=error.http_status, headers=error_headers(error))


def _sse(payload: dict[str, Any] | str) -> str:
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n"


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then CancelledError 499)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise CancelledError("the client disconnected")
    return task.result()


async def _read_request(request: Request) -> ChatCompletionRequest:
    body = await request.body()
    if not body.strip():
        raise InvalidArgumentError("the request body is empty; expected a JSON object")
    try:
        payload = json.loads(body)
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"the request body is not UTF-8 JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise validation_error(
            [{"type": "json_invalid", "loc": ("body", e.pos), "ctx": {"error": e.msg}}]
        ) from None
    return parse_chat_request(payload)


async def _collect(prepared: PreparedChat, events: AsyncGenerator[Event, None]) -> dict[str, Any]:
    pieces: list[str] = []
    timestamps: list[Timestamp] = []
    media: list[dict[str, Any]] = []
    async for event in events:
        if isinstance(event, MediaOutput):
            media.append(media_entry(event))
            continue
        pieces.append(event.text)
        timestamps.extend(event.timestamps)
        if isinstance(event, Finished):
            message = AssistantMessage(content="".join(pieces))
            if prepared.timestamps or timestamps:
                message.timestamps = timestamp_list(timestamps)
            if media:
                message.media = media
            choice = ChatCompletionChoice(
                index=0,
                message=message,
                finish_reason=event.finish_reason,
                stop_reason=event.stop_reason,
            )
            return ChatCompletionResponse(
                id=prepared.id,
                created=prepared.created,
                model=prepared.model,
                choices=[choice],
                usage=UsageInfo.of(event.prompt_tokens, event.completion_tokens),
                system_fingerprint=event.adapter,
            ).to_json()
    raise ModalmeshError("the reply ended without a finish reason")


async def _stream(
    prepared: PreparedChat, first: Event, events: AsyncGenerator[Event, None], include_usage: bool
) -> AsyncGenerator[str, None]:
    """The SSE body; `events` is closed (cancelling the generation) however this ends."""
    cid, created, model = prepared.id, prepared.created, prepared.model
    async with contextlib.aclosing(events):
        yield _sse(role_chunk(cid, created, model))
        try:
            event = first
            while not isinstance(event, Finished):
                if isinstance(event, MediaOutput):
                    yield _sse(media_chunk(cid, created, model, event))
                else:
                    yield _sse(content_chunk(cid, created, model, event.text, timestamps=event.timestamps))
                event = await anext(events)
            yield _sse(
                content_chunk(
                    cid,
                    created,
                    model,
                    event.text,
                    event.finish_reason,
                    event.stop_reason,
                    event.adapter,
                    timestamps=event.timestamps,
                )
            )
            if include_usage:
                usage = UsageInfo.of(event.prompt_tokens, event.completion_tokens)
                yield _sse(usage_chunk(cid, created, model, usage))
        except StopAsyncIteration:
            yield _sse(ModalmeshError("the reply ended without a finish reason").to_openai())
        except ModalmeshError as e:
            logger.warning("stream failed after it started: %s", e.message)
            yield _sse(e.to_openai())
        except Exception as e:
            logger.error("stream failed after it started", exc_info=e)
            yield _sse(ModalmeshError(f"internal error ({type(e).__name__})").to_openai())
        yield _sse("[DONE]")


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions."""
    service: ChatService = request.app.state.service
    try:
        body = await _read_request(request)
        state = request.state
        if body.request_id and not state.request_id_from_header:
            state.request_id = valid_request_id(body.request_id) or state.request_id
            # Same task and context as GatewayMiddleware, which resets the binding at the end.
            request_id_var.set(state.request_id)
        chat = body.to_domain(state.request_id)
        if not body.stream:
            prepared = await _unless_disconnected(request, service.prepare(chat))
            events = service.generate(prepared)
            async with contextlib.aclosing(events):
                reply = await _unless_disconnected(request, _collect(prepared, events))
            return JSONResponse(reply)
        prepared, first, events = await _unless_disconnected(request, _start(service, chat))
        body_iter = _stream(prepared, first, events, body.include_usage)
        return StreamingResponse(body_iter, media_type="text/event-stream", headers=_SSE_HEADERS)
    except Exception as e:
        return error_response(e)


async def _start(
    service: ChatService, chat: ChatRequest
) -> tuple[PreparedChat, Event, AsyncGenerator[Event, None]]:
    """Prepare and wait for the first event, so that early failures keep their status."""
    prepared = await service.prepare(chat)
    events = service.generate(prepared)
    try:
        first = await anext(events)
    except StopAsyncIteration:
        await events.aclose()
        raise ModalmeshError("the reply ended before it started") from None
    except BaseException:
        await events.aclose()
        raise
    return prepared, first, events


async def list_models(request: Request) -> JSONResponse:
    """GET /v1/models: the preset and its loaded adapter versions."""
    service: ChatService = request.app.state.service
    entries = await service.list_models()
    return JSONResponse(ModelList(data=[ModelCard.of(e) for e in entries]).to_json())


async def _supervisor(url: str | None) -> dict[str, str]:
    """Services that `modalmesh up` (at `url`) is restarting or has given up on: name -> what.

    Empty when the gateway does not run under `modalmesh up` or its /status does not answer.
    """
    if not url:
        return {}
    import httpx

    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            status = (await client.get(f"{url}/status")).json()
    except (httpx.HTTPError, ValueError) as e:
        logger.debug("modalmesh up's /status at %s: %s", url, e)
        return {}
    out = {}
    for name, s in dict(status.get("services") or {}).items():
        if s.get("state") == "given-up":
            out[name] = f"given up: {s.get('reason', '')}".strip()
        elif s.get("state") in ("backoff", "starting"):
            out[name] = f"restarting (restart {s.get('restarts')}; last exit code {s.get('last_exit_code')})"
    return out


async def health(request: Request) -> JSONResponse:
    """GET /health: 200 when the LLM service and the encoders are ready, else 503 naming them.

    The decoders (presets with outputs) do not gate it: without them text replies still work
    and each media item is an error entry, so a decoder that is down gives 200 with status
    "degraded" and names it. Under `modalmesh up` (`supervisor_url` set) the body also names,
    under "supervisor", each service it is restarting or has given up on; one that is given up
    on makes a 200 "degraded".
    """
    service: ChatService = request.app.state.service
    checks, supervised = await asyncio.gather(
        service.readiness(), _supervisor(service.settings.supervisor_url)
    )
    extra: dict[str, Any] = {"supervisor": supervised} if supervised else {}
    down = {name: why for name, why in checks.items() if why and name != "decoder"}
    if not down:
        decoder = checks.get("decoder")
        warnings = [decoder] if decoder else []
        warnings += [f"{name}: {what}" for name, what in supervised.items() if what.startswith("given up")]
        if warnings:
            body: dict[str, Any] = {"status": "degraded", "warning": "; ".join(warnings), **extra}
            if checks.get("decoder"):
                body["checks"] = {"decoder": "down"}
            return JSONResponse(body)
        return JSONResponse({"status": "ok", **extra})
    error = UnavailableError("not ready: " + "; ".join(down.values()))
    body = {
        "status": "unavailable",
        "checks": {name: "down" if why else "ok" for name, why in checks.items()},
        **extra,
        **error.to_openai(),
    }
    return JSONResponse(body, status_code=503)


async def metrics(request: Request) -> Response:
    """GET /metrics: Prometheus text exposition."""
    service: ChatService = request.app.state.service
    data, content_type = service.metrics.render()
    return Response(data, media_type=content_type)


def _install_error_handlers(app: FastAPI) -> None:
    async def on_modalmesh(_: Request, exc: Exception) -> Response:
        return error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(list(exc.errors())))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        error = ModalmeshError(f"{request.method} {request.url.path}: {exc.detail}")
        error.http_status = exc.status_code
        error.error_type = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
        return JSONResponse(
            error.to_openai(), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    app.add_exception_handler(ModalmeshError, on_modalmesh)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_modalmesh)


UI_DIR = Path(__file__).parent / "ui"


def _add_ui_routes(app: FastAPI) -> None:
    """The web UI (docs/ui.md): static files at /ui/, open without a key (its API calls carry it)."""

    async def to_ui(_: Request) -> Response:
        return RedirectResponse("/ui/")

    app.add_api_route("/", to_ui, methods=["GET"], include_in_schema=False)
    app.add_api_route("/ui", to_ui, methods=["GET"], include_in_schema=False)
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")


def create_app(
    service: ChatService, training: TrainingClient | None = None, *, guard: Guard | None = None
) -> FastAPI:
    """The REST app over `service`, with the training job API when `training` is given.

    The app does not own the service: whoever made it closes it (`ChatService.aclose`) after
    the server stops, since the gRPC Chat server may share it.

    Args:
        service: The serving logic.
        training: The training job client, or None for no /v1/training routes.
        guard: API keys and per-caller limits; pass the gRPC Chat servicer's so that a key's
            limits cover both APIs. Default: one built from `service.settings`.

    Raises:
        FailedPreconditionError: settings.api_keys_file is missing, unreadable or empty.
    """
    if guard is None:
        guard = Guard.from_settings(service.settings)
    app = FastAPI(title="modalmesh gateway", version="0.1.0")
    app.state.service = service
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], response_model=None)
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    if training is not None:
        add_training_routes(app, training)
    _add_ui_routes(app)
    _install_error_handlers(app)
    app.add_middleware(
        GatewayMiddleware,
        max_body_bytes=service.settings.max_body_bytes,
        metrics=service.metrics,
        guard=guard,
    )
    origins = [o.strip() for o in service.settings.cors_origins.split(",") if o.strip()]
    if origins:  # added last = outermost: answers preflights before the key check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Api-Key", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    return app
