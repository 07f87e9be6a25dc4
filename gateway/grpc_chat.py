"""The gRPC chat API, modalmesh.v1.Chat/Complete, on the same serving logic as the REST API.

The servicer only translates ChatRequest (proto) -> `gateway.domain.ChatRequest` and events ->
ChatChunk messages (with the timestamps a time-aware preset wrote). A content part's typed
media cases (image, video, audio, event) and the generic `media` case (any modality of
`services.common.modalities`, named by `MediaInput.modality`) become the same media item;
inline formats are checked against the modality's record. Errors end the stream with
the status of `services.common.grpc_errors` (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE...). A
client that cancels cancels the generation.

With API keys configured, each call needs metadata `authorization: Bearer <key>` (or
`x-api-key: <key>`), else UNAUTHENTICATED; a caller over its limits gets RESOURCE_EXHAUSTED with
trailing metadata `retry-after` (seconds). The check sits at the top of the Chat handler, so the
standard health service on the same server stays open. The slot a call holds is given back
when its stream ends, fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from gateway._middleware import new_request_id, valid_request_id
from gateway.auth import Guard, Permit, RateLimitedError
from gateway.domain import ChatRequest, Finished, MediaOutput
from gateway.llm_client import client_deadline
from gateway.protocol import format_problem
from gateway.serving import ChatService
from modalmesh.v1 import chat_pb2, chat_pb2_grpc
from services.common import modalities
from services.common.content import MediaInput, MediaPart, Part, TextPart, TimePart, Timestamp, Turn
from services.common.errors import InvalidArgumentError, ModalmeshError
from services.common.grpc_errors import abort_with
from services.common.log import bound_request_id, request_id_from_metadata

logger = logging.getLogger(__name__)

CHAT_SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["Chat"].full_name
_ROUTE = "grpc:Complete"


_UUID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
GENERIC_CASE = "media"  # ChatContentPart.media: any modality, by name


def _typed_case(kind: str | None) -> bool:
    """Whether a ChatContentPart case is a modality's own typed case (image, video, ...)."""
    return (
        kind is not None
        and kind in modalities.MODALITIES
        and kind in chat_pb2.ChatContentPart.DESCRIPTOR.fields_by_name
    )


def _media(case: str, media: chat_pb2.MediaInput, param: str) -> MediaInput:
    """The media item of a typed case (`case` is the modality) or of the generic `media` case."""
    named = media.modality.strip()
    if case == GENERIC_CASE:
        if not named:
            raise InvalidArgumentError(
                f"{param}.media.modality: expected a modality name (one of {list(modalities.input_names())}), got none",
                param=param,
            )
        modality = named
    else:
        modality = case
        if named and named != case:
            raise InvalidArgumentError(
                f"{param}.{case}.modality: expected {case!r} or empty on the {case} case, got {named!r}",
                param=param,
            )
    fmt = media.format.strip().lower() or None
    problem = format_problem(modality, media.format if fmt else None)
    if problem is not None:
        raise InvalidArgumentError(f"{param}.{case}.format: {problem}", param=param)
    uuid = media.uuid or None
    if uuid is not None and not _UUID.fullmatch(uuid):
        raise InvalidArgumentError(
            f"{param}.{case}.uuid: expected 1-128 characters of A-Z a-z 0-9 . _ : -, got {uuid!r}",
            param=param,
        )
    source = media.WhichOneof("source")
    if source == "data":
        return MediaInput(modality, data=media.data, fmt=fmt, param=param, uuid=uuid)
    if source is None and uuid is None:
        raise InvalidArgumentError(f"{param}.{case}: expected a url, data or a uuid, got none", param=param)
    return MediaInput(modality, url=media.url if source else None, param=param, uuid=uuid)


def _time(seconds: float, param: str) -> TimePart:
    if not (seconds == seconds and 0 <= seconds < float("inf")):
        raise InvalidArgumentError(
            f"{param}.time.seconds: expected finite seconds >= 0, got {seconds}", param=param
        )
    return TimePart(seconds, param=param)


def to_domain(request: chat_pb2.ChatRequest, request_id: str) -> ChatRequest:
    """The transport-independent request of a proto ChatRequest.

    Raises:
        InvalidArgumentError: An inline media format that its modality does not have.
    """
    turns = []
    for i, message in enumerate(request.messages):
        parts: list[Part[MediaInput]] = []
        for j, part in enumerate(message.content):
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append(TextPart(part.text))
            elif kind == GENERIC_CASE or _typed_case(kind):
                assert kind is not None
                parts.append(MediaPart(_media(kind, getattr(part, kind), f"messages[{i}].content[{j}]")))
            elif kind == "time":
                parts.append(_time(part.time.seconds, f"messages[{i}].content[{j}]"))
        turns.append(Turn(message.role, tuple(parts)))
    return ChatRequest(
        model=request.model or None,
        turns=turns,
        request_id=request_id,
        max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
        temperature=request.temperature if request.HasField("temperature") else None,
        top_p=request.top_p if request.HasField("top_p") else None,
        top_k=request.top_k if request.HasField("top_k") else None,
        seed=request.seed if request.HasField("seed") else None,
        stop=list(request.stop),
        repetition_penalty=_optional(request, "repetition_penalty"),
        presence_penalty=_optional(request, "presence_penalty"),
        frequency_penalty=_optional(request, "frequency_penalty"),
        stop_token_ids=list(request.stop_token_ids),
        modalities=tuple(request.modalities),
        decoding={m: _options(getattr(request, m)) for m in _decoding_fields() if request.HasField(m)},
    )


