"""Stream ordering: sends that start when a stream's queued work is done, receives that release a stream.

Pieces (used by :class:`lamina_comm.gpu.staging.StagedLink`, usable alone):

* :func:`stream_handle` turns a torch / cupy / raw stream into a CUstream handle.
* :class:`Transfer` is what a send or receive returns: ``done()``, ``wait()``,
  ``exception()``; errors arrive there, never as a dead process.
* :class:`ReceiveGate` is a 32-bit flag in host-mapped pinned memory. A
  receive enqueues ``cuStreamWaitValue32(stream, flag, seq, GEQ)`` on the
  caller's stream and returns at once; the kernels queued after it are
  released when the flag reaches ``seq``, which the staging copy stream
  writes (``cuStreamWriteValue32``) right after the last host-to-device copy
  of that message, or the host writes on failure so a stream never hangs.
* :class:`StreamOrderedWriter` posts ``Endpoint.write`` from a registered
  region once the work queued on a stream before the call has finished
  (for dmabuf / peermem regions, or pinned host regions a kernel fills):
  a CUDA host function posts it from native code, no helper thread.

CUDA graphs: a stream being captured is refused by every call here that
records events or expects host action per message (``UnsupportedError``): the
host half would run once at capture, not at each replay. What captures is the
gate wait itself: ``gate.enqueue_wait(stream, 1, flags=EQ, reset_to=0)``
becomes two memory-op nodes, so a replayed graph waits for the host (or
another stream) to set the flag to 1 and re-arms it (docs/gpu.md).
"""
from __future__ import annotations

import ctypes
import threading
import time
from typing import Any, Callable

from .._bindings import check, error_of, ffi, host_function, lib
from ..errors import ClosedError, InvalidArgumentError, UnsupportedError
from . import cuda


def stream_handle(stream: Any) -> int | None:
    """CUstream handle of an int, a torch.cuda.Stream (.cuda_stream), a cupy Stream (.ptr) or ours (.handle)."""
    if stream is None:
        return None
    if isinstance(stream, bool):
        raise InvalidArgumentError("stream must be a stream object or handle, not a bool")
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr", "handle"):
        value = getattr(stream, attr, None)
        if isinstance(value, int):
            return value
    raise InvalidArgumentError(f"cannot use {type(stream).__name__} as a CUDA stream")


class Transfer:
    """The outcome of one send or receive of a staged link: done(), wait(timeout) -> bytes moved,
    exception(). A native record (lamina.h lm_transfer_t); it holds its buffer's owner until it succeeded
    (a failed one's copies may still be queued on the streams: its link keeps the owner until they are
    idle)."""

    __slots__ = ("kind", "nbytes", "_native", "_owner", "_failure")

    def __init__(self, kind: str, nbytes: int, native: Any, owner: Any):
        self.kind = kind
        self.nbytes = nbytes
        self._native = ffi.gc(native, lib.lm_transfer_release)
        self._owner = owner
        self._failure: BaseException | None = None

    def done(self) -> bool:
        return bool(lib.lm_transfer_done(self._native))

    def exception(self) -> BaseException | None:
        if not self.done():
            return None
        try:
            self.wait(0)
        except BaseException as exc:  # noqa: BLE001 - handed over, not raised
            return exc
        return None

    def wait(self, timeout: float | None = None) -> int:
        """Bytes moved; raises the transfer's error, or TimeoutError if it is still running."""
        if self._failure is not None:
            raise self._failure
        moved = ffi.new("uint64_t *")
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        rc = lib.lm_transfer_wait(self._native, ms, moved)
        if rc == lib.LM_ERR_TIMEOUT:
            if not self.done():
                raise error_of(rc, f"staged {self.kind}")
            rc = lib.lm_transfer_wait(self._native, 0, moved)  # done just after the wait gave up: its outcome
        if rc == 0:
            self._owner = None
            return int(moved[0])
        self._failure = error_of(rc, f"staged {self.kind}")
        raise self._failure

    def succeeded(self) -> bool:
        """Done without error (its copies are done: its buffer is free again)."""
        return self._failure is None and self.done() and lib.lm_transfer_wait(self._native, 0, ffi.NULL) == 0

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self.exception() else "done")
        return f"<Transfer {self.kind} {self.nbytes} B {state}>"


