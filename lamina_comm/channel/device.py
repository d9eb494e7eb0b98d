"""CUDA tensors through a channel, ordered on a stream, without waiting for the device.

A send copies each device tensor into the next send slot with the copy engine
(``cuMemcpyDtoHAsync`` on the caller's stream) and hands the post to native
code: ``lm_chan_send_prepare`` takes the slot, the sequence number and writes
the header; ``cuLaunchHostFunc(stream, lm_chan_run_deferred, op)`` posts the
one write once the copies are done, on the driver's thread. A receive into
device tensors copies out of the slot on the stream (``cuMemcpyHtoDAsync``) and
returns the slot the same way (``lm_chan_release_prepare``). Per message: one
copy per tensor, one host function, one network write; no host synchronize,
no Python thread. The channel's ring is page-locked (``cuMemHostRegister``) at
the first use so the copies run asynchronously.

Direct (GPUDirect) sends skip the slot copy: CUDA tensors lying in a CUDA
region registered for the NIC (``ctx.register(...)`` took the ``dmabuf`` or
``peermem`` path) and given to ``Channel.add_source_region`` go, on a verbs
channel, from GPU memory straight to the peer: ``lm_chan_send_prepare_from``
plans the gather writes, and the same host function posts them after the
stream's work. Receives land in the host ring (one copy into device memory on
the stream), unless the receiver named a payload region in device memory
(``payloads=``): the NIC writes there, ``recv()`` hands out DeviceSlotView
objects and ``recv_into`` copies device to device.
"""
from __future__ import annotations

import ctypes
import dataclasses
from ctypes import c_void_p
from typing import Any, Optional

import numpy as np

from .. import dtypes
from .._bindings import error_of, ffi, host_function, lib
from ..errors import InvalidArgumentError, UnsupportedError
from ..gpu import cuda  # (imported at the top: a function-level import costs microseconds per message)
from ..gpu.memory import _classified, _is_c_contiguous, cuda_buffer, is_cuda_object, parse_cuda_array_interface
from ..gpu.stream import refuse_capture, stream_handle
from .spec import packed_offsets
from .views import _as_tensor_view, _copy_into, _describe, _describe_numpy, _TensorInfo, to_torch

@dataclasses.dataclass
class DeviceTensor:
    """A CUDA tensor (contiguous, or equally spaced rows): where it is, what it holds, its stream."""

    obj: Any
    ptr: int
    nbytes: int
    dtype_name: str
    shape: tuple[int, ...]
    device: int
    stream: Optional[int]  # the producer's stream when the object says (torch: the current stream)
    rows: int = 0          # > 0: a strided view of `rows` contiguous rows, row_stride bytes apart (one 2D copy)
    row_stride: int = 0


def is_device_tensor(obj: Any) -> bool:
    return is_cuda_object(obj)


def takes_device_path(tensors: list[Any]) -> bool:
    """Whether a message (sent without ``stream=``) goes stream-ordered: it holds CUDA tensors and every
    torch one among them is contiguous. A strided torch CUDA tensor (a head slice of q) keeps the
    synchronous path instead: torch copies it into the slot (``copy_``), the host waiting for the device."""
    device = [t for t in tensors if is_device_tensor(t)]
    return bool(device) and all(t.is_contiguous() for t in device if type(t).__module__.startswith("torch"))


