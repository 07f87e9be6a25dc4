"""The encoder service as a real process: `python -m services.encoders` on free loopback ports.

Started once for the module on a preset of every backbone and modality of the tiny twins
(image: tiny CLIP; video: tiny EVA at 1 fps, so items have different frame counts; audio: tiny
ImageBind; event: tiny CLIP, last layer with CLS), whose checkpoints `write_tiny_backbone`
writes into a temporary folder; then called with stock `tritonclient.grpc` and with
`EncoderClient`. The last test stops it with SIGTERM, checks the exit code and that no Triton
process is left, and restarts it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from services.common.content import MediaFeatures
from services.common.errors import DeadlineExceededError, UnavailableError
from services.common.presets import Preset, load_preset
from services.common.settings import Settings
from services.encoders.client import EncoderClient, EncoderItemError
from services.models.backbones.tiny import write_tiny_backbone
from services.models.media.encode import MediaEncoder
from tests.helpers.media import jpeg_bytes, make_audio, make_events, make_video, png_bytes
from tests.helpers.procs import (
    Process,
    command_line,
    descendants,
    free_ports,
    pid_alive,
    start_process,
    wait_until,
)

pytestmark = pytest.mark.integration

MODEL = "image_clip_vision"
MODELS = ("image_clip_vision", "video_eva_vit", "audio_imagebind", "event_clip_vision")
START_TIMEOUT_S = 180.0
PRESET = """
name: itest-encoders
modalities:
  image:
    encoder: {backbone: clip_vision, checkpoint: ROOT/clip, tokens: 16, dim: 64}
    connector: {type: mlp2x_gelu}
    placeholder: "<image>"
  video:
    encoder:
      backbone: eva_vit
      checkpoint: ROOT/eva
      config: {num_layers: 4, width: 32, heads: 2, mlp_dim: 64, image_size: 28, patch_size: 14}
      select_feature: patch
      sampling: {fps: 1.0, max_frames: 8}
      tokens: 4
      dim: 32
    connector: {type: linear}
    placeholder: "<video>"
  audio:
    encoder:
      backbone: imagebind
      checkpoint: ROOT/imagebind
      config: {out_embed_dim: 32, vision_embed_dim: 32, vision_num_blocks: 2, vision_num_heads: 2,
               image_size: 28, patch: 14, audio_embed_dim: 32, audio_num_blocks: 2, audio_num_heads: 2}
      select_feature: embedding
      sampling: {clips: 3, clip_seconds: 2.0}
      tokens: 1
      dim: 32
    connector: {type: linear}
    placeholder: "<audio>"
  event:
    encoder:
      backbone: clip_vision
      checkpoint: ROOT/clip
      select_layer: -1
      select_feature: cls_patch
      sampling: {event_frames: 5}
      tokens: 17
      dim: 64
    connector: {type: event_adaptor}
    placeholder: "<event>"
llm: {architecture: llama, checkpoint: ROOT/llm}
adapter: {name: itest, path: ROOT/adapter}
"""


def write_preset(root: Path) -> Path:
    """The test preset's YAML and its backbone checkpoints under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "itest-encoders.yaml"
    path.write_text(PRESET.replace("ROOT", str(root)))
    preset = load_preset(str(path), cache_dir=root)
    for spec in (m.encoder for m in preset.modalities.values()):
        if not spec.checkpoint.exists():
            write_tiny_backbone(spec, spec.checkpoint, seed=7)
    return path


@dataclass
class EncoderService:
    """The service under test: where it keeps its cache and logs, its ports, its process."""

    cache_dir: Path
    preset_path: Path
    log_dir: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    started: list[Process] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def proc(self) -> Process:
        return self.started[-1]

    def ready(self) -> bool:
        client = grpcclient.InferenceServerClient(self.target)
        try:
            return bool(client.is_server_ready() and all(client.is_model_ready(m) for m in MODELS))
        finally:
            client.close()

    def start(self) -> Process:
        proc = start_process(
            [
                sys.executable,
                "-m",
                "services.encoders",
                "--host",
                "127.0.0.1",
                "--http-port",
                str(self.http_port),
                "--grpc-port",
                str(self.grpc_port),
                "--metrics-port",
                str(self.metrics_port),
            ],
            log_path=self.log_dir / f"encoders-{len(self.started)}.log",
            env={
                "MODALMESH_CACHE_DIR": str(self.cache_dir),
                "MODALMESH_PRESET": str(self.preset_path),
                "MODALMESH_LOG_LEVEL": "INFO",
                "HF_HUB_OFFLINE": "1",
            },
        )
        self.started.append(proc)
        wait_until(self.ready, timeout=START_TIMEOUT_S, interval=0.5, what="encoder service ready", proc=proc)
        return proc

    def metrics(self, model: str = MODEL) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read()
        out = {}
        for line in text.decode().splitlines():
            m = re.match(rf'^(nv_inference_\w+)\{{model="{model}",version="1"\}} (\S+)$', line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EncoderService]:
    root = tmp_path_factory.mktemp("encoder-service")
    http_port, grpc_port, metrics_port = free_ports(3)
    svc = EncoderService(
        root / "cache", write_preset(root / "preset"), root / "logs", http_port, grpc_port, metrics_port
    )
    try:
        svc.start()
        yield svc
    finally:
        for proc in svc.started:
            if proc.alive():
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=30)
            proc.kill_group()


