"""Video decoding and frame sampling: the seed codes' index rules, every kind of bad input, limits,
and no leaks or crashes from decord."""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av  # before decord (imported by services.models.media.video): see tests/helpers/media.py
import decord
import numpy as np
import pytest
import torch

from services.common.errors import InvalidArgumentError, PayloadTooLargeError
from services.models.media.video import (
    DecodedVideo,
    FrameSampling,
    VideoLimits,
    decode_video,
    uniform_indices,
)
from tests.helpers.media import (
    encode_image,
    jpeg_bytes,
    make_video,
    png_bytes,
    random_image,
    read_frame_index,
)

LIMITS = VideoLimits()
EIGHT = FrameSampling(num_frames=8)
FORMATS = ["mp4", "webm", "avi"]


def _decode(data: bytes, sampling: FrameSampling = EIGHT, limits: VideoLimits = LIMITS, **kw) -> DecodedVideo:
    return decode_video(data, sampling=sampling, limits=limits, **kw)


def _shown(video: DecodedVideo) -> list[int]:
    """The frame index drawn into each decoded frame."""
    return [read_frame_index(frame) for frame in video.frames]


# --- the seed code, written out as it is, to compare with ---------------------------------


def _videochat_get_index(num_frames: int, num_segments: int) -> np.ndarray:
    """Ask-Anything video_chat/conversation.py Chat.get_index."""
    seg_size = float(num_frames - 1) / num_segments
    start = int(seg_size / 2)
    offsets = np.array([start + int(np.round(seg_size * idx)) for idx in range(num_segments)])
    return offsets


def _etchat_frame_idx(vlen: int, avg_fps: float, fps: float = 1) -> list[int]:
    """ETBench etchat/utils/io.py _load_video."""
    return np.arange(0, vlen, avg_fps / fps).round().astype("int").clip(0, vlen - 1).tolist()


def _imagebind_frame_idx(
    vlen: int, fps: float, clips: int, seconds: float, per_clip: int, new: bool
) -> list[int]:
    """ImageBind data.py: ConstantClipsPerVideoSampler (pytorchvideo 0.1.5, or git when `new`),
    EncodedVideoDecord.get_clip and UniformTemporalSubsample, as frame indices."""
    duration = float(vlen) / float(fps)
    clip_duration = Fraction(seconds)
    max_possible_clip_start = Fraction(max(duration - clip_duration, 0))
    uniform_clip = Fraction(max_possible_clip_start, max(clips - 1, 1) if new else clips)
    out: list[int] = []
    index, is_last_clip = 0, False
    while not is_last_clip:
        clip_start_sec = uniform_clip * index
        index += 1
        is_last_clip = index >= clips or uniform_clip * index > max_possible_clip_start
        start_idx = math.ceil(fps * clip_start_sec)
        end_idx = min(math.ceil(fps * (clip_start_sec + clip_duration)), vlen)
        frame_idxs = list(range(start_idx, end_idx))
        t = len(frame_idxs)
        sub = torch.clamp(torch.linspace(0, t - 1, per_clip), 0, t - 1).long()
        out += [frame_idxs[i] for i in sub.tolist()]
    return out


