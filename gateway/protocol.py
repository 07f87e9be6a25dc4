"""The OpenAI chat API as vLLM accepts and produces it (reference/SERVING_NOTES.md section 2).

Request models validate what a client sends to POST /v1/chat/completions and convert it into a
`gateway.domain.ChatRequest`; response models produce the exact JSON shapes vLLM returns:
`chat.completion`, `chat.completion.chunk` (serialized with exclude_unset, so fields set to
None appear as null), the usage-only final chunk (exclude_none), the model list and the error
body. Unknown request fields are ignored, as OpenAI and vLLM do.

Media parts (request): `image_url`, `video_url` (data:video/...;base64 or http(s); mp4, mov,
webm, mkv, avi), `audio_url` and `input_audio` ({"data": <base64>, "format": "wav" | "mp3" |
"flac" | "ogg"}), and modalmesh's `event_url` and `input_event` ({"data": <base64>, "format":
"npy" | "npz"}; an EventGPT .npy dict of x, y, t, p, a plain .npy structured or (N, 4) array, or
an .npz; see services/models/media/events.py). Any number of them, of any kinds the preset has an
encoder for, in any message. Which part type carries which modality, and the inline formats
each takes, are the records of `services.common.modalities` (`url_part`, `inline_part`,
`inline_formats`).

A generic part carries any modality of the registry by name, so a new modality needs no new
part type (modalmesh's own, shaped like input_audio):

    {"type": "input_media", "input_media": {"modality": "image", "url": "https://..."}}
    {"type": "input_media", "input_media": {"modality": "audio", "data": "<base64>", "format": "wav"}}

exactly one of `url` (as a *_url part's) or `data` (base64, as input_audio's), `format`
optional (one of the modality's inline formats where it has them: the encoder reads the
format from the bytes). A modality the served preset does not take is refused with 400
naming the part and the preset's modalities.

Any media part may carry vLLM's `uuid` (1-128 characters of A-Z a-z 0-9 . _ : -): the item's
features are cached under it instead of under the hash of its bytes, and a later part that
names the uuid without media (`{"type": "image_url", "image_url": null, "uuid": "sku-1"}`)
reuses them without sending, fetching or encoding anything (400 if nothing is cached under it).

For presets with a timestamp head (E.T. Chat), a user message may hold time parts, each a
time in seconds in the request's video, standing where E.T. Bench's questions write `<vid>`:

    {"type": "time", "time": {"seconds": 12.5}}

It renders as the `<vid>` token, whose input embedding gets the frame at that time added (a
preset without the head, or a request without a video, is refused with 400).

One extra field beyond OpenAI's (for presets with a timestamp head, E.T. Chat): the times the
model pointed at, matched to frames of a video of the request,

    choices[0].message.timestamps = [
        {"media_index": 0, "frame": 3, "seconds": 3.0, "char_offset": 17}, ...]

`media_index` counts the request's media parts in order (all kinds), `frame` is the matched
frame of that item, `seconds` its time in the file, `char_offset` where the time is written in
the reply's text (a character index into the whole content). The list is present, possibly
empty, on every non-streamed reply of such a preset and absent otherwise; a streamed reply sets
`choices[0].delta.timestamps` on the chunks whose text holds them (offsets still index the
whole reply). OpenAI clients ignore the field (the `openai` package keeps it as an extra
attribute: `message.model_extra["timestamps"]`).

Output media (presets with `outputs`, NExT-GPT). Request: OpenAI's `modalities` ("text" plus
any of "image", "audio", "video" the preset can produce; a listed modality is always produced,
the model may also produce others on its own) and, per output modality, its decoding
parameters as a top-level object like OpenAI's `audio`:

    {"modalities": ["text", "image"], "image": {"height": 64, "width": 64, "steps": 4, "seed": 7},
     "audio": {"duration_s": 2.0}, "video": {"num_frames": 8, "fps": 8}}

(steps, guidance_scale and seed for every kind; height/width for image and video; duration_s
for audio; num_frames/fps for video; unset = the decoder's default; out of the preset's limits
= 400). Reply: `choices[0].message.media`, a list in the reply's order whose entries have the
shapes of the request's content parts, so they can be sent back in a later turn:

    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}, "modality": "image",
     "index": 0, "char_offset": 12, "seed": 7}
    {"type": "input_audio", "input_audio": {"data": "<base64 WAV>", "format": "wav"}, ...}
    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}, ...}
    {"type": "error", "modality": "video", "index": 2, "char_offset": 12,
     "error": {"message": "...", "type": "ServiceUnavailableError", "code": 503}}

`char_offset` is where the item belongs in the text. An item whose decoder failed or was down
is an `error` entry; the text and the other items still arrive. Streamed replies carry each
entry in `choices[0].delta.media` of a chunk after the last text and before the chunk with the
finish reason. `media` is absent when the reply has none.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gateway.domain import ChatRequest, MediaOutput, ModelEntry
from services.common import modalities
from services.common.content import MediaInput, MediaPart, Part, TextPart, TimePart, Timestamp, Turn
from services.common.errors import InvalidArgumentError, ModalmeshError

# Media part types -> modality, from the registry. video_url / audio_url / input_audio follow
# vLLM's and OpenAI's shapes; input_event / event_url are modalmesh's own, shaped like
# input_audio / audio_url; input_media (GENERIC_PART) names its modality.
URL_PARTS = {m.url_part: name for name, m in modalities.MODALITIES.items() if m.url_part}
INLINE_PARTS = {m.inline_part: name for name, m in modalities.MODALITIES.items() if m.inline_part}
GENERIC_PART = modalities.GENERIC_PART
ACCEPTED_PARTS = ("text", *URL_PARTS, *INLINE_PARTS, GENERIC_PART, "time")
# Part types vLLM knows that modalmesh does not take; named in the error so clients see why.
KNOWN_UNSUPPORTED_PARTS = ("image_embeds", "audio_embeds", "image_pil", "prompt_embeds", "file")
_ACCEPTED = "accepted content parts are " + ", ".join(repr(p) for p in ACCEPTED_PARTS)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _invalid(kind: str, message: str) -> PydanticCustomError:
    """A validation error whose message is shown as is (no context, so no {placeholders})."""
    return PydanticCustomError(kind, message)


# ---------------------------------------------------------------------------------------------
# Request


class ImageURL(_Lenient):
    """`{"url": ..., "detail": ...}` of an image_url part (also video_url, audio_url, event_url)."""

    url: str
    detail: Literal["auto", "low", "high"] | None = None


def _image_url_form(value: Any) -> Any:
    # The "simple" form {"type": "image_url", "image_url": "https://..."} that vLLM accepts.
    return {"url": value} if isinstance(value, str) else value


class SourceTime(_Lenient):
    """`{"seconds": 12.5}` of a time part: a time in the request's video, >= 0."""

    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class InlineMedia(_Lenient):
    """`{"data": <base64>, "format": "wav"}` of an input_audio (or input_event) part."""

    data: str
    format: str


