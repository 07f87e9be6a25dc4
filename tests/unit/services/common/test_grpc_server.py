"""The shared gRPC bootstrap: health follows the lifecycle, reflection lists services,
message limits are raised, and a drain lets a call in flight finish."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.grpc_server import GrpcServer
from services.common.settings import Settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(channel, service=""):
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


async def test_health_is_not_serving_until_warmup_then_serving_then_not_serving_on_drain():
    server = GrpcServer(Settings(drain_seconds=1.0), service_names=["test.Svc"])
    port = server.bind("127.0.0.1", 0)
    seen_during_warmup = []

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

        async def warmup():
            seen_during_warmup.append(await _health(channel, "test.Svc"))

        await server.start(warmup)
        assert seen_during_warmup == [NOT_SERVING]
        assert await _health(channel) == SERVING
        assert await _health(channel, "test.Svc") == SERVING
        await server.set_serving(False)
        assert await _health(channel, "test.Svc") == NOT_SERVING
    await server.stop()


async def test_reflection_lists_hosted_services_and_health():
    server = GrpcServer(Settings(drain_seconds=0.5), service_names=["test.Svc"])
    port = server.bind("127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            reply = await call.read()
            names = {s.name for s in reply.list_services_response.service}
            call.cancel()
        assert {"test.Svc", "grpc.health.v1.Health"} <= names
    finally:
        await server.stop()


async def test_message_limit_is_raised_past_grpc_default_4mib():
    big = b"x" * (6 * 1024 * 1024)
    settings = Settings(drain_seconds=0.5)

    async def echo(request: bytes, context) -> bytes:
        return request

    server = GrpcServer(settings, service_names=["test.Echo"])
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.server.add_generic_rpc_handlers((handler,))
    port = server.bind("127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=settings.grpc_options()) as ch:
            reply = await ch.unary_unary("/test.Echo/Echo")(big)
        assert len(reply) == len(big)
    finally:
        await server.stop()


async def test_drain_lets_a_call_in_flight_finish():
    started = asyncio.Event()

    async def slow(request: bytes, context) -> bytes:
        started.set()
        await asyncio.sleep(0.5)
        return b"done"

    server = GrpcServer(Settings(drain_seconds=5.0), service_names=["test.Slow"])
    server.server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Slow", {"Slow": grpc.unary_unary_rpc_method_handler(slow)}
            ),
        )
    )
    port = server.bind("127.0.0.1", 0)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary("/test.Slow/Slow")(b"")
        await started.wait()
        stopping = asyncio.create_task(server.stop())
        assert await call == b"done"
        await stopping


async def test_bind_reports_a_port_in_use():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = GrpcServer(Settings(), service_names=[])
        with pytest.raises(OSError, match=f"could not bind gRPC server to 127.0.0.1:{port}"):
            server.bind("127.0.0.1", port)
