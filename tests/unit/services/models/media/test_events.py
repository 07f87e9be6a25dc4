"""Event streams: the three accepted file forms, every validation, pickles that try to run code,
and EventGPT's events -> frames conversion (parity with its loop)."""

from __future__ import annotations

import builtins
import functools
import io
import os
import pickle
import subprocess
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.lib import format as npformat

from services.common.errors import InvalidArgumentError, PayloadTooLargeError
from services.models.media._safe_npy import ALLOWED
from services.models.media.events import EventLimits, EventStream, event_frames, parse_events
from tests.helpers.media import EVENT_FORMS, make_events

LIMITS = EventLimits()
BLUE, RED, WHITE = [0, 0, 255], [255, 0, 0], [255, 255, 255]


def _npy(obj: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    return buf.getvalue()


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _object_npy(payload: bytes) -> bytes:
    """An .npy whose header says object dtype, followed by an arbitrary pickle payload."""
    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    return buf.getvalue() + payload


def _events(n: int = 20, **overrides: Any) -> dict[str, Any]:
    events: dict[str, Any] = {
        "x": np.arange(n, dtype=np.uint16) % 7,
        "y": np.arange(n, dtype=np.uint16) % 5,
        "t": np.arange(n, dtype=np.int64) * 10,
        "p": (np.arange(n) % 2).astype(np.uint8),
    }
    events.update(overrides)
    return events


def _refused(data: bytes, match: str, limits: EventLimits = LIMITS) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        parse_events(data, limits=limits)


# --- accepted forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", EVENT_FORMS)
def test_each_form_round_trips(form: str) -> None:
    stream = parse_events(make_events(500, 64, 48, form=form, seed=3), limits=LIMITS)
    reference = np.load(
        io.BytesIO(make_events(500, 64, 48, form="pickle_dict", seed=3)), allow_pickle=True
    ).item()
    for name in "xytp":
        np.testing.assert_array_equal(getattr(stream, name), reference[name])
    assert (stream.width, stream.height) == (int(reference["x"].max()) + 1, int(reference["y"].max()) + 1)
    assert stream.x.dtype == np.int64 and stream.p.dtype == np.int8 and len(stream) == 500
    assert not stream.x.flags.writeable


def test_declared_sensor_size_from_dict_and_npz() -> None:
    stream = parse_events(_npy(_events(width=346, height=np.int64(260))), limits=LIMITS)
    assert (stream.width, stream.height) == (346, 260)
    stream = parse_events(_npz(**_events(), width=np.array(346), height=np.array(260)), limits=LIMITS)
    assert (stream.width, stream.height) == (346, 260)


def test_integral_floats_bools_and_signed_polarity_are_accepted() -> None:
    n = 6
    events = _events(n, x=np.arange(n, dtype=np.float64), p=np.array([-1, 1] * 3))
    stream = parse_events(_npy(events), limits=LIMITS)
    np.testing.assert_array_equal(stream.p, [-1, 1] * 3)  # kept: EventGPT draws -1 red, not blue
    assert stream.x.dtype == np.int64
    stream = parse_events(_npy(_events(n, p=np.array([True, False] * 3))), limits=LIMITS)
    np.testing.assert_array_equal(stream.p, [1, 0] * 3)


def test_fortran_order_and_version_2_headers() -> None:
    columns = np.asfortranarray(np.stack([_events()[k].astype(np.int64) for k in "xytp"], axis=1))
    buf = io.BytesIO()
    npformat.write_array(buf, columns, version=(2, 0))
    stream = parse_events(buf.getvalue(), limits=LIMITS)
    np.testing.assert_array_equal(stream.t, _events()["t"])


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [_npy, lambda e: _npz(**e)], ids=["npy-dict", "npz"])
def test_missing_field(wrap) -> None:
    events = _events()
    del events["p"]
    _refused(wrap(events), r"expected fields x, y, t, p, got \['t', 'x', 'y'\] \(missing p\)")


