"""The REST app: error shapes and statuses, request ids, streaming, models, health, metrics.

Most tests run the real app in-process (httpx ASGI transport) over the stand-in backends; the
streaming-cancellation and `openai` client tests run it under a real uvicorn server.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from openai import AsyncOpenAI
from pydantic import BaseModel

from gateway.__main__ import _HttpServer
from gateway.http_app import create_app
from gateway.serving import ChatService
from tests.unit.gateway.support import FakeLLM, sent_media

import uvicorn  # isort: skip

URL = "/v1/chat/completions"


def body(content: Any = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **fields}


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def assert_error(
    response: httpx.Response, status: int, message: str | None = None, error_type: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    if message is not None:
        assert error["message"] == message
    if error_type is not None:
        assert error["type"] == error_type
    return dict(error)


def sse_events(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.fixture
async def down_client(down_service: ChatService) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(down_service))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c


# ---- errors that need no backend ----------------------------------------------------------


async def test_malformed_json(down_client: httpx.AsyncClient) -> None:
    r = await down_client.post(
        URL, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"}
    )
    assert_error(
        r, 400, "the request body is not valid JSON: Expecting value at position 31", "BadRequestError"
    )


async def test_empty_body(down_client: httpx.AsyncClient) -> None:
    r = await down_client.post(URL, content=b"")
    assert_error(r, 400, "the request body is empty; expected a JSON object")


async def test_json_without_content_type_is_accepted(down_client: httpx.AsyncClient) -> None:
    r = await down_client.post(
        URL, content=json.dumps(body(max_tokens=0)).encode(), headers={"content-type": "text/plain"}
    )
    assert_error(r, 400, "max_tokens: expected a positive integer, got 0")


async def test_schema_errors_name_the_field(down_client: httpx.AsyncClient) -> None:
    r = await down_client.post(URL, json={"model": "tiny"})
    error = assert_error(r, 400, "messages: Field required")
    assert error["param"] == "messages"
    r = await down_client.post(URL, json=body(max_tokens="lots"))
    assert assert_error(r, 400)["message"].startswith("max_tokens: Input should be a valid integer")


class Typed(BaseModel):
    count: int


async def test_fastapi_422_handler_is_replaced(down_service: ChatService) -> None:
    app: FastAPI = create_app(down_service)

    @app.post("/typed")
    async def typed(item: Typed) -> dict[str, int]:
        return {"count": item.count}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        r = await c.post("/typed", json={"count": "x"})
        error = assert_error(r, 400)
        assert error["message"].startswith("count: Input should be a valid integer")
        assert error["param"] == "count"
        r = await c.post("/typed", content=b"{nope", headers={"content-type": "application/json"})
        assert assert_error(r, 400)["message"].startswith("the request body is not valid JSON")


async def test_body_over_the_limit_is_413(down_client: httpx.AsyncClient, down_service: ChatService) -> None:
    limit = down_service.settings.max_body_bytes
    big = body("x" * (limit + 10))
    r = await down_client.post(URL, json=big)
    error = assert_error(r, 413, error_type="PayloadTooLargeError")
    assert error["message"].startswith("request body is ")
    assert f"over the limit of {limit} bytes" in error["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    r = await down_client.post(URL, content=chunks())
    assert_error(r, 413)


async def test_empty_messages(down_client: httpx.AsyncClient) -> None:
    r = await down_client.post(URL, json={"model": "tiny", "messages": []})
    assert_error(r, 400, "messages: expected at least one message, got an empty list")


async def test_unknown_model(down_client: httpx.AsyncClient) -> None:
    r = await down_client.post(URL, json={**body(), "model": "gpt-4o"})
    error = assert_error(r, 404, error_type="NotFoundError")
    assert error["message"].startswith("The model 'gpt-4o' does not exist; this gateway serves 'tiny'")
    assert error["param"] == "model"


async def test_unsupported_part(down_client: httpx.AsyncClient) -> None:
    r = await down_client.post(
        URL, json=body([{"type": "video_url", "video_url": {"url": "https://x/v.mp4"}}])
    )
    assert_error(
        r,
        400,
        "messages[0].content[0]: preset tiny has no video encoder; it accepts image (got 1 video)",
    )


async def test_n_other_than_one(down_client: httpx.AsyncClient) -> None:
    r = await down_client.post(URL, json=body(n=3))
    assert_error(r, 400, "n: only n=1 is supported, got 3")


async def test_unsupported_scheme_and_too_many_images(down_client: httpx.AsyncClient) -> None:
    r = await down_client.post(URL, json=body([{"type": "image_url", "image_url": "file:///etc/passwd"}]))
    assert_error(
        r,
        400,
        "messages[0].content[0] (image 0): unsupported image URL scheme 'file' in "
        "file:///etc/passwd: accepted schemes are http, https and data; file:// URLs are off until "
        "MODALMESH_FETCH_FILE_ROOTS names the folders they may read under",
    )
    parts = [{"type": "image_url", "image_url": "https://example.com/a.png"}] * 5
    r = await down_client.post(URL, json=body(parts))
    assert_error(r, 400, "preset tiny accepts at most 4 images per request, got 5")


async def test_unknown_route_and_method(down_client: httpx.AsyncClient) -> None:
    assert_error(await down_client.get("/v1/nothing"), 404, error_type="NotFoundError")
    r = await down_client.get(URL)
    assert_error(r, 405)


async def test_internal_errors_do_not_leak(
    down_service: ChatService, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(request: Any) -> Any:
        raise RuntimeError("secret detail /etc/shadow")

    monkeypatch.setattr(down_service, "prepare", broken)
    transport = httpx.ASGITransport(app=create_app(down_service))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        r = await c.post(URL, json=body())
    error = assert_error(r, 500, error_type="InternalServerError")
    assert "secret" not in r.text
    assert error["message"] == "internal error (RuntimeError); see the gateway log"


async def test_llm_down_is_503_streaming_or_not(down_client: httpx.AsyncClient) -> None:
    for stream in (False, True):
        r = await down_client.post(URL, json=body(stream=stream))
        error = assert_error(r, 503, error_type="ServiceUnavailableError")
        assert error["message"].startswith("the llm service is unavailable: ")


# ---- request ids --------------------------------------------------------------------------


async def test_request_id_echoed_or_made(down_client: httpx.AsyncClient) -> None:
    r = await down_client.post(URL, json=body(max_tokens=0), headers={"X-Request-Id": "abc-1"})
    assert r.headers["x-request-id"] == "abc-1"
    r = await down_client.get("/v1/models")
    assert len(r.headers["x-request-id"]) == 32
    r = await down_client.get("/v1/models", headers={"X-Request-Id": "bad id\twith spaces"})
    assert len(r.headers["x-request-id"]) == 32


async def test_request_id_reaches_the_llm(client: httpx.AsyncClient, llm_server: tuple[FakeLLM, str]) -> None:
    r = await client.post(URL, json=body(), headers={"X-Request-Id": "trace-7"})
    assert r.status_code == 200 and r.json()["id"] == "chatcmpl-trace-7"
    r = await client.post(URL, json=body(request_id="from-body"))
    assert r.headers["x-request-id"] == "from-body"
    assert llm_server[0].request_ids == ["trace-7", "from-body"]


# ---- replies ------------------------------------------------------------------------------


async def test_non_streaming_reply_shape(client: httpx.AsyncClient, png: bytes) -> None:
    r = await client.post(
        URL, json=body([{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": data_url(png)}])
    )
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    assert isinstance(reply["created"], int) and reply["model"] == "tiny"
    assert reply["choices"] == [
        {
            "index": 0,
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
            "token_ids": None,
            "message": {
                "role": "assistant",
                "content": "Hello there!",
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            },
        }
    ]
    assert reply["usage"] == {
        "prompt_tokens": 26,
        "total_tokens": 29,
        "completion_tokens": 3,
        "prompt_tokens_details": None,
    }


async def test_streaming_with_usage(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, json=body(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    first, *middle, last, usage, _ = events
    ids = {e["id"] for e in events[:-1]}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert [m["choices"][0]["delta"] for m in middle] == [{"content": "Hello"}, {"content": " there"}]
    assert all(m["choices"][0]["finish_reason"] is None for m in middle)
    assert last["choices"][0]["delta"] == {"content": "!"}
    assert last["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 10,
        "total_tokens": 13,
        "completion_tokens": 3,
    }
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


async def test_streaming_without_usage(client: httpx.AsyncClient) -> None:
    events = sse_events((await client.post(URL, json=body(stream=True))).text)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in e for e in events[:-1])


async def test_error_after_the_stream_started(
    client: httpx.AsyncClient, llm_server: tuple[FakeLLM, str]
) -> None:
    llm_server[0].fail_after = 1
    r = await client.post(URL, json=body(stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2] == {
        "error": {
            "message": "scripted failure mid-stream",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }
    assert events[1]["choices"][0]["delta"] == {"content": "Hello"}


async def test_pinned_adapter_reaches_the_llm(
    client: httpx.AsyncClient, llm_server: tuple[FakeLLM, str]
) -> None:
    r = await client.post(URL, json={**body(), "model": "tiny@1"})
    assert r.json()["model"] == "tiny@1"
    assert llm_server[0].requests[-1].adapter == "tiny@1"


# ---- models, health, metrics ---------------------------------------------------------------


async def test_models(client: httpx.AsyncClient, down_client: httpx.AsyncClient) -> None:
    listing = (await client.get("/v1/models")).json()
    assert listing["object"] == "list"
    assert [(m["id"], m["parent"], m["owned_by"]) for m in listing["data"]] == [
        ("tiny", None, "modalmesh"),
        ("tiny@2", "tiny", "modalmesh"),
        ("tiny@1", "tiny", "modalmesh"),
    ]
    listing = (await down_client.get("/v1/models")).json()
    assert [m["id"] for m in listing["data"]] == ["tiny"]


async def test_health(client: httpx.AsyncClient, down_client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    r = await down_client.get("/health")
    assert r.status_code == 503
    reply = r.json()
    assert reply["checks"] == {"llm": "down", "encoder": "ok"}
    assert reply["error"]["message"] == "not ready: the llm service at 127.0.0.1:1 is not ready"
    assert reply["error"]["code"] == 503


async def test_metrics(client: httpx.AsyncClient) -> None:
    await client.post(URL, json=body())
    await client.post(URL, json=body(max_tokens=0))
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'modalmesh_gateway_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'modalmesh_gateway_requests_total{route="/v1/chat/completions",status="400"} 1.0' in text
    assert "modalmesh_gateway_e2e_request_latency_seconds_count" in text
    assert "modalmesh_gateway_generation_tokens_total 3.0" in text


async def test_two_apps_have_separate_registries(make_service: Any) -> None:
    a, b = create_app(make_service()), create_app(make_service())
    assert a.state.service.metrics.registry is not b.state.service.metrics.registry


# ---- under a real server -------------------------------------------------------------------


@pytest.fixture
async def server_url(service: ChatService) -> AsyncIterator[str]:
    """The app under uvicorn on a free port."""
    server = _HttpServer(
        uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_config=None, lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_disconnect_mid_stream_cancels_generation(
    server_url: str, llm_server: tuple[FakeLLM, str]
) -> None:
    fake = llm_server[0]
    fake.pieces, fake.delay_s = ["tok"] * 400, 0.05
    async with (
        httpx.AsyncClient(base_url=server_url) as c,
        c.stream("POST", URL, json=body(stream=True)) as r,
    ):
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if '"content":"tok"' in line:
                break
    await asyncio.wait_for(fake.cancelled.wait(), timeout=5)


async def test_disconnect_while_waiting_cancels_generation(
    server_url: str, llm_server: tuple[FakeLLM, str]
) -> None:
    fake = llm_server[0]
    fake.pieces, fake.delay_s = ["tok"] * 10, 1.0  # nothing comes for a second
    async with httpx.AsyncClient(base_url=server_url, timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post(URL, json=body())
    await asyncio.wait_for(fake.cancelled.wait(), timeout=5)


async def test_openai_client(server_url: str, png: bytes) -> None:
    client = AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(png)}},
                {"type": "text", "text": "what is it?"},
            ],
        }
    ]
    reply = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    assert reply.choices[0].message.content == "Hello there!"
    assert reply.usage is not None and reply.usage.total_tokens == 29
    stream = await client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    assert text == "Hello there!" and usage is not None and usage.completion_tokens == 3
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny", "tiny@2", "tiny@1"]
    with pytest.raises(Exception) as info:
        await client.chat.completions.create(model="nope", messages=messages)
    assert getattr(info.value, "status_code", None) == 404
    await client.close()


async def test_reply_names_the_adapter_version_in_system_fingerprint(client: httpx.AsyncClient) -> None:
    pinned = body("hi", model="tiny@7", max_tokens=4)
    assert (await client.post("/v1/chat/completions", json=pinned)).json()["system_fingerprint"] == "tiny@7"
    r = await client.post("/v1/chat/completions", json=pinned | {"stream": True})
    chunks = [e for e in sse_events(r.text) if isinstance(e, dict) and e.get("choices")]
    assert [c.get("system_fingerprint") for c in chunks if c["choices"][0]["finish_reason"]] == ["tiny@7"]


async def test_inline_audio_on_a_preset_without_audio_is_a_clear_400(down_client: httpx.AsyncClient) -> None:
    part = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(b"RIFF").decode(), "format": "wav"},
    }
    r = await down_client.post(URL, json=body([{"type": "text", "text": "hi"}, part]))
    assert_error(
        r,
        400,
        "messages[0].content[1]: preset tiny has no audio encoder; it accepts image (got 1 audio clip)",
    )


# ---- other modalities and timestamps ---------------------------------------------------------


@pytest.fixture
async def etchat_client(
    make_service: Any, llm_server: tuple[FakeLLM, str]
) -> AsyncIterator[tuple[httpx.AsyncClient, FakeLLM]]:
    """A client of the REST app on tiny-etchat (video only, a timestamp head)."""
    from tests.unit.gateway.support import FakeEncoder

    service = make_service(
        llm_server[1], encoder=FakeEncoder(times={"video": [0.0, 1.0, 2.0]}), preset_="tiny-etchat"
    )
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c, llm_server[0]


def video_body(png: bytes, **fields: Any) -> dict[str, Any]:
    url = "data:video/mp4;base64," + base64.b64encode(png).decode()  # the stand-in encoder reads PNGs
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "when?"}]
    return body(content, model="tiny-etchat", **fields)


async def test_timestamps_in_the_reply(etchat_client: tuple[httpx.AsyncClient, FakeLLM], png: bytes) -> None:
    from modalmesh.v1 import llm_pb2

    client, fake = etchat_client
    r = await client.post(URL, json=video_body(png))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["timestamps"] == []  # a time-aware preset: always a list

    fake.pieces = ["At ", "<vid> 1.0s", "."]
    fake.timestamps = {1: [llm_pb2.Timestamp(media_index=0, frame=1, seconds=1.0, char_offset=3)]}
    r = await client.post(URL, json=video_body(png))
    message = r.json()["choices"][0]["message"]
    assert message["content"] == "At <vid> 1.0s."
    assert message["timestamps"] == [{"media_index": 0, "frame": 1, "seconds": 1.0, "char_offset": 3}]

    r = await client.post(URL, json=video_body(png, stream=True))
    chunks = [e for e in sse_events(r.text) if isinstance(e, dict) and e.get("choices")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert [d.get("timestamps") for d in deltas] == [
        None,
        None,
        [{"media_index": 0, "frame": 1, "seconds": 1.0, "char_offset": 3}],
        None,
    ]


async def test_no_timestamps_field_without_a_timestamp_head(client: httpx.AsyncClient, png: bytes) -> None:
    r = await client.post(URL, json=body([{"type": "image_url", "image_url": {"url": data_url(png)}}]))
    assert "timestamps" not in r.json()["choices"][0]["message"]


@pytest.mark.parametrize(
    "part,message",
    [
        (
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aac"}},
            "messages[0].content[0]: input_audio.format: expected one of ['wav', 'mp3', 'flac', 'ogg'], got 'aac'",
        ),
        (
            {"type": "video_url", "video_url": {"url": "data:image/png;base64,AAAA"}},
            "messages[0].content[0] (video 0): data URL media type: expected video/*, got 'image/png'",
        ),
    ],
)
async def test_media_format_errors(
    etchat_client: tuple[httpx.AsyncClient, FakeLLM], part: dict[str, Any], message: str
) -> None:
    client, _ = etchat_client
    r = await client.post(URL, json=body([part], model="tiny-etchat"))
    assert_error(r, 400, message)


async def test_a_full_llm_queue_answers_429_with_retry_after(
    client: httpx.AsyncClient, llm_server: tuple[FakeLLM, str]
) -> None:
    import grpc

    llm_server[0].fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    for stream in (False, True):
        r = await client.post(URL, json=body(stream=stream))
        assert_error(r, 429, "scripted failure RESOURCE_EXHAUSTED")
        assert r.headers["retry-after"] == "1"


# ---- the generic media part ------------------------------------------------------------------


async def test_input_media_reaches_the_encoder_of_its_modality(
    client: httpx.AsyncClient, png: bytes, llm_server: tuple[FakeLLM, str]
) -> None:
    inline = {"modality": "image", "data": base64.b64encode(png).decode()}
    by_url = {"modality": "image", "url": data_url(png)}
    content = [
        {"type": "input_media", "input_media": inline},
        {"type": "input_media", "input_media": by_url},
        {"type": "text", "text": "what?"},
    ]
    r = await client.post(URL, json=body(content))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello there!"
    (sent,) = llm_server[0].requests[-1:]
    assert [m.modality for m in sent_media(sent)] == ["image", "image"]


@pytest.mark.parametrize(
    ("modality", "message"),
    [
        ("smell", "messages[0].content[1]: modality 'smell' is unknown; preset tiny accepts image"),
        (
            "audio",
            "messages[0].content[1]: preset tiny has no audio encoder; it accepts image (got 1 audio clip)",
        ),
    ],
)
async def test_input_media_of_a_modality_the_model_does_not_take(
    down_client: httpx.AsyncClient, modality: str, message: str
) -> None:
    part = {"type": "input_media", "input_media": {"modality": modality, "url": "https://example.com/x"}}
    r = await down_client.post(URL, json=body([{"type": "text", "text": "hi"}, part]))
    assert assert_error(r, 400, message)["param"] == "messages[0].content[1]"


async def test_health_names_what_modalmesh_up_restarts_or_gave_up_on(
    make_service: Any, llm_server: tuple[Any, str], settings: Any
) -> None:
    """Under `modalmesh up` the gateway reads its supervisor's /status: a service being restarted
    or given up on is named; a given-up service that chats do not need makes a 200 "degraded"."""
    from modalmesh.supervise import RestartPolicy, StatusServer, Supervision

    sup = Supervision(RestartPolicy(max_restarts=1, backoff_s=60, backoff_max_s=60))
    for name in ("llm", "trainer", "encoders"):
        sup.add(name, pid=1)
        sup.ready(name)
    assert sup.exited("trainer", 1) == 60  # first crash: restart after the backoff
    sup.restarted("trainer", pid=2)
    assert sup.exited("trainer", 1) is None  # one restart within the window already: given up
    server = StatusServer(sup, "127.0.0.1", 0)
    server.start()
    supervised = settings.model_copy(update={"supervisor_url": server.url})
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(make_service(llm_server[1], settings_=supervised))),
            base_url="http://gateway",
        ) as c:
            r = await c.get("/health")
            assert r.status_code == 200, r.text
            reply = r.json()
            assert reply["status"] == "degraded"
            assert reply["supervisor"] == {
                "trainer": "given up: exited (code 1) after 1 restarts within 300s; not restarted again"
            }  # the running ones are not listed
            assert "trainer: given up" in reply["warning"]
        assert sup.exited("llm", -9) == 60  # the LLM crashed: in backoff, about to restart
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(make_service(settings_=supervised))),
            base_url="http://gateway",
        ) as c:
            r = await c.get("/health")
            assert r.status_code == 503
            assert r.json()["supervisor"]["llm"] == "restarting (restart 0; last exit code -9)"
    finally:
        server.stop()
    # No supervisor answering at the URL: /health is what it is without one.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(make_service(llm_server[1], settings_=supervised))),
        base_url="http://gateway",
    ) as c:
        r = await c.get("/health")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
