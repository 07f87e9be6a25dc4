"""Reading untrusted `.npy` / `.npz` bytes without running code or allocating what the file claims.

`read_npy` parses the header with numpy's own (literal-eval based) header readers and builds the
array from the payload with `np.frombuffer`, after checking that the payload is exactly as long
as the header says. Object arrays (what `np.save` writes for a dict) are pickles; they go through
`RestrictedUnpickler`, whose `find_class` knows a fixed allow-list and nothing else, and whose
numpy hooks check every size before allocating. `read_npz` reads the zip members itself, bounded
by their declared sizes, and parses each with `read_npy` (no pickles there).

Every failure is an `InvalidArgumentError` (or `PayloadTooLargeError`) whose message starts with
the `what` label the caller passes, e.g. "event file: ...".
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from numpy.lib import format as npformat

from services.common.errors import InvalidArgumentError, PayloadTooLargeError

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
MAX_HEADER_BYTES = 10_000  # numpy's own default limit for np.load
MAX_NPZ_MEMBERS = 16
_MAX_DEPTH = 8  # nesting of containers inside an unpickled object


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list; `args[0]` is "module.name"."""


class _NdarrayToken:
    """Stands for `numpy.ndarray` inside a pickle: only `_reconstruct` accepts it; it cannot be called."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayToken()


class _PendingArray:
    """What `_reconstruct` gives the unpickler: a shell that the BUILD opcode fills via
    `__setstate__`, with the sizes checked before anything is allocated."""

    __slots__ = ("array", "budget")

    def __init__(self, budget: int) -> None:
        self.array: np.ndarray | None = None
        self.budget = budget

    def __setstate__(self, state: Any) -> None:
        # ndarray.__reduce__ state: (version, shape, dtype, is_fortran, raw); version is optional.
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError(f"array state: expected a 4- or 5-tuple, got {type(state).__name__}")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(dtype, np.dtype) or not isinstance(shape, tuple):
            raise ValueError("array state: expected (shape tuple, dtype)")
        if not all(isinstance(n, int) and n >= 0 for n in shape) or len(shape) > 32:
            raise ValueError(f"array state: bad shape {shape!r}")
        count = math.prod(shape)
        order: Literal["C", "F"] = "F" if fortran else "C"
        if dtype.hasobject:
            if dtype != np.dtype(object) or not isinstance(raw, list) or len(raw) != count:
                raise ValueError("array state: expected a list with one object per element")
            array = np.empty(count, dtype=object)
            for i, item in enumerate(raw):
                array[i] = item
        else:
            if isinstance(raw, str):  # Python 2 pickles carry the bytes as a latin-1 str
                raw = raw.encode("latin1")
            if not isinstance(raw, bytes) or count * dtype.itemsize > self.budget:
                raise ValueError(f"array state: {count} x {dtype} elements do not fit the file")
            if len(raw) != count * dtype.itemsize:
                raise ValueError(f"array state: expected {count * dtype.itemsize} bytes, got {len(raw)}")
            array = np.frombuffer(raw, dtype=dtype).copy() if count else np.empty(0, dtype=dtype)
        self.array = array.reshape(shape, order=order)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays, numpy scalars and plain containers, and nothing else.

    `find_class` maps the allowed (module, name) pairs to checked stand-ins (see ALLOWED); any
    other global raises `pickle.UnpicklingError` before it is imported, so a pickle naming
    `os.system`, `builtins.eval`, `subprocess.Popen` or `functools.partial` never reaches it.
    """

    def __init__(self, file: io.BytesIO, *, budget: int) -> None:
        super().__init__(file, encoding="ASCII", fix_imports=False)
        self._budget = budget
        self._allowed: dict[tuple[str, str], Any] = {
            **{(m, "_reconstruct"): self._reconstruct for m in _MULTIARRAY},
            **{(m, "scalar"): _scalar for m in _MULTIARRAY},
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): _dtype,
            **{(m, c.__name__): c for m in ("builtins", "__builtin__") for c in _CONTAINERS},
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent id")

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> _PendingArray:
        if subtype is not _NDARRAY:
            raise pickle.UnpicklingError(f"_reconstruct of {subtype!r}")
        return _PendingArray(self._budget)


_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")
_CONTAINERS: tuple[type, ...] = (dict, list, tuple, set, frozenset)
# The allow-list, as (module, name) pairs; documented in services/models/media/events.py.
ALLOWED: tuple[str, ...] = (
    *(f"{m}._reconstruct" for m in _MULTIARRAY),
    *(f"{m}.scalar" for m in _MULTIARRAY),
    "numpy.ndarray",
    "numpy.dtype",
    *(f"builtins.{c.__name__}" for c in _CONTAINERS),
)


