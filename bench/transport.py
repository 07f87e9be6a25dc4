"""Feature transport: MB/s of a MediaFeatures message over a real grpc.aio pair vs an in-process copy.

The client builds `MediaFeatures` from a torch tensor (`torch_to_tensor`, as the gateway
builds them from encoder output), sends it over loopback to a grpc.aio server with the
service's message limits, and the server decodes it with `tensor_to_torch` (as the LLM
servicer does) and answers with an empty Tensor. The baseline is `Tensor.clone()` of the same
tensor in one process: what a monolith pays to hand features over.

For the largest size a second figure sends the same bytes as a bare bytes message (no
protobuf build, parse or tensor decode): the floor that gRPC over loopback TCP itself sets,
so the table shows how much of the gap is the codec and how much the transport.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import torch

from bench._config import BenchConfig
from bench._report import Figure, median
from modalmesh.v1 import llm_pb2, tensor_pb2
from services.common.settings import Settings
from services.common.tensor_codec import tensor_to_torch, torch_tensor_fields

METHOD = "/modalmesh.bench.Transport/Send"
RAW_METHOD = "/modalmesh.bench.Transport/Raw"
# (name, rows, dim, dtype): LLaVA-1.5's 576 CLIP-L/336 tokens at a 7B LLM's width in FP16 (what
# a GPU encoder sends), the same FP32 at CLIP-L's own width, and the tiny preset's item.
SIZES: tuple[tuple[str, int, int, torch.dtype], ...] = (
    ("576x4096 fp16", 576, 4096, torch.float16),
    ("576x1024 fp32", 576, 1024, torch.float32),
    ("16x64 fp32", 16, 64, torch.float32),
)


async def _serve(settings: Settings) -> tuple[grpc.aio.Server, str]:
    async def send(request: llm_pb2.MediaFeatures, context: grpc.aio.ServicerContext) -> tensor_pb2.Tensor:
        features = tensor_to_torch(request.features, what="features")  # (rows, dim), one copy
        return tensor_pb2.Tensor(dtype=request.features.dtype, shape=list(features.shape))

    async def raw(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return len(request).to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler(
        "modalmesh.bench.Transport",
        {
            "Send": grpc.unary_unary_rpc_method_handler(
                send,
                request_deserializer=llm_pb2.MediaFeatures.FromString,
                response_serializer=tensor_pb2.Tensor.SerializeToString,
            ),
            "Raw": grpc.unary_unary_rpc_method_handler(raw),  # bytes in, bytes out
        },
    )
    server = grpc.aio.server(options=settings.grpc_options())
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _grpc_seconds(features: torch.Tensor, reps: int, warmup: int, *, raw: bool = False) -> float:
    settings = Settings()
    server, target = await _serve(settings)
    payload = features.contiguous().view(torch.uint8).numpy().tobytes()
    try:
        async with grpc.aio.insecure_channel(target, options=settings.grpc_options()) as channel:
            if raw:
                send_raw = channel.unary_unary(RAW_METHOD)
            else:
                send = channel.unary_unary(
                    METHOD,
                    request_serializer=llm_pb2.MediaFeatures.SerializeToString,
                    response_deserializer=tensor_pb2.Tensor.FromString,
                )
            times = []
            for i in range(warmup + reps):
                start = time.perf_counter()
                if raw:
                    await send_raw(payload)
                else:  # built as the gateway builds it: the tensor's fields in place
                    await send(
                        llm_pb2.MediaFeatures(modality="image", features=torch_tensor_fields(features))
                    )
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            return median(times)
    finally:
        await server.stop(None)


def _copy_seconds(features: torch.Tensor, reps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + reps):
        start = time.perf_counter()
        features.clone()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return median(times)


def transport(cfg: BenchConfig) -> list[Figure]:
    """MB/s (10^6 bytes) per size: gRPC send + decode vs in-process copy."""
    figures = []
    for name, rows, dim, dtype in SIZES:
        features = torch.randn(rows, dim).to(dtype)  # (rows, dim)
        mb = features.numel() * features.element_size() / 1e6
        grpc_s = asyncio.run(_grpc_seconds(features, cfg.transport_reps, cfg.warmup))
        copy_s = _copy_seconds(features, cfg.transport_reps, cfg.warmup)
        note = f"{mb:.3f} MB per item; median of {cfg.transport_reps}; baseline = in-process clone()"
        figures.append(Figure(f"MB/s {name}", mb / grpc_s, mb / copy_s, "MB/s", "higher", note))
    name, rows, dim, dtype = SIZES[0]
    features = torch.randn(rows, dim).to(dtype)
    mb = features.numel() * features.element_size() / 1e6
    raw_s = asyncio.run(_grpc_seconds(features, cfg.transport_reps, cfg.warmup, raw=True))
    copy_s = _copy_seconds(features, cfg.transport_reps, cfg.warmup)
    note = "the same bytes as a bare bytes message: gRPC over loopback alone, no codec"
    figures.append(Figure(f"MB/s {name} bytes only", mb / raw_s, mb / copy_s, "MB/s", "higher", note))
    return figures
