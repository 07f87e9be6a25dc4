"""Stand-ins for the gateway's backends, shared by the gateway tests (imported, not fixtures).

FakeEncoder replaces services.encoders.client.EncoderClient; FakeLLM is a real gRPC servicer
of modalmesh.v1.LLM with a scripted model; MediaHandler serves test media over real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import grpc
import numpy as np
import pytest
import redis

from gateway.serving import ChatService
from modalmesh.v1 import llm_pb2, llm_pb2_grpc
from services.common.content import MediaFeatures, MediaInput, MediaPart, Part, TextPart, TimePart, Turn
from services.common.errors import UnavailableError
from services.common.log import request_id_from_metadata
from services.encoders.client import EncoderItemError
from tests.helpers.media import png_bytes

REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_up() -> bool:
    """Whether the test Redis answers."""
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


needs_redis = pytest.mark.skipif(not redis_up(), reason=f"no Redis at {REDIS_URL}")

ServiceFactory = Callable[..., ChatService]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REFUSED = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once


def turn(role: str, parts: Sequence[str | MediaInput | TimePart]) -> Turn[MediaInput]:
    """A turn from short forms: a string is a text part, a MediaInput a media part."""
    out: list[Part[MediaInput]] = []
    for p in parts:
        out.append(TextPart(p) if isinstance(p, str) else MediaPart(p) if isinstance(p, MediaInput) else p)
    return Turn(role, tuple(out))


def sent_media(request: llm_pb2.GenerateRequest) -> list[llm_pb2.MediaFeatures]:
    """The media items a GenerateRequest carries, in the order their parts appear."""
    return [p.media for t in request.turns for p in t.parts if p.WhichOneof("part") == "media"]


class FakeEncoder:
    """Stands in for services.encoders.client.EncoderClient: PNG in, (16, 64) float32 per frame
    out, one frame at 0.0 s unless `times` names a modality's frame times; other bytes are
    refused as the real encoder refuses them."""

    def __init__(self, times: dict[str, list[float]] | None = None) -> None:
        self.calls: list[tuple[str, int, str | None]] = []
        self.modalities: list[str] = []
        self.times = times or {}
        self.down = False
        self.is_ready = True

    async def encode(
        self,
        model: str,
        items: list[bytes],
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
        modality: str = "image",
    ) -> list[MediaFeatures[np.ndarray]]:
        self.calls.append((model, len(items), request_id))
        self.modalities.append(modality)
        if self.down:
            raise UnavailableError("the encoder service is unavailable at fake: down")
        out = []
        for i, data in enumerate(items):
            if not data.startswith(PNG_MAGIC):
                raise EncoderItemError(f"{modality} {i}: not an image: cannot identify image file", index=i)
            seed = int.from_bytes(hashlib.sha256(data).digest()[:4], "little")
            times = np.array(self.times.get(modality, [0.0]), dtype=np.float32)  # (F,)
            features = np.random.default_rng(seed).standard_normal((16 * len(times), 64))
            out.append(MediaFeatures(modality, features.astype(np.float32), tuple(times.tolist())))
        return out

    async def ready(self, model: str) -> bool:
        return self.is_ready

    async def close(self) -> None:
        pass


@dataclass
class FakeLLM(llm_pb2_grpc.LLMServicer):
    """A scripted LLM service: answers `pieces`, one chunk each, then STOP with usage."""

    pieces: list[str] = field(default_factory=lambda: ["Hello", " there", "!"])
    delay_s: float = 0.0
    fail_with: grpc.StatusCode | None = None
    requests: list[llm_pb2.GenerateRequest] = field(default_factory=list)
    request_ids: list[str | None] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    info_fails: bool = False
    fail_after: int | None = None  # abort with INTERNAL after this many chunks
    timestamps: dict[int, list[llm_pb2.Timestamp]] = field(default_factory=dict)  # by piece index
    stop_token_id: int | None = None  # the last chunk says this stop token id ended the reply
    sampling_defaults: llm_pb2.SamplingParams | None = None  # ModelInfo's

    async def Generate(
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        self.requests.append(request)
        self.request_ids.append(request_id_from_metadata(context.invocation_metadata()))
        if self.fail_with is not None:
            await context.abort(self.fail_with, f"scripted failure {self.fail_with.name}")
        adapter = request.adapter or "tiny@1"
        try:
            for i, piece in enumerate(self.pieces[:-1]):
                if i == self.fail_after:
                    await context.abort(grpc.StatusCode.INTERNAL, "scripted failure mid-stream")
                await asyncio.sleep(self.delay_s)
                yield llm_pb2.GenerateChunk(
                    text=piece, adapter=adapter if i == 0 else "", timestamps=self.timestamps.get(i, [])
                )
            await asyncio.sleep(self.delay_s)
            yield llm_pb2.GenerateChunk(
                text=self.pieces[-1],
                timestamps=self.timestamps.get(len(self.pieces) - 1, []),
                finish_reason=llm_pb2.FINISH_REASON_STOP,
                usage=llm_pb2.Usage(
                    prompt_tokens=10 + 16 * len(sent_media(request)), completion_tokens=len(self.pieces)
                ),
                stop_token_id=self.stop_token_id,
            )
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def GetModelInfo(
        self, request: llm_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llm_pb2.ModelInfo:
        if self.info_fails:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
        return llm_pb2.ModelInfo(
            preset="tiny",
            adapter="tiny@2",
            adapters=["tiny@1", "tiny@2"],
            max_context_tokens=1024,
            created=1700000000,
            sampling_defaults=self.sampling_defaults,
        )


# ---- a real local HTTP server for media fetching ------------------------------------------

PNG = png_bytes(32, 32, seed=1)


class MediaHandler(BaseHTTPRequestHandler):
    """/cat.png, /slow (trickles 1 byte per 0.3 s), /huge (no length), /huge-declared, 404s."""

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _head(self, status: int, length: int | None = None, ctype: str = "image/png") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def do_GET(self) -> None:
        # The gateway hangs up on purpose on /slow and /huge (deadline, byte cap).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._answer(self.path.split("?")[0])

    def _answer(self, path: str) -> None:
        if path == "/cat.png":
            self._head(200, len(PNG))
            self.wfile.write(PNG)
        elif path == "/slow":
            self._head(200, 100)
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.3)
        elif path == "/huge":
            self._head(200)  # no Content-Length: the cap must hold while streaming
            block = b"\0" * 16384
            for _ in range(64):  # 1 MiB
                self.wfile.write(block)
        elif path == "/huge-declared":
            self._head(200, 10 * 1024 * 1024)
            self.wfile.write(b"\0" * 1024)
        elif path == "/empty":
            self._head(200, 0)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._head(404, 9, "text/plain")
            self.wfile.write(b"not found")
