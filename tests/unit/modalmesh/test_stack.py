"""The supervisor's pieces that need no model: settings passed to children, Redis start-up."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modalmesh.stack import Service, Stack, StackError, free_port, port_is_free, redis_answers, settings_env
from modalmesh.supervise import RestartPolicy, Supervision
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


def test_redis_is_started_on_the_urls_port_keeps_its_data_and_comes_back_after_a_kill(tmp_path):
    import redis

    dead = f"redis://127.0.0.1:{free_port()}/0"
    lines: list[str] = []
    stack = Stack(Settings(redis_url=dead, cache_dir=tmp_path / "cache"), log_dir=tmp_path, out=lines.append)
    stack.log_dir.mkdir(exist_ok=True)
    try:
        stack._ensure_redis()
        url = stack.settings.redis_url
        assert url == dead and redis_answers(url)  # the URL everybody was given, not a random port
        assert stack.started_redis and any("started redis-server" in line for line in lines)
        client = redis.Redis.from_url(url)
        config = client.config_get("*")
        assert config["maxmemory"] == str(512 * 1024 * 1024)  # bounded, feature-cache keys evicted first
        assert config["maxmemory-policy"] == "volatile-lru"
        assert (config["appendonly"], config["appendfsync"]) == ("yes", "everysec")
        data_dir = tmp_path / "cache" / "redis" / url.split(":")[2].split("/")[0]
        assert Path(config["dir"]) == data_dir
        client.set("mm:adapters:x", "kept")
        time.sleep(1.5)  # fsync once a second
        (svc,) = stack.services
        stack.supervision.add("redis", svc.proc.pid)
        stack.supervision.ready("redis")
        os.kill(svc.proc.pid, signal.SIGKILL)
        restarted = stack.supervision.services["redis"]
        wait_until(
            lambda: stack.supervise_once() and restarted.restarts == 1 and restarted.state == "running", 20
        )
        again = redis.Redis.from_url(url)  # the old client's connection died with the server
        assert again.get("mm:adapters:x") == b"kept"  # the same port, the same data
        assert stack.supervision.services["redis"].restarts == 1
    finally:
        stack.stop()
    assert not redis_answers(url)
    assert data_dir.is_dir()  # kept for the next `modalmesh up`


def test_a_busy_redis_port_gets_a_free_one(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        stack = Stack(
            Settings(redis_url=f"redis://127.0.0.1:{taken}/2"), log_dir=tmp_path, out=lambda _: None
        )
        assert stack._redis_port() != taken
    remote = Stack(Settings(redis_url="redis://10.1.2.3:6379/0"), log_dir=tmp_path, out=lambda _: None)
    assert remote._redis_port() != 6379 or port_is_free("127.0.0.1", 6379)


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


def wait_until(ok: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _py(tmp_path: Path, name: str, code: str) -> Service:
    return Service(name, [sys.executable, "-c", code], ready=lambda: True, log_path=tmp_path / f"{name}.log")


def _supervised(
    tmp_path: Path, policy: RestartPolicy, *, exit_on_failure: bool = False
) -> tuple[Stack, list[str]]:
    lines: list[str] = []
    stack = Stack(Settings(), log_dir=tmp_path, out=lines.append, exit_on_failure=exit_on_failure)
    stack.supervision = Supervision(policy)
    steady = _py(tmp_path, "steady", "import time; print('up', flush=True); time.sleep(120)")
    crashy = _py(tmp_path, "crashy", "import sys; print('boom: bad config', flush=True); sys.exit(3)")
    for svc in (steady, crashy):
        svc.start(dict(os.environ))
        stack.services.append(svc)
        stack.supervision.add(svc.name, svc.proc.pid)  # type: ignore[union-attr]
        stack.supervision.ready(svc.name)
    return stack, lines


def test_a_crashing_service_is_restarted_with_backoff_then_given_up_on_loudly(tmp_path):
    policy = RestartPolicy(max_restarts=3, window_s=60, backoff_s=0.05, backoff_max_s=0.1)
    stack, lines = _supervised(tmp_path, policy)
    steady_pid = stack.services[0].proc.pid  # type: ignore[union-attr]
    try:
        wait_until(lambda: stack.supervise_once() and stack.supervision.state("crashy") == "given-up", 30)
        out = "\n".join(lines)
        assert out.count("crashy exited unexpectedly (exit code 3); restarting in") == 3
        assert "GIVING UP on crashy: exited (code 3) after 3 restarts within 60s" in out
        assert "boom: bad config" in out  # its log tail is printed
        assert stack.services[0].alive() and stack.services[0].proc.pid == steady_pid  # the rest runs on
        status = stack.supervision.status()
        assert status["status"] == "failed" and status["given_up"] == ["crashy"]
        assert status["services"]["crashy"]["restarts"] == 3
        assert status["services"]["steady"] == {
            **status["services"]["steady"],
            "state": "running",
            "restarts": 0,
        }
        for _ in range(5):  # nothing more happens to a given-up service
            assert stack.supervise_once()
        assert stack.supervision.services["crashy"].restarts == 3
        from prometheus_client import generate_latest

        text = generate_latest(stack.supervision.registry).decode()
        assert 'modalmesh_supervisor_restarts_total{service="crashy"} 3.0' in text
        assert 'modalmesh_supervisor_give_ups_total{service="crashy"} 1.0' in text
        assert 'modalmesh_supervisor_restarts_total{service="steady"} 0.0' in text
        assert 'modalmesh_supervisor_service_up{service="steady"} 1.0' in text
        assert 'modalmesh_supervisor_service_up{service="crashy"} 0.0' in text
    finally:
        stack.stop()


def test_exit_on_failure_stops_at_the_first_exit(tmp_path):
    stack, lines = _supervised(tmp_path, RestartPolicy(), exit_on_failure=True)
    try:
        wait_until(lambda: not stack.supervise_once(), 30)
        assert any("crashy exited unexpectedly (exit code 3); last log lines:" in line for line in lines)
        assert stack.supervision.services["crashy"].restarts == 0
    finally:
        stack.stop()


def test_the_backoff_doubles_to_its_cap_and_resets_after_a_stable_run():
    policy = RestartPolicy(backoff_s=0.5, backoff_max_s=4, reset_after_s=0.05)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5, 6)] == [0.5, 1, 2, 4, 4, 4]
    sup = Supervision(policy)
    sup.add("x", pid=1)
    sup.ready("x")
    assert sup.exited("x", 1) == 0.5
    sup.restarted("x", pid=2)
    assert sup.exited("x", 1) == 1.0  # crashed again before it got healthy
    sup.restarted("x", pid=3)
    sup.ready("x")
    time.sleep(0.1)
    sup.stable("x")  # healthy for longer than reset_after_s: the streak is forgotten
    assert sup.exited("x", 1) == 0.5


def test_restart_counts_only_within_the_window():
    sup = Supervision(RestartPolicy(max_restarts=2, window_s=0.2, backoff_s=0))
    sup.add("x", pid=1)
    for pid in (2, 3):
        assert sup.exited("x", 1) is not None
        sup.restarted("x", pid=pid)
    time.sleep(0.3)  # the two restarts fall out of the window
    assert sup.exited("x", 1) is not None
    sup.restarted("x", pid=4)
    assert sup.exited("x", 1) is not None
    sup.restarted("x", pid=5)
    assert sup.exited("x", 1) is None  # two restarts within 0.2 s: given up


def test_the_status_server_serves_metrics_and_status():
    import json
    import urllib.error
    import urllib.request

    from modalmesh.supervise import StatusServer

    sup = Supervision(RestartPolicy())
    sup.add("llm", pid=42)
    server = StatusServer(sup, "127.0.0.1", 0)
    server.start()
    try:
        status = json.loads(urllib.request.urlopen(f"{server.url}/status", timeout=5).read())
        assert status["status"] == "recovering" and status["services"]["llm"]["state"] == "starting"
        assert status["services"]["llm"]["pid"] == 42
        text = urllib.request.urlopen(f"{server.url}/metrics", timeout=5).read().decode()
        assert 'modalmesh_supervisor_restarts_total{service="llm"} 0.0' in text
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{server.url}/nope", timeout=5)
        assert e.value.code == 404
    finally:
        server.stop()


def test_supervisor_port_in_use_is_named(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        stack = Stack(Settings(supervisor_port=port), log_dir=tmp_path, out=lambda _: None)
        with pytest.raises(
            StackError, match=rf"{port} for modalmesh up's /metrics and /status \(--supervisor-port"
        ):
            stack._check_ports()
