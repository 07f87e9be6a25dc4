"""Assembling and running the LLM gRPC server: engine -> servicer -> GrpcServer.

`build_server` wires an existing engine into a server (tests use it in-process);
`serve` loads the preset's model, catches up with the adapter registry in Redis (if it
answers), follows its events while serving until SIGTERM/SIGINT, drains, and closes the engine.
"""

from __future__ import annotations

import asyncio
import logging

from modalmesh.v1 import llm_pb2, llm_pb2_grpc
from services.common.adapter_registry import AdapterRegistry
from services.common.grpc_server import GrpcServer
from services.common.presets import Preset
from services.common.settings import Settings
from services.llm.adapter_sync import AdapterSync
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

    Health reports NOT_SERVING until the engine's warm-up generation has run and the
    registry's current adapter version (if Redis answers) is loaded.
    """
    engine = await asyncio.to_thread(
        Engine.from_preset,
        preset,
        max_loaded_adapters=settings.max_loaded_adapters,
        max_queued=settings.llm_max_queued,
        max_batch_size=settings.llm_max_batch_size,
        max_prefill_tokens=settings.llm_max_prefill_tokens,
        default_max_tokens=settings.default_max_tokens,
    )
    sync = AdapterSync(engine.adapters, AdapterRegistry.from_url(settings.redis_url, timeout_s=2.0))
    try:
        await asyncio.to_thread(sync.initial_sync)
        engine.adapters.catalog = sync.catalog
        sync.start()
        server = build_server(engine, settings)
        bound = server.bind(host, port)
        if settings.llm_metrics_port:
            try:
                engine.metrics.serve(host, settings.llm_metrics_port)
                logger.info("metrics on http://%s:%s/metrics", host, settings.llm_metrics_port)
            except OSError as e:  # metrics are not worth refusing to serve over
                logger.warning("metrics port %s: %s; serving without /metrics", settings.llm_metrics_port, e)
        logger.info(
            "LLM service for preset %s (adapter %s) listening on %s:%s",
            preset.name,
            engine.info().adapter,
            host,
            bound,
        )
        await server.serve(warmup=engine.warmup)
    finally:
        await asyncio.to_thread(sync.stop)
        await asyncio.to_thread(engine.close)
