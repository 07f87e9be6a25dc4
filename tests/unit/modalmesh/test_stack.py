"""The supervisor's pieces that need no model: settings passed to children, Redis start-up."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modalmesh.stack import Stack, StackError, free_port, redis_answers, settings_env
from services.common.settings import Settings


def test_settings_round_trip_through_the_environment(tmp_path):
    original = Settings(
        preset="tiny",
        cache_dir=tmp_path,
        llm_port=6001,
        llm_address="10.0.0.1:7",
        decoder_address="10.0.0.1:8",
    )
    env = settings_env(original)
    code = "from services.common.settings import Settings; print(Settings().model_dump_json())"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODALMESH_")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, check=True
    )
    assert Settings.model_validate_json(out.stdout) == original


def test_redis_is_started_when_none_answers_and_stopped_with_the_stack(tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    lines: list[str] = []
    stack = Stack(Settings(redis_url=dead), log_dir=tmp_path, out=lines.append)
    stack.log_dir.mkdir(exist_ok=True)
    try:
        stack._ensure_redis()
        url = stack.settings.redis_url
        assert url != dead and redis_answers(url)
        assert stack.started_redis and any("started redis-server" in line for line in lines)
        import redis

        config = redis.Redis.from_url(url).config_get("maxmemory*")
        assert config["maxmemory"] == str(512 * 1024 * 1024)  # bounded, feature-cache keys evicted first
        assert config["maxmemory-policy"] == "volatile-lru"
        data_dir = Path(stack.redis_dir.name)
    finally:
        stack.stop()
    assert not redis_answers(url)
    assert not data_dir.exists()


def test_an_existing_redis_is_used_as_it_is(tmp_path):
    if not redis_answers("redis://127.0.0.1:6379/0"):
        pytest.skip("no Redis at 127.0.0.1:6379")
    stack = Stack(Settings(redis_url="redis://127.0.0.1:6379/0"), log_dir=tmp_path, out=lambda _: None)
    stack._ensure_redis()
    assert not stack.started_redis and stack.services == []


def test_ports_in_use_are_named_with_the_flag_that_moves_them(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        stack = Stack(Settings(gateway_grpc_port=port), log_dir=tmp_path, out=lambda _: None)
        with pytest.raises(
            StackError, match=rf"{port} for gateway gRPC \(--grpc-port, MODALMESH_GATEWAY_GRPC_PORT\)"
        ):
            stack._check_ports()


def test_decoder_ports_are_checked_only_when_the_decoder_service_runs(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        stack = Stack(Settings(decoder_grpc_port=port), log_dir=tmp_path, out=lambda _: None)
        stack._check_ports()
        with pytest.raises(
            StackError, match=rf"{port} for decoder gRPC \(--decoder-grpc-port, MODALMESH_DECODER_GRPC_PORT\)"
        ):
            stack._check_ports(decoders=True)


def test_the_summary_shows_the_decoder_service_when_it_runs(tmp_path):
    settings = Settings(decoder_grpc_port=9111, decoder_http_port=9110, decoder_metrics_port=9112)
    stack = Stack(settings, log_dir=tmp_path, out=lambda _: None)
    assert "decoders" not in stack.describe()
    stack.decoder_models = ["image_decoder", "audio_decoder"]
    line = next(x for x in stack.describe().splitlines() if "decoders" in x)
    assert (
        "grpc 127.0.0.1:9111" in line and "http 127.0.0.1:9110" in line and "metrics 127.0.0.1:9112" in line
    )
    assert "(image_decoder, audio_decoder)" in line


def test_decoder_target_and_its_override():
    assert Settings(decoder_grpc_port=9111).decoder_target() == "127.0.0.1:9111"
    assert Settings(decoder_address="10.0.0.2:81").decoder_target() == "10.0.0.2:81"
    defaults = Settings()
    assert (defaults.decoder_http_port, defaults.decoder_grpc_port, defaults.decoder_metrics_port) == (
        8110,
        8111,
        8112,
    )
    assert defaults.decoder_timeout_s == 120.0