def test_structured_array_missing_field() -> None:
    arr = np.zeros(4, dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<i8")])
    _refused(_npy(arr), "missing p")


def test_fields_of_different_lengths() -> None:
    _refused(
        _npy(_events(10, p=np.zeros(9, np.uint8))),
        r"one length, got lengths \{'x': 10, 'y': 10, 't': 10, 'p': 9\}",
    )


@pytest.mark.parametrize(
    ("field", "values", "match"),
    [
        ("x", np.array([0.0, 1.5, 2.0]), r"expected integer 'x' values, got 1.5 at event 1"),
        ("y", np.array([0.0, np.nan, 2.0]), r"expected integer 'y' values, got nan"),
        ("x", np.array(["a", "b", "c"]), r"expected integer 'x' values, got dtype <U1"),
        ("t", np.array([0.0, 0.5, 1.0]), r"expected integer 't' values"),
        ("x", np.array([0, -1, 2]), r"expected non-negative x coordinates, got -1 at event 1"),
        ("y", np.array([3, 2, -4]), r"expected non-negative y coordinates, got -4 at event 2"),
    ],
)
def test_bad_coordinates_and_timestamps(field: str, values: np.ndarray, match: str) -> None:
    _refused(_npy(_events(3, **{field: values})), match)


def test_field_that_is_not_an_array() -> None:
    _refused(_npy(_events(3, x="abc")), r"expected field 'x' to be an array, got str")
    _refused(_npy(_events(3, x=np.zeros((3, 1)))), r"expected field 'x' to be 1-D, got shape \(3, 1\)")


def test_coordinates_beyond_the_declared_sensor() -> None:
    _refused(_npy(_events(20, width=6, height=5)), r"expected x < width = 6, got 6 at event 6")
    _refused(_npy(_events(20, width=7, height=4)), r"expected y < height = 4, got 4 at event 4")
    _refused(_npy(_events(20, width=0, height=5)), r"expected width to be an integer in \[1, 2048\], got 0")
    _refused(_npy(_events(20, width=7.0, height=5)), r"expected width to be an integer")


def test_sensor_size_limits_without_declared_size() -> None:
    limits = EventLimits(max_width=6, max_height=100)
    _refused(_npy(_events(20)), r"expected x below the sensor width limit 6, got 6", limits)
    _refused(
        _npy(_events(20, width=7, height=5)), r"expected width to be an integer in \[1, 6\], got 7", limits
    )
    limits = EventLimits(max_width=100, max_height=4)
    _refused(_npy(_events(20)), r"expected y below the sensor height limit 4, got 4", limits)


def test_unsorted_timestamps() -> None:
    t = np.array([0, 5, 5, 3, 9])
    _refused(_npy(_events(5, t=t)), r"expected non-decreasing timestamps, got t\[3\] = 3 after t\[2\] = 5")


@pytest.mark.parametrize("p", [[0, 1, 2], [-1, 0, 1], [0, 3, 3], [-2, 1, 1]])
def test_bad_polarity(p: list[int]) -> None:
    _refused(_npy(_events(3, p=np.array(p))), r"expected polarity in \{0, 1\} or \{-1, 1\}")


@pytest.mark.parametrize("form", EVENT_FORMS)
def test_empty_stream(form: str) -> None:
    _refused(make_events(0, 8, 8, form=form), "expected at least one event, got an empty stream")


def test_too_many_events() -> None:
    with pytest.raises(PayloadTooLargeError, match="expected at most 100 events, got 101"):
        parse_events(make_events(101, 8, 8), limits=EventLimits(max_events=100))


def test_file_too_large() -> None:
    data = make_events(1000, 8, 8, form="npz")
    with pytest.raises(PayloadTooLargeError, match=f"expected at most 1000 bytes, got {len(data)}"):
        parse_events(data, limits=EventLimits(max_bytes=1000))


def test_npz_uncompressed_size_counts_against_the_limit() -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **_events(20_000, x=np.zeros(20_000, np.uint16)))
    data = buf.getvalue()
    limits = EventLimits(max_bytes=len(data) + 1)
    with pytest.raises(PayloadTooLargeError, match=r"bytes uncompressed, got \d+"):
        parse_events(data, limits=limits)


def test_stream_spanning_too_long() -> None:
    _refused(
        _npy(_events(3, t=np.array([0, 50_000, 100_000]))), r"spanning less than 100000 us, got 100000 us"
    )
    stream = parse_events(
        _npy(_events(3, t=np.array([0, 50_000, 100_000]))), limits=EventLimits(max_duration_us=None)
    )
    assert len(stream) == 3


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", r"expected an .npy or .npz file, got 0 bytes"),
        (b"GIF89a\x00\x00", r"expected an .npy or .npz file, got 8 bytes starting with 47 49 46"),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<i8',", r"expected a valid .npy header"),
        (b"\x93NUMPY\x03\x00", r"expected a valid .npy header.*version 3.0"),
        (b"PK\x03\x04garbage", r"expected a valid .npz \(zip\) file"),
    ],
)
def test_not_an_event_file(data: bytes, match: str) -> None:
    _refused(data, match)


