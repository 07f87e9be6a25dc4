"""End to end through the gateway: the real encoder service, LLM service and gateway processes.

One stack per module (tiny preset, generated once per session): the `openai` client (plain and
streaming with usage), the gRPC Chat API, every bad input of the issue list (each a 4xx OpenAI
error that says what was expected, and the next good request still succeeds), the feature
cache, adapter pins, and a SIGTERM drain of a gateway with a reply in flight.
"""

from __future__ import annotations

import base64
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis
from openai import OpenAI

from modalmesh.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers.media import encode_image, png_bytes, random_image
from tests.helpers.procs import Process, free_port, free_ports, stop_all, wait_until
from tests.helpers.services import gateway_healthy, start_encoders, start_gateway, start_llm

pytestmark = pytest.mark.integration

MEDIA_LIMIT = 256 * 1024
REDIS_URL = "redis://127.0.0.1:6379/15"  # a db of its own; its feature keys are deleted after


@dataclass
class Stack:
    base_url: str
    grpc_address: str
    env: dict[str, str]
    gateway: Process
    llm_address: str
    encoder_address: str


def _healthy(url: str) -> bool:
    return gateway_healthy(url)


def _gateway(
    env: dict[str, str], log_dir: Path, name: str, ports: tuple[int, int] | None = None
) -> tuple[Process, str, str]:
    return start_gateway(env, log_dir / f"{name}.log", ports=ports)


