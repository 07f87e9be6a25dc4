"""modalmesh.v1.Chat/Complete over a real grpc.aio server and the stand-in backends."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from gateway.grpc_chat import CHAT_SERVICE_NAME, ChatServicer, to_domain
from gateway.serving import ChatService
from modalmesh.v1 import chat_pb2, chat_pb2_grpc, llm_pb2
from services.common.content import TextPart, TimePart
from services.common.errors import InvalidArgumentError
from services.common.grpc_server import GrpcServer
from services.common.settings import Settings
from tests.unit.gateway.support import FakeEncoder, FakeLLM, sent_media


async def start_chat_server(settings: Settings, service: ChatService) -> tuple[GrpcServer, str]:
    server = GrpcServer(settings, service_names=[CHAT_SERVICE_NAME])
    chat_pb2_grpc.add_ChatServicer_to_server(ChatServicer(service), server.server)
    port = server.bind("127.0.0.1", 0)
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def stub(settings: Settings, service: ChatService) -> AsyncIterator[chat_pb2_grpc.ChatStub]:
    server, address = await start_chat_server(settings, service)
    async with grpc.aio.insecure_channel(address) as channel:
        yield chat_pb2_grpc.ChatStub(channel)
    await server.server.stop(None)


@pytest.fixture
async def down_stub(settings: Settings, down_service: ChatService) -> AsyncIterator[chat_pb2_grpc.ChatStub]:
    server, address = await start_chat_server(settings, down_service)
    async with grpc.aio.insecure_channel(address) as channel:
        yield chat_pb2_grpc.ChatStub(channel)
    await server.server.stop(None)


def request(*parts: chat_pb2.ChatContentPart, **fields: object) -> chat_pb2.ChatRequest:
    fields.setdefault("model", "tiny")
    return chat_pb2.ChatRequest(messages=[chat_pb2.ChatMessage(role="user", content=parts)], **fields)  # type: ignore[arg-type]


def text(t: str) -> chat_pb2.ChatContentPart:
    return chat_pb2.ChatContentPart(text=t)


def image(data: bytes | None = None, url: str | None = None) -> chat_pb2.ChatContentPart:
    media = chat_pb2.MediaInput(data=data) if data is not None else chat_pb2.MediaInput(url=url)
    return chat_pb2.ChatContentPart(image=media)


async def failure(stub: chat_pb2_grpc.ChatStub, req: chat_pb2.ChatRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Complete(req):
            pass
    return info.value


def test_to_domain() -> None:
    req = request(
        text("a"),
        image(data=b"x"),
        image(url="https://e/x.png"),
        max_tokens=3,
        temperature=0.0,
        stop=["."],
        request_id="ignored-here",
    )
    chat = to_domain(req, "rid")
    assert chat.request_id == "rid" and chat.max_tokens == 3 and chat.temperature == 0.0
    assert chat.top_p is None and chat.top_k is None and chat.seed is None
    assert (chat.repetition_penalty, chat.presence_penalty, chat.frequency_penalty) == (None, None, None)
    assert chat.stop_token_ids == []
    penalised = to_domain(
        request(
            text("a"),
            repetition_penalty=1.5,
            presence_penalty=0.0,
            frequency_penalty=-1.0,
            stop_token_ids=[7],
        ),
        "rid",
    )
    assert (penalised.repetition_penalty, penalised.presence_penalty, penalised.frequency_penalty) == (
        1.5,
        0.0,
        -1.0,
    )
    assert penalised.stop_token_ids == [7] and penalised.max_tokens is None
    assert chat.turns[0].parts[0] == TextPart("a")
    media = chat.media()
    assert media[0].data == b"x" and media[1].url == "https://e/x.png"
    assert [m.param for m in media] == ["messages[0].content[1]", "messages[0].content[2]"]


async def test_complete_streams_deltas_then_usage(
    stub: chat_pb2_grpc.ChatStub, llm_server: tuple[FakeLLM, str], png: bytes
) -> None:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    req = request(text("what?"), image(data=png), image(url=url), max_tokens=8, request_id="grpc-req-1")
    chunks = [c async for c in stub.Complete(req)]
    assert [c.delta for c in chunks] == ["Hello", " there", "!"]
    assert [c.finish_reason for c in chunks] == ["", "", "stop"]
    assert {c.id for c in chunks} == {"chatcmpl-grpc-req-1"}
    assert {c.model for c in chunks} == {"tiny"}
    assert not chunks[0].HasField("usage")
    assert (
        chunks[-1].usage.prompt_tokens,
        chunks[-1].usage.completion_tokens,
        chunks[-1].usage.total_tokens,
    ) == (42, 3, 45)
    fake = llm_server[0]
    assert fake.request_ids == ["grpc-req-1"] and len(sent_media(fake.requests[0])) == 2


async def test_request_id_from_metadata(
    stub: chat_pb2_grpc.ChatStub, llm_server: tuple[FakeLLM, str]
) -> None:
    call = stub.Complete(request(text("hi")), metadata=(("x-request-id", "meta-1"),))
    assert {c.id async for c in call} == {"chatcmpl-meta-1"}
    assert llm_server[0].request_ids == ["meta-1"]


async def test_invalid_argument(stub: chat_pb2_grpc.ChatStub) -> None:
    e = await failure(stub, chat_pb2.ChatRequest(model="tiny"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "messages: expected at least one message, got an empty list"
    e = await failure(stub, request(text("hi"), max_tokens=0))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "max_tokens: expected a positive integer, got 0"
    e = await failure(stub, request(text("hi"), presence_penalty=3.0))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "presence_penalty: expected a number in [-2, 2], got 3.0"
    e = await failure(stub, request(text("hi"), repetition_penalty=-1.0))
    assert e.details() == "repetition_penalty: expected a number > 0 (1 disables it), got -1.0"
    e = await failure(stub, request(image(data=os.urandom(200))))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "messages[0].content[0] (image 0): not an image: cannot identify image file"
    e = await failure(stub, request(image(url="ftp://x/y.png")))
    assert e.details().endswith("accepted schemes are http, https and data")


async def test_media_over_the_limit(stub: chat_pb2_grpc.ChatStub, settings: Settings) -> None:
    e = await failure(stub, request(image(data=b"\x89PNG" + bytes(settings.media_max_bytes))))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the limit of" in e.details()


async def test_bad_role(stub: chat_pb2_grpc.ChatStub) -> None:
    req = chat_pb2.ChatRequest(messages=[chat_pb2.ChatMessage(role="robot", content=[text("x")])])
    e = await failure(stub, req)
    assert e.details() == "messages[0].role: expected one of system, user, assistant, got 'robot'"


async def test_not_found(stub: chat_pb2_grpc.ChatStub) -> None:
    e = await failure(stub, request(text("hi"), model="llama-70b"))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert e.details().startswith("The model 'llama-70b' does not exist")


async def test_llm_down_is_unavailable(down_stub: chat_pb2_grpc.ChatStub, down_service: ChatService) -> None:
    e = await failure(down_stub, request(text("hi")))
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    assert e.details().startswith("the llm service is unavailable: ")
    metrics = down_service.metrics.render()[0].decode()
    assert 'modalmesh_gateway_requests_total{route="grpc:Complete",status="UNAVAILABLE"} 1.0' in metrics


async def test_client_cancel_cancels_generation(
    stub: chat_pb2_grpc.ChatStub, llm_server: tuple[FakeLLM, str]
) -> None:
    fake = llm_server[0]
    fake.pieces, fake.delay_s = ["tok"] * 400, 0.05
    call = stub.Complete(request(text("hi")))
    async for chunk in call:
        assert chunk.delta == "tok"
        break
    call.cancel()
    await asyncio.wait_for(fake.cancelled.wait(), timeout=5)


def part(kind: str, data: bytes = b"x", fmt: str = "") -> chat_pb2.ChatContentPart:
    return chat_pb2.ChatContentPart(**{kind: chat_pb2.MediaInput(data=data, format=fmt)})


def test_to_domain_every_media_kind() -> None:
    req = request(
        part("video"),
        chat_pb2.ChatContentPart(audio=chat_pb2.MediaInput(url="https://e/a.wav")),
        part("audio", fmt="FLAC"),
        part("event", fmt="npy"),
        text("what?"),
    )
    media = to_domain(req, "rid").media()
    assert [(m.modality, m.fmt, m.url) for m in media] == [
        ("video", None, None),
        ("audio", None, "https://e/a.wav"),
        ("audio", "flac", None),
        ("event", "npy", None),
    ]


@pytest.mark.parametrize(
    "kind,fmt,message",
    [
        (
            "audio",
            "aac",
            "messages[0].content[0].audio.format: expected one of ['wav', 'mp3', 'flac', 'ogg'], got 'aac'",
        ),
        (
            "video",
            "mp4",
            "messages[0].content[0].video.format: expected no format for video (read from the bytes), got 'mp4'",
        ),
    ],
)
async def test_a_format_the_modality_lacks(
    stub: chat_pb2_grpc.ChatStub, kind: str, fmt: str, message: str
) -> None:
    e = await failure(stub, request(part(kind, fmt=fmt)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == message


async def test_a_modality_the_preset_lacks(stub: chat_pb2_grpc.ChatStub) -> None:
    e = await failure(stub, request(part("event", fmt="npz")))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        e.details()
        == "messages[0].content[0]: preset tiny has no event encoder; it accepts image (got 1 event stream)"
    )


async def test_timestamps_in_the_chunks(
    make_service: Any, llm_server: tuple[FakeLLM, str], settings: Settings, png: bytes
) -> None:
    fake = llm_server[0]
    fake.pieces = ["At ", "<vid> 1.0s", "."]
    fake.timestamps = {1: [llm_pb2.Timestamp(media_index=0, frame=1, seconds=1.0, char_offset=3)]}
    service = make_service(
        llm_server[1], encoder=FakeEncoder(times={"video": [0.0, 1.0]}), preset_="tiny-etchat"
    )
    server, address = await start_chat_server(settings, service)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            req = request(part("video", png), text("when?"), model="tiny-etchat")
            chunks = [c async for c in chat_pb2_grpc.ChatStub(channel).Complete(req)]
    finally:
        await server.server.stop(None)
    assert [c.delta for c in chunks] == ["At ", "<vid> 1.0s", "."]
    assert [len(c.timestamps) for c in chunks] == [0, 1, 0]
    t = chunks[1].timestamps[0]
    assert (t.media_index, t.frame, t.seconds, t.char_offset) == (0, 1, 1.0, 3)
    assert sent_media(fake.requests[0])[0].modality == "video"
    assert list(sent_media(fake.requests[0])[0].frame_times) == [0.0, 1.0]


def test_to_domain_time_parts() -> None:
    req = request(text("at "), chat_pb2.ChatContentPart(time=chat_pb2.SourceTime(seconds=2.5)))
    assert to_domain(req, "rid").turns[0].parts == (
        TextPart("at "),
        TimePart(2.5, param="messages[0].content[1]"),
    )
    bad = request(chat_pb2.ChatContentPart(time=chat_pb2.SourceTime(seconds=float("nan"))))
    with pytest.raises(
        InvalidArgumentError, match=r"messages\[0\]\.content\[0\]\.time\.seconds: expected finite"
    ):
        to_domain(bad, "rid")


# ---- the generic media case ------------------------------------------------------------------


def generic(
    modality: str, data: bytes | None = None, url: str | None = None, **fields: str
) -> chat_pb2.ChatContentPart:
    source: dict[str, Any] = {"data": data} if data is not None else {"url": url} if url is not None else {}
    return chat_pb2.ChatContentPart(media=chat_pb2.MediaInput(modality=modality, **source, **fields))


def test_to_domain_of_the_generic_case() -> None:
    req = request(
        generic("image", url="https://e/x.png"),
        generic("audio", data=b"RIFF", format="WAV"),
        generic("event", uuid="ev-1"),
        chat_pb2.ChatContentPart(
            video=chat_pb2.MediaInput(modality="video", data=b"v")
        ),  # the typed case may name itself
        generic("smell", data=b"?"),  # left to the preset check
    )
    media = to_domain(req, "rid").media()
    assert [(m.modality, m.url, m.data, m.fmt, m.uuid) for m in media] == [
        ("image", "https://e/x.png", None, None, None),
        ("audio", None, b"RIFF", "wav", None),
        ("event", None, None, None, "ev-1"),
        ("video", None, b"v", None, None),
        ("smell", None, b"?", None, None),
    ]
    assert [m.param for m in media] == [f"messages[0].content[{i}]" for i in range(5)]


@pytest.mark.parametrize(
    "part,message",
    [
        (
            generic("", data=b"x"),
            "messages[0].content[0].media.modality: expected a modality name (one of "
            "['image', 'video', 'audio', 'event', 'thermal']), got none",
        ),
        (
            chat_pb2.ChatContentPart(image=chat_pb2.MediaInput(modality="video", data=b"x")),
            "messages[0].content[0].image.modality: expected 'image' or empty on the image case, got 'video'",
        ),
        (
            generic("audio", data=b"x", format="aac"),
            "messages[0].content[0].media.format: expected one of ['wav', 'mp3', 'flac', 'ogg'], got 'aac'",
        ),
        (generic("image"), "messages[0].content[0].media: expected a url, data or a uuid, got none"),
    ],
)
def test_bad_generic_parts(part: chat_pb2.ChatContentPart, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        to_domain(request(part), "rid")
    assert (info.value.message, info.value.param) == (message, "messages[0].content[0]")


async def test_the_generic_case_reaches_the_encoder(
    stub: chat_pb2_grpc.ChatStub, llm_server: tuple[FakeLLM, str], png: bytes
) -> None:
    chunks = [c async for c in stub.Complete(request(generic("image", data=png), text("what?")))]
    assert chunks[-1].finish_reason == "stop"
    assert [m.modality for m in sent_media(llm_server[0].requests[0])] == ["image"]


@pytest.mark.parametrize(
    "modality,message",
    [
        ("smell", "messages[0].content[0]: modality 'smell' is unknown; preset tiny accepts image"),
        (
            "event",
            "messages[0].content[0]: preset tiny has no event encoder; it accepts image (got 1 event stream)",
        ),
    ],
)
async def test_a_generic_modality_the_model_does_not_take(
    stub: chat_pb2_grpc.ChatStub, modality: str, message: str
) -> None:
    e = await failure(stub, request(generic(modality, data=b"x")))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == message
