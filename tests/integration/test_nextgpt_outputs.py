"""Any-to-any on the tiny-nextgpt twin, end to end: Redis, the encoder, LLM and decoder
services and the gateway, all real processes.

"draw ..." asks for an image, "play ..." for a sound, "show a clip ..." for a video: the twin's
LLM was taught at generation to answer such asks with the signal tokens (as a trained NExT-GPT
does), and the request's `modalities` makes sure (the engine appends an asked modality the
model did not emit). Each reply carries the text and the media as
OpenAI-shaped entries in `message.media` (and as bytes in the gRPC Chat API); the files are
decoded and checked (PNG size, WAV length and rate, MP4 frames and size). Then the bad inputs
through the gateway, and last the decoder killed in the middle of a streamed request: the text
still arrives and the item is an error entry.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from tests.helpers.procs import Process, free_ports, stop_all, wait_until
from tests.helpers.services import gateway_healthy, start_decoders, start_encoders, start_gateway, start_llm

pytestmark = pytest.mark.integration

PRESET = "tiny-nextgpt"


class Stack:
    def __init__(self) -> None:
        self.procs: dict[str, Process] = {}
        self.base_url = ""
        self.grpc_address = ""

    def chat(self, content: str, **fields: Any) -> httpx.Response:
        payload = {"model": PRESET, "max_tokens": 4, "temperature": 0, **fields}
        payload["messages"] = [{"role": "user", "content": content}]
        return httpx.post(f"{self.base_url}/v1/chat/completions", json=payload, timeout=120)

    def ok(self, content: str, **fields: Any) -> dict[str, Any]:
        r = self.chat(content, **fields)
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        assert isinstance(message["content"], str) and message["content"]
        return dict(message)

    def stop(self) -> None:
        stop_all(reversed(list(self.procs.values())))


@pytest.fixture(scope="module")
def stack(tiny_cache_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from services.common.presets import load_preset
    from services.models.tiny import ensure_generated

    ensure_generated(load_preset(PRESET, cache_dir=tiny_cache_dir))
    enc_http, enc_grpc, enc_metrics, dec_http, dec_grpc, dec_metrics, llm_port, gw_http, gw_grpc = free_ports(
        9
    )
    env = {
        "MODALMESH_PRESET": PRESET,
        "MODALMESH_CACHE_DIR": str(tiny_cache_dir),
        "MODALMESH_LOG_JSON": "true",
        "MODALMESH_LLM_ADDRESS": f"127.0.0.1:{llm_port}",
        "MODALMESH_ENCODER_ADDRESS": f"127.0.0.1:{enc_grpc}",
        "MODALMESH_DECODER_ADDRESS": f"127.0.0.1:{dec_grpc}",
        "MODALMESH_DECODER_TIMEOUT_S": "60",
        "MODALMESH_REDIS_URL": redis_url,
    }
    logs = tmp_path_factory.mktemp("nextgpt-outputs-logs")
    s = Stack()
    try:
        s.procs["encoders"] = start_encoders(
            env, logs / "encoders.log", http=enc_http, grpc=enc_grpc, metrics=enc_metrics
        )
        s.procs["decoders"] = start_decoders(
            env, logs / "decoders.log", http=dec_http, grpc=dec_grpc, metrics=dec_metrics
        )
        s.procs["llm"] = start_llm(env, logs / "llm.log", port=llm_port)
        gateway, s.base_url, s.grpc_address = start_gateway(
            env, logs / "gateway.log", ports=(gw_http, gw_grpc)
        )
        s.procs["gateway"] = gateway

        def ready() -> bool:
            for name, proc in s.procs.items():
                assert proc.alive(), f"{name} exited; log:\n{proc.log_tail()}"
            if not gateway_healthy(s.base_url):
                return False
            return bool(httpx.get(f"{s.base_url}/health", timeout=2).json()["status"] == "ok")

        wait_until(ready, timeout=300, what="tiny-nextgpt stack with decoders ready", proc=gateway)
        yield s
    finally:
        s.stop()


def data_url_bytes(url: str, mime: str) -> bytes:
    head, _, b64 = url.partition(",")
    assert head == f"data:{mime};base64", head
    return base64.b64decode(b64)


def only_media(message: dict[str, Any], modality: str) -> dict[str, Any]:
    (entry,) = message["media"]
    assert entry["modality"] == modality and entry["index"] == 0, entry
    assert entry["char_offset"] == len(message["content"])  # appended after the reply's text
    return dict(entry)


def test_draw_gives_a_png_of_the_requested_size(stack: Stack) -> None:
    from PIL import Image

    message = stack.ok(
        "draw a red square on a blue sky",
        modalities=["text", "image"],
        image={"height": 32, "width": 48, "seed": 5},
    )
    entry = only_media(message, "image")
    assert entry["type"] == "image_url" and entry["seed"] == 5
    png = data_url_bytes(entry["image_url"]["url"], "image/png")
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.size, image.mode) == ("PNG", (48, 32), "RGB")
    again = only_media(
        stack.ok(
            "draw a red square on a blue sky",
            modalities=["text", "image"],
            image={"height": 32, "width": 48, "seed": 5},
        ),
        "image",
    )
    assert again["image_url"] == entry["image_url"]  # the same seed and conditioning: the same image


@pytest.mark.parametrize(
    ("ask", "modality", "kind"),
    [
        ("draw a cat", "image", "image_url"),
        ("play the sound of a dog", "audio", "input_audio"),
        ("show a clip of a car", "video", "video_url"),
    ],
)
def test_the_model_emits_the_signal_tokens_on_its_own(
    stack: Stack, ask: str, modality: str, kind: str
) -> None:
    """No `modalities` in the request: the media come from the span the model sampled."""
    message = stack.ok(ask, max_tokens=48)
    (entry,) = message["media"]
    assert (entry["modality"], entry["type"]) == (modality, kind), entry
    assert message["content"].startswith("Here is a ") and "[IMG" not in message["content"]
    assert entry["char_offset"] <= len(message["content"])


def test_play_gives_a_wav(stack: Stack) -> None:
    import soundfile

    message = stack.ok("play the sound of rain", modalities=["text", "audio"], audio={"duration_s": 1.0})
    entry = only_media(message, "audio")
    assert entry["type"] == "input_audio" and entry["input_audio"]["format"] == "wav"
    wav, rate = soundfile.read(io.BytesIO(base64.b64decode(entry["input_audio"]["data"])))
    assert rate == 16000 and abs(len(wav) / rate - 1.0) < 0.05 and wav.ndim == 1


def test_show_a_clip_gives_an_mp4(stack: Stack) -> None:
    import av

    message = stack.ok(
        "show a clip of a dog running",
        modalities=["text", "video"],
        video={"num_frames": 8, "height": 32, "width": 32},
    )
    entry = only_media(message, "video")
    assert entry["type"] == "video_url"
    mp4 = data_url_bytes(entry["video_url"]["url"], "video/mp4")
    with av.open(io.BytesIO(mp4)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (32, 32, 3)


def test_every_modality_in_one_streamed_reply(stack: Stack) -> None:
    payload = {
        "model": PRESET,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": "draw, play and show me a cat"}],
        "modalities": ["text", "image", "audio", "video"],
    }
    kinds = []
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=payload, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            if choice["delta"].get("media"):
                kinds.append(("media", choice["delta"]["media"][0]["type"]))
            elif choice.get("finish_reason"):
                kinds.append(("finish", choice["finish_reason"]))
            elif choice["delta"].get("content"):
                kinds.append(("text", ""))
    media = [k for k in kinds if k[0] == "media"]
    assert media == [("media", "image_url"), ("media", "input_audio"), ("media", "video_url")]
    assert kinds[-1][0] == "finish" and kinds.index(media[0]) > kinds.index(("text", ""))


def test_the_grpc_chat_api_carries_the_bytes(stack: Stack) -> None:
    from PIL import Image

    from modalmesh.v1 import chat_pb2, chat_pb2_grpc

    request = chat_pb2.ChatRequest(
        model=PRESET,
        max_tokens=3,
        temperature=0.0,
        messages=[chat_pb2.ChatMessage(role="user", content=[chat_pb2.ChatContentPart(text="draw a tree")])],
        modalities=["text", "image"],
        image=chat_pb2.DecodeOptions(height=24, width=40),
    )
    with grpc.insecure_channel(stack.grpc_address) as channel:
        chunks = list(chat_pb2_grpc.ChatStub(channel).Complete(request, timeout=120))
    media = [m for c in chunks for m in c.media]
    assert len(media) == 1 and media[0].mime_type == "image/png" and not media[0].error
    assert Image.open(io.BytesIO(media[0].data)).size == (40, 24)
    assert chunks[-1].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"image": {"steps": 1000}}, 400, "image.steps: expected a number in [1, 20], got 1000"),
        ({"image": {"height": 12}}, 400, "image.height: expected a multiple of 8, got 12"),
        ({"audio": {"duration_s": 30}}, 400, "audio.duration_s: expected a number in [0.5, 4.0], got 30"),
        ({"video": {"num_frames": 64}}, 400, "video.num_frames: expected a number in [1, 16], got 64"),
        ({"audio": {"width": 64}}, 400, "audio.width: does not apply to audio decoding"),
        (
            {"modalities": ["text", "smell"]},
            400,
            "modalities[1]: preset tiny-nextgpt can produce text, image, video, audio; got 'smell'",
        ),
        ({"image": {"quality": "high"}}, 400, "image.quality: Extra inputs are not permitted"),
    ],
)
def test_bad_output_requests_fail_alone(
    stack: Stack, fields: dict[str, Any], status: int, message: str
) -> None:
    r = stack.chat("draw a cat", **fields)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    stack.ok("draw a cat", modalities=["text", "image"])  # the stack still serves


def _models(stack: Stack) -> list[str]:
    return [m["id"] for m in httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"]]


def test_a_published_projector_release_is_served_without_a_restart(
    stack: Stack, tiny_cache_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    """What stage 2 publishes: a bundle whose only change is the output projectors. Published
    to the registry, the running LLM service swaps to it; the same seeded ask now decodes other
    conditioning into another image while the text stays the same, and a pin to version 1
    still gives the first image. Rolled back at the end for the tests after it."""
    import torch

    from services.common.adapter_registry import AdapterRegistry
    from services.common.presets import load_preset
    from services.models.checkpoints.bundle import base_fingerprint, load_bundle, write_bundle
    from services.trainer.publisher import publish_bundle, rollback

    preset = load_preset(PRESET, cache_dir=tiny_cache_dir)
    name = preset.adapter.name
    ask = {"modalities": ["text", "image"], "image": {"height": 32, "width": 32, "seed": 3}}

    def image(model: str) -> tuple[str, str]:
        message = stack.ok("draw a boat on the sea", model=model, **ask)
        return message["content"], only_media(message, "image")["image_url"]["url"]

    text1, png1 = image(PRESET)
    start = load_bundle(preset.adapter.path)
    generator = torch.Generator().manual_seed(11)
    heads = {  # every projector tensor moved: a stand-in for trained ones
        head: {
            key.split(".", 1)[1]: value + 0.5 * torch.randn(value.shape, generator=generator)
            for key, value in start.heads.items()
            if key.startswith(f"{head}.")
        }
        for head in {o.head for o in preset.outputs.values()}
    }
    fingerprint = base_fingerprint(preset.llm.checkpoint)
    write_bundle(
        tmp_path / "release", name=name, version="0", preset=PRESET, base_fingerprint=fingerprint,
        connectors=start.connectors, heads=heads, stage="stage2",
    )  # fmt: skip
    registry = AdapterRegistry.from_url(redis_url)
    previous = registry.current(name)  # the version the service seeded at start
    assert previous is not None
    published = publish_bundle(
        tmp_path / "release", registry=registry, artifact_dir=tmp_path / "store", name=name,
        base_fingerprint=fingerprint,
    )  # fmt: skip
    try:
        pinned = f"{PRESET}@{published.version}"
        wait_until(
            lambda: pinned in _models(stack), timeout=60, what=f"{pinned} loaded", proc=stack.procs["llm"]
        )
        text2, png2 = image(PRESET)
        assert text2 == text1  # the LLM and its connectors did not change
        assert png2 != png1  # the projectors did: other conditioning, another image
        assert image(pinned) == (text2, png2)
        assert image(f"{PRESET}@{previous}") == (text1, png1)  # the first version is still pinnable
    finally:
        rollback(registry, name, previous)
        wait_until(lambda: image(PRESET)[1] == png1, timeout=60, what="rolled back", proc=stack.procs["llm"])


def test_a_decoder_killed_mid_request_fails_only_its_item(stack: Stack) -> None:
    """Last in the module: it kills the decoder service."""
    payload = {
        "model": PRESET,
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": "show a long clip of the sea"}],
        "modalities": ["text", "video"],
        "video": {"steps": 20, "num_frames": 16, "height": 256, "width": 256},  # slow on a CPU
    }
    decoders = stack.procs["decoders"]
    text, entries, finish = "", [], None
    started = time.monotonic()
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=payload, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
            text += choice.get("delta", {}).get("content") or ""
            entries += choice.get("delta", {}).get("media") or []
            if text and decoders.alive():
                time.sleep(0.5)  # the decode is under way
                decoders.kill_group()  # Triton and the Python process together
                killed = time.monotonic()
    assert finish in ("stop", "length") and text
    (entry,) = entries
    assert entry["type"] == "error" and entry["modality"] == "video", entry
    assert entry["error"]["code"] == 503 and "decoder service" in entry["error"]["message"]
    assert time.monotonic() - killed < 15, "the error should come within seconds of the kill"
    assert time.monotonic() - started < 90
    # Down before the request: the same error entry at once, and the text still arrives.
    wait_until(lambda: not decoders.alive(), timeout=10, what="decoder service gone")
    message = stack.ok("draw a cat", modalities=["text", "image"])
    (entry,) = message["media"]
    assert entry["type"] == "error" and entry["error"]["code"] == 503
    health = httpx.get(f"{stack.base_url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "degraded"
