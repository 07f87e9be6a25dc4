"""Domain types of the LLM service: requests, events and model info, independent of the wire.

The servicer translates protobuf messages into these and back; the library (templates, prompt
builder, engine) only ever sees these. `GenerationEngine` is the interface the servicer
depends on: `services.llm.engine.Engine` (continuous batching) implements it, and a test or
another engine can stand in for it.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

from services.common.content import MediaFeatures, Timestamp, Turn, media_parts

if TYPE_CHECKING:
    import torch

    from services.llm.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation needs.

    Attributes:
        turns: The conversation; the last turn must be the user's. Each media part carries its
            item's features, as the gateway encoded them.
        sampling: Decoding parameters (validated on construction).
        adapter: "" (current), "name" or "name@version".
        request_id: For logs only.
        outputs: Output modalities asked for besides text; one the model has not emitted by
            the end of the reply is appended (see `services.llm.signals`).
    """

    turns: Sequence[Turn[MediaFeatures[torch.Tensor]]]
    sampling: SamplingParams
    adapter: str = ""
    request_id: str = ""
    outputs: tuple[str, ...] = ()

    @cached_property
    def media(self) -> tuple[MediaFeatures[torch.Tensor], ...]:
        """The items of the media parts, in the order they appear (that order numbers them:
        `Timestamp.media_index`, the prompt's media spans)."""
        return tuple(p.media for p in media_parts(self.turns))


class FinishReason(enum.Enum):
    """Why a generation ended."""

    STOP = "stop"  # end-of-sequence token, a stop string or a stop token id
    LENGTH = "length"  # max_tokens or the context limit


@dataclass(frozen=True)
class Usage:
    """Token counts of one generation.

    Attributes:
        prompt_tokens: Prompt length including BOS and the expanded media placeholders.
        completion_tokens: Every sampled token, including an end-of-sequence token and the
            token that completed a stop string.
    """

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class OutputSignal:
    """An item to generate: a decoder's conditioning from the output projector (NExT-GPT).

    Attributes:
        modality: "image", "audio" or "video".
        conditioning: (rows, width) float32 on the CPU, e.g. (77, 768) for SD 1.5.
        index: 0, 1, ... in the order of the reply.
        char_offset: Where its signal tokens were in the whole reply's text.
        appended: Appended because the request asked for it (not emitted by the model).
    """

    modality: str
    conditioning: torch.Tensor = field(repr=False)
    index: int = 0
    char_offset: int = 0
    appended: bool = False


@dataclass(frozen=True)
class GenerationEvent:
    """One streamed piece of a generation.

    Attributes:
        text: The text delta (may be empty on the first and last events).
        token_ids: Tokens sampled since the previous event.
        adapter: "name@version" serving the request (first event only).
        finish_reason: Set on the last event only.
        usage: Set on the last event only.
        stop_reason: The stop string that ended generation (last event only).
        stop_token_id: The stop token id that ended generation (last event only).
        timestamps: Times matched for the time tokens whose text is in this event.
        outputs: Output signals completed since the previous event.
    """

    text: str = ""
    token_ids: tuple[int, ...] = ()
    adapter: str | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    stop_reason: str | None = None
    timestamps: tuple[Timestamp, ...] = ()
    outputs: tuple[OutputSignal, ...] = ()
    stop_token_id: int | None = None


@dataclass(frozen=True)
class ModalityInfo:
    """What the service expects of one modality's media items.

    Attributes:
        modality: The modality.
        max_per_prompt: Most items of it in one request.
        feature_tokens: Feature rows per frame (taps included).
        feature_dim: Feature width.
        llm_tokens: LLM tokens per item at its fixed frame count (else at max_frames, else 1
            frame); with media_combine sum, the items of one turn share one token.
        frames: The fixed frame count of every item, or None where it varies.
        max_frames: The most frames where it varies (None: no limit).
    """

    modality: str
    max_per_prompt: int
    feature_tokens: int
    feature_dim: int
    llm_tokens: int
    frames: int | None = 1
    max_frames: int | None = None


@dataclass(frozen=True)
class OutputInfo:
    """An output modality: its signal-token count and decoder conditioning shape."""

    modality: str
    signal_tokens: int
    conditioning_shape: tuple[int, int]


@dataclass(frozen=True)
class ModelInfo:
    """What a replica serves.

    Attributes:
        sampling_defaults: What a request's unset sampling fields become (the preset's
            `generation:` over the neutral defaults), with the preset's stop strings and ids.
    """

    preset: str
    adapter: str
    adapters: tuple[str, ...]
    max_context_tokens: int
    modalities: tuple[ModalityInfo, ...]
    created: int
    outputs: tuple[OutputInfo, ...] = ()
    sampling_defaults: SamplingParams | None = None


class GenerationEngine(Protocol):
    """The interface the gRPC servicer depends on."""

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream the events of one generation; raises ModalmeshError on a bad request."""
        ...

    def info(self) -> ModelInfo:
        """What this engine serves."""
        ...
