"""Faults injected for real into a running tiny stack (see README.md for the ones tested
elsewhere): the LLM service SIGKILLed in the middle of streamed replies (REST and gRPC), the
encoder service killed with an image request in flight, Redis restarted while chats go on,
deadlines that expire during generation, a REST client that goes away mid-stream, and SIGTERM
to a gateway with five replies streaming.

Each test leaves the stack healthy (a killed service is started again on its port).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from modalmesh.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers.media import png_bytes
from tests.helpers.procs import Process, free_ports, wait_until
from tests.helpers.services import gateway_healthy, start_gateway
from tests.reliability.conftest import Stack, data_url, image_messages, metric, text_messages

pytestmark = pytest.mark.reliability

# Seeded so that the tiny model writes a long reply: 778 tokens (~0.8 s on 2 CPU cores) before
# its end token, so a fault injected after the first chunk lands in the middle of it.
LONG = {"max_tokens": 1000, "temperature": 1.0, "seed": 5}
FULL_REPLY = 778
PROMPT = "Tell me a story."


def _sse_events(lines: list[str]) -> list[Any]:
    return [json.loads(x[6:]) for x in lines if x.startswith("data: {")]


def _finish_reasons(events: list[Any]) -> list[str]:
    return [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]


def _grpc_request(**fields: Any) -> chat_pb2.ChatRequest:
    message = chat_pb2.ChatMessage(role="user", content=[chat_pb2.ChatContentPart(text=PROMPT)])
    return chat_pb2.ChatRequest(model="tiny", messages=[message], **fields)


def _llm_log_has(stack: Stack, request_id: str, text: str) -> bool:
    return any(request_id in line and text in line for line in stack.procs["llm"].log_text().splitlines())


def _cancelled_tokens(stack: Stack, request_id: str) -> int:
    """N of the LLM service's "cancelled after N tokens" line for `request_id` (-1: none yet)."""
    for line in stack.procs["llm"].log_text().splitlines():
        if request_id in line and "cancelled after" in line:
            return int(line.split("cancelled after", 1)[1].split()[0])
    return -1


CANCELLED = 'modalmesh_llm_requests_total{status="CANCELLED"}'


def _llm_stopped(stack: Stack, request_id: str, cancelled_before: float) -> int:
    """Wait for the LLM service to stop generating `request_id`; returns the tokens it made.

    Evidence: its "cancelled after N tokens" log line (N short of the 778-token reply) and its
    CANCELLED request counter going up.
    """
    tokens = wait_until(
        lambda: _cancelled_tokens(stack, request_id) + 1, timeout=5, what=f"the LLM cancelled {request_id}"
    )
    assert tokens - 1 < FULL_REPLY, "the LLM stopped before the end of the reply"
    wait_until(
        lambda: metric(stack.llm_metrics(), CANCELLED) > cancelled_before, timeout=5, what="CANCELLED counted"
    )
    return tokens - 1


def test_llm_killed_mid_stream_ends_sse_and_grpc_streams_then_serves_again(stack: Stack) -> None:
    stack.wait_healthy()
    gateway_pid = stack.procs["gateway"].pid
    started = {"sse": threading.Event(), "grpc": threading.Event()}
    out: dict[str, Any] = {}

    def sse() -> None:
        body = {"model": "tiny", "stream": True, "messages": text_messages(PROMPT), **LONG}
        lines: list[str] = []
        try:
            with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=30) as r:
                out["sse_status"] = r.status_code
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                    if '"content":' in line:
                        started["sse"].set()
        finally:
            out["sse_lines"], out["sse_end"] = lines, time.monotonic()
            started["sse"].set()

    def grpc_stream() -> None:
        chunks = []
        try:
            with grpc.insecure_channel(stack.grpc_address) as channel:
                for chunk in chat_pb2_grpc.ChatStub(channel).Complete(_grpc_request(**LONG), timeout=30):
                    chunks.append(chunk)
                    started["grpc"].set()
            out["grpc_code"] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            out["grpc_code"], out["grpc_details"] = e.code(), e.details()
        finally:
            out["grpc_chunks"], out["grpc_end"] = chunks, time.monotonic()
            started["grpc"].set()

    threads = [threading.Thread(target=sse), threading.Thread(target=grpc_stream)]
    for t in threads:
        t.start()
    for name, event in started.items():
        assert event.wait(30), f"the {name} stream did not start"
    os.kill(stack.procs["llm"].pid, signal.SIGKILL)  # a crash, not a drain
    killed = time.monotonic()
    for t in threads:
        t.join(30)
    stack.procs["llm"].popen.wait(10)

    # REST: the reply had started (200), so the error comes as an SSE event, then [DONE].
    lines = out["sse_lines"]
    events = _sse_events(lines)
    assert out["sse_status"] == 200
    assert lines[-1] == "data: [DONE]", lines[-3:]
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1 and not _finish_reasons(events), lines[-3:]
    assert errors[0]["type"] == "ServiceUnavailableError", errors[0]
    assert errors[0]["message"].startswith("the llm service is unavailable"), errors[0]
    assert out["sse_end"] - killed < 10
    # gRPC: the stream ends with UNAVAILABLE after some chunks and no finish reason.
    assert out["grpc_code"] == grpc.StatusCode.UNAVAILABLE, out.get("grpc_details")
    assert out["grpc_chunks"] and not any(c.finish_reason for c in out["grpc_chunks"])
    assert out["grpc_end"] - killed < 10
    print(
        f"\nLLM SIGKILL mid-stream: SSE error event + [DONE] after {out['sse_end'] - killed:.2f}s, "
        f"gRPC UNAVAILABLE after {out['grpc_end'] - killed:.2f}s ({len(out['grpc_chunks'])} chunks)"
    )

    stack.restart("llm")  # same port; the gateway is not restarted
    assert stack.procs["gateway"].pid == gateway_pid and stack.procs["gateway"].alive()
    wait_until(lambda: stack.chat(messages=text_messages()).status_code == 200, timeout=30, what="REST")
    with grpc.insecure_channel(stack.grpc_address) as channel:
        chunks = list(chat_pb2_grpc.ChatStub(channel).Complete(_grpc_request(max_tokens=3), timeout=30))
    assert chunks[-1].finish_reason in ("stop", "length")


