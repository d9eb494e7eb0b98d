"""The CUDA driver API through ctypes: loaded at run time, never linked at build time.

Only what the GPU tier needs is bound: initialisation, devices and their
primary contexts (shared with torch / cupy, which use the primary context
too), streams, events, pinned host memory, async copies, stream memory
operations (cuStreamWaitValue32 / cuStreamWriteValue32), pointer queries and
the dma-buf export. Every call's CUresult is checked: a failure raises
:class:`CudaError` carrying the code, its name and cuGetErrorString's text.

Symbols are bound by their ABI names, i.e. what cuda.h's macros expand to
(``cuMemcpyDtoHAsync`` -> ``cuMemcpyDtoHAsync_v2``, ``cuStreamWaitValue32`` ->
``cuStreamWaitValue32_v2``, ...). ctypes releases the GIL around each call, so
a thread blocked in cuEventSynchronize does not hold up Python.

Without a driver (no libcuda.so.1, no device, LAMINA_DISABLE_CUDA=1) nothing
here raises at import time; :func:`status` says why CUDA is unavailable and
:func:`driver` raises :class:`CudaUnavailableError` with that reason.
"""
from __future__ import annotations

import ctypes
import os
import threading
from ctypes import POINTER, byref, c_char_p, c_float, c_int, c_size_t, c_uint, c_uint32, c_uint64, c_void_p
from typing import Any

from ..errors import LaminaError, UnsupportedError

# -- constants (cuda.h) ------------------------------------------------------
CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_NOT_READY = 600
CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712
CUDA_ERROR_NOT_SUPPORTED = 801

CU_STREAM_DEFAULT = 0x0
CU_STREAM_NON_BLOCKING = 0x1
CU_STREAM_LEGACY = 0x1        # handle of the legacy default stream
CU_STREAM_PER_THREAD = 0x2    # handle of the per-thread default stream

CU_EVENT_DEFAULT = 0x0
CU_EVENT_BLOCKING_SYNC = 0x1
CU_EVENT_DISABLE_TIMING = 0x2

CU_MEMHOSTALLOC_PORTABLE = 0x01
CU_MEMHOSTALLOC_DEVICEMAP = 0x02
CU_MEMHOSTALLOC_WRITECOMBINED = 0x04
CU_MEMHOSTREGISTER_PORTABLE = 0x01
CU_MEMHOSTREGISTER_DEVICEMAP = 0x02

CU_STREAM_WAIT_VALUE_GEQ = 0x0   # (int32_t)(*addr - value) >= 0, cyclic
CU_STREAM_WAIT_VALUE_EQ = 0x1
CU_STREAM_WAIT_VALUE_AND = 0x2
CU_STREAM_WAIT_VALUE_NOR = 0x3
CU_STREAM_WAIT_VALUE_FLUSH = 1 << 30
CU_STREAM_WRITE_VALUE_DEFAULT = 0x0

CU_POINTER_ATTRIBUTE_CONTEXT = 1
CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2
CU_POINTER_ATTRIBUTE_DEVICE_POINTER = 3
CU_POINTER_ATTRIBUTE_HOST_POINTER = 4
CU_POINTER_ATTRIBUTE_IS_MANAGED = 8
CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9
CU_POINTER_ATTRIBUTE_RANGE_START_ADDR = 11
CU_POINTER_ATTRIBUTE_RANGE_SIZE = 12

CU_MEMORYTYPE_HOST = 1
CU_MEMORYTYPE_DEVICE = 2
CU_MEMORYTYPE_ARRAY = 3
CU_MEMORYTYPE_UNIFIED = 4

CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY = 19
CU_DEVICE_ATTRIBUTE_PCI_BUS_ID = 33
CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING = 41
CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID = 50
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1 = 92
CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED = 116
CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_FLUSH_WRITES_OPTIONS = 117
CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = 124

