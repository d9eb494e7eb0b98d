"""Build tests/mock_libcuda.c, a host-memory stand-in for libcuda (see its header comment)."""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess

SOURCE = pathlib.Path(__file__).with_name("mock_libcuda.c")


def build_mock_libcuda(directory: str | os.PathLike) -> str | None:
    """Path of a freshly built mock libcuda.so.1 in directory; None without gcc.

    LAMINA_TEST_MOCK_LIBCUDA names one built already (tools/rxe-test.sh builds it on the host: compiling
    inside the emulated guest is slow)."""
    prebuilt = os.environ.get("LAMINA_TEST_MOCK_LIBCUDA")
    if prebuilt and os.path.exists(prebuilt):
        return prebuilt
    if shutil.which("gcc") is None:
        return None
    lib = pathlib.Path(directory) / "libcuda.so.1"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(lib), str(SOURCE), "-lpthread"],
                   check=True)
    return str(lib)


@contextlib.contextmanager
def mock_driver_in_process(monkeypatch, lib_path: str, *switches: str):
    """This process's CUDA is the mock at lib_path, with the MOCK_CUDA_* switches named set; yields device 0.
    Undone after, with everything else the caller patched on monkeypatch."""
    from lamina_comm.gpu import cuda
    monkeypatch.setenv("LAMINA_LIBCUDA", lib_path)
    for name in switches:
        monkeypatch.setenv(name, "1")
    monkeypatch.delenv("LAMINA_DISABLE_CUDA", raising=False)
    cuda._reset_for_tests()
    try:
        yield cuda.get_device(0)
    finally:
        monkeypatch.undo()
        cuda._reset_for_tests()


def assert_sent_through_the_slot(model, attention, array: "MockDeviceArray", value: int, timeout: float) -> None:
    """A stream-ordered send of a mock device array, filled with value, arrives intact and went through the
    send slot (the copy engine's path), not straight from device memory."""
    import numpy as np
    array.host[...] = value
    model.send([array], layer=1, microbatch=0, stream=0x77, timeout=timeout)
    with attention.recv(0, timeout=timeout) as got:
        assert np.all(got.tensors[0] == value)
    assert model.device_direct_messages == 0 and model.metrics.slot_messages == 1


class MockDeviceArray:
    """A typed array in the mock driver's "device" memory, handed over by ``__cuda_array_interface__`` as
    cupy does. ``host`` is the same memory seen from numpy (the mock's device memory is host memory).
    ``columns=(first, width)`` makes it a column block of the last axis (equally spaced rows: strided),
    over the memory of ``base`` when given."""

    def __init__(self, device, shape, dtype="uint8", *, base: "MockDeviceArray | None" = None, columns=None):
        import ctypes

        import numpy as np

        from lamina_comm.gpu import cuda
        self.dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.alloc = base.alloc if base is not None else cuda.DeviceAllocation(device, nbytes)
        memory = np.frombuffer((ctypes.c_char * max(nbytes, 1)).from_address(self.alloc.ptr), np.uint8)
        self.full = memory[:nbytes].view(self.dtype).reshape(tuple(shape))
        first, width = columns or (0, self.full.shape[-1])
        self.host = self.full[..., first:first + width]
        self._offset = first * self.dtype.itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        return self.host.shape

    @property
    def __cuda_array_interface__(self) -> dict:
        strided = self.host.shape != self.full.shape
        return {"shape": self.host.shape, "typestr": self.dtype.str, "data": (self.alloc.ptr + self._offset, False),
                "version": 3, "strides": self.full.strides if strided else None, "stream": None}