def test_truncated_or_padded_array_data() -> None:
    data = make_events(50, 8, 8, form="array")
    _refused(data[:-8], r"expected 1600 bytes of array data for shape \(50, 4\) int64, got 1592")
    _refused(data + b"\x00" * 8, r"expected 1600 bytes of array data .* got 1608")


def test_header_claiming_a_huge_array_allocates_nothing() -> None:
    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": "<i8", "fortran_order": False, "shape": (10**15, 4)})
    _refused(buf.getvalue() + b"\x00" * 32, r"expected 32000000000000000 bytes of array data")


def test_wrong_array_shapes() -> None:
    _refused(
        _npy(np.zeros((5, 3), np.int64)),
        r"expected an \(N, 4\) array with columns x, y, t, p, got shape \(5, 3\)",
    )
    _refused(
        _npy(np.zeros((2, 2), dtype=[("x", "<u2")])), r"expected a 1-D structured array, got shape \(2, 2\)"
    )
    _refused(_npy([1, "a", None]), r"expected a dict of x, y, t, p arrays or a numeric array, got ndarray")


def test_npz_with_object_member_or_bzip2_is_refused() -> None:
    buf = io.BytesIO()
    np.savez(buf, **_events(), extra=np.array([{"a": 1}], dtype=object))
    _refused(
        buf.getvalue(), r"event file \(extra\): expected a numeric array, got an object \(pickled\) array"
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_BZIP2) as archive:
        archive.writestr("x.npy", _npy(np.zeros(3, np.uint16)))
    _refused(buf.getvalue(), r"expected stored or deflated members, got compression 12")


# --- pickles that would run code --------------------------------------------------------------


class _Evil:
    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def _marker(tmp_path: Path) -> Path:
    return tmp_path / f"pwned-{uuid.uuid4().hex}"


def _payloads(marker: Path) -> dict[str, Any]:
    command = f"touch {marker}"
    return {
        "os.system": _Evil(os.system, command),
        "builtins.eval": _Evil(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": _Evil(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Evil(subprocess.Popen, ["touch", str(marker)]),
        "functools.partial": _Evil(functools.partial(os.system, command)),
        "builtins.getattr": _Evil(getattr, "", "join"),  # the first step of getattr(os, "system")
    }


@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "builtins.eval",
        "builtins.exec",
        "subprocess.Popen",
        "functools.partial",
        "builtins.getattr",
    ],
)
@pytest.mark.parametrize("where", ["top", "in-dict", "raw-pickle"])
def test_pickle_that_runs_code_is_refused_without_running(tmp_path: Path, name: str, where: str) -> None:
    marker = _marker(tmp_path)
    evil = _payloads(marker)[name]
    if where == "top":
        data = _npy(np.array(evil, dtype=object))
    elif where == "in-dict":
        data = _npy(_events(x=evil))
    else:
        data = _object_npy(pickle.dumps(evil, protocol=2))
    with pytest.raises(InvalidArgumentError, match=r"event file: pickled object of type \S+ is not allowed"):
        parse_events(data, limits=LIMITS)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("protocol", "name"),
    [(2, "_codecs.encode"), (5, "numpy.core.numeric._frombuffer")],
    ids=["proto2", "proto5"],
)
def test_protocols_numpy_never_writes_are_refused(protocol: int, name: str) -> None:
    """Protocol 2 carries bytes through _codecs.encode, protocol 5 arrays through _frombuffer:
    both outside the allow-list (np.save writes protocol 3)."""
    payload = pickle.dumps(np.array(_events(), dtype=object), protocol=protocol)
    _refused(_object_npy(payload), rf"pickled object of type {name} is not allowed")


def test_refusal_names_the_type() -> None:
    data = _object_npy(pickle.dumps(_Evil(builtins.eval, "1"), protocol=4))
    _refused(data, r"pickled object of type builtins.eval is not allowed")
    data = _object_npy(pickle.dumps(_Evil(subprocess.Popen, ["true"]), protocol=3))
    _refused(data, r"pickled object of type subprocess.Popen is not allowed")


