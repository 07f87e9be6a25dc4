"""`python -m services.llm` as a real process: health, streaming, refusals, concurrency, drain,
and E.T. Chat timestamps from the tiny-etchat twin."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from modalmesh.v1 import llm_pb2, llm_pb2_grpc
from services.common.tensor_codec import array_to_tensor
from tests.helpers.procs import Process, free_port, start_process, wait_until

pytestmark = pytest.mark.integration

SERVICE = "modalmesh.v1.LLM"


@dataclass
class Service:
    proc: Process
    target: str
    seconds_to_serving: float
    metrics_url: str = ""


def serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1).status
        return bool(status == health_pb2.HealthCheckResponse.SERVING)


def start_service(cache_dir: Path, log_path: Path, preset: str = "tiny") -> Service:
    port, metrics_port = free_port(), free_port()
    started = time.monotonic()
    proc = start_process(
        [sys.executable, "-m", "services.llm", "--preset", preset, "--port", str(port)],
        log_path=log_path,
        env={
            "MODALMESH_CACHE_DIR": str(cache_dir),
            "MODALMESH_DRAIN_SECONDS": "20",
            "MODALMESH_LLM_METRICS_PORT": str(metrics_port),
            # No adapter registry: nothing a developer's Redis holds changes what this serves.
            "MODALMESH_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        },
    )
    target = f"127.0.0.1:{port}"
    wait_until(lambda: serving(target), timeout=120, what="LLM service SERVING", proc=proc)
    return Service(proc, target, time.monotonic() - started, f"http://127.0.0.1:{metrics_port}/metrics")


@pytest.fixture(scope="module")
def llm_service(tiny_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_service(tiny_cache_dir, tmp_path_factory.mktemp("llm") / "llm.log")
    try:
        yield service
    finally:
        service.proc.kill_group()


def features(tokens: int = 16, dim: int = 64, dtype: str = "<f4", seed: int = 0) -> llm_pb2.MediaFeatures:
    array = np.random.default_rng(seed).standard_normal((tokens, dim)).astype(dtype)
    return llm_pb2.MediaFeatures(modality="image", features=array_to_tensor(array))


def user(*parts: str | llm_pb2.MediaFeatures) -> llm_pb2.Turn:
    """A user turn: a string is a text part, MediaFeatures a media part carrying them."""
    return llm_pb2.Turn(
        role="user",
        parts=[llm_pb2.TurnPart(text=p) if isinstance(p, str) else llm_pb2.TurnPart(media=p) for p in parts],
    )


def good_request(max_tokens: int = 20, **sampling: object) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(
        turns=[user(features(), "What is this?")],
        sampling=llm_pb2.SamplingParams(**{"max_tokens": max_tokens, "temperature": 0.0, **sampling}),  # type: ignore[arg-type]
    )


async def generate(
    target: str, request: llm_pb2.GenerateRequest, **kw: object
) -> list[llm_pb2.GenerateChunk]:
    async with grpc.aio.insecure_channel(target) as channel:
        return [chunk async for chunk in llm_pb2_grpc.LLMStub(channel).Generate(request, **kw)]


async def test_generate_streams_deltas_usage_and_finish(llm_service: Service) -> None:
    chunks = await generate(llm_service.target, good_request(), metadata=(("x-request-id", "it-req-1"),))
    assert len(chunks) > 1
    assert chunks[0].adapter == "tiny@1"
    last = chunks[-1]
    assert last.finish_reason in (llm_pb2.FINISH_REASON_STOP, llm_pb2.FINISH_REASON_LENGTH)
    assert last.usage.prompt_tokens == 57  # BOS + system + 16 image placeholders + question
    assert 0 < last.usage.completion_tokens <= 20
    if last.finish_reason == llm_pb2.FINISH_REASON_LENGTH:
        assert last.usage.completion_tokens == 20
    assert all(not c.HasField("usage") for c in chunks[:-1])
    text = "".join(c.text for c in chunks)
    again = await generate(llm_service.target, good_request())
    assert "".join(c.text for c in again) == text  # greedy: the same text, however it was split
    # A stop string from the middle of that text cuts it there.
    stop = text[8:13]
    cut = await generate(llm_service.target, good_request(stop=[stop]))
    assert "".join(c.text for c in cut) == text[: text.index(stop)]
    assert (cut[-1].finish_reason, cut[-1].stop_reason) == (llm_pb2.FINISH_REASON_STOP, stop)
    logged = [json.loads(line) for line in llm_service.proc.log_text().splitlines() if line.startswith("{")]
    assert any(entry.get("request_id") == "it-req-1" for entry in logged)


def bad_requests() -> dict[str, tuple[llm_pb2.GenerateRequest, grpc.StatusCode, str]]:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases: dict[str, tuple[llm_pb2.GenerateRequest, grpc.StatusCode, str]] = {}

    def case(name: str, code: grpc.StatusCode, message: str, **fields: object) -> None:
        request = good_request()
        for key, value in fields.items():
            if key == "sampling":
                request.sampling.CopyFrom(value)
            elif key == "media":  # the first question's item
                request.turns[0].parts[0].media.CopyFrom(value)
            else:
                request.ClearField(key)
                getattr(request, key).extend(value)
        cases[name] = (request, code, message)

    short = features(tokens=15)
    case(
        "wrong shape",
        invalid,
        "image features: expected (16, 64) = 1 frame(s) x 16 rows, got (15, 64)",
        media=short,
    )
    two_times = features()
    two_times.frame_times.extend([0.0, 1.0])
    case("frame times", invalid, "image frame times: expected 1 (one per frame), got 2", media=two_times)
    case("wrong dtype", invalid, "expected a floating-point dtype", media=features(dtype="<i4"))
    bad_bytes = features()
    bad_bytes.features.data = bad_bytes.features.data[:-4]
    case("byte count", invalid,
         "turns[0].parts[0].media.features: expected 4096 bytes for FP32[16, 64], got 4092",
         media=bad_bytes)  # fmt: skip
    case("empty part", invalid, "turns[0].parts[0]: none of text, media, time_seconds is set",
         turns=[llm_pb2.Turn(role="user", parts=[llm_pb2.TurnPart()])])  # fmt: skip
    case("too many images", invalid, "at most 4 image items per prompt, got 5",
         turns=[user(*(features(seed=i) for i in range(5)), "hi")])  # fmt: skip
    case("media in a reply", invalid, "turns[1]: media parts are only allowed in user turns",
         turns=[user("hi"), llm_pb2.Turn(role="assistant", parts=[llm_pb2.TurnPart(media=features())]),
                user("and?")])  # fmt: skip
    case("empty turns", invalid, "turns: expected at least one user turn, got none", turns=[])
    case("last turn not user", invalid, "the last turn must be 'user', got 'assistant'",
         turns=[user(features(), "hi"), llm_pb2.Turn(role="assistant", parts=[llm_pb2.TurnPart(text="ok")])])  # fmt: skip
    case("prompt too long", invalid, "at most 1023 allowed",
         turns=[user(features(), "the big red square " * 300)])  # fmt: skip
    case("max_tokens 0", invalid, "sampling.max_tokens: expected > 0, got 0",
         sampling=llm_pb2.SamplingParams(max_tokens=0))  # fmt: skip
    case("temperature -1", invalid, "sampling.temperature: expected in [0, 2], got -1",
         sampling=llm_pb2.SamplingParams(max_tokens=4, temperature=-1.0))  # fmt: skip
    unknown = good_request()
    unknown.adapter = "other@3"
    cases["unknown adapter"] = (
        unknown,
        grpc.StatusCode.NOT_FOUND,
        "adapter 'other@3' is not loaded; loaded: ['tiny@1']",
    )
    return cases


BAD = bad_requests()


@pytest.mark.parametrize("name", list(BAD))
async def test_bad_request_is_refused_then_good_request_succeeds(llm_service: Service, name: str) -> None:
    request, code, message = BAD[name]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await generate(llm_service.target, request)
    assert e.value.code() == code
    assert message in (e.value.details() or "")
    chunks = await generate(llm_service.target, good_request(max_tokens=2))
    assert chunks[-1].usage.completion_tokens > 0


async def test_two_concurrent_requests_complete(llm_service: Service) -> None:
    a, b = good_request(max_tokens=30), good_request(max_tokens=25, temperature=1.0, seed=3)
    results = await asyncio.gather(generate(llm_service.target, a), generate(llm_service.target, b))
    for chunks in results:
        assert chunks[-1].finish_reason != llm_pb2.FINISH_REASON_UNSPECIFIED
        assert chunks[-1].usage.prompt_tokens == 57


async def test_metrics_count_what_was_served(llm_service: Service) -> None:
    import httpx

    await generate(llm_service.target, good_request(max_tokens=4))
    text = httpx.get(llm_service.metrics_url, timeout=5).text

    def value(line_start: str) -> float:
        (line,) = [x for x in text.splitlines() if x.startswith(line_start + " ")]
        return float(line.split()[-1])

    assert value("modalmesh_llm_time_to_first_token_seconds_count") >= 1
    assert value("modalmesh_llm_request_queue_time_seconds_count") >= 1
    assert value("modalmesh_llm_inter_token_latency_seconds_count") >= 3
    assert value('modalmesh_llm_requests_total{status="OK"}') >= 1
    assert value("modalmesh_llm_generation_tokens_total") >= 4
    assert value('modalmesh_llm_batch_size_bucket{le="1.0"}') >= 4
    assert value("modalmesh_llm_requests_held") == 0


async def test_client_cancel_stops_the_decode_loop(llm_service: Service) -> None:
    async with grpc.aio.insecure_channel(llm_service.target) as channel:
        request = good_request(max_tokens=600, temperature=1.0, seed=1)  # runs 330 tokens
        request.request_id = "it-cancel"
        call = llm_pb2_grpc.LLMStub(channel).Generate(request)
        await call.read()
        call.cancel()

    def cancelled_line() -> bool:
        for line in llm_service.proc.log_text().splitlines():
            if '"it-cancel"' in line and "cancelled after" in line:
                return True
        return False

    wait_until(cancelled_line, timeout=5, what="decode loop cancelled", proc=llm_service.proc)
    chunks = await generate(llm_service.target, good_request(max_tokens=2))
    assert chunks[-1].usage.completion_tokens > 0


async def test_model_info_and_reflection(llm_service: Service) -> None:
    async with grpc.aio.insecure_channel(llm_service.target) as channel:
        info = await llm_pb2_grpc.LLMStub(channel).GetModelInfo(llm_pb2.ModelInfoRequest())
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        listed = [s.name async for r in responses for s in r.list_services_response.service]
    assert (info.preset, info.adapter, list(info.adapters), info.max_context_tokens) == (
        "tiny",
        "tiny@1",
        ["tiny@1"],
        1024,
    )
    assert [(m.modality, m.feature_tokens, m.feature_dim, m.llm_tokens) for m in info.modalities] == [
        ("image", 16, 64, 16)
    ]
    assert SERVICE in listed


async def test_sigterm_drains_the_request_in_flight_and_exits_zero(
    tiny_cache_dir: Path, tmp_path: Path
) -> None:
    service = start_service(tiny_cache_dir, tmp_path / "llm.log")
    try:
        async with grpc.aio.insecure_channel(service.target) as channel:
            call = llm_pb2_grpc.LLMStub(channel).Generate(
                good_request(max_tokens=600, temperature=1.0, seed=1)
            )
            chunks = [await call.read()]
            service.proc.send_signal(signal.SIGTERM)
            while (chunk := await call.read()) != grpc.aio.EOF:
                chunks.append(chunk)
        assert chunks[-1].finish_reason != llm_pb2.FINISH_REASON_UNSPECIFIED
        # Seeded: 330 tokens, ~0.5 s of decoding after the signal arrived, all delivered.
        assert chunks[-1].usage.completion_tokens > 50
        assert service.proc.popen.wait(timeout=30) == 0
    finally:
        service.proc.kill_group()
    assert '"stopped"' in service.proc.log_text()


def test_unknown_preset_exits_2(tmp_path: Path) -> None:
    proc = start_process(
        [sys.executable, "-m", "services.llm", "--preset", "no-such-preset", "--port", str(free_port())],
        log_path=tmp_path / "llm.log",
        env={"MODALMESH_CACHE_DIR": str(tmp_path)},
    )
    try:
        assert proc.popen.wait(timeout=60) == 2
    finally:
        proc.kill_group()
    assert "preset 'no-such-preset' not found" in proc.log_text()


FRAME_TIMES = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]


def etchat_request(max_tokens: int = 8) -> llm_pb2.GenerateRequest:
    array = np.random.default_rng(7).standard_normal((len(FRAME_TIMES) * 4, 32)).astype("<f4")
    media = llm_pb2.MediaFeatures(modality="video", features=array_to_tensor(array), frame_times=FRAME_TIMES)
    return llm_pb2.GenerateRequest(
        turns=[user(media, "When does the dog move?")],
        sampling=llm_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


def emit_time_token_first(preset: object) -> None:
    """Rewrite the twin's LM so that greedy decoding of `etchat_request` starts with `<vid>`.

    Its lm_head row becomes twice the row of the token greedy decoding would pick (whose
    logit is positive), wherever that token would win. Only a tensor's values change, so the
    base fingerprint (names and sizes of the weight files) and the bundle stay valid.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from services.llm.engine import Engine
    from services.llm.servicer import request_from_proto
    from services.models.checkpoints.bundle import base_fingerprint
    from services.models.lm.attention import prefill_attention_mask
    from services.models.lm.loading import load_model

    loaded = load_model(preset)  # type: ignore[arg-type]
    engine = Engine(loaded)
    try:
        request = request_from_proto(etchat_request())
        job = engine.prepare(request)
        with torch.inference_mode():
            embeds = loaded.model.embed(
                job.prompt.input_ids, job.prompt.media_spans, request.media, None, job.instructions
            )
            mask = prefill_attention_mask(  # the video attends bidirectionally, as the engine's prefill
                loaded.preset,
                loaded.model.lm,
                [m.modality for m in request.media],
                job.prompt.media_spans,
                embeds,
            )
            logits = loaded.model.lm(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]  # (V,)
    finally:
        engine.close()
    first = int(logits.argmax())
    assert float(logits[first]) > 0
    folder = loaded.preset.llm.checkpoint
    fingerprint = base_fingerprint(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    tensors["lm_head.weight"][loaded.time_token_id] = 2 * tensors["lm_head.weight"][first]
    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
    assert base_fingerprint(folder) == fingerprint


@pytest.fixture(scope="module")
def etchat_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with the tiny-etchat twin whose LM starts its reply to `etchat_request` with `<vid>`."""
    from services.common.presets import load_preset
    from services.models.tiny import generate

    cache = tmp_path_factory.mktemp("etchat-cache")
    generate(load_preset("tiny-etchat", cache_dir=cache))
    emit_time_token_first(load_preset("tiny-etchat", cache_dir=cache))
    return cache


async def test_etchat_replies_carry_matched_times_in_text_and_timestamps(
    etchat_cache: Path, tmp_path: Path
) -> None:
    from services.common.presets import load_preset
    from services.llm.engine import Engine
    from services.llm.servicer import chunk_from_event, request_from_proto
    from services.models.lm.loading import load_model
    from services.models.lm.timestamps import format_seconds

    service = start_service(etchat_cache, tmp_path / "llm.log", preset="tiny-etchat")
    try:
        chunks = await generate(service.target, etchat_request())
    finally:
        service.proc.kill_group()
    text = "".join(c.text for c in chunks)
    stamps = [t for c in chunks for t in c.timestamps]
    assert stamps and stamps[0].char_offset == 0  # the first token was the time token
    for stamp in stamps:
        assert stamp.media_index == 0 and 0 <= stamp.frame < len(FRAME_TIMES)
        assert stamp.seconds == pytest.approx(FRAME_TIMES[stamp.frame])
        written = format_seconds(stamp.seconds)
        assert text[stamp.char_offset : stamp.char_offset + len(written)] == written
    # The same request in this process, through the engine and the servicer's mapping.
    engine = Engine(load_model(load_preset("tiny-etchat", cache_dir=etchat_cache)))
    try:
        local = [chunk_from_event(e) async for e in engine.generate(request_from_proto(etchat_request()))]
    finally:
        engine.close()
    assert [(c.text, list(c.timestamps)) for c in local] == [(c.text, list(c.timestamps)) for c in chunks]
