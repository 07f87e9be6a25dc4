"""Gateway security: API keys, per-caller limits, CORS and the media count, REST and gRPC alike.

The pieces of `gateway.auth` are tested on their own (the limiter with a clock the test
advances), then through the real REST app (in-process, or under uvicorn where a stream must
stay open) and a real gRPC Chat server over the stand-in backends of conftest.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.__main__ import _HttpServer
from gateway.auth import ApiKeys, Guard, KeyLimiter, RateLimitedError, bearer_token, key_id, read_keys_file
from gateway.grpc_chat import CHAT_SERVICE_NAME, ChatServicer
from gateway.http_app import create_app
from modalmesh.v1 import chat_pb2, chat_pb2_grpc
from services.common.errors import FailedPreconditionError, UnauthenticatedError, error_for_code
from services.common.grpc_errors import grpc_status
from services.common.grpc_server import GrpcServer
from services.common.settings import Settings
from tests.unit.gateway.support import FakeLLM, ServiceFactory

URL = "/v1/chat/completions"
KEY_A, KEY_B = "sk-alpha-0123456789", "sk-beta"


class Clock:
    """A monotonic clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def body(content: Any = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **fields}


def image_parts(png: bytes, n: int) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"type": "image_url", "image_url": {"url": url}} for _ in range(n)]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(r: httpx.Response, status: int, error_type: str, message: str | None = None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["type"]) == (status, error_type)
    if message is not None:
        assert error["message"] == message


# ---- the pieces ------------------------------------------------------------------------------


def test_unauthenticated_maps_to_401_and_grpc_unauthenticated() -> None:
    e = UnauthenticatedError("no key")
    assert (e.http_status, grpc_status(e), e.error_type) == (
        401,
        grpc.StatusCode.UNAUTHENTICATED,
        "AuthenticationError",
    )
    assert isinstance(error_for_code("UNAUTHENTICATED", "x"), UnauthenticatedError)


def test_api_keys_identify_each_key_and_refuse_others() -> None:
    keys = ApiKeys([KEY_A, " ", f" {KEY_B} ", KEY_A])
    assert keys.enabled and len(keys) == 2
    assert keys.identify(KEY_A) == key_id(KEY_A) and keys.identify(KEY_B) == key_id(KEY_B)
    assert len(key_id(KEY_A)) == 12 and KEY_A not in key_id(KEY_A)
    for wrong in ("sk-alpha", KEY_A + "x", KEY_B.upper()):
        with pytest.raises(UnauthenticatedError, match="not valid"):
            keys.identify(wrong)
    with pytest.raises(UnauthenticatedError, match="expected an API key"):
        keys.identify(None)
    assert not ApiKeys(["", " "]).enabled


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None


