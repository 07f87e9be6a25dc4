"""Run a benchmark against a running gateway through POST /v1/chat/completions.

`run_eval(config)` reads the benchmark's samples, asks the ones not yet in
`<out>/predictions.jsonl` (at most `concurrency` at a time; seed = base seed + sample index;
temperature 0 unless told), appends one JSON line per finished sample (flushed, so a killed run
continues where it stopped), then writes `<out>/metrics.json` and returns a one-screen summary.

Bad samples: a sample that cannot be asked (its media file is missing, a field is missing), a
request the gateway refuses (a 4xx other than 429: reason "http_<status>" with the gateway's
message), one that still fails after the retries (429, 503, connection errors: backoff doubling
from 0.5 s, or the server's Retry-After), and a reply the benchmark cannot read (empty, no
option letter) are counted by reason in metrics.json and score 0. When bad samples exceed
`max_bad_ratio` (default 0.05, i.e. more than 5% of the run's samples) the run stops, writes
metrics.json with the counts, and its exit code is 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from services.common.errors import FailedPreconditionError
from services.eval._chat import (
    MissingMediaError,
    chat_body,
    error_message,
    parse_retry_after,
    reply_text,
    retry_delay,
)
from services.eval.benchmarks import Benchmark, Sample, get_benchmark
from services.eval.parsing import EMPTY_REPLY

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
RUN = "run.json"
DEFAULT_MAX_BAD_RATIO = 0.05
NO_ANSWER = "no_answer"  # samples without a reply, in the scores' failed counts
NO_CONTENT = "no_content"  # a 200 whose body has no message content
CONNECTION_ERROR = "connection_error"


@dataclass(frozen=True)
class RunConfig:
    """What `run_eval` runs (the `modalmesh eval` flags)."""

    benchmark: str
    data: Path
    model: str
    out: Path
    gateway: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    concurrency: int = 4
    limit: int | None = None
    media_root: Path | None = None
    seed: int = 0
    temperature: float = 0.0
    max_bad_ratio: float = DEFAULT_MAX_BAD_RATIO
    retries: int = 5
    timeout_s: float = 120.0


@dataclass
class RunResult:
    """What a run did: the metrics written, whether it stopped on bad samples, and how many
    samples this run asked (resumed ones not counted)."""

    metrics: dict[str, Any]
    stopped: bool
    asked: int

    @property
    def exit_code(self) -> int:
        """0 for a finished run, 1 for one stopped by the bad-sample ratio."""
        return 1 if self.stopped else 0


def _key(index: int, sample_id: str) -> tuple[int, str]:
    return (index, sample_id)


def load_predictions(path: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """The records of a predictions file by (index, id); lines that are not whole JSON records
    (a run killed mid-write) are skipped, so their samples are asked again."""
    done: dict[tuple[int, str], dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("index"), int) and "id" in record:
            done[_key(record["index"], str(record["id"]))] = record
    return done


def pending(samples: Sequence[Sample], done: Mapping[tuple[int, str], Any]) -> list[Sample]:
    """The samples with no record in `done`, in order."""
    return [s for s in samples if _key(s.index, s.id) not in done]


def bad_reason(benchmark: Benchmark, sample: Sample, record: Mapping[str, Any]) -> str | None:
    """Why a finished sample is bad (its error, or why its reply cannot be scored), or None."""
    if record.get("error"):
        return str(record["error"])
    return benchmark.unreadable(sample, str(record.get("reply") or ""))


def too_many_bad(bad: int, total: int, max_ratio: float) -> bool:
    """Whether `bad` of `total` samples exceeds the allowed ratio (strictly more than it)."""
    return total > 0 and bad > max_ratio * total


def _check_run(out: Path, config: RunConfig) -> None:
    """Record what this folder's predictions are of; refuse to resume a different run."""
    what = {"benchmark": config.benchmark, "model": config.model, "data": str(config.data.resolve())}
    path = out / RUN
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if {k: before.get(k) for k in what} != what:
            raise FailedPreconditionError(
                f"eval: {out} holds predictions of {before}, not of {what}; use another --out"
            )
    path.write_text(json.dumps(what, indent=1) + "\n", encoding="utf-8")


