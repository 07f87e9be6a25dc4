"""The decoder service as a real process: `python -m services.decoders` on free loopback ports.

Started once for the module on the tiny NExT-GPT twin (its tiny SD, AudioLDM and text-to-video
pipelines are generated into a temporary MODALMESH_CACHE_DIR on first use), then called with
stock `tritonclient.grpc` and with `DecoderClient`. The last test stops it with SIGTERM and
checks the exit code and that no Triton process is left.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from services.common.errors import DeadlineExceededError, InvalidArgumentError, UnavailableError
from services.common.presets import Preset, load_preset
from services.decoders.client import DecoderClient
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

PRESET = "tiny-nextgpt"
MODELS = {"image": "image_decoder", "audio": "audio_decoder", "video": "video_decoder"}
SHAPES = {"image": (77, 32), "audio": (1, 16), "video": (77, 48)}
START_TIMEOUT_S = 240.0


@dataclass
class DecoderService:
    cache_dir: Path
    log_dir: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    down_port: int  # nothing listens there
    proc: Process | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def ready(self) -> bool:
        client = grpcclient.InferenceServerClient(self.target)
        try:
            return bool(client.is_server_ready() and all(client.is_model_ready(m) for m in MODELS.values()))
        except InferenceServerException:
            return False
        finally:
            client.close()

    def start(self) -> Process:
        self.proc = start_process(
            [
                sys.executable,
                "-m",
                "services.decoders",
                "--preset",
                PRESET,
                "--host",
                "127.0.0.1",
                "--http-port",
                str(self.http_port),
                "--grpc-port",
                str(self.grpc_port),
                "--metrics-port",
                str(self.metrics_port),
            ],
            log_path=self.log_dir / "decoders.log",
            env={"MODALMESH_CACHE_DIR": str(self.cache_dir), "HF_HUB_OFFLINE": "1"},
        )
        wait_until(
            self.ready, timeout=START_TIMEOUT_S, interval=0.5, what="decoder service ready", proc=self.proc
        )
        return self.proc


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DecoderService]:
    root = tmp_path_factory.mktemp("decoder-service")
    svc = DecoderService(root / "cache", root / "logs", *free_ports(4))
    try:
        svc.start()
        yield svc
    finally:
        if svc.proc is not None:
            if svc.proc.alive():
                svc.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    svc.proc.popen.wait(timeout=30)
            svc.proc.kill_group()


@pytest.fixture(scope="module")
def preset(service: DecoderService) -> Preset:
    return load_preset(PRESET, cache_dir=service.cache_dir)


@pytest.fixture
def client(service: DecoderService) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(service.target)
    yield c
    c.close()


def conditioning(modality: str, seed: int = 0, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPES[modality])).astype(np.float32)


@dataclass
class Item:
    media: bytes
    mime_type: str
    seed: int
    error: str


def infer(
    client: grpcclient.InferenceServerClient,
    modality: str,
    params: list[Any],
    embeds: np.ndarray | None = None,
    *,
    datatype: str = "FP32",
) -> list[Item]:
    """One request of len(params) items; a params entry is a dict (sent as JSON) or raw bytes."""
    embeds = conditioning(modality, n=len(params)) if embeds is None else embeds
    e = grpcclient.InferInput("prompt_embeds", list(embeds.shape), datatype)
    e.set_data_from_numpy(embeds)
    raw = [p if isinstance(p, bytes) else json.dumps(p).encode() for p in params]
    p = grpcclient.InferInput("params", [len(raw), 1], "BYTES")
    p.set_data_from_numpy(np.array([[x] for x in raw], dtype=np.object_))  # (n, 1)
    result = client.infer(MODELS[modality], [e, p])
    columns = [result.as_numpy(name).reshape(-1) for name in ("media", "mime_type", "seed", "error")]
    return [
        Item(bytes(m), bytes(t).decode(), int(s), bytes(err).decode())
        for m, t, s, err in zip(*columns, strict=True)
    ]


def one(client: grpcclient.InferenceServerClient, modality: str, params: Any, seed: int = 0) -> Item:
    (item,) = infer(client, modality, [params], conditioning(modality, seed))
    return item


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def test_health_and_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    for modality, model in MODELS.items():
        meta = client.get_model_metadata(model, as_json=True)
        inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
        outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]}
        assert inputs == {"prompt_embeds": ("FP32", [-1, *SHAPES[modality]]), "params": ("BYTES", [-1, 1])}
        assert outputs == {
            "media": ("BYTES", [-1, 1]),
            "mime_type": ("BYTES", [-1, 1]),
            "seed": ("INT64", [-1, 1]),
            "error": ("BYTES", [-1, 1]),
        }
        config = client.get_model_config(model, as_json=True)["config"]
        assert int(config["max_batch_size"]) == 4 and "dynamic_batching" in config


def test_image_is_a_png_of_the_requested_size(client) -> None:
    item = one(client, "image", {"height": 48, "width": 72, "steps": 2, "seed": 5})
    assert (item.error, item.mime_type, item.seed) == ("", "image/png", 5)
    image = png(item.media)
    assert image.size == (72, 48) and image.mode == "RGB"
    default = one(client, "image", {})
    assert default.error == "" and png(default.media).size == (64, 64) and default.seed >= 0


def test_a_seed_gives_the_same_image_again(client) -> None:
    first = one(client, "image", {"steps": 2, "seed": 11}, seed=3)
    again = one(client, "image", {"steps": 2, "seed": 11}, seed=3)
    other = one(client, "image", {"steps": 2, "seed": 12}, seed=3)
    assert np.array_equal(np.asarray(png(first.media)), np.asarray(png(again.media)))
    assert not np.array_equal(np.asarray(png(first.media)), np.asarray(png(other.media)))


def test_audio_is_a_wav_of_the_requested_duration(client) -> None:
    item = one(client, "audio", {"duration_s": 1.5, "steps": 2})
    assert item.error == "" and item.mime_type == "audio/wav"
    with wave.open(io.BytesIO(item.media)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        assert w.getnframes() == 24000


@pytest.mark.parametrize(("fmt", "mime"), [(None, "video/mp4"), ("gif", "image/gif")])
def test_video_is_a_clip_of_the_requested_frames(client, fmt, mime) -> None:
    params: dict[str, Any] = {"height": 40, "width": 24, "num_frames": 5, "fps": 4, "steps": 2}
    if fmt:
        params["format"] = fmt
    item = one(client, "video", params)
    assert item.error == "" and item.mime_type == mime
    if fmt == "gif":
        image = Image.open(io.BytesIO(item.media))
        assert image.format == "GIF" and image.n_frames == 5 and image.size == (24, 40)
        return
    with av.open(io.BytesIO(item.media)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264" and stream.average_rate == 4
    assert len(frames) == 5 and frames[0].shape == (40, 24, 3)


@pytest.mark.parametrize(
    ("modality", "params", "message"),
    [
        ("image", {"steps": 21}, "steps: expected a number in [1, 20], got 21"),
        ("image", {"steps": 0}, "steps: expected a number in [1, 20], got 0"),
        ("image", {"height": 512}, "height: expected a number in [8, 256], got 512"),
        ("video", {"width": 4}, "width: expected a number in [8, 256], got 4"),
        ("image", {"width": 36}, "width: expected a multiple of 8, got 36"),
        ("video", {"num_frames": 17}, "num_frames: expected a number in [1, 16], got 17"),
        ("audio", {"duration_s": 5.0}, "duration_s: expected a number in [0.5, 4.0], got 5.0"),
        ("audio", {"duration_s": 0.1}, "duration_s: expected a number in [0.5, 4.0], got 0.1"),
        ("image", {"duration_s": 1.0}, "duration_s: does not apply to image decoding (got 1.0)"),
        ("audio", {"height": 64}, "height: does not apply to audio decoding (got 64)"),
        ("image", {"guidance_scale": "high"}, "guidance_scale: expected a number in [0.0, 30.0], got 'high'"),
        ("image", {"steps": [2]}, "steps: expected a number, got [2]"),
        ("image", {"seed": -5}, "seed: expected a number in [0, 9223372036854775807], got -5"),
        ("image", {"stepz": 2}, "stepz: unknown decoding parameter; expected some of ['steps', "),
        ("image", {"format": "mp4"}, "format: expected one of ['png'] for image, got 'mp4'"),
        ("image", b"{steps: 2", "params: expected a UTF-8 JSON object, got invalid JSON"),
        ("image", b"\xff\xfe", "params: expected a UTF-8 JSON object, got invalid JSON"),
        ("image", b"[1, 2]", "params: expected a JSON object, got a JSON list"),
    ],
)
def test_bad_params_are_refused_in_band(client, modality, params, message) -> None:
    item = one(client, modality, params)
    assert item.error.startswith(message), item.error
    assert (item.media, item.mime_type, item.seed) == (b"", "", -1)


def test_non_finite_conditioning_is_refused_in_band(client) -> None:
    embeds = conditioning("audio")
    embeds[0, 0, 3] = np.nan
    (item,) = infer(client, "audio", [{}], embeds)
    assert item.error == "prompt_embeds: expected finite values, got NaN or infinity"


@pytest.mark.parametrize(
    ("modality", "shape", "expected"),
    [
        ("image", (1, 77, 48), "[-1,77,32]"),
        ("audio", (1, 16), "[-1,1,16]"),
        ("video", (1, 76, 48), "[-1,77,48]"),
    ],
)
def test_conditioning_of_the_wrong_shape_is_refused(client, modality, shape, expected) -> None:
    with pytest.raises(InferenceServerException) as info:
        infer(client, modality, [{}], np.zeros(shape, dtype=np.float32))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    got = "[" + ",".join(str(d) for d in shape) + "]"
    assert (
        f"unexpected shape for input 'prompt_embeds' for model '{MODELS[modality]}'. Expected {expected}, got {got}"
        in info.value.message()
    )


@pytest.mark.parametrize(("dtype", "name"), [(np.float16, "FP16"), (np.int32, "INT32"), (np.float64, "FP64")])
def test_conditioning_of_the_wrong_dtype_is_refused(client, dtype, name) -> None:
    with pytest.raises(InferenceServerException) as info:
        infer(client, "image", [{}], conditioning("image").astype(dtype), datatype=name)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert (
        f"inference input 'prompt_embeds' data-type is '{name}', but model 'image_decoder' expects 'FP32'"
        in (info.value.message())
    )


def test_a_bad_item_fails_alone_in_its_request(client) -> None:
    good = {"steps": 2, "seed": 9}
    items = infer(client, "image", [good, {"steps": 50}, b"nope", {**good, "height": 32}])
    assert [i.error == "" for i in items] == [True, False, False, True]
    assert items[1].error.startswith("steps: expected") and items[2].error.startswith("params: expected")
    assert png(items[3].media).size == (64, 32)
    alone = one(client, "image", good, seed=0)  # the first item's conditioning
    a, b = np.asarray(png(items[0].media)).astype(int), np.asarray(png(alone.media)).astype(int)
    assert np.abs(a - b).max() <= 1


def test_more_items_than_the_batch_bound_are_refused(client) -> None:
    with pytest.raises(InferenceServerException, match="batch-size must be <= 4 for 'image_decoder'"):
        infer(client, "image", [{}] * 5)


def metrics(service: DecoderService, model: str) -> dict[str, float]:
    """Triton's counters of `model` from its Prometheus endpoint."""
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(rf'^(nv_inference_\w+)\{{model="{model}",version="1"\}} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


@pytest.mark.parametrize("modality", ["image", "video"])
def test_concurrent_requests_are_batched_and_bad_ones_fail_alone(service, modality) -> None:
    model = MODELS[modality]
    before = metrics(service, model)
    clients = [grpcclient.InferenceServerClient(service.target) for _ in range(8)]
    params: list[Any] = [{"steps": 2, "seed": 20 + i} for i in range(8)]
    params[5] = {"steps": 2, "num_frames": 99} if modality == "video" else {"steps": 2, "height": 9}
    try:
        with cf.ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(infer, c, modality, [p], conditioning(modality, i))
                for i, (c, p) in enumerate(zip(clients, params, strict=True))
            ]
            results = [f.result()[0] for f in futures]
    finally:
        for c in clients:
            c.close()
    assert [r.error == "" for r in results] == [k != 5 for k in range(8)]
    assert [r.seed for r in results if not r.error] == [20 + k for k in range(8) if k != 5]
    assert results[5].error.startswith("num_frames: expected" if modality == "video" else "height: expected")
    counts: dict[str, float] = {}

    def counted() -> bool:  # Triton refreshes its metrics periodically, not per request
        after = metrics(service, model)
        counts.update({k: after[k] - before[k] for k in ("nv_inference_count", "nv_inference_exec_count")})
        return counts["nv_inference_count"] >= 8

    wait_until(counted, timeout=30, what=f"{model}: Triton's metrics count the 8 inferences")
    inferences, executions = counts["nv_inference_count"], counts["nv_inference_exec_count"]
    assert inferences == 8 and executions < inferences, f"{executions} executions for {inferences} inferences"
    # The service's own log says how many items each pipeline batch held.
    assert re.search(rf'"{model}: decoded 1 item\(s\) in a batch of [2-4] ', service.proc.log_text())


