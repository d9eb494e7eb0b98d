"""Staging: device memory over any transport through pinned host bounce buffers.

A :class:`StagedLink` joins two peers over one Endpoint. Each side allocates
ONE pinned host block at setup (cuMemHostAlloc) and registers it as two
regions: ``slots`` transmit slots and ``slots`` receive slots of
``chunk_bytes`` each, plus a small scratch area. Nothing is allocated per
message afterwards (events come from a pool, slots are reused).

Sending a device buffer (``link.send(tensor, stream=s)``):

1. an event is recorded on ``s`` (the stream whose work produces the data)
   and the call returns;
2. for each chunk, as soon as a transmit slot and a credit for a peer receive
   slot are free: the device-to-host copy stream waits on that event (first
   chunk only) and copies the chunk into the slot (cuMemcpyDtoHAsync), and
   behind the copy a CUDA host function (native ``lm_poster_run``) posts a
   write-with-immediate of the slot into the peer's receive slot
   (imm = DATA | last | length): one copy-engine submission and one network
   post per chunk, no Python thread between them, and the copy of chunk
   i+1 overlaps the network transfer of chunk i;
3. the slot is reused when the write completes; the credit comes back
   when the peer has copied the chunk out.

Receiving (``link.recv(tensor, stream=s)``): an event on ``s`` marks when the
destination may be overwritten; ``cuStreamWaitValue32`` on ``s`` holds later
work until the message is in place. Each arriving chunk is copied to the
device on the host-to-device copy stream (which first waits on that event);
after the last one the copy stream writes the gate (cuStreamWriteValue32),
releasing ``s`` without any host synchronisation. Behind each chunk's copy a
host function posts its credit (in slot order); the post of the last one
also delivers an ``Op.POSTED`` completion (LM_POSTER_NOTIFY), which tells the
network thread the message is in place.

The two copy streams are separate and non-blocking: a send ordered after a
gated receive on the same user stream never blocks the receive's copies.

The device side is a :class:`CopyEngine`. :class:`CudaCopyEngine` is the real
one; :class:`HostCopyEngine` treats host memory as the "device" (memmove and
the same native posts on two worker threads) so the protocol is tested where
no GPU exists.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import queue
import struct
import threading
import time
from collections import deque
from typing import Any, Callable, ContextManager

from .._bindings import check, error_of, ffi, host_function, lib, status_text
from ..errors import ClosedError, InvalidArgumentError, ProtocolError, error_for_status
from . import cuda
from .stream import EventPool, ReceiveGate, Transfer, refuse_capture, stream_handle

log = logging.getLogger("lamina_comm.gpu")

DEFAULT_CHUNK = 1 << 20
DEFAULT_SLOTS = 8
MAX_CHUNK = 1 << 28          # chunk lengths travel in 29 bits of the immediate
MAX_SLOTS = 4096
SCRATCH = 64                 # credit writes land here
KIND_DATA = 1
KIND_CREDIT = 2
_LAST = 1 << 29
_LEN_MASK = (1 << 29) - 1
_MAGIC = b"LMGS"
_VERSION = 1
_HELLO = struct.Struct("<4sHHIQ")  # magic, version, flags, slots, chunk bytes; then the rx region descriptor
_CHECK_S = 0.05  # the network thread's wait, and how often it looks for failures that send no completion


def plan_chunks(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of each chunk of an nbytes message; an empty message is one empty chunk."""
    if chunk_bytes <= 0:
        raise InvalidArgumentError(f"chunk size must be positive, got {chunk_bytes}")
    if nbytes < 0:
        raise InvalidArgumentError(f"message size must be >= 0, got {nbytes}")
    if nbytes == 0:
        return [(0, 0)]
    return [(off, min(chunk_bytes, nbytes - off)) for off in range(0, nbytes, chunk_bytes)]


def data_imm(length: int, last: bool) -> int:
    if not 0 <= length <= _LEN_MASK:
        raise InvalidArgumentError(f"chunk of {length} bytes does not fit the immediate")
    return (KIND_DATA << 30) | (_LAST if last else 0) | length


def credit_imm(count: int) -> int:
    return (KIND_CREDIT << 30) | count


def decode_imm(imm: int) -> tuple[int, bool, int]:
    """(kind, last, length-or-count)."""
    return imm >> 30, bool(imm & _LAST), imm & _LEN_MASK


