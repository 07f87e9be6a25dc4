"""gRPC server bootstrap shared by the services: health, reflection, limits, graceful drain.

A service builds its servicers, then:

    server = GrpcServer(settings, service_names=[llm_pb2.DESCRIPTOR.services_by_name["LLM"].full_name])
    llm_pb2_grpc.add_LLMServicer_to_server(servicer, server.server)
    port = server.bind(settings.host, settings.llm_port)
    await server.serve(warmup=engine.warmup)   # returns after SIGTERM/SIGINT and the drain

The standard health service reports NOT_SERVING until `warmup` has run, SERVING while it
serves, and NOT_SERVING again as soon as the drain begins. Reflection lists every service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common.settings import Settings

logger = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcServer:
    """A grpc.aio server with raised message limits, the health service and reflection.

    Args:
        settings: Supplies the message limits and the drain time.
        service_names: Full names of the services this server hosts (for health and reflection).
    """

    def __init__(self, settings: Settings, *, service_names: Sequence[str]) -> None:
        self.settings = settings
        self.service_names = list(service_names)
        self.server = grpc.aio.server(options=settings.grpc_options())
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [
                *self.service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        self._stop = asyncio.Event()

    def bind(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port); returns the bound port."""
        try:
            bound = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:  # grpcio's way of saying the bind failed
            raise OSError(f"could not bind gRPC server to {host}:{port} (in use?): {e}") from e
        if bound == 0:
            raise OSError(f"could not bind gRPC server to {host}:{port}")
        return bound

    async def set_serving(self, serving: bool) -> None:
        """Report every hosted service (and the server as a whole, "") as SERVING or not."""
        status = _SERVING if serving else _NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def start(self, warmup: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start listening (NOT_SERVING), run `warmup`, then report SERVING."""
        await self.set_serving(False)
        await self.server.start()
        if warmup is not None:
            await warmup()
        await self.set_serving(True)

    def request_stop(self) -> None:
        """Begin the drain (what SIGTERM does)."""
        self._stop.set()

    async def stop(self) -> None:
        """Report NOT_SERVING, stop accepting calls, let calls in flight finish within the drain time."""
        await self.set_serving(False)
        await self.server.stop(self.settings.drain_seconds)

    async def serve(self, warmup: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start, serve until SIGTERM or SIGINT, then drain and return."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        await self.start(warmup)
        logger.info("serving %s", ", ".join(self.service_names))
        await self._stop.wait()
        logger.info("draining for up to %.1fs", self.settings.drain_seconds)
        await self.stop()
        logger.info("stopped")
