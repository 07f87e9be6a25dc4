"""A bounded load test on loopback: 400 chats in two waves of 200 concurrent requests through
the REST API of the tiny stack (text and image, plain and streamed), every reply checked, and
the resident memory of each service process (children included: Triton under the encoders)
sampled every 0.2 s before, during and after.

The figures are printed as a table (`pytest -s`) and written as JSON to the test's tmp_path
and to /tmp/modalmesh-load.json.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.procs import descendants
from tests.reliability.conftest import MAX_QUEUED, Stack, image_messages, text_messages

pytestmark = pytest.mark.reliability

WAVES = 2
CONCURRENCY = 200
IMAGES = 25  # distinct images: the first use of each misses the feature cache, repeats hit it
# Peak RSS growth allowed per service during the load. The tiny model's weights are a few MB and
# each request in flight holds at most a few MB (a decoded 48x40 image, 16x64 features, a KV
# cache of < 100 positions, JSON and SSE buffers), so 400 requests stay far below this; the
# bound is set to catch a leak or an unbounded queue (a retained copy per request of a MB-sized
# buffer would cross it), not allocator noise: glibc arenas of new threads grow RSS by tens of MB.
MAX_GROWTH_BYTES = int(1.5 * 2**30)
REPORT = Path("/tmp/modalmesh-load.json")


def rss(pid: int) -> int:
    """Resident bytes of one process (VmRSS of /proc/<pid>/status; 0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants (read from /proc: no psutil needed)."""
    return sum(rss(p) for p in {pid, *descendants(pid)})


class RssSampler(threading.Thread):
    """Samples `tree_rss` of each named process every `interval` seconds until `stop()`."""

    def __init__(self, pids: dict[str, int], interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.interval = interval
        self.peak = {name: 0 for name in pids}
        self.samples = 0
        self._done = threading.Event()

    def sample(self) -> dict[str, int]:
        return {name: tree_rss(pid) for name, pid in self.pids.items()}

    def run(self) -> None:
        while not self._done.is_set():
            for name, rss in self.sample().items():
                self.peak[name] = max(self.peak[name], rss)
            self.samples += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join(10)


def _body(i: int) -> dict[str, Any]:
    """Request i: a quarter each of text/image x plain/streamed."""
    image, stream = i % 2 == 1, (i // 2) % 2 == 1
    messages = image_messages(seed=i % IMAGES) if image else text_messages(f"Say something, number {i}.")
    body: dict[str, Any] = {
        "model": "tiny",
        "max_tokens": 12,
        "temperature": 0.8,
        "seed": i,
        "messages": messages,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def _check_plain(r: httpx.Response) -> str | None:
    """Why a plain reply is not complete and well-formed (None: it is)."""
    if r.status_code != 200:
        return f"{r.status_code}: {r.text[:200]}"
    body = r.json()
    choice = body["choices"][0]
    usage = body.get("usage") or {}
    if choice.get("finish_reason") not in ("stop", "length") or not isinstance(
        choice["message"]["content"], str
    ):
        return f"bad choice {choice}"
    if not (usage.get("prompt_tokens", 0) > 0 and usage.get("completion_tokens", 0) > 0):
        return f"bad usage {usage}"
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        return f"bad usage {usage}"
    return None


def _check_stream(status: int, lines: list[str]) -> str | None:
    """Why a streamed reply is not complete and well-formed (None: it is)."""
    if status != 200:
        return f"{status}: {' '.join(lines)[:200]}"
    if not lines or lines[-1] != "data: [DONE]":
        return f"no [DONE]: {lines[-2:]}"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    if any("error" in c for c in chunks):
        return f"error event {[c for c in chunks if 'error' in c]}"
    finishes = [ch["finish_reason"] for c in chunks for ch in c.get("choices", []) if ch.get("finish_reason")]
    usage = chunks[-1].get("usage") or {}
    if finishes not in (["stop"], ["length"]):
        return f"finish reasons {finishes}"
    if not (usage.get("prompt_tokens", 0) > 0 and usage.get("completion_tokens", 0) > 0):
        return f"no usage chunk: {chunks[-1]}"
    return None


async def _one(client: httpx.AsyncClient, i: int) -> tuple[float, int, str | None]:
    """(latency s, status, problem or None) of request i."""
    body = _body(i)
    started = time.monotonic()
    try:
        if body.get("stream"):
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = [line async for line in r.aiter_lines() if line]
                status, problem = r.status_code, _check_stream(r.status_code, lines)
        else:
            r = await client.post("/v1/chat/completions", json=body)
            status, problem = r.status_code, _check_plain(r)
    except httpx.HTTPError as e:
        status, problem = 0, f"{type(e).__name__}: {e}"
    return time.monotonic() - started, status, problem


async def _wave(base_url: str, first: int) -> list[tuple[float, int, str | None]]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(_one(client, i) for i in range(first, first + CONCURRENCY)))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _table(report: dict[str, Any], mib: Callable[[int], str]) -> str:
    rows = [
        f"requests {report['requests']}  errors {report['errors']}  5xx {report['status_5xx']}  "
        f"p50 {report['latency_p50_s']:.3f}s  p99 {report['latency_p99_s']:.3f}s  "
        f"max {report['latency_max_s']:.3f}s  wall {report['wall_s']:.1f}s  ({report['rss_samples']} RSS samples)",
        f"{'service':<10}{'before MiB':>12}{'peak MiB':>12}{'after MiB':>12}{'growth MiB':>12}",
    ]
    for name, m in report["rss"].items():
        rows.append(
            f"{name:<10}{mib(m['before']):>12}{mib(m['peak']):>12}{mib(m['after']):>12}"
            f"{mib(m['peak'] - m['before']):>12}"
        )
    return "\n".join(rows)


def test_400_concurrent_chats_all_complete_and_memory_stays_bounded(stack: Stack, tmp_path: Path) -> None:
    stack.wait_healthy()
    assert MAX_QUEUED >= CONCURRENCY  # the LLM service refuses none of them
    assert stack.chat(messages=text_messages()).status_code == 200  # warm
    sampler = RssSampler({name: p.pid for name, p in stack.procs.items()})
    before = sampler.sample()
    sampler.start()
    started = time.monotonic()
    results: list[tuple[float, int, str | None]] = []
    try:
        for wave in range(WAVES):
            results += asyncio.run(_wave(stack.base_url, wave * CONCURRENCY))
    finally:
        wall = time.monotonic() - started
        sampler.stop()
    time.sleep(1.0)
    after = sampler.sample()

    latencies = [r[0] for r in results]
    problems = [(i, r[1], r[2]) for i, r in enumerate(results) if r[2] is not None]
    report = {
        "requests": len(results),
        "concurrency": CONCURRENCY,
        "waves": WAVES,
        "errors": len(problems),
        "status_5xx": sum(1 for r in results if r[1] >= 500),
        "latency_p50_s": _percentile(latencies, 0.50),
        "latency_p99_s": _percentile(latencies, 0.99),
        "latency_max_s": max(latencies),
        "wall_s": wall,
        "rss_samples": sampler.samples,
        "rss": {
            name: {
                "before": before[name],
                "peak": max(sampler.peak[name], before[name]),
                "after": after[name],
            }
            for name in before
        },
        "max_growth_bytes": MAX_GROWTH_BYTES,
        "problems": problems[:20],
    }
    text = json.dumps(report, indent=2)
    (tmp_path / "modalmesh-load.json").write_text(text)
    REPORT.write_text(text)
    print("\n" + _table(report, lambda n: f"{n / 2**20:.0f}"))

    assert report["status_5xx"] == 0, problems[:5]
    assert not problems, problems[:5]
    assert len(results) == WAVES * CONCURRENCY
    for name, m in report["rss"].items():
        assert m["peak"] - m["before"] < MAX_GROWTH_BYTES, f"{name}: {m}"
    assert all(p.alive() for p in stack.procs.values())
