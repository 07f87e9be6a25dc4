"""The conversation and its media as every service sees it, each concept defined once.

- `ROLES`, `Turn` and its parts (`TextPart`, `MediaPart`, `TimePart`): the message form from
  the gateway's front ends to the engine's prompt builder and the trainer's samples.
- Media, in its two states:
  - `MediaInput`: what a client sent for one media item (URL, inline bytes or a uuid), before
    anything is fetched or decoded (the gateway; `modalmesh.v1.MediaInput` on the Chat API).
  - `MediaFeatures`: what an encoder made of one item (features and frame times), before the
    connector (the encoder's result, the gateway's feature cache, the LLM's input).
- `Timestamp`: a time the model pointed at.

A `MediaPart` carries its item itself, not an index into a side list: the gateway's request
holds `MediaPart[MediaInput]`s, encodes each into a `MediaPart[MediaFeatures]`, and the LLM
service receives the parts in that shape (`modalmesh.v1.TurnPart.media`). Where a flat list of
the items is needed (the model scatters features span by span; `Timestamp.media_index`
numbers them), `media_parts` gives them in the order they appear, and that order is the one
numbering of a request's items.

Torch-free (tensors are typed only), so the gateway, the LLM service, the trainer and the model
library share these definitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

ROLES = ("system", "user", "assistant")


class Media(Protocol):
    """Anything a media part may carry: it names its modality."""

    @property
    def modality(self) -> str: ...


M = TypeVar("M", bound=Media, covariant=True)
A = TypeVar("A", bound="np.ndarray | torch.Tensor", covariant=True)


@dataclass(frozen=True)
class MediaInput:
    """One media item as a client sent it: a URL (http(s) or data:), the file's bytes, or a uuid.

    Attributes:
        modality: "image", "video", "audio" or "event".
        url: Where to get the bytes, when they did not come inline.
        data: The encoded file (PNG, MP4, WAV, NPY...), when it came inline.
        param: Where the part sits in the request, e.g. "messages[0].content[1]", for errors.
        fmt: The format the client declared for inline data (input_audio's "wav", ...).
        uuid: A client-chosen id of the item (vLLM's `uuid` on a content part): its features
            are cached under it instead of the content's hash, and a part with a uuid and no
            media reuses what that uuid cached.
    """

    modality: str
    url: str | None = None
    data: bytes | None = None
    param: str = ""
    fmt: str | None = None
    uuid: str | None = None


@dataclass(frozen=True, eq=False)
class MediaFeatures(Generic[A]):
    """What an encoder made of one media item, before the connector.

    One class on both sides of the LLM service's wire; the type parameter says which array
    library holds the features. The encoders and the gateway hold numpy arrays
    (`MediaFeatures[np.ndarray]`: the gateway image has no torch); the LLM service turns the
    wire form straight into torch tensors (`MediaFeatures[torch.Tensor]`, in its servicer), so
    the model library only ever sees torch. Converting at that one edge, rather than holding
    either and converting where used, keeps every consumer's array type known to mypy.

    Attributes:
        modality: "image", "video", "audio" or "event".
        features: (frames * tokens_per_frame, dim), frame-major (frame 0's tokens first; within
            a frame, tap 0's tokens first); float32 from the encoders.
        times: Seconds of each frame in the source, one per frame (an image, and an ImageBind
            item, is one frame at 0.0; an event frame starts at its chunk's first event), or ()
            when unknown (the LLM then counts frames from the features).
    """

    modality: str
    features: A = field(repr=False)
    times: tuple[float, ...] = ()


@dataclass(frozen=True)
class TextPart:
    """Literal text inside a turn."""

    text: str


@dataclass(frozen=True)
class MediaPart(Generic[M]):
    """A media item inside a turn, carried by the part itself.

    What it carries depends on how far the request has come: the client's `MediaInput` in the
    gateway, the encoder's `MediaFeatures` from the gateway's LLM request on, a training
    sample's media file in the trainer.
    """

    media: M


@dataclass(frozen=True)
class TimePart:
    """A time in the source media, in seconds (E.T. Bench's `<vid>` in a question).

    It renders as the preset's time token, whose input embedding gets the LLM embedding of
    the frame at that time added (`services.models.lm.timestamps.add_source_frames`).

    Attributes:
        seconds: The time, >= 0.
        param: Where the part sits in the client's request, for the gateway's errors.
    """

    seconds: float
    param: str = field(default="", compare=False)


Part = TextPart | MediaPart[M] | TimePart


@dataclass(frozen=True)
class Turn(Generic[M]):
    """One message of the conversation: a role and its parts in order."""

    role: str
    parts: Sequence[Part[M]]


def media_parts(turns: Sequence[Turn[M]]) -> list[MediaPart[M]]:
    """Every media part of a conversation in the order it appears; an item's position in this
    list is its index (`Timestamp.media_index`, a prompt's media spans)."""
    return [p for turn in turns for p in turn.parts if isinstance(p, MediaPart)]


@dataclass(frozen=True)
class Timestamp:
    """A time the model referred to (E.T. Chat's `<vid>`), matched to a frame of a media item.

    Attributes:
        media_index: The item: its position among the request's media parts (`media_parts`).
        frame: The frame within that item.
        seconds: The frame's time in the source.
        char_offset: Where the time was written in the whole reply's text.
    """

    media_index: int
    frame: int
    seconds: float
    char_offset: int
