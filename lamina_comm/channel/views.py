"""Tensors in and out of channel slots.

Received tensors are numpy views over slot memory that remember their wire
dtype (numpy has no bfloat16); torch tensors share that memory; an outgoing
tensor is described once (address, shape, dtype, and for a strided view its
rows) and staged here only when it is not host memory in rows (device
tensors, views with no row structure).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .. import dtypes
from ..errors import InvalidArgumentError
from .spec import MAX_NDIM

# Looked up per tensor on the send path: plain dicts, built once from lamina_comm.dtypes.
_STORAGE = {name: dtypes.numpy_storage(name) for name in dtypes.NAMES}
# An unmarked uint16 array is not bfloat16: as_bfloat16() marks those.
_NAME_BY_STORAGE = {storage: name for name, storage in _STORAGE.items() if name != "bfloat16"}


class TensorView(np.ndarray):
    """A numpy view over slot memory that remembers the wire dtype.

    numpy has no bfloat16, so bfloat16 tensors arrive as uint16 arrays with
    ``dtype_name == "bfloat16"``; :func:`to_torch` turns them into real
    torch.bfloat16 tensors without copying.
    """

    _wire: str | None = None

    def __array_finalize__(self, parent: Any) -> None:
        # Views keep the wire name only while they keep the storage dtype.
        wire = getattr(parent, "_wire", None)
        self._wire = wire if wire is not None and parent.dtype == self.dtype else None

    @property
    def dtype_name(self) -> str:
        return self._wire or self.dtype.name


def as_bfloat16(bits: np.ndarray) -> TensorView:
    """Mark a uint16 array of raw bfloat16 bits so send() ships it as bfloat16."""
    if bits.dtype != np.uint16:
        raise InvalidArgumentError(f"bfloat16 bits must be a uint16 array, not {bits.dtype}")
    return _as_tensor_view(bits, "bfloat16")


def _as_tensor_view(arr: np.ndarray, wire_dtype: str) -> TensorView:
    view = arr.view(TensorView)
    view._wire = wire_dtype
    return view


def _torch():
    import torch  # imported on demand: the channel works without torch
    return torch


def to_torch(arr: np.ndarray) -> Any:
    """A torch tensor sharing memory with a (Tensor)View; bfloat16 metadata honoured."""
    torch = _torch()
    if hasattr(arr, "__cuda_array_interface__") and not isinstance(arr, np.ndarray):  # a DeviceSlotView
        tensor = torch.as_tensor(arr, device=f"cuda:{arr.region.device}")
        return tensor.view(torch.bfloat16) if arr.dtype_name == "bfloat16" else tensor
    base = np.asarray(arr)
    tensor = torch.from_numpy(base)
    if getattr(arr, "dtype_name", None) == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor


def _is_torch(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "data_ptr")


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    """What the sender needs to know about one outgoing tensor."""

    obj: Any
    dtype_name: str
    shape: tuple[int, ...]
    nbytes: int
    address: int | None  # host memory, contiguous or in rows; else None (must be staged)
    rows: int = 0  # > 1: a strided view of nbytes // rows bytes per row, row_stride apart
    row_stride: int = 0


_MAX_ROWS = 2**32 - 1


def _rows(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> tuple[int, int] | None:
    """(rows, row_stride) of a view made of equally spaced contiguous rows; (0, 0) if contiguous.

    A column block of a wider tensor (q out of a fused qkv) is such a view:
    the native side sends it as a gather list of its rows, without a copy.
    None: no such structure (transposed, negative or overlapping strides).
    """
    dims = [(n, st) for n, st in zip(shape, strides) if n != 1]
    contiguous_bytes, k = itemsize, len(dims)
    while k > 0 and dims[k - 1][1] == contiguous_bytes:  # the contiguous tail is one row
        contiguous_bytes *= dims[k - 1][0]
        k -= 1
    if k == 0 or contiguous_bytes == 0:
        return 0, 0
    step = dims[k - 1][1]
    if step < contiguous_bytes:
        return None
    rows, expected = 1, step
    for j in range(k - 1, -1, -1):  # the leading dimensions must flatten into one
        n, st = dims[j]
        if st != expected:
            return None
        rows *= n
        expected *= n
    return (rows, step) if rows <= _MAX_ROWS else None


def _describe(obj: Any) -> _TensorInfo:
    cached = getattr(obj, "_lamina_info", None)  # a send_buffers() view: described once
    if cached is not None and cached.shape == tuple(obj.shape):  # (numpy lets a view be reshaped in place)
        return cached
    if _is_torch(obj):
        info = _describe_torch(obj)
    elif hasattr(obj, "__cuda_array_interface__"):
        return _TensorInfo(obj, "", (), 0, None)  # device memory (cupy, ...): the channel's device path
    else:
        info = _describe_numpy(obj)
    if len(info.shape) > MAX_NDIM:
        raise InvalidArgumentError(f"tensors may have at most {MAX_NDIM} dimensions, got {info.shape}")
    return info


def _describe_torch(t: Any) -> _TensorInfo:
    name = dtypes.canonical(t.dtype)
    size = t.element_size()
    nbytes = t.numel() * size
    shape = tuple(t.shape)
    if t.device.type != "cpu":
        return _TensorInfo(t, name, shape, nbytes, None)
    if t.is_contiguous():
        return _TensorInfo(t, name, shape, nbytes, t.data_ptr())
    rows = _rows(shape, tuple(st * size for st in t.stride()), size)
    if rows is None:
        return _TensorInfo(t, name, shape, nbytes, None)
    return _TensorInfo(t, name, shape, nbytes, t.data_ptr(), *rows)


def _describe_numpy(obj: Any) -> _TensorInfo:
    arr = obj if isinstance(obj, np.ndarray) else np.asarray(obj)
    name = getattr(arr, "_wire", None) or _NAME_BY_STORAGE.get(arr.dtype) or dtypes.canonical(arr.dtype)
    if _STORAGE[name] != arr.dtype:
        raise InvalidArgumentError(f"array stored as {arr.dtype} cannot carry {name}")
    address = arr.__array_interface__["data"][0]
    if arr.flags.c_contiguous:
        return _TensorInfo(arr, name, tuple(arr.shape), arr.nbytes, address)
    rows = _rows(arr.shape, arr.strides, arr.itemsize)
    if rows is None:
        return _TensorInfo(arr, name, tuple(arr.shape), arr.nbytes, None)
    return _TensorInfo(arr, name, tuple(arr.shape), arr.nbytes, address, *rows)


def _copy_into(dst: np.ndarray, info: _TensorInfo) -> None:
    """The one staging copy: source tensor into slot memory (dst has the storage dtype)."""
    if _is_torch(info.obj):
        target = to_torch(_as_tensor_view(dst, info.dtype_name))
        target.copy_(info.obj)  # also takes strided or device tensors
    else:
        np.copyto(dst, info.obj, casting="no")
