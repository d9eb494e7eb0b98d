"""Staging: device memory over any transport through pinned host bounce buffers.

A :class:`StagedLink` joins two peers over one Endpoint. Each side allocates
ONE pinned host block at setup (cuMemHostAlloc) and registers it as two
regions: ``slots`` transmit slots and ``slots`` receive slots of
``chunk_bytes`` each, plus a small scratch area. Python sets the link up
(ring, regions, hello, receive gate); every message then goes to native code
(lamina.h "staged links", native/src/staged/), which takes the endpoint's
completions on a thread of its own: no Python runs per chunk. Nothing is
allocated per message but a small native record (events come from a pool,
slots are reused).

Sending a device buffer (``link.send(tensor, stream=s)``):

1. an event is recorded on ``s`` (the stream whose work produces the data)
   and the call returns;
2. for each chunk, as soon as a transmit slot and a credit for a peer receive
   slot are free (at once, or on the link's native thread when a write
   completes or a credit arrives): the device-to-host copy stream waits on
   that event (first chunk only) and copies the chunk into the slot
   (cuMemcpyDtoHAsync), and behind the copy a CUDA host function
   (``lm_poster_run``) posts a write-with-immediate of the slot into the
   peer's receive slot (imm = DATA | last | length): one copy-engine
   submission and one network post per chunk, and the copy of chunk i+1
   overlaps the network transfer of chunk i;
3. the slot is reused when the write completes; the credit comes back
   when the peer has copied the chunk out.

Receiving (``link.recv(tensor, stream=s)``): an event on ``s`` marks when the
destination may be overwritten; ``cuStreamWaitValue32`` on ``s`` holds later
work until the message is in place. Each arriving chunk is copied to the
device on the host-to-device copy stream (which first waits on that event),
queued by the link's native thread; after the last one the copy stream
writes the gate (cuStreamWriteValue32), releasing ``s`` without any host
synchronisation. Behind each chunk's copy a host function posts its credit
(in slot order); the post of the last one also delivers an ``Op.POSTED``
completion (LM_POSTER_NOTIFY) to the link, which says the message is in place
(``Transfer.wait()`` returns).

The two copy streams are separate and non-blocking: a send ordered after a
gated receive on the same user stream never blocks the receive's copies.

The device side is a :class:`CopyEngine`: the table of driver entry points
native code calls. :class:`CudaCopyEngine` is the real one;
:class:`HostCopyEngine` treats host memory as the "device" (native worker
threads standing in for the streams) so the protocol is tested where no GPU
exists.
"""
from __future__ import annotations

import ctypes
import logging
import struct
import threading
import time
from collections import deque
from typing import Any, Callable, ContextManager

from .._bindings import check, error_of, ffi, lib
from ..errors import ClosedError, InvalidArgumentError, ProtocolError, error_for_status
from . import cuda
from .stream import ReceiveGate, Transfer, refuse_capture, stream_handle

log = logging.getLogger("lamina_comm.gpu")

DEFAULT_CHUNK = 1 << 20
DEFAULT_SLOTS = 8
MAX_CHUNK = 1 << 28          # chunk lengths travel in 29 bits of the immediate
MAX_SLOTS = 4096
SCRATCH = lib.LM_STAGED_SCRATCH  # credit writes land here
KIND_DATA = 1
KIND_CREDIT = 2
_LAST = 1 << 29
_LEN_MASK = (1 << 29) - 1
_MAGIC = b"LMGS"
_VERSION = 1
_HELLO = struct.Struct("<4sHHIQ")  # magic, version, flags, slots, chunk bytes; then the rx region descriptor


