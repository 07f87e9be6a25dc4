"""The decoders under fuzzing, run in a child process (see test_fuzz_decoders.py).

A decoder that crashes the process (a segfault in a native library), allocates without bound
or never returns would take the test runner with it; in a child with an address-space limit it
only breaks the pool, and the parent reports the input. `run` returns how a call ended instead
of raising, so nothing but plain values crosses the process boundary.
"""

from __future__ import annotations

import resource
import traceback
from collections.abc import Callable

from services.common.errors import InvalidArgumentError

ADDRESS_SPACE_LIMIT = 8 * 2**30  # torch and the codecs map ~2-3 GiB; a bomb fails above this

_CLIP: Callable[..., object] | None = None


def limit_memory() -> None:
    """Pool initializer: cap the worker's address space."""
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def _image(data: bytes, _: object) -> object:
    global _CLIP
    from services.models.media.image import decode_image
    from services.models.media.prepare import clip_preprocessor

    if _CLIP is None:
        _CLIP = clip_preprocessor(32).preprocess_one
    return _CLIP(decode_image(data, max_pixels=64 * 1024 * 1024))


def _video(data: bytes, sampling: object) -> object:
    from services.models.media.video import FrameSampling, VideoLimits, decode_video

    assert isinstance(sampling, dict)
    return decode_video(data, sampling=FrameSampling(**sampling), limits=VideoLimits())


def _audio(data: bytes, hint: object) -> object:
    from services.models.media.audio import AudioLimits, decode_audio, imagebind_audio

    assert hint is None or isinstance(hint, str)
    wave = decode_audio(data, fmt_hint=hint, limits=AudioLimits(), mix="first")
    return imagebind_audio(wave.samples, wave.sample_rate, clip_seconds=2.0, num_clips=3)


def _event(data: bytes, _: object) -> object:
    from services.models.media.events import EventLimits, event_frames, parse_events

    return event_frames(parse_events(data, limits=EventLimits()), num_frames=5)


DECODERS: dict[str, Callable[[bytes, object], object]] = {
    "image": _image,
    "video": _video,
    "audio": _audio,
    "event": _event,
}


def run(name: str, data: bytes, arg: object = None) -> tuple[str, str, int]:
    """(outcome, traceback if untyped, peak RSS of the worker in KiB) of one decoder call.

    outcome: "ok", the name of an InvalidArgumentError (sub)class, or "UNTYPED <type>".
    """
    try:
        DECODERS[name](data, arg)
        outcome, trace = "ok", ""
    except InvalidArgumentError as e:
        outcome, trace = type(e).__name__, ""
    except BaseException as e:
        outcome, trace = f"UNTYPED {type(e).__name__}", traceback.format_exc()
    return outcome, trace, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
