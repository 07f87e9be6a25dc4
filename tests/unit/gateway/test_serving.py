"""ChatService: validation rules, media -> features -> GenerateRequest, streaming, models, health."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid

import numpy as np
import pytest
import redis.asyncio as aioredis

from gateway.domain import ChatRequest, Finished, TextDelta
from gateway.feature_cache import FeatureCache, content_digest
from gateway.serving import ChatService
from modalmesh.v1 import llm_pb2
from services.common.content import MediaInput, TimePart, Timestamp
from services.common.errors import (
    InvalidArgumentError,
    ModalmeshError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
)
from services.common.tensor_codec import tensor_to_array
from tests.unit.gateway.support import (
    REDIS_URL,
    FakeEncoder,
    FakeLLM,
    ServiceFactory,
    needs_redis,
    sent_media,
    turn,
)


def chat(*parts: str | MediaInput, model: str | None = "tiny", **fields: object) -> ChatRequest:
    return ChatRequest(model=model, turns=[turn("user", parts)], request_id="req-1", **fields)  # type: ignore[arg-type]


def image(data: bytes, n: int = 0) -> MediaInput:
    return MediaInput("image", data=data, param=f"messages[0].content[{n}]")


def image_url(data: bytes, n: int = 0) -> MediaInput:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return MediaInput("image", url=url, param=f"messages[0].content[{n}]")


def error_of(service: ChatService, request: ChatRequest) -> ModmeshErrorInfo:
    with pytest.raises(ModalmeshError) as info:
        service.validate(request)
    return ModmeshErrorInfo(info.value)


class ModmeshErrorInfo:
    def __init__(self, error: ModalmeshError) -> None:
        self.error, self.message, self.status = error, error.message, error.http_status


# ---- validation ---------------------------------------------------------------------------


def test_empty_messages(down_service: ChatService) -> None:
    e = error_of(down_service, ChatRequest(model="tiny", turns=[], request_id="r"))
    assert (e.status, e.message) == (400, "messages: expected at least one message, got an empty list")


def test_unknown_model_names_the_served_one(down_service: ChatService) -> None:
    e = error_of(down_service, chat("hi", model="gpt-4o"))
    assert e.status == 404 and isinstance(e.error, NotFoundError)
    assert e.message == (
        "The model 'gpt-4o' does not exist; this gateway serves 'tiny' "
        "(or tiny@<version> to pin an adapter version; see GET /v1/models)"
    )
    assert e.error.param == "model"


@pytest.mark.parametrize(
    "name,echo,adapter",
    [
        (None, "tiny", ""),
        ("tiny", "tiny", ""),
        ("tiny@3", "tiny@3", "tiny@3"),
    ],
)
def test_model_resolution(down_service: ChatService, name: str | None, echo: str, adapter: str) -> None:
    assert down_service.resolve_model(name) == (echo, adapter)


@pytest.mark.parametrize("bad", ["tiny@", "other@1", "@1"])
def test_bad_pins_are_unknown(down_service: ChatService, bad: str) -> None:
    with pytest.raises(NotFoundError):
        down_service.resolve_model(bad)


@pytest.mark.parametrize("value", [0, -5])
def test_max_tokens_must_be_positive(down_service: ChatService, value: int) -> None:
    e = error_of(down_service, chat("hi", max_tokens=value))
    assert (e.status, e.message) == (400, f"max_tokens: expected a positive integer, got {value}")
    e = error_of(down_service, chat("hi", max_tokens=value, max_tokens_param="max_completion_tokens"))
    assert e.message.startswith("max_completion_tokens: expected a positive integer")


def test_max_tokens_within_the_context(down_service: ChatService) -> None:
    e = error_of(down_service, chat("hi", max_tokens=10**6))
    assert e.message == "max_tokens: expected at most 1024 (the model's context length), got 1000000"


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("temperature", -0.1, "temperature: expected a number >= 0, got -0.1"),
        ("temperature", float("nan"), "temperature: expected a number >= 0, got nan"),
        ("top_p", 0.0, "top_p: expected a number in (0, 1], got 0.0"),
        ("top_p", 1.5, "top_p: expected a number in (0, 1], got 1.5"),
        ("top_k", -2, "top_k: expected 0 or -1 (disabled) or a positive integer, got -2"),
        ("seed", 2**70, f"seed: expected a 64-bit integer, got {2**70}"),
        ("presence_penalty", 2.5, "presence_penalty: expected a number in [-2, 2], got 2.5"),
        ("presence_penalty", float("nan"), "presence_penalty: expected a number in [-2, 2], got nan"),
        ("frequency_penalty", -2.1, "frequency_penalty: expected a number in [-2, 2], got -2.1"),
        ("repetition_penalty", 0.0, "repetition_penalty: expected a number > 0 (1 disables it), got 0.0"),
        (
            "repetition_penalty",
            float("inf"),
            "repetition_penalty: expected a number > 0 (1 disables it), got inf",
        ),
        ("stop_token_ids", [2, -1], "stop_token_ids[1]: expected a token id >= 0, got -1"),
    ],
)
def test_sampling_ranges(down_service: ChatService, field: str, value: object, message: str) -> None:
    e = error_of(down_service, chat("hi", **{field: value}))
    assert (e.status, e.message) == (400, message)


def test_unset_sampling_fields_stay_unset_for_the_llm_service(down_service: ChatService) -> None:
    """The gateway fills in nothing: the LLM service gives unset fields the preset's values."""
    _, _, sampling = down_service.validate(chat("hi"))
    unset = ("max_tokens", "temperature", "top_p", "top_k", "seed")
    assert not any(sampling.HasField(f) for f in unset)
    assert not any(
        sampling.HasField(f) for f in ("repetition_penalty", "presence_penalty", "frequency_penalty")
    )
    assert list(sampling.stop) == [] and list(sampling.stop_token_ids) == []


