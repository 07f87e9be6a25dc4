"""The benchmark's HTTP client: one streamed OpenAI chat, timed (first token, end, tokens)."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

import httpx

PROMPT = "Describe this image in detail."


@dataclass(frozen=True)
class ChatTiming:
    """One chat as the client saw it (time.perf_counter seconds from sending the request)."""

    ttft: float
    latency: float
    completion_tokens: int


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def chat_body(model: str, png: bytes, max_tokens: int) -> dict[str, object]:
    """A streamed, greedy image chat (usage in the last chunk)."""
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(png)}},
                    {"type": "text", "text": PROMPT},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def timed_chat(client: httpx.AsyncClient, base_url: str, body: dict[str, object]) -> ChatTiming:
    """Send one streamed chat and time its first content delta and its end.

    Raises:
        RuntimeError: The server answered with an error status or sent no usage.
    """
    start = time.perf_counter()
    ttft: float | None = None
    usage: dict[str, int] | None = None
    async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{base_url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]
    latency = time.perf_counter() - start
    if usage is None:
        raise RuntimeError(f"{base_url}: the stream ended without a usage chunk")
    return ChatTiming(ttft if ttft is not None else latency, latency, int(usage["completion_tokens"]))
