"""Run the gateway: `python -m gateway [--preset NAME] [--host H] [--http-port N] ...`.

The REST app (uvicorn) and the gRPC Chat server (with health and reflection) run in one asyncio
loop over one ChatService. Flags override the MODALMESH_* settings. SIGTERM or SIGINT drains
both servers (up to settings.drain_seconds), closes the clients and exits 0. Only the preset's
YAML is read; the model weights belong to the encoder and LLM services.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import sys
from collections.abc import Callable, Iterator, Sequence

import uvicorn
from pydantic import ValidationError

from gateway.auth import Guard
from gateway.grpc_chat import CHAT_SERVICE_NAME, ChatServicer
from gateway.http_app import create_app
from gateway.serving import ChatService
from gateway.training import training_client
from modalmesh.v1 import chat_pb2_grpc
from services.common.errors import ModalmeshError
from services.common.grpc_server import GrpcServer
from services.common.log import setup_logging
from services.common.presets import Preset, load_preset
from services.common.settings import Settings

logger = logging.getLogger("gateway")

ServiceFactory = Callable[[Settings, Preset], ChatService]

# flag -> Settings field
_FLAGS = {
    "preset": "preset",
    "host": "host",
    "http_port": "gateway_http_port",
    "grpc_port": "gateway_grpc_port",
    "llm_address": "llm_address",
    "encoder_address": "encoder_address",
    "redis_url": "redis_url",
    "log_level": "log_level",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; every flag defaults to the MODALMESH_* setting."""
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__.splitlines()[0])
    p.add_argument("--preset", help="preset name or YAML path (MODALMESH_PRESET)")
    p.add_argument("--host", help="address to bind (MODALMESH_HOST)")
    p.add_argument("--http-port", type=int, help="REST port (MODALMESH_GATEWAY_HTTP_PORT)")
    p.add_argument("--grpc-port", type=int, help="gRPC Chat port (MODALMESH_GATEWAY_GRPC_PORT)")
    p.add_argument("--llm-address", help="host:port of the LLM service (MODALMESH_LLM_ADDRESS)")
    p.add_argument(
        "--encoder-address",
        help="the encoders' KServe v2 gRPC: host:port, a comma-separated list of replicas, or "
        "dns:name:port (MODALMESH_ENCODER_ADDRESS)",
    )
    p.add_argument("--redis-url", help="Redis of the feature cache and training jobs (MODALMESH_REDIS_URL)")
    p.add_argument("--log-level", help="DEBUG, INFO, ... (MODALMESH_LOG_LEVEL)")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings() from the environment, with the given flags on top."""
    overrides = {
        field: getattr(args, flag) for flag, field in _FLAGS.items() if getattr(args, flag) is not None
    }
    return Settings(**overrides)


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway's main loop owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _http_server(settings: Settings, service: ChatService, guard: Guard) -> _HttpServer:
    config = uvicorn.Config(
        create_app(service, training=training_client(settings), guard=guard),
        host=settings.host,
        port=settings.gateway_http_port,
        log_config=None,
        lifespan="off",
        timeout_graceful_shutdown=math.ceil(settings.drain_seconds),
    )
    return _HttpServer(config)


def _grpc_server(settings: Settings, service: ChatService, guard: Guard) -> tuple[GrpcServer, int]:
    server = GrpcServer(settings, service_names=[CHAT_SERVICE_NAME])
    chat_pb2_grpc.add_ChatServicer_to_server(ChatServicer(service, guard), server.server)
    return server, server.bind(settings.host, settings.gateway_grpc_port)


async def _wait_started(http: _HttpServer, task: asyncio.Task[None]) -> int | None:
    while not http.started and not task.done():
        await asyncio.sleep(0.02)
    if not http.started:
        return None
    return int(http.servers[0].sockets[0].getsockname()[1])


async def serve(
    settings: Settings,
    *,
    make_service: ServiceFactory = ChatService.from_settings,
    ready: asyncio.Event | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status.

    Args:
        settings: Addresses, ports and limits.
        make_service: Builds the ChatService (tests pass one with stand-in clients).
        ready: Set once both servers listen (for in-process callers).
    """
    preset = load_preset(settings.preset, cache_dir=settings.cache_dir, presets_dir=settings.presets_dir)
    service = make_service(settings, preset)
    guard = Guard.from_settings(settings)  # one set of keys and per-key limits for REST and gRPC
    grpc_server, grpc_port = _grpc_server(settings, service, guard)
    http = _http_server(settings, service, guard)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve())
    status = 0
    try:
        http_port = await _wait_started(http, http_task)
        if http_port is None:
            logger.error("the HTTP server did not start on %s:%d", settings.host, settings.gateway_http_port)
            status = 1
        else:
            logger.info(
                "gateway serving %s: http %s:%d, grpc %s:%d, llm %s, encoders %s",
                preset.name,
                settings.host,
                http_port,
                settings.host,
                grpc_port,
                settings.llm_target(),
                settings.encoder_target(),
            )
            if ready is not None:
                ready.set()
            stop_task = asyncio.create_task(stop.wait())
            await asyncio.wait({stop_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
            stop_task.cancel()
            logger.info("draining for up to %.1fs", settings.drain_seconds)
    finally:
        http.should_exit = True
        await asyncio.gather(grpc_server.stop(), http_task, return_exceptions=True)
        await service.aclose()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        logger.info("stopped")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m gateway`."""
    try:
        settings = settings_from_args(parse_args(argv))
    except ValidationError as e:  # a bad setting or flag, e.g. a bad replica address: named, no traceback
        for error in e.errors():
            sys.stderr.write(f"python -m gateway: {str(error['msg']).removeprefix('Value error, ')}\n")
        return 2
    setup_logging("gateway", level=settings.log_level, json_lines=settings.log_json)
    try:
        return asyncio.run(serve(settings))
    except ModalmeshError as e:
        logger.error("cannot start: %s", e.message)
        return 2


if __name__ == "__main__":
    sys.exit(main())
