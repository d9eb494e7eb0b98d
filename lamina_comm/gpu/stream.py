"""Stream ordering: sends that start when a stream's queued work is done, receives that release a stream.

Pieces (used by :class:`lamina_comm.gpu.staging.StagedLink`, usable alone):

* :func:`stream_handle` turns a torch / cupy / raw stream into a CUstream handle.
* :class:`Transfer` is what a send or receive returns: ``done()``, ``wait()``,
  ``exception()``; errors arrive there, never as a dead process.
* :class:`Waiter` is a helper thread that waits for tickets (CUDA events) in
  FIFO order, then runs each one's callback: "the sender waits on the event,
  then posts", without blocking the caller.
* :class:`ReceiveGate` is a 32-bit flag in host-mapped pinned memory. A
  receive enqueues ``cuStreamWaitValue32(stream, flag, seq, GEQ)`` on the
  caller's stream and returns at once; the kernels queued after it are
  released when the flag reaches ``seq``, which the staging copy stream
  writes (``cuStreamWriteValue32``) right after the last host-to-device copy
  of that message, or the host writes on failure so a stream never hangs.
* :class:`StreamOrderedWriter` posts ``Endpoint.write`` from a registered
  region once the work queued on a stream before the call has finished
  (for dmabuf / peermem regions, or pinned host regions a kernel fills).

CUDA graphs: a stream being captured is refused by every call here that
records events or expects host action per message (``UnsupportedError``): the
host half would run once at capture, not at each replay. What captures is the
gate wait itself: ``gate.enqueue_wait(stream, 1, flags=EQ, reset_to=0)``
becomes two memory-op nodes, so a replayed graph waits for the host (or
another stream) to set the flag to 1 and re-arms it (docs/gpu.md).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import queue
import threading
import time
from typing import Any, Callable

from ..errors import ClosedError, InvalidArgumentError, LaminaError, TimeoutError_, UnsupportedError
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
    """The outcome of one send or receive: done(), wait(timeout) -> bytes moved, exception()."""

    __slots__ = ("kind", "nbytes", "_event", "_error", "_moved")

    def __init__(self, kind: str, nbytes: int):
        self.kind = kind
        self.nbytes = nbytes
        self._event = threading.Event()
        self._error: BaseException | None = None
        self._moved = 0

    def _finish(self, error: BaseException | None = None, moved: int | None = None) -> None:
        if self._event.is_set():
            return
        self._error = error
        self._moved = self.nbytes if moved is None else moved
        self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    def exception(self) -> BaseException | None:
        return self._error if self._event.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        """Bytes moved; raises the transfer's error, or TimeoutError if it is still running."""
        if not self._event.wait(timeout):
            raise TimeoutError_(f"{self.kind} of {self.nbytes} bytes not done within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._moved

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._error else "done")
        return f"<Transfer {self.kind} {self.nbytes} B {state}>"


_STOP = object()


class Waiter:
    """A thread that waits for tickets in FIFO order and runs each one's callback after it.

    wait_fn(ticket) blocks until the ticket is done (GIL released: cuEventSynchronize);
    release_fn(ticket) recycles it. A ticket of None runs its callback after
    every earlier callback (ordering without a device wait). An exception from
    wait_fn or a callback goes to on_error and the callback is skipped.
    """

    def __init__(self, name: str, wait_fn: Callable[[Any], None], release_fn: Callable[[Any], None],
                 on_error: Callable[[BaseException], None], thread_init: Callable[[], None] | None = None):
        self._wait_fn = wait_fn
        self._release_fn = release_fn
        self._on_error = on_error
        self._thread_init = thread_init
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, ticket: Any, callback: Callable[[], None]) -> None:
        self._queue.put((ticket, callback))

    def _run(self) -> None:
        if self._thread_init is not None:
            try:
                self._thread_init()
            except BaseException as exc:  # noqa: BLE001 - reported, then the thread drains
                self._on_error(exc)
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            ticket, callback = item
            ok = True
            if ticket is not None:
                try:
                    self._wait_fn(ticket)
                except BaseException as exc:  # noqa: BLE001
                    ok = False
                    self._on_error(exc)
                finally:
                    try:
                        self._release_fn(ticket)
                    except BaseException:  # noqa: BLE001 - recycling is best effort
                        pass
            if ok:
                try:
                    callback()
                except BaseException as exc:  # noqa: BLE001
                    self._on_error(exc)

    def close(self, timeout: float = 5.0) -> bool:
        """Stop after the queued tickets; False if the thread is still stuck in a wait."""
        self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()


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


class _GuardedTicket:
    """An event whose wait failure is also reported to one future (StreamOrderedWriter)."""

    __slots__ = ("event", "on_error")

    def __init__(self, event: cuda.Event, on_error: Callable[[BaseException], None]):
        self.event = event
        self.on_error = on_error

    def synchronize(self) -> None:
        try:
            self.event.synchronize()
        except BaseException as exc:  # noqa: BLE001
            self.on_error(exc)
            raise


class StreamOrderedWriter:
    """Posts Endpoint.write once the work queued on a stream before the call has finished.

    The caller never blocks: an event is recorded on the stream and a helper
    thread waits on it, then posts. For regions the NIC reads directly
    (dmabuf / peermem device regions, or pinned host regions a kernel fills).
    The returned future resolves to the write's wr_id (its completion then
    arrives on the endpoint as usual) or to the error that prevented posting.
    """

    def __init__(self, device: cuda.Device):
        self.device = device
        self._events = EventPool(device)
        self._closed = False
        self.errors: list[BaseException] = []
        self._waiter = Waiter("lamina-gpu-writer", lambda t: t.synchronize(), lambda t: self._events.put(t.event),
                              self.errors.append, device.make_current)

    def write(self, ep: Any, local: Any, remote: Any, *, stream: Any, **kwargs: Any) -> concurrent.futures.Future:
        if self._closed:
            raise ClosedError("writer is closed")
        handle = stream_handle(stream)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.device.activate():
            refuse_capture(self.device, handle, "a stream-ordered write")
            ev = self._events.get()
            try:
                ev.record(handle)
            except BaseException:
                self._events.put(ev)
                raise

        def post() -> None:
            try:
                future.set_result(ep.write(local, remote, **kwargs))
            except LaminaError as exc:
                future.set_exception(exc)

        def failed(exc: BaseException) -> None:
            if not future.done():
                future.set_exception(exc)

        self._waiter.put(_GuardedTicket(ev, failed), post)
        return future

    def close(self, timeout: float = 5.0) -> None:
        self._closed = True
        if self._waiter.close(timeout):
            self._events.close()
