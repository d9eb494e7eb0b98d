"""CUDA memory in: recognise device tensors and arrays, and register them on a path.

Recognised objects: torch CUDA tensors, cupy arrays, anything with
``__cuda_array_interface__`` (v2/v3) and anything exporting DLPack on a CUDA
device. :func:`cuda_buffer` resolves one to a device address and size;
:func:`register_cuda` picks how a context reaches it:

``dmabuf``   verbs, device memory exported with cuMemGetHandleForAddressRange
             and registered with ibv_reg_dmabuf_mr (native: lm_mr_register_dmabuf)
``peermem``  verbs, ibv_reg_mr straight on the device pointer through the
             nvidia-peermem kernel module (native: lm_mr_register_device)
``staging``  everything else (tcp; verbs without GPUDirect): bytes go through
             pinned host bounce buffers (lamina_comm.gpu.staging.StagedLink)

A path the driver offers may still be refused by the transport (soft-RoCE has
no dma-buf support; a device pointer needs nvidia-peermem): register_cuda then
takes the next one down and ``path_reason`` quotes the refusal.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import os
from typing import Any

from ..errors import ClosedError, InvalidArgumentError, UnsupportedError
from . import cuda

PATHS = ("dmabuf", "peermem", "staging")

# DLPack device types (dlpack.h).
KDL_CPU = 1
KDL_CUDA = 2
KDL_CUDA_HOST = 3
KDL_CUDA_MANAGED = 13


@dataclasses.dataclass(frozen=True)
class CudaBuffer:
    """A contiguous range of device memory and what keeps it alive."""

    ptr: int
    nbytes: int
    device: int          # ordinal; -1 when the producer did not say (classified through the driver)
    readonly: bool
    owner: Any
    kind: str            # "torch", "cupy", "cai", "dlpack", "region"
    stream: int | None   # the producer's stream (work that writes the data), None if unknown


# -- recognising ----------------------------------------------------------------


def _is_torch_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "data_ptr") and hasattr(obj, "device")


def _dlpack_device(obj: Any) -> tuple[int, int] | None:
    fn = getattr(obj, "__dlpack_device__", None)
    if fn is None:
        return None
    try:
        dev_type, dev_id = fn()
        return int(dev_type), int(dev_id)
    except Exception:
        return None


def is_cuda_object(obj: Any) -> bool:
    """True for objects whose memory lives on a CUDA device. Needs no driver."""
    if isinstance(obj, CudaRegionBase):
        return True
    if _is_torch_tensor(obj):
        return obj.device.type == "cuda"
    try:
        if hasattr(obj, "__cuda_array_interface__"):
            return True
    except Exception:  # a property that raises for host objects
        pass
    dev = _dlpack_device(obj)
    return dev is not None and dev[0] in (KDL_CUDA, KDL_CUDA_MANAGED)


def _itemsize(typestr: str) -> int:
    if len(typestr) < 3 or typestr[0] not in "<>|=" or not typestr[2:].isdigit():
        raise InvalidArgumentError(f"__cuda_array_interface__ typestr {typestr!r} is not understood")
    return int(typestr[2:])


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _is_c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...] | None, itemsize: int) -> bool:
    if strides is None or 0 in shape:
        return True
    expected = _c_strides(shape, itemsize)
    return all(dim == 1 or s == e for dim, s, e in zip(shape, strides, expected))


def parse_cuda_array_interface(cai: dict) -> tuple[int, int, bool, int | None]:
    """(address, nbytes, readonly, stream) of a __cuda_array_interface__ dict; only C-contiguous data."""
    try:
        shape = tuple(int(d) for d in cai["shape"])
        ptr, readonly = cai["data"]
        typestr = cai["typestr"]
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"malformed __cuda_array_interface__: {exc}") from exc
    itemsize = _itemsize(typestr)
    strides = cai.get("strides")
    strides = None if strides is None else tuple(int(s) for s in strides)
    if cai.get("mask") is not None:
        raise InvalidArgumentError("masked CUDA arrays are not supported")
    if not _is_c_contiguous(shape, strides, itemsize):
        raise InvalidArgumentError(f"CUDA array with shape {shape} and strides {strides} is not C-contiguous")
    nbytes = math.prod(shape) * itemsize
    if nbytes and not ptr:
        raise InvalidArgumentError("__cuda_array_interface__ has a NULL data pointer")
    stream = cai.get("stream") if int(cai.get("version", 2)) >= 3 else None
    if stream == 0:  # disallowed by v3 as ambiguous; read it as the legacy default stream
        stream = cuda.CU_STREAM_LEGACY
    return int(ptr or 0), nbytes, bool(readonly), (None if stream is None else int(stream))


# DLPack structures (dlpack.h, unversioned DLManagedTensor: dl_tensor comes first).
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_capsule_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get_pointer.restype = ctypes.c_void_p
_capsule_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype = ctypes.c_int
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _from_dlpack(obj: Any) -> CudaBuffer:
    # Ask the producer to order its pending work before the legacy default stream, which is
    # then the stream our copies are ordered after (DLPack's consumer-stream protocol).
    try:
        capsule = obj.__dlpack__(stream=cuda.CU_STREAM_LEGACY)
    except TypeError:
        capsule = obj.__dlpack__()
    if not _capsule_is_valid(capsule, b"dltensor"):
        raise UnsupportedError(f"{type(obj).__name__}.__dlpack__ returned no unconsumed 'dltensor' capsule")
    t = _DLTensor.from_address(_capsule_get_pointer(capsule, b"dltensor"))
    if t.device.device_type not in (KDL_CUDA, KDL_CUDA_MANAGED):
        raise InvalidArgumentError(f"DLPack tensor is on device type {t.device.device_type}, not CUDA")
    shape = tuple(t.shape[i] for i in range(t.ndim))
    itemsize = (t.dtype.bits * t.dtype.lanes + 7) // 8
    strides = None if not t.strides else tuple(t.strides[i] * itemsize for i in range(t.ndim))
    if not _is_c_contiguous(shape, strides, itemsize):
        raise InvalidArgumentError(f"DLPack tensor with shape {shape} is not C-contiguous")
    # The unconsumed capsule owns the tensor: its destructor calls the deleter when we drop it.
    return CudaBuffer((t.data or 0) + t.byte_offset, math.prod(shape) * itemsize, t.device.device_id, False,
                      (obj, capsule), "dlpack", cuda.CU_STREAM_LEGACY)


def _classified(ptr: int, nbytes: int, hint: int) -> int:
    """Check with the driver that [ptr, +nbytes) is device memory; returns its device ordinal."""
    if nbytes == 0:
        return max(hint, 0)
    drv = cuda.driver()
    with cuda.get_device(max(hint, 0)).activate():
        info = cuda.classify_pointer(drv, ptr)
    if info is None:
        raise InvalidArgumentError(f"address 0x{ptr:x} is not memory CUDA knows (plain host memory?)")
    if info.memory_type == cuda.CU_MEMORYTYPE_HOST and not info.is_managed:
        raise InvalidArgumentError(f"address 0x{ptr:x} is pinned host memory: register it with Context.register")
    if info.range_size and ptr + nbytes > info.range_start + info.range_size:
        raise InvalidArgumentError(f"[0x{ptr:x}, +{nbytes}) runs past its allocation "
                                   f"[0x{info.range_start:x}, +{info.range_size})")
    return info.device_ordinal if info.device_ordinal >= 0 else max(hint, 0)


def cuda_buffer(obj: Any) -> CudaBuffer:
    """Resolve a CUDA object to (address, size, device, producer stream); raises a typed error if not."""
    if isinstance(obj, CudaRegionBase):
        obj._check_open()
        return CudaBuffer(obj.address, obj.nbytes, obj.device, False, obj, "region", getattr(obj, "stream", None))
    if type(obj) is cuda.DeviceAllocation:  # ours: it knows its device (no pointer query)
        if not obj.ptr:
            raise ClosedError("the DeviceAllocation was freed")
        return CudaBuffer(obj.ptr, obj.nbytes, obj.device.ordinal, False, obj, "cai", None)
    ok, why = cuda.status()
    if not ok:
        raise UnsupportedError(f"{type(obj).__name__} is CUDA memory, which needs CUDA: {why}")
    if _is_torch_tensor(obj):
        if obj.device.type != "cuda":
            raise InvalidArgumentError(f"tensor lives on {obj.device}, not a CUDA device")
        if not obj.is_contiguous():
            raise InvalidArgumentError("tensor is not contiguous; call .contiguous() first")
        import torch
        stream = torch.cuda.current_stream(obj.device).cuda_stream
        return CudaBuffer(int(obj.data_ptr()), obj.numel() * obj.element_size(), int(obj.device.index or 0),
                          False, obj, "torch", int(stream))
    cai = None
    try:
        cai = obj.__cuda_array_interface__
    except AttributeError:
        pass
    if cai is not None:
        ptr, nbytes, readonly, stream = parse_cuda_array_interface(cai)
        if type(obj).__module__.startswith("cupy"):
            import cupy
            device = int(obj.device.id)
            if stream is None:
                stream = int(cupy.cuda.get_current_stream().ptr)
            return CudaBuffer(ptr, nbytes, device, readonly, obj, "cupy", stream)
        device = _classified(ptr, nbytes, -1)
        return CudaBuffer(ptr, nbytes, device, readonly, obj, "cai", stream)
    dev = _dlpack_device(obj)
    if dev is not None and dev[0] in (KDL_CUDA, KDL_CUDA_MANAGED):
        buf = _from_dlpack(obj)
        _classified(buf.ptr, buf.nbytes, buf.device)
        return buf
    raise InvalidArgumentError(f"{type(obj).__name__} is not CUDA memory (no CUDA tensor, "
                               "__cuda_array_interface__ or CUDA DLPack device)")


# -- choosing a path ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PathCaps:
    """What decides the registration path (probe_caps fills it; tests fake it)."""

    verbs: bool                 # the context has the verbs transport open
    native_dmabuf: bool         # native library exports lm_mr_register_dmabuf
    native_device_mr: bool      # native library exports lm_mr_register_device
    dmabuf_supported: bool      # CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED
    gpudirect_supported: bool   # CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED
    peermem_loaded: bool        # the nvidia-peermem kernel module is loaded
    refused: frozenset = frozenset()  # paths the transport refused when tried (register_cuda)


def choose_path(caps: PathCaps, prefer: str | None = None) -> tuple[str, str]:
    """(path, reason): dmabuf, else peermem, else staging; the reason says why the better ones were out."""
    if prefer is not None and prefer not in PATHS:
        raise InvalidArgumentError(f"path must be one of {PATHS}, not {prefer!r}")
    if prefer == "staging":
        return "staging", "staging was asked for"
    if not caps.verbs:
        why = ("the context has no verbs transport; tcp moves bytes with the CPU, so device memory "
               "is staged through pinned host buffers")
        if prefer:
            raise UnsupportedError(f"{prefer} registration impossible: {why}")
        return "staging", why
    no_dmabuf = []
    if not caps.native_dmabuf:
        no_dmabuf.append("the native library lacks lm_mr_register_dmabuf")
    if not caps.dmabuf_supported:
        no_dmabuf.append("the GPU/driver reports no dma-buf support")
    if "dmabuf" in caps.refused:
        no_dmabuf.append("the transport refused it")
    if not no_dmabuf and prefer in (None, "dmabuf"):
        return "dmabuf", "verbs with dma-buf export of device memory"
    no_peermem = []
    if not caps.native_device_mr:
        no_peermem.append("the native library lacks lm_mr_register_device")
    if not caps.gpudirect_supported:
        no_peermem.append("the GPU reports no GPUDirect RDMA support")
    if not caps.peermem_loaded:
        no_peermem.append("the nvidia_peermem module is not loaded")
    if "peermem" in caps.refused:
        no_peermem.append("the transport refused it")
    if not no_peermem and prefer in (None, "peermem"):
        return "peermem", "verbs with ibv_reg_mr on the device pointer (nvidia-peermem)" + (
            f"; no dma-buf: {', '.join(no_dmabuf)}" if no_dmabuf else "")
    why = f"no dma-buf: {', '.join(no_dmabuf) or 'not asked for'}; no peermem: {', '.join(no_peermem) or 'not asked for'}"
    if prefer:
        raise UnsupportedError(f"{prefer} registration impossible: {why}")
    return "staging", why


def peermem_loaded() -> bool:
    return os.path.exists("/sys/module/nvidia_peermem") or os.path.exists("/sys/kernel/mm/memory_peers/nv_mem/version")


def probe_caps(ctx: Any, device: cuda.Device) -> PathCaps:
    from .._bindings import lib
    verbs = "verbs" in ctx.transports
    return PathCaps(
        verbs=verbs,
        native_dmabuf=hasattr(lib, "lm_mr_register_dmabuf"),
        native_device_mr=hasattr(lib, "lm_mr_register_device"),
        dmabuf_supported=bool(device.attribute(cuda.CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED)),
        gpudirect_supported=bool(device.attribute(cuda.CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED)),
        peermem_loaded=peermem_loaded(),
    )


# -- regions ----------------------------------------------------------------------


class CudaRegionBase:
    """Marker base so lamina_comm.gpu can recognise its own regions without import cycles."""

    address: int
    nbytes: int
    device: int

    def _check_open(self) -> None:
        raise NotImplementedError


class CudaRegion(CudaRegionBase):
    """Device memory known to a context, with the path chosen for it (``.path``, ``.path_reason``).

    A ``staging`` region is reached through a StagedLink (``region.send(link)``,
    ``region.recv(link)``); ``dmabuf`` / ``peermem`` regions are native regions
    too: ``ep.write(region, remote)`` moves bytes NIC-to-GPU and
    ``descriptor()`` is what a peer targets.
    """

    def __init__(self, ctx: Any, buf: CudaBuffer, path: str, reason: str, access: int, native_mr: Any = None):
        self.context = ctx
        self.address = buf.ptr
        self.nbytes = buf.nbytes
        self.device = buf.device
        self.readonly = buf.readonly
        self.stream = buf.stream
        self.path = path
        self.path_reason = reason
        self.access = access
        self._owner = buf.owner
        self._mr = native_mr
        self._closed = False
        self._desc = None
        if native_mr is not None:
            from .._bindings import check, ffi, lib
            from ..transport import RemoteRegion
            desc = ffi.new("lm_rdesc_t *")
            check(lib.lm_mr_descriptor(native_mr, desc), "descriptor")
            self._desc = RemoteRegion(desc.key, desc.addr, desc.length, desc.rkey, desc.access)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("CUDA region is closed")

    def descriptor(self):
        self._check_open()
        if self._desc is None:
            raise UnsupportedError(f"a {self.path} region has no remote descriptor: peers reach it through a "
                                   "StagedLink (region.send / region.recv)")
        return self._desc

    def _handle(self):
        """The native region, so Endpoint.write/read accept direct-path regions."""
        self._check_open()
        if self._mr is None:
            raise UnsupportedError(f"a {self.path} region is not a native region; move it with a StagedLink")
        return self._mr

    def send(self, link: Any, *, offset: int = 0, nbytes: int | None = None, stream: Any = None):
        """Send [offset, +nbytes) over a StagedLink, ordered after `stream` (see StagedLink.send)."""
        return link.send(self, offset=offset, nbytes=nbytes, stream=stream)

    def recv(self, link: Any, *, offset: int = 0, nbytes: int | None = None, stream: Any = None,
             gate: bool = True):
        """Receive the next message into [offset, +nbytes) (see StagedLink.recv)."""
        return link.recv(self, offset=offset, nbytes=nbytes, stream=stream, gate=gate)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        getattr(self.context, "_regions", set()).discard(self)  # when registered through Context.register
        mr, self._mr = self._mr, None
        if mr is not None:
            from .._bindings import lib
            lib.lm_mr_deregister(mr)
        self._owner = None

    def __enter__(self) -> "CudaRegion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<CudaRegion {self.nbytes} B at 0x{self.address:x} on cuda:{self.device} path={self.path}"
                f"{' closed' if self._closed else ''}>")


def _register_native(ctx: Any, buf: CudaBuffer, path: str, access: int, device: cuda.Device,
                     range_start: int, range_size: int):
    """The native region of a direct path (needs the verbs entry points named in docs/gpu.md)."""
    from .._bindings import check, ffi, lib
    out = ffi.new("lm_mr_t **")
    if path == "dmabuf":
        # Export the whole allocation (page aligned) and register our slice of it by offset.
        fd = cuda.dmabuf_fd(device, range_start, range_size)
        try:
            check(lib.lm_mr_register_dmabuf(ctx._handle(), fd, buf.ptr - range_start, buf.nbytes, buf.ptr,
                                            access, out), "register dmabuf")
        finally:
            os.close(fd)
    else:
        check(lib.lm_mr_register_device(ctx._handle(), ffi.cast("void *", buf.ptr), buf.nbytes, access, out),
              "register device memory")
    return out[0]


def register_cuda(ctx: Any, obj: Any, access: int | None = None, *, prefer: str | None = None) -> CudaRegion:
    """Register CUDA memory with ctx on the best path available (see the module docstring).

    Raises lamina_comm.UnsupportedError naming the reason when CUDA is not usable here.
    """
    ok, why = cuda.status()
    if not ok:
        raise UnsupportedError(f"cannot register {type(obj).__name__} (CUDA memory): {why}")
    from ..transport import Access
    access = int(Access.ALL if access is None else access)
    buf = cuda_buffer(obj)
    if buf.readonly and access & (Access.LOCAL_WRITE | Access.REMOTE_WRITE):
        raise InvalidArgumentError("read-only CUDA memory can only be registered with Access.REMOTE_READ")
    device = cuda.get_device(buf.device)
    caps = probe_caps(ctx, device)
    path, reason = choose_path(caps, prefer)
    native_mr = None
    refused: list[str] = []
    while path != "staging":
        with device.activate():
            info = cuda.classify_pointer(device.driver, buf.ptr)
        start, size = (info.range_start, info.range_size) if info and info.range_size else (buf.ptr, buf.nbytes)
        try:
            native_mr = _register_native(ctx, buf, path, access, device, start, size)
            break
        except UnsupportedError as exc:
            # The driver offered the path but the provider said no (soft-RoCE has no dma-buf):
            # the next path down, unless this one was asked for by name.
            if prefer is not None:
                raise
            refused.append(f"{path}: {exc}")
            caps = dataclasses.replace(caps, refused=caps.refused | {path})
            path, reason = choose_path(caps)
    if refused:
        reason = f"{reason}; {'; '.join(refused)}"
    return CudaRegion(ctx, buf, path, reason, access, native_mr)