@pytest.fixture(scope="module")
def stack(tiny_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Encoders, LLM and gateway on free ports, healthy."""
    logs = tmp_path_factory.mktemp("gateway-e2e-logs")
    enc_http, enc_grpc, enc_metrics, llm_port, gw_http, gw_grpc = free_ports(6)
    env = {
        "MODALMESH_CACHE_DIR": str(tiny_cache_dir),
        "MODALMESH_LOG_JSON": "true",
        "MODALMESH_LLM_ADDRESS": f"127.0.0.1:{llm_port}",
        "MODALMESH_ENCODER_ADDRESS": f"127.0.0.1:{enc_grpc}",
        "MODALMESH_REDIS_URL": REDIS_URL,
        "MODALMESH_MEDIA_MAX_BYTES": str(MEDIA_LIMIT),
        "MODALMESH_IMAGE_FETCH_TIMEOUT_S": "2",
    }
    procs = [
        start_encoders(env, logs / "encoders.log", http=enc_http, grpc=enc_grpc, metrics=enc_metrics),
        start_llm(env, logs / "llm.log", port=llm_port),
    ]
    gateway, base_url, grpc_address = _gateway(env, logs, "gateway", (gw_http, gw_grpc))
    procs.append(gateway)
    try:
        for proc in procs:
            wait_until(proc.alive, timeout=5, what="process start", proc=proc)
        wait_until(lambda: _healthy(base_url), timeout=180, what="gateway healthy", proc=gateway)
        yield Stack(
            base_url,
            grpc_address,
            env,
            gateway,
            env["MODALMESH_LLM_ADDRESS"],
            env["MODALMESH_ENCODER_ADDRESS"],
        )
    finally:
        stop_all(reversed(procs))
        _delete_feature_keys()


def _delete_feature_keys() -> None:
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        keys = list(client.scan_iter(match="mm:feat:*"))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = "What is in this picture?") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
        }
    ]


def good_request(stack: Stack) -> None:
    """A small valid request succeeds (after a bad one, nothing is broken)."""
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        timeout=60,
        json={"model": "tiny", "max_tokens": 3, "messages": image_message(data_url(png_bytes()))},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# ---- the happy paths ------------------------------------------------------------------------


def test_openai_client_plain_and_streaming(stack: Stack) -> None:
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)
    messages: Any = image_message(data_url(png_bytes(seed=3)))
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == "tiny"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= 6
    assert reply.usage.prompt_tokens > 16  # the image's placeholder tokens are counted

    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # greedy: the same answer both ways


def test_grpc_chat(stack: Stack) -> None:
    with grpc.insecure_channel(stack.grpc_address) as channel:
        request = chat_pb2.ChatRequest(
            model="tiny",
            max_tokens=4,
            messages=[
                chat_pb2.ChatMessage(
                    role="user",
                    content=[
                        chat_pb2.ChatContentPart(image=chat_pb2.MediaInput(data=png_bytes(seed=4))),
                        chat_pb2.ChatContentPart(text="What is in this picture?"),
                    ],
                )
            ],
        )
        chunks = list(chat_pb2_grpc.ChatStub(channel).Complete(request, timeout=60))
        assert chunks[-1].finish_reason in ("stop", "length")
        assert chunks[-1].usage.completion_tokens <= 4
        assert all(c.id == chunks[0].id for c in chunks)

        bad = chat_pb2.ChatRequest(
            model="tiny",
            messages=[
                chat_pb2.ChatMessage(
                    role="user",
                    content=[chat_pb2.ChatContentPart(image=chat_pb2.MediaInput(data=os.urandom(100)))],
                )
            ],
        )
        with pytest.raises(grpc.RpcError) as info:
            list(chat_pb2_grpc.ChatStub(channel).Complete(bad, timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not an image" in info.value.details()


def test_models_health_and_adapter_pin(stack: Stack) -> None:
    ids = [m["id"] for m in httpx.get(f"{stack.base_url}/v1/models").json()["data"]]
    assert ids == ["tiny", "tiny@1"]
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        timeout=60,
        json={"model": "tiny@1", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200 and r.json()["model"] == "tiny@1"
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        timeout=60,
        json={"model": "tiny@999", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert 400 <= r.status_code < 500 and "error" in r.json()
    assert httpx.get(f"{stack.base_url}/health").json() == {"status": "ok"}


def test_feature_cache_hits_on_repeat(stack: Stack) -> None:
    image = data_url(png_bytes(seed=11))
    for _ in range(2):
        r = httpx.post(
            f"{stack.base_url}/v1/chat/completions",
            timeout=60,
            json={"model": "tiny", "max_tokens": 2, "messages": image_message(image)},
        )
        assert r.status_code == 200
    metrics = httpx.get(f"{stack.base_url}/metrics").text
    hits = [
        line
        for line in metrics.splitlines()
        if line.startswith('modalmesh_gateway_feature_cache_lookups_total{result="hit"}')
    ]
    assert hits and float(hits[0].split()[-1]) >= 1


# ---- bad inputs: a 4xx that says what was expected, then a good request works --------------


def _bad_inputs() -> list[tuple[str, Any, int, str]]:
    """(name, request body or raw bytes, status, text the message must contain)."""
    png = png_bytes()
    huge = encode_image(random_image(320, 320, seed=5), "PNG")  # ~300 KB of noise
    assert len(huge) > MEDIA_LIMIT
    dead = f"http://127.0.0.1:{free_port()}/cat.png"

    def with_image(url: str) -> dict[str, Any]:
        return {"model": "tiny", "max_tokens": 2, "messages": image_message(url)}

    many = [{"type": "image_url", "image_url": {"url": data_url(png)}}] * 5
    return [
        ("random bytes", with_image(data_url(os.urandom(2000))), 400, "not an image: expected"),
        ("truncated png", with_image(data_url(png[: len(png) // 2])), 400, "truncated"),
        ("over the size limit", with_image(data_url(huge)), 413, f"over the limit of {MEDIA_LIMIT} bytes"),
        (
            "unsupported scheme",
            with_image("file:///etc/passwd"),
            400,
            "accepted schemes are http, https and data",
        ),
        ("unreachable url", with_image(dead), 400, f"(image 0): could not fetch image from {dead}"),
        (
            "too many images",
            {"model": "tiny", "messages": [{"role": "user", "content": many}]},
            400,
            "preset tiny accepts at most 4 images per request, got 5",
        ),
        (
            "empty messages",
            {"model": "tiny", "messages": []},
            400,
            "messages: expected at least one message, got an empty list",
        ),
        (
            "unknown model",
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "The model 'gpt-4o' does not exist; this gateway serves 'tiny'",
        ),
        ("malformed json", b'{"model": "tiny", "messages": [', 400, "the request body is not valid JSON"),
        (
            "placeholder typed as text",
            {"model": "tiny", "messages": [{"role": "user", "content": "what is <image> here?"}]},
            400,
            "message text contains '<image>', which is reserved",
        ),
        (
            "a modality the preset has no encoder for",
            {
                "model": "tiny",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "video_url", "video_url": {"url": data_url(png, "video/mp4")}}],
                    }
                ],
            },
            400,
            "messages[0].content[0]: preset tiny has no video encoder; it accepts image (got 1 video)",
        ),
        (
            "an audio format that is not accepted",
            {
                "model": "tiny",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aac"}}
                        ],
                    }
                ],
            },
            400,
            "input_audio.format: expected one of ['wav', 'mp3', 'flac', 'ogg'], got 'aac'",
        ),
        (
            "max_tokens <= 0",
            {"model": "tiny", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]},
            400,
            "max_tokens: expected a positive integer, got 0",
        ),
    ]


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize(
    "payload,status,expected", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_fails_alone(stack: Stack, payload: Any, status: int, expected: str) -> None:
    url = f"{stack.base_url}/v1/chat/completions"
    if isinstance(payload, bytes):
        r = httpx.post(url, content=payload, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json=payload, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert expected in error["message"], error["message"]
    good_request(stack)


# ---- graceful stop ---------------------------------------------------------------------------


def test_sigterm_drains_a_reply_in_flight(stack: Stack, tmp_path: Path) -> None:
    proc, base_url, _ = _gateway(stack.env, tmp_path, "gateway-drain")
    try:
        wait_until(lambda: _healthy(base_url), timeout=60, what="second gateway", proc=proc)
        body = {
            "model": "tiny",
            "max_tokens": 400,
            "temperature": 1.0,
            "seed": 1,
            "stream": True,
            "messages": [{"role": "user", "content": "Tell me a story."}],
        }
        lines = []
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
            for line in filter(None, r.iter_lines()):
                lines.append(line)
                if len(lines) == 3:
                    proc.popen.send_signal(signal.SIGTERM)  # while the reply streams
        assert lines[-1] == "data: [DONE]"
        assert any('"finish_reason":"' in line for line in lines)
        assert proc.popen.wait(timeout=30) == 0
    finally:
        proc.kill_group()