async def ask(
    client: httpx.AsyncClient, body: dict[str, Any], *, retries: int = 5, sleep: Any = asyncio.sleep
) -> dict[str, Any]:
    """Post one chat body, retrying as `retry_delay` says.

    Returns:
        {"reply", "error", "message", "attempts", "fingerprint"}: "error" None with the reply
        text, or the reason ("http_400", "http_503", "connection_error", "no_content").
    """
    attempt = 0
    while True:
        attempt += 1
        status: int | None = None
        retry_after = None
        try:
            r = await client.post("/v1/chat/completions", json=body)
        except httpx.TransportError as e:
            message = f"{type(e).__name__}: {e}"
        else:
            try:
                data = r.json()
            except ValueError:
                data = None
            if r.status_code == 200:
                reply = reply_text(data)
                fingerprint = data.get("system_fingerprint") if isinstance(data, dict) else None
                error = None if reply is not None else NO_CONTENT
                return {
                    "reply": reply,
                    "error": error,
                    "message": None,
                    "attempts": attempt,
                    "fingerprint": fingerprint,
                }
            status = r.status_code
            message = error_message(data, r.text[:300] or r.reason_phrase)
            retry_after = parse_retry_after(r.headers.get("retry-after"))
        delay = retry_delay(attempt, status, retry_after=retry_after, retries=retries)
        if delay is None:
            reason = f"http_{status}" if status is not None else CONNECTION_ERROR
            return {
                "reply": None,
                "error": reason,
                "message": message,
                "attempts": attempt,
                "fingerprint": None,
            }
        await sleep(delay)