# The wire format in Python (docs/gpu.md): the data plane is native (native/src/staged/staged.c), these
# describe what it does for tools and tests (a link's chunk counts match plan_chunks).


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
    """What a StagedLink needs of a device: its memory, and the copy engine native code drives.

    ``copy_fns()`` is the native table (lamina.h ``lm_copy_fns_t``) the link's
    data plane calls per chunk; the rest runs at set-up and per message, in
    Python.
    """

    name = "abstract"

    def activate(self) -> ContextManager[None]: ...
    def resolve(self, obj: Any, offset: int, nbytes: int | None) -> tuple[int, int, Any, int | None]: ...
    def alloc_pinned(self, nbytes: int) -> tuple[int, Callable[[], None]]: ...
    def copy_fns(self) -> Any: ...                        # an lm_copy_fns_t * filled for this engine
    def ordered(self, stream: int | None) -> bool: ...    # record the stream's order (refuses a capturing stream)
    def new_gate(self) -> Any: ...                        # None: no gated receives
    def retire_gate(self, gate: Any) -> None: ...
    def gate_wait(self, gate: Any, stream: int, value: int) -> None: ...
    def quiesce(self, timeout: float) -> bool: ...
    def close(self, timeout: float = 5.0) -> bool: ...


class CudaCopyEngine(CopyEngine):
    """Device-to-host and host-to-device copy streams (non-blocking); the driver's entry points for native code."""

    name = "cuda"
    _retired_gates: dict[int, list[ReceiveGate]] = {}
    _gate_lock = threading.Lock()

    def __init__(self, device: "int | cuda.Device" = 0):
        self.device = device if isinstance(device, cuda.Device) else cuda.get_device(int(device))
        self.driver = self.device.driver
        self._d2h = cuda.Stream(self.device)
        self._h2d = cuda.Stream(self.device)
        self.stats = {"pinned_allocs": 0}

    def activate(self) -> ContextManager[None]:
        return self.device.activate()

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

    def copy_fns(self) -> Any:
        fns = ffi.new("lm_copy_fns_t *")
        table = {"memcpy_dtoh": "cuMemcpyDtoHAsync", "memcpy_htod": "cuMemcpyHtoDAsync",
                 "launch_host_func": "cuLaunchHostFunc", "stream_wait_event": "cuStreamWaitEvent",
                 "stream_query": "cuStreamQuery", "event_create": "cuEventCreate", "event_record": "cuEventRecord",
                 "event_destroy": "cuEventDestroy", "ctx_set_current": "cuCtxSetCurrent"}
        if self.driver.has("cuStreamWriteValue32"):
            table["stream_write_value32"] = "cuStreamWriteValue32"
        for field, name in table.items():
            setattr(fns, field, ffi.cast(ffi.typeof(getattr(fns, field)), self.driver.address(name)))
        fns.context = ffi.cast("void *", self.device.context)
        fns.d2h = ffi.cast("void *", self._d2h.handle)
        fns.h2d = ffi.cast("void *", self._h2d.handle)
        return fns

    def ordered(self, stream: int | None) -> bool:
        if stream is None:
            return False
        refuse_capture(self.device, stream, "a staged send or receive")
        return True

    def new_gate(self) -> ReceiveGate | None:
        if not (self.driver.has("cuStreamWaitValue32") and self.driver.has("cuStreamWriteValue32")):
            return None  # (receives are then not gated: Transfer.wait() says when the bytes are in place)
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
        """Destroy the streams once idle; False (and nothing freed) if they stay busy."""
        if self._d2h.handle is None:
            return True
        with self.activate():
            if not self.quiesce(timeout):
                return False
            self._d2h.close()
            self._h2d.close()
        return True


class HostGate:
    """The HostCopyEngine's gate: a host word the copy "stream" writes, and what a CUDA gate was asked."""

    def __init__(self) -> None:
        self._word = ctypes.c_uint32(0)
        self.device_address = self.host_address = ctypes.addressof(self._word)
        self.waits: list[tuple[int, int]] = []

    @property
    def value(self) -> int:
        return self._word.value


