"""`modalmesh demo`: start the stack with `modalmesh up`, train it, ask it about images, stop it.

First one question through the gateway's OpenAI-compatible API with the official `openai`
client, streamed, with the image as a base64 data URL: on the tiny preset the models have
random weights, so the answer is well-formed but meaningless. A preset with outputs
(`--preset tiny-nextgpt`) is then asked to draw, play and show something, and the image,
sound and clip it returns are saved beside the logs. Then the training loop
(`demo_training`): a synthetic data set, stage 1 and stage 3 through the job queue on 2
DeepSpeed ranks, each published and hot-swapped into the running LLM service, and the served
model scored on held-out images. `--no-train` stops after the first question.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from modalmesh.stack import free_port, port_is_free
from services.common.health import http_ok
from services.common.settings import Settings

_PORT_FIELDS = (
    "gateway_http_port",
    "gateway_grpc_port",
    "llm_port",
    "llm_metrics_port",
    "encoder_http_port",
    "encoder_grpc_port",
    "encoder_metrics_port",
    "decoder_http_port",
    "decoder_grpc_port",
    "decoder_metrics_port",
    "supervisor_port",
)
# What the demo asks a preset with outputs for, per output modality, and the file it saves.
GENERATE_ASKS = {
    "image": ("draw a red circle on a blue sky", "png"),
    "audio": ("play the sound of rain", "wav"),
    "video": ("show a clip of a boat on the sea", "mp4"),
}


def demo_image_png() -> bytes:
    """A small synthetic picture: a red circle and a yellow square on blue."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 64), (40, 70, 200))
    draw = ImageDraw.Draw(img)
    draw.ellipse((8, 12, 48, 52), fill=(220, 30, 30))
    draw.rectangle((58, 18, 86, 46), fill=(240, 220, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _free_ports(settings: Settings) -> Settings:
    """Keep the configured ports where free; pick free ones where taken (e.g. by a running stack)."""
    updates = {
        f: free_port(settings.host)
        for f in _PORT_FIELDS
        if not port_is_free(settings.host, getattr(settings, f))
    }
    return settings.model_copy(update=updates)


def _up_argv(settings: Settings, log_dir: Path, start_timeout: float) -> list[str]:
    return [
        sys.executable,
        "-m",
        "modalmesh",
        "up",
        "--preset",
        settings.preset,
        "--cache-dir",
        str(settings.cache_dir),
        "--host",
        settings.host,
        "--gateway-port",
        str(settings.gateway_http_port),
        "--grpc-port",
        str(settings.gateway_grpc_port),
        "--llm-port",
        str(settings.llm_port),
        "--llm-metrics-port",
        str(settings.llm_metrics_port),
        "--encoder-http-port",
        str(settings.encoder_http_port),
        "--encoder-grpc-port",
        str(settings.encoder_grpc_port),
        "--encoder-metrics-port",
        str(settings.encoder_metrics_port),
        "--decoder-http-port",
        str(settings.decoder_http_port),
        "--decoder-grpc-port",
        str(settings.decoder_grpc_port),
        "--decoder-metrics-port",
        str(settings.decoder_metrics_port),
        "--supervisor-port",
        str(settings.supervisor_port),
        "--redis-url",
        settings.redis_url,
        "--log-dir",
        str(log_dir),
        "--start-timeout",
        str(start_timeout),
        "--exit-on-failure",  # a one-shot run: a service that dies fails the demo at once
    ]


def _ask(base_url: str, model: str) -> tuple[str, float, object]:
    """One streamed image chat; returns the answer, seconds to the first token, and usage."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", timeout=120.0, max_retries=0)
    url = "data:image/png;base64," + base64.b64encode(demo_image_png()).decode()
    t0 = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What shapes and colours are in this picture?"},
                ],
            }
        ],
        max_tokens=32,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    print("answer: ", end="", flush=True)
    served_by = None
    for chunk in stream:
        served_by = chunk.system_fingerprint or served_by
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                first = first if first is not None else time.perf_counter() - t0
                parts.append(choice.delta.content)
                print(choice.delta.content, end="", flush=True)
    print(f"  (served by adapter {served_by}; {model}@1 is the untrained one)", flush=True)
    return "".join(parts), first if first is not None else time.perf_counter() - t0, usage


def _media_bytes(entry: dict[str, object]) -> bytes:
    """The file of a reply's media entry (image_url / video_url data URL, input_audio base64)."""
    kind = str(entry["type"])
    part = entry[kind]
    assert isinstance(part, dict)
    data = str(part["data"] if kind == "input_audio" else part["url"].partition(",")[2])
    return base64.b64decode(data)


def _generate(base: str, model: str, modalities: list[str], out_dir: Path) -> int:
    """Ask for each output modality in turn and save what comes back; returns how many failed."""
    import httpx

    print(f"\n== any-to-any: the preset produces {', '.join(modalities)}; files go to {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for modality in modalities:
        ask, ext = GENERATE_ASKS[modality]
        body = {
            "model": model,
            "messages": [{"role": "user", "content": ask}],
            "max_tokens": 16,
            "temperature": 0.0,
            "modalities": ["text", modality],
        }
        t = time.perf_counter()
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300.0)
        seconds = time.perf_counter() - t
        if r.status_code != 200:
            print(f"{modality}: the gateway answered {r.status_code}: {r.text[:300]}", file=sys.stderr)
            failed += 1
            continue
        message = r.json()["choices"][0]["message"]
        for entry in message.get("media") or []:
            if entry["type"] == "error":
                print(f"{modality}: {entry['error']['message']}", file=sys.stderr)
                failed += 1
                continue
            path = out_dir / f"{modality}.{ext}"
            path.write_bytes(_media_bytes(entry))
            print(
                f"{ask!r} -> {path} ({path.stat().st_size} bytes, {seconds:.2f}s); text: {message['content']!r}"
            )
    return failed


def _preset(settings: Settings) -> Any:
    """The served preset, or None when it cannot be read here."""
    from services.common.errors import ModalmeshError
    from services.common.presets import load_preset

    try:
        return load_preset(settings.preset, cache_dir=settings.cache_dir, presets_dir=settings.presets_dir)
    except ModalmeshError:
        return None


def _train(base: str, settings: Settings, t0: float, preset: Any, log_dir: Path) -> int:
    from modalmesh.demo_training import print_report, run_training_demo

    if preset is not None and "image" not in preset.modalities:  # an unreadable preset: try anyway
        print(
            f"\n== training: skipped (the demo trains on pictures; preset {settings.preset} takes no images)"
        )
        return 0
    print("\n== training: stage 1 (connector alignment) then stage 3 (LoRA + connector) through the queue")
    try:
        report = run_training_demo(
            base, settings.cache_dir / "demo" / "shapes", log_dir / "eval", settings.preset
        )
    except Exception as e:
        print(f"the training demo failed: {e}", file=sys.stderr)
        return 1
    print("\n== summary")
    print_report(report)
    print(f"{time.perf_counter() - t0:.1f}s from `modalmesh up` to the held-out score")
    return 0


def run_demo(settings: Settings, *, log_dir: Path, start_timeout: float = 300.0, train: bool = True) -> int:
    """Run the demo; returns the process exit code."""
    settings = _free_ports(settings)
    base = f"http://{settings.host}:{settings.gateway_http_port}"
    t0 = time.perf_counter()
    print(f"$ modalmesh up --preset {settings.preset}  (logs in {log_dir})", flush=True)
    up = subprocess.Popen(
        _up_argv(settings, log_dir, start_timeout), stdin=subprocess.DEVNULL, env=os.environ.copy()
    )
    try:
        while not http_ok(f"{base}/health"):
            if up.poll() is not None:
                print(f"modalmesh up exited with code {up.returncode} before it was ready", file=sys.stderr)
                return 1
            if time.perf_counter() - t0 > start_timeout + 30:
                print("modalmesh up did not become ready in time", file=sys.stderr)
                return 1
            time.sleep(0.25)
        ready_s = time.perf_counter() - t0
        answer, first_token_s, usage = _ask(f"{base}/v1", settings.preset)
        answer_s = time.perf_counter() - t0
        print(f"usage: {usage}")
        print(
            f"stack ready after {ready_s:.1f}s; first answer token {first_token_s * 1000:.0f} ms "
            f"after the request; {answer_s:.1f}s from `modalmesh up` to the full answer"
        )
        if not answer:
            print("the model returned an empty answer", file=sys.stderr)
        preset = _preset(settings)
        outputs = [m for m in preset.outputs if m in GENERATE_ASKS] if preset is not None else []
        if outputs and _generate(base, settings.preset, outputs, log_dir / "media"):
            return 1
        if not train:
            return 0
        return _train(base, settings, t0, preset, log_dir)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
