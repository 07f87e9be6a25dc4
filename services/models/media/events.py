"""Event-camera streams: safe parsing of uploaded files, and EventGPT's events -> RGB frames.

An event stream is four 1-D arrays of equal length, one entry per event: `x` (column) and
`y` (row) pixel coordinates, `t` the timestamp in microseconds (non-decreasing), `p` the
polarity (1 = brightness went up, 0 = down; -1/1 is accepted and kept as it is).

Accepted files (`parse_events`):

1. EventGPT's `.npy`: what `np.save(path, {"x": x, "y": y, "t": t, "p": p})` writes, i.e. a
   0-d object array holding a dict (EventGPT reads it with `np.load(path, allow_pickle=True).item()`).
   The dict may also carry the sensor size as integers under "width" and "height".
   This form is a pickle. It is never given to the stock unpickler: a restricted one rebuilds
   numpy arrays and plain containers only (allow-list: `numpy.core.multiarray._reconstruct`,
   `numpy._core.multiarray._reconstruct`, `numpy.core.multiarray.scalar`,
   `numpy._core.multiarray.scalar`, `numpy.ndarray`, `numpy.dtype`, and `builtins.dict`,
   `list`, `tuple`, `set`, `frozenset`); any other object type in the file is refused before
   it is looked up, so a file that would run code on load is rejected without running it.
2. A plain `.npy` (no pickle): a structured array with fields x, y, t, p (any order, other
   fields ignored), or an (N, 4) numeric array whose columns are, in this order, x, y, t, p.
3. An `.npz` (`np.savez` or `np.savez_compressed`) with arrays named x, y, t, p, and optionally
   0-d integer arrays "width" and "height"; read without pickles.

Without "width"/"height" the sensor size is max(x)+1 by max(y)+1. Every check (size of the
file, number of events, sensor size, span of time) has a limit in `EventLimits`.

`event_frames` turns a stream into EventGPT's input frames (`common/common.py`,
`get_event_images_list` and `generate_event_image`): N chunks of equal event count (the last
takes the remainder), each drawn on a white canvas, blue where p == 0 and red otherwise (so a
-1/1 stream is all red, as there; `negative="zero_or_negative"` draws its -1 events blue), later
events painting over earlier ones. CLIP preprocessing of the frames is not done here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from services.common.errors import InvalidArgumentError, PayloadTooLargeError
from services.models.media._safe_npy import NPY_MAGIC, ZIP_MAGIC, read_npy, read_npz

logger = logging.getLogger(__name__)

FIELDS: tuple[str, ...] = ("x", "y", "t", "p")
_WHAT = "event file"
_WHITE = 255
_BLUE = np.array([0, 0, 255], dtype=np.uint8)  # negative polarity
_RED = np.array([255, 0, 0], dtype=np.uint8)  # positive polarity (EventGPT: every p != 0)
NegativePolarity = Literal["zero_only", "zero_or_negative"]
_MAX_ABS_T = 2**62


@dataclass(frozen=True)
class EventLimits:
    """Limits on an uploaded event stream.

    Attributes:
        max_bytes: Largest file accepted (for an .npz also the total uncompressed size).
        max_events: Largest number of events.
        max_width: Largest sensor width (declared, or max(x)+1).
        max_height: Largest sensor height (declared, or max(y)+1).
        max_duration_us: The stream must span less than this (t[-1] - t[0] < max_duration_us);
            EventGPT refuses streams of 100 ms or more. None: no limit.
    """

    max_bytes: int = 64 * 1024 * 1024
    max_events: int = 2_000_000
    max_width: int = 2048
    max_height: int = 2048
    max_duration_us: int | None = 100_000


@dataclass(frozen=True, eq=False)
class EventStream:
    """A validated event stream: x, y (int64, within the sensor), t (int64 microseconds,
    non-decreasing), p (int8, 0/1 or -1/1 as the file has it), all of one length >= 1, read-only."""

    x: np.ndarray
    y: np.ndarray
    t: np.ndarray
    p: np.ndarray
    width: int
    height: int

    def __len__(self) -> int:
        return len(self.t)


def parse_events(data: bytes, *, limits: EventLimits) -> EventStream:
    """Parse and validate the bytes of an event file (.npy or .npz; see the module docstring).

    Args:
        data: The file's bytes.
        limits: Size limits to enforce.

    Returns:
        The validated stream.

    Raises:
        PayloadTooLargeError: The file, its uncompressed arrays or the number of events is over
            its limit.
        InvalidArgumentError: Anything else wrong: not .npy/.npz, a pickle naming any object type
            outside the allow-list, a missing field, fields of different lengths, non-integer,
            negative or out-of-sensor coordinates, decreasing timestamps, polarity other than
            {0, 1} or {-1, 1}, an empty stream, or a stream spanning too long.
    """
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(f"{_WHAT}: expected at most {limits.max_bytes} bytes, got {len(data)}")
    if data.startswith(NPY_MAGIC):
        fields, size = _from_npy(read_npy(data, what=_WHAT, allow_pickle=True))
    elif data.startswith(ZIP_MAGIC):
        arrays = read_npz(data, what=_WHAT, max_bytes=limits.max_bytes)
        fields = {k: v for k, v in arrays.items() if k in FIELDS}
        size = {k: arrays[k] for k in ("width", "height") if k in arrays}
    else:
        raise InvalidArgumentError(
            f"{_WHAT}: expected an .npy or .npz file, got {len(data)} bytes starting with {data[:8].hex(' ')}"
        )
    return _validate(fields, size, limits)


def _from_npy(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split what an .npy held into (fields, declared sensor size)."""
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if isinstance(obj, dict):
        return {k: obj[k] for k in FIELDS if k in obj}, {k: obj[k] for k in ("width", "height") if k in obj}
    if not isinstance(obj, np.ndarray) or obj.dtype == object:
        raise InvalidArgumentError(
            f"{_WHAT}: expected a dict of x, y, t, p arrays or a numeric array, got {type(obj).__name__}"
        )
    if obj.dtype.names is not None:
        if obj.ndim != 1:
            raise InvalidArgumentError(f"{_WHAT}: expected a 1-D structured array, got shape {obj.shape}")
        return {k: obj[k] for k in FIELDS if k in obj.dtype.names}, {}
    if obj.ndim != 2 or obj.shape[1] != 4:
        raise InvalidArgumentError(
            f"{_WHAT}: expected an (N, 4) array with columns x, y, t, p, got shape {obj.shape}"
        )
    return {k: obj[:, i] for i, k in enumerate(FIELDS)}, {}