CU_STREAM_CAPTURE_STATUS_NONE = 0
CU_STREAM_CAPTURE_STATUS_ACTIVE = 1
CU_STREAM_CAPTURE_STATUS_INVALIDATED = 2

CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD = 0x1
CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TARGET_CURRENT_CTX = 0
CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TO_OWNER = 100

# -- errors --------------------------------------------------------------------


class CudaError(LaminaError):
    """A driver call failed: ``code`` is the CUresult, ``name`` its enum name."""

    def __init__(self, message: str, code: int = -1, name: str = ""):
        super().__init__(message)
        self.code = code
        self.name = name


class CudaOutOfMemoryError(CudaError, MemoryError):
    pass


class CudaUnavailableError(UnsupportedError):
    """No usable CUDA driver or device here; the message says why."""


# -- binding table: our name -> (ABI symbols tried in order, argtypes) ----------
_P = POINTER
_SIGNATURES: dict[str, tuple[tuple[str, ...], list]] = {
    "cuInit": (("cuInit",), [c_uint]),
    "cuDriverGetVersion": (("cuDriverGetVersion",), [_P(c_int)]),
    "cuGetErrorString": (("cuGetErrorString",), [c_int, _P(c_char_p)]),
    "cuGetErrorName": (("cuGetErrorName",), [c_int, _P(c_char_p)]),
    "cuDeviceGetCount": (("cuDeviceGetCount",), [_P(c_int)]),
    "cuDeviceGet": (("cuDeviceGet",), [_P(c_int), c_int]),
    "cuDeviceGetName": (("cuDeviceGetName",), [c_char_p, c_int, c_int]),
    "cuDeviceGetAttribute": (("cuDeviceGetAttribute",), [_P(c_int), c_int, c_int]),
    "cuDevicePrimaryCtxRetain": (("cuDevicePrimaryCtxRetain",), [_P(c_void_p), c_int]),
    "cuDevicePrimaryCtxRelease": (("cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease"), [c_int]),
    "cuCtxGetCurrent": (("cuCtxGetCurrent",), [_P(c_void_p)]),
    "cuCtxSetCurrent": (("cuCtxSetCurrent",), [c_void_p]),
    "cuCtxPushCurrent": (("cuCtxPushCurrent_v2",), [c_void_p]),
    "cuCtxPopCurrent": (("cuCtxPopCurrent_v2",), [_P(c_void_p)]),
    "cuStreamCreate": (("cuStreamCreate",), [_P(c_void_p), c_uint]),
    "cuStreamDestroy": (("cuStreamDestroy_v2",), [c_void_p]),
    "cuStreamSynchronize": (("cuStreamSynchronize",), [c_void_p]),
    "cuStreamQuery": (("cuStreamQuery",), [c_void_p]),
    "cuStreamWaitEvent": (("cuStreamWaitEvent",), [c_void_p, c_void_p, c_uint]),
    "cuStreamIsCapturing": (("cuStreamIsCapturing",), [c_void_p, _P(c_int)]),
    "cuEventCreate": (("cuEventCreate",), [_P(c_void_p), c_uint]),
    "cuEventDestroy": (("cuEventDestroy_v2",), [c_void_p]),
    "cuEventRecord": (("cuEventRecord",), [c_void_p, c_void_p]),
    "cuEventQuery": (("cuEventQuery",), [c_void_p]),
    "cuEventSynchronize": (("cuEventSynchronize",), [c_void_p]),
    "cuEventElapsedTime": (("cuEventElapsedTime", "cuEventElapsedTime_v2"), [_P(c_float), c_void_p, c_void_p]),
    "cuMemAlloc": (("cuMemAlloc_v2",), [_P(c_uint64), c_size_t]),
    "cuMemFree": (("cuMemFree_v2",), [c_uint64]),
    "cuMemGetInfo": (("cuMemGetInfo_v2",), [_P(c_size_t), _P(c_size_t)]),
    "cuMemHostAlloc": (("cuMemHostAlloc",), [_P(c_void_p), c_size_t, c_uint]),
    "cuMemFreeHost": (("cuMemFreeHost",), [c_void_p]),
    "cuMemHostRegister": (("cuMemHostRegister_v2",), [c_void_p, c_size_t, c_uint]),
    "cuMemHostUnregister": (("cuMemHostUnregister",), [c_void_p]),
    "cuMemHostGetDevicePointer": (("cuMemHostGetDevicePointer_v2",), [_P(c_uint64), c_void_p, c_uint]),
    "cuMemcpyDtoHAsync": (("cuMemcpyDtoHAsync_v2",), [c_void_p, c_uint64, c_size_t, c_void_p]),
    "cuMemcpyHtoDAsync": (("cuMemcpyHtoDAsync_v2",), [c_uint64, c_void_p, c_size_t, c_void_p]),
    "cuMemcpyDtoDAsync": (("cuMemcpyDtoDAsync_v2",), [c_uint64, c_uint64, c_size_t, c_void_p]),
    "cuMemsetD8Async": (("cuMemsetD8Async",), [c_uint64, ctypes.c_ubyte, c_size_t, c_void_p]),
    "cuStreamWaitValue32": (("cuStreamWaitValue32_v2", "cuStreamWaitValue32"), [c_void_p, c_uint64, c_uint32, c_uint]),
    "cuStreamWriteValue32": (("cuStreamWriteValue32_v2", "cuStreamWriteValue32"),
                             [c_void_p, c_uint64, c_uint32, c_uint]),
    "cuPointerGetAttribute": (("cuPointerGetAttribute",), [c_void_p, c_int, c_uint64]),
    "cuMemGetAddressRange": (("cuMemGetAddressRange_v2",), [_P(c_uint64), _P(c_size_t), c_uint64]),
    "cuMemGetHandleForAddressRange": (("cuMemGetHandleForAddressRange",),
                                      [c_void_p, c_uint64, c_size_t, c_int, ctypes.c_ulonglong]),
    "cuFlushGPUDirectRDMAWrites": (("cuFlushGPUDirectRDMAWrites",), [c_int, c_int]),
    "cuLaunchHostFunc": (("cuLaunchHostFunc",), [c_void_p, c_void_p, c_void_p]),
    "cuMemcpy2DAsync": (("cuMemcpy2DAsync_v2",), [c_void_p, c_void_p]),
}
# Needed for anything to work; the rest are reported as missing features when used.
_REQUIRED = ("cuInit", "cuDriverGetVersion", "cuGetErrorString", "cuGetErrorName", "cuDeviceGetCount",
             "cuDeviceGet", "cuDeviceGetName", "cuDeviceGetAttribute", "cuDevicePrimaryCtxRetain",
             "cuCtxGetCurrent", "cuCtxSetCurrent", "cuCtxPushCurrent", "cuCtxPopCurrent", "cuStreamCreate",
             "cuStreamDestroy", "cuStreamSynchronize", "cuStreamQuery", "cuStreamWaitEvent", "cuEventCreate",
             "cuEventDestroy", "cuEventRecord", "cuEventQuery", "cuEventSynchronize", "cuMemHostAlloc",
             "cuMemFreeHost", "cuMemHostGetDevicePointer", "cuMemcpyDtoHAsync", "cuMemcpyHtoDAsync",
             "cuPointerGetAttribute")


