"""A backend goes down and comes back: the gateway answers 503 naming the service while it is
down (REST and gRPC), keeps serving what does not need it, and serves again once it is back,
without a restart of the gateway. Redis is absent here on purpose: the feature cache is a miss,
never an error, and every image really goes to the encoder service."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from modalmesh.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers.media import png_bytes
from tests.helpers.procs import Process, free_port, free_ports, stop_all, wait_until
from tests.helpers.services import gateway_healthy, start_encoders, start_gateway, start_llm

pytestmark = pytest.mark.integration


@dataclass
class Outage:
    env: dict[str, str]
    logs: Path
    base_url: str
    grpc_address: str
    encoder_ports: dict[str, int]
    llm_port: int
    procs: dict[str, Process]

    def restart_llm(self) -> None:
        self.procs["llm"] = start_llm(self.env, self.logs / "llm-2.log", port=self.llm_port)

    def restart_encoders(self) -> None:
        self.procs["encoders"] = start_encoders(self.env, self.logs / "encoders-2.log", **self.encoder_ports)


@pytest.fixture(scope="module")
def outage(tiny_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    logs = tmp_path_factory.mktemp("outage-logs")
    enc_http, enc_grpc, enc_metrics, llm_port, gw_http, gw_grpc = free_ports(6)
    env = {
        "MODALMESH_CACHE_DIR": str(tiny_cache_dir),
        "MODALMESH_LLM_ADDRESS": f"127.0.0.1:{llm_port}",
        "MODALMESH_ENCODER_ADDRESS": f"127.0.0.1:{enc_grpc}",
        "MODALMESH_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nobody listens
    }
    encoder_ports = {"http": enc_http, "grpc": enc_grpc, "metrics": enc_metrics}
    procs = {
        "encoders": start_encoders(env, logs / "encoders.log", **encoder_ports),
        "llm": start_llm(env, logs / "llm.log", port=llm_port),
    }
    gateway, base_url, grpc_address = start_gateway(env, logs / "gateway.log", ports=(gw_http, gw_grpc))
    procs["gateway"] = gateway
    state = Outage(env, logs, base_url, grpc_address, encoder_ports, llm_port, procs)
    try:
        wait_until(lambda: gateway_healthy(base_url), timeout=180, what="gateway healthy", proc=gateway)
        yield state
    finally:
        stop_all(state.procs.values())


def _image_chat(base_url: str) -> httpx.Response:
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
    body = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": content}]}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)


def _text_chat(base_url: str) -> httpx.Response:
    body = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "Hello"}]}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)


def _grpc_chat_code(address: str) -> grpc.StatusCode:
    request = chat_pb2.ChatRequest(
        model="tiny",
        max_tokens=3,
        messages=[
            chat_pb2.ChatMessage(
                role="user",
                content=[
                    chat_pb2.ChatContentPart(image=chat_pb2.MediaInput(data=png_bytes())),
                    chat_pb2.ChatContentPart(text="What is it?"),
                ],
            )
        ],
    )
    with grpc.insecure_channel(address) as channel:
        try:
            list(chat_pb2_grpc.ChatStub(channel).Complete(request, timeout=60))
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def _serves_again(fn, base_url: str) -> bool:
    return fn(base_url).status_code == 200


def test_llm_down_gives_503_then_serves_again(outage: Outage) -> None:
    assert _image_chat(outage.base_url).status_code == 200
    outage.procs["llm"].send_signal(9)  # a crash, not a drain
    outage.procs["llm"].popen.wait(30)

    for send in (_image_chat, _text_chat):
        r = send(outage.base_url)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["message"].startswith("the llm service is unavailable")
        assert r.json()["error"]["type"] == "ServiceUnavailableError"
    assert _grpc_chat_code(outage.grpc_address) == grpc.StatusCode.UNAVAILABLE
    health = httpx.get(f"{outage.base_url}/health", timeout=5)
    assert health.status_code == 503 and health.json()["checks"]["llm"] == "down"

    outage.restart_llm()
    wait_until(
        lambda: gateway_healthy(outage.base_url), timeout=120, what="llm back", proc=outage.procs["llm"]
    )
    wait_until(
        lambda: _serves_again(_image_chat, outage.base_url), timeout=30, what="image chat after restart"
    )
    assert _grpc_chat_code(outage.grpc_address) == grpc.StatusCode.OK


def test_encoder_down_gives_503_for_images_text_still_works_then_serves_again(outage: Outage) -> None:
    assert _image_chat(outage.base_url).status_code == 200
    outage.procs["encoders"].send_signal(9)
    outage.procs["encoders"].popen.wait(30)
    outage.procs["encoders"].kill_group()  # tritonserver goes with its parent's group

    r = _image_chat(outage.base_url)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["message"].startswith("the encoder service is unavailable at ")
    assert _grpc_chat_code(outage.grpc_address) == grpc.StatusCode.UNAVAILABLE
    assert _text_chat(outage.base_url).status_code == 200  # needs no encoder

    outage.restart_encoders()
    wait_until(
        lambda: gateway_healthy(outage.base_url),
        timeout=120,
        what="encoders back",
        proc=outage.procs["encoders"],
    )
    wait_until(
        lambda: _serves_again(_image_chat, outage.base_url), timeout=30, what="image chat after restart"
    )
