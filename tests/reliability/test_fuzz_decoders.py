"""Fuzzing every media decoder of the encoder service, with the preprocessing that follows it:
random bytes, truncated files and bit-flipped or overwritten valid files (made by
tests/helpers/media.py). Each call must return a result or raise the module's documented
`InvalidArgumentError` (`PayloadTooLargeError` is one) within a few seconds: never another
exception type, never a hang, never a crash or a memory blow-up: the decoders run in a spawned
child process with an address-space limit (decoder_worker.py), which is replaced when it dies.

    image  preprocess.decode_image -> ClipImagePreprocessor (32 px)
    video  video.decode_video (VideoChat num_frames=4, E.T. Chat fps=1 max_frames=8, ImageBind clips)
    audio  audio.decode_audio (with and without a declared format) -> imagebind_audio
    event  events.parse_events -> event_frames

hypothesis runs a fixed number of examples per decoder, derandomized, so CI is reproducible.
Inputs that once broke a decoder are kept as @example cases.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import multiprocessing
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers.media import (
    encode_image,
    jpeg_bytes,
    make_audio,
    make_events,
    make_video,
    png_bytes,
    random_image,
)
from tests.reliability import decoder_worker

pytestmark = pytest.mark.reliability

CALL_TIMEOUT_S = 20.0
MAX_RSS_KIB = 2 * 2**20  # the worker's peak RSS; the valid inputs need ~0.4 GiB
# Per decoder, how its inputs ended: "ok" or the error's type (printed by the last test).
RUNS: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


class Worker:
    """One spawned child that runs the decoders (tests/reliability/decoder_worker.py), replaced
    after a crash or a hang."""

    def __init__(self) -> None:
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    def submit(self, name: str, data: bytes, arg: object) -> concurrent.futures.Future[tuple[str, str, int]]:
        if self.pool is None:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=decoder_worker.limit_memory,
            )
        return self.pool.submit(decoder_worker.run, name, data, arg)

    def kill(self) -> None:
        if self.pool is not None:
            for proc in list(getattr(self.pool, "_processes", {}).values()):
                proc.kill()
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = None


WORKER = Worker()


@pytest.fixture(scope="module", autouse=True)
def _worker() -> Iterator[None]:
    yield
    WORKER.kill()


def check(name: str, data: bytes, arg: object = None) -> None:
    """The decoder returns, or raises InvalidArgumentError, within CALL_TIMEOUT_S, without
    crashing its process or growing it past MAX_RSS_KIB."""
    what = f"{name} decoder on {len(data)} bytes {data[:48].hex()}... (arg {arg!r})"
    try:
        outcome, trace, peak = WORKER.submit(name, data, arg).result(timeout=CALL_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        WORKER.kill()
        pytest.fail(f"{what}: no answer after {CALL_TIMEOUT_S}s")
    except concurrent.futures.process.BrokenProcessPool:
        WORKER.kill()
        pytest.fail(f"{what}: the process died (a crash, or killed for memory)")
    RUNS[name][outcome] += 1
    assert not outcome.startswith("UNTYPED"), f"{what}: {trace}"
    if peak > MAX_RSS_KIB:
        WORKER.kill()
        pytest.fail(f"{what}: the decoding process grew to {peak / 2**20:.1f} GiB")


def fuzz_settings(n: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=n,
        deadline=None,  # each call has its own timeout (check)
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def damaged(valid: list[bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes, a valid file's prefix plus random bytes, truncations, bit flips and overwrites."""

    @st.composite
    def flips(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(valid)))
        for _ in range(draw(st.integers(1, 16))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)

    @st.composite
    def overwrite(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(valid)))
        pos = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=64))
        data[pos : pos + len(patch)] = patch
        return bytes(data)

    @st.composite
    def truncated(draw: st.DrawFn) -> bytes:
        data = draw(st.sampled_from(valid))
        return data[: draw(st.integers(0, len(data) - 1))]

    @st.composite
    def header_then_noise(draw: st.DrawFn) -> bytes:
        data = draw(st.sampled_from(valid))
        keep = draw(st.integers(1, min(len(data), 256)))
        return data[:keep] + draw(st.binary(max_size=2048))

    return st.one_of(st.binary(max_size=4096), truncated(), flips(), overwrite(), header_then_noise())


