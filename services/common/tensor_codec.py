"""Tensors on the wire: raw little-endian bytes plus a KServe v2 dtype name and a shape.

numpy covers every dtype but BF16, which numpy lacks; `tensor_to_torch` reads BF16 straight
into a torch tensor. Decoding validates the byte count against the shape and dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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


def array_to_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """Encode a numpy array (any byte order or layout) as a Tensor message."""
    name = dtype_name(array.dtype)
    data = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[name]).tobytes()
    return tensor_pb2.Tensor(dtype=name, shape=list(array.shape), data=data)


def _check(msg: tensor_pb2.Tensor, what: str) -> None:
    if msg.dtype not in _ITEMSIZE:
        raise InvalidArgumentError(f"{what}: dtype expected one of {sorted(_ITEMSIZE)}, got {msg.dtype!r}")
    if any(d < 0 for d in msg.shape):
        raise InvalidArgumentError(f"{what}: shape must not have negative sizes, got {list(msg.shape)}")
    expected = int(np.prod(msg.shape, dtype=np.int64)) * _ITEMSIZE[msg.dtype]
    if len(msg.data) != expected:
        raise InvalidArgumentError(
            f"{what}: expected {expected} bytes for {msg.dtype}{list(msg.shape)}, got {len(msg.data)}"
        )


def tensor_to_array(msg: tensor_pb2.Tensor, *, what: str = "tensor") -> np.ndarray:
    """Decode a Tensor message into a read-only numpy array (no copy). BF16 is refused."""
    _check(msg, what)
    if msg.dtype == "BF16":
        raise InvalidArgumentError(f"{what}: BF16 has no numpy dtype; decode it with tensor_to_torch")
    return np.frombuffer(msg.data, dtype=NUMPY_DTYPES[msg.dtype]).reshape(tuple(msg.shape))


def tensor_to_torch(msg: tensor_pb2.Tensor, *, what: str = "tensor") -> torch.Tensor:
    """Decode a Tensor message into a torch tensor (one copy), BF16 included."""
    import torch

    _check(msg, what)
    shape = tuple(msg.shape)
    if len(msg.data) == 0:
        dtype = (
            torch.bfloat16
            if msg.dtype == "BF16"
            else torch.from_numpy(np.empty(0, NUMPY_DTYPES[msg.dtype])).dtype
        )
        return torch.empty(shape, dtype=dtype)
    if msg.dtype == "BF16":
        return torch.frombuffer(bytearray(msg.data), dtype=torch.bfloat16).reshape(shape)
    return torch.from_numpy(tensor_to_array(msg, what=what).copy())


def torch_to_tensor(t: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode a torch tensor (BF16 included) as a Tensor message."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        data = t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
        return tensor_pb2.Tensor(dtype="BF16", shape=list(t.shape), data=data)
    return array_to_tensor(t.numpy())