async def test_decoder_client(service, preset) -> None:
    models = {m: preset.decoder_model(m) for m in preset.outputs}
    assert models == MODELS
    async with DecoderClient(service.target, timeout_s=60, models=models) as dec:
        assert await dec.ready("image_decoder") and not await dec.ready("no_such_model")
        image = await dec.decode(
            "image", conditioning("image")[0], {"width": 16, "seed": 3}, request_id="rid-1"
        )
        assert image.mime_type == "image/png" and image.seed == 3 and png(image.data).size == (16, 64)
        audio = await dec.decode("audio", conditioning("audio")[0].astype(np.float16), {"steps": 2})
        assert audio.mime_type == "audio/wav" and audio.data.startswith(b"RIFF")
        video = await dec.decode("video", conditioning("video")[0], None)
        assert video.mime_type == "video/mp4" and video.seed >= 0

        with pytest.raises(InvalidArgumentError) as info:
            await dec.decode("image", conditioning("image")[0], {"steps": 500})
        assert info.value.message == "steps: expected a number in [1, 20], got 500"
        assert info.value.http_status == 400
        with pytest.raises(
            InvalidArgumentError,
            match=r"^decoder service: unexpected shape .* Expected \[-1,77,32\], got \[1,77,48\]\.$",
        ):
            await dec.decode("image", conditioning("video")[0])
        with pytest.raises(
            InvalidArgumentError, match=r"expected a 2-D float array .* got shape \(1, 77, 32\)"
        ):
            await dec.decode("image", conditioning("image"))
        with pytest.raises(InvalidArgumentError, match=r"int64"):
            await dec.decode("image", np.zeros((77, 32), dtype=np.int64))
        with pytest.raises(
            InvalidArgumentError, match=r"output modality: expected one of \['audio', 'image', "
        ):
            await dec.decode("event", conditioning("image")[0])
    async with DecoderClient(service.target, timeout_s=1e-4, models=models) as dec:
        with pytest.raises(DeadlineExceededError, match="did not answer"):
            await dec.decode("video", conditioning("video")[0], {"steps": 20})


