"""The conversation and its media as every service sees it: roles, turns and their parts, the
features an encoder returns for one media item, and a time the model pointed at.

Torch-free (tensors are typed only), so the gateway, the LLM service, the trainer and the model
library share these definitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TextPart:
    """Literal text inside a turn."""

    text: str


@dataclass(frozen=True)
class MediaPart:
    """A reference, by index, to one item of `GenerationRequest.media`."""

    index: int


@dataclass(frozen=True)
class TimePart:
    """A time in the source media, in seconds (E.T. Bench's `<vid>` in a question).

    It renders as the preset's time token, whose input embedding gets the LLM embedding of
    the frame at that time added (`services.models.lm.timestamps.add_source_frames`).
    """

    seconds: float


Part = TextPart | MediaPart | TimePart


@dataclass(frozen=True)
class Turn:
    """One message of the conversation: a role and its parts in order."""

    role: str
    parts: Sequence[Part]


@dataclass(frozen=True)
class MediaItem:
    """Encoder output for one media item, before the connector.

    Attributes:
        modality: "image", "video", "audio" or "event".
        features: (frames * tokens_per_frame, dim), frame-major, as the encoder returned it.
        times: Seconds of each frame in the source (one per frame), or () when unknown.
    """

    modality: str
    features: torch.Tensor = field(repr=False)  # (frames * tokens_per_frame, dim)
    times: tuple[float, ...] = ()


@dataclass(frozen=True)
class Timestamp:
    """A time the model referred to (E.T. Chat's `<vid>`), matched to a frame of a media item.

    Attributes:
        media_index: The item, an index into `GenerationRequest.media`.
        frame: The frame within that item.
        seconds: The frame's time in the source.
        char_offset: Where the time was written in the whole reply's text.
    """

    media_index: int
    frame: int
    seconds: float
    char_offset: int


@dataclass(frozen=True, eq=False)
class EncodedItem:
    """One encoded media item.

    Attributes:
        features: float32 C-contiguous (frames * tokens_per_frame, dim), frame-major (frame 0's
            tokens first; within a frame, tap 0's tokens first).
        times: float32 (frames,): each frame's time in seconds in the source (an image, and an
            ImageBind item, is one frame at 0.0; an event frame starts at its chunk's first event).
    """

    features: np.ndarray
    times: np.ndarray

    @property
    def frames(self) -> int:
        """Number of frames the features cover."""
        return len(self.times)