class Driver:
    """libcuda with every function of the table bound; call(name, *args) checks the result."""

    version: int = 0
    device_count: int = 0

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.path = path
        self._fns: dict[str, Any] = {}
        self.symbols: dict[str, str] = {}
        for name, (symbols, argtypes) in _SIGNATURES.items():
            for sym in symbols:
                fn = getattr(lib, sym, None)
                if fn is not None:
                    fn.argtypes = argtypes
                    fn.restype = c_int
                    self._fns[name] = fn
                    self.symbols[name] = sym
                    break
        missing = [n for n in _REQUIRED if n not in self._fns]
        if missing:
            raise CudaUnavailableError(f"{path} lacks {', '.join(missing)} (driver too old?)")

    def has(self, name: str) -> bool:
        return name in self._fns

    def error_text(self, code: int) -> tuple[str, str]:
        name, text = c_char_p(), c_char_p()
        if self._fns["cuGetErrorName"](code, byref(name)) != CUDA_SUCCESS or not name.value:
            return f"CUDA_ERROR_{code}", "unknown error code"
        self._fns["cuGetErrorString"](code, byref(text))
        return name.value.decode(), (text.value or b"").decode()

    def error(self, code: int, what: str) -> CudaError:
        name, text = self.error_text(code)
        cls = CudaOutOfMemoryError if code == CUDA_ERROR_OUT_OF_MEMORY else CudaError
        return cls(f"{what}: {name}: {text}", code, name)

    def call(self, name: str, *args: Any) -> None:
        fn = self._fns.get(name)
        if fn is None:
            raise CudaUnavailableError(f"the CUDA driver at {self.path} has no {name}")
        rc = fn(*args)
        if rc != CUDA_SUCCESS:
            raise self.error(rc, name)

    def address(self, name: str) -> int:
        """The entry point's address, for native code that calls the driver itself (staged links)."""
        fn = self._fns.get(name)
        if fn is None:
            raise CudaUnavailableError(f"the CUDA driver at {self.path} has no {name}")
        return ctypes.cast(fn, c_void_p).value or 0

    def raw(self, name: str, *args: Any) -> int:
        """Call without raising; returns the CUresult (for NOT_READY and probing)."""
        fn = self._fns.get(name)
        if fn is None:
            raise CudaUnavailableError(f"the CUDA driver at {self.path} has no {name}")
        return fn(*args)


