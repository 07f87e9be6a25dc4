"""`modalmesh demo --no-train` on the tiny-nextgpt twin, as a user runs it: `modalmesh up`
starts every service (the decoder service included), the streamed image question is answered,
then the demo asks for an image, a sound and a clip and saves them beside the logs; the files
are opened and checked. The training part of the demo is covered by the trainer's tests."""

from __future__ import annotations

import io
import json
import os
import re
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


def test_make_demo_trains_publishes_and_scores(tiny_cache_dir: Path, redis_url: str, tmp_path: Path) -> None:
    """The main job (`make demo`: the tiny preset, stage 1 and stage 3 through the queue on 2
    DeepSpeed ranks, each published and hot-swapped, the held-out set scored through
    services.eval.runner before and after training), end to end."""
    flags = [
        "--gateway-port", "--grpc-port", "--llm-port", "--llm-metrics-port", "--encoder-http-port",
        "--encoder-grpc-port", "--encoder-metrics-port",
    ]  # fmt: skip
    ports = [
        arg for flag, port in zip(flags, free_ports(len(flags)), strict=True) for arg in (flag, str(port))
    ]
    argv = [sys.executable, "-m", "modalmesh", "demo", "--cache-dir", str(tiny_cache_dir), "--redis-url",
            redis_url, "--log-dir", str(tmp_path / "logs"), *ports]  # fmt: skip
    # the jobs and the published versions go to this test's folders, not the shared cache's
    env = {
        **os.environ,
        "MODALMESH_JOBS_DIR": str(tmp_path / "jobs"),
        "MODALMESH_ARTIFACT_DIR": str(tmp_path / "store"),
    }
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL, env=env
    )
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr[-3000:]}"
    assert sorted(p.name for p in (tmp_path / "store" / "tiny").iterdir()) == ["2", "3"]
    assert "answer: " in out and "any-to-any" not in out  # the tiny preset has no outputs
    for stage in ("stage1: tiny@", "stage3: tiny@"):
        assert stage in out, out
    assert "from `modalmesh up` to the held-out score" in out
    line = re.search(r"held-out accuracy: before (\S+)% -> after (\S+)% \(shapes, (\d+) samples", out)
    assert line, out
    evals = tmp_path / "logs" / "eval"
    assert f"held-out predictions and metrics: {evals}/before, {evals}/after" in out
    metrics = {k: json.loads((evals / k / "metrics.json").read_text()) for k in ("before", "after")}
    refs = [m.group(1) for m in re.finditer(r"stage3: published (\S+);", out)]
    assert metrics["before"]["model"] == "tiny@1" and [metrics["after"]["model"]] == refs
    for when, printed in zip(("before", "after"), line.groups()[:2], strict=True):
        m = metrics[when]
        assert m["benchmark"] == "shapes" and m["samples"] == int(line.group(3)) == m["finished"]
        assert f"{m['scores']['metrics']['accuracy']:.1%}" == printed + "%"
        predictions = (evals / when / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == m["samples"]
    assert not metrics["after"]["stopped"] and metrics["before"]["bad"]["max_ratio"] == 1.0
    # training helps: the trained version answers more of the unseen images than the initial one
    after, before = (metrics[k]["scores"]["metrics"]["accuracy"] for k in ("after", "before"))
    assert after > before, (before, after)
