"""Transport-independent chat types: what REST and gRPC requests become, and what serving yields.

`gateway.protocol` (OpenAI JSON) and `gateway.grpc_chat` (modalmesh.v1.Chat) translate their
wire forms into a `ChatRequest`; `gateway.serving.ChatService` turns it into a stream of
`TextDelta` (and, for presets with outputs, `MediaOutput`) events closed by one `Finished`. Nothing here knows HTTP, JSON or gRPC.

The conversation itself (`Turn` and its parts, `MediaInput`, `Timestamp`, `ROLES`) is the one
definition every service shares, in `services.common.content`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.common.content import MediaInput, Timestamp, Turn, media_parts


@dataclass
class ChatRequest:
    """A chat completion request, as both transports describe it.

    Attributes:
        model: The served name ("tiny", or "tiny@<version>" to pin an adapter); None = default.
        turns: The conversation in order.
        request_id: Id carried into every downstream call and log line.
        max_tokens: Upper bound on generated tokens; None = the preset's (`generation:`).
        max_tokens_param: The request field max_tokens came from, for error messages.
        temperature, top_p, top_k, seed, stop: Sampling parameters (None = the preset's).
        repetition_penalty, presence_penalty, frequency_penalty: Penalties (None = the preset's).
        stop_token_ids: Token ids that end the reply, besides the preset's.
        modalities: What the reply should hold ("text", "image", "audio", "video"); empty =
            text, plus whatever media the model emits on its own (presets with outputs).
        decoding: Per output modality, its decoding parameters (steps, guidance_scale, height,
            width, seed, duration_s, num_frames, fps; unset = the decoder's defaults).
    """

    model: str | None
    turns: list[Turn[MediaInput]]
    request_id: str
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    modalities: tuple[str, ...] = ()
    decoding: dict[str, dict[str, Any]] = field(default_factory=dict)
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop_token_ids: list[int] = field(default_factory=list)

    def media(self) -> list[MediaInput]:
        """Every media item of the request, in the order it appears."""
        return [p.media for p in media_parts(self.turns)]


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text, and the timestamps written in it (time-aware presets)."""

    text: str
    timestamps: tuple[Timestamp, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The end of a generation: the last text piece (may be empty), why it stopped, and usage."""

    text: str
    finish_reason: str  # "stop" | "length"
    stop_reason: str | int | None  # the stop string, or the stop token id, that ended it
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None = None  # the "name@version" that served it (OpenAI's system_fingerprint)
    timestamps: tuple[Timestamp, ...] = ()  # those written in `text`


@dataclass(frozen=True)
class MediaOutput:
    """A generated image, sound or clip of the reply, or why it could not be made.

    Attributes:
        modality: "image", "audio" or "video".
        index: 0, 1, ... in the order of the reply.
        char_offset: Where it belongs in the reply's text (a character index).
        data: The encoded file (PNG, WAV, MP4 or GIF), None on error.
        mime_type: E.g. "image/png".
        seed: The seed the decoder used (to reproduce it).
        error: None, or what went wrong (that item alone fails; the text still arrives).
        error_code: The HTTP status the error maps to (400, 503, 504...).
    """

    modality: str
    index: int
    char_offset: int
    data: bytes | None = None
    mime_type: str = ""
    seed: int | None = None
    error: str | None = None
    error_code: int | None = None


Event = TextDelta | MediaOutput | Finished


@dataclass(frozen=True)
class ModelEntry:
    """One entry of the model list: the preset, or a pinned adapter version of it."""

    id: str
    root: str
    parent: str | None
    created: int
    max_model_len: int | None
    sampling_defaults: dict[str, Any] | None = None  # the preset entry: what unset fields become