# ---- image --------------------------------------------------------------------------------------

IMAGES = [
    png_bytes(40, 30, seed=1),
    jpeg_bytes(24, 20, seed=2),
    encode_image(random_image(16, 12, mode="RGBA", seed=3), "WEBP"),
    encode_image(random_image(16, 12, mode="P", seed=4), "GIF"),
    encode_image(random_image(12, 10, seed=5), "BMP"),
    encode_image(random_image(12, 10, mode="L", seed=6), "TIFF"),
]


@fuzz_settings(3000)
@given(damaged(IMAGES))
def test_image_decoder(data: bytes) -> None:
    check("image", data)


# ---- video --------------------------------------------------------------------------------------

VIDEOS = [
    make_video(6, 4, (32, 24), "mp4"),
    make_video(6, 4, (32, 24), "mp4", faststart=True),
    make_video(6, 4, (32, 24), "webm"),
    make_video(6, 4, (32, 24), "avi"),
]
SAMPLINGS = [  # VideoChat, E.T. Chat, ImageBind (FrameSampling fields)
    {"num_frames": 4},
    {"fps": 1.0, "max_frames": 8},
    {"clips": 5, "clip_seconds": 2.0, "frames_per_clip": 2},
]


def _stts_overrun() -> bytes:
    """Found by this fuzzer: an mp4 whose time-to-sample table claims 5 entries but holds 1, so the
    next box is read as entries and the header declares 1.7e9 frames; decord's frame index then
    threw std::bad_alloc, which aborted the process (an encoder service crash from 1.6 kB)."""
    data = bytearray(VIDEOS[0])
    stts = data.index(b"stts")
    data[stts + 8 : stts + 12] = (5).to_bytes(4, "big")
    return bytes(data)


@fuzz_settings(1500)
@given(damaged(VIDEOS), st.sampled_from(range(len(SAMPLINGS))))
@example(_stts_overrun(), 0)
def test_video_decoder(data: bytes, which: int) -> None:
    check("video", data, SAMPLINGS[which])


# ---- audio --------------------------------------------------------------------------------------

AUDIOS = [
    make_audio(0.3, 16000, "wav"),
    make_audio(0.3, 8000, "flac", channels=2),
    make_audio(0.5, 22050, "ogg"),
    make_audio(0.5, 16000, "mp3"),
]


@fuzz_settings(2000)
@given(damaged(AUDIOS), st.sampled_from([None, "wav", "mp3", "flac", "ogg", "WAV", "aiff", ""]))
def test_audio_decoder(data: bytes, hint: str | None) -> None:
    check("audio", data, hint)


# ---- events -------------------------------------------------------------------------------------

EVENTS = [
    make_events(40, 16, 12, form=form, seed=i)
    for i, form in enumerate(("pickle_dict", "structured", "array", "npz"))
]


def _encrypted_npz() -> bytes:
    """Found by this fuzzer: an .npz whose first member says it is encrypted (flag bit 0 of its
    central directory entry) made zipfile raise RuntimeError ("password required")."""
    data = bytearray(EVENTS[3])
    central = data.index(b"PK\x01\x02")
    data[central + 8] |= 0x01
    return bytes(data)


def _zip_version_64() -> bytes:
    """Found by this fuzzer: a central directory entry asking for zip version 6.4 made zipfile
    raise NotImplementedError while opening the archive."""
    end = b"PK\x05\x06" + b"\x00" * 8 + b"\xcc\x00\x00\x00" + b"\x00" * 6
    return b"PK\x03\x04PK\x01\x02\x00\x00@" + b"\x00" * 197 + end


@fuzz_settings(3000)
@given(damaged(EVENTS))
@example(_encrypted_npz())
@example(_zip_version_64())
def test_event_parser(data: bytes) -> None:
    check("event", data)


def test_report_examples_run() -> None:
    """Not a check: prints how many inputs each decoder took (`pytest -s`)."""
    print("\nfuzzed inputs per decoder:")
    for name, outcomes in RUNS.items():
        print(f"  {name:<6} {sum(outcomes.values()):>5}  {dict(outcomes)}")