def test_stock_pickle_would_have_run_the_code(tmp_path: Path) -> None:
    """Guards the test above: the payload does create the file when unpickled the unsafe way."""
    marker = _marker(tmp_path)
    pickle.loads(pickle.dumps(_payloads(marker)["os.system"]))
    assert marker.exists()


def test_allow_list_is_exactly_numpy_reconstruction_and_containers() -> None:
    assert set(ALLOWED) == {
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.ndarray",
        "numpy.dtype",
        "builtins.dict",
        "builtins.list",
        "builtins.tuple",
        "builtins.set",
        "builtins.frozenset",
    }


def _hand_pickle(*ops: bytes) -> bytes:
    return b"\x80\x02" + b"".join(ops) + b"."


def test_allowed_names_cannot_be_abused() -> None:
    # numpy.ndarray called directly (a huge allocation): its stand-in is not callable.
    _refused(_object_npy(pickle.dumps(_Evil(np.ndarray, (10**12,)), protocol=3)), r"got TypeError")
    # _reconstruct of another class than ndarray.
    _refused(
        _object_npy(pickle.dumps(_Evil(np.core.multiarray._reconstruct, dict, (0,), b"b"))), "_reconstruct of"
    )
    # ndarray state claiming far more elements than the file holds.
    _refused(_object_npy(_fake_array_pickle((10**12,), b"\x00")), r"elements do not fit the file")
    # an object array whose state lists fewer objects than its shape.
    _refused(_object_npy(_fake_array_pickle((10**9,), [None], np.dtype(object))), "one object per element")
    # a numpy scalar built from a buffer of the wrong size, or from a non-string dtype spec.
    _refused(
        _object_npy(pickle.dumps(_Evil(np.core.multiarray.scalar, np.dtype("<i8"), b"\x05"))), "numpy scalar"
    )
    _refused(_object_npy(pickle.dumps(_Evil(np.dtype, 5))), "dtype from int")


class _FakeArray:
    """Pickles like an ndarray whose __setstate__ gets an arbitrary state."""

    def __init__(self, state: tuple[Any, ...]) -> None:
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        return np.core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), self.state


def _fake_array_pickle(shape: tuple[int, ...], raw: Any, dtype: np.dtype | None = None) -> bytes:
    return pickle.dumps(_FakeArray((1, shape, dtype or np.dtype("u1"), False, raw)), protocol=3)


def test_numpy_scalars_and_containers_in_the_dict() -> None:
    events = _events(width=np.int64(7), height=np.uint16(5))
    events["extra"] = ({1, 2}, frozenset({3}), [np.float32(1.5)], (1, "a"))
    stream = parse_events(_npy(events), limits=LIMITS)
    assert (stream.width, stream.height) == (7, 5)


@pytest.mark.parametrize("protocol", [3, 4])  # np.save writes protocol 3
def test_pickle_protocols_numpy_writes(protocol: int) -> None:
    payload = pickle.dumps(np.array(_events(), dtype=object), protocol=protocol)
    stream = parse_events(_object_npy(payload), limits=LIMITS)
    np.testing.assert_array_equal(stream.t, _events()["t"])


# --- frames -----------------------------------------------------------------------------------


def _stream(x: list[int], y: list[int], p: list[int], width: int = 4, height: int = 3) -> EventStream:
    n = len(x)
    return EventStream(
        np.array(x, np.int64),
        np.array(y, np.int64),
        np.arange(n, dtype=np.int64),
        np.array(p, np.int8),
        width,
        height,
    )


def _reference_frames(x: np.ndarray, y: np.ndarray, p: np.ndarray, n: int) -> list[np.ndarray]:
    """EventGPT's common/common.py get_event_images_list + generate_event_image, as released."""
    frames = []
    per = len(x) // n
    for i in range(n):
        s, e = i * per, (i + 1) * per if i < n - 1 else len(x)
        xs, ys, ps = x[s:e], y[s:e], p[s:e]
        image = np.ones((ys.max() + 1, xs.max() + 1, 3), dtype=np.uint8) * 255
        for x_, y_, p_ in zip(xs, ys, ps, strict=True):
            image[y_, x_] = np.array([0, 0, 255]) if p_ == 0 else np.array([255, 0, 0])
        frames.append(image)
    return frames