def test_encoder_killed_with_an_image_request_in_flight_gives_503_then_serves_again(stack: Stack) -> None:
    stack.wait_healthy()
    encoders = stack.procs["encoders"]
    result: dict[str, Any] = {}

    def image_chat() -> None:
        # A new image: a cache miss, so it goes to the encoder service.
        result["response"] = stack.chat(messages=image_messages(seed=int(time.time()) % 10_000 + 1000))
        result["end"] = time.monotonic()

    members = encoders.group_members()  # the Python process and its Triton server
    for pid in members:
        os.kill(pid, signal.SIGSTOP)  # frozen: the request waits inside the encoder service
    thread = threading.Thread(target=image_chat)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive(), result
    killed = time.monotonic()
    encoders.kill_group()
    thread.join(60)

    r = result["response"]
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["type"] == "ServiceUnavailableError" and "encoder service" in error["message"], error
    assert result["end"] - killed < 10
    print(
        f"\nencoder killed mid-request: {r.status_code} after {result['end'] - killed:.2f}s: {error['message']}"
    )
    assert stack.chat(messages=text_messages()).status_code == 200  # text needs no encoder

    stack.restart("encoders")
    wait_until(
        lambda: stack.chat(messages=image_messages(seed=77)).status_code == 200, timeout=30, what="image chat"
    )


def test_redis_restart_is_a_cache_miss_then_hits_again(stack: Stack) -> None:
    stack.wait_healthy()
    hits = 'modalmesh_gateway_feature_cache_lookups_total{result="hit"}'
    misses = 'modalmesh_gateway_feature_cache_lookups_total{result="miss"}'
    cached = image_messages(seed=4242)
    assert stack.chat(messages=cached).status_code == 200  # stored
    before = metric(stack.metrics(), hits)
    assert stack.chat(messages=cached).status_code == 200
    assert metric(stack.metrics(), hits) == before + 1

    redis = stack.procs["redis"]
    assert redis.terminate(timeout=15) == 0  # appendonly: the entries are on disk
    down = metric(stack.metrics(), misses)
    statuses = [stack.chat(messages=m).status_code for m in (cached, image_messages(seed=4343), cached)]
    statuses.append(stack.chat(messages=text_messages()).status_code)
    assert statuses == [200, 200, 200, 200]
    after_down = stack.metrics()
    assert metric(after_down, misses) == down + 3 and metric(after_down, hits) == before + 1

    stack.start("redis")  # same port, same folder
    hit_again = metric(stack.metrics(), hits)

    def hits_again() -> bool:
        assert stack.chat(messages=cached).status_code == 200
        return metric(stack.metrics(), hits) > hit_again

    # The cache leaves Redis alone for 5 s after a failure, then uses it again.
    wait_until(hits_again, timeout=30, interval=1.0, what="a feature cache hit after the Redis restart")


