"""The servicer: proto <-> domain translation, request-id binding and error mapping in-process."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

import grpc
import numpy as np
import pytest
import torch

from modalmesh.v1 import llm_pb2, llm_pb2_grpc
from services.common.content import MediaPart, TextPart
from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.log import request_id_var
from services.common.settings import Settings
from services.common.tensor_codec import array_to_tensor, tensor_to_torch
from services.llm.domain import (
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    ModalityInfo,
    ModelInfo,
    OutputInfo,
    OutputSignal,
    Usage,
)
from services.llm.sampling import SamplingParams
from services.llm.server import build_server
from services.llm.servicer import chunk_from_event, info_to_proto, request_from_proto


def proto_request(**sampling: object) -> llm_pb2.GenerateRequest:
    image = llm_pb2.MediaFeatures(modality="image", features=array_to_tensor(np.ones((16, 64), "<f2")))
    return llm_pb2.GenerateRequest(
        request_id="r1",
        adapter="tiny",
        turns=[llm_pb2.Turn(role="user", parts=[llm_pb2.TurnPart(media=image), llm_pb2.TurnPart(text="hi")])],
        sampling=llm_pb2.SamplingParams(**{"max_tokens": 8, **sampling}),  # type: ignore[arg-type]
    )


def test_request_from_proto() -> None:
    req = request_from_proto(proto_request(top_k=5, stop=["x"]))
    assert req.turns[0].role == "user"
    media, text = req.turns[0].parts
    assert isinstance(media, MediaPart) and text == TextPart("hi")
    assert req.media == (media.media,)  # the part carries its item
    assert req.media[0].modality == "image"
    assert req.media[0].features.dtype == torch.float16 and req.media[0].features.shape == (16, 64)
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (8, None, None, 5, None, ("x",))
    assert (req.adapter, req.request_id) == ("tiny", "r1")


def test_unset_sampling_fields_stay_unset_for_the_preset() -> None:
    """Nothing is filled in on the way: the engine gives unset fields the preset's values."""
    s = request_from_proto(llm_pb2.GenerateRequest(sampling=llm_pb2.SamplingParams())).sampling
    assert s == SamplingParams() and s.max_tokens is None and s.repetition_penalty is None


def test_an_explicit_zero_max_tokens_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match=r"sampling.max_tokens: expected > 0, got 0"):
        request_from_proto(llm_pb2.GenerateRequest(sampling=llm_pb2.SamplingParams(max_tokens=0)))