@pytest.fixture(scope="module")
def preset(service: EncoderService) -> Preset:
    return load_preset(str(service.preset_path), cache_dir=service.cache_dir)


@pytest.fixture(scope="module")
def libraries(preset: Preset) -> Iterator[dict[str, MediaEncoder]]:
    """The same encoders loaded in-process from the checkpoints the service serves."""
    out = {m: MediaEncoder.from_spec(m, s.encoder, device="cpu") for m, s in preset.modalities.items()}
    yield out
    for encoder in out.values():
        encoder.close()


@pytest.fixture(scope="module")
def library(libraries: dict[str, MediaEncoder]) -> MediaEncoder:
    return libraries["image"]


@pytest.fixture
def client(service: EncoderService) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(service.target)
    yield c
    c.close()


def _infer_all(
    client: grpcclient.InferenceServerClient,
    items: list[bytes],
    model: str = MODEL,
    request_id: str | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    media = grpcclient.InferInput("media", [len(items), 1], "BYTES")
    media.set_data_from_numpy(np.array([[x] for x in items], dtype=np.object_))  # (n, 1)
    result = client.infer(model, [media], headers={"x-request-id": request_id} if request_id else None)
    errors = [bytes(e).decode() for e in result.as_numpy("error").reshape(-1)]
    return result.as_numpy("features"), result.as_numpy("times"), errors


def _infer(
    client: grpcclient.InferenceServerClient, items: list[bytes], request_id: str | None = None
) -> tuple[np.ndarray, list[str]]:
    features, _, errors = _infer_all(client, items, request_id=request_id)
    return features, errors


def _encoded(library: MediaEncoder, data: bytes) -> MediaFeatures[np.ndarray]:
    (out,) = library.encode([data])
    assert isinstance(out, MediaFeatures), out
    return out


def _library(library: MediaEncoder, data: bytes) -> np.ndarray:
    return _encoded(library, data).features


def test_health_and_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL, as_json=True)
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]}
    assert inputs == {"media": ("BYTES", [-1, 1])}
    assert outputs == {
        "features": ("FP32", [-1, -1, 64]),
        "times": ("FP32", [-1, -1]),
        "error": ("BYTES", [-1, 1]),
    }
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert int(config["max_batch_size"]) == 8
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 5000


@pytest.mark.parametrize("make", [png_bytes, jpeg_bytes], ids=["png", "jpeg"])
def test_infer_matches_the_library(client, library, make) -> None:
    data = make(57, 31, seed=11)
    features, errors = _infer(client, [data])
    assert features.dtype == np.float32 and features.shape == (1, 16, 64)
    assert errors == [""]
    np.testing.assert_allclose(features[0], _library(library, data), atol=1e-5, rtol=0)


def test_concurrent_requests_are_batched(service, client, library) -> None:
    before = service.metrics()
    images = [png_bytes(40, 40, seed=i) for i in range(16)]
    with cf.ThreadPoolExecutor(len(images)) as pool:
        results = list(pool.map(lambda d: _infer(client, [d]), images))
    for data, (features, errors) in zip(images, results, strict=True):
        assert errors == [""]
        np.testing.assert_allclose(features[0], _library(library, data), atol=1e-5, rtol=0)
    after = service.metrics()
    inferences = after["nv_inference_count"] - before["nv_inference_count"]
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert inferences == 16
    assert executions < inferences, f"{executions} executions for {inferences} inferences"


