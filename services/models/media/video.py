"""Video decoding and frame sampling for the encoders: bytes -> sampled uint8 RGB frames.

`decode_video` turns the bytes a client sent (mp4/mov, webm/mkv or avi) into the frames a
backbone needs, chosen by a `FrameSampling` rule (SEEDS_SPEC 2.A, 4, 5), with their indices and
timestamps, refusing with an `InvalidArgumentError` that says what was expected and what came:
empty or non-video bytes, other containers, no video stream or no frames, corrupt or truncated
files, and anything over `VideoLimits` (bytes, seconds, frames in the file, pixels per frame,
bytes of sampled frames). Resizing and normalisation belong to each backbone's preprocessing.

Decoding is decord's (as in the seed code); the steps around it exist because of how decord 0.6
behaves on untrusted input:

- decord reads in-memory input (bytes or a file-like object) through its own AVIO callbacks,
  which do not bound seeks: a truncated or corrupt file that makes FFmpeg seek past the end
  reads out of bounds and kills the process (SIGSEGV; 24 of 272 damaged test files). From a
  path FFmpeg's own file protocol is used and none crashed, so the bytes go to a private
  temporary file (`tmp_dir`, default the system's) for the length of the call.
- decord bundles FFmpeg 4.1 and exposes no container name and no frame size before decoding,
  so PyAV (current FFmpeg) reads the header first: only the mov/mp4, matroska/webm and avi
  demuxers get to decord, and the frame size is checked before any frame is decoded, as is the
  frame count the header declares (decord sizes its frame index from it, and the std::bad_alloc
  a damaged count makes it throw aborts the process). decord scales every frame to the size in
  that header, also when the stream changes size midway.
- A damaged frame either fails decord's decoder (refused here) or, where the decoder gives no
  picture, is silently replaced by its neighbour unless `fault_tol` is set; here it is
  (`VideoLimits.max_corrupt_frames`, default 0), so such a file is refused too.
- Truncated files: an mp4 whose index (moov) comes last cannot be opened once cut, and one with
  the index first fails when decord reads its packets at open; both are refused as "corrupt or
  truncated". Streamable containers (webm, mkv, avi) cut short are taken for the video that is
  there: decord counts the frames present, and the frame count, duration and sampling describe
  that part (the last frame may show codec concealment where its data was cut).

Each call opens its own `decord.VideoReader` and frees it before returning: nothing is shared
between calls or threads.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

# PyAV before decord: decord loads its FFmpeg 4.1 and libvpx 6 with RTLD_GLOBAL, and a PyAV
# loaded after it binds libvpx's unversioned symbols to that copy (its VP8/VP9 encoders fail).
import av
import decord
import numpy as np

from services.common.errors import InvalidArgumentError, PayloadTooLargeError
from services.models.media.audio import clip_timepoints

logger = logging.getLogger(__name__)

# PyAV (FFmpeg) demuxer names accepted, and how messages name them.
_DEMUXERS = {"mov,mp4,m4a,3gp,3g2,mj2": "MP4/MOV", "matroska,webm": "WebM/Matroska", "avi": "AVI"}
_EXPECTED = "a video (mp4, mov, webm, mkv or avi)"
_QUICKTIME_ATOMS = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide")
_DECORD_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+?:\d+: ")  # "[12:00:00] src/x.cc:42: "
_TINY_FRACTION = "0.0000001"  # decord fault_tol: a fraction of the frame count that truncates to 0


@dataclass(frozen=True)
class VideoLimits:
    """What `decode_video` accepts: compressed size, duration, frames in the file, frame size."""

    max_bytes: int = 64 * 1024 * 1024
    max_seconds: float = 600.0
    max_frames: int = 36_000  # in the file, before sampling (10 min at 60 fps)
    max_pixels: int = 1920 * 1080  # width * height of one frame
    max_output_bytes: int = 1 << 30  # of the sampled uint8 frames returned (fps sampling, no cap)
    max_corrupt_frames: int = 0  # frames decord may replace by a neighbour before refusing


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a video to decode; exactly one of `num_frames`, `fps` or `clips` is set.

    All rules work on decord's frame count n and average frame rate r (`get_avg_fps`), as the
    seed code does, and give indices in [0, n); timestamps are index / r seconds.

    - `num_frames=N`, VideoChat inference (SEEDS_SPEC 4, `conversation.py::Chat.load_video`
      `get_index`): seg = (n - 1) / N, start = int(seg / 2), index_i = start + int(np.round(seg
      * i)) for i < N (numpy rounds halves to even). Near the middle of N equal segments; a
      video with fewer than N frames repeats frames, as there. (Training's `get_frame_indices`
      'middle', (lo + hi) // 2 of linspace intervals padded with the last frame, is not this.)
    - `fps=F`, E.T. Chat (SEEDS_SPEC 5, `utils/io.py::_load_video`): index = np.arange(0, n, r /
      F).round().clip(0, n - 1), one frame per 1/F s. `max_frames=M` is our cap (E.T. Chat has
      none; its training data filter keeps videos under 350 s): a video that would give more
      than M frames is refused, naming the limit, before any frame is decoded; below it the
      seed's rule holds unchanged.
    - `clips=K, clip_seconds=S, frames_per_clip=m`, ImageBind as NExT-GPT (legacy) and PandaGPT
      use it (SEEDS_SPEC 2.A: ConstantClipsPerVideoSampler(2 s, 5 clips), UniformTemporalSubsample(2)):
      clip k spans [start_k, start_k + S) with start_k from `audio.clip_timepoints(n / r, ...)`
      (`last_clip_at_end` picks the pytorchvideo version, see there); pytorchvideo's decord
      `get_clip` takes frames ceil(r * start) .. min(ceil(r * end), n) - 1, and
      UniformTemporalSubsample keeps `torch.linspace(0, t - 1, m).long()` of those t frames
      (float32, reproduced here). Frames come clip by clip: reshape to (K, m, H, W, 3). Where
      a clip holds no frame (r * S < 1) its start frame is clamped to n - 1 (pytorchvideo fails).
    """

    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    clips: int | None = None
    clip_seconds: float = 2.0
    frames_per_clip: int = 2
    last_clip_at_end: bool = False

    def __post_init__(self) -> None:
        chosen = [name for name in ("num_frames", "fps", "clips") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise InvalidArgumentError(
                f"frame sampling: expected exactly one of num_frames, fps or clips, got {chosen or 'none'}"
            )
        for name in ("num_frames", "max_frames", "clips"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidArgumentError(f"frame sampling {name}: expected an int >= 1, got {value!r}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise InvalidArgumentError(f"frame sampling fps: expected a number > 0, got {self.fps!r}")
        if self.max_frames is not None and self.fps is None:
            raise InvalidArgumentError("frame sampling max_frames: expected only with fps, got it without")
        if self.clips is not None and not (self.clip_seconds > 0 and self.frames_per_clip >= 1):
            raise InvalidArgumentError(
                f"frame sampling clips: expected clip_seconds > 0 and frames_per_clip >= 1, "
                f"got {self.clip_seconds!r} and {self.frames_per_clip!r}"
            )

    def indices(self, num_frames: int, fps: float) -> np.ndarray:
        """int64 frame indices to decode from a video of `num_frames` frames at `fps`.

        Raises:
            InvalidArgumentError: fps sampling would pick more than `max_frames` frames.
        """
        if self.num_frames is not None:
            return uniform_indices(num_frames, self.num_frames)
        if self.fps is not None:
            picked = np.arange(0, num_frames, fps / self.fps).round().astype(np.int64).clip(0, num_frames - 1)
            if self.max_frames is not None and len(picked) > self.max_frames:
                raise InvalidArgumentError(
                    f"video too long for this model: expected at most max_frames = {self.max_frames} "
                    f"frames at {self.fps:g} fps (about {self.max_frames / self.fps:g} s), got "
                    f"{len(picked)} frames from {num_frames / fps:.3f} s"
                )
            return picked
        return self._clip_indices(num_frames, fps)

    def _clip_indices(self, num_frames: int, fps: float) -> np.ndarray:
        assert self.clips is not None
        points = clip_timepoints(
            num_frames / fps,
            clip_seconds=self.clip_seconds,
            num_clips=self.clips,
            last_clip_at_end=self.last_clip_at_end,
        )
        out = []
        for start, end in points:
            first = min(math.ceil(fps * float(start)), num_frames - 1)  # float * Fraction is float
            stop = max(min(math.ceil(fps * float(end)), num_frames), first + 1)
            out.append(first + _torch_linspace_long(stop - first - 1, self.frames_per_clip))
        return np.concatenate(out)


def uniform_indices(num_frames: int, count: int) -> np.ndarray:
    """VideoChat's `get_index(num_frames, num_segments)`, exactly (see `FrameSampling`)."""
    seg_size = float(num_frames - 1) / count
    start = int(seg_size / 2)
    return np.array([start + int(np.round(seg_size * i)) for i in range(count)], dtype=np.int64)


def _torch_linspace_long(end: int, steps: int) -> np.ndarray:
    """`torch.linspace(0, end, steps).clamp(0, end).long()` in float32 as torch computes it."""
    if steps == 1:
        return np.zeros(1, dtype=np.int64)
    step = np.float32(end) / np.float32(steps - 1)
    i = np.arange(steps)
    # torch fills the first half forwards from start and the second half backwards from end.
    values = np.where(i < steps // 2, step * i.astype(np.float32), np.float32(end) - step * (steps - 1 - i))
    return np.clip(values.astype(np.float32), 0, end).astype(np.int64)  # .long() truncates


@dataclass(frozen=True, eq=False)
class DecodedVideo:
    """Sampled frames and where they come from.

    frames: uint8 (N, H, W, 3) RGB, in the order `FrameSampling.indices` gave.
    indices: int64 (N,) frame indices in the file; timestamps: float64 (N,) seconds, index / fps
        (the seed prompts round them to 0.1 s).
    fps: decord's average frame rate; num_frames: frames in the file (decord's count);
        duration: num_frames / fps seconds (pytorchvideo's and E.T. Chat's definition).
    """

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    fps: float
    num_frames: int
    duration: float


def _sniff(data: bytes) -> str | None:
    """The accepted container the bytes look like, if any (to tell damaged from foreign)."""
    if data[4:8] in _QUICKTIME_ATOMS:
        return "MP4/MOV"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "WebM/Matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "AVI"
    return None


def _not_a_video(data: bytes, detail: str = "") -> InvalidArgumentError:
    return InvalidArgumentError(
        f"not a video: expected {_EXPECTED}, got {len(data)} bytes starting with {data[:16].hex(' ')}{detail}"
    )


def _corrupt(fmt: str, data: bytes, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"corrupt or truncated video: expected a complete {fmt} file, got {len(data)} bytes "
        f"that fail to decode: {why}"
    )


def _decord_reason(error: Exception, path: str) -> str:
    """decord's message without its log prefixes, check text or our temporary path."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = _DECORD_PREFIX.sub("", text).replace(f"[{path}]", "").replace(path, "<input>")
    if text.startswith("Check failed:"):  # "Check failed: call(...) >= 0 (-22 vs. 0) Why"
        text = text.rsplit(") ", 1)[-1]
    return text[:200]


def _probe(path: str, data: bytes) -> tuple[str, int, int, int]:
    """(container name, width, height, frames the header declares or 0) via PyAV; nothing is decoded."""
    try:
        with av.open(path) as container:
            demuxer = container.format.name
            kinds = sorted({str(s.type) for s in container.streams}) or ["none"]
            stream = container.streams.best("video")
            video = stream if isinstance(stream, av.VideoStream) else None
            size = (video.width, video.height) if video is not None else None
            declared = int(video.frames or 0) if video is not None else 0
    except Exception as e:  # av.error.FFmpegError mostly; PyAV raises a few others
        why = getattr(e, "strerror", None) or type(e).__name__
    else:
        name = _DEMUXERS.get(demuxer)
        if name is None:
            raise _not_a_video(data, f" (read as {demuxer})")
        if size is None:
            raise InvalidArgumentError(
                f"no video stream: expected {name} with a video stream, got streams: {', '.join(kinds)}"
            )
        return name, *size, declared
    fmt = _sniff(data)
    if fmt is None:
        raise _not_a_video(data)
    raise _corrupt(fmt, data, f"unreadable container ({why})")


def _count_video_packets(path: str) -> int:
    """Video packets PyAV can demux (to tell an empty video from a broken one); -1 if it fails."""
    try:
        with av.open(path) as container:
            stream = container.streams.best("video")
            return sum(1 for packet in container.demux(stream) if packet.size)
    except Exception:  # only a diagnosis for a file already refused
        return -1


def _open(path: str, data: bytes, fmt: str, limits: VideoLimits, num_threads: int) -> decord.VideoReader:
    fault_tol = str(limits.max_corrupt_frames) if limits.max_corrupt_frames > 0 else _TINY_FRACTION
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads, fault_tol=fault_tol)
    except Exception as e:  # decord raises DECORDError, RuntimeError, AssertionError (0 frames)...
        why = _decord_reason(e, path)
    # Raised outside the except block: no __context__ keeping decord's frames (and reader) alive.
    if _count_video_packets(path) == 0:
        raise InvalidArgumentError(f"empty video: expected at least one frame, got 0 frames ({fmt})")
    raise _corrupt(fmt, data, why)


def _check(reader: decord.VideoReader, data: bytes, fmt: str, limits: VideoLimits) -> tuple[int, float]:
    """(frame count, fps) after checking them against the limits."""
    num_frames, fps = len(reader), float(reader.get_avg_fps())
    if num_frames < 1:
        raise InvalidArgumentError(f"empty video: expected at least one frame, got 0 frames ({fmt})")
    if not (math.isfinite(fps) and fps > 0):
        raise _corrupt(fmt, data, f"expected a positive frame rate, got {fps}")
    if num_frames > limits.max_frames:
        raise InvalidArgumentError(
            f"video has too many frames: expected at most {limits.max_frames}, got {num_frames}"
        )
    if num_frames / fps > limits.max_seconds:
        raise InvalidArgumentError(
            f"video too long: expected at most {limits.max_seconds} s, got {num_frames / fps:.3f} s "
            f"({num_frames} frames at {fps:g} fps)"
        )
    return num_frames, fps


def _read(reader: decord.VideoReader, indices: np.ndarray, path: str, data: bytes, fmt: str) -> np.ndarray:
    """uint8 (len(indices), H, W, 3): each distinct frame decoded once, in index order."""
    unique, inverse = np.unique(indices, return_inverse=True)
    try:
        batch = reader.get_batch(unique.tolist())
    except Exception as e:  # DECORDLimitReachedError (corrupt frames), DECORDError, IndexError...
        why = _decord_reason(e, path)
    else:
        # decord's bridge is per-thread state that other code may set (E.T. Chat sets "torch").
        array = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
        return np.ascontiguousarray(array[inverse])  # (N, H, W, 3)
    del reader
    raise _corrupt(fmt, data, why)


def decode_video(
    data: bytes,
    *,
    sampling: FrameSampling,
    limits: VideoLimits,
    num_threads: int = 1,
    tmp_dir: str | Path | None = None,
) -> DecodedVideo:
    """Decode the frames `sampling` picks from the bytes of a video file, refusing bad input.

    Args:
        data: The file: MP4/MOV, WebM/Matroska or AVI, any codec decord's FFmpeg 4.1 decodes.
        sampling: Which frames to return (see `FrameSampling` for the rules).
        limits: Largest file, duration, frame count and frame size accepted; the size, the
            container and the frame size are checked before anything is decoded, the duration
            and frame count before any frame is.
        num_threads: decord decoding threads (1, as VideoChat; 0 lets FFmpeg choose).
        tmp_dir: Where the bytes are written for decord (see the module docstring).

    Returns:
        The sampled frames with their indices and timestamps, and the video's fps, frame count
        and duration.

    Raises:
        InvalidArgumentError: Empty or non-video input, an unaccepted container, no video
            stream or no frames, a corrupt or truncated file, or a limit exceeded
            (`PayloadTooLargeError`, a subclass, for the byte size).
    """
    if not data:
        raise InvalidArgumentError(f"empty video: expected {_EXPECTED}, got 0 bytes")
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(
            f"video too large: expected at most {limits.max_bytes} bytes, got {len(data)} bytes"
        )
    with tempfile.NamedTemporaryFile(prefix="modalmesh-video-", dir=tmp_dir) as file:
        file.write(data)
        file.flush()
        fmt, width, height, declared = _probe(file.name, data)
        if width <= 0 or height <= 0:
            raise _corrupt(fmt, data, f"expected a positive frame size, got {width}x{height}")
        if declared > limits.max_frames:
            # decord sizes its frame index from this count: a damaged 1.6 kB mp4 declaring 1.7e9
            # frames made it throw std::bad_alloc, which aborts the process (found by fuzzing).
            raise InvalidArgumentError(
                f"video has too many frames: expected at most {limits.max_frames}, got {declared} "
                f"declared in its {fmt} header"
            )
        if width * height > limits.max_pixels:
            raise InvalidArgumentError(
                f"video frames too large: expected at most {limits.max_pixels} pixels, got "
                f"{width}x{height} ({width * height} pixels)"
            )
        reader = _open(file.name, data, fmt, limits, num_threads)
        try:
            num_frames, fps = _check(reader, data, fmt, limits)
            indices = sampling.indices(num_frames, fps)
            out_bytes = len(indices) * width * height * 3
            if out_bytes > limits.max_output_bytes:
                raise InvalidArgumentError(
                    f"too many frames sampled: expected at most {limits.max_output_bytes} bytes of "
                    f"frames, got {len(indices)} frames of {width}x{height} ({out_bytes} bytes)"
                )
            frames = _read(reader, indices, file.name, data, fmt)
        finally:
            del reader  # frees decord's FFmpeg contexts, threads and file descriptor now
    logger.debug(
        "decoded %d of %d frames (%s, %dx%d, %.2f fps)", len(indices), num_frames, fmt, width, height, fps
    )
    return DecodedVideo(
        frames=frames,
        indices=indices,
        timestamps=indices / fps,
        fps=fps,
        num_frames=num_frames,
        duration=num_frames / fps,
    )