def test_keys_file_comments_blank_lines_and_failures(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# team keys\n\n{KEY_A}\n  {KEY_B}  # the beta team\n")
    assert read_keys_file(path) == [KEY_A, KEY_B]
    keys = ApiKeys.from_settings(Settings(api_keys="sk-env", api_keys_file=path))
    assert {keys.identify(k) for k in ("sk-env", KEY_A, KEY_B)} == {
        key_id(k) for k in ("sk-env", KEY_A, KEY_B)
    }
    with pytest.raises(FailedPreconditionError, match=r"api_keys_file: expected a readable .* 'missing'"):
        ApiKeys.from_settings(Settings(api_keys_file=Path("missing")))
    path.write_text("# nothing yet\n\n")
    with pytest.raises(FailedPreconditionError, match="expected at least one key"):
        read_keys_file(path)


def test_rate_limit_burst_retry_after_and_refill() -> None:
    clock = Clock()
    limiter = KeyLimiter(rpm=30, burst=2, clock=clock)  # one token per 2 s
    limiter.acquire("a").release()
    limiter.acquire("a").release()
    with pytest.raises(RateLimitedError) as info:
        limiter.acquire("a")
    assert info.value.retry_after_s == 2 and info.value.http_status == 429
    assert "at most 30 requests per minute (burst 2)" in info.value.message
    limiter.acquire("b").release()  # another caller has its own bucket
    clock.now += 1.0
    with pytest.raises(RateLimitedError) as info:
        limiter.acquire("a")
    assert info.value.retry_after_s == 1  # half a token there: 1 s more, rounded up
    clock.now += 1.0
    limiter.acquire("a").release()


def test_default_burst_is_one_seconds_worth_at_least_one() -> None:
    assert KeyLimiter(rpm=600).capacity == 10
    assert KeyLimiter(rpm=6).capacity == 1


def test_concurrency_limit_and_release() -> None:
    limiter = KeyLimiter(rpm=0, max_concurrent=2)
    first, second = limiter.acquire("a"), limiter.acquire("a")
    with pytest.raises(RateLimitedError, match="expected at most 2 at once"):
        limiter.acquire("a")
    limiter.acquire("b").release()
    first.release()
    first.release()  # idempotent: does not free a slot it does not hold
    third = limiter.acquire("a")
    with pytest.raises(RateLimitedError):
        limiter.acquire("a")
    second.release()
    third.release()


def test_idle_callers_are_dropped() -> None:
    clock = Clock()
    limiter = KeyLimiter(rpm=600, max_concurrent=4, clock=clock)
    for i in range(1000):
        limiter.acquire(f"addr:{i}").release()
    busy = limiter.acquire("busy")
    assert len(limiter) == 1001
    clock.now += 61
    limiter.acquire("new").release()
    assert len(limiter) == 2  # "busy" holds a slot, "new" just came
    busy.release()


# ---- REST ------------------------------------------------------------------------------------


@pytest.fixture
def llm_address(llm_server: tuple[FakeLLM, str]) -> str:
    return llm_server[1]


@pytest.fixture
async def rest(
    settings: Settings, make_service: ServiceFactory, llm_address: str
) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """rest(clock=None, **settings) -> an in-process client of the app with those settings."""
    clients: list[httpx.AsyncClient] = []

    def make(clock: Clock | None = None, **fields: Any) -> httpx.AsyncClient:
        service = make_service(llm_address, settings_=settings.model_copy(update=fields))
        guard = Guard.from_settings(service.settings, clock=clock) if clock else None
        app = create_app(service, guard=guard)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.aclose()


async def test_auth_is_off_by_default(rest: Callable[..., httpx.AsyncClient]) -> None:
    c = rest()
    r = await c.post(URL, json=body())
    assert r.status_code == 200, r.text
    assert "www-authenticate" not in r.headers


async def test_keys_required_on_v1_only(rest: Callable[..., httpx.AsyncClient]) -> None:
    c = rest(api_keys=f"{KEY_A}, {KEY_B}")
    r = await c.post(URL, json=body())
    assert_error(
        r,
        401,
        "AuthenticationError",
        "expected an API key (Authorization: Bearer <key>, or x-api-key), got none",
    )
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers["x-request-id"]
    r = await c.post(URL, json=body(), headers=bearer("sk-wrong"))
    assert_error(
        r, 401, "AuthenticationError", "the API key is not valid; expected one of the configured keys"
    )
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(await c.post(URL, json=body(), headers={"Authorization": KEY_A}), 401, "AuthenticationError")
    assert (await c.post(URL, json=body(), headers=bearer(KEY_A))).status_code == 200
    assert (await c.post(URL, json=body(), headers=bearer(KEY_B))).status_code == 200
    assert (await c.post(URL, json=body(), headers={"x-api-key": KEY_B})).status_code == 200
    assert_error(await c.get("/v1/models"), 401, "AuthenticationError")
    assert (await c.get("/v1/models", headers=bearer(KEY_A))).status_code == 200
    assert_error(await c.get("/v1/no-such-route"), 401, "AuthenticationError")  # no probing without a key
    assert (await c.get("/health")).status_code == 200
    metrics = await c.get("/metrics")
    assert metrics.status_code == 200
    assert 'route="/v1/chat/completions",status="401"' in metrics.text
    assert KEY_A not in metrics.text


async def test_key_from_file(rest: Callable[..., httpx.AsyncClient], tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"# one key\n{KEY_B}\n")
    c = rest(api_keys_file=path)
    assert (await c.post(URL, json=body(), headers=bearer(KEY_B))).status_code == 200
    assert_error(await c.post(URL, json=body(), headers=bearer(KEY_A)), 401, "AuthenticationError")


async def test_missing_keys_file_fails_at_start(settings: Settings, make_service: ServiceFactory) -> None:
    service = make_service(settings_=settings.model_copy(update={"api_keys_file": Path("/nonexistent/keys")}))
    with pytest.raises(FailedPreconditionError, match="/nonexistent/keys"):
        create_app(service)
    with pytest.raises(FailedPreconditionError, match="/nonexistent/keys"):
        ChatServicer(service)


async def test_unauthenticated_huge_body_is_401_not_413(
    rest: Callable[..., httpx.AsyncClient], settings: Settings
) -> None:
    c = rest(api_keys=KEY_A)
    huge = b"x" * (settings.max_body_bytes + 1)
    r = await c.post(URL, content=huge, headers={"content-type": "application/json"})
    assert_error(r, 401, "AuthenticationError")
    r = await c.post(URL, content=huge, headers={"content-type": "application/json", **bearer(KEY_A)})
    assert_error(r, 413, "PayloadTooLargeError")


async def test_rate_limit_retry_after_refill_and_per_key(rest: Callable[..., httpx.AsyncClient]) -> None:
    clock = Clock()
    c = rest(clock, api_keys=f"{KEY_A},{KEY_B}", key_rate_limit_rpm=30, key_rate_limit_burst=2)
    for _ in range(2):
        assert (await c.post(URL, json=body(), headers=bearer(KEY_A))).status_code == 200
    r = await c.post(URL, json=body(), headers=bearer(KEY_A))
    assert_error(r, 429, "RateLimitError")
    assert r.headers["retry-after"] == "2"
    assert (await c.post(URL, json=body(), headers=bearer(KEY_B))).status_code == 200  # B has its own
    assert (await c.get("/v1/models", headers=bearer(KEY_A))).status_code == 200  # not counted
    assert (await c.get("/health")).status_code == 200
    clock.now += 2.0
    assert (await c.post(URL, json=body(), headers=bearer(KEY_A))).status_code == 200


async def test_rate_limit_without_keys_is_per_client_address(rest: Callable[..., httpx.AsyncClient]) -> None:
    c = rest(Clock(), key_rate_limit_rpm=60, key_rate_limit_burst=1)
    assert (await c.post(URL, json=body())).status_code == 200
    assert_error(await c.post(URL, json=body()), 429, "RateLimitError")


async def test_real_clock_refill(rest: Callable[..., httpx.AsyncClient]) -> None:
    c = rest(key_rate_limit_rpm=120, key_rate_limit_burst=1)  # a token each 0.5 s
    assert (await c.post(URL, json=body())).status_code == 200
    r = await c.post(URL, json=body())
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    await asyncio.sleep(0.6)
    assert (await c.post(URL, json=body())).status_code == 200


async def test_failed_requests_give_back_their_slot(rest: Callable[..., httpx.AsyncClient]) -> None:
    c = rest(api_keys=KEY_A, key_max_concurrent=1)
    for _ in range(3):
        assert_error(await c.post(URL, json=body(model="nope"), headers=bearer(KEY_A)), 404, "NotFoundError")
        assert_error(await c.post(URL, content=b"{", headers=bearer(KEY_A)), 400, "BadRequestError")
    assert (await c.post(URL, json=body(), headers=bearer(KEY_A))).status_code == 200


async def test_media_count_over_the_limit_is_400(rest: Callable[..., httpx.AsyncClient], png: bytes) -> None:
    c = rest(media_max_items=2)
    content = [{"type": "text", "text": "compare"}, *image_parts(png, 3)]
    r = await c.post(URL, json={"model": "tiny", "messages": [{"role": "user", "content": content}]})
    assert_error(
        r,
        400,
        "BadRequestError",
        "messages: expected at most 2 media parts per request (all messages together), got 3",
    )
    assert r.json()["error"]["param"] == "messages[0].content[3]"
    # Counted across messages, too.
    two_turns = [
        {"role": "user", "content": image_parts(png, 2)},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": image_parts(png, 1)},
    ]
    assert_error(await c.post(URL, json={"model": "tiny", "messages": two_turns}), 400, "BadRequestError")
    r = await c.post(URL, json=body(image_parts(png, 2)))
    assert r.status_code == 200, r.text


# ---- CORS ------------------------------------------------------------------------------------

ORIGIN = "https://app.example"


async def test_cors_off_by_default(rest: Callable[..., httpx.AsyncClient]) -> None:
    c = rest()
    r = await c.post(URL, json=body(), headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


async def test_cors_allows_only_the_listed_origins(rest: Callable[..., httpx.AsyncClient]) -> None:
    c = rest(api_keys=KEY_A, cors_origins=f"{ORIGIN}, https://other.example")
    r = await c.post(URL, json=body(), headers={"Origin": ORIGIN, **bearer(KEY_A)})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = await c.post(URL, json=body(), headers={"Origin": ORIGIN})  # the browser can read the 401
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = await c.post(URL, json=body(), headers={"Origin": "https://evil.example", **bearer(KEY_A)})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = await c.options(URL, headers=preflight)  # no key needed
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = await c.options(URL, headers={**preflight, "Origin": "https://evil.example"})
    assert r.status_code == 400


async def test_cors_any_origin(rest: Callable[..., httpx.AsyncClient]) -> None:
    c = rest(cors_origins="*")
    r = await c.post(URL, json=body(), headers={"Origin": "https://anywhere.example"})
    assert r.headers["access-control-allow-origin"] == "*"


# ---- concurrency over a real server (a stream stays open) -----------------------------------


@pytest.fixture
async def serve_app() -> AsyncIterator[Callable[[FastAPI], Awaitable[str]]]:
    """serve_app(app) -> base URL of the app under uvicorn on a free port."""
    running: list[tuple[_HttpServer, asyncio.Task[None]]] = []

    async def start(app: FastAPI) -> str:
        server = _HttpServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="off"))
        task = asyncio.create_task(server.serve())
        running.append((server, task))
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    yield start
    for server, task in running:
        server.should_exit = True
        await task


