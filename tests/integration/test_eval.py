"""`modalmesh eval shapes` against the real tiny stack (encoders, LLM, gateway processes): a
first run of 6 samples, then a second run of all 8 that asks only the 2 not yet answered,
seen both in the predictions file and in the gateway's own request counter."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.procs import free_ports, stop_all, wait_until
from tests.helpers.services import gateway_healthy, start_encoders, start_gateway, start_llm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway_url(
    tiny_cache_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Encoders, LLM and gateway on free ports, healthy."""
    logs = tmp_path_factory.mktemp("eval-logs")
    enc_http, enc_grpc, enc_metrics, llm_port, gw_http, gw_grpc = free_ports(6)
    env = {
        "MODALMESH_CACHE_DIR": str(tiny_cache_dir),
        "MODALMESH_LLM_ADDRESS": f"127.0.0.1:{llm_port}",
        "MODALMESH_ENCODER_ADDRESS": f"127.0.0.1:{enc_grpc}",
        "MODALMESH_REDIS_URL": redis_url,
    }
    procs = [
        start_encoders(env, logs / "encoders.log", http=enc_http, grpc=enc_grpc, metrics=enc_metrics),
        start_llm(env, logs / "llm.log", port=llm_port),
    ]
    gateway, base_url, _ = start_gateway(env, logs / "gateway.log", ports=(gw_http, gw_grpc))
    procs.append(gateway)
    try:
        wait_until(lambda: gateway_healthy(base_url), timeout=180, what="gateway healthy", proc=gateway)
        yield base_url
    finally:
        stop_all(reversed(procs))


def _chat_requests(base_url: str) -> float:
    """The gateway's count of answered POST /v1/chat/completions (status 200)."""
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    found = re.findall(r"^modalmesh_gateway_requests_total\{([^}]*)\} (\S+)$", text, re.MULTILINE)
    return sum(float(v) for labels, v in found if "chat/completions" in labels and 'status="200"' in labels)


def _eval(base_url: str, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [
        "eval",
        "shapes",
        "--data",
        str(data),
        "--model",
        "tiny",
        "--gateway",
        base_url,
        "--out",
        str(out),
    ]
    args += ["--concurrency", "3", "--max-bad-ratio", "1", *extra]
    return subprocess.run(
        [sys.executable, "-m", "modalmesh", *args], capture_output=True, text=True, timeout=120
    )


def test_eval_shapes_runs_and_resumes(gateway_url: str, tmp_path: Path) -> None:
    from services.trainer.synth import synthesize

    synthesize(tmp_path / "data", train=4, heldout=8, seed=5, modalities=["image"])
    out = tmp_path / "out"
    before = _chat_requests(gateway_url)
    t0 = time.perf_counter()

    first = _eval(gateway_url, tmp_path / "data", out, "--limit", "6")
    assert first.returncode == 0, first.stderr + first.stdout
    assert "6/6 done" in first.stderr and "accuracy *" in first.stdout
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6
    assert _chat_requests(gateway_url) - before == 6

    second = _eval(gateway_url, tmp_path / "data", out)
    assert second.returncode == 0, second.stderr + second.stdout
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(r["error"] is None and isinstance(r["reply"], str) for r in records)
    assert sorted(r["index"] for r in records) == list(range(8))  # each sample once
    assert sorted(r["index"] for r in records[6:]) == [6, 7]  # run 2 asked only these
    assert {r["seed"] - r["index"] for r in records} == {0}
    assert _chat_requests(gateway_url) - before == 8  # the first 6 were not asked again
    print(f"two eval runs, 8 samples: {time.perf_counter() - t0:.1f}s")

    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["benchmark"], metrics["model"]) == ("shapes", "tiny")
    assert (metrics["samples"], metrics["finished"]) == (8, 8)
    empty = sum(not r["reply"].strip() for r in records)
    assert metrics["answered"] == 8 and metrics["bad"]["by_reason"] == (
        {"empty_reply": empty} if empty else {}
    )
    assert metrics["stopped"] is False
    scores = metrics["scores"]
    assert scores["total"] == 8 and scores["main"] == "accuracy"
    assert set(scores["metrics"]) == {"accuracy", "accuracy/color", "accuracy/describe", "accuracy/shape"}
    # the score is what the demo's scorer says of the same replies
    from services.trainer.synth import score_reply

    heldout = json.loads((tmp_path / "data" / "heldout.json").read_text())
    right = sum(score_reply(r["reply"] or "", heldout[r["index"]]) for r in records)
    assert scores["metrics"]["accuracy"] == pytest.approx(right / 8)


def _llava(base_url: str, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["eval", "llava", "--data", str(data), "--model", "tiny", "--gateway", base_url]
    args += ["--out", str(out), "--concurrency", "1", *extra]
    return subprocess.run(
        [sys.executable, "-m", "modalmesh", *args], capture_output=True, text=True, timeout=120
    )


def test_eval_llava_counts_bad_samples_with_the_gateways_reasons(gateway_url: str, tmp_path: Path) -> None:
    """A missing image is not sent; a modality the tiny preset does not take is refused by the
    gateway (400, its message kept); past --max-bad-ratio a run exits 1 with the counts."""
    from tests.helpers.media import png_bytes

    (tmp_path / "a.png").write_bytes(png_bytes(32, 32, seed=1))
    (tmp_path / "t.wav").write_bytes(b"RIFF0000WAVE")

    def turns(placeholder: str) -> list[dict[str, str]]:
        return [{"from": "human", "value": f"{placeholder}\nWhat is it?"}, {"from": "gpt", "value": "red"}]

    records = [
        {"id": "gone", "image": "gone.png", "conversations": turns("<image>")},
        {"id": "ok", "image": "a.png", "conversations": turns("<image>")},
        {"id": "audio", "audio": "t.wav", "conversations": turns("<audio>")},
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))

    run = _llava(gateway_url, data, tmp_path / "all", "--max-bad-ratio", "1")
    assert run.returncode == 0, run.stderr + run.stdout
    out = {
        r["id"]: r for r in map(json.loads, (tmp_path / "all" / "predictions.jsonl").read_text().splitlines())
    }
    assert out["gone"]["error"] == "missing_media" and out["ok"]["error"] is None
    assert out["audio"]["error"] == "http_400" and "audio" in out["audio"]["message"], out["audio"]
    metrics = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert metrics["bad"]["by_reason"] == {"http_400": 1, "missing_media": 1} | (
        {"empty_reply": 1} if not out["ok"]["reply"].strip() else {}
    )
    assert metrics["scores"]["failed"]["no_answer"] == 2 and metrics["scores"]["total"] == 3

    stopped = _llava(gateway_url, data, tmp_path / "stopped")  # default 0.05: 1 bad of 3 is over
    assert stopped.returncode == 1 and "STOPPED" in stopped.stdout, stopped.stderr + stopped.stdout
    metrics = json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    assert (metrics["stopped"], metrics["finished"], metrics["bad"]["by_reason"]) == (
        True,
        1,
        {"missing_media": 1},
    )