def _integers(name: str, value: Any) -> np.ndarray:
    """`value` as a 1-D int64 array, refusing anything that is not integer-valued."""
    if not isinstance(value, np.ndarray | list | tuple):
        raise InvalidArgumentError(
            f"{_WHAT}: expected field {name!r} to be an array, got {type(value).__name__}"
        )
    array = np.asarray(value)
    if array.ndim != 1:
        raise InvalidArgumentError(f"{_WHAT}: expected field {name!r} to be 1-D, got shape {array.shape}")
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.int64)
    if kind == "f":
        bad = ~np.isfinite(array) | (array != np.round(array)) | (np.abs(array) >= _MAX_ABS_T)
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidArgumentError(
                f"{_WHAT}: expected integer {name!r} values, got {array[i]!r} at event {i}"
            )
        return array.astype(np.int64)
    if kind == "u" and array.size and int(array.max()) >= _MAX_ABS_T:
        raise InvalidArgumentError(f"{_WHAT}: expected {name!r} values below 2**62, got {int(array.max())}")
    if kind not in "iu":
        raise InvalidArgumentError(f"{_WHAT}: expected integer {name!r} values, got dtype {array.dtype}")
    return array.astype(np.int64)


def _declared(name: str, value: Any, limit: int) -> int:
    array = np.asarray(value)
    if array.shape != () or array.dtype.kind not in "iu" or not 1 <= int(array) <= limit:
        raise InvalidArgumentError(
            f"{_WHAT}: expected {name} to be an integer in [1, {limit}], got {value!r}"
        )
    return int(array)


def _sensor_size(coord: np.ndarray, name: str, declared: Any, limit: int, dim: str) -> int:
    """The sensor's size along one axis (declared or max+1), after checking every coordinate."""
    low = int(coord.min())
    if low < 0:
        raise InvalidArgumentError(
            f"{_WHAT}: expected non-negative {name} coordinates, got {low} at event {int(np.argmin(coord))}"
        )
    high = int(coord.max())
    if declared is not None:
        size = _declared(dim, declared, limit)
        if high >= size:
            raise InvalidArgumentError(
                f"{_WHAT}: expected {name} < {dim} = {size}, got {high} at event {int(np.argmax(coord))}"
            )
        return size
    if high + 1 > limit:
        raise InvalidArgumentError(
            f"{_WHAT}: expected {name} below the sensor {dim} limit {limit}, got {high}"
        )
    return high + 1