def test_sampling_pass_through(down_service: ChatService) -> None:
    _, _, sampling = down_service.validate(
        chat("hi", max_tokens=5, temperature=0.0, top_p=0.5, top_k=-1, seed=9, stop=["x", ""])
    )
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p) == (5, 0.0, 0.5)
    assert (sampling.top_k, sampling.seed, list(sampling.stop)) == (0, 9, ["x"])
    assert sampling.HasField("top_k")  # -1 (off) is sent as 0, a value, not as unset
    _, _, sampling = down_service.validate(
        chat(
            "hi", repetition_penalty=1.2, presence_penalty=-2.0, frequency_penalty=0.0, stop_token_ids=[2277]
        )
    )
    assert sampling.repetition_penalty == pytest.approx(1.2)
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (-2.0, 0.0)
    assert sampling.HasField("frequency_penalty") and list(sampling.stop_token_ids) == [2277]


def test_too_many_images(down_service: ChatService, png: bytes) -> None:
    e = error_of(down_service, chat(*[image(png, i) for i in range(5)]))
    assert (e.status, e.message) == (400, "preset tiny accepts at most 4 images per request, got 5")
    down_service.validate(chat(*[image(png, i) for i in range(4)]))


def test_bad_role(down_service: ChatService) -> None:
    request = ChatRequest(model="tiny", turns=[turn("tool", ("x",))], request_id="r")
    e = error_of(down_service, request)
    assert e.message == "messages[0].role: expected one of system, user, assistant, got 'tool'"


# ---- media and features -------------------------------------------------------------------


async def test_prepare_builds_the_generate_request(service: ChatService, png: bytes) -> None:
    request = ChatRequest(
        model="tiny@7",
        request_id="req-9",
        max_tokens=12,
        stop=["."],
        turns=[
            turn("system", ("be brief",)),
            turn("user", ("look", image_url(png, 1), "and", image(png, 3))),
        ],
    )
    prepared = await service.prepare(request)
    gen = prepared.generate_request
    assert prepared.id == "chatcmpl-req-9" and prepared.model == "tiny@7"
    assert (gen.request_id, gen.adapter, gen.sampling.max_tokens) == ("req-9", "tiny@7", 12)
    assert [t.role for t in gen.turns] == ["system", "user"]
    parts = [p.WhichOneof("part") for p in gen.turns[1].parts]
    assert parts == ["text", "media", "text", "media"]
    assert [m.modality for m in sent_media(gen)] == ["image", "image"]
    features = tensor_to_array(gen.turns[1].parts[1].media.features)
    assert features.shape == (16, 64) and features.dtype == np.float32


