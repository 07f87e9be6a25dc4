"""The Triton service shell shared by the encoders and the decoders: the command line of both
services, the serve loop's exit codes (with a stand-in for the Triton server, so no Triton
starts), request ids and the per-request split of a batch."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from pytriton.proxy.types import Request

from services.common.log import request_id_var
from services.common.settings import Settings
from services.common.triton_service import (
    PortFields,
    TritonService,
    load_entry_point,
    request_id,
    respond_per_request,
    serve_triton,
)
from services.decoders.__main__ import SERVICE as DECODERS
from services.encoders.__main__ import SERVICE as ENCODERS

ROOT = Path(__file__).resolve().parents[4]


@pytest.mark.parametrize(
    ("service", "prefix"),
    [(ENCODERS, "MODALMESH_ENCODER"), (DECODERS, "MODALMESH_DECODER")],
    ids=["enc", "dec"],
)
def test_both_services_take_the_same_flags_over_their_own_settings(
    service: TritonService, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{prefix}_HTTP_PORT", "9100")
    monkeypatch.setenv(f"{prefix}_GRPC_PORT", "9101")
    args = service.parse_args(["--grpc-port", "7001", "--metrics-port", "7002", "--host", "0.0.0.0"])
    settings = Settings(**{k: v for k, v in vars(args).items() if v is not None})
    assert service.ports.of(settings) == (9100, 7001, 7002)
    assert settings.host == "0.0.0.0"
    assert service.logger.name == f"services.{service.name}"


def test_port_fields_must_name_settings() -> None:
    assert PortFields.named("decoder").all() == (
        "decoder_http_port",
        "decoder_grpc_port",
        "decoder_metrics_port",
    )
    with pytest.raises(ValueError, match="Settings has no thermal_http_port"):
        PortFields.named("thermal")


class FakeServer:
    """Stands in for a TritonServer: records the calls, can fail to start, die or be signalled."""

    def __init__(self, *, fail: bool = False, lives: int = 10**9, signal_on_start: bool = False) -> None:
        self.calls: list[str] = []
        self.fail, self.lives, self.signal_on_start = fail, lives, signal_on_start

    def start(self) -> None:
        self.calls.append("start")
        if self.fail:
            raise RuntimeError("port taken")
        if self.signal_on_start:
            os.kill(os.getpid(), signal.SIGTERM)

    def is_alive(self) -> bool:
        self.lives -= 1
        return self.lives >= 0

    def stop(self) -> None:
        self.calls.append("stop")


def _serve(server: FakeServer, settings: Settings) -> int:
    return serve_triton(settings, "encoders", lambda _preset: server, logging.getLogger("test"))


@pytest.fixture
def tiny(tiny_cache_dir: Path) -> Settings:
    return Settings(preset="tiny", cache_dir=tiny_cache_dir)


def test_a_preset_that_does_not_load_exits_2_without_building(tmp_path: Path) -> None:
    built: list[object] = []

    def build(preset: object) -> FakeServer:
        built.append(preset)
        return FakeServer()

    settings = Settings(preset=str(tmp_path / "missing.yaml"), cache_dir=tmp_path)
    assert serve_triton(settings, "encoders", build, logging.getLogger("test")) == 2
    assert built == []


def test_triton_failing_to_start_exits_1_and_stops(tiny: Settings) -> None:
    server = FakeServer(fail=True)
    assert _serve(server, tiny) == 1
    assert server.calls == ["start", "stop"]


def test_triton_dying_on_its_own_exits_1_and_stops(tiny: Settings) -> None:
    server = FakeServer(lives=1)
    assert _serve(server, tiny) == 1
    assert server.calls == ["start", "stop"]


def test_a_stop_signal_exits_0_stops_and_restores_the_handler(tiny: Settings) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    server = FakeServer(signal_on_start=True)
    assert _serve(server, tiny) == 0
    assert server.calls == ["start", "stop"]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_batch_is_split_back_per_request_with_its_request_id() -> None:
    requests = [
        Request(data={}, parameters={"x-request-id": "a"}),
        Request(data={}, parameters={}),
        Request(data={}, parameters={"x-request-id": "c"}),
    ]
    assert [request_id(r) for r in requests] == ["a", None, "c"]
    seen: list[tuple[int, str | None]] = []

    def respond(mine: object) -> dict[str, np.ndarray]:
        return {"out": np.array(list(mine))}  # type: ignore[call-overload]

    def log(n: int) -> None:
        seen.append((n, request_id_var.get()))

    out = respond_per_request(requests, [2, 0, 3], [1, 2, 3, 4, 5], respond, log)
    assert [r["out"].tolist() for r in out] == [[1, 2], [], [3, 4, 5]]
    assert seen == [(2, "a"), (0, None), (3, "c")]


def test_each_services_build_entry_point_names_its_server_builder() -> None:
    from services.decoders.server import build_server as decoders_build
    from services.encoders.triton import build_server as encoders_build

    assert load_entry_point(ENCODERS.build) is encoders_build
    assert load_entry_point(DECODERS.build) is decoders_build


def test_the_command_line_loads_no_torch() -> None:
    """`--help` and the flags import the shell only: the models load once the service runs."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from services.encoders.__main__ import parse_args\n"
        "from services.decoders.__main__ import SERVICE\n"
        "parse_args(['--grpc-port', '1']); SERVICE.parse_args([])\n"
        "print(sorted({'torch', 'diffusers', 'pytriton'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("service", [ENCODERS, DECODERS], ids=["enc", "dec"])
def test_python_m_with_a_preset_that_does_not_load_exits_2(service: TritonService, tmp_path: Path) -> None:
    """The whole entry point up to loading, as a user runs it: flags, logging, the start-up
    line, the serve loop's exit code."""
    import subprocess
    import sys

    missing = str(tmp_path / "missing.yaml")
    argv = ["--preset", missing, "--http-port", "1", "--grpc-port", "2", "--metrics-port", "3"]
    done = subprocess.run(
        [sys.executable, "-m", f"services.{service.name}", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=os.environ | {"MODALMESH_LOG_JSON": "false", "MODALMESH_CACHE_DIR": str(tmp_path)},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"starting {service.name}: preset {missing}, host " in done.stderr
    assert "ports http 1 grpc 2 metrics 3" in done.stderr
    assert f"cannot load the {service.name}: preset {missing!r} not found" in done.stderr