# --- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_decodes_every_frame_in_order(fmt: str) -> None:
    video = _decode(make_video(24, 12, size=(64, 48), fmt=fmt), FrameSampling(fps=12.0))
    assert video.frames.dtype == np.uint8 and video.frames.flags.c_contiguous
    assert video.frames.shape == (24, 48, 64, 3)
    assert video.indices.tolist() == list(range(24)) == _shown(video)
    assert (video.fps, video.num_frames, video.duration) == (12.0, 24, 2.0)
    np.testing.assert_allclose(video.timestamps, np.arange(24) / 12.0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_videochat_eight_frames(fmt: str) -> None:
    video = _decode(make_video(30, 10, fmt=fmt))
    want = _videochat_get_index(30, 8).tolist()
    assert video.indices.tolist() == want == [1, 5, 8, 12, 15, 19, 23, 26]
    assert _shown(video) == want
    # "The video contains 8 frames sampled at 0.1, 0.5, ... seconds." (rounded to 0.1 s)
    assert [round(float(t), 1) for t in video.timestamps] == [round(i / 10, 1) for i in want]


@pytest.mark.parametrize("num_frames", [1, 2, 3, 7, 8, 9, 16, 100, 301, 1234])
@pytest.mark.parametrize("segments", [1, 4, 8, 16, 64])
def test_uniform_indices_match_videochat_get_index(num_frames: int, segments: int) -> None:
    want = _videochat_get_index(num_frames, segments)
    assert uniform_indices(num_frames, segments).tolist() == want.tolist()
    assert FrameSampling(num_frames=segments).indices(num_frames, 25.0).tolist() == want.tolist()


def test_short_video_repeats_frames_as_videochat() -> None:
    video = _decode(make_video(3, 10))
    assert video.indices.tolist() == [0, 0, 0, 1, 1, 1, 2, 2] == _shown(video)


@pytest.mark.parametrize("avg_fps", [1.0, 3.0, 10.0, 24.0, 25.0, 29.97, 30.0, 59.94])
@pytest.mark.parametrize("vlen", [1, 2, 29, 30, 31, 299, 1001])
def test_fps_indices_match_etchat(vlen: int, avg_fps: float) -> None:
    for fps in (1.0, 0.5, 2.0):
        want = _etchat_frame_idx(vlen, avg_fps, fps)
        assert FrameSampling(fps=fps).indices(vlen, avg_fps).tolist() == want


def test_etchat_one_frame_per_second() -> None:
    video = _decode(make_video(95, 10), FrameSampling(fps=1.0))
    assert video.indices.tolist() == list(range(0, 95, 10)) == _shown(video)
    assert video.timestamps.tolist() == [float(s) for s in range(10)]  # E.T. Chat's tags


def test_over_the_frame_cap_is_refused_by_name() -> None:
    """E.T. Chat keeps 1 fps whatever the length; above `max_frames` the request is refused
    (naming the limit), before any frame is decoded, instead of being resampled."""
    sampling = FrameSampling(fps=1.0, max_frames=4)
    with pytest.raises(
        InvalidArgumentError,
        match=r"video too long for this model: expected at most max_frames = 4 frames at 1 fps "
        r"\(about 4 s\), got 10 frames from 9\.500 s",
    ):
        _decode(make_video(95, 10), sampling)
    # At the cap and under it the seed's rule holds unchanged.
    assert FrameSampling(fps=1.0, max_frames=10).indices(95, 10.0).tolist() == list(range(0, 95, 10))
    video = _decode(make_video(35, 10), sampling)
    assert video.indices.tolist() == [0, 10, 20, 30] == _shown(video)


@pytest.mark.parametrize("new", [False, True], ids=["pytorchvideo-0.1.5", "pytorchvideo-git"])
@pytest.mark.parametrize(
    ("vlen", "fps"), [(20, 10.0), (95, 10.0), (300, 30.0), (301, 29.97), (250, 25.0), (61, 30.0), (10, 10.0)]
)
@pytest.mark.parametrize(("clips", "per_clip"), [(5, 2), (3, 2), (1, 2), (5, 3), (4, 8)])
def test_clip_indices_match_imagebind(vlen: int, fps: float, clips: int, per_clip: int, new: bool) -> None:
    sampling = FrameSampling(clips=clips, clip_seconds=2.0, frames_per_clip=per_clip, last_clip_at_end=new)
    want = _imagebind_frame_idx(vlen, fps, clips, 2.0, per_clip, new)
    assert sampling.indices(vlen, fps).tolist() == want


def test_imagebind_video_clips_decode() -> None:
    video = _decode(make_video(95, 10), FrameSampling(clips=5))  # 5 clips x 2 frames (SEEDS_SPEC 2.A)
    assert video.frames.shape == (10, 48, 64, 3)
    assert video.indices.tolist() == [0, 19, 15, 34, 30, 49, 45, 64, 60, 79] == _shown(video)
    assert video.frames.reshape(5, 2, 48, 64, 3).shape[:2] == (5, 2)


def test_clip_shorter_than_a_frame_is_clamped() -> None:
    # 0.25 fps: a 2 s clip holds no frame; pytorchvideo would fail, we take the nearest frame.
    assert FrameSampling(clips=2).indices(3, 0.25).tolist() == [0, 0, 2, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "expected exactly one of num_frames, fps or clips, got none"),
        ({"num_frames": 8, "fps": 1.0}, r"got \['num_frames', 'fps'\]"),
        ({"num_frames": 0}, "num_frames: expected an int >= 1, got 0"),
        ({"fps": 0.0}, "fps: expected a number > 0, got 0.0"),
        ({"fps": float("nan")}, "fps: expected a number > 0"),
        ({"fps": 1.0, "max_frames": 0}, "max_frames: expected an int >= 1, got 0"),
        ({"num_frames": 8, "max_frames": 4}, "max_frames: expected only with fps"),
        ({"clips": 5, "frames_per_clip": 0}, "frames_per_clip >= 1"),
        ({"clips": 5, "clip_seconds": 0}, "clip_seconds > 0"),
    ],
)
def test_bad_sampling_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        FrameSampling(**kwargs)