def _slice(address: int, size: int, offset: int, nbytes: int | None) -> tuple[int, int]:
    n = size - offset if nbytes is None else nbytes
    if offset < 0 or n < 0 or offset + n > size:
        raise InvalidArgumentError(f"range [{offset}, +{n}) outside a {size}-byte buffer")
    return address + offset, n


# -- copy engines ------------------------------------------------------------------


class CopyEngine:
    """What a StagedLink needs from the device side (documentation of the interface).

    copy_out / copy_in are asynchronous and ordered on their own stream;
    ``after`` is a marker (a CUDA event: released exactly once by the link)
    the stream waits on before the copy. then_out / then_in queue a native
    post (``lm_poster_run(op)``) behind that stream's copies and own the op
    from the call on: one they cannot queue, they cancel before raising.
    """

    name = "abstract"

    def activate(self) -> ContextManager[None]: ...
    def thread_init(self) -> None: ...
    def resolve(self, obj: Any, offset: int, nbytes: int | None) -> tuple[int, int, Any, int | None]: ...
    def alloc_pinned(self, nbytes: int) -> tuple[int, Callable[[], None]]: ...
    def marker(self, stream: int | None) -> Any: ...
    def copy_out(self, host: int, dev: int, nbytes: int, after: Any) -> None: ...
    def copy_in(self, dev: int, host: int, nbytes: int, after: Any) -> None: ...
    def then_out(self, op: Any) -> None: ...   # lm_poster_run(op) behind the queued copies out
    def then_in(self, op: Any) -> None: ...    # the same behind the copies in (both own op from the call on)
    def check(self) -> None: ...               # raise the copy streams' failure, if any
    def release(self, marker: Any) -> None: ...
    def new_gate(self) -> Any: ...
    def retire_gate(self, gate: Any) -> None: ...
    def gate_wait(self, gate: Any, stream: int, value: int) -> None: ...
    def gate_signal(self, gate: Any, value: int) -> None: ...
    def gate_release(self, gate: Any, value: int) -> None: ...
    def quiesce(self, timeout: float) -> bool: ...
    def close(self, timeout: float = 5.0) -> bool: ...


