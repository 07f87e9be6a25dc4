"""`modalmesh demo --no-train` on the tiny-nextgpt twin, as a user runs it: `modalmesh up`
starts every service (the decoder service included), the streamed image question is answered,
then the demo asks for an image, a sound and a clip and saves them beside the logs; the files
are opened and checked. The training part of the demo is covered by the trainer's tests."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.procs import free_ports

pytestmark = pytest.mark.integration


def test_demo_answers_then_draws_plays_and_shows(
    tiny_cache_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    import av
    import soundfile
    from PIL import Image

    flags = [
        "--gateway-port", "--grpc-port", "--llm-port", "--llm-metrics-port", "--encoder-http-port",
        "--encoder-grpc-port", "--encoder-metrics-port", "--decoder-http-port", "--decoder-grpc-port",
        "--decoder-metrics-port",
    ]  # fmt: skip
    ports = [
        arg for flag, port in zip(flags, free_ports(len(flags)), strict=True) for arg in (flag, str(port))
    ]
    logs = tmp_path / "logs"
    argv = [sys.executable, "-m", "modalmesh", "demo", "--no-train", "--preset", "tiny-nextgpt",
            "--cache-dir", str(tiny_cache_dir), "--redis-url", redis_url, "--log-dir", str(logs), *ports]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr[-3000:]}"
    assert "answer: " in out and "first answer token" in out
    assert "== any-to-any: the preset produces image, video, audio" in out
    media = logs / "media"
    for name in ("image.png", "audio.wav", "video.mp4"):
        assert f"-> {media / name} (" in out, out

    image = Image.open(media / "image.png")
    assert image.format == "PNG" and image.size[0] > 0
    wav, rate = soundfile.read(io.BytesIO((media / "audio.wav").read_bytes()))
    assert rate == 16000 and len(wav) > 0
    with av.open(str(media / "video.mp4")) as container:
        frames = list(container.decode(video=0))
    assert frames and frames[0].width > 0