def test_frames_come_back_as_numpy_whatever_decords_bridge() -> None:
    data = make_video(10, 10)
    with decord.bridge.use_torch():
        video = _decode(data)
    assert isinstance(video.frames, np.ndarray) and _shown(video) == video.indices.tolist()


def test_small_clip_decodes_fast() -> None:
    data = make_video(100, 25, size=(320, 240))
    _decode(data)  # warm up
    start = time.perf_counter()
    for _ in range(5):
        video = _decode(data)
    per_call = (time.perf_counter() - start) / 5
    assert _shown(video) == video.indices.tolist()
    assert per_call < 0.25, f"{per_call * 1000:.1f} ms per decode"


def test_concurrent_decodes_are_independent() -> None:
    videos = {n: make_video(n, 10, fmt=FORMATS[n % 3]) for n in range(20, 36)}
    with ThreadPoolExecutor(8) as pool:
        results = dict(zip(videos, pool.map(_decode, videos.values()), strict=True))
    for n, video in results.items():
        assert video.num_frames == n and _shown(video) == _videochat_get_index(n, 8).tolist()


def _open_fds_and_threads() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("num_threads", [1, 0])
def test_no_file_descriptor_or_thread_leak(num_threads: int, tmp_path: Path) -> None:
    good = [make_video(30, 10, fmt=fmt) for fmt in FORMATS]
    cut = good[0][: len(good[0]) // 2]
    for data in good:
        _decode(data, num_threads=num_threads)
    before = _open_fds_and_threads()
    for i in range(50):
        _decode(good[i % 3], num_threads=num_threads, tmp_dir=tmp_path)
        with pytest.raises(InvalidArgumentError):
            _decode(cut if i % 2 else png_bytes(), num_threads=num_threads, tmp_dir=tmp_path)
    assert _open_fds_and_threads() == before
    assert list(tmp_path.iterdir()) == []  # temporary files removed, on success and on failure


# --- bad input ---------------------------------------------------------------------------------


def test_empty_input() -> None:
    with pytest.raises(InvalidArgumentError, match=r"empty video: expected a video \(mp4, .*\), got 0 bytes"):
        _decode(b"")


@pytest.mark.parametrize(
    ("data", "read_as"),
    [
        (png_bytes(), " (read as png_pipe)"),
        (jpeg_bytes(), " (read as jpeg_pipe)"),
        (encode_image(random_image(20, 20), "GIF"), " (read as gif)"),
        (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), ""),
        (b"hello, this is text" * 10, ""),
    ],
    ids=["png", "jpeg", "gif", "random", "text"],
)
def test_not_a_video(data: bytes, read_as: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        _decode(data)
    message = info.value.message
    assert message.startswith("not a video: expected a video (mp4, mov, webm, mkv or avi), got ")
    assert message.endswith(f"got {len(data)} bytes starting with {data[:16].hex(' ')}{read_as}")


def test_zero_frame_video() -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"empty video: expected at least one frame, got 0 frames \(AVI\)"
    ):
        _decode(make_video(0, 10, fmt="avi"))