class Progress:
    """A done/total line with the bad count and an ETA on a stream (stderr)."""

    def __init__(self, stream: IO[str] | None, total: int, done: int, label: str) -> None:
        self.stream, self.total, self.done, self.label = stream, total, done, label
        self.start_done, self.t0, self.bad = done, time.monotonic(), 0
        self.tty = bool(stream is not None and stream.isatty())

    def line(self) -> str:
        """The current progress line."""
        asked, elapsed = self.done - self.start_done, time.monotonic() - self.t0
        eta = elapsed / asked * (self.total - self.done) if asked else float("nan")
        eta_text = f"{eta:.0f}s" if asked else "?"
        return f"[{self.label}] {self.done}/{self.total} done, {self.bad} bad, {elapsed:.0f}s elapsed, ETA {eta_text}"

    def update(self, bad: bool) -> None:
        """One more sample finished."""
        self.done += 1
        self.bad += bad
        if self.stream is None:
            return
        every = max(1, self.total // 20)
        if self.tty:
            self.stream.write("\r" + self.line())
        elif self.done % every == 0 or self.done == self.total:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line on a terminal."""
        if self.stream is not None and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _open_append(path: Path) -> IO[str]:
    """The predictions file for appending, starting on a fresh line after a torn last line."""
    if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with path.open("a", encoding="utf-8") as f:
            f.write("\n")
    return path.open("a", encoding="utf-8")


async def _run(
    config: RunConfig, stream: IO[str] | None, transport: httpx.AsyncBaseTransport | None
) -> RunResult:
    t0 = time.monotonic()
    benchmark = get_benchmark(config.benchmark)
    samples = benchmark.read(config.data, config.media_root)[: config.limit]
    config.out.mkdir(parents=True, exist_ok=True)
    _check_run(config.out, config)
    records = load_predictions(config.out / PREDICTIONS)
    by_key = {_key(s.index, s.id): s for s in samples}
    bad = Counter(
        r for k, rec in records.items() if k in by_key and (r := bad_reason(benchmark, by_key[k], rec))
    )
    todo = deque(pending(samples, records))
    progress = Progress(stream, len(samples), len(samples) - len(todo), f"eval {benchmark.name}")
    progress.bad = sum(bad.values())
    stop = too_many_bad(sum(bad.values()), len(samples), config.max_bad_ratio)
    asked = 0
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}

    async def worker(client: httpx.AsyncClient, out: IO[str]) -> None:
        nonlocal stop, asked
        while todo and not stop:
            sample = todo.popleft()
            seed = config.seed + sample.index
            record: dict[str, Any] = {"index": sample.index, "id": sample.id, "seed": seed}
            started = time.monotonic()
            if sample.problem:
                record |= {"reply": None, "error": sample.problem, "message": None}
            else:
                try:
                    body = chat_body(
                        sample,
                        model=config.model,
                        seed=seed,
                        temperature=config.temperature,
                        max_tokens=benchmark.max_tokens,
                    )
                except MissingMediaError as e:
                    record |= {"reply": None, "error": e.reason, "message": str(e)}
                else:
                    asked += 1
                    record |= await ask(client, body, retries=config.retries)
            record["latency_s"] = round(time.monotonic() - started, 3)
            out.write(json.dumps(record) + "\n")
            out.flush()
            records[_key(sample.index, sample.id)] = record
            reason = bad_reason(benchmark, sample, record)
            if reason:
                bad[reason] += 1
            progress.update(bool(reason))
            stop = stop or too_many_bad(sum(bad.values()), len(samples), config.max_bad_ratio)

    timeout = httpx.Timeout(config.timeout_s, connect=10.0)
    async with httpx.AsyncClient(
        base_url=config.gateway, headers=headers, timeout=timeout, transport=transport
    ) as client:
        with _open_append(config.out / PREDICTIONS) as out:
            await asyncio.gather(*(worker(client, out) for _ in range(max(1, config.concurrency))))
    progress.close()
    metrics = build_metrics(benchmark, samples, records, config, stopped=stop, seconds=time.monotonic() - t0)
    (config.out / METRICS).write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    return RunResult(metrics, stop, asked)


def run_eval(
    config: RunConfig, *, progress: IO[str] | None = None, transport: httpx.AsyncBaseTransport | None = None
) -> RunResult:
    """Run a benchmark (see the module docstring); `progress` gets the progress line (stderr),
    `transport` replaces the network (tests)."""
    return asyncio.run(_run(config, progress, transport))


def build_metrics(
    benchmark: Benchmark,
    samples: Sequence[Sample],
    records: Mapping[tuple[int, str], Mapping[str, Any]],
    config: RunConfig,
    *,
    stopped: bool,
    seconds: float,
) -> dict[str, Any]:
    """metrics.json: the scores over every sample of the run (a sample without a reply is
    scored as an empty reply, and counted in the scores' "failed" as "no_answer"), the bad
    samples by reason, and what was run.

    Every scorer of `BENCHMARKS` counts an empty reply once, as "empty_reply"; that is what
    lets the unanswered ones be moved to "no_answer" here."""
    replies, unanswered = [], 0
    for s in samples:
        rec = records.get(_key(s.index, s.id))
        if rec is None or rec.get("error"):
            replies.append("")  # scores 0, counted as "no_answer" below instead of "empty_reply"
            unanswered += 1
        else:
            replies.append(str(rec.get("reply") or ""))
    scores = benchmark.score(samples, replies)
    failed = Counter(scores.failed)
    failed[EMPTY_REPLY] -= unanswered
    failed[NO_ANSWER] += unanswered
    scores = dataclasses.replace(scores, failed={k: v for k, v in sorted(failed.items()) if v > 0})
    bad: Counter[str] = Counter()
    for s in samples:
        rec = records.get(_key(s.index, s.id))
        if rec is not None and (reason := bad_reason(benchmark, s, rec)):
            bad[reason] += 1
    finished = sum(_key(s.index, s.id) in records for s in samples)
    return {
        "benchmark": benchmark.name,
        "model": config.model,
        "data": str(config.data),
        "samples": len(samples),
        "finished": finished,
        "answered": len(samples) - unanswered,
        "bad": {
            "count": sum(bad.values()),
            "ratio": sum(bad.values()) / len(samples) if samples else 0.0,
            "max_ratio": config.max_bad_ratio,
            "by_reason": dict(sorted(bad.items())),
        },
        "stopped": stopped,
        "scores": scores.to_dict(),
        "settings": {
            "seed": config.seed,
            "temperature": config.temperature,
            "max_tokens": benchmark.max_tokens,
        },
        "seconds": round(seconds, 2),
    }


def summary_table(metrics: Mapping[str, Any], out: Path | None = None) -> str:
    """A one-screen text summary of metrics.json."""
    scores, bad = metrics["scores"], metrics["bad"]
    lines = [
        f"benchmark {metrics['benchmark']}   model {metrics['model']}   data {metrics['data']}",
        f"samples {metrics['samples']}   finished {metrics['finished']}   answered {metrics['answered']}   "
        f"bad {bad['count']} ({bad['ratio']:.1%}, max {bad['max_ratio']:.1%})   {metrics['seconds']:.1f}s",
        "",
        f"{'metric':<28} {'value':>8}",
    ]
    lines += [
        f"{name + (' *' if name == scores['main'] else ''):<28} {value:>8.3f}"
        for name, value in scores["metrics"].items()
    ]
    if bad["by_reason"]:
        lines += ["", "bad samples: " + ", ".join(f"{k} {v}" for k, v in bad["by_reason"].items())]
    if metrics["stopped"]:
        lines.append("STOPPED: bad samples exceed the allowed ratio (--max-bad-ratio)")
    if out is not None:
        lines += ["", f"predictions: {out / PREDICTIONS}", f"metrics:     {out / METRICS}"]
    return "\n".join(lines)