def test_bad_items_fail_in_band_and_spare_their_batch_mates(client, library) -> None:
    good = png_bytes(64, 64, seed=3)
    truncated = good[: len(good) // 2]
    features, errors = _infer(client, [good, b"definitely not an image", truncated, b""])
    assert errors[0] == ""
    assert errors[1].startswith("not an image: expected the bytes of an image file")
    assert errors[2].startswith("corrupt or truncated image: expected a complete PNG file")
    assert errors[3].startswith("empty image")
    np.testing.assert_allclose(features[0], _library(library, good), atol=1e-5, rtol=0)
    assert not features[1:].any()


def test_bad_request_sent_alongside_a_good_one(client, library) -> None:
    good = jpeg_bytes(64, 48, seed=4)
    bad = png_bytes(64, 64)[:-3000]
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_infer, client, [x]) for x in (good, bad, good, bad)]
        (f0, e0), (_, e1), (f2, e2), (_, e3) = [f.result() for f in futures]
    assert e0 == e2 == [""]
    assert e1[0].startswith("corrupt or truncated image") and e3[0].startswith("corrupt")
    np.testing.assert_allclose(f0[0], _library(library, good), atol=1e-5, rtol=0)
    np.testing.assert_allclose(f2[0], f0[0], atol=1e-5, rtol=0)


def test_keeps_serving_after_bad_input(client) -> None:
    for _ in range(3):
        _infer(client, [b"\x89PNG\r\n\x1a\n broken"])
    features, errors = _infer(client, [png_bytes(seed=9)])
    assert errors == [""] and features.shape == (1, 16, 64) and features.any()


def test_items_over_grpcs_default_4_mib_limit(client, library) -> None:
    big = png_bytes(1500, 1400, seed=13)  # random pixels do not compress: ~6 MiB
    assert len(big) > 4 * 1024 * 1024
    features, errors = _infer(client, [big, b"\0" * (5 * 1024 * 1024)])
    assert errors[0] == "" and errors[1].startswith("not an image")
    np.testing.assert_allclose(features[0], _library(library, big), atol=1e-5, rtol=0)


def test_request_id_reaches_the_logs(service, client) -> None:
    _infer(client, [png_bytes(seed=12), b"nope"], request_id="itest-rid-42")

    def logged() -> list[dict]:
        lines = [json.loads(x) for x in service.proc.log_text().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("request_id") == "itest-rid-42"]

    entries = wait_until(logged, timeout=10, what="log lines with the request id")
    assert any("refused" in e["msg"] for e in entries)
    assert any("encoded 2 item(s)" in e["msg"] for e in entries)


async def test_encoder_client(service, library) -> None:
    async with EncoderClient(service.target, settings=Settings()) as enc:
        assert await enc.ready(MODEL)
        assert not await enc.ready("no_such_model")
        items = [png_bytes(20, 60, seed=5), jpeg_bytes(70, 20, seed=6)]
        out = await enc.encode(MODEL, items, request_id="itest-client", timeout_s=30)
        assert [o.features.shape for o in out] == [(16, 64), (16, 64)]
        assert [list(o.times) for o in out] == [[0.0], [0.0]]
        for data, item in zip(items, out, strict=True):
            np.testing.assert_allclose(item.features, _library(library, data), atol=1e-5, rtol=0)
        assert await enc.encode(MODEL, [], timeout_s=5) == []

        with pytest.raises(EncoderItemError, match=r"^image 1: not an image: ") as info:
            await enc.encode(MODEL, [items[0], b"garbage", items[1]], timeout_s=30)
        assert info.value.index == 1 and info.value.http_status == 400
        with pytest.raises(DeadlineExceededError, match="did not answer"):
            await enc.encode(MODEL, items, timeout_s=1e-4)
        # A model the server does not have (yet: a restarting server registers its models one by
        # one) is a 503 naming the service and the model, retried on another replica.
        with pytest.raises(UnavailableError, match=r"encoder service is unavailable.*no_such_model"):
            await enc.encode("no_such_model", items, timeout_s=30)


MEDIA = {
    "video": lambda i: make_video(4 + 4 * i, 4),  # 1 + i seconds: 1 + i frames at 1 fps
    "audio": lambda i: make_audio(1.0 + i, 16000, freq=300.0 + 100 * i),
    "event": lambda i: make_events(500 + 100 * i, 40, 30, seed=i),
}