def _cyclic_geq(flag: int, value: int) -> bool:
    """CU_STREAM_WAIT_VALUE_GEQ's test: (int32_t)(flag - value) >= 0."""
    return ((flag - value) & 0xFFFFFFFF) < 0x80000000


class ReceiveGate:
    """A 32-bit flag in host-mapped pinned memory that streams wait on.

    ``enqueue_wait(stream, v)`` holds the stream's later work until the flag
    reaches v (cyclic >=); ``signal_on(stream, v)`` writes v from a stream
    (after the work queued there, with a memory barrier); ``release(v)``
    writes it from the host.
    """

    def __init__(self, device: cuda.Device):
        self.device = device
        self._buf = cuda.PinnedBuffer(device, 64, cuda.CU_MEMHOSTALLOC_PORTABLE | cuda.CU_MEMHOSTALLOC_DEVICEMAP)
        self._flag = ctypes.c_uint32.from_address(self._buf.address)
        self._flag.value = 0
        self.device_address = self._buf.device_address
        self.host_address = self._buf.address  # (native staged links open it from the host on failure)

    @property
    def value(self) -> int:
        return self._flag.value

    def enqueue_wait(self, stream: int | None, value: int, flags: int = cuda.CU_STREAM_WAIT_VALUE_GEQ,
                     reset_to: int | None = None) -> None:
        drv = self.device.driver
        cuda.stream_wait_value32(drv, stream, self.device_address, value, flags)
        if reset_to is not None:
            cuda.stream_write_value32(drv, stream, self.device_address, reset_to)

    def signal_on(self, stream: int | None, value: int) -> None:
        cuda.stream_write_value32(self.device.driver, stream, self.device_address, value)

    def release(self, value: int) -> None:
        """Host store: the waiting streams see it over PCIe (x86 stores to pinned memory are coherent)."""
        self._flag.value = value & 0xFFFFFFFF

    def reached(self, value: int) -> bool:
        return _cyclic_geq(self._flag.value, value)

    def wait_host(self, value: int, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.reached(value):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(20e-6)
        return True

    def close(self) -> None:
        buf, self._buf = self._buf, None
        if buf is not None:
            buf.close()


class EventPool:
    """Recycled CUDA events (no per-message event creation once warm)."""

    def __init__(self, device: cuda.Device, flags: int = cuda.CU_EVENT_DISABLE_TIMING):
        self.device = device
        self.flags = flags
        self._free: list[cuda.Event] = []
        self._lock = threading.Lock()
        self.created = 0

    def get(self) -> cuda.Event:
        with self._lock:
            if self._free:
                return self._free.pop()
            self.created += 1
        return cuda.Event(self.device, self.flags)

    def put(self, event: cuda.Event) -> None:
        with self._lock:
            self._free.append(event)

    def close(self) -> None:
        with self._lock:
            events, self._free = self._free, []
        for ev in events:
            ev.close()


def refuse_capture(device: cuda.Device, stream: int | None, what: str) -> None:
    if stream is not None and cuda.stream_is_capturing(device, stream):
        raise UnsupportedError(f"{what} cannot be captured into a CUDA graph: it needs host action per message "
                               "(capture only the gate wait: ReceiveGate.enqueue_wait with reset_to)")


class StreamOrderedWriter:
    """Posts Endpoint.write once the work queued on a stream before the call has finished.

    For regions the NIC reads directly (dmabuf / peermem device regions, or
    pinned host regions a kernel fills). The write is prepared at once
    (lamina.h "posters": one native poster per endpoint) and a CUDA host
    function queued on the stream (native ``lm_poster_run``) posts it when
    the stream reaches it: no helper thread, no Python between the stream's
    work and the post, and the caller never blocks. ``write`` returns the
    write's wr_id; its completion arrives on the endpoint as usual, and with
    ``notify=True`` an ``Op.POSTED`` completion says when it was posted. A
    write that could not be posted makes no write completion but an
    ``Op.POSTED`` one carrying the error; later writes on that endpoint are
    refused with it. If the stream fails, what is queued behind it is never
    posted (the stream's error says so).
    """

    def __init__(self, device: cuda.Device):
        self.device = device
        self._lock = threading.Lock()
        self._closed = False
        self._posters: dict[int, tuple[Any, Any, Callable[[], None]]] = {}  # id(ep) -> (ep, poster, close hook)

    def write(self, ep: Any, local: Any, remote: Any, *, stream: Any, local_offset: int = 0, remote_offset: int = 0,
              length: int | None = None, imm: int | None = None, wr_id: int | None = None,
              notify: bool = False) -> int:
        handle = stream_handle(stream)
        length = local.nbytes - local_offset if length is None else length
        wr_id = next(ep._wr_ids) if wr_id is None else wr_id
        flags = (lib.LM_WRITE_IMM if imm is not None else 0) | (lib.LM_POSTER_NOTIFY if notify else 0)
        with self.device.activate():
            refuse_capture(self.device, handle, "a stream-ordered write")
            with self._lock:
                if self._closed:
                    raise ClosedError("writer is closed")
                poster = self._poster_of(ep)
                failed = lib.lm_poster_error(poster)
                if failed:
                    raise error_of(failed, f"a stream-ordered write on endpoint {ep.id} failed to post earlier")
                op = ffi.new("lm_poster_op_t **")
                rc = lib.lm_poster_write_prepare(poster, local._handle(), local_offset, length, remote._native,
                                                 remote_offset, imm or 0, flags, wr_id, op)
                if rc < 0:
                    raise error_of(rc, "stream-ordered write")
            arg = ctypes.c_void_p(int(ffi.cast("uintptr_t", op[0])))
            rc = self.device.driver.raw("cuLaunchHostFunc", ctypes.c_void_p(handle or 0),
                                        ctypes.c_void_p(host_function("lm_poster_run")), arg)
        if rc != cuda.CUDA_SUCCESS:
            lib.lm_poster_cancel(op[0])  # never queued: ours to free
            raise self.device.driver.error(rc, "cuLaunchHostFunc (a stream-ordered write)")
        return wr_id

    def _poster_of(self, ep: Any) -> Any:
        """ep's poster (lock held), made at its first write; closed before the endpoint closes."""
        entry = self._posters.get(id(ep))
        if entry is not None and entry[0] is ep:
            return entry[1]
        out = ffi.new("lm_poster_t **")
        check(lib.lm_poster_create(ep._handle(), out), "stream-ordered writer")

        def endpoint_closing() -> None:
            with self._lock:
                if self._posters.get(id(ep), (None,))[0] is ep:
                    del self._posters[id(ep)]
                    lib.lm_poster_destroy(out[0])  # writes still queued behind a stream post nothing now

        self._posters[id(ep)] = (ep, out[0], endpoint_closing)
        ep._before_close.append(endpoint_closing)
        return out[0]

    def pending(self) -> int:
        """Writes queued behind streams and not yet posted."""
        with self._lock:
            return sum(lib.lm_poster_pending(poster) for _, poster, _ in self._posters.values())

    def close(self, timeout: float = 5.0) -> bool:
        """Let queued writes post (up to timeout), then refuse new ones and drop what is still queued (it
        posts nothing when its stream gets there). False if some were dropped."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.001)
        with self._lock:
            self._closed = True
            entries, self._posters = list(self._posters.values()), {}
            dropped = 0
            for ep, poster, hook in entries:
                dropped += lib.lm_poster_pending(poster)
                if hook in ep._before_close:
                    ep._before_close.remove(hook)
                lib.lm_poster_destroy(poster)  # freed with the last op still queued, if any
        return dropped == 0

    def __enter__(self) -> "StreamOrderedWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
