"""Gateway test fixtures: a stand-in encoder, a real gRPC LLM stand-in, and the service over them.

The LLM stand-in is a real grpc.aio server implementing modalmesh.v1.LLM (with the standard
health service from services.common.grpc_server), so the gateway's channel, metadata,
deadlines, streaming and cancellation are exercised for real; only the model is scripted.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from gateway.feature_cache import FeatureCache
from gateway.http_app import create_app
from gateway.llm_client import LLMClient
from gateway.media import MediaFetcher
from gateway.serving import ChatService
from modalmesh.v1 import llm_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.common.presets import Preset, load_preset
from services.common.settings import Settings
from tests.unit.gateway.support import PNG, REFUSED, FakeEncoder, FakeLLM, MediaHandler, ServiceFactory


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings with a private cache folder, no Redis, small, fast limits, and loopback open to
    media fetches (the media server runs on 127.0.0.1)."""
    return Settings(
        cache_dir=tmp_path / "cache",
        fetch_allow="127.0.0.1",
        redis_url="",
        media_max_bytes=64 * 1024,
        max_body_bytes=256 * 1024,
        image_fetch_timeout_s=1.0,
        llm_timeout_s=10.0,
        encoder_timeout_s=5.0,
        encoder_address=REFUSED,
        llm_address=REFUSED,
    )


@pytest.fixture
def preset(settings: Settings) -> Preset:
    """The tiny preset (YAML only; no weights are generated)."""
    return load_preset("tiny", cache_dir=settings.cache_dir)


@pytest.fixture
async def llm_server(settings: Settings) -> AsyncIterator[tuple[FakeLLM, str]]:
    """A running FakeLLM on a free port: (servicer, address)."""
    servicer = FakeLLM()
    server = GrpcServer(settings, service_names=["modalmesh.v1.LLM"])
    llm_pb2_grpc.add_LLMServicer_to_server(servicer, server.server)
    port = server.bind("127.0.0.1", 0)
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.server.stop(None)


@pytest.fixture
async def make_service(settings: Settings, preset: Preset) -> AsyncIterator[ServiceFactory]:
    """Factory of ChatServices over stand-ins: make_service(llm_address, encoder=, cache=,
    preset_=<another shipped preset's name>).

    Every service it made is closed after the test.
    """
    made: list[ChatService] = []

    def make(
        llm_address: str = REFUSED,
        *,
        encoder: FakeEncoder | None = None,
        cache: FeatureCache | None = None,
        settings_: Settings | None = None,
        preset_: str | None = None,
    ) -> ChatService:
        s = settings_ or settings
        svc = ChatService(
            s,
            load_preset(preset_, cache_dir=s.cache_dir) if preset_ else preset,
            encoder=encoder or FakeEncoder(),
            llm=LLMClient(llm_address, settings=s),
            cache=cache or FeatureCache(None, ttl_s=60),
            fetcher=MediaFetcher.from_settings(s),
        )
        made.append(svc)
        return svc

    try:
        yield make
    finally:
        for svc in made:
            await svc.aclose()


@pytest.fixture
def service(make_service: ServiceFactory, llm_server: tuple[FakeLLM, str]) -> ChatService:
    """A ChatService wired to the running FakeLLM and a FakeEncoder."""
    return make_service(llm_server[1])


@pytest.fixture
def down_service(make_service: ServiceFactory) -> ChatService:
    """A ChatService whose LLM and encoder addresses refuse connections."""
    return make_service(REFUSED)


@pytest.fixture
def png() -> bytes:
    """A small PNG."""
    return PNG


@pytest.fixture
async def client(service: ChatService) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the REST app over `service` (in-process ASGI)."""
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c


@pytest.fixture(scope="session")
def media_server() -> Iterator[str]:
    """Base URL of a threaded local HTTP server serving test media."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), MediaHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