async def test_time_parts_become_time_seconds(
    service: ChatService, png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "_check_time_parts", lambda request: None)  # `tiny` has no heads
    request = ChatRequest(
        model="tiny",
        request_id="req-t",
        turns=[turn("user", (image(png, 0), "from ", TimePart(1.5), " on"))],
    )
    gen = (await service.prepare(request)).generate_request
    parts = gen.turns[0].parts
    assert [p.WhichOneof("part") for p in parts] == ["media", "text", "time_seconds", "text"]
    assert parts[2].time_seconds == 1.5 and parts[0].media.modality == "image"


def test_time_parts_are_refused_before_any_encoding(down_service: ChatService) -> None:
    # down_service serves `tiny`: no timestamp heads
    request = ChatRequest(
        model=None,
        request_id="r",
        turns=[turn("user", ("at ", TimePart(1.0, param="messages[0].content[1]")))],
    )
    with pytest.raises(
        InvalidArgumentError, match=r"messages\[0\]\.content\[1\]: a time part needs .* has none"
    ):
        down_service.validate(request)


async def test_media_is_fetched_over_http(service: ChatService, media_server: str) -> None:
    item = MediaInput("image", url=f"{media_server}/cat.png", param="messages[0].content[0]")
    prepared = await service.prepare(chat(item, "what is it?"))
    assert len(sent_media(prepared.generate_request)) == 1


async def test_bad_image_names_the_part(service: ChatService) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await service.prepare(chat("x", image(os.urandom(300), 1)))
    assert info.value.message == (
        "messages[0].content[1] (image 0): not an image: cannot identify image file"
    )
    assert info.value.param == "messages[0].content[1]"


async def test_fetch_errors_name_the_part(service: ChatService, media_server: str) -> None:
    url = f"{media_server}/missing.png"
    with pytest.raises(InvalidArgumentError) as info:
        await service.prepare(chat(MediaInput("image", url=url, param="messages[0].content[0]")))
    assert info.value.message == (
        f"messages[0].content[0] (image 0): could not fetch image from {url}: the server answered HTTP 404"
    )


async def test_inline_data_over_the_limit(service: ChatService) -> None:
    limit = service.settings.media_max_bytes
    with pytest.raises(PayloadTooLargeError) as info:
        await service.prepare(chat(image(b"\x89PNG" + b"\0" * limit)))
    assert info.value.message == (
        f"messages[0].content[0] (image 0): image is {limit + 4} bytes, over the limit of {limit} bytes"
    )


async def test_encoder_down_is_503(
    make_service: ServiceFactory, llm_server: tuple[FakeLLM, str], png: bytes
) -> None:
    encoder = FakeEncoder()
    encoder.down = True
    service = make_service(llm_server[1], encoder=encoder)
    with pytest.raises(UnavailableError) as info:
        await service.prepare(chat(image(png)))
    assert info.value.http_status == 503


@needs_redis
async def test_feature_cache_in_real_redis(
    make_service: ServiceFactory, llm_server: tuple[FakeLLM, str], png: bytes
) -> None:
    prefix = f"mmtest:{uuid.uuid4().hex}:"
    encoder = FakeEncoder()
    service = make_service(
        llm_server[1], encoder=encoder, cache=FeatureCache(REDIS_URL, ttl_s=60, key_prefix=prefix)
    )
    try:
        first = await service.prepare(chat(image(png)))
        second = await service.prepare(chat(image_url(png)))
        assert len(encoder.calls) == 1  # the second request was served from Redis
        assert sent_media(first.generate_request)[0] == sent_media(second.generate_request)[0]
        metrics = service.metrics.render()[0].decode()
        assert 'modalmesh_gateway_feature_cache_lookups_total{result="hit"} 1.0' in metrics
        assert 'modalmesh_gateway_feature_cache_lookups_total{result="miss"} 1.0' in metrics
    finally:
        raw = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in raw.scan_iter(match=prefix + "*")]
        expected = f"{prefix}{service.preset.encoder_id('image')}:"  # image_clip_vision-<spec digest>:
        assert len(keys) == 1 and keys[0].decode().startswith(expected)
        await raw.delete(*keys)
        await raw.aclose()