def test_mp4_without_video_stream() -> None:
    with pytest.raises(
        InvalidArgumentError, match="no video stream: expected MP4/MOV with a video stream, got streams: none"
    ):
        _decode(make_video(0, 10, fmt="mp4"))


def test_audio_only_mp4() -> None:
    import io

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for _ in range(20):
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(
        InvalidArgumentError,
        match="no video stream: expected MP4/MOV with a video stream, got streams: audio",
    ):
        _decode(buf.getvalue())


@pytest.mark.parametrize("faststart", [False, True], ids=["index-last", "index-first"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_mp4_is_refused(faststart: bool, keep: float) -> None:
    data = make_video(100, 10, size=(160, 120), faststart=faststart)
    cut = data[: int(len(data) * keep)]
    with pytest.raises(
        InvalidArgumentError,
        match=rf"corrupt or truncated video: expected a complete MP4/MOV file, got {len(cut)} bytes that fail to decode: ",
    ) as info:
        _decode(cut)
    assert "/" not in info.value.message.split("fail to decode: ")[1]  # no temporary path, no source file


def _check_leading_frames(video: DecodedVideo, total: int) -> None:
    n = video.num_frames
    assert 10 < n < total
    assert video.duration == n / 10 and video.indices.tolist() == list(range(n))
    shown = _shown(video)
    assert shown[:-1] == list(range(n - 1))  # the last frame may be half there (codec concealment)
    assert shown[-1] in (n - 2, n - 1)


def test_truncated_webm_gives_the_frames_that_are_there() -> None:
    data = make_video(100, 10, size=(160, 120), fmt="webm")
    _check_leading_frames(_decode(data[: len(data) // 2], FrameSampling(fps=10.0)), 100)


def test_avi_cut_between_frames_gives_the_frames_before_the_cut() -> None:
    data = make_video(100, 10, size=(160, 120), fmt="avi")
    chunk = data.find(b"movi")
    for _ in range(50):
        chunk = data.find(b"00dc", chunk + 1)  # the header of frame 49's chunk
    video = _decode(data[:chunk], FrameSampling(fps=10.0))
    assert video.num_frames == 49 and _shown(video) == list(range(49))


@pytest.mark.parametrize("fmt", ["avi", "mp4", "webm"])
def test_truncated_at_any_point_never_escapes_as_another_error(fmt: str) -> None:
    # From bytes decord segfaults on many of these (its AVIO seek is unbounded); from a file not.
    data = make_video(60, 10, size=(320, 240), fmt=fmt)
    for k in range(1, 20):
        cut = data[: len(data) * k // 20]
        try:
            video = _decode(cut)
        except InvalidArgumentError:
            continue
        assert video.frames.shape == (8, 240, 320, 3)


def _seeded_corruptions(data: bytes, count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        damaged = bytearray(data)
        for pos in rng.integers(len(data) // 10, len(data), 20):
            damaged[pos] = rng.integers(0, 256)
        out.append(bytes(damaged))
    return out


def test_corrupt_frames_are_refused_not_replaced() -> None:
    """decord replaces a frame it cannot decode by its neighbour unless fault_tol is set."""
    refused_then_allowed = 0
    for data in _seeded_corruptions(make_video(100, 10, size=(64, 48), fmt="avi"), 15):
        try:
            _decode(data, FrameSampling(fps=10.0))
        except InvalidArgumentError as e:
            if "recovered" not in e.message:
                continue
            assert e.message.startswith("corrupt or truncated video: expected a complete AVI file, got ")
            assert e.message.endswith(
                ": You have received more than 0 duplicate frames that are corrupted and recovered from nearest frames."
            )
            _decode(data, FrameSampling(fps=10.0), VideoLimits(max_corrupt_frames=100))
            refused_then_allowed += 1
    assert refused_then_allowed >= 1


def test_corrupt_packet_is_refused() -> None:
    data = bytearray(make_video(30, 10, fmt="avi"))
    chunk = data.find(b"00dc", data.find(b"movi"))
    for _ in range(14):
        chunk = data.find(b"00dc", chunk + 1)
    size = int.from_bytes(data[chunk + 4 : chunk + 8], "little")
    data[chunk + 8 : chunk + 8 + size] = b"\xff" * size
    with pytest.raises(
        InvalidArgumentError,
        match=r"corrupt or truncated video: .* AVI file, .*: Thread worker: Error sending packet",
    ):
        _decode(bytes(data), FrameSampling(fps=10.0))


# --- limits ------------------------------------------------------------------------------------


def test_too_many_bytes() -> None:
    data = make_video(10, 10)
    with pytest.raises(
        PayloadTooLargeError, match=rf"video too large: expected at most 100 bytes, got {len(data)} bytes"
    ):
        _decode(data, limits=VideoLimits(max_bytes=100))
    assert _decode(data, limits=VideoLimits(max_bytes=len(data))).num_frames == 10


def test_too_long() -> None:
    data = make_video(100, 10)
    with pytest.raises(
        InvalidArgumentError,
        match=r"video too long: expected at most 9.9 s, got 10.000 s \(100 frames at 10 fps\)",
    ):
        _decode(data, limits=VideoLimits(max_seconds=9.9))
    assert _decode(data, limits=VideoLimits(max_seconds=10)).duration == 10


def test_too_many_frames() -> None:
    data = make_video(100, 25)
    with pytest.raises(InvalidArgumentError, match="video has too many frames: expected at most 99, got 100"):
        _decode(data, limits=VideoLimits(max_frames=99))
    assert _decode(data, limits=VideoLimits(max_frames=100)).num_frames == 100


def test_frames_too_large_are_refused_before_decord_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_video(5, 10, size=(64, 48))

    def no_decord(*args, **kwargs):  # pragma: no cover - must not run
        raise AssertionError("decord opened the file before the size check")

    monkeypatch.setattr(decord, "VideoReader", no_decord)
    with pytest.raises(
        InvalidArgumentError,
        match=r"video frames too large: expected at most 3071 pixels, got 64x48 \(3072 pixels\)",
    ):
        _decode(data, limits=VideoLimits(max_pixels=64 * 48 - 1))


def test_frames_at_the_pixel_limit_are_accepted() -> None:
    assert _decode(make_video(5, 10, size=(64, 48)), limits=VideoLimits(max_pixels=64 * 48)).frames.shape[
        1:
    ] == (48, 64, 3)


def test_too_many_sampled_bytes() -> None:
    data = make_video(100, 10, size=(64, 48))
    with pytest.raises(
        InvalidArgumentError,
        match=r"too many frames sampled: expected at most 100000 bytes of frames, "
        r"got 100 frames of 64x48 \(921600 bytes\)",
    ):
        _decode(data, FrameSampling(fps=10.0), VideoLimits(max_output_bytes=100_000))
    assert len(_decode(data, FrameSampling(num_frames=10), VideoLimits(max_output_bytes=92_160)).frames) == 10


def test_a_header_declaring_too_many_frames_is_refused_before_decord_opens_it() -> None:
    """Found by tests/reliability/test_fuzz_decoders.py: an stts table claiming 5 entries but
    holding 1 declares 1.7e9 frames; decord's frame index threw std::bad_alloc (process abort)."""
    data = bytearray(make_video(6, 4, (32, 24), "mp4"))
    stts = data.index(b"stts")
    data[stts + 8 : stts + 12] = (5).to_bytes(4, "big")
    with pytest.raises(
        InvalidArgumentError, match=r"too many frames: expected at most 36000, got \d+ declared"
    ):
        decode_video(bytes(data), sampling=FrameSampling(num_frames=4), limits=VideoLimits())
