"""`python -m bench` end to end on its cheapest benchmark: the JSON report has figures and ratios."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_quick_transport_writes_figures_with_baselines_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--quick", "--only", "transport,ceiling", "--out", str(out), "--workdir", str(tmp_path / "work")]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "MB/s" in done.stdout  # the table

    report = json.loads(out.read_text())
    assert report["meta"]["quick"] is True
    assert report["meta"]["glibc_tunables"]  # the bench re-ran itself with the services' allocator settings
    ceiling = {f["name"]: f for f in report["benchmarks"]["ceiling"]}
    assert set(ceiling) == {"decode tokens/s B=16", "chat tokens/s ceiling @16"}
    assert all(f["value"] > 0 and f["baseline"] > 0 for f in ceiling.values())
    figures = report["benchmarks"]["transport"]
    assert {f["name"] for f in figures} >= {"MB/s 576x4096 fp16", "MB/s 16x64 fp32"}
    for f in figures:
        assert f["unit"] == "MB/s" and f["better"] == "higher"
        assert f["value"] > 0 and f["baseline"] > 0
        assert math.isclose(f["ratio"], f["value"] / f["baseline"])
        assert math.isclose(f["gain"], f["ratio"])


def test_quick_decoder_benchmark(tmp_path: Path, tiny_cache_dir: Path) -> None:
    """The decoder service started for tiny-nextgpt (the bench preset has no outputs): images/s
    at 8 concurrent vs 1, and a request vs the seed's load-the-pipeline-per-call."""
    out = tmp_path / "bench.json"
    args = ["--quick", "--only", "decoder", "--out", str(out), "--workdir", str(tiny_cache_dir)]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=400, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    figures = {f["name"]: f for f in json.loads(out.read_text())["benchmarks"]["decoder"]}
    assert set(figures) == {"images/s @8", "s/image, loaded once"}
    assert (figures["images/s @8"]["unit"], figures["s/image, loaded once"]["better"]) == (
        "images/s",
        "lower",
    )
    assert all(f["value"] > 0 and f["baseline"] > 0 for f in figures.values())
    assert "tiny-nextgpt image decoder" in figures["images/s @8"]["note"]


def test_unknown_benchmark_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "nope", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown benchmark" in done.stderr


def test_baseline_answers_the_same_greedy_text_as_modalmesh(tmp_path: Path) -> None:
    """The comparison is honest: same preset, same prompt, same tokens (streamed and not)."""
    import httpx

    from bench._client import chat_body
    from bench._stack import running
    from bench.chat import fresh_png

    with running("tiny", tmp_path, modalmesh=True, encoders=False, baseline=True) as stack:
        assert stack.gateway_url is not None and stack.baseline_url is not None
        for _ in range(2):
            body = {**chat_body("tiny", fresh_png(), 24), "stream": False}
            body.pop("stream_options")
            answers = [
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
                for url in (stack.gateway_url, stack.baseline_url)
            ]
            texts = [a["choices"][0]["message"]["content"] for a in answers]
            assert texts[0] == texts[1]
            assert answers[0]["usage"]["completion_tokens"] == answers[1]["usage"]["completion_tokens"] == 24
        body = chat_body("tiny", fresh_png(), 16)
        streamed = []
        for url in (stack.gateway_url, stack.baseline_url):
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                text = ""
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[len("data: ") :])
                        text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
                streamed.append(text)
        assert streamed[0] == streamed[1] and streamed[0]