_lock = threading.Lock()
_driver: Driver | None = None
_status: tuple[bool, str] | None = None


def _candidates() -> list[str]:
    forced = os.environ.get("LAMINA_LIBCUDA")
    return [forced] if forced else ["libcuda.so.1", "libcuda.so"]


def _load() -> tuple[Driver | None, str]:
    if os.environ.get("LAMINA_DISABLE_CUDA", "") not in ("", "0"):
        return None, "CUDA disabled by LAMINA_DISABLE_CUDA"
    errors = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        try:
            drv = Driver(lib, path)
        except CudaUnavailableError as exc:
            return None, str(exc)
        rc = drv.raw("cuInit", 0)
        if rc != CUDA_SUCCESS:
            name, text = drv.error_text(rc)
            return None, f"cuInit failed ({name}: {text})"
        count = c_int()
        rc = drv.raw("cuDeviceGetCount", byref(count))
        if rc != CUDA_SUCCESS or count.value < 1:
            return None, "the CUDA driver is loaded but reports no device"
        version = c_int()
        drv.call("cuDriverGetVersion", byref(version))
        drv.version = version.value
        drv.device_count = count.value
        return drv, ""
    return None, "no CUDA driver: cannot load " + "; ".join(errors)


def _ensure() -> tuple[Driver | None, str]:
    global _driver, _status
    with _lock:
        if _status is None:
            drv, why = _load()
            _driver = drv
            if drv is None:
                _status = (False, why)
            else:
                names = []
                for i in range(drv.device_count):
                    names.append(_device_name(drv, i))
                v = drv.version
                _status = (True, f"CUDA driver {v // 1000}.{(v % 1000) // 10} ({drv.path}), "
                                 f"{drv.device_count} device(s): {', '.join(names)}")
        return _driver, _status[1]


def _device_name(drv: Driver, ordinal: int) -> str:
    dev = c_int()
    drv.call("cuDeviceGet", byref(dev), ordinal)
    buf = ctypes.create_string_buffer(256)
    drv.call("cuDeviceGetName", buf, 256, dev.value)
    return buf.value.decode(errors="replace")


