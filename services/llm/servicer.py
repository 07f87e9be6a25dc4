"""The gRPC servicer of `modalmesh.v1.LLM`: protobuf <-> domain types around an engine.

Nothing here decides anything about generation; it translates, binds the request id for
logging, and maps errors to status codes with `abort_with`. A media part's features become a
torch tensor here, the one place they cross from the wire into the model library's type
(`MediaFeatures[torch.Tensor]`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch

from modalmesh.v1 import llm_pb2, llm_pb2_grpc
from services.common.content import MediaFeatures, MediaPart, Part, TextPart, TimePart, Turn
from services.common.errors import InvalidArgumentError, ModalmeshError
from services.common.grpc_errors import abort_with
from services.common.log import bound_request_id, request_id_from_metadata
from services.common.tensor_codec import tensor_to_torch, torch_tensor_fields
from services.llm.domain import FinishReason, GenerationEngine, GenerationEvent, GenerationRequest, ModelInfo
from services.llm.sampling import SamplingParams

logger = logging.getLogger(__name__)

_FINISH = {
    FinishReason.STOP: llm_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: llm_pb2.FINISH_REASON_LENGTH,
}


def _part(msg: llm_pb2.TurnPart, where: str) -> Part[MediaFeatures[torch.Tensor]]:
    kind = msg.WhichOneof("part")
    if kind == "text":
        return TextPart(msg.text)
    if kind == "media":
        m = msg.media
        features = tensor_to_torch(m.features, what=f"{where}.media.features")
        return MediaPart(MediaFeatures(m.modality, features, tuple(float(t) for t in m.frame_times)))
    if kind == "time_seconds":
        return TimePart(msg.time_seconds)
    raise InvalidArgumentError(f"{where}: none of text, media, time_seconds is set", param=where)


def _optional(msg: llm_pb2.SamplingParams, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def sampling_from_proto(msg: llm_pb2.SamplingParams) -> SamplingParams:
    """Domain sampling parameters (validated) from the wire; unset fields stay unset (None),
    for the engine to fill from the preset. An explicit max_tokens 0 is refused; a peer built
    before the field had presence sends nothing for 0, which reads as unset."""
    return SamplingParams(
        max_tokens=_optional(msg, "max_tokens"),
        temperature=_optional(msg, "temperature"),
        top_p=_optional(msg, "top_p"),
        top_k=_optional(msg, "top_k"),
        seed=_optional(msg, "seed"),
        stop=tuple(msg.stop),
        repetition_penalty=_optional(msg, "repetition_penalty"),
        presence_penalty=_optional(msg, "presence_penalty"),
        frequency_penalty=_optional(msg, "frequency_penalty"),
        stop_token_ids=tuple(msg.stop_token_ids),
    )


def sampling_to_proto(params: SamplingParams) -> llm_pb2.SamplingParams:
    """The wire form of domain sampling parameters (None fields left unset)."""
    return llm_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        stop=list(params.stop),
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        stop_token_ids=list(params.stop_token_ids),
    )


def request_from_proto(msg: llm_pb2.GenerateRequest) -> GenerationRequest:
    """A domain GenerationRequest from a GenerateRequest message.

    Raises:
        InvalidArgumentError: An empty part, undecodable features or bad sampling parameters.
    """
    turns = [
        Turn(role=t.role, parts=[_part(p, f"turns[{i}].parts[{j}]") for j, p in enumerate(t.parts)])
        for i, t in enumerate(msg.turns)
    ]
    return GenerationRequest(
        turns=turns,
        sampling=sampling_from_proto(msg.sampling),
        adapter=msg.adapter,
        request_id=msg.request_id,
        outputs=tuple(msg.output_modalities),
    )


def chunk_from_event(event: GenerationEvent) -> llm_pb2.GenerateChunk:
    """A GenerateChunk from a domain event."""
    chunk = llm_pb2.GenerateChunk(
        text=event.text,
        adapter=event.adapter or "",
        timestamps=[
            llm_pb2.Timestamp(
                media_index=t.media_index, frame=t.frame, seconds=t.seconds, char_offset=t.char_offset
            )
            for t in event.timestamps
        ],
        outputs=[
            llm_pb2.OutputSignal(
                modality=o.modality,
                conditioning=torch_tensor_fields(o.conditioning),
                index=o.index,
                char_offset=o.char_offset,
                appended=o.appended,
            )
            for o in event.outputs
        ],
    )
    if event.finish_reason is not None:
        chunk.finish_reason = _FINISH[event.finish_reason]
        chunk.stop_reason = event.stop_reason or ""
        if event.stop_token_id is not None:
            chunk.stop_token_id = event.stop_token_id
    if event.usage is not None:
        chunk.usage.prompt_tokens = event.usage.prompt_tokens
        chunk.usage.completion_tokens = event.usage.completion_tokens
    return chunk


def info_to_proto(info: ModelInfo) -> llm_pb2.ModelInfo:
    """A ModelInfo message from the domain one."""
    return llm_pb2.ModelInfo(
        preset=info.preset,
        adapter=info.adapter,
        adapters=list(info.adapters),
        max_context_tokens=info.max_context_tokens,
        created=info.created,
        modalities=[
            llm_pb2.ModalityInfo(
                modality=m.modality,
                max_per_prompt=m.max_per_prompt,
                feature_tokens=m.feature_tokens,
                feature_dim=m.feature_dim,
                llm_tokens=m.llm_tokens,
            )
            for m in info.modalities
        ],
        outputs=[
            llm_pb2.OutputInfo(
                modality=o.modality,
                signal_tokens=o.signal_tokens,
                conditioning_shape=list(o.conditioning_shape),
            )
            for o in info.outputs
        ],
        sampling_defaults=(
            None if info.sampling_defaults is None else sampling_to_proto(info.sampling_defaults)
        ),
    )


class LLMServicer(llm_pb2_grpc.LLMServicer):
    """`modalmesh.v1.LLM` over an engine.

    Args:
        engine: Anything with `generate()` and `info()` (see GenerationEngine).
    """

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine

    async def Generate(
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[llm_pb2.GenerateChunk]:
        """Stream the reply to one conversation."""
        request_id = request_id_from_metadata(context.invocation_metadata()) or request.request_id
        with bound_request_id(request_id or None):
            try:
                domain = request_from_proto(request)
                async with contextlib.aclosing(self.engine.generate(domain)) as events:
                    async for event in events:
                        yield chunk_from_event(event)
            except ModalmeshError as e:
                logger.info("Generate refused: %s", e.message)
                await abort_with(context, e)
            except Exception as e:
                await abort_with(context, e)

    async def GetModelInfo(
        self, request: llm_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llm_pb2.ModelInfo:
        """What this replica serves."""
        return info_to_proto(self.engine.info())