def test_penalties_and_stop_token_ids_cross_the_wire() -> None:
    s = request_from_proto(
        proto_request(
            repetition_penalty=1.25,
            presence_penalty=-0.5,
            frequency_penalty=2.0,
            stop_token_ids=[7, 9],
            top_k=0,
        )
    ).sampling
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (1.25, -0.5, 2.0)
    assert (s.stop_token_ids, s.top_k) == ((7, 9), 0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "repetition_penalty",
            0.0,
            "sampling.repetition_penalty: expected a number > 0 (1 disables it), got 0",
        ),
        ("presence_penalty", 2.5, "sampling.presence_penalty: expected in [-2, 2] (0 disables it), got 2.5"),
        (
            "frequency_penalty",
            -3.0,
            "sampling.frequency_penalty: expected in [-2, 2] (0 disables it), got -3",
        ),
    ],
)
def test_bad_penalties_are_refused_by_name(field: str, value: float, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        request_from_proto(proto_request(**{field: value}))
    assert (e.value.message, e.value.param) == (message, field)


def test_stop_token_id_and_sampling_defaults_cross_the_wire() -> None:
    chunk = chunk_from_event(GenerationEvent(finish_reason=FinishReason.STOP, stop_token_id=2277))
    assert chunk.HasField("stop_token_id") and chunk.stop_token_id == 2277 and chunk.stop_reason == ""
    assert not chunk_from_event(GenerationEvent(finish_reason=FinishReason.STOP)).HasField("stop_token_id")
    defaults = SamplingParams(
        max_tokens=256, temperature=1.0, top_p=0.01, top_k=50, repetition_penalty=1.0, stop_token_ids=(2277,)
    )
    info = info_to_proto(ModelInfo("pandagpt", "a@1", ("a@1",), 1024, (), 5, sampling_defaults=defaults))
    d = info.sampling_defaults
    assert (d.max_tokens, d.top_k, list(d.stop_token_ids), list(d.stop)) == (256, 50, [2277], [])
    assert d.top_p == pytest.approx(0.01) and not d.HasField("seed")


def test_explicit_zero_temperature_and_seed_are_kept() -> None:
    s = request_from_proto(proto_request(temperature=0.0, seed=0, top_p=0.5)).sampling
    assert (s.temperature, s.seed, s.top_p) == (0.0, 0, 0.5)


def test_empty_part_and_bad_tensor_are_invalid() -> None:
    msg = proto_request()
    msg.turns[0].parts.append(llm_pb2.TurnPart())
    with pytest.raises(
        InvalidArgumentError, match=r"turns\[0\].parts\[2\]: none of text, media, time_seconds"
    ):
        request_from_proto(msg)
    msg = proto_request()
    msg.turns[0].parts[0].media.features.data = b"\0" * 10
    with pytest.raises(
        InvalidArgumentError, match=r"turns\[0\]\.parts\[0\]\.media\.features: expected 2048 bytes"
    ):
        request_from_proto(msg)


def test_chunk_and_info_to_proto() -> None:
    first = chunk_from_event(GenerationEvent(text="a", adapter="tiny@1"))
    assert (first.text, first.adapter, first.finish_reason, first.HasField("usage")) == (
        "a", "tiny@1", llm_pb2.FINISH_REASON_UNSPECIFIED, False,
    )  # fmt: skip
    last = chunk_from_event(
        GenerationEvent(text="", finish_reason=FinishReason.STOP, usage=Usage(7, 3), stop_reason="END")
    )
    assert (last.finish_reason, last.usage.prompt_tokens, last.usage.completion_tokens, last.stop_reason) == (
        llm_pb2.FINISH_REASON_STOP, 7, 3, "END",
    )  # fmt: skip
    info = info_to_proto(ModelInfo("tiny", "a@1", ("a@1",), 1024, (ModalityInfo("image", 4, 16, 64, 16),), 5))
    assert (info.preset, info.adapters, info.modalities[0].llm_tokens, info.created) == (
        "tiny",
        ["a@1"],
        16,
        5,
    )


class FakeEngine:
    """Records the request id seen while generating; fails on adapter "missing"."""

    def __init__(self) -> None:
        self.request_ids: list[str | None] = []

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        self.request_ids.append(request_id_var.get())
        if request.adapter == "missing":
            raise NotFoundError("adapter 'missing' is not loaded; loaded: ['tiny@1']")
        yield GenerationEvent(text="he", adapter="tiny@1")
        yield GenerationEvent(text="llo", finish_reason=FinishReason.LENGTH, usage=Usage(5, 2))

    def info(self) -> ModelInfo:
        return ModelInfo("tiny", "tiny@1", ("tiny@1",), 1024, (), 0)


async def test_servicer_in_process() -> None:
    engine = FakeEngine()
    server = build_server(engine, Settings())
    port = server.bind("127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = llm_pb2_grpc.LLMStub(channel)
            call = stub.Generate(proto_request(), metadata=(("x-request-id", "abc"),))
            chunks = [c async for c in call]
            assert [c.text for c in chunks] == ["he", "llo"]
            assert chunks[-1].finish_reason == llm_pb2.FINISH_REASON_LENGTH
            assert engine.request_ids == ["abc"]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                bad = proto_request()
                bad.adapter = "missing"
                await _drain(stub.Generate(bad))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert "loaded: ['tiny@1']" in (e.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _drain(stub.Generate(proto_request(temperature=-1.0)))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (await stub.GetModelInfo(llm_pb2.ModelInfoRequest())).adapter == "tiny@1"
    finally:
        await server.stop()


async def _drain(call: AsyncIterator[llm_pb2.GenerateChunk]) -> None:
    async for _ in call:
        pass


def test_frame_times_and_timestamps_cross_the_wire() -> None:
    from services.common.content import Timestamp

    msg = proto_request()
    msg.turns[0].parts[0].media.frame_times.extend([0.0, 0.5])
    assert request_from_proto(msg).media[0].times == (0.0, 0.5)
    assert request_from_proto(proto_request()).media[0].times == ()
    chunk = chunk_from_event(GenerationEvent(text="at 3", timestamps=(Timestamp(0, 3, 3.0, 3),)))
    assert [(t.media_index, t.frame, t.seconds, t.char_offset) for t in chunk.timestamps] == [(0, 3, 3.0, 3)]


def test_output_signals_and_output_info_cross_the_wire() -> None:
    cond = torch.randn(77, 32)
    request = request_from_proto(
        llm_pb2.GenerateRequest(
            sampling=llm_pb2.SamplingParams(max_tokens=2), output_modalities=["image", "audio"]
        )
    )
    assert request.outputs == ("image", "audio")
    chunk = chunk_from_event(
        GenerationEvent(
            text="", outputs=(OutputSignal("image", cond, index=1, char_offset=7, appended=True),)
        )
    )
    (signal,) = chunk.outputs
    assert (signal.modality, signal.index, signal.char_offset, signal.appended) == ("image", 1, 7, True)
    assert signal.conditioning.dtype == "FP32" and list(signal.conditioning.shape) == [77, 32]
    assert torch.equal(tensor_to_torch(signal.conditioning), cond)
    info = info_to_proto(
        ModelInfo("tiny-nextgpt", "a@1", ("a@1",), 512, (), 5, outputs=(OutputInfo("audio", 8, (1, 16)),))
    )
    assert [(o.modality, o.signal_tokens, list(o.conditioning_shape)) for o in info.outputs] == [
        ("audio", 8, [1, 16])
    ]