def _validate(fields: dict[str, Any], size: dict[str, Any], limits: EventLimits) -> EventStream:
    missing = [k for k in FIELDS if k not in fields]
    if missing:
        raise InvalidArgumentError(
            f"{_WHAT}: expected fields x, y, t, p, got {sorted(fields)} (missing {', '.join(missing)})"
        )
    x, y, t, p = (_integers(k, fields[k]) for k in FIELDS)
    lengths = {k: len(a) for k, a in zip(FIELDS, (x, y, t, p), strict=True)}
    if len(set(lengths.values())) != 1:
        raise InvalidArgumentError(f"{_WHAT}: expected x, y, t, p of one length, got lengths {lengths}")
    n = lengths["t"]
    if n == 0:
        raise InvalidArgumentError(f"{_WHAT}: expected at least one event, got an empty stream")
    if n > limits.max_events:
        raise PayloadTooLargeError(f"{_WHAT}: expected at most {limits.max_events} events, got {n}")
    width = _sensor_size(x, "x", size.get("width"), limits.max_width, "width")
    height = _sensor_size(y, "y", size.get("height"), limits.max_height, "height")
    steps = np.diff(t)
    if (steps < 0).any():
        i = int(np.argmax(steps < 0)) + 1
        raise InvalidArgumentError(
            f"{_WHAT}: expected non-decreasing timestamps, got t[{i}] = {t[i]} after t[{i - 1}] = {t[i - 1]}"
        )
    span = int(t[-1] - t[0])
    if limits.max_duration_us is not None and span >= limits.max_duration_us:
        raise InvalidArgumentError(
            f"{_WHAT}: expected a stream spanning less than {limits.max_duration_us} us, got {span} us"
        )
    values = set(np.unique(p).tolist())
    if not (values <= {0, 1} or values <= {-1, 1}):
        raise InvalidArgumentError(
            f"{_WHAT}: expected polarity in {{0, 1}} or {{-1, 1}}, got {sorted(values)}"
        )
    arrays = (x, y, t, p.astype(np.int8))
    for a in arrays:
        a.setflags(write=False)
    logger.debug("parsed %d events, sensor %dx%d, %d us", n, width, height, span)
    return EventStream(*arrays, width=width, height=height)


def _draw(
    x: np.ndarray, y: np.ndarray, p: np.ndarray, height: int, width: int, negative: NegativePolarity
) -> np.ndarray:
    """One (height, width, 3) uint8 frame: white, blue for negative events, red for the others,
    the last event at a pixel winning."""
    frame = np.full((height, width, 3), _WHITE, dtype=np.uint8)
    pixel = y * width + x
    # The last event at each pixel: numpy leaves the winner of repeated fancy-index writes unspecified.
    reversed_unique, first_in_reversed = np.unique(pixel[::-1], return_index=True)
    last = len(pixel) - 1 - first_in_reversed
    flat = frame.reshape(-1, 3)
    blue = p[last, None] == 0 if negative == "zero_only" else p[last, None] <= 0
    flat[reversed_unique] = np.where(blue, _BLUE, _RED)
    return frame


def event_frames(
    stream: EventStream,
    *,
    num_frames: int = 5,
    canvas: Literal["chunk", "sensor"] = "chunk",
    negative: NegativePolarity = "zero_only",
) -> list[np.ndarray]:
    """EventGPT's event frames: `num_frames` chunks of equal event count drawn as RGB images.

    Chunk i holds events [i * k, (i + 1) * k) with k = len(stream) // num_frames; the last chunk
    also takes the remainder. Each frame is white (255, 255, 255); a pixel with an event is blue
    (0, 0, 255) if that pixel's last event in the chunk is negative, red (255, 0, 0) otherwise.

    Args:
        stream: A parsed stream.
        num_frames: Number of chunks (EventGPT uses 5).
        canvas: "chunk" (EventGPT): each frame is (max(y)+1, max(x)+1) of its own chunk, so the
            sizes may differ; "sensor": every frame is (stream.height, stream.width), so they stack.
        negative: Which events are negative: "zero_only" (EventGPT's `p_ == 0`: the -1 of a
            -1/1 stream counts as positive) or "zero_or_negative" (p <= 0).

    Returns:
        `num_frames` (H, W, 3) uint8 arrays.

    Raises:
        InvalidArgumentError: Fewer events than frames (EventGPT fails on the empty chunk).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
    if negative not in ("zero_only", "zero_or_negative"):
        raise ValueError(f"negative: expected 'zero_only' or 'zero_or_negative', got {negative!r}")
    n = len(stream)
    if n < num_frames:
        raise InvalidArgumentError(
            f"event stream: expected at least {num_frames} events (one per frame), got {n}"
        )
    per_frame = n // num_frames
    frames = []
    for i in range(num_frames):
        chunk = slice(i * per_frame, (i + 1) * per_frame if i < num_frames - 1 else n)
        x, y, p = stream.x[chunk], stream.y[chunk], stream.p[chunk]
        if canvas == "chunk":
            height, width = int(y.max()) + 1, int(x.max()) + 1
        else:
            height, width = stream.height, stream.width
        frames.append(_draw(x, y, p, height, width, negative))
    return frames