async def test_unreachable_redis_still_serves(
    make_service: ServiceFactory, llm_server: tuple[FakeLLM, str], png: bytes
) -> None:
    encoder = FakeEncoder()
    service = make_service(
        llm_server[1], encoder=encoder, cache=FeatureCache("redis://127.0.0.1:1/0", ttl_s=60)
    )
    for _ in range(2):
        prepared = await service.prepare(chat(image(png)))
        events = [e async for e in service.generate(prepared)]
        assert isinstance(events[-1], Finished)
    assert len(encoder.calls) == 2


# ---- generation ---------------------------------------------------------------------------


async def test_generate_streams_deltas_then_finished(
    service: ChatService, llm_server: tuple[FakeLLM, str], png: bytes
) -> None:
    prepared = await service.prepare(chat("hi", image(png, 1)))
    events = [e async for e in service.generate(prepared)]
    assert events == [
        TextDelta("Hello"),
        TextDelta(" there"),
        Finished("!", "stop", None, prompt_tokens=26, completion_tokens=3, adapter="tiny@1"),
    ]
    assert llm_server[0].request_ids == ["req-1"]  # x-request-id metadata
    metrics = service.metrics.render()[0].decode()
    assert "modalmesh_gateway_prompt_tokens_total 26.0" in metrics
    assert 'modalmesh_gateway_time_to_first_token_seconds_count{transport="http"} 1.0' in metrics


async def test_a_stop_token_id_is_the_stop_reason(
    service: ChatService, llm_server: tuple[FakeLLM, str]
) -> None:
    """As vLLM reports it: the id of the stop token that ended the reply."""
    llm_server[0].stop_token_id = 2277
    prepared = await service.prepare(chat("hi"))
    events = [e async for e in service.generate(prepared)]
    assert isinstance(events[-1], Finished) and events[-1].stop_reason == 2277


async def test_the_preset_entry_lists_the_llms_sampling_defaults(
    service: ChatService, llm_server: tuple[FakeLLM, str]
) -> None:
    llm_server[0].sampling_defaults = llm_pb2.SamplingParams(
        max_tokens=256, temperature=1.0, top_p=0.01, top_k=50, repetition_penalty=1.0, stop_token_ids=[2277]
    )
    preset, *versions = await service.list_models()
    assert preset.sampling_defaults == {
        "max_tokens": 256,
        "temperature": 1.0,
        "top_p": 0.01,
        "top_k": 50,
        "repetition_penalty": 1.0,
        "stop": [],
        "stop_token_ids": [2277],
    }
    assert versions and all(v.sampling_defaults is None for v in versions)


async def test_llm_down_is_503(down_service: ChatService) -> None:
    prepared = await down_service.prepare(chat("hi"))
    with pytest.raises(UnavailableError) as info:
        async for _ in down_service.generate(prepared):
            pass
    assert info.value.message.startswith("the llm service is unavailable: ")


async def test_llm_errors_keep_their_status(service: ChatService, llm_server: tuple[FakeLLM, str]) -> None:
    import grpc

    llm_server[0].fail_with = grpc.StatusCode.NOT_FOUND
    prepared = await service.prepare(chat("hi", model="tiny@99"))
    with pytest.raises(NotFoundError, match="scripted failure NOT_FOUND"):
        async for _ in service.generate(prepared):
            pass


async def test_closing_the_stream_cancels_the_generation(
    service: ChatService, llm_server: tuple[FakeLLM, str]
) -> None:
    fake = llm_server[0]
    fake.pieces, fake.delay_s = ["tok"] * 200, 0.05
    prepared = await service.prepare(chat("hi"))
    events = service.generate(prepared)
    assert await anext(events) == TextDelta("tok")
    await events.aclose()
    await asyncio.wait_for(fake.cancelled.wait(), timeout=5)