class CudaCopyEngine(CopyEngine):
    """Device-to-host and host-to-device copy streams (non-blocking) and a pool of events."""

    name = "cuda"
    _retired_gates: dict[int, list[ReceiveGate]] = {}
    _gate_lock = threading.Lock()

    def __init__(self, device: "int | cuda.Device" = 0):
        self.device = device if isinstance(device, cuda.Device) else cuda.get_device(int(device))
        self.driver = self.device.driver
        self._d2h = cuda.Stream(self.device)
        self._h2d = cuda.Stream(self.device)
        self._events = EventPool(self.device)
        self.stats = {"pinned_allocs": 0}

    @property
    def events_created(self) -> int:
        return self._events.created

    def activate(self) -> ContextManager[None]:
        return self.device.activate()

    def thread_init(self) -> None:
        self.device.make_current()

    def resolve(self, obj: Any, offset: int, nbytes: int | None) -> tuple[int, int, Any, int | None]:
        from .memory import cuda_buffer
        buf = cuda_buffer(obj)
        if buf.device != self.device.ordinal:
            raise InvalidArgumentError(f"buffer is on cuda:{buf.device}, this link's engine on cuda:{self.device.ordinal}")
        address, n = _slice(buf.ptr, buf.nbytes, offset, nbytes)
        return address, n, buf.owner, buf.stream

    def alloc_pinned(self, nbytes: int) -> tuple[int, Callable[[], None]]:
        buf = cuda.PinnedBuffer(self.device, nbytes, cuda.CU_MEMHOSTALLOC_PORTABLE)
        self.stats["pinned_allocs"] += 1
        return buf.address, buf.close

    def _record(self, stream: int | None) -> cuda.Event:
        ev = self._events.get()
        try:
            return ev.record(stream)
        except BaseException:
            self._events.put(ev)
            raise

    def marker(self, stream: int | None) -> Any:
        if stream is None:
            return None
        refuse_capture(self.device, stream, "a staged send or receive")
        return self._record(stream)

    def copy_out(self, host: int, dev: int, nbytes: int, after: Any) -> None:
        s = self._d2h.handle
        if after is not None:
            self.driver.call("cuStreamWaitEvent", s, after.handle, 0)
        if nbytes:
            cuda.memcpy_dtoh_async(self.driver, host, dev, nbytes, s)

    def copy_in(self, dev: int, host: int, nbytes: int, after: Any) -> None:
        s = self._h2d.handle
        if after is not None:
            self.driver.call("cuStreamWaitEvent", s, after.handle, 0)
        if nbytes:
            cuda.memcpy_htod_async(self.driver, dev, host, nbytes, s)

    def then_out(self, op: Any) -> None:
        self._then(self._d2h.handle, op)

    def then_in(self, op: Any) -> None:
        self._then(self._h2d.handle, op)

    def _then(self, stream: int, op: Any) -> None:
        from ctypes import c_void_p
        rc = self.driver.raw("cuLaunchHostFunc", c_void_p(stream), c_void_p(host_function("lm_poster_run")),
                             c_void_p(int(ffi.cast("uintptr_t", op))))
        if rc != cuda.CUDA_SUCCESS:
            lib.lm_poster_cancel(op)  # never queued: ours to free
            raise self.driver.error(rc, "cuLaunchHostFunc (a staged link's post)")

    def check(self) -> None:
        """A failed copy stream never runs its host functions: its error fails the link instead."""
        self._d2h.idle()  # raises CudaError for anything but "not ready"
        self._h2d.idle()

    def release(self, marker: Any) -> None:
        self._events.put(marker)

    def new_gate(self) -> ReceiveGate:
        # Gates are never freed: a user stream may still hold a (satisfied) wait on one. Reuse instead.
        with self._gate_lock:
            pool = self._retired_gates.setdefault(self.device.ordinal, [])
            if pool:
                return pool.pop()
        return ReceiveGate(self.device)

    def retire_gate(self, gate: Any) -> None:
        with self._gate_lock:
            self._retired_gates.setdefault(self.device.ordinal, []).append(gate)

    def gate_wait(self, gate: Any, stream: int, value: int) -> None:
        gate.enqueue_wait(stream, value)

    def gate_signal(self, gate: Any, value: int) -> None:
        gate.signal_on(self._h2d.handle, value)

    def gate_release(self, gate: Any, value: int) -> None:
        gate.release(value)
        try:  # also behind anything still queued on the copy stream, so no older value lands last
            gate.signal_on(self._h2d.handle, value)
        except cuda.CudaError:
            pass

    def quiesce(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._d2h.idle() and self._h2d.idle():
                    return True
            except cuda.CudaError:
                return False
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)

    def close(self, timeout: float = 5.0) -> bool:
        """Destroy streams and events once idle; False (and nothing freed) if they stay busy."""
        if self._d2h.handle is None:
            return True
        with self.activate():
            if not self.quiesce(timeout):
                return False
            self._events.close()
            self._d2h.close()
            self._h2d.close()
        return True


class HostGate:
    """The HostCopyEngine's gate: records what a CUDA gate would have been asked to do."""

    def __init__(self) -> None:
        self.value = 0
        self.waits: list[tuple[int, int]] = []
        self.releases: list[int] = []

    def reached(self, value: int) -> bool:
        return ((self.value - value) & 0xFFFFFFFF) < 0x80000000


class _Worker:
    """A FIFO of callables on one thread: the host stand-in for a copy stream."""

    def __init__(self, name: str, delay: float):
        self.delay = delay
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None] | None) -> threading.Event:
        done = threading.Event()
        self._queue.put((fn, done))
        return done

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, done = item
            if self.delay:
                time.sleep(self.delay)
            if fn is not None:
                fn()
            done.set()

    def idle(self) -> bool:
        return self._queue.empty()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)