def _dtype(obj: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(obj, str):
        raise pickle.UnpicklingError(f"dtype from {type(obj).__name__}")
    return np.dtype(obj, align=bool(align), copy=bool(copy))


def _scalar(dtype: Any, data: Any = None) -> Any:
    if (
        not isinstance(dtype, np.dtype)
        or dtype.hasobject
        or not isinstance(data, bytes)
        or len(data) != dtype.itemsize
    ):
        raise pickle.UnpicklingError("numpy scalar with a bad dtype or data")
    return np.frombuffer(data, dtype=dtype)[0]


def _finish(obj: Any, depth: int = 0) -> Any:
    """Replace every `_PendingArray` by its array, recursively; refuse shells never filled."""
    if depth > _MAX_DEPTH:
        raise pickle.UnpicklingError("nesting too deep")
    if isinstance(obj, _PendingArray):
        if obj.array is None:
            raise pickle.UnpicklingError("array without state")
        obj = obj.array
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        for index in np.ndindex(obj.shape):
            obj[index] = _finish(obj[index], depth + 1)
    elif isinstance(obj, dict):
        return {_finish(k, depth + 1): _finish(v, depth + 1) for k, v in obj.items()}
    elif isinstance(obj, list | tuple):
        return type(obj)(_finish(v, depth + 1) for v in obj)
    return obj


def unpickle(payload: bytes, *, what: str) -> Any:
    """Unpickle `payload` with `RestrictedUnpickler`; anything refused or broken -> InvalidArgumentError."""
    unpickler = RestrictedUnpickler(io.BytesIO(payload), budget=len(payload))
    try:
        return _finish(unpickler.load())
    except _Refused as e:
        raise InvalidArgumentError(f"{what}: pickled object of type {e} is not allowed") from None
    except Exception as e:  # a malformed pickle raises almost anything
        raise InvalidArgumentError(
            f"{what}: expected a well-formed pickle of numpy arrays, got {type(e).__name__}: {e}"
        ) from None


def read_npy(data: bytes, *, what: str, allow_pickle: bool) -> Any:
    """Parse `.npy` bytes: a numeric/structured ndarray, or (object dtype, `allow_pickle`) the
    restricted-unpickled object the file holds (what `np.load(...)` would return)."""
    fp = io.BytesIO(data)
    try:
        version = npformat.read_magic(fp)
        readers: dict[tuple[int, int], Callable[..., Any]] = {
            (1, 0): npformat.read_array_header_1_0,
            (2, 0): npformat.read_array_header_2_0,
        }
        if version not in readers:
            raise ValueError(f"format version {version[0]}.{version[1]} (expected 1.0 or 2.0)")
        shape, fortran, dtype = readers[version](fp, max_header_size=MAX_HEADER_BYTES)
    except Exception as e:  # the header parser raises ValueError, SyntaxError, TokenError, TypeError
        raise InvalidArgumentError(f"{what}: expected a valid .npy header, got an error: {e}") from None
    payload = data[fp.tell() :]
    if dtype.hasobject:
        if dtype != np.dtype(object):
            raise InvalidArgumentError(f"{what}: expected numeric fields, got dtype {dtype} holding objects")
        if not allow_pickle:
            raise InvalidArgumentError(f"{what}: expected a numeric array, got an object (pickled) array")
        return unpickle(payload, what=what)
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if len(payload) != expected:
        raise InvalidArgumentError(
            f"{what}: expected {expected} bytes of array data for shape {shape} {dtype}, got {len(payload)}"
        )
    flat = np.frombuffer(payload, dtype=dtype) if count else np.empty(0, dtype=dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


def read_npz(data: bytes, *, what: str, max_bytes: int) -> dict[str, np.ndarray]:
    """Parse `.npz` bytes into {name: array}, never pickles, reading at most `max_bytes` in all."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, NotImplementedError, EOFError) as e:
        # NotImplementedError: a central directory asking for a zip version zipfile lacks (6.4)
        raise InvalidArgumentError(f"{what}: expected a valid .npz (zip) file, got an error: {e}") from None
    if len(infos) > MAX_NPZ_MEMBERS:
        raise InvalidArgumentError(f"{what}: expected at most {MAX_NPZ_MEMBERS} arrays, got {len(infos)}")
    total = sum(info.file_size for info in infos)
    if total > max_bytes:
        raise PayloadTooLargeError(f"{what}: expected at most {max_bytes} bytes uncompressed, got {total}")
    arrays: dict[str, np.ndarray] = {}
    for info in infos:
        name = info.filename.removesuffix(".npy")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # what np.savez / np.savez_compressed write; bzip2 and lzma decompress without a bound
            raise InvalidArgumentError(
                f"{what}: expected stored or deflated members, got compression {info.compress_type} for {name!r}"
            )
        if info.flag_bits & 0x1:  # zipfile would ask for a password (RuntimeError)
            raise InvalidArgumentError(f"{what}: expected unencrypted members, got an encrypted {name!r}")
        try:
            member = _read_member(archive, info)
        except (zipfile.BadZipFile, ValueError, OSError, NotImplementedError, EOFError) as e:
            raise InvalidArgumentError(
                f"{what}: expected a readable .npz member {name!r}, got: {e}"
            ) from None
        arrays[name] = read_npy(member, what=f"{what} ({name})", allow_pickle=False)
    return arrays


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes, read in bounded chunks: zipfile stops at the declared `file_size` (checked
    against the total before) and checks the CRC, and each chunk decompresses at most 1 MiB."""
    with archive.open(info) as member:
        return b"".join(iter(lambda: member.read(1 << 20), b""))