class HostCopyEngine(CopyEngine):
    """Host memory as the 'device': copies in order on two native worker threads standing in for streams.

    For tests of the staging protocol without a GPU, and for the host-to-host
    baseline of the benchmarks (asynchronous=False: copies and the posts
    behind them run at once, in the call). ``delay`` slows every piece of
    stream work (seconds) to exercise the waiting paths.
    """

    name = "host"

    def __init__(self, asynchronous: bool = True, delay: float = 0.0):
        self._streams: list[Any] = []
        if asynchronous:
            for _ in range(2):
                out = ffi.new("lm_host_stream_t **")
                check(lib.lm_host_stream_create(int(delay * 1e6), out), "host copy engine")
                self._streams.append(out[0])
        self._keep: list[Any] = []
        self.stats = {"pinned_allocs": 0}

    def activate(self) -> ContextManager[None]:
        import contextlib
        return contextlib.nullcontext()

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

    def copy_fns(self) -> Any:
        fns = ffi.new("lm_copy_fns_t *")
        lib.lm_host_copy_fns(fns)
        if self._streams:
            fns.d2h, fns.h2d = self._streams
        return fns

    def fail_next_copy_in(self) -> None:
        """Tests: the copy engine refuses the next copy into the "device" (asynchronous engines only)."""
        if not self._streams:
            raise InvalidArgumentError("only an asynchronous host engine can fail a copy")
        lib.lm_host_stream_fail_next_copy(self._streams[1])

    def ordered(self, stream: int | None) -> bool:
        return False  # host memory: no device work to wait for

    def new_gate(self) -> HostGate:
        return HostGate()

    def retire_gate(self, gate: Any) -> None:
        pass

    def gate_wait(self, gate: HostGate, stream: int, value: int) -> None:
        gate.waits.append((stream, value))

    def quiesce(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not all(lib.lm_host_stream_idle(hs) for hs in self._streams):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        idle = self.quiesce(timeout)
        streams, self._streams = self._streams, []
        for hs in streams:
            lib.lm_host_stream_destroy(hs)  # (runs what is still queued first)
        return idle


# -- the link ---------------------------------------------------------------------------


_STATS = ("sent", "received", "chunks_sent", "chunks_received", "credits_sent", "posts_pending", "events_created")


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
        self._lock = threading.Lock()
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
        self._native: Any = None  # lamina.h lm_staged_t: the data plane
        self._final_stats = dict.fromkeys(_STATS, 0)
        self._error: BaseException | None = None
        self._closed = False
        # Transfers not known to be done, in order, holding their buffers' owners (pruned as they finish);
        # the owners of failed ones, kept until close() finds the copy streams idle.
        self._pending: deque[Transfer] = deque()
        self._failed_owners: list[Any] = []

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
        params = ffi.new("lm_staged_params_t *")
        params.tx, params.rx = self._tx_mr._handle(), self._rx_mr._handle()
        params.slots, params.chunk_bytes = self.slots, self.chunk_bytes
        params.peer_rx = desc._native[0]
        params.peer_slots, params.peer_chunk_bytes = slots, chunk
        if self._gate is not None:
            params.gate_device = self._gate.device_address
            params.gate_host = ffi.cast("uint32_t *", self._gate.host_address)
        out = ffi.new("lm_staged_t **")
        with self.engine.activate():
            rc = lib.lm_staged_create(ep._handle(), self.engine.copy_fns(), params, out)
        if rc < 0:
            error = error_of(rc, "staged link")
            ep.close()
            raise error
        self._ep = ep
        self._native = out[0]
        ep._before_close.append(self._endpoint_closing)

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
        out = ffi.new("lm_transfer_t **")
        with self.engine.activate(), self._lock:
            self._check_usable()
            ordered = self.engine.ordered(handle)
            rc = lib.lm_staged_send(self._native, address, n, ffi.cast("void *", handle or 0), ordered, out)
            if rc < 0:
                raise self._refused(rc, "staged send")
            return self._keep(Transfer("send", n, out[0], owner))

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
        out = ffi.new("lm_transfer_t **")
        with self.engine.activate(), self._lock:
            self._check_usable()
            ordered = self.engine.ordered(handle)
            gate_value = 0
            gated = gate and handle is not None and self._gate is not None
            if gated:
                gate_value = (self._gate_seq + 1) & 0xFFFFFFFF
                self.engine.gate_wait(self._gate, handle, gate_value)
                self._gate_seq = gate_value
            rc = lib.lm_staged_recv(self._native, address, capacity, ffi.cast("void *", handle or 0), ordered,
                                    gated, gate_value, out)
            if rc < 0:  # (the link failed, and opened the gate for the wait queued above)
                raise self._refused(rc, "staged receive")
            return self._keep(Transfer("recv", capacity, out[0], owner))

    @property
    def error(self) -> BaseException | None:
        """What failed the link (None while it works)."""
        if self._closed and self._error is None:
            return ClosedError("staged link closed")
        if self._error is None and self._native is not None:
            text = ffi.new("char[]", 256)
            rc = lib.lm_staged_error(self._native, text, 256)
            if rc:
                self._error = error_for_status(rc, ffi.string(text).decode(errors="replace"))
        return self._error

    @property
    def stats(self) -> dict[str, int]:
        """Messages and chunks moved, credits sent, posts still queued, stream-order events made."""
        if self._native is None:
            return dict(self._final_stats)
        out = ffi.new("lm_staged_stats_t *")
        lib.lm_staged_stats(self._native, out)
        return {name: int(getattr(out, name)) for name in _STATS}

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedError("staged link is closed")
        if self._native is None:
            raise InvalidArgumentError("staged link is not attached to an endpoint yet")
        error = self.error
        if error is not None:
            raise error

    def _refused(self, rc: int, what: str) -> BaseException:
        return self.error or error_of(rc, what)

    def _keep(self, transfer: Transfer) -> Transfer:
        """Hold transfer (and through it its buffer) until done; let go of those done at the front."""
        pending = self._pending
        while pending and pending[0].done():
            done = pending.popleft()
            if done._owner is not None and not done.succeeded():
                self._failed_owners.append(done._owner)
            done._owner = None
        pending.append(transfer)
        return transfer

    # -- shutdown ---------------------------------------------------------------------
    def _endpoint_closing(self) -> None:
        """The endpoint goes (Context.close with the link still open): the data plane stops first, posts
        nothing more and lets go of it; its transfers fail."""
        if self._native is not None:
            with self.engine.activate():  # (failing opens the gate, behind the copy stream too)
                lib.lm_staged_shutdown(self._native, lib.LM_ERR_CLOSED, b"staged link: its endpoint was closed")

    def close(self, timeout: float = 5.0) -> None:
        """Let queued sends finish (up to timeout), then fail the rest, stop, and free the ring."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        native = self._native
        while native is not None and lib.lm_staged_sending(native) and self.error is None \
                and time.monotonic() < deadline:
            time.sleep(0.001)
        self._closed = True
        if native is not None:
            self._final_stats = self.stats
            self._native = None  # (the endpoint's close hook below must not reach it any more)
            with self.engine.activate():
                lib.lm_staged_destroy(native)  # fails what is pending; transfers keep their records
        if self._ep is not None:
            if self._endpoint_closing in self._ep._before_close:
                self._ep._before_close.remove(self._endpoint_closing)
            self._ep.close()
        with self.engine.activate():
            idle = self.engine.quiesce(max(0.5, timeout))
            self._release_memory(idle)
            if self._own_engine:
                self.engine.close(0.5)
        if idle:  # nothing queued reads or writes the buffers of failed transfers any more
            self._failed_owners.clear()
            for transfer in self._pending:
                if transfer.done():
                    transfer._owner = None

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
            self._busy_gate = gate  # (a store to it may still be queued)
            log.error("staged link closed while copies were still queued; its pinned ring is leaked, not freed")

    def __enter__(self) -> "StagedLink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("failed" if self.error else "open")
        return (f"<StagedLink {self.engine.name} {self.slots}x{self.chunk_bytes} B {state}>")


__all__ = ["StagedLink", "CopyEngine", "CudaCopyEngine", "HostCopyEngine", "plan_chunks", "Transfer",
           "DEFAULT_CHUNK", "DEFAULT_SLOTS"]