async def test_decoder_client_when_the_service_is_down(service) -> None:
    target = f"127.0.0.1:{service.down_port}"
    async with DecoderClient(target, timeout_s=30) as dec:
        assert not await dec.ready("image_decoder")
        start = time.monotonic()
        with pytest.raises(UnavailableError, match=rf"^decoder service at {target}: "):
            await dec.decode("image", conditioning("image")[0])
        assert time.monotonic() - start < 5


def test_request_id_reaches_the_logs(service, client) -> None:
    e = grpcclient.InferInput("prompt_embeds", [1, 1, 16], "FP32")
    e.set_data_from_numpy(conditioning("audio"))
    p = grpcclient.InferInput("params", [1, 1], "BYTES")
    p.set_data_from_numpy(np.array([[b'{"steps": 1}']], dtype=np.object_))
    client.infer("audio_decoder", [e, p], headers={"x-request-id": "itest-dec-77"})

    def logged() -> list[dict]:
        lines = [json.loads(x) for x in service.proc.log_text().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("request_id") == "itest-dec-77"]

    entries = wait_until(logged, timeout=10, what="log lines with the request id")
    assert any("decoded 1 item(s)" in e["msg"] for e in entries)


def test_sigterm_stops_cleanly(service) -> None:
    proc = service.proc
    assert proc is not None
    children = descendants(proc.pid)
    assert any("tritonserver" in command_line(p) for p in children), children
    assert proc.terminate(timeout=60) == 0, proc.log_tail()
    wait_until(
        lambda: not any(pid_alive(p) for p in children) and not proc.group_members(),
        timeout=10,
        what="no process of the service left",
    )


def test_a_preset_without_outputs_exits_2(tmp_path) -> None:
    preset = tmp_path / "no-outputs.yaml"
    preset.write_text(
        "name: no-outputs\n"
        "modalities:\n"
        "  image:\n"
        "    encoder: {backbone: clip_vision, checkpoint: /nonexistent/clip, tokens: 4, dim: 32}\n"
        "    connector: {type: linear}\n"
        '    placeholder: "<image>"\n'
        "llm: {architecture: llama, checkpoint: /nonexistent/llm}\n"
        "adapter: {name: x, path: /nonexistent/adapter}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "services.decoders", "--preset", str(preset)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"MODALMESH_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 2, out.stderr
    assert "preset no-outputs has no outputs: no decoder to serve" in out.stderr