def status() -> tuple[bool, str]:
    """(available, reason): why CUDA cannot be used here, or what was found. Never raises."""
    try:
        _ensure()
    except Exception as exc:  # a broken driver must not break imports or test collection
        return False, f"CUDA probe failed: {exc}"
    assert _status is not None
    return _status


def driver() -> Driver:
    """The loaded, initialised driver, or CudaUnavailableError saying why not."""
    drv, why = _ensure()
    if drv is None:
        raise CudaUnavailableError(why)
    return drv


def _reset_for_tests() -> None:
    """Forget the probe result and its devices (tests flip LAMINA_DISABLE_CUDA / LAMINA_LIBCUDA)."""
    global _driver, _status
    with _lock:
        _driver, _status = None, None
        _devices.clear()  # (each holds the driver it was made with)


# -- devices and contexts -----------------------------------------------------


class Device:
    """One GPU and its primary context (the one the CUDA runtime, torch and cupy use).

    The context is retained once per process and never released (releasing the
    last reference would tear down memory that torch or cupy still use).
    """

    def __init__(self, ordinal: int):
        drv = driver()
        if not 0 <= ordinal < drv.device_count:
            raise CudaError(f"no CUDA device {ordinal} (have {drv.device_count})", CUDA_ERROR_INVALID_VALUE)
        self.driver = drv
        self.ordinal = ordinal
        dev = c_int()
        drv.call("cuDeviceGet", byref(dev), ordinal)
        self.handle = dev.value
        ctx = c_void_p()
        drv.call("cuDevicePrimaryCtxRetain", byref(ctx), self.handle)
        self.context = ctx.value
        self.name = _device_name(drv, ordinal)

    def attribute(self, attr: int) -> int:
        value = c_int()
        self.driver.call("cuDeviceGetAttribute", byref(value), attr, self.handle)
        return value.value

    @property
    def compute_capability(self) -> tuple[int, int]:
        return (self.attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                self.attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR))

    def make_current(self) -> None:
        """Bind the primary context to the calling thread (a thread of its own calls this once)."""
        self.driver.call("cuCtxSetCurrent", self.context)

    def activate(self) -> "_Activation":
        """Make the primary context current for a block, restoring the caller's afterwards (a context
        manager; one driver call when the context is current already, as on torch's threads)."""
        return _Activation(self)

    def mem_info(self) -> tuple[int, int]:
        free, total = c_size_t(), c_size_t()
        with self.activate():
            self.driver.call("cuMemGetInfo", byref(free), byref(total))
        return free.value, total.value

    def __repr__(self) -> str:
        return f"<cuda.Device {self.ordinal} {self.name}>"


class _Activation:
    """Device.activate's context manager: pushes the primary context unless it is current already."""

    __slots__ = ("device", "pushed")

    def __init__(self, device: Device):
        self.device = device
        self.pushed = False

    def __enter__(self) -> None:
        device = self.device
        cur = c_void_p()
        drv = device.driver
        rc = drv._fns["cuCtxGetCurrent"](byref(cur))
        if rc != CUDA_SUCCESS:
            raise drv.error(rc, "cuCtxGetCurrent")
        if cur.value != device.context:  # none or another: ours for the block, then the caller's again
            drv.call("cuCtxPushCurrent", device.context)
            self.pushed = True

    def __exit__(self, *exc: Any) -> None:
        if self.pushed:
            self.pushed = False
            popped = c_void_p()
            self.device.driver.call("cuCtxPopCurrent", byref(popped))


_devices: dict[int, Device] = {}


def get_device(ordinal: int = 0) -> Device:
    """The Device for an ordinal (cached); CudaUnavailableError when CUDA is not usable now."""
    driver()
    with _lock:
        dev = _devices.get(ordinal)
    if dev is None:
        dev = Device(ordinal)
        with _lock:
            dev = _devices.setdefault(ordinal, dev)
    return dev