class HostCopyEngine(CopyEngine):
    """Host memory as the 'device': memmove copies in FIFO order on two worker threads.

    For tests of the staging protocol without a GPU, and for the host-to-host
    baseline of the benchmarks (asynchronous=False copies inline). ``delay``
    slows every copy (seconds) to exercise the waiting paths.
    """

    name = "host"

    def __init__(self, asynchronous: bool = True, delay: float = 0.0):
        self._async = asynchronous
        self._d2h = _Worker("lamina-host-d2h", delay) if asynchronous else None
        self._h2d = _Worker("lamina-host-h2d", delay) if asynchronous else None
        self._keep: list[Any] = []
        self.stats = {"pinned_allocs": 0}
        self.events_created = 0
        self.fail_copy_in: BaseException | None = None  # tests: make the next copy_in raise

    def activate(self) -> ContextManager[None]:
        import contextlib
        return contextlib.nullcontext()

    def thread_init(self) -> None:
        pass

    def resolve(self, obj: Any, offset: int, nbytes: int | None) -> tuple[int, int, Any, int | None]:
        from ..tensors import host_buffer
        buf = host_buffer(obj)
        address, n = _slice(buf.address, buf.nbytes, offset, nbytes)
        return address, n, buf.owner, None

    def alloc_pinned(self, nbytes: int) -> tuple[int, Callable[[], None]]:
        block = ctypes.create_string_buffer(nbytes)
        self._keep.append(block)
        self.stats["pinned_allocs"] += 1
        return ctypes.addressof(block), lambda: self._keep.remove(block)

    def _run(self, worker: _Worker | None, fn: Callable[[], None] | None) -> threading.Event:
        if worker is None:
            done = threading.Event()
            if fn is not None:
                fn()
            done.set()
            return done
        return worker.submit(fn)

    def marker(self, stream: int | None) -> Any:
        return None

    def copy_out(self, host: int, dev: int, nbytes: int, after: Any) -> None:
        self._run(self._d2h, (lambda: ctypes.memmove(host, dev, nbytes)) if nbytes else None)

    def copy_in(self, dev: int, host: int, nbytes: int, after: Any) -> None:
        if self.fail_copy_in is not None:
            exc, self.fail_copy_in = self.fail_copy_in, None
            raise exc
        self._run(self._h2d, (lambda: ctypes.memmove(dev, host, nbytes)) if nbytes else None)

    def then_out(self, op: Any) -> None:
        self._run(self._d2h, lambda: lib.lm_poster_run(op))

    def then_in(self, op: Any) -> None:
        self._run(self._h2d, lambda: lib.lm_poster_run(op))

    def check(self) -> None:
        pass

    def release(self, marker: Any) -> None:
        pass

    def new_gate(self) -> HostGate:
        return HostGate()

    def retire_gate(self, gate: Any) -> None:
        pass

    def gate_wait(self, gate: HostGate, stream: int, value: int) -> None:
        gate.waits.append((stream, value))

    def gate_signal(self, gate: HostGate, value: int) -> None:
        def store() -> None:
            gate.value = value
        self._run(self._h2d, store)

    def gate_release(self, gate: HostGate, value: int) -> None:
        gate.releases.append(value)
        gate.value = value

    def quiesce(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not all(w is None or w.idle() for w in (self._d2h, self._h2d)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        idle = self.quiesce(timeout)
        for w in (self._d2h, self._h2d):
            if w is not None:
                w.close()
        return idle


# -- the link ---------------------------------------------------------------------------



class _Send:
    __slots__ = ("address", "nbytes", "owner", "marker", "chunks", "next", "acked", "transfer")

    def __init__(self, address: int, nbytes: int, owner: Any, marker: Any, chunks: list, transfer: Transfer):
        self.address, self.nbytes, self.owner, self.marker = address, nbytes, owner, marker
        self.chunks, self.next, self.acked, self.transfer = chunks, 0, 0, transfer


class _Recv:
    __slots__ = ("address", "capacity", "owner", "marker", "gate_value", "received", "error", "transfer")

    def __init__(self, address: int, capacity: int, owner: Any, marker: Any, gate_value: int | None,
                 transfer: Transfer):
        self.address, self.capacity, self.owner, self.marker = address, capacity, owner, marker
        self.gate_value, self.received, self.error, self.transfer = gate_value, 0, None, transfer


class StagedLink:
    """Device-to-device messages over one Endpoint, staged through pinned host slots (module docstring).

    Messages are matched in order: the n-th recv() takes the n-th message the
    peer sent. A message may be shorter than the receive buffer (Transfer.wait
    returns the bytes received); a longer one fails that receive.
    """

    def __init__(self, ctx: Any, engine: CopyEngine | None = None, *, device: Any = 0,
                 chunk_bytes: int = DEFAULT_CHUNK, slots: int = DEFAULT_SLOTS):
        from ..tensors import numpy_view
        from ..transport import Access
        if not 64 <= chunk_bytes <= MAX_CHUNK or chunk_bytes % 64:
            raise InvalidArgumentError(f"chunk_bytes must be a multiple of 64 in [64, {MAX_CHUNK}], got {chunk_bytes}")
        if not 1 <= slots <= MAX_SLOTS:
            raise InvalidArgumentError(f"slots must be in [1, {MAX_SLOTS}], got {slots}")
        self.context = ctx
        self._own_engine = engine is None
        self.engine: Any = CudaCopyEngine(device) if engine is None else engine
        self.chunk_bytes = chunk_bytes
        self.slots = slots
        self._side = slots * chunk_bytes + SCRATCH
        self._lock = threading.RLock()
        self._ring_address, self._ring_free = self.engine.alloc_pinned(2 * self._side)
        self._tx_mr = self._rx_mr = None
        try:
            self._tx_mr = ctx.register(numpy_view(self._ring_address, self._side), Access.LOCAL_WRITE)
            self._rx_mr = ctx.register(numpy_view(self._ring_address + self._side, self._side),
                                       Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        except BaseException:
            self._release_memory(True)
            raise
        self._gate = self.engine.new_gate()
        self._gate_seq = getattr(self._gate, "value", 0)
        self._ep: Any = None
        self._error: BaseException | None = None
        self._closed = False
        self._stop = False
        self._wr = itertools.count(1)
        self._tx_free: deque[int] = deque(range(slots))
        self._tx_inflight: dict[int, tuple[_Send, int]] = {}
        self._send_queue: deque[_Send] = deque()
        self._recv_queue: deque[_Recv] = deque()
        self._arrivals: deque[tuple[int, int, bool]] = deque()
        self._rx_next = 0
        self._rx_done: dict[int, _Recv] = {}  # wr_id of a message's last credit -> its receive
        self._active: set[Transfer] = set()
        self._threads: list[threading.Thread] = []
        self._poster: Any = None  # native: posts the writes prepared here, from the copy streams
        self.stats = {"sent": 0, "received": 0, "chunks_sent": 0, "chunks_received": 0, "credits_sent": 0}

    # -- set-up -----------------------------------------------------------------
    def hello(self) -> bytes:
        """Private data for the handshake: geometry and the receive region's descriptor."""
        return _HELLO.pack(_MAGIC, _VERSION, 0, self.slots, self.chunk_bytes) + self._rx_mr.descriptor().to_bytes()

    @classmethod
    def connect(cls, ctx: Any, address: Any, *, timeout: float = 10.0, **kwargs: Any) -> "StagedLink":
        link = cls(ctx, **kwargs)
        try:
            link.attach(ctx.connect(address, private_data=link.hello(), timeout=timeout))
        except BaseException:
            link.close(timeout=0)
            raise
        return link

    @classmethod
    def accept(cls, listener: Any, *, timeout: float | None = None, **kwargs: Any) -> "StagedLink":
        link = cls(listener.context, **kwargs)
        try:
            link.attach(listener.accept(timeout=timeout, private_data=link.hello()))
        except BaseException:
            link.close(timeout=0)
            raise
        return link

    def attach(self, ep: Any) -> None:
        """Start over a connected endpoint whose peer_data is the peer's hello(); the link owns ep."""
        from ..transport import RemoteRegion
        data = ep.peer_data
        if len(data) != _HELLO.size + RemoteRegion.SIZE:
            ep.close()
            raise ProtocolError(f"peer is not a staged link (hello of {len(data)} bytes)")
        magic, version, _flags, slots, chunk = _HELLO.unpack_from(data)
        desc = RemoteRegion.from_bytes(data[_HELLO.size:])
        if magic != _MAGIC or version != _VERSION or not 1 <= slots <= MAX_SLOTS or not 64 <= chunk <= MAX_CHUNK \
                or desc.length < slots * chunk + SCRATCH:
            ep.close()
            raise ProtocolError(f"bad staged-link hello: magic {magic!r} version {version} slots {slots} "
                                f"chunk {chunk} region {desc.length} B")
        self._peer_rx = desc
        self._peer_slots = slots
        self._peer_chunk = chunk
        self._peer_next = 0
        self._credits = slots
        self._send_chunk = min(self.chunk_bytes, chunk)
        self._ep = ep
        poster = ffi.new("lm_poster_t **")
        check(lib.lm_poster_create(ep._handle(), poster), "staged link")
        self._poster = poster[0]
        ep._before_close.append(self._endpoint_closing)
        net = threading.Thread(target=self._net_loop, name="lamina-gpu-net", daemon=True)
        self._threads.append(net)
        net.start()

    # -- public operations ----------------------------------------------------------
    def send(self, obj: Any, *, offset: int = 0, nbytes: int | None = None, stream: Any = None) -> Transfer:
        """Send [offset, +nbytes) of obj as one message; returns at once.

        The copy starts once the work queued on ``stream`` before this call has
        finished (default: the producer's current stream: torch's or cupy's
        current stream, the __cuda_array_interface__ stream, the legacy default
        stream for DLPack). Do not modify the source until the Transfer is done.
        """
        address, n, owner, default_stream = self.engine.resolve(obj, offset, nbytes)
        handle = stream_handle(stream) if stream is not None else default_stream
        transfer = Transfer("send", n)
        with self.engine.activate(), self._lock:
            self._check_usable()
            marker = self.engine.marker(handle)
            self._active.add(transfer)
            self._send_queue.append(_Send(address, n, owner, marker, plan_chunks(n, self._send_chunk), transfer))
            self._guarded(self._pump_send)
        return transfer

    def recv(self, obj: Any, *, offset: int = 0, nbytes: int | None = None, stream: Any = None,
             gate: bool = True) -> Transfer:
        """Receive the next message into [offset, +nbytes) of obj; returns at once.

        Bytes are written once the work queued on ``stream`` before this call
        has finished (default: the consumer's current stream, as for send).
        With gate=True the work queued on that stream after this call waits
        until the message is in place (cuStreamWaitValue32); on failure the
        stream is released anyway and the destination is undefined:
        Transfer.wait() raises the error.
        """
        address, capacity, owner, default_stream = self.engine.resolve(obj, offset, nbytes)
        handle = stream_handle(stream) if stream is not None else default_stream
        transfer = Transfer("recv", capacity)
        with self.engine.activate(), self._lock:
            self._check_usable()
            marker = self.engine.marker(handle)
            gate_value = None
            if gate and handle is not None and self._gate is not None:
                self._gate_seq = (self._gate_seq + 1) & 0xFFFFFFFF
                gate_value = self._gate_seq
                try:
                    self.engine.gate_wait(self._gate, handle, gate_value)
                except BaseException:
                    if marker is not None:
                        self.engine.release(marker)
                    self._gate_seq = (self._gate_seq - 1) & 0xFFFFFFFF
                    raise
            self._active.add(transfer)
            self._recv_queue.append(_Recv(address, capacity, owner, marker, gate_value, transfer))
            self._guarded(self._pump_recv)
        return transfer

    @property
    def error(self) -> BaseException | None:
        return self._error

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedError("staged link is closed")
        if self._ep is None:
            raise InvalidArgumentError("staged link is not attached to an endpoint yet")
        if self._error is not None:
            raise self._error

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:
            self._fail(exc)
            raise

    # -- sending (lock held) ------------------------------------------------------------
    def _pump_send(self) -> None:
        while self._send_queue and self._tx_free and self._credits > 0:
            job = self._send_queue[0]
            offset, n = job.chunks[job.next]
            last = job.next == len(job.chunks) - 1
            slot = self._tx_free.popleft()
            self._credits -= 1
            rslot = self._peer_next
            self._peer_next = (rslot + 1) % self._peer_slots
            after = job.marker if job.next == 0 else None
            wr = next(self._wr)
            op = self._prepare(slot * self.chunk_bytes, rslot * self._peer_chunk, n, data_imm(n, last), wr)
            try:
                self.engine.copy_out(self._ring_address + slot * self.chunk_bytes, job.address + offset, n, after)
            except BaseException:
                lib.lm_poster_cancel(op)
                raise
            self.engine.then_out(op)  # the write into the peer's slot, posted once the chunk is in ours
            self._tx_inflight[wr] = (job, slot)
            self.stats["chunks_sent"] += 1
            if after is not None:
                job.marker = None
                self.engine.release(after)
            job.next += 1
            if last:
                self._send_queue.popleft()

    def _prepare(self, local_offset: int, remote_offset: int, n: int, imm: int, wr: int,
                 notify: bool = False) -> Any:
        """A write of our transmit region into the peer's receive region, posted by lm_poster_run (with
        notify, an Op.POSTED completion says when: the copies queued before it are done)."""
        op = ffi.new("lm_poster_op_t **")
        flags = lib.LM_WRITE_IMM | (lib.LM_POSTER_NOTIFY if notify else 0)
        rc = lib.lm_poster_write_prepare(self._poster, self._tx_mr._handle(), local_offset, n, self._peer_rx._native,
                                         remote_offset, imm, flags, wr, op)
        if rc < 0:
            raise error_of(rc, "staged link")
        return op[0]

    # -- receiving (lock held) ------------------------------------------------------------
    def _pump_recv(self) -> None:
        while self._arrivals and self._recv_queue:
            job = self._recv_queue[0]
            slot, n, last = self._arrivals.popleft()
            if job.error is None and job.received + n > job.capacity:
                job.error = InvalidArgumentError(
                    f"message larger than the {job.capacity}-byte receive buffer (at least {job.received + n} bytes)")
            # The slot's credit, posted behind its copy (in slot order; a dropped chunk's too). The
            # post of a message's last credit says its copies are done (Op.POSTED, on our network thread).
            wr = next(self._wr)
            credit = self._prepare(self.slots * self.chunk_bytes, self._peer_slots * self._peer_chunk, 4,
                                   credit_imm(1), wr, notify=last)
            try:
                if job.error is None:
                    after = job.marker
                    self.engine.copy_in(job.address + job.received, self._rx_slot(slot), n, after)
                    if after is not None:
                        job.marker = None
                        self.engine.release(after)
                    job.received += n
                if last and job.gate_value is not None:
                    self.engine.gate_signal(self._gate, job.gate_value)  # releases the user's stream first
            except BaseException:
                lib.lm_poster_cancel(credit)
                raise
            self.engine.then_in(credit)
            self.stats["credits_sent"] += 1
            if last:
                self._recv_queue.popleft()
                if job.marker is not None:
                    self.engine.release(job.marker)
                    job.marker = None
                self._rx_done[wr] = job

    def _rx_slot(self, slot: int) -> int:
        return self._ring_address + self._side + slot * self.chunk_bytes

    def _recv_done(self, job: _Recv) -> None:
        with self._lock:
            self._active.discard(job.transfer)
            job.owner = None
            if job.error is None:
                self.stats["received"] += 1
            job.transfer._finish(job.error, job.received)

    # -- completions (network thread) ---------------------------------------------------
    def _net_loop(self) -> None:
        try:
            self.engine.thread_init()
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
            return
        ep = self._ep
        next_check = 0.0
        while not self._stop:
            try:
                completions = ep.wait(timeout=_CHECK_S)
                if completions:
                    with self._lock:
                        for c in completions:
                            self._on_completion(c)
                err = ep.error
                now = time.monotonic()
                if now >= next_check:  # failures that send no completion: looked for every _CHECK_S, not per batch
                    next_check = now + _CHECK_S
                    if self._tx_inflight or self._rx_done:
                        self.engine.check()  # a failed copy stream would never post what waits behind it
                    posted = lib.lm_poster_error(self._poster)  # (its notice lost: the queue could not grow)
                    if err is None and posted:  # (its native message belongs to the driver's thread)
                        err = error_for_status(posted, "staged link: a write queued behind a copy could not be "
                                                       f"posted: {status_text(posted)}")
            except BaseException as exc:  # noqa: BLE001 - anything here ends the link, loudly
                if not self._stop:
                    self._fail(exc)
                return
            if err is not None and not self._stop:
                self._fail(err)
                return

    def _on_completion(self, c: Any) -> None:
        from ..transport import Op
        if c.op == Op.WRITE:
            entry = self._tx_inflight.pop(c.wr_id, None)
            if not c.ok:
                self._fail(c.error())
                return
            if entry is None:
                return  # a credit we sent
            job, slot = entry
            self._tx_free.append(slot)
            job.acked += 1
            if job.acked == len(job.chunks):
                self._active.discard(job.transfer)
                job.owner = None
                self.stats["sent"] += 1
                job.transfer._finish(None, job.nbytes)
            self._pump_send()
        elif c.op == Op.POSTED:  # a post behind a copy: the last credit of a message, or a failure
            if not c.ok:
                self._fail(c.error())
                return
            done = self._rx_done.pop(c.wr_id, None)
            if done is not None:  # its copies are done: the message is in place
                self._recv_done(done)
        elif c.op == Op.RECV_IMM and c.imm is not None:
            kind, last, value = decode_imm(c.imm)
            if kind == KIND_DATA:
                if value > self.chunk_bytes:
                    raise ProtocolError(f"peer sent a {value}-byte chunk into {self.chunk_bytes}-byte slots")
                self._arrivals.append((self._rx_next, value, last))
                self._rx_next = (self._rx_next + 1) % self.slots
                self.stats["chunks_received"] += 1
                self._pump_recv()
            elif kind == KIND_CREDIT:
                self._credits += value
                if self._credits > self._peer_slots:
                    raise ProtocolError(f"peer returned more credits than it has slots ({self._credits})")
                self._pump_send()
            else:
                raise ProtocolError(f"unknown staged-link immediate 0x{c.imm:08x}")
        else:
            raise ProtocolError(f"unexpected completion on a staged link: {c.op.name} status {c.status}")

    # -- failure and shutdown ---------------------------------------------------------------
    def _endpoint_closing(self) -> None:
        """The endpoint goes (Context.close with the link still open): nothing may post on it any more,
        and the network thread must stop waiting on its context."""
        self._stop = True
        self._fail(ClosedError("staged link: its endpoint was closed"))  # closes the poster
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(1.0)

    def _fail(self, exc: BaseException) -> None:
        """Fail every pending transfer with exc and open the gate so no stream waits forever."""
        with self._lock:
            if self._error is not None:
                return
            self._error = exc
            if not isinstance(exc, ClosedError):
                log.warning("staged link failed: %s", exc)
            if self._poster is not None:
                lib.lm_poster_close(self._poster)  # nothing more goes out, also what is queued behind copies
            self._rx_done.clear()
            active, self._active = self._active, set()
            markers = [j.marker for j in self._send_queue if j.marker is not None]
            markers += [j.marker for j in self._recv_queue if j.marker is not None]
            self._send_queue.clear()
            self._recv_queue.clear()
            self._arrivals.clear()
            for m in markers:
                try:
                    self.engine.release(m)
                except BaseException:  # noqa: BLE001
                    pass
            if self._gate is not None:
                try:
                    with self.engine.activate():
                        self.engine.gate_release(self._gate, self._gate_seq)
                except BaseException as gate_exc:  # noqa: BLE001
                    log.error("could not release the receive gate: %s", gate_exc)
            for t in active:
                t._finish(exc, 0)

    def close(self, timeout: float = 5.0) -> None:
        """Let queued sends finish (up to timeout), then fail the rest, stop, and free the ring."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        while self._error is None and self._ep is not None and time.monotonic() < deadline:
            with self._lock:
                sending = any(t.kind == "send" for t in self._active)
            if not sending:
                break
            time.sleep(0.001)
        self._closed = True
        self._fail(ClosedError("staged link closed"))
        self._stop = True
        if self._poster is not None:
            lib.lm_poster_close(self._poster)  # writes still queued behind copies post nothing from now on
        if self._ep is not None:
            self._ep.close()
        stopped = True
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.5, timeout))
                stopped = stopped and not t.is_alive()
        with self.engine.activate():
            idle = self.engine.quiesce(max(0.5, timeout))
            self._release_memory(idle)
            if self._own_engine:
                self.engine.close(0.5)
        if self._poster is not None and stopped:  # (a network thread still running reads it: leaked then)
            lib.lm_poster_destroy(self._poster)  # freed with the last op still queued, if any
            self._poster = None

    def _release_memory(self, idle: bool) -> None:
        for mr in (self._tx_mr, self._rx_mr):
            if mr is not None:
                mr.close()
        gate, self._gate = getattr(self, "_gate", None), None
        if gate is not None:
            self.engine.retire_gate(gate)
        if idle:
            self._ring_free()
        else:
            log.error("staged link closed while copies were still queued; its pinned ring is leaked, not freed")

    def __enter__(self) -> "StagedLink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("failed" if self._error else "open")
        return (f"<StagedLink {self.engine.name} {self.slots}x{self.chunk_bytes} B {state}>")


__all__ = ["StagedLink", "CopyEngine", "CudaCopyEngine", "HostCopyEngine", "plan_chunks", "Transfer",
           "DEFAULT_CHUNK", "DEFAULT_SLOTS"]
