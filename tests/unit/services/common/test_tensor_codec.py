import numpy as np
import pytest
import torch

from modalmesh.v1 import tensor_pb2
from services.common.errors import InvalidArgumentError
from services.common.tensor_codec import (
    array_to_tensor,
    dtype_name,
    tensor_to_array,
    tensor_to_torch,
    torch_to_tensor,
)


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float16, np.float64, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]
)
def test_numpy_round_trip(dtype):
    arr = (
        (np.arange(24).reshape(2, 3, 4) % 2 == 0)
        if dtype is np.bool_
        else np.arange(24, dtype=dtype).reshape(2, 3, 4)
    )
    msg = array_to_tensor(arr)
    assert list(msg.shape) == [2, 3, 4]
    assert len(msg.data) == arr.nbytes
    back = tensor_to_array(msg)
    assert back.dtype == arr.dtype and np.array_equal(back, arr)


def test_big_endian_and_non_contiguous_inputs_are_written_little_endian_row_major():
    arr = np.arange(6, dtype=">f4").reshape(2, 3).T  # big-endian, transposed view
    msg = array_to_tensor(arr)
    assert msg.dtype == "FP32"
    assert msg.data == np.ascontiguousarray(arr, dtype="<f4").tobytes()
    assert np.array_equal(tensor_to_array(msg), arr)


def test_survives_serialisation():
    arr = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    msg = tensor_pb2.Tensor.FromString(array_to_tensor(arr).SerializeToString())
    assert np.array_equal(tensor_to_array(msg), arr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_torch_round_trip_including_bf16(dtype):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).to(dtype)
    msg = torch_to_tensor(t)
    back = tensor_to_torch(msg)
    assert back.dtype == dtype and torch.equal(back, t)


def test_bf16_cannot_become_numpy():
    msg = torch_to_tensor(torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(InvalidArgumentError, match="BF16 has no numpy dtype"):
        tensor_to_array(msg)


def test_empty_tensor():
    msg = array_to_tensor(np.zeros((0, 64), np.float32))
    assert tensor_to_torch(msg).shape == (0, 64)


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (
            tensor_pb2.Tensor(dtype="FP32", shape=[2, 2], data=b"\0" * 15),
            r"features: expected 16 bytes for FP32\[2, 2\], got 15",
        ),
        (
            tensor_pb2.Tensor(dtype="FLOAT", shape=[1], data=b"\0" * 4),
            r"dtype expected one of .* got 'FLOAT'",
        ),
        (tensor_pb2.Tensor(dtype="FP32", shape=[-1], data=b""), "negative"),
    ],
)
def test_bad_tensors_are_refused_with_expected_and_got(msg, match):
    with pytest.raises(InvalidArgumentError, match=match):
        tensor_to_array(msg, what="features")
    with pytest.raises(InvalidArgumentError, match=match):
        tensor_to_torch(msg, what="features")


def test_unsupported_numpy_dtype():
    with pytest.raises(InvalidArgumentError, match="complex64"):
        dtype_name(np.dtype(np.complex64))