# ---- models and readiness -----------------------------------------------------------------


async def test_models_list_adapter_versions(service: ChatService) -> None:
    entries = await service.list_models()
    assert [(e.id, e.parent, e.root) for e in entries] == [
        ("tiny", None, "tiny"),
        ("tiny@2", "tiny", "tiny@2"),
        ("tiny@1", "tiny", "tiny@1"),
    ]
    assert entries[1].created == 1700000000
    assert all(e.max_model_len == 1024 for e in entries)


async def test_models_without_the_llm_service(down_service: ChatService) -> None:
    assert [e.id for e in await down_service.list_models()] == ["tiny"]


async def test_readiness(service: ChatService, down_service: ChatService) -> None:
    assert await service.readiness() == {"llm": None, "encoder": None}
    checks = await down_service.readiness()
    assert checks["llm"] == "the llm service at 127.0.0.1:1 is not ready"
    assert checks["encoder"] is None
    assert isinstance(service.encoder, FakeEncoder)
    service.encoder.is_ready = False
    checks = await service.readiness()
    assert checks["encoder"] == ("the encoder service at 127.0.0.1:1 is not ready for image_clip_vision")


def test_generate_request_is_a_proto(down_service: ChatService) -> None:
    assert llm_pb2.GenerateRequest.DESCRIPTOR.full_name == "modalmesh.v1.GenerateRequest"


# ---- every modality -------------------------------------------------------------------------


def media(modality: str, data: bytes, n: int, turn: int = 0) -> MediaInput:
    return MediaInput(modality, data=data, param=f"messages[{turn}].content[{n}]")


VIDEO_TIMES = [0.0, 1.0, 2.0, 3.0]


async def test_each_modality_goes_to_its_encoder_with_frame_times(
    make_service: ServiceFactory, llm_server: tuple[FakeLLM, str], png: bytes
) -> None:
    encoder = FakeEncoder(times={"video": VIDEO_TIMES})
    service = make_service(llm_server[1], encoder=encoder, preset_="tiny-pandagpt")
    request = ChatRequest(
        model="tiny-pandagpt",
        turns=[
            turn("user", (media("video", png, 0), "what happens?")),
            turn("assistant", ("a dog runs",)),
            turn("user", (media("audio", png + b"a", 0, 2), media("image", png + b"i", 1, 2), "and now?")),
        ],
        request_id="req-mm",
    )
    prepared = await service.prepare(request)
    assert sorted(zip(encoder.modalities, [c[0] for c in encoder.calls], strict=True)) == [
        ("audio", "audio_imagebind"),
        ("image", "image_imagebind"),
        ("video", "video_imagebind"),
    ]
    sent = prepared.generate_request
    items = sent_media(sent)
    assert [m.modality for m in items] == ["video", "audio", "image"]  # the request's order
    assert list(items[0].frame_times) == VIDEO_TIMES
    assert tensor_to_array(items[0].features).shape == (16 * 4, 64)
    assert [list(m.frame_times) for m in items[1:]] == [[0.0], [0.0]]
    parts = [[p.WhichOneof("part") for p in t.parts] for t in sent.turns]
    assert parts == [["media", "text"], ["text"], ["media", "media", "text"]]
    assert [p.media.modality for p in sent.turns[2].parts[:2]] == ["audio", "image"]
    assert prepared.timestamps is False


@pytest.mark.parametrize(
    "preset_name,items,param,message",
    [
        (
            "tiny-pandagpt",
            [("video", 0), ("video", 1)],
            "messages[0].content[1]",
            "preset tiny-pandagpt accepts at most 1 video per request, got 2",
        ),
        (
            "tiny-pandagpt",
            [("audio", 0), ("audio", 1), ("audio", 2)],
            "messages[0].content[1]",
            "preset tiny-pandagpt accepts at most 1 audio clip per request, got 3",
        ),
        (
            "tiny-eventgpt",
            [("event", 0), ("image", 1)],
            "messages[0].content[1]",
            "messages[0].content[1]: preset tiny-eventgpt has no image encoder; it accepts event (got 1 image)",
        ),
        (
            "tiny-videochat",
            [("audio", 0), ("audio", 1)],
            "messages[0].content[0]",
            "messages[0].content[0]: preset tiny-videochat has no audio encoder; it accepts image, video "
            "(got 2 audio clips)",
        ),
    ],
)
def test_media_the_preset_does_not_take(
    make_service: ServiceFactory,
    png: bytes,
    preset_name: str,
    items: list[tuple[str, int]],
    param: str,
    message: str,
) -> None:
    service = make_service(preset_=preset_name)
    e = error_of(service, chat(*[media(m, png, n) for m, n in items], model=preset_name))
    assert (e.status, e.message, e.error.param) == (400, message, param)


