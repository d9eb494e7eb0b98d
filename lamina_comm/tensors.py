"""Tensors in and out: find the memory behind an object, and view registered
memory as a numpy array or torch tensor without copying.

Accepted on the way in: anything with the buffer protocol (bytearray,
memoryview, numpy arrays), torch tensors, objects with
``__array_interface__`` and, through numpy, anything exporting DLPack on the
CPU. CUDA memory (``__cuda_array_interface__``, torch CUDA tensors) is
recognised and refused with a clear reason until the GPU tier lands.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import numpy as np

from ._bindings import ffi
from .errors import InvalidArgumentError, UnsupportedError


@dataclasses.dataclass(frozen=True)
class HostBuffer:
    """Address and size of contiguous host memory, plus what keeps it alive."""

    address: int
    nbytes: int
    writable: bool
    owner: Any  # referenced so the memory outlives the registration


def _from_torch(t: Any) -> HostBuffer:
    if t.device.type != "cpu":
        raise UnsupportedError(
            f"tensor lives on {t.device} and host memory is needed here: Context.register hands GPU "
            "memory to the GPU tier (lamina_comm.gpu, docs/gpu.md)")
    if not t.is_contiguous():
        raise InvalidArgumentError("tensor is not contiguous; call .contiguous() first")
    return HostBuffer(t.data_ptr(), t.numel() * t.element_size(), True, t)


def _from_array_interface(obj: Any) -> HostBuffer:
    arr = np.asarray(obj)
    if not arr.flags.c_contiguous:
        raise InvalidArgumentError("array is not C-contiguous; use np.ascontiguousarray first")
    return HostBuffer(arr.__array_interface__["data"][0], arr.nbytes, arr.flags.writeable, arr)


def _from_buffer_protocol(obj: Any) -> HostBuffer:
    view = memoryview(obj)
    if not view.c_contiguous:
        raise InvalidArgumentError("buffer is not C-contiguous")
    writable = not view.readonly
    cdata = ffi.from_buffer(obj, require_writable=writable)
    return HostBuffer(int(ffi.cast("uintptr_t", cdata)), view.nbytes, writable, (obj, cdata))


def host_buffer(obj: Any) -> HostBuffer:
    """Resolve obj to contiguous host memory, or raise a typed error saying why not."""
    if hasattr(obj, "__cuda_array_interface__"):
        raise UnsupportedError("CUDA memory where host memory is needed: Context.register hands CUDA memory "
                               "to the GPU tier (lamina_comm.gpu, docs/gpu.md)")
    mod = type(obj).__module__
    if mod.startswith("torch") and hasattr(obj, "data_ptr"):
        return _from_torch(obj)
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array_interface__"):
        return _from_array_interface(obj)
    try:
        return _from_buffer_protocol(obj)
    except TypeError:
        pass
    if hasattr(obj, "__dlpack__"):
        try:
            return _from_array_interface(np.from_dlpack(obj))
        except (TypeError, RuntimeError, BufferError) as exc:
            raise UnsupportedError(f"cannot import {type(obj).__name__} through DLPack: {exc}") from exc
    raise InvalidArgumentError(
        f"cannot register {type(obj).__name__}: it exposes neither the buffer protocol nor DLPack")


def numpy_view(address: int, nbytes: int, dtype: Any = np.uint8, shape: tuple[int, ...] | None = None,
               owner: Any = None) -> np.ndarray:
    """A numpy array over [address, address+nbytes), no copy. owner is kept alive by the array."""
    dtype = np.dtype(dtype)
    buf = ffi.buffer(ffi.cast("char *", address), nbytes)
    arr = np.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize)
    if shape is not None:
        arr = arr.reshape(shape)
    if owner is not None:
        # finalize holds its arguments until arr (and every view of it) dies.
        weakref.finalize(arr, _keep, owner)
    return arr


def _keep(_owner: Any) -> None:
    pass


def data_pointer(obj: Any) -> int:
    """Address of the first byte of a numpy array or torch tensor (for zero-copy checks)."""
    if hasattr(obj, "data_ptr"):
        return int(obj.data_ptr())
    return int(np.asarray(obj).__array_interface__["data"][0])
