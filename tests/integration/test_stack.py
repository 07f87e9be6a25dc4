"""`modalmesh up` as a user runs it: starts Redis and every service, answers, stops cleanly."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modalmesh.demo import demo_image_png
from tests.helpers.procs import command_line, descendants, free_port, pid_alive
from tests.helpers.up import UpProcess

pytestmark = pytest.mark.integration


def _up_args(cache_dir: Path, log_dir: Path) -> tuple[list[str], dict[str, int]]:
    ports = {
        flag: free_port()
        for flag in (
            "--gateway-port",
            "--grpc-port",
            "--llm-port",
            "--llm-metrics-port",
            "--encoder-http-port",
            "--encoder-grpc-port",
            "--encoder-metrics-port",
            "--supervisor-port",
        )
    }
    nobody = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: `up` must start redis-server
    args = ["--cache-dir", str(cache_dir), "--log-dir", str(log_dir), "--redis-url", nobody]
    for flag, port in ports.items():
        args += [flag, str(port)]
    return args, ports


def test_up_starts_redis_and_every_service_answers_then_stops_cleanly(tiny_cache_dir, tmp_path):
    from openai import OpenAI

    args, ports = _up_args(tiny_cache_dir, tmp_path / "logs")
    t0 = time.perf_counter()
    up = UpProcess(args, dict(os.environ))
    try:
        up.wait_for("Press Ctrl-C to stop.", timeout=240)
        out = "\n".join(up.lines)
        assert "started redis-server at redis://127.0.0.1:" in out
        assert f"http://127.0.0.1:{ports['--gateway-port']}/v1" in out
        assert f"127.0.0.1:{ports['--grpc-port']}  (modalmesh.v1.Chat)" in out
        children = descendants(up.proc.pid)
        assert len(children) >= 4  # redis, encoders (+ tritonserver), llm, gateway

        client = OpenAI(base_url=f"http://127.0.0.1:{ports['--gateway-port']}/v1", api_key="x", max_retries=0)
        url = "data:image/png;base64," + base64.b64encode(demo_image_png()).decode()
        reply = client.chat.completions.create(
            model="tiny",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "What is in the picture?"},
                    ],
                }
            ],
            max_tokens=8,
            temperature=0,
        )
        first_answer_s = time.perf_counter() - t0
        assert reply.choices[0].finish_reason in {"stop", "length"}
        assert reply.usage.prompt_tokens > 16  # the image alone expands to 16 placeholder tokens
        print(f"seconds from `modalmesh up` to the first answer: {first_answer_s:.1f}")

        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(90) == 0
        out = up.drain()
        for name in ("gateway", "llm", "encoders", "redis"):
            assert f"stopped {name} (exit code" in out
        assert {p for p in children if pid_alive(p)} == set(), (
            f"left behind: {[p for p in children if pid_alive(p)]}"
        )
        for name in ("encoders", "llm", "gateway"):
            assert (tmp_path / "logs" / f"{name}.log").stat().st_size > 0
    finally:
        up.kill()


def test_up_with_exit_on_failure_stops_the_rest_when_a_service_dies(tiny_cache_dir, tmp_path):
    """`--exit-on-failure` (CI-like use): the first exit stops the stack, exit code 1. Without it
    the service is restarted (tests/reliability/test_supervised_up.py)."""
    args, _ports = _up_args(tiny_cache_dir, tmp_path / "logs")
    up = UpProcess([*args, "--exit-on-failure"], dict(os.environ))
    try:
        up.wait_for("Press Ctrl-C to stop.", timeout=240)
        children = descendants(up.proc.pid)
        llm = [p for p in children if "services.llm" in command_line(p)]
        assert len(llm) == 1
        os.kill(llm[0], signal.SIGKILL)
        assert up.proc.wait(90) == 1
        out = up.drain()
        assert "llm exited unexpectedly" in out
        assert {p for p in children if pid_alive(p)} == set()
    finally:
        up.kill()


def test_up_refuses_ports_in_use_and_names_them(tiny_cache_dir, tmp_path):
    import socket

    args, ports = _up_args(tiny_cache_dir, tmp_path / "logs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports["--llm-port"]))
        s.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "modalmesh", "up", *args],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    assert proc.returncode == 1
    assert f"ports already in use on 127.0.0.1: {ports['--llm-port']} for LLM (--llm-port" in proc.stderr