def test_grpc_deadline_expiring_mid_generation_cancels_it_in_the_llm(stack: Stack) -> None:
    stack.wait_healthy()
    request = _grpc_request(request_id="rel-grpc-deadline", **LONG)
    cancelled = metric(stack.llm_metrics(), CANCELLED)
    started = time.monotonic()
    with grpc.insecure_channel(stack.grpc_address) as channel, pytest.raises(grpc.RpcError) as raised:
        list(chat_pb2_grpc.ChatStub(channel).Complete(request, timeout=0.3))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2
    tokens = _llm_stopped(stack, "rel-grpc-deadline", cancelled)
    print(f"\ngRPC deadline 0.3 s: DEADLINE_EXCEEDED; the LLM cancelled after {tokens} tokens")


def test_rest_llm_timeout_gives_504_and_cancels_the_generation(stack: Stack, tmp_path: Path) -> None:
    stack.wait_healthy()
    env = {**stack.env, "MODALMESH_LLM_TIMEOUT_S": "0.3"}
    gateway, base_url, _ = start_gateway(env, tmp_path / "gateway-short.log")
    try:
        wait_until(lambda: gateway_healthy(base_url), timeout=60, what="second gateway", proc=gateway)
        cancelled = metric(stack.llm_metrics(), CANCELLED)
        body = {"model": "tiny", "messages": text_messages(PROMPT), **LONG}
        started = time.monotonic()
        r = httpx.post(
            f"{base_url}/v1/chat/completions",
            json=body,
            headers={"X-Request-Id": "rel-rest-deadline"},
            timeout=30,
        )
        elapsed = time.monotonic() - started
        assert r.status_code == 504, r.text
        assert r.json()["error"]["message"], r.text
        assert elapsed < 3
        tokens = _llm_stopped(stack, "rel-rest-deadline", cancelled)
        print(
            f"\nREST with MODALMESH_LLM_TIMEOUT_S=0.3: {r.status_code} after {elapsed:.2f}s "
            f"({r.json()['error']['type']}); the LLM cancelled after {tokens} tokens"
        )
    finally:
        gateway.kill_group()


def test_rest_client_disconnecting_mid_stream_cancels_the_generation(stack: Stack) -> None:
    stack.wait_healthy()
    body = {"model": "tiny", "stream": True, "messages": text_messages(PROMPT), **LONG}
    headers = {"X-Request-Id": "rel-disconnect"}
    cancelled = metric(stack.llm_metrics(), CANCELLED)
    with httpx.stream(
        "POST", f"{stack.base_url}/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content":' in line:
                break  # leave after the first token: the connection closes
    left = time.monotonic()
    tokens = _llm_stopped(stack, "rel-disconnect", cancelled)
    print(
        f"\nREST client gone mid-stream: the LLM cancelled after {tokens} tokens, {time.monotonic() - left:.2f}s later"
    )


def test_sigterm_to_the_gateway_drains_five_streams_then_exits_zero(stack: Stack, tmp_path: Path) -> None:
    stack.wait_healthy()
    http_port, grpc_port = free_ports(2)
    gateway, base_url, _ = start_gateway(
        stack.env, tmp_path / "gateway-drain.log", ports=(http_port, grpc_port)
    )
    try:
        wait_until(lambda: gateway_healthy(base_url), timeout=60, what="drain gateway", proc=gateway)
        _drain_five(gateway, base_url)
    finally:
        gateway.kill_group()


def _drain_five(gateway: Process, base_url: str) -> None:
    streaming = threading.Barrier(6, timeout=30)
    results: list[list[str]] = [[] for _ in range(5)]

    def stream(i: int) -> None:
        body = {"model": "tiny", "stream": True, "messages": text_messages(PROMPT), **LONG}
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
            waiting = True
            for line in r.iter_lines():
                if line:
                    results[i].append(line)
                if waiting and '"content":' in line:
                    waiting = False
                    streaming.wait()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    streaming.wait()  # all five are streaming
    gateway.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    for t in threads:
        t.join(60)
    for lines in results:
        events = _sse_events(lines)
        assert lines[-1] == "data: [DONE]" and not [e for e in events if "error" in e], lines[-3:]
        assert _finish_reasons(events) in (["stop"], ["length"]), lines[-3:]
    assert gateway.popen.wait(timeout=30) == 0
    print(
        f"\ngateway SIGTERM with 5 streams: all 5 finished, exit 0 after {time.monotonic() - signalled:.2f}s"
    )


def test_the_stack_still_serves_images_at_the_end(stack: Stack) -> None:
    stack.wait_healthy()
    r = stack.chat(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=5))}},
                    {"type": "text", "text": "and now?"},
                ],
            }
        ]
    )
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
