"""Tensors on the wire: raw little-endian bytes plus a KServe v2 dtype name and a shape.

numpy covers every dtype but BF16, which numpy lacks; `tensor_to_torch` reads BF16 straight
into a torch tensor. Decoding validates the byte count against the shape and dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from modalmesh.v1 import tensor_pb2
from services.common.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

NUMPY_DTYPES: dict[str, np.dtype] = {
    "FP64": np.dtype("<f8"),
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"),
    "INT16": np.dtype("<i2"),
    "INT8": np.dtype("i1"),
    "UINT8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_ITEMSIZE = {name: dt.itemsize for name, dt in NUMPY_DTYPES.items()} | {"BF16": 2}
_NAME_OF_NUMPY = {dt.newbyteorder("=").str: name for name, dt in NUMPY_DTYPES.items()}


def dtype_name(dtype: np.dtype) -> str:
    """The KServe v2 name of a numpy dtype, e.g. float32 -> "FP32"."""
    try:
        return _NAME_OF_NUMPY[np.dtype(dtype).newbyteorder("=").str]
    except KeyError:
        raise InvalidArgumentError(
            f"tensor dtype: expected one of {sorted(NUMPY_DTYPES)}, got {np.dtype(dtype)}"
        ) from None


def tensor_fields(array: np.ndarray) -> dict[str, Any]:
    """A Tensor message's fields for a numpy array (any byte order or layout).

    Give them straight to the enclosing message (`MediaFeatures(features=tensor_fields(a))`):
    a Tensor built first and then nested is copied once more into its parent.
    """
    name = dtype_name(array.dtype)
    data = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[name]).tobytes()
    return {"dtype": name, "shape": list(array.shape), "data": data}


def array_to_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """Encode a numpy array (any byte order or layout) as a Tensor message."""
    return tensor_pb2.Tensor(**tensor_fields(array))


def _checked_data(msg: tensor_pb2.Tensor, what: str) -> bytes:
    """The message's bytes once checked against its dtype and shape.

    Each read of a bytes field copies it out of the message, so it is read here once.
    """
    if msg.dtype not in _ITEMSIZE:
        raise InvalidArgumentError(f"{what}: dtype expected one of {sorted(_ITEMSIZE)}, got {msg.dtype!r}")
    if any(d < 0 for d in msg.shape):
        raise InvalidArgumentError(f"{what}: shape must not have negative sizes, got {list(msg.shape)}")
    data = msg.data
    expected = int(np.prod(msg.shape, dtype=np.int64)) * _ITEMSIZE[msg.dtype]
    if len(data) != expected:
        raise InvalidArgumentError(
            f"{what}: expected {expected} bytes for {msg.dtype}{list(msg.shape)}, got {len(data)}"
        )
    return data


def tensor_to_array(msg: tensor_pb2.Tensor, *, what: str = "tensor") -> np.ndarray:
    """Decode a Tensor message into a read-only numpy array (no copy beyond reading the field).
    BF16 is refused."""
    data = _checked_data(msg, what)
    if msg.dtype == "BF16":
        raise InvalidArgumentError(f"{what}: BF16 has no numpy dtype; decode it with tensor_to_torch")
    return np.frombuffer(data, dtype=NUMPY_DTYPES[msg.dtype]).reshape(tuple(msg.shape))


def tensor_to_torch(msg: tensor_pb2.Tensor, *, what: str = "tensor") -> torch.Tensor:
    """Decode a Tensor message into a writable torch tensor (one copy after reading the field),
    BF16 included."""
    import torch

    data = _checked_data(msg, what)
    shape = tuple(msg.shape)
    if msg.dtype == "BF16":
        dtype = torch.bfloat16
    else:
        dtype = torch.from_numpy(np.empty(0, NUMPY_DTYPES[msg.dtype])).dtype
    if len(data) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def torch_tensor_fields(t: torch.Tensor) -> dict[str, Any]:
    """A Tensor message's fields for a torch tensor, BF16 included (see `tensor_fields`)."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        data = t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
        return {"dtype": "BF16", "shape": list(t.shape), "data": data}
    return tensor_fields(t.numpy())


def torch_to_tensor(t: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode a torch tensor (BF16 included) as a Tensor message."""
    return tensor_pb2.Tensor(**torch_tensor_fields(t))