def _decoding_fields() -> tuple[str, ...]:
    """The output modalities of the registry that ChatRequest has a DecodeOptions field for."""
    fields = chat_pb2.ChatRequest.DESCRIPTOR.fields_by_name
    return tuple(m for m in modalities.output_names() if m in fields)


def _optional(request: chat_pb2.ChatRequest, name: str) -> Any:
    return getattr(request, name) if request.HasField(name) else None


def _peer_host(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The client's address without its port ("ipv4:10.0.0.1:5000" -> "ipv4:10.0.0.1")."""
    peer = context.peer() or "unknown"
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() and host not in ("ipv4", "ipv6") else peer


def _options(msg: chat_pb2.DecodeOptions) -> dict[str, Any]:
    return {f.name: value for f, value in msg.ListFields()}


def _media_out(item: MediaOutput) -> chat_pb2.ChatMedia:
    return chat_pb2.ChatMedia(
        modality=item.modality,
        index=item.index,
        char_offset=item.char_offset,
        data=item.data or b"",
        mime_type=item.mime_type,
        seed=item.seed or 0,
        error=item.error or "",
        error_code=item.error_code or 0,
    )


class ChatServicer(chat_pb2_grpc.ChatServicer):
    """modalmesh.v1.Chat over a `ChatService`.

    Args:
        service: The serving logic (shared with the REST app).
        guard: API keys and per-caller limits; pass the REST app's so that a key's limits
            cover both APIs. Default: one built from `service.settings`.

    Raises:
        FailedPreconditionError: settings.api_keys_file is missing, unreadable or empty.
    """

    def __init__(self, service: ChatService, guard: Guard | None = None) -> None:
        self.service = service
        self.guard = guard if guard is not None else Guard.from_settings(service.settings)

    def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> Permit:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        return self.guard.admit(metadata.get("authorization"), metadata.get("x-api-key"), _peer_host(context))

    async def Complete(
        self, request: chat_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[chat_pb2.ChatChunk]:
        """Stream the reply to one chat request: text deltas, then finish reason and usage."""
        request_id = (
            valid_request_id(request.request_id)
            or valid_request_id(request_id_from_metadata(context.invocation_metadata()))
            or new_request_id()
        )
        status = "OK"
        permit: Permit | None = None
        # the LLM call's deadline is no later than this call's own
        with bound_request_id(request_id), client_deadline(context.time_remaining()):
            try:
                permit = self._admit(context)
                chunks = self._complete(to_domain(request, request_id))
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        yield chunk
            except asyncio.CancelledError:
                status = "CANCELLED"
                raise
            except ModalmeshError as e:
                status = e.code.name
                logger.info("chat failed (%s): %s", status, e.message)
                if isinstance(e, RateLimitedError):
                    context.set_trailing_metadata((("retry-after", str(e.retry_after_s)),))
                await abort_with(context, e)
            except Exception as e:
                status = "INTERNAL"
                await abort_with(context, e)
            finally:
                if permit is not None:
                    permit.release()
                self.service.metrics.requests.labels(route=_ROUTE, status=status).inc()

    async def _complete(self, chat: ChatRequest) -> AsyncGenerator[chat_pb2.ChatChunk, None]:
        prepared = await self.service.prepare(chat)

        def chunk(delta: str, timestamps: tuple[Timestamp, ...], **last: Any) -> chat_pb2.ChatChunk:
            return chat_pb2.ChatChunk(
                id=prepared.id,
                model=prepared.model,
                created=prepared.created,
                delta=delta,
                timestamps=[
                    chat_pb2.ChatTimestamp(
                        media_index=t.media_index, frame=t.frame, seconds=t.seconds, char_offset=t.char_offset
                    )
                    for t in timestamps
                ],
                **last,
            )

        events = self.service.generate(prepared, transport="grpc")
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Finished):
                    usage = chat_pb2.ChatUsage(
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        total_tokens=event.prompt_tokens + event.completion_tokens,
                    )
                    yield chunk(event.text, event.timestamps, finish_reason=event.finish_reason, usage=usage)
                    return
                if isinstance(event, MediaOutput):
                    yield chunk("", (), media=[_media_out(event)])
                    continue
                yield chunk(event.text, event.timestamps)