async def test_an_encoder_refusal_names_the_item(
    make_service: ServiceFactory, llm_server: tuple[FakeLLM, str], png: bytes
) -> None:
    service = make_service(llm_server[1], preset_="tiny-videochat")
    request = ChatRequest(
        model="tiny-videochat",
        turns=[
            turn("user", (media("video", png, 0), "what happens?")),
            turn("assistant", ("a dog runs",)),
            turn("user", (media("image", b"not a png", 0, 2), "and here?")),
        ],
        request_id="req-bad",
    )
    with pytest.raises(InvalidArgumentError) as info:
        await service.prepare(request)
    assert info.value.message == "messages[2].content[0] (image 0): not an image: cannot identify image file"
    assert info.value.param == "messages[2].content[0]"


@needs_redis
async def test_frame_times_come_back_from_the_cache(
    make_service: ServiceFactory, llm_server: tuple[FakeLLM, str], png: bytes
) -> None:
    prefix = f"mmtest:{uuid.uuid4().hex}:"
    encoder = FakeEncoder(times={"video": VIDEO_TIMES})
    cache = FeatureCache(REDIS_URL, ttl_s=60, key_prefix=prefix)
    service = make_service(llm_server[1], encoder=encoder, cache=cache, preset_="tiny-etchat")
    try:
        video = chat(media("video", png, 0), "when?", model="tiny-etchat")
        first = await service.prepare(video)
        second = await service.prepare(video)
        assert len(encoder.calls) == 1
        assert list(sent_media(second.generate_request)[0].frame_times) == VIDEO_TIMES
        assert sent_media(first.generate_request)[0] == sent_media(second.generate_request)[0]
    finally:
        raw = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in raw.scan_iter(match=prefix + "*")]
        assert [k.decode() for k in keys] == [
            f"{prefix}{service.preset.encoder_id('video')}:{content_digest(png)}"
        ]
        await raw.delete(*keys)
        await raw.aclose()


async def test_timestamps_of_the_llm_reach_the_events(
    make_service: ServiceFactory, llm_server: tuple[FakeLLM, str], png: bytes
) -> None:
    fake = llm_server[0]
    fake.pieces = ["At ", "<vid> 2.0s", " it jumps."]
    fake.timestamps = {1: [llm_pb2.Timestamp(media_index=0, frame=2, seconds=2.0, char_offset=3)]}
    service = make_service(
        llm_server[1], encoder=FakeEncoder(times={"video": VIDEO_TIMES}), preset_="tiny-etchat"
    )
    prepared = await service.prepare(chat(media("video", png, 0), "when?", model="tiny-etchat"))
    assert prepared.timestamps is True
    events = [e async for e in service.generate(prepared)]
    assert events[0] == TextDelta("At ")
    assert events[1] == TextDelta(
        "<vid> 2.0s", (Timestamp(media_index=0, frame=2, seconds=2.0, char_offset=3),)
    )
    assert isinstance(events[2], Finished) and events[2].timestamps == ()


async def test_a_full_llm_queue_is_resource_exhausted_429(
    service: ChatService, llm_server: tuple[FakeLLM, str]
) -> None:
    import grpc

    from services.common.errors import ResourceExhaustedError

    llm_server[0].fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    prepared = await service.prepare(chat("hi"))
    with pytest.raises(ResourceExhaustedError, match="scripted failure RESOURCE_EXHAUSTED") as info:
        async for _ in service.generate(prepared):
            pass
    assert info.value.http_status == 429
