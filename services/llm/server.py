"""Assembling and running the LLM gRPC server: engine -> servicer -> GrpcServer.

`build_server` wires an existing engine into a server (tests use it in-process);
`serve` loads the preset's model, serves until SIGTERM/SIGINT, drains, and closes the engine.
"""

from __future__ import annotations

import asyncio
import logging

from modalmesh.v1 import llm_pb2, llm_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.common.presets import Preset
from services.common.settings import Settings
from services.llm.domain import GenerationEngine
from services.llm.engine import Engine
from services.llm.servicer import LLMServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LLM"].full_name


def build_server(engine: GenerationEngine, settings: Settings) -> GrpcServer:
    """A GrpcServer (health, reflection, raised limits) hosting `modalmesh.v1.LLM` over `engine`."""
    server = GrpcServer(settings, service_names=[SERVICE_NAME])
    llm_pb2_grpc.add_LLMServicer_to_server(LLMServicer(engine), server.server)
    return server


async def serve(preset: Preset, settings: Settings, *, host: str, port: int) -> None:
    """Load the preset, serve on host:port until SIGTERM/SIGINT, then drain and close.

    Health reports NOT_SERVING until the engine's warm-up generation has run.
    """
    engine = await asyncio.to_thread(Engine.from_preset, preset)
    try:
        server = build_server(engine, settings)
        bound = server.bind(host, port)
        logger.info(
            "LLM service for preset %s (adapter %s) listening on %s:%s",
            preset.name,
            engine.info().adapter,
            host,
            bound,
        )
        await server.serve(warmup=engine.warmup)
    finally:
        await asyncio.to_thread(engine.close)
