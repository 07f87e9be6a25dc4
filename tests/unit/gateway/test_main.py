"""`python -m gateway`: flags over MODALMESH_* settings, and one in-process serve/stop cycle."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import pytest

from gateway.__main__ import parse_args, serve, settings_from_args
from gateway.serving import ChatService
from services.common.presets import Preset
from services.common.settings import Settings
from tests.helpers.procs import free_ports
from tests.unit.gateway.support import ServiceFactory


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODALMESH_GATEWAY_HTTP_PORT", "9100")
    monkeypatch.setenv("MODALMESH_REDIS_URL", "redis://env:6379/0")
    settings = settings_from_args(
        parse_args(
            [
                "--preset",
                "tiny",
                "--host",
                "0.0.0.0",
                "--grpc-port",
                "9101",
                "--llm-address",
                "llm:1",
                "--encoder-address",
                "enc:2",
                "--log-level",
                "DEBUG",
            ]
        )
    )
    assert settings.gateway_http_port == 9100  # from the environment: no flag given
    assert settings.redis_url == "redis://env:6379/0"
    assert (settings.host, settings.gateway_grpc_port) == ("0.0.0.0", 9101)
    assert (settings.llm_target(), settings.encoder_target()) == ("llm:1", "enc:2")
    assert settings.log_level == "DEBUG"
    settings = settings_from_args(parse_args(["--http-port", "1", "--redis-url", "redis://x/1"]))
    assert (settings.gateway_http_port, settings.redis_url) == (1, "redis://x/1")


async def test_serve_answers_and_stops_on_sigterm(
    settings: Settings, tmp_path: Path, make_service: ServiceFactory
) -> None:
    http_port, grpc_port = free_ports(2)
    settings = settings.model_copy(
        update={"gateway_http_port": http_port, "gateway_grpc_port": grpc_port, "drain_seconds": 1.0}
    )
    made: list[ChatService] = []

    def factory(s: Settings, preset: Preset) -> ChatService:
        made.append(make_service(settings_=s))
        return made[-1]

    ready = asyncio.Event()
    task = asyncio.create_task(serve(settings, make_service=factory, ready=ready))
    await asyncio.wait_for(ready.wait(), timeout=10)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:
        models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        assert (await client.get("/health")).status_code == 503
    os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it: drain, close, return 0
    assert await asyncio.wait_for(task, timeout=10) == 0
    assert made and made[0].llm._channel is None  # the clients were closed


def test_a_bad_encoder_replica_list_is_refused_at_start_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gateway.__main__ import main

    assert main(["--encoder-address", "127.0.0.1:8101,,127.0.0.1:8102"]) == 2
    err = capsys.readouterr().err
    assert (
        "MODALMESH_ENCODER_ADDRESS (--encoder-address): entry 1 '': expected host:port, got an empty entry"
        in err
    )
    assert "Traceback" not in err