class GenericMedia(_Lenient):
    """`{"modality": <name>, "url": ... | "data": <base64>, "format": ...}` of an input_media part."""

    modality: Annotated[str, Field(min_length=1, max_length=64)]
    url: str | None = None
    data: str | None = None
    format: str | None = None


def format_problem(modality: str, fmt: str | None) -> str | None:
    """What is wrong with the declared format of an inline item of `modality`, or None.

    A modality with `inline_formats` takes one of them (or none: read from the bytes); one
    without takes none. An unregistered modality is left to the preset check.
    """
    record = modalities.MODALITIES.get(modality)
    if fmt is None or record is None or fmt.strip().lower() in record.inline_formats:
        return None
    allowed = record.inline_formats
    expected = f"one of {list(allowed)}" if allowed else f"no format for {modality} (read from the bytes)"
    return f"expected {expected}, got {fmt!r}"


def decode_base64(text: str, where: str, param: str) -> bytes:
    """The bytes of an inline item's base64 `data`.

    Raises:
        InvalidArgumentError: Not base64, or empty; `where` names the field ("...input_audio.data").
    """
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidArgumentError(f"{where}: expected base64, got invalid data ({e})", param=param) from None
    if not data:
        raise InvalidArgumentError(f"{where}: expected base64 of a file, got nothing", param=param)
    return data


