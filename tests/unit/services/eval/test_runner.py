"""The runner against a fake gateway (httpx.MockTransport): resume, bad-sample stop, errors
recorded per sample, retries, metrics.json."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common.errors import FailedPreconditionError
from services.eval.runner import (
    METRICS,
    PREDICTIONS,
    RunConfig,
    ask,
    load_predictions,
    run_eval,
    summary_table,
    too_many_bad,
)


def _data(folder: Path, n: int, missing: tuple[int, ...] = ()) -> Path:
    """A llava file of n open questions whose reference is "red"; images in `missing` absent."""
    records = []
    for i in range(n):
        if i not in missing:
            (folder / f"{i}.png").write_bytes(b"png%d" % i)
        records.append(
            {
                "id": f"q{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nColor?"},
                    {"from": "gpt", "value": "red"},
                ],
            }
        )
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


class Gateway:
    """A fake /v1/chat/completions: `answer(body)` -> httpx.Response; records every body."""

    def __init__(self, answer: Callable[[dict[str, Any]], httpx.Response] | None = None) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.answer = answer or (lambda body: _reply("red"))

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            assert request.url.path == "/v1/chat/completions"
            body = json.loads(request.content)
            body["_auth"] = request.headers.get("authorization")
            self.bodies.append(body)
            return self.answer(body)

        return httpx.MockTransport(handle)


def _reply(text: str) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": text}}]})


def _config(data: Path, out: Path, **kw: Any) -> RunConfig:
    return RunConfig(benchmark="llava", data=data, model="tiny@2", out=out, gateway="http://gw", **kw)


def test_run_writes_predictions_and_metrics(tmp_path: Path) -> None:
    data, out = _data(tmp_path, 5), tmp_path / "out"
    gw = Gateway(lambda body: _reply("red" if body["seed"] % 2 else "blue"))
    result = run_eval(_config(data, out, seed=100, api_key="k1", concurrency=2), transport=gw.transport())
    assert result.exit_code == 0 and result.asked == 5
    assert sorted(b["seed"] for b in gw.bodies) == [100, 101, 102, 103, 104]
    assert {b["model"] for b in gw.bodies} == {"tiny@2"} and {b["_auth"] for b in gw.bodies} == {"Bearer k1"}
    lines = [json.loads(x) for x in (out / PREDICTIONS).read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == [f"q{i}" for i in range(5)]
    metrics = json.loads((out / METRICS).read_text())
    assert metrics == result.metrics
    assert (metrics["samples"], metrics["finished"], metrics["answered"]) == (5, 5, 5)
    assert metrics["scores"]["metrics"] == {"exact": 0.4, "contains": 0.4}  # seeds 101, 103
    assert metrics["bad"] == {"count": 0, "ratio": 0.0, "max_ratio": 0.05, "by_reason": {}}
    table = summary_table(metrics, out)
    assert "exact *" in table and "samples 5" in table and len(table.splitlines()) < 25


def test_resume_asks_only_the_rest(tmp_path: Path) -> None:
    data, out = _data(tmp_path, 6), tmp_path / "out"
    gw = Gateway()
    first = run_eval(_config(data, out, limit=2), transport=gw.transport())
    assert first.asked == 2
    # a run killed while writing: a torn last line, its sample asked again
    with (out / PREDICTIONS).open("a") as f:
        f.write('{"index": 2, "id": "q2", "rep')
    second = run_eval(_config(data, out), transport=gw.transport())
    asked = [b["seed"] for b in gw.bodies]
    assert sorted(asked) == [0, 1, 2, 3, 4, 5] and second.asked == 4
    assert len(load_predictions(out / PREDICTIONS)) == 6
    assert second.metrics["finished"] == 6 and second.metrics["scores"]["metrics"]["exact"] == 1.0
    third = run_eval(_config(data, out), transport=gw.transport())
    assert third.asked == 0 and len(gw.bodies) == 6


def test_resume_refuses_another_model(tmp_path: Path) -> None:
    data, out = _data(tmp_path, 1), tmp_path / "out"
    run_eval(_config(data, out), transport=Gateway().transport())
    other = RunConfig(benchmark="llava", data=data, model="tiny@3", out=out, gateway="http://gw")
    with pytest.raises(FailedPreconditionError, match="use another --out"):
        run_eval(other, transport=Gateway().transport())


def test_bad_samples_are_counted_and_the_run_stops(tmp_path: Path) -> None:
    data, out = _data(tmp_path, 20, missing=(0,)), tmp_path / "out"
    # one bad of 20 is 5%: allowed; then empty replies from seed 10 on push it over
    gw = Gateway(lambda body: _reply("" if body["seed"] >= 10 else "red"))
    result = run_eval(_config(data, out, concurrency=1), transport=gw.transport())
    assert result.stopped and result.exit_code == 1
    m = result.metrics
    assert m["bad"]["by_reason"] == {"missing_media": 1, "empty_reply": 1}
    assert m["finished"] == 11 and len(gw.bodies) == 10  # the missing image was never sent
    assert m["scores"]["failed"] == {"empty_reply": 1, "no_answer": 10}
    assert m["scores"]["total"] == 20 and m["scores"]["metrics"]["exact"] == pytest.approx(9 / 20)
    assert m["stopped"] is True and "STOPPED" in summary_table(m)


def test_too_many_bad() -> None:
    assert not too_many_bad(1, 20, 0.05)
    assert too_many_bad(2, 20, 0.05)
    assert not too_many_bad(0, 0, 0.05)
    assert too_many_bad(1, 10, 0.0)


def test_4xx_is_that_samples_failure_with_the_gateways_message(tmp_path: Path) -> None:
    data, out = _data(tmp_path, 3), tmp_path / "out"

    def answer(body: dict[str, Any]) -> httpx.Response:
        if body["seed"] == 1:
            return httpx.Response(400, json={"error": {"message": "image too large", "code": 400}})
        return _reply("red")

    result = run_eval(_config(data, out, max_bad_ratio=0.5), transport=Gateway(answer).transport())
    assert result.exit_code == 0
    records = {r["id"]: r for r in load_predictions(out / PREDICTIONS).values()}
    assert records["q1"]["error"] == "http_400" and records["q1"]["message"] == "image too large"
    assert records["q1"]["attempts"] == 1
    assert result.metrics["bad"]["by_reason"] == {"http_400": 1}


def test_ask_retries_503_and_connection_errors_then_succeeds() -> None:
    calls: list[int] = []
    waits: list[float] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("refused")
        if len(calls) == 2:
            return httpx.Response(429, headers={"Retry-After": "3"}, json={"error": {"message": "busy"}})
        if len(calls) == 3:
            return httpx.Response(503, json={"error": {"message": "warming"}})
        return _reply("ok")

    async def sleep(s: float) -> None:
        waits.append(s)

    async def go() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url="http://gw", transport=httpx.MockTransport(handle)) as c:
            return await ask(c, {"model": "m"}, retries=5, sleep=sleep)

    record = asyncio.run(go())
    assert record["reply"] == "ok" and record["error"] is None and record["attempts"] == 4
    assert waits == [0.5, 3.0, 2.0]


def test_ask_gives_up_after_the_retries() -> None:
    async def sleep(_s: float) -> None:
        return None

    async def go() -> dict[str, Any]:
        transport = httpx.MockTransport(lambda r: httpx.Response(503, json={"error": {"message": "down"}}))
        async with httpx.AsyncClient(base_url="http://gw", transport=transport) as c:
            return await ask(c, {}, retries=2, sleep=sleep)

    record = asyncio.run(go())
    assert (record["error"], record["message"], record["attempts"]) == ("http_503", "down", 3)