def test_frames_known_answer() -> None:
    # 11 events, 5 frames: chunks of 2, 2, 2, 2 and the remainder 3.
    x = [0, 1, 2, 2, 0, 0, 3, 3, 1, 1, 1]
    y = [0, 0, 1, 1, 2, 2, 0, 2, 0, 0, 0]
    p = [1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0]
    frames = event_frames(_stream(x, y, p), num_frames=5)
    assert [f.shape for f in frames] == [(1, 2, 3), (2, 3, 3), (3, 1, 3), (3, 4, 3), (1, 2, 3)]
    assert all(f.dtype == np.uint8 for f in frames)
    assert frames[0].tolist() == [[RED, BLUE]]
    assert frames[1][1, 2].tolist() == RED  # (2, 1): p=0 then p=1, the later wins
    assert frames[1][0].tolist() == [WHITE] * 3
    assert frames[2][:, 0].tolist() == [WHITE, WHITE, BLUE]  # (0, 2): p=1 then p=0
    assert frames[3][0, 3].tolist() == BLUE and frames[3][2, 3].tolist() == RED
    assert frames[4].tolist() == [[WHITE, BLUE]]  # (1, 0) three times: 0, 1, 0


def test_minus_one_polarity_is_red_unless_asked() -> None:
    """EventGPT paints p == 0 blue and every other value red, so a -1/1 stream is all red."""
    signed = _stream([0, 1, 2, 0, 1], [0, 0, 0, 1, 1], [-1, 1, -1, 1, -1])
    (seed,) = event_frames(signed, num_frames=1)
    assert seed[0].tolist() == [RED, RED, RED] and seed[1, :2].tolist() == [RED, RED]
    (blue,) = event_frames(signed, num_frames=1, negative="zero_or_negative")
    assert blue[0].tolist() == [BLUE, RED, BLUE] and blue[1, :2].tolist() == [RED, BLUE]
    (zero_one,) = event_frames(_stream([0, 1, 2, 0, 1], [0, 0, 0, 1, 1], [0, 1, 0, 1, 0]), num_frames=1)
    np.testing.assert_array_equal(zero_one, blue)  # 0/1 streams: both rules agree
    with pytest.raises(ValueError, match="negative: expected"):
        event_frames(signed, num_frames=1, negative="sign")  # type: ignore[arg-type]


def test_frames_on_the_sensor_canvas_stack() -> None:
    frames = event_frames(
        _stream([0, 1, 2, 2, 0], [0, 0, 1, 1, 2], [1, 0, 0, 1, 1]), num_frames=2, canvas="sensor"
    )
    stacked = np.stack(frames)
    assert stacked.shape == (2, 3, 4, 3)
    assert stacked[0, 0, :2].tolist() == [RED, BLUE]
    assert int((stacked[0] != 255).any(axis=-1).sum()) == 2
    assert stacked[1, 1, 2].tolist() == RED and stacked[1, 2, 0].tolist() == RED


def test_fewer_events_than_frames() -> None:
    with pytest.raises(InvalidArgumentError, match=r"expected at least 5 events \(one per frame\), got 4"):
        event_frames(_stream([0, 1, 2, 3], [0, 0, 0, 0], [0, 1, 0, 1]), num_frames=5)
    assert len(event_frames(_stream([0] * 5, [0] * 5, [1] * 5), num_frames=5)) == 5


@pytest.mark.parametrize(
    ("n", "frames", "size"), [(5, 5, (4, 3)), (103, 5, (17, 9)), (2000, 5, (64, 48)), (999, 7, (8, 8))]
)
def test_frames_match_eventgpt_loop(n: int, frames: int, size: tuple[int, int]) -> None:
    stream = parse_events(make_events(n, *size, seed=n), limits=LIMITS)
    ours = event_frames(stream, num_frames=frames)
    reference = _reference_frames(stream.x, stream.y, stream.p, frames)
    assert len(ours) == frames
    for got, want in zip(ours, reference, strict=True):
        np.testing.assert_array_equal(got, want)


def test_an_encrypted_npz_member_is_refused() -> None:
    """Found by tests/reliability/test_fuzz_decoders.py: zipfile raised RuntimeError ("password
    required") for a member flagged encrypted."""
    data = bytearray(make_events(40, 16, 12, form="npz"))
    central = data.index(b"PK\x01\x02")
    data[central + 8] |= 0x01  # general purpose flag bit 0: encrypted
    with pytest.raises(InvalidArgumentError, match="expected unencrypted members"):
        parse_events(bytes(data), limits=EventLimits())