def describe_device_tensor(obj: Any) -> DeviceTensor:
    """A torch CUDA tensor or a ``__cuda_array_interface__`` object (cupy, ...): contiguous, or a strided
    view made of equally spaced contiguous rows (one rank's heads of q [T, H, D]: one 2D copy)."""
    if type(obj).__module__.startswith("torch"):
        import torch
        size = obj.element_size()
        item = DeviceTensor(obj, obj.data_ptr(), obj.numel() * size, dtypes.canonical(obj.dtype), tuple(obj.shape),
                            obj.device.index or 0, torch.cuda.current_stream(obj.device).cuda_stream)
        if not obj.is_contiguous():
            item.rows, item.row_stride = _row_layout(item.shape, tuple(s * size for s in obj.stride()), size)
        return item
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is None:
        raise InvalidArgumentError(f"{type(obj).__name__}: CUDA objects go through a channel as torch tensors or "
                                   "with __cuda_array_interface__ (shape and dtype)")
    dtype = np.dtype(cai["typestr"])
    shape = tuple(int(d) for d in cai["shape"])
    strides = cai.get("strides")
    if strides is not None and not _is_c_contiguous(shape, tuple(int(s) for s in strides), dtype.itemsize):
        # Strided rows: checked and placed as the contiguous bytes the rows span.
        rows, row_stride = _row_layout(shape, tuple(int(s) for s in strides), dtype.itemsize)
        row_bytes = int(np.prod(shape)) * dtype.itemsize // rows
        span = {**cai, "shape": ((rows - 1) * row_stride + row_bytes,), "typestr": "|u1", "strides": None}
        ptr, span_bytes, _, stream = parse_cuda_array_interface(span)
        return DeviceTensor(obj, ptr, rows * row_bytes, dtypes.canonical(dtype), shape,
                            max(_classified(ptr, span_bytes, -1), 0), stream, rows, row_stride)
    buf = cuda_buffer(obj)  # checks contiguity, resolves the device
    return DeviceTensor(obj, buf.ptr, buf.nbytes, dtypes.canonical(dtype), shape, max(buf.device, 0), buf.stream)