# -- streams and events ------------------------------------------------------


class Stream:
    """A stream we own; non-blocking by default, so it never syncs with the legacy default stream."""

    def __init__(self, device: Device, flags: int = CU_STREAM_NON_BLOCKING):
        self.device = device
        handle = c_void_p()
        with device.activate():
            device.driver.call("cuStreamCreate", byref(handle), flags)
        self.handle: int | None = handle.value

    def synchronize(self) -> None:
        self.device.driver.call("cuStreamSynchronize", self.handle)

    def idle(self) -> bool:
        rc = self.device.driver.raw("cuStreamQuery", self.handle)
        if rc == CUDA_ERROR_NOT_READY:
            return False
        if rc != CUDA_SUCCESS:
            raise self.device.driver.error(rc, "cuStreamQuery")
        return True

    def wait_event(self, event: "Event") -> None:
        self.device.driver.call("cuStreamWaitEvent", self.handle, event.handle, 0)

    def close(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            with self.device.activate():
                self.device.driver.call("cuStreamDestroy", handle)


class Event:
    def __init__(self, device: Device, flags: int = CU_EVENT_DISABLE_TIMING):
        self.device = device
        handle = c_void_p()
        with device.activate():
            device.driver.call("cuEventCreate", byref(handle), flags)
        self.handle: int | None = handle.value

    def record(self, stream: int | None) -> "Event":
        self.device.driver.call("cuEventRecord", self.handle, stream)
        return self

    def done(self) -> bool:
        rc = self.device.driver.raw("cuEventQuery", self.handle)
        if rc == CUDA_ERROR_NOT_READY:
            return False
        if rc != CUDA_SUCCESS:
            raise self.device.driver.error(rc, "cuEventQuery")
        return True

    def synchronize(self) -> None:
        self.device.driver.call("cuEventSynchronize", self.handle)

    def elapsed_ms(self, end: "Event") -> float:
        ms = c_float()
        self.device.driver.call("cuEventElapsedTime", byref(ms), self.handle, end.handle)
        return ms.value

    def close(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            with self.device.activate():
                self.device.driver.call("cuEventDestroy", handle)


def stream_is_capturing(device: Device, stream: int | None) -> bool:
    """True while stream is being captured into a CUDA graph (or its capture was invalidated)."""
    if not device.driver.has("cuStreamIsCapturing"):
        return False
    status_ = c_int()
    device.driver.call("cuStreamIsCapturing", stream, byref(status_))
    return status_.value != CU_STREAM_CAPTURE_STATUS_NONE


# -- memory ---------------------------------------------------------------------


class PinnedBuffer:
    """Page-locked host memory from cuMemHostAlloc (portable; device-mapped when asked)."""

    def __init__(self, device: Device, nbytes: int, flags: int = CU_MEMHOSTALLOC_PORTABLE):
        if nbytes <= 0:
            raise CudaError(f"pinned buffer of {nbytes} bytes", CUDA_ERROR_INVALID_VALUE)
        self.device = device
        self.nbytes = nbytes
        ptr = c_void_p()
        with device.activate():
            device.driver.call("cuMemHostAlloc", byref(ptr), nbytes, flags)
            self.address: int = ptr.value
            self.device_address = 0
            if flags & CU_MEMHOSTALLOC_DEVICEMAP:
                dptr = c_uint64()
                try:
                    device.driver.call("cuMemHostGetDevicePointer", byref(dptr), ptr, 0)
                except CudaError:
                    device.driver.call("cuMemFreeHost", ptr)
                    raise
                self.device_address = dptr.value

    def close(self) -> None:
        address, self.address = self.address, 0
        if address:
            with self.device.activate():
                self.device.driver.call("cuMemFreeHost", c_void_p(address))


class HostRegistration:
    """cuMemHostRegister over existing host memory (e.g. a numpy array); unregistered on close."""

    def __init__(self, device: Device, address: int, nbytes: int, flags: int = CU_MEMHOSTREGISTER_PORTABLE):
        self.device = device
        with device.activate():
            device.driver.call("cuMemHostRegister", c_void_p(address), nbytes, flags)
        self.address = address
        self.nbytes = nbytes

    def close(self) -> None:
        address, self.address = self.address, 0
        if address:
            with self.device.activate():
                self.device.driver.call("cuMemHostUnregister", c_void_p(address))


class DeviceAllocation:
    """Raw cuMemAlloc memory (benchmarks and tests that run without torch or cupy)."""

    def __init__(self, device: Device, nbytes: int):
        self.device = device
        self.nbytes = nbytes
        ptr = c_uint64()
        with device.activate():
            device.driver.call("cuMemAlloc", byref(ptr), max(1, nbytes))
        self.ptr: int = ptr.value

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": None}

    def close(self) -> None:
        ptr, self.ptr = self.ptr, 0
        if ptr:
            with self.device.activate():
                self.device.driver.call("cuMemFree", ptr)


def memcpy_dtoh_async(drv: Driver, host: int, dev: int, nbytes: int, stream: int | None) -> None:
    drv.call("cuMemcpyDtoHAsync", c_void_p(host), dev, nbytes, stream)


def memcpy_htod_async(drv: Driver, dev: int, host: int, nbytes: int, stream: int | None) -> None:
    drv.call("cuMemcpyHtoDAsync", dev, c_void_p(host), nbytes, stream)


class _Memcpy2D(ctypes.Structure):
    """CUDA_MEMCPY2D (cuda.h)."""

    _fields_ = [("srcXInBytes", c_size_t), ("srcY", c_size_t), ("srcMemoryType", c_int), ("srcHost", c_void_p),
                ("srcDevice", c_uint64), ("srcArray", c_void_p), ("srcPitch", c_size_t),
                ("dstXInBytes", c_size_t), ("dstY", c_size_t), ("dstMemoryType", c_int), ("dstHost", c_void_p),
                ("dstDevice", c_uint64), ("dstArray", c_void_p), ("dstPitch", c_size_t),
                ("WidthInBytes", c_size_t), ("Height", c_size_t)]


CU_MEMORYTYPE_HOST = 1
CU_MEMORYTYPE_DEVICE = 2


def memcpy_rows_async(drv: Driver, to_device: bool, dst: int, dst_pitch: int, src: int, src_pitch: int,
                      row_bytes: int, rows: int, stream: int | None) -> None:
    """rows of row_bytes, pitch bytes apart on each side, host to device (to_device) or back: one 2D copy."""
    p = _Memcpy2D(WidthInBytes=row_bytes, Height=rows, srcPitch=src_pitch, dstPitch=dst_pitch)
    if to_device:
        p.srcMemoryType, p.srcHost, p.dstMemoryType, p.dstDevice = CU_MEMORYTYPE_HOST, src, CU_MEMORYTYPE_DEVICE, dst
    else:
        p.srcMemoryType, p.srcDevice, p.dstMemoryType, p.dstHost = CU_MEMORYTYPE_DEVICE, src, CU_MEMORYTYPE_HOST, dst
    drv.call("cuMemcpy2DAsync", byref(p), stream)


def memcpy_dtod_async(drv: Driver, dst: int, src: int, nbytes: int, stream: int | None) -> None:
    drv.call("cuMemcpyDtoDAsync", dst, src, nbytes, stream)


def memcpy_rows_dtod_async(drv: Driver, dst: int, dst_pitch: int, src: int, src_pitch: int, row_bytes: int,
                           rows: int, stream: int | None) -> None:
    """rows of row_bytes, pitch bytes apart on each side, device to device: one 2D copy."""
    p = _Memcpy2D(WidthInBytes=row_bytes, Height=rows, srcPitch=src_pitch, dstPitch=dst_pitch)
    p.srcMemoryType, p.srcDevice, p.dstMemoryType, p.dstDevice = CU_MEMORYTYPE_DEVICE, src, CU_MEMORYTYPE_DEVICE, dst
    drv.call("cuMemcpy2DAsync", byref(p), stream)


def memset_d8_async(drv: Driver, dev: int, value: int, nbytes: int, stream: int | None) -> None:
    drv.call("cuMemsetD8Async", dev, value, nbytes, stream)


def stream_wait_value32(drv: Driver, stream: int | None, address: int, value: int,
                        flags: int = CU_STREAM_WAIT_VALUE_GEQ) -> None:
    drv.call("cuStreamWaitValue32", stream, address, value & 0xFFFFFFFF, flags)


def stream_write_value32(drv: Driver, stream: int | None, address: int, value: int,
                         flags: int = CU_STREAM_WRITE_VALUE_DEFAULT) -> None:
    drv.call("cuStreamWriteValue32", stream, address, value & 0xFFFFFFFF, flags)


class PointerInfo:
    """What the driver knows about an address (see classify_pointer)."""

    __slots__ = ("memory_type", "device_ordinal", "is_managed", "range_start", "range_size")

    def __init__(self, memory_type: int, device_ordinal: int, is_managed: bool, range_start: int, range_size: int):
        self.memory_type = memory_type
        self.device_ordinal = device_ordinal
        self.is_managed = is_managed
        self.range_start = range_start
        self.range_size = range_size

    def __repr__(self) -> str:
        kinds = {CU_MEMORYTYPE_HOST: "host", CU_MEMORYTYPE_DEVICE: "device", CU_MEMORYTYPE_ARRAY: "array",
                 CU_MEMORYTYPE_UNIFIED: "unified"}
        return (f"<PointerInfo {kinds.get(self.memory_type, self.memory_type)} on device {self.device_ordinal}"
                f"{' managed' if self.is_managed else ''} range 0x{self.range_start:x}+{self.range_size}>")


def classify_pointer(drv: Driver, address: int) -> PointerInfo | None:
    """Memory type, owning device and allocation range of address; None if CUDA does not know it."""
    mtype = c_uint()
    rc = drv.raw("cuPointerGetAttribute", byref(mtype), CU_POINTER_ATTRIBUTE_MEMORY_TYPE, address)
    if rc == CUDA_ERROR_INVALID_VALUE:
        return None  # plain pageable host memory, or garbage
    if rc != CUDA_SUCCESS:
        raise drv.error(rc, "cuPointerGetAttribute(MEMORY_TYPE)")
    ordinal = c_int(-1)
    managed = c_uint(0)
    start, size = c_uint64(0), c_size_t(0)
    for attr, out in ((CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ordinal), (CU_POINTER_ATTRIBUTE_IS_MANAGED, managed),
                      (CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, start), (CU_POINTER_ATTRIBUTE_RANGE_SIZE, size)):
        drv.raw("cuPointerGetAttribute", byref(out), attr, address)  # older drivers lack some: keep defaults
    return PointerInfo(mtype.value, ordinal.value, bool(managed.value), start.value, size.value)


def dmabuf_fd(device: Device, address: int, nbytes: int) -> int:
    """A dma-buf file descriptor for [address, +nbytes) of device memory (host-page aligned range).

    The caller owns the descriptor (close it once ibv_reg_dmabuf_mr has taken its reference).
    """
    fd = c_int(-1)
    with device.activate():
        device.driver.call("cuMemGetHandleForAddressRange", byref(fd), address, nbytes,
                           CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0)
    return fd.value


def flush_gpudirect_writes(device: Device) -> None:
    """Make NIC writes that already reached the GPU visible to work launched after this call."""
    with device.activate():
        device.driver.call("cuFlushGPUDirectRDMAWrites", CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TARGET_CURRENT_CTX,
                           CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TO_OWNER)