async def _eventually_ok(send: Callable[[], Awaitable[httpx.Response]], timeout_s: float = 5.0) -> None:
    """Retry until the reply is not 429 (a slot is freed once the server sees the client go)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        r = await send()
        if r.status_code != 429 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert r.status_code == 200, r.text


async def test_streams_in_flight_hold_their_slot_until_done_or_gone(
    settings: Settings,
    make_service: ServiceFactory,
    llm_server: tuple[FakeLLM, str],
    serve_app: Callable[[FastAPI], Awaitable[str]],
) -> None:
    fake = llm_server[0]
    fake.pieces, fake.delay_s = ["tok"] * 200, 0.05  # a stream lasts ~10 s unless cut
    s = settings.model_copy(update={"api_keys": f"{KEY_A},{KEY_B}", "key_max_concurrent": 2})
    url = await serve_app(create_app(make_service(llm_server[1], settings_=s)))
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:

        async def post(key: str, **fields: Any) -> httpx.Response:
            return await c.post(URL, json=body(**fields), headers=bearer(key))

        streams = [c.stream("POST", URL, json=body(stream=True), headers=bearer(KEY_A)) for _ in range(2)]
        opened = [await s.__aenter__() for s in streams]
        for r in opened:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if '"content":"tok"' in line:
                    break
        r = await post(KEY_A, stream=True)
        assert_error(
            r,
            429,
            "RateLimitError",
            "too many requests in flight for this caller: expected at most 2 at once, got one more",
        )
        assert r.headers["retry-after"] == "1"
        fake.pieces, fake.delay_s = ["short"], 0.0
        assert (await post(KEY_B)).status_code == 200  # another key is not held back
        await streams[0].__aexit__(None, None, None)  # the client leaves: its slot frees
        await _eventually_ok(lambda: post(KEY_A))
        await streams[1].__aexit__(None, None, None)
        # Both free now: two finished requests do not hold slots.
        await _eventually_ok(lambda: post(KEY_A, stream=True))
        assert (await post(KEY_A)).status_code == 200
        assert (await post(KEY_A)).status_code == 200


# ---- gRPC ------------------------------------------------------------------------------------


@pytest.fixture
async def grpc_chat(
    settings: Settings, make_service: ServiceFactory, llm_address: str
) -> AsyncIterator[Callable[..., Awaitable[grpc.aio.Channel]]]:
    """grpc_chat(guard=None, **settings) -> a channel to a Chat server with those settings."""
    servers: list[GrpcServer] = []
    channels: list[grpc.aio.Channel] = []

    async def start(guard: Guard | None = None, **fields: Any) -> grpc.aio.Channel:
        s = settings.model_copy(update=fields)
        service = make_service(llm_address, settings_=s)
        server = GrpcServer(s, service_names=[CHAT_SERVICE_NAME])
        chat_pb2_grpc.add_ChatServicer_to_server(ChatServicer(service, guard), server.server)
        port = server.bind("127.0.0.1", 0)
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return channel

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.server.stop(None)


def chat_request(*parts: chat_pb2.ChatContentPart) -> chat_pb2.ChatRequest:
    content = list(parts) or [chat_pb2.ChatContentPart(text="hi")]
    return chat_pb2.ChatRequest(model="tiny", messages=[chat_pb2.ChatMessage(role="user", content=content)])


async def complete(
    channel: grpc.aio.Channel, req: chat_pb2.ChatRequest | None = None, key: str | None = None
) -> list[chat_pb2.ChatChunk]:
    metadata = (("authorization", f"Bearer {key}"),) if key else None
    return [
        c async for c in chat_pb2_grpc.ChatStub(channel).Complete(req or chat_request(), metadata=metadata)
    ]


async def grpc_failure(
    channel: grpc.aio.Channel, req: chat_pb2.ChatRequest | None = None, key: str | None = None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await complete(channel, req, key)
    return info.value


async def test_grpc_auth_off_by_default(grpc_chat: Callable[..., Awaitable[grpc.aio.Channel]]) -> None:
    chunks = await complete(await grpc_chat())
    assert chunks[-1].finish_reason == "stop"


async def test_grpc_keys(grpc_chat: Callable[..., Awaitable[grpc.aio.Channel]]) -> None:
    channel = await grpc_chat(api_keys=KEY_A)
    e = await grpc_failure(channel)
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.details() == "expected an API key (Authorization: Bearer <key>, or x-api-key), got none"
    e = await grpc_failure(channel, key="sk-wrong")
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "not valid" in e.details()
    assert (await complete(channel, key=KEY_A))[-1].finish_reason == "stop"
    stub = chat_pb2_grpc.ChatStub(channel)
    chunks = [c async for c in stub.Complete(chat_request(), metadata=(("x-api-key", KEY_A),))]
    assert chunks[-1].finish_reason == "stop"
    health = health_pb2_grpc.HealthStub(channel)  # open, like /health
    reply = await health.Check(health_pb2.HealthCheckRequest(service=CHAT_SERVICE_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_grpc_rate_limit_is_shared_with_rest(
    grpc_chat: Callable[..., Awaitable[grpc.aio.Channel]],
    settings: Settings,
    make_service: ServiceFactory,
    llm_address: str,
) -> None:
    clock = Clock()
    s = settings.model_copy(update={"api_keys": f"{KEY_A},{KEY_B}", "key_rate_limit_rpm": 6})
    guard = Guard.from_settings(s, clock=clock)  # burst 1, a token each 10 s
    channel = await grpc_chat(guard, **s.model_dump(include={"api_keys", "key_rate_limit_rpm"}))
    app = create_app(make_service(llm_address, settings_=s), guard=guard)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as rest_client:
        assert (await rest_client.post(URL, json=body(), headers=bearer(KEY_A))).status_code == 200
        e = await grpc_failure(channel, key=KEY_A)
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "requests per minute" in e.details()
        assert dict(e.trailing_metadata() or ())["retry-after"] == "10"
        assert (await complete(channel, key=KEY_B))[-1].finish_reason == "stop"
        clock.now += 10
        assert (await complete(channel, key=KEY_A))[-1].finish_reason == "stop"


async def test_grpc_media_count_over_the_limit(
    grpc_chat: Callable[..., Awaitable[grpc.aio.Channel]], png: bytes
) -> None:
    channel = await grpc_chat(media_max_items=1)
    two = chat_request(*[chat_pb2.ChatContentPart(image=chat_pb2.MediaInput(data=png)) for _ in range(2)])
    e = await grpc_failure(channel, two)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        e.details() == "messages: expected at most 1 media parts per request (all messages together), got 2"
    )
    one = chat_request(chat_pb2.ChatContentPart(image=chat_pb2.MediaInput(data=png)))
    assert (await complete(channel, one))[-1].finish_reason == "stop"


async def test_grpc_call_in_flight_holds_its_slot_until_cancelled(
    grpc_chat: Callable[..., Awaitable[grpc.aio.Channel]], llm_server: tuple[FakeLLM, str]
) -> None:
    fake = llm_server[0]
    fake.pieces, fake.delay_s = ["tok"] * 200, 0.05
    channel = await grpc_chat(api_keys=KEY_A, key_max_concurrent=1)
    call = chat_pb2_grpc.ChatStub(channel).Complete(
        chat_request(), metadata=(("authorization", f"Bearer {KEY_A}"),)
    )
    assert (await call.read()).delta == "tok"
    e = await grpc_failure(channel, key=KEY_A)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        e.details() == "too many requests in flight for this caller: expected at most 1 at once, got one more"
    )
    assert dict(e.trailing_metadata() or ())["retry-after"] == "1"
    call.cancel()
    fake.pieces, fake.delay_s = ["short"], 0.0
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        try:
            assert (await complete(channel, key=KEY_A))[-1].finish_reason == "stop"
            break
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert asyncio.get_running_loop().time() < deadline, "the cancelled call kept its slot"
            await asyncio.sleep(0.05)


async def test_the_web_ui_page_is_open_while_its_api_calls_need_the_key(
    rest: Callable[..., httpx.AsyncClient],
) -> None:
    c = rest(api_keys=KEY_A)
    page = await c.get("/ui/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert (await c.get("/v1/models")).status_code == 401
    assert (await c.get("/v1/models", headers=bearer(KEY_A))).status_code == 200