def _row_layout(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    from .views import _rows
    rows = _rows(shape, strides, itemsize)
    if rows is None or rows == (0, 0):
        raise InvalidArgumentError(f"a CUDA tensor of shape {list(shape)} and strides {list(strides)} is neither "
                                   "contiguous nor equally spaced rows: call .contiguous() on its stream first")
    return rows


class DeviceSlotView:
    """A received tensor where the NIC wrote it: in a payload region of device memory (GPUDirect
    receive, ``Channel.connect/accept(payloads=cuda_region)``), no copy made. Read it on the GPU
    (``torch.as_tensor(view, device="cuda")``, ``cupy.asarray(view)``: ``__cuda_array_interface__``)
    before the message is released; bfloat16 shows as uint16 storage there (``dtype_name`` says)."""

    __slots__ = ("region", "ptr", "nbytes", "dtype_name", "shape")

    def __init__(self, region: Any, offset: int, nbytes: int, dtype_name: str, shape: tuple[int, ...]):
        self.region, self.ptr, self.nbytes = region, region.address + offset, nbytes
        self.dtype_name, self.shape = dtype_name, shape

    @property
    def __cuda_array_interface__(self) -> dict:
        typestr = np.dtype(dtypes.numpy_storage(self.dtype_name)).str
        # Writable as far as consumers know (torch refuses read-only interfaces); nothing writes it but
        # the NIC.
        return {"shape": self.shape, "typestr": typestr, "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": None}

    def __repr__(self) -> str:
        return f"DeviceSlotView({self.dtype_name}{list(self.shape)} at 0x{self.ptr:x} on cuda:{self.region.device})"


@dataclasses.dataclass
class HostLanding:
    """A page-locked host destination (``cuda.PinnedBuffer`` bytes) for ``DeviceStaging.recv_into``: a
    tensor that arrived in device memory is copied there on the stream (``cuMemcpyDtoHAsync``; read it
    once the stream got there), one in the host ring at once. Small host-read values of a GPUDirect
    receive (a reply's compute time) take this way."""

    ptr: int
    nbytes: int


def read_device_view(view: DeviceSlotView) -> np.ndarray:
    """A received device tensor's bytes on the host, waiting for the copy (for rare, small reads: an
    error reply's text); the caller holds the message, so the NIC does not write the slot meanwhile."""
    device = cuda.get_device(view.region.device)
    out = np.empty(view.nbytes, np.uint8)
    stream = cuda.Stream(device)
    try:
        with device.activate():
            cuda.memcpy_dtoh_async(device.driver, out.ctypes.data, view.ptr, view.nbytes, stream.handle)
            stream.synchronize()
    finally:
        stream.close()
    return out


def flush_nic_writes(region: Any) -> None:
    """NIC writes that reached GPU memory made visible to work launched after this (the driver's
    ``cuFlushGPUDirectRDMAWrites``). A driver without it, or a device that does not offer the flush
    (``CUDA_ERROR_NOT_SUPPORTED``: it orders them already), needs none."""
    try:
        cuda.flush_gpudirect_writes(cuda.get_device(region.device))
    except UnsupportedError:
        pass
    except cuda.CudaError as exc:
        if exc.name != "CUDA_ERROR_NOT_SUPPORTED":
            raise


def direct_refusal(region: Any, transport: str) -> str:
    """Why a channel over ``transport`` cannot send straight from a CUDA region ("" when it can)."""
    if region.path not in ("dmabuf", "peermem"):
        return f"the region is staged, not registered for the NIC ({region.path_reason})"
    if transport != "verbs":
        return f"the channel runs over {transport}, which moves bytes with the CPU: device memory goes through the slot"
    return ""


def _lies_in(item: DeviceTensor, region: Any) -> bool:
    extent = item.nbytes if not item.rows else (item.rows - 1) * item.row_stride + item.nbytes // item.rows
    return not region.closed and region.address <= item.ptr and item.ptr + extent <= region.address + region.nbytes


def _copy(device: Any, to_device: bool, host: int, item: DeviceTensor, stream: Optional[int],
          from_device: bool = False) -> None:
    """One copy between the (packed) slot and the device tensor: 1D, or 2D over its rows. from_device:
    the slot is a device payload region (GPUDirect receive): device to device."""
    if from_device:
        if item.rows:
            row_bytes = item.nbytes // item.rows
            cuda.memcpy_rows_dtod_async(device.driver, item.ptr, item.row_stride, host, row_bytes, row_bytes,
                                        item.rows, stream)
        else:
            cuda.memcpy_dtod_async(device.driver, item.ptr, host, item.nbytes, stream)
    elif item.rows:
        row_bytes = item.nbytes // item.rows
        if to_device:
            cuda.memcpy_rows_async(device.driver, True, item.ptr, item.row_stride, host, row_bytes, row_bytes,
                                   item.rows, stream)
        else:
            cuda.memcpy_rows_async(device.driver, False, host, row_bytes, item.ptr, item.row_stride, row_bytes,
                                   item.rows, stream)
    elif to_device:
        cuda.memcpy_htod_async(device.driver, item.ptr, host, item.nbytes, stream)
    else:
        cuda.memcpy_dtoh_async(device.driver, host, item.ptr, item.nbytes, stream)


class DeviceStaging:
    """One channel's device work: its ring page-locked, the streams it queued work on."""

    def __init__(self, channel: Any):
        self._channel = channel
        self._pinned: Any = None  # HostRegistration of the ring (portable: every device's context sees it)
        self._streams: dict[tuple[int, Optional[int]], Any] = {}  # (device, stream) -> Device: work queued there
        self._send_stream: dict[int, tuple[Any, Optional[int]]] = {}  # micro-batch -> (Device, stream) of its last send
        self._direct: list[Any] = []  # CUDA regions the channel's NIC reads (GPUDirect): sent from, not staged
        self.direct_messages = 0
        # Sent words (lm_chan_set_sent_words): page-locked, mapped for the GPU, at the first direct send;
        # and the sequence number of each micro-batch's last direct send.
        self._sent_words: Any = None
        self._direct_seq: dict[int, int] = {}

    def add_source(self, region: Any) -> str:
        """A CUDA region to send from directly; why not ("" when it will be)."""
        if region.closed:
            raise InvalidArgumentError(f"channel {self._channel.name}: the CUDA region is closed")
        if region.context is not self._channel.context:
            raise InvalidArgumentError(f"channel {self._channel.name}: the CUDA region was registered with "
                                       "another Context than the channel's")
        why = direct_refusal(region, self._channel.endpoint.transport)
        if not why:
            self._direct.append(region)
        return why

    def _direct_regions(self, items: list[Any]) -> Optional[list[Any]]:
        """Each tensor's direct region when every one lies in one and the message fits one gather list,
        else None (the message is staged)."""
        if not self._direct or not all(isinstance(t, DeviceTensor) for t in items):
            return None
        self._direct = [r for r in self._direct if not r.closed]
        if sum(max(t.rows, 1) for t in items if t.nbytes) > lib.LM_MAX_SEGS:
            return None  # more rows than one gather write takes: the copy engine packs them instead
        regions = [next((r for r in self._direct if _lies_in(t, r)), None) for t in items]
        return None if any(r is None for r in regions) else regions

    def _device(self, ordinal: int) -> Any:
        device = cuda.get_device(ordinal)
        if self._pinned is None:
            region = self._channel.region
            self._pinned = cuda.HostRegistration(device, region.address, region.nbytes)
        return device

    def _device_and_stream(self, items: list[DeviceTensor], stream: Any) -> tuple[Any, Optional[int]]:
        """The one device of a message's CUDA tensors and the stream to order on (``stream``, else the
        tensors' own); records torch tensors on the stream used. Then, with the device active (one
        activation per message: each costs driver calls), ``_refuse_capture``."""
        ordinals = {t.device for t in items}
        if len(ordinals) > 1:
            raise InvalidArgumentError(f"one stream-ordered message takes tensors of one CUDA device, got {ordinals}")
        handle = stream_handle(stream)
        if handle is None:
            handle = next((t.stream for t in items if t.stream is not None), None)
        device = self._device(ordinals.pop() if ordinals else 0)
        _keep_for_stream(items, handle)
        return device, handle

    def _refuse_capture(self, device: Any, handle: Optional[int]) -> None:
        # One post per message, with host bookkeeping: a graph replay would post it again, or never.
        refuse_capture(device, handle, f"a stream-ordered message on channel {self._channel.name}")

    def _launch(self, device: Any, stream: Optional[int], op: Any) -> None:
        """Queue lm_chan_run_deferred(op) behind the stream's work (the device active: see _launch_active)."""
        with device.activate():
            self._launch_active(device, stream, op)

    def _launch_active(self, device: Any, stream: Optional[int], op: Any) -> None:
        """_launch with the device active. If the driver refuses, the op runs here once the stream is
        idle, or is canceled (the channel fails) when the stream itself failed."""
        self._streams[(device.ordinal, stream)] = device
        handle = c_void_p(stream or 0)
        arg = c_void_p(int(ffi.cast("uintptr_t", op)))
        rc = device.driver.raw("cuLaunchHostFunc", handle, c_void_p(host_function("lm_chan_run_deferred")), arg)
        if rc == cuda.CUDA_SUCCESS:
            return
        synced = self._settle(device, stream)
        if synced == cuda.CUDA_SUCCESS:
            lib.lm_chan_run_deferred(op)  # the copies are done: post (or release) from here
            return
        lib.lm_chan_cancel_deferred(op, lib.LM_ERR_IO)
        raise device.driver.error(synced, "cuStreamSynchronize (a channel's copies)")

    def _settle(self, device: Any, stream: Optional[int]) -> int:
        """Wait for the stream (copies queued before a failure finish before the slot is used again);
        the CUDA result."""
        with device.activate():
            return device.driver.raw("cuStreamSynchronize", c_void_p(stream or 0))

    def _order_after_last_send(self, microbatch: int, device: Any, stream: Optional[int]) -> None:
        """The deferred sends of a micro-batch post in the order their host functions run: a send on another
        stream than the last one waits for it on the device (an event), not on the host."""
        last = self._send_stream.get(microbatch)
        self._send_stream[microbatch] = (device, stream)
        if last is None or (last[0].ordinal, last[1]) == (device.ordinal, stream) or \
                not lib.lm_chan_unposted(self._channel._handle(), microbatch):
            return
        event = cuda.Event(last[0])
        try:
            with last[0].activate():
                event.record(last[1])
            with device.activate():
                device.driver.call("cuStreamWaitEvent", c_void_p(stream or 0), c_void_p(event.handle), 0)
        finally:
            with last[0].activate():
                event.close()  # destroyed once the wait is satisfied (the driver defers it)

    def send(self, tensors: list[Any], layer: int, microbatch: int, stream: Any, timeout_ms: int,
             fill_tensors: Any) -> int:
        """Stage ``tensors`` (device ones by the copy engine on ``stream``) into the next send slot of
        ``microbatch``; the write is posted when the copies are done. Returns the sequence number."""
        channel = self._channel
        if not tensors:
            raise InvalidArgumentError(f"channel {channel.name}: a stream-ordered message needs a tensor")
        items = [describe_device_tensor(t) if is_device_tensor(t) else _describe(t) for t in tensors]
        direct = self._direct_regions(items)
        if direct is not None:
            return self._send_direct(items, direct, layer, microbatch, stream, timeout_ms, fill_tensors)
        offsets = packed_offsets([t.nbytes for t in items])
        size = offsets[-1] + items[-1].nbytes
        if size > channel._layout.send_capacity:
            raise InvalidArgumentError(f"channel {channel.name}: message of {size} B exceeds the "
                                       f"{channel._layout.send_capacity}-byte slot (see ChannelSpec)")
        device, handle = self._device_and_stream([t for t in items if isinstance(t, DeviceTensor)], stream)
        with device.activate():
            self._refuse_capture(device, handle)
            self._order_after_last_send(microbatch, device, handle)
            payload = channel.send_slot(microbatch, None if timeout_ms < 0 else timeout_ms / 1000)
            base = payload.ctypes.data
            described = []
            queued = False
            try:
                for off, item in zip(offsets, items):
                    if isinstance(item, DeviceTensor):  # described as it will lie in the slot: no view needed
                        _copy(device, False, base + off, item, handle)
                        queued = True
                        described.append(_TensorInfo(None, item.dtype_name, item.shape, item.nbytes, base + off))
                        continue
                    dst = payload[off:off + item.nbytes].view(dtypes.numpy_storage(item.dtype_name)).reshape(
                        item.shape)
                    _copy_into(dst, item)
                    described.append(_describe_numpy(_as_tensor_view(dst, item.dtype_name)))
                fill_tensors(channel._tensors, 0, described)
                seq, op = ffi.new("uint64_t *"), ffi.new("lm_chan_deferred_t **")
                rc = lib.lm_chan_send_prepare(channel._handle(), layer, microbatch, channel._tensors,
                                              len(described), timeout_ms, seq, op)
                if rc < 0:
                    raise error_of(rc, f"channel {channel.name}")
            except BaseException:
                if queued:  # nothing was taken, and the next send fills this slot: the copies must be done first
                    self._settle(device, handle)
                raise
            self._launch_active(device, handle, op[0])
        return int(seq[0])

    def _send_direct(self, items: list[DeviceTensor], regions: list[Any], layer: int, microbatch: int,
                     stream: Any, timeout_ms: int, fill_tensors: Any) -> int:
        """GPUDirect: the NIC reads the tensors where they lie, once the stream's work before the call is
        done (the host function posts the writes). No copy; the tensors must stay unchanged until sent."""
        channel = self._channel
        device, handle = self._device_and_stream(items, stream)
        with device.activate():  # once per message, as in send()
            self._refuse_capture(device, handle)
            if self._sent_words is None:
                self._watch_sent(device)
            self._order_after_last_send(microbatch, device, handle)
            fill_tensors(channel._tensors, 0, [_TensorInfo(t.obj, t.dtype_name, t.shape, t.nbytes, t.ptr, t.rows,
                                                           t.row_stride) for t in items])
            sources = ffi.new("lm_mr_t *[]", [r._handle() for r in regions])
            seq, op = ffi.new("uint64_t *"), ffi.new("lm_chan_deferred_t **")
            rc = lib.lm_chan_send_prepare_from(channel._handle(), layer, microbatch, channel._tensors, len(items),
                                               sources, timeout_ms, seq, op)
            if rc < 0:
                raise error_of(rc, f"channel {channel.name}")
            self._launch_active(device, handle, op[0])
        self.direct_messages += 1
        self._direct_seq[microbatch] = int(seq[0])
        return int(seq[0])

    def _watch_sent(self, device: Any) -> None:
        """Have native code say, per micro-batch, which direct send's writes completed (sent words)."""
        words = cuda.PinnedBuffer(device, 4 * self._channel.spec.microbatches,
                                  cuda.CU_MEMHOSTALLOC_PORTABLE | cuda.CU_MEMHOSTALLOC_DEVICEMAP)
        rc = lib.lm_chan_set_sent_words(self._channel._handle(), ffi.cast("uint32_t *", words.address))
        if rc < 0:
            words.close()
            raise error_of(rc, f"channel {self._channel.name}")
        self._sent_words = words

    def last_direct_send(self, microbatch: int) -> Optional[int]:
        """The sequence number of ``microbatch``'s last direct send (None: none yet)."""
        return self._direct_seq.get(microbatch)

    def sent(self, microbatch: int, seq: Optional[int] = None) -> bool:
        """Whether direct send ``seq`` of ``microbatch`` (default: its last) was sent (its source may be
        overwritten)."""
        if seq is None:
            seq = self._direct_seq.get(microbatch)
        if seq is None:
            return True
        word = ctypes.c_uint32.from_address(self._sent_words.address + 4 * microbatch).value
        return ((word - (seq + 1)) & 0xFFFFFFFF) < 0x80000000  # cyclic, as cuStreamWaitValue32's GEQ

    def wait_sent_on(self, stream: Any, microbatch: int, seq: Optional[int] = None) -> bool:
        """Queue on ``stream`` a wait until direct send ``seq`` of ``microbatch`` (default: its last) was
        sent; no host wait. False when there is nothing to wait for (no direct send, or sent already)."""
        if seq is None:
            seq = self._direct_seq.get(microbatch)
        if seq is None or self.sent(microbatch, seq):
            return False
        words = self._sent_words
        device = words.device
        handle = stream_handle(stream)
        with device.activate():
            cuda.stream_wait_value32(device.driver, handle, words.device_address + 4 * microbatch, seq + 1,
                                     cuda.CU_STREAM_WAIT_VALUE_GEQ)
        self._streams[(device.ordinal, handle)] = device  # close() waits for it while the words live
        return True

    def close_words(self) -> None:
        """After the native channel closed (it wrote its last word): the sent words go."""
        words, self._sent_words = self._sent_words, None
        if words is not None:
            words.close()

    def recv_into(self, message: Any, outs: list[Any], stream: Any) -> None:
        """Copy a received message's tensors into ``outs`` (device ones on ``stream``), then give the
        slot back once the copies are done."""
        channel = self._channel
        if len(outs) != len(message.tensors):
            raise InvalidArgumentError(f"channel {channel.name}: the message carries {len(message.tensors)} "
                                       f"tensor(s), {len(outs)} destination(s) given")
        targets: list[Any] = []
        for i, (out, part) in enumerate(zip(outs, message.tensors)):
            if type(out) is HostLanding:
                if out.nbytes != part.nbytes:
                    raise InvalidArgumentError(f"channel {channel.name}: tensor {i} has {part.nbytes} B, its "
                                               f"page-locked landing {out.nbytes}")
                targets.append(out)
                continue
            target = out if type(out) is DeviceTensor else \
                describe_device_tensor(out) if is_device_tensor(out) else None
            if isinstance(part, DeviceSlotView) and target is None:
                raise InvalidArgumentError(f"channel {channel.name}: tensor {i} arrived in device memory "
                                           "(payloads=): receive it into a CUDA tensor")
            shape = target.shape if target else tuple(out.shape)
            dtype_name = target.dtype_name if target else dtypes.canonical(out.dtype)
            if shape != tuple(part.shape) or dtype_name != part.dtype_name:
                raise InvalidArgumentError(f"channel {channel.name}: tensor {i} is {part.dtype_name}"
                                           f"{list(part.shape)}, its destination {dtype_name}{list(shape)}")
            targets.append(target)
        device_parts = []
        for out, target, part in zip(outs, targets, message.tensors):
            on_device = isinstance(part, DeviceSlotView)
            if target is None:  # host destinations at once
                if type(out).__module__.startswith("torch"):
                    out.copy_(to_torch(part))
                else:
                    np.copyto(out, part, casting="no")
            elif type(target) is HostLanding and not on_device:
                ctypes.memmove(target.ptr, part.ctypes.data, target.nbytes)
            else:
                device_parts.append((target, part))
        if not device_parts:
            message.release()
            return
        tensors = [t for t, _ in device_parts if type(t) is DeviceTensor]
        if tensors:
            device, handle = self._device_and_stream(tensors, stream)
        else:  # page-locked landings only: the payload region's device
            device, handle = self._device(device_parts[0][1].region.device), stream_handle(stream)
        with device.activate():
            self._refuse_capture(device, handle)
            queued = False
            try:
                for target, part in device_parts:
                    on_device = isinstance(part, DeviceSlotView)
                    if type(target) is HostLanding:
                        cuda.memcpy_dtoh_async(device.driver, target.ptr, part.ptr, target.nbytes, handle)
                    else:
                        _copy(device, True, part.ptr if on_device else part.ctypes.data, target, handle, on_device)
                    queued = True
                op = self._release_op(message)
            except BaseException:
                if queued:  # the slot goes back (the caller's release) only once nothing reads it
                    self._settle(device, handle)
                raise
            message._channel = None  # handed back by the stream, not by release()
            message.tensors = []  # the slot is the stream's now
            self._launch_active(device, handle, op)

    def _release_op(self, message: Any) -> Any:
        """lm_chan_release_prepare for a received message: its slot goes back when the op runs."""
        op = ffi.new("lm_chan_deferred_t **")
        rc = lib.lm_chan_release_prepare(self._channel._handle(), message.microbatch, message.slot, message.seq, op)
        if rc < 0:
            raise error_of(rc, f"channel {self._channel.name}")
        return op[0]

    def release_after(self, message: Any, stream: Any) -> None:
        """Hand a message's slot back once the work queued on ``stream`` so far is done (kernels reading
        its DeviceSlotViews), from native code; the caller never waits."""
        views = [t for t in message.tensors if isinstance(t, DeviceSlotView)]
        device = self._device(views[0].region.device if views else 0)
        self._launch(device, stream_handle(stream), self._release_op(message))

    def synchronize(self) -> None:
        """Wait until every stream this channel queued work on is done (its deferred ops have run).
        Raises the first stream's CUDA error (its ops may never run: the channel then leaks, never hangs)."""
        failed = None
        for (_, stream), device in list(self._streams.items()):
            with device.activate():
                rc = device.driver.raw("cuStreamSynchronize", c_void_p(stream or 0))
            if rc != cuda.CUDA_SUCCESS and failed is None:
                failed = device.driver.error(rc, "cuStreamSynchronize (a channel's stream)")
        self._streams.clear()
        if failed is not None:
            raise failed

    def close(self) -> None:
        """Streams first (their host functions touch the ring), then the page-locking. Never raises."""
        import logging
        try:
            self.synchronize()
        except Exception as exc:  # the channel closes anyway; its native memory outlives any late op
            logging.getLogger("lamina_comm").warning("channel %s: %s", self._channel.name, exc)
        pinned, self._pinned = self._pinned, None
        if pinned is not None:
            try:
                pinned.close()
            except Exception as exc:
                logging.getLogger("lamina_comm").warning("channel %s: unpinning its ring: %s",
                                                         self._channel.name, exc)


def _keep_for_stream(tensors: list[DeviceTensor], stream: Optional[int]) -> None:
    """torch's caching allocator may hand a tensor's memory out again once it is freed, ordered only on the
    stream it was allocated on: a copy queued on another stream must be recorded there."""
    for t in tensors:
        if stream is not None and t.stream != stream and type(t.obj).__module__.startswith("torch"):
            import torch
            t.obj.record_stream(torch.cuda.ExternalStream(stream, device=t.obj.device))