@pytest.mark.parametrize("modality", list(MEDIA))
def test_every_modality_matches_the_library(service, client, preset, libraries, modality) -> None:
    model = preset.triton_model(modality)
    items = [MEDIA[modality](i % 4) for i in range(8)]
    before = service.metrics(model)
    with cf.ThreadPoolExecutor(len(items)) as pool:  # concurrent: batched with differing frames
        results = list(pool.map(lambda d: _infer_all(client, [d], model), items))
    counts: dict[str, float] = {}

    def counted() -> bool:  # Triton refreshes its metrics periodically, not per request
        after = service.metrics(model)
        counts.update({k: after[k] - before[k] for k in ("nv_inference_count", "nv_inference_exec_count")})
        return counts["nv_inference_count"] >= 8

    wait_until(counted, timeout=30, what=f"{model}: Triton's metrics count the 8 inferences")
    inferences, executions = counts["nv_inference_count"], counts["nv_inference_exec_count"]
    assert inferences == 8 and executions < inferences, f"{executions} executions for {inferences} inferences"
    for data, (features, times, errors) in zip(items, results, strict=True):
        assert errors == [""]
        want = _encoded(libraries[modality], data)
        assert features.shape == (1, *want.features.shape) and times.shape == (1, len(want.times))
        np.testing.assert_allclose(features[0], want.features, atol=1e-4, rtol=0)
        np.testing.assert_allclose(times[0], want.times, atol=1e-6)
    if modality == "video":
        assert [r[1].shape[1] for r in results] == [1, 2, 3, 4] * 2


def test_bad_items_of_each_modality_fail_alone(client, preset) -> None:
    good = MEDIA["video"](1)
    features, times, errors = _infer_all(
        client, [good, b"\x00\x00\x00\x18ftypmp42 broken", MEDIA["video"](3)], "video_eva_vit"
    )
    assert errors[0] == "" and errors[2] == ""
    assert errors[1].startswith("corrupt or truncated video") or errors[1].startswith("not a video")
    assert features.shape == (3, 4 * 4, 32)  # padded to the longest item (4 frames)
    assert np.isnan(times[0, 2:]).all() and not np.isnan(times[2]).any() and not features[1].any()
    _, _, errors = _infer_all(client, [make_audio(1.0, 16000, amplitude=0.0)], "audio_imagebind")
    assert errors[0].startswith("audio is silent")
    _, _, errors = _infer_all(client, [make_events(10, 5, 5), b"\x93NUMPY garbage"], "event_clip_vision")
    assert errors[0] == "" and errors[1].startswith("event file")


async def test_encoder_client_modalities(service, preset, libraries) -> None:
    async with EncoderClient(service.target, settings=Settings()) as enc:
        videos = [MEDIA["video"](i) for i in (0, 3)]
        out = await enc.encode("video_eva_vit", videos, timeout_s=60, modality="video")
        assert [len(o.times) for o in out] == [1, 4] and [o.features.shape for o in out] == [
            (4, 32),
            (16, 32),
        ]
        np.testing.assert_allclose(out[1].times, [0.0, 1.0, 2.0, 3.0])
        with pytest.raises(EncoderItemError, match=r"^video 1: (not a video|corrupt)") as info:
            await enc.encode("video_eva_vit", [videos[0], b"garbage bytes"], timeout_s=60, modality="video")
        assert info.value.index == 1
        (event,) = await enc.encode("event_clip_vision", [MEDIA["event"](0)], timeout_s=60, modality="event")
        assert event.features.shape == (5 * 17, 64) and len(event.times) == 5


async def test_sigterm_stops_cleanly_and_the_client_reconnects(service, library) -> None:
    proc = service.proc
    children = descendants(proc.pid)
    assert any("tritonserver" in command_line(p) for p in children), children
    assert children <= proc.group_members()
    async with EncoderClient(service.target, settings=Settings()) as enc:
        data = png_bytes(seed=21)
        (before,) = await enc.encode(MODEL, [data], timeout_s=30)
        before = before.features

        assert proc.terminate(timeout=60) == 0, proc.log_tail()
        # Its children (tritonserver, the Python-backend stub) are gone, none orphaned.
        wait_until(
            lambda: not any(pid_alive(p) for p in children) and not proc.group_members(),
            timeout=10,
            what="no process of the service left",
        )

        assert not await enc.ready(MODEL)
        with pytest.raises(UnavailableError, match=rf"unavailable at {service.target}"):
            await enc.encode(MODEL, [data], timeout_s=10)

        service.start()
        (after,) = await enc.encode(MODEL, [data], timeout_s=30)
        np.testing.assert_allclose(after.features, before, atol=1e-6, rtol=0)
        assert await enc.ready(MODEL)