_URL = Annotated[ImageURL | None, BeforeValidator(_image_url_form)]


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind!r}"


class ContentPart(_Lenient):
    """One content part: text, a time, a media URL (image/video/audio/event), inline audio/event
    data, or the generic `input_media` of any registered modality. The typed media fields are
    the wire schema; which modality each carries is its registry record's (`URL_PARTS`,
    `INLINE_PARTS`)."""

    type: str  # one of ACCEPTED_PARTS (checked in `_known_type`)
    text: str | None = None
    time: SourceTime | None = None
    image_url: _URL = None
    video_url: _URL = None
    audio_url: _URL = None
    event_url: _URL = None
    input_audio: InlineMedia | None = None
    input_event: InlineMedia | None = None
    input_media: GenericMedia | None = None
    uuid: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_type(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise _invalid(
                "content_part_type",
                "expected a content part object such as {'type': 'text', 'text': '...'}, "
                f"got {type(value).__name__}",
            )
        kind = value.get("type")
        if kind is None:
            raise _invalid("content_part_type", "content part has no 'type'; " + _ACCEPTED)
        if kind not in ACCEPTED_PARTS:
            known = "is not supported by modalmesh" if kind in KNOWN_UNSUPPORTED_PARTS else "is unknown"
            raise _invalid("content_part_type", f"content part type {kind!r} {known}; {_ACCEPTED}")
        return value

    @model_validator(mode="after")
    def _has_payload(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise _invalid("content_part", "a 'text' part needs a 'text' string")
        if self.type == "time" and self.time is None:
            raise _invalid("content_part", "a 'time' part needs 'time': {'seconds': <number >= 0>}")
        if self.type in URL_PARTS and getattr(self, self.type) is None and self.uuid is None:
            raise _invalid(
                "content_part",
                f"{_a(self.type)} part needs {self.type!r}: {{'url': '...'}} or a URL string "
                "(or a 'uuid' of an item sent before)",
            )
        if self.type in INLINE_PARTS:
            inline = getattr(self, self.type)
            modality = INLINE_PARTS[self.type]
            if inline is None and self.uuid is not None:
                return self
            if inline is None:
                raise _invalid(
                    "content_part",
                    f"{_a(self.type)} part needs {self.type!r}: {{'data': <base64>, 'format': ...}}",
                )
            formats = modalities.get(modality).inline_formats
            if inline.format.lower() not in formats:
                raise _invalid(
                    "content_part",
                    f"{self.type}.format: expected one of {list(formats)}, got {inline.format!r}",
                )
        if self.type == GENERIC_PART:
            self._check_generic()
        return self

    def _check_generic(self) -> None:
        media = self.input_media
        if media is None:
            raise _invalid(
                "content_part",
                f"an {GENERIC_PART!r} part needs {GENERIC_PART!r}: {{'modality': <name>, 'url': '...'}} or "
                "{'modality': <name>, 'data': <base64>, 'format': ...}",
            )
        if media.url is not None and media.data is not None:
            raise _invalid("content_part", f"{GENERIC_PART}: expected one of 'url' and 'data', got both")
        if media.url is None and media.data is None and self.uuid is None:
            raise _invalid(
                "content_part",
                f"{GENERIC_PART}: expected 'url' or 'data' (or a 'uuid' of an item sent before), got neither",
            )
        problem = format_problem(media.modality, media.format)
        if problem is not None:
            raise _invalid("content_part", f"{GENERIC_PART}.format: {problem}")

    def time_part(self, param: str) -> TimePart | None:
        """The source time this part carries (a 'time' part), else None."""
        if self.type != "time" or self.time is None:
            return None
        return TimePart(self.time.seconds, param=param)

    def media(self, param: str) -> MediaInput | None:
        """The media item this part carries (None for text and time).

        Raises:
            InvalidArgumentError: Inline data that is not valid base64, or empty.
        """
        if self.type in URL_PARTS:
            link = getattr(self, self.type)
            url = None if link is None else link.url
            return MediaInput(URL_PARTS[self.type], url=url, param=param, uuid=self.uuid)
        if self.type in INLINE_PARTS:
            inline: InlineMedia | None = getattr(self, self.type)
            if inline is None:  # a uuid alone: the features it cached
                return MediaInput(INLINE_PARTS[self.type], param=param, uuid=self.uuid)
            data = decode_base64(inline.data, f"{param}.{self.type}.data", param)
            return MediaInput(
                INLINE_PARTS[self.type], data=data, fmt=inline.format.lower(), param=param, uuid=self.uuid
            )
        if self.type == GENERIC_PART and self.input_media is not None:
            return generic_media(self.input_media, param, self.uuid)
        return None


def generic_media(media: GenericMedia, param: str, uuid: str | None) -> MediaInput:
    """The media item of an input_media part (its modality is checked against the preset later).

    Raises:
        InvalidArgumentError: Inline data that is not valid base64, or empty.
    """
    fmt = (media.format or "").strip().lower() or None  # checked by `format_problem`
    if media.data is not None:
        data = decode_base64(media.data, f"{param}.{GENERIC_PART}.data", param)
        return MediaInput(media.modality, data=data, fmt=fmt, param=param, uuid=uuid)
    return MediaInput(media.modality, url=media.url, param=param, uuid=uuid)


def _content_form(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if value is None:
        return []
    if not isinstance(value, list):
        raise _invalid(
            "content_type", f"expected a string or a list of content parts, got {type(value).__name__}"
        )
    return value


class ChatMessageParam(_Lenient):
    """One message of the request."""

    role: Literal["system", "user", "assistant"]
    content: Annotated[list[ContentPart], BeforeValidator(_content_form)] = Field(default_factory=list)
    name: str | None = None


class StreamOptions(_Lenient):
    """`stream_options`; only include_usage changes what is sent."""

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


def _stop_form(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class DecodeOptions(BaseModel):
    """Decoding parameters of one output modality (`image`, `audio`, `video` of the request)."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    duration_s: float | None = None
    num_frames: int | None = None
    fps: int | None = None


class ChatCompletionRequest(_Lenient):
    """The body of POST /v1/chat/completions (the fields modalmesh uses; others are ignored)."""

    messages: list[ChatMessageParam]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Annotated[list[str] | None, BeforeValidator(_stop_form)] = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's extra field
    stop_token_ids: list[int] | None = None  # vLLM's extra field
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    request_id: str | None = None
    modalities: list[str] | None = None
    # One per output modality of the registry (image, audio, video); see `decoding_options`.
    image: DecodeOptions | None = None
    audio: DecodeOptions | None = None
    video: DecodeOptions | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise _invalid("n_unsupported", f"only n=1 is supported, got {n}")
        return n

    @property
    def include_usage(self) -> bool:
        """Whether a streamed reply ends with the usage-only chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_domain(self, request_id: str) -> ChatRequest:
        """The transport-independent request (max_completion_tokens wins over max_tokens); an
        unset sampling field stays None, for the LLM service to take the preset's value."""
        turns = []
        for i, message in enumerate(self.messages):
            parts: list[Part[MediaInput]] = []
            for j, part in enumerate(message.content):
                param = f"messages[{i}].content[{j}]"
                item = part.media(param)
                time = part.time_part(param)
                if item is not None:
                    parts.append(MediaPart(item))
                elif time is not None:
                    parts.append(time)
                elif part.text is not None:
                    parts.append(TextPart(part.text))
            turns.append(Turn(message.role, tuple(parts)))
        use_completion = self.max_completion_tokens is not None
        return ChatRequest(
            model=self.model,
            turns=turns,
            request_id=request_id,
            max_tokens=self.max_completion_tokens if use_completion else self.max_tokens,
            max_tokens_param="max_completion_tokens" if use_completion else "max_tokens",
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=list(self.stop or []),
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop_token_ids=list(self.stop_token_ids or []),
            modalities=tuple(self.modalities or ()),
            decoding=self.decoding_options(),
        )

    def decoding_options(self) -> dict[str, dict[str, Any]]:
        """Per output modality of the registry that the request sets, its decoding parameters
        (an output modality is a top-level field of its name, as OpenAI's `audio`)."""
        out = {}
        for m in modalities.output_names():
            options = getattr(self, m, None)
            if isinstance(options, DecodeOptions):
                out[m] = options.model_dump(exclude_none=True)
        return out


# Error types whose message already says what came; others get "(got <input>)" appended.
_SELF_EXPLAINING = ("missing", "content_part", "content_part_type", "content_type", "n_unsupported")


def format_loc(loc: tuple[int | str, ...]) -> str:
    """("body", "messages", 0, "content", 1) -> "messages[0].content[1]"."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item != "body" or out:
            out += f".{item}" if out else str(item)
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_error(errors: list[Any]) -> InvalidArgumentError:
    """One 400 error from pydantic/FastAPI validation errors: the field, what was expected, got.

    The message and `param` name the first problem and count the others; malformed JSON is
    reported with the decoder's message and position.
    """
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        pos = loc[-1] if loc and isinstance(loc[-1], int) else None
        where = f" at position {pos}" if pos is not None else ""
        reason = (err.get("ctx") or {}).get("error", "JSON decode error")
        return InvalidArgumentError(f"the request body is not valid JSON: {reason}{where}")
    field = format_loc(loc) or "body"
    message = f"{field}: {err.get('msg', 'invalid value')}"
    if err.get("type") not in _SELF_EXPLAINING:
        message += f" (got {_short(err.get('input'))})"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return InvalidArgumentError(message, param=field)


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body.

    Raises:
        InvalidArgumentError: The body does not match the schema; the message names the field.
    """
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from e


# ---------------------------------------------------------------------------------------------
# Responses


class UsageInfo(BaseModel):
    """Token counts of a reply."""

    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: dict[str, int] | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        """Usage with the total filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class TimestampJSON(BaseModel):
    """The JSON form of a `Timestamp`: one time the model pointed at (see the module docstring)."""

    media_index: int
    frame: int
    seconds: float
    char_offset: int

    @classmethod
    def of(cls, t: Timestamp) -> TimestampJSON:
        """The JSON form of a domain timestamp (seconds rounded to microseconds)."""
        return cls(
            media_index=t.media_index, frame=t.frame, seconds=round(t.seconds, 6), char_offset=t.char_offset
        )


def media_entry(item: MediaOutput) -> dict[str, Any]:
    """The JSON form of one generated item (see the module docstring)."""
    entry: dict[str, Any] = {"modality": item.modality, "index": item.index, "char_offset": item.char_offset}
    if item.error is not None or item.data is None:
        error = ModalmeshError(item.error or "no data")
        code = item.error_code or 500
        kind = {400: "BadRequestError", 503: "ServiceUnavailableError", 504: "TimeoutError"}.get(
            code, error.error_type
        )
        return {"type": "error", **entry, "error": {"message": error.message, "type": kind, "code": code}}
    b64 = base64.b64encode(item.data).decode("ascii")
    record = modalities.MODALITIES.get(item.modality)
    fmt = item.mime_type.rsplit("/", 1)[-1].removeprefix("x-")
    if record is not None and record.inline_part and fmt in record.inline_formats:  # input_audio
        kind, payload = record.inline_part, {"data": b64, "format": fmt}
    elif record is not None and record.url_part:  # image_url, video_url
        kind, payload = record.url_part, {"url": f"data:{item.mime_type};base64,{b64}"}
    else:
        kind, payload = GENERIC_PART, {"modality": item.modality, "data": b64, "format": fmt}
    return {"type": kind, kind: payload, **entry, "seed": item.seed}


def timestamp_list(timestamps: tuple[Timestamp, ...] | list[Timestamp]) -> list[TimestampJSON]:
    """The JSON forms of domain timestamps, in order."""
    return [TimestampJSON.of(t) for t in timestamps]


class AssistantMessage(BaseModel):
    """The reply message of a non-streamed response (`timestamps`: modalmesh's extra field)."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    annotations: Any | None = None
    audio: Any | None = None
    function_call: Any | None = None
    reasoning: str | None = None
    timestamps: list[TimestampJSON] | None = None
    media: list[dict[str, Any]] | None = None


class ChatCompletionChoice(BaseModel):
    """One choice of a non-streamed response."""

    index: int = 0
    message: AssistantMessage
    logprobs: Any | None = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    """`chat.completion`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: UsageInfo
    prompt_logprobs: Any | None = None
    prompt_token_ids: list[int] | None = None
    kv_transfer_params: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON body: every field, except a message's `timestamps` where it is None."""
        body = self.model_dump()
        for choice in body["choices"]:
            for extra in ("timestamps", "media"):
                if choice["message"].get(extra) is None:
                    choice["message"].pop(extra, None)
        return body


class DeltaMessage(BaseModel):
    """The `delta` of a streamed chunk; only the fields that were set are sent."""

    role: str | None = None
    content: str | None = None
    timestamps: list[TimestampJSON] | None = None
    media: list[dict[str, Any]] | None = None


class ChatCompletionStreamChoice(BaseModel):
    """One choice of a streamed chunk."""

    index: int = 0
    delta: DeltaMessage
    logprobs: Any | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionStreamResponse(BaseModel):
    """`chat.completion.chunk`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


def role_chunk(completion_id: str, created: int, model: str) -> dict[str, Any]:
    """The first chunk: delta {"role": "assistant", "content": ""}."""
    choice = ChatCompletionStreamChoice(
        index=0,
        delta=DeltaMessage(role="assistant", content=""),
        logprobs=None,
        finish_reason=None,
    )
    chunk = ChatCompletionStreamResponse(
        id=completion_id, object="chat.completion.chunk", created=created, model=model, choices=[choice]
    )
    return chunk.model_dump(exclude_unset=True)


def content_chunk(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None = None,
    stop_reason: str | int | None = None,
    system_fingerprint: str | None = None,
    timestamps: tuple[Timestamp, ...] = (),
) -> dict[str, Any]:
    """A text chunk; with `finish_reason` it is the last chunk of the choice (and names the
    adapter version that served the reply in `system_fingerprint`). `timestamps` written in
    `text` go into `delta.timestamps` (left out when there are none)."""
    delta = DeltaMessage(content=text)
    if timestamps:
        delta.timestamps = timestamp_list(timestamps)
    fields: dict[str, Any] = {
        "index": 0,
        "delta": delta,
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    if finish_reason is not None:
        fields["stop_reason"] = stop_reason
    fields["token_ids"] = None
    chunk = ChatCompletionStreamResponse(
        id=completion_id,
        object="chat.completion.chunk",
        created=created,
        model=model,
        choices=[ChatCompletionStreamChoice(**fields)],
    )
    if system_fingerprint is not None:
        chunk.system_fingerprint = system_fingerprint
    return chunk.model_dump(exclude_unset=True)


def media_chunk(completion_id: str, created: int, model: str, item: MediaOutput) -> dict[str, Any]:
    """A chunk carrying one generated item in `delta.media` (no text)."""
    choice = ChatCompletionStreamChoice(
        index=0, delta=DeltaMessage(media=[media_entry(item)]), finish_reason=None
    )
    chunk = ChatCompletionStreamResponse(id=completion_id, created=created, model=model, choices=[choice])
    return chunk.model_dump(exclude_unset=True)


def usage_chunk(completion_id: str, created: int, model: str, usage: UsageInfo) -> dict[str, Any]:
    """The usage-only final chunk (choices: []), serialized with exclude_none."""
    chunk = ChatCompletionStreamResponse(
        id=completion_id, created=created, model=model, choices=[], usage=usage
    )
    return chunk.model_dump(exclude_none=True)


class ModelCard(BaseModel):
    """One entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "modalmesh"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[dict[str, Any]] = Field(default_factory=list)
    sampling_defaults: dict[str, Any] | None = None  # modalmesh's: the preset's generation defaults

    @classmethod
    def of(cls, entry: ModelEntry) -> ModelCard:
        """The card of a served model entry."""
        return cls(
            id=entry.id,
            created=entry.created,
            root=entry.root,
            parent=entry.parent,
            max_model_len=entry.max_model_len,
            sampling_defaults=entry.sampling_defaults,
        )


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]

    def to_json(self) -> dict[str, Any]:
        """The JSON body: every field, a card's `sampling_defaults` only where it is known."""
        body = self.model_dump()
        for card in body["data"]:
            if card["sampling_defaults"] is None:
                del card["sampling_defaults"]
        return body
