"""Context, MemoryRegion, Endpoint, Listener: the Python face of the native library.

Python objects own native handles and close deterministically (context
managers, or close()); closing a Context closes everything it made. Every
failure raises a typed exception from lamina_comm.errors.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import itertools
import logging
import os
import socket
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import numpy as np

from . import bootstrap
from ._bindings import check, ffi, lib, status_text
from .errors import ClosedError, InvalidArgumentError, LaminaError, TimeoutError_, error_for_status
from .tensors import host_buffer, numpy_view

if TYPE_CHECKING:
    from .gpu.memory import CudaRegion

log = logging.getLogger("lamina_comm")

DEFAULT_CONNECT_TIMEOUT = 10.0
# Bound on the steps of accept() after a peer authenticated (reply, endpoint set-up).
DEFAULT_HANDSHAKE_TIMEOUT = bootstrap.DEFAULT_HANDSHAKE_TIMEOUT


class Access(enum.IntFlag):
    LOCAL_WRITE = lib.LM_ACCESS_LOCAL_WRITE
    REMOTE_WRITE = lib.LM_ACCESS_REMOTE_WRITE
    REMOTE_READ = lib.LM_ACCESS_REMOTE_READ
    ALL = LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ


class Op(enum.IntEnum):
    WRITE = lib.LM_OP_WRITE        # our write finished (initiator)
    READ = lib.LM_OP_READ          # our read finished (initiator)
    RECV_IMM = lib.LM_OP_RECV_IMM  # a peer's write with immediate landed here
    REFUSED = lib.LM_OP_REFUSED    # a peer's write or read aimed here was refused
    POSTED = lib.LM_OP_POSTED      # a poster's deferred write was posted (or failed to be): lamina.h "posters"


_OPS = {op.value: op for op in Op}  # enum lookup by call is slow on the completion path
_CF_IMM = lib.LM_CF_IMM
_CAPS = {"zero_copy_send": lib.LM_CAP_ZERO_COPY_SEND, "zero_copy_recv": lib.LM_CAP_ZERO_COPY_RECV,
         "remote_ack": lib.LM_CAP_REMOTE_ACK, "hw_offload": lib.LM_CAP_HW_OFFLOAD}

TRANSPORT_IDS = {"tcp": lib.LM_TRANSPORT_TCP, "verbs": lib.LM_TRANSPORT_VERBS, "shm": lib.LM_TRANSPORT_SHM}
TRANSPORT_CHOICES = ("auto", *TRANSPORT_IDS)
TRANSPORT_NAMES = {v: k for k, v in TRANSPORT_IDS.items()}


@dataclasses.dataclass(frozen=True)
class RemoteRegion:
    """A peer's region descriptor: what a write or read targets. Plain data."""

    key: int
    addr: int
    length: int
    rkey: int = 0
    access: int = int(Access.ALL)

    _PACK = struct.Struct("<QQQII")
    SIZE = _PACK.size

    def to_bytes(self) -> bytes:
        return self._PACK.pack(self.key, self.addr, self.length, self.rkey, self.access)

    @classmethod
    def from_bytes(cls, data: bytes) -> "RemoteRegion":
        if len(data) != cls.SIZE:
            raise InvalidArgumentError(f"a region descriptor is {cls.SIZE} bytes, got {len(data)}")
        return cls(*cls._PACK.unpack(data))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RemoteRegion":
        return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls) if f.name in d})

    @functools.cached_property
    def _native(self):
        # Built once per descriptor: writes on the hot path reuse it.
        return ffi.new("lm_rdesc_t *", {"key": self.key, "addr": self.addr, "length": self.length,
                                        "rkey": self.rkey, "access": self.access})


class Completion(NamedTuple):
    """One finished operation (a tuple: cheap to make on the completion path)."""

    op: Op
    status: int
    endpoint: "Endpoint | None"
    wr_id: int
    byte_len: int
    imm: int | None

    @property
    def ok(self) -> bool:
        return self.status == 0

    def error(self) -> LaminaError | None:
        if self.ok:
            return None
        return error_for_status(self.status, f"{self.op.name.lower()} failed: {status_text(self.status)}")

    def raise_for_status(self) -> "Completion":
        err = self.error()
        if err is not None:
            raise err
        return self


class SharedMemory:
    """Host memory a peer on this host may map: shm writes into a region over it take one copy (the
    writer copies straight into these pages) instead of two through the ring. Whole pages of a sealed
    memfd; freed once nothing uses it (its arrays, the regions over it). ``Context.alloc`` makes one
    and registers it."""

    def __init__(self, nbytes: int):
        if nbytes <= 0:
            raise InvalidArgumentError(f"SharedMemory needs a positive size, got {nbytes}")
        out = ffi.new("lm_shmem_t **")
        check(lib.lm_shmem_alloc(nbytes, out), "shared memory")
        self._shmem = ffi.gc(out[0], lib.lm_shmem_free)
        self.address = int(ffi.cast("uintptr_t", lib.lm_shmem_addr(self._shmem)))
        self.nbytes = int(lib.lm_shmem_length(self._shmem))

    def array(self, dtype: Any = "uint8", shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A numpy array over the memory (it keeps the memory alive)."""
        nbytes = self.nbytes if shape is None else int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes > self.nbytes:
            raise InvalidArgumentError(f"{shape} of {dtype} needs {nbytes} bytes; the memory has {self.nbytes}")
        return numpy_view(self.address, nbytes, dtype, shape, owner=self)

    def __repr__(self) -> str:
        return f"<SharedMemory {self.nbytes} B at 0x{self.address:x}>"


class MemoryRegion:
    """Registered memory. It keeps the object it was made from alive until close()
    (or the context's close): dropping the last Python reference does not
    deregister it."""

    def __init__(self, ctx: "Context", obj: Any, access: Access):
        self.context = ctx
        self.access = access
        out = ffi.new("lm_mr_t **")
        if isinstance(obj, SharedMemory):  # the whole allocation, mappable by shm peers
            self.address, self.nbytes, self.path, self._owner = obj.address, obj.nbytes, "shared", obj
            self._shared = obj  # views keep the memory itself alive, also past close()
            check(lib.lm_mr_register_shmem(ctx._handle(), obj._shmem, int(access), out), "register")
        else:
            buf = host_buffer(obj)
            if access & (Access.LOCAL_WRITE | Access.REMOTE_WRITE) and not buf.writable:
                raise InvalidArgumentError("read-only memory can only be registered with Access.REMOTE_READ")
            self.address, self.nbytes, self.path, self._owner = buf.address, buf.nbytes, "host", buf.owner
            self._shared = None
            check(lib.lm_mr_register(ctx._handle(), ffi.cast("void *", buf.address), buf.nbytes, int(access),
                                     out), "register")
        self._mr = out[0]
        desc = ffi.new("lm_rdesc_t *")
        check(lib.lm_mr_descriptor(self._mr, desc), "descriptor")
        self._desc = RemoteRegion(desc.key, desc.addr, desc.length, desc.rkey, desc.access)

    def descriptor(self) -> RemoteRegion:
        return self._desc

    def _handle(self):
        if self._mr is None:
            raise ClosedError("memory region is deregistered")
        return self._mr

    def contains(self, address: int, nbytes: int = 1) -> bool:
        return self.address <= address and address + nbytes <= self.address + self.nbytes

    def view(self, dtype: Any = "uint8", offset: int = 0, shape: tuple[int, ...] | None = None,
             nbytes: int | None = None):
        """A numpy array over part of the region, no copy (the region stays referenced)."""
        if nbytes is None:
            nbytes = (self.nbytes - offset if shape is None
                      else int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        if offset < 0 or nbytes < 0 or offset + nbytes > self.nbytes:
            raise InvalidArgumentError(f"view [{offset}, +{nbytes}) outside a {self.nbytes}-byte region")
        # The views keep the memory itself alive (its owner), also past close().
        return numpy_view(self.address + offset, nbytes, dtype, shape, owner=self._shared or (self, self._owner))

    @property
    def closed(self) -> bool:
        return self._mr is None

    def close(self) -> None:
        """Deregister; returns once no transport touches the memory any more."""
        mr, self._mr = self._mr, None
        self._owner = None
        if mr is not None:
            self.context._regions.discard(self)
            # Deregistered whatever it says; an error means a peer's mapping could not be revoked.
            check(lib.lm_mr_deregister(mr), "deregister")

    def __enter__(self) -> "MemoryRegion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"key=0x{self._desc.key:016x}"
        return f"<MemoryRegion {self.nbytes} B at 0x{self.address:x} {state}>"


class Endpoint:
    """One connected peer. Completions for it are read with poll() / wait()."""

    def __init__(self, ctx: "Context", handle, ep_id: int, transport: int, peer_data: bytes,
                 peer_address: tuple | None):
        self.context = ctx
        self.id = ep_id
        self.transport = TRANSPORT_NAMES[transport]
        self.peer_data = peer_data
        self.peer_address = peer_address
        self._ep = handle
        self._completions: collections.deque[Completion] = collections.deque()
        self._wr_ids = itertools.count(1)
        self._before_close: list[Callable[[], None]] = []

    def _handle(self):
        if self._ep is None:
            raise ClosedError("endpoint is closed")
        return self._ep

    @property
    def capabilities(self) -> frozenset[str]:
        """What the transport guarantees: zero_copy_send, zero_copy_recv, remote_ack, hw_offload."""
        caps = lib.lm_ep_caps(self._handle())
        return frozenset(name for name, bit in _CAPS.items() if caps & bit)

    def write(self, local: MemoryRegion, remote: RemoteRegion, *, local_offset: int = 0,
              remote_offset: int = 0, length: int | None = None, imm: int | None = None,
              wr_id: int | None = None) -> int:
        """Post a one-sided write; returns its wr_id. With imm, the peer gets a RECV_IMM completion."""
        length = local.nbytes - local_offset if length is None else length
        wr_id = next(self._wr_ids) if wr_id is None else wr_id
        check(lib.lm_ep_write(self._handle(), local._handle(), local_offset, length, remote._native,
                              remote_offset, imm or 0, _imm_flags(imm), wr_id), "write")
        return wr_id

    def writev(self, local: MemoryRegion, pieces: Sequence[tuple[int, int]], remote: RemoteRegion, *,
               remote_offset: int = 0, imm: int | None = None, wr_id: int | None = None) -> int:
        """Post a gather write: the (offset, length) pieces of local, concatenated, land at remote_offset.

        One completion, like write(); no copy (tcp: one iovec list, verbs: scatter-gather entries).
        """
        if not pieces or len(pieces) > lib.LM_MAX_SEGS:
            raise InvalidArgumentError(f"a gather write takes 1..{lib.LM_MAX_SEGS} pieces, got {len(pieces)}")
        segs = ffi.new("lm_seg_t[]", len(pieces))
        for seg, (offset, length) in zip(segs, pieces):
            seg.offset, seg.length = offset, length
        wr_id = next(self._wr_ids) if wr_id is None else wr_id
        check(lib.lm_ep_writev(self._handle(), local._handle(), segs, len(pieces), remote._native, remote_offset,
                               imm or 0, _imm_flags(imm), wr_id), "writev")
        return wr_id

    def read(self, local: MemoryRegion, remote: RemoteRegion, *, local_offset: int = 0,
             remote_offset: int = 0, length: int | None = None, wr_id: int | None = None) -> int:
        """Post a one-sided read of the peer's region into ours; returns its wr_id."""
        length = local.nbytes - local_offset if length is None else length
        wr_id = next(self._wr_ids) if wr_id is None else wr_id
        check(lib.lm_ep_read(self._handle(), local._handle(), local_offset, length, remote._native,
                             remote_offset, wr_id), "read")
        return wr_id

    @property
    def outstanding(self) -> int:
        return 0 if self._ep is None else lib.lm_ep_outstanding(self._ep)

    @property
    def mapped_writes(self) -> int:
        """Writes sent straight into the peer's memory (shm, into its ``Context.alloc`` regions)."""
        return 0 if self._ep is None else int(lib.lm_ep_mapped_writes(self._ep))

    @property
    def error(self) -> LaminaError | None:
        if self._ep is None:
            return ClosedError("endpoint is closed")
        status = lib.lm_ep_error(self._ep)
        return None if status == 0 else error_for_status(status, f"endpoint {self.id} failed: {status_text(status)}")

    def poll(self, max_entries: int = 64) -> list[Completion]:
        self.context._pump_nowait()
        return self._take(max_entries)

    def wait(self, timeout: float | None = None, max_entries: int = 64) -> list[Completion]:
        """Completions for this endpoint; waits up to timeout seconds for at least one."""
        self.context._wait_for(lambda: bool(self._completions), timeout)
        return self._take(max_entries)

    def wait_one(self, timeout: float | None = None) -> Completion:
        got = self.wait(timeout, 1)
        if not got:
            raise TimeoutError_(f"no completion on endpoint {self.id} within {timeout} s")
        return got[0]

    def _take(self, n: int) -> list[Completion]:
        out = []
        while self._completions and len(out) < n:
            out.append(self._completions.popleft())
        return out

    @property
    def closed(self) -> bool:
        return self._ep is None

    def close(self) -> None:
        """Close; outstanding operations complete with CANCELED (still readable via poll)."""
        ep, self._ep = self._ep, None
        if ep is not None:
            try:
                for hook in self._before_close:  # a channel using this endpoint lets go of it first
                    hook()
            finally:
                self._before_close.clear()
                lib.lm_ep_destroy(ep)
            self.context._pump_nowait()
            self.context._endpoints.pop(self.id, None)

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Endpoint {self.id} {self.transport} {'closed' if self.closed else 'open'}>"


class Listener:
    """A bootstrap listening socket; accept() returns an Endpoint per authenticated peer.

    The pre-authentication handshake (HELLO, AUTH, CHOOSE) runs for every
    connection on a background thread (bootstrap.HandshakeGate), concurrently,
    bounded by max_pending in total and max_pending_per_source per source
    address, each within handshake_timeout; a connection over a bound is closed
    at once. So idle or slow clients never delay a real peer. accept() sends
    the reply (private_data) and creates the endpoint on the caller's thread.
    fileno() is readable while an authenticated peer waits for accept().
    """

    def __init__(self, ctx: "Context", address: tuple[str, int], backlog: int = 64,
                 transport: str = "auto", limits: bootstrap.AdmissionLimits = bootstrap.AdmissionLimits()):
        self.context = ctx
        self._allowed = ctx._requested_mask(transport)
        sock = socket.create_server(address, backlog=backlog, reuse_port=False)
        self.address = sock.getsockname()[:2]
        try:
            self._gate = bootstrap.HandshakeGate(sock, ctx.transports_mask, self._allowed, ctx._secret, limits)
        except BaseException:
            sock.close()
            raise
        # The gate's threads hold no reference to the Listener, so a dropped one is closed here.
        self._finalizer = weakref.finalize(self, self._gate.close)

    @property
    def limits(self) -> bootstrap.AdmissionLimits:
        return self._gate.limits

    def accept(self, timeout: float | None = None, private_data: bytes | Callable[[bytes], bytes] = b"",
               handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> Endpoint:
        """The next peer that completes the handshake; bad or hostile ones are refused and skipped.

        timeout bounds the wait for an authenticated peer; handshake_timeout the
        steps after it on this thread (reply, endpoint set-up, verbs address).
        """
        deadline = bootstrap._Deadline(timeout)
        while True:
            left = None if deadline.end is None else max(0.0, deadline.end - time.monotonic())
            try:
                peer = self._gate.take(left)
            except TimeoutError_:
                raise TimeoutError_(f"no peer connected within {timeout} s") from None
            try:
                bootstrap.server_reply(peer.sock, peer.negotiated, private_data, handshake_timeout)
                return self.context._make_endpoint(peer.sock, peer.negotiated, client=False, peer=peer.address,
                                                   timeout=handshake_timeout)
            except (LaminaError, OSError, ValueError) as exc:
                log.warning("refused peer %s:%s: %s", peer.address[0], peer.address[1], exc)
                peer.sock.close()

    def fileno(self) -> int:
        """Readable while an authenticated peer waits for accept() (select, asyncio add_reader)."""
        return self._gate.fileno()

    def pending(self) -> tuple[int, int]:
        """(handshakes in progress, authenticated peers waiting for accept())."""
        return self._gate.pending()

    def close(self) -> None:
        self._finalizer()
        self.context._listeners.discard(self)

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _imm_flags(imm: int | None) -> int:
    """LM_WRITE_IMM when an immediate is given (checked to fit 32 bits), else 0."""
    if imm is None:
        return 0
    if not 0 <= imm < 2**32:
        raise InvalidArgumentError(f"immediate {imm} does not fit 32 bits")
    return lib.LM_WRITE_IMM


def _parse_address(addr: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(addr, tuple):
        return addr[0], int(addr[1])
    host, sep, port = addr.rpartition(":")
    if not sep:
        raise InvalidArgumentError(f"address {addr!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


# Context(progress=...) -> LM_PROGRESS_*.
PROGRESS_MODES = {"event": lib.LM_PROGRESS_EVENT, "poll": lib.LM_PROGRESS_POLL}
# asyncio waits are sliced so a dead peer is noticed and the waiter re-checks.
_AWAIT_SLICE_S = 0.5


class Context:
    """Registry, completion queue and progress thread; makes regions, listeners, endpoints.

    transport: "auto" (shm between processes of one host, else verbs where both
    peers have it, else tcp), or one of "tcp", "verbs", "shm".
    secret: shared secret for the handshake (default: $LAMINA_SECRET).
    progress: how waiting threads make progress: "event" (sleep in epoll after a
    short spin) or "poll" (busy-poll the transports, never sleep: for a core
    dedicated to each waiting thread, as perftest and UCX run); default
    $LAMINA_PROGRESS, else "event".
    """

    def __init__(self, transport: str = "auto", *, secret: str | bytes | None = None,
                 ib_device: str | None = None, gid_index: int | None = None,
                 keepalive_ms: int | None = None, progress: str | None = None):
        if transport not in TRANSPORT_CHOICES:
            raise InvalidArgumentError(f"transport must be one of {', '.join(TRANSPORT_CHOICES)}, not {transport!r}")
        if progress is not None and progress not in PROGRESS_MODES:
            raise InvalidArgumentError(f"progress must be one of {sorted(PROGRESS_MODES)}, not {progress!r}")
        self.transport = transport
        self._why_not_shm = ""  # transport_status("shm"): why the last connection went without it
        self._secret = bootstrap.secret_from(secret)
        params = ffi.new("lm_context_params_t *")
        params.field_mask = lib.LM_CTX_PARAM_TRANSPORTS
        params.transports = self._requested_mask(transport)
        keep = []
        if ib_device is not None:
            keep.append(ffi.new("char[]", ib_device.encode()))
            params.ib_device = keep[-1]
            params.field_mask |= lib.LM_CTX_PARAM_IB_DEVICE
        if gid_index is not None:
            params.gid_index = gid_index
            params.field_mask |= lib.LM_CTX_PARAM_GID_INDEX
        if keepalive_ms is not None:
            params.keepalive_ms = keepalive_ms
            params.field_mask |= lib.LM_CTX_PARAM_KEEPALIVE_MS
        if progress is not None:
            params.progress = PROGRESS_MODES[progress]
            params.field_mask |= lib.LM_CTX_PARAM_PROGRESS
        out = ffi.new("lm_context_t **")
        rc = lib.lm_context_create(params, out)
        check(rc, "context")
        self._ctx = out[0]
        # Strong references: a registered region keeps its memory alive until it is
        # closed (or the context is), so a peer can never write into freed memory.
        self._regions: set[MemoryRegion | CudaRegion] = set()
        self._listeners: weakref.WeakSet[Listener] = weakref.WeakSet()
        self._endpoints: dict[int, Endpoint] = {}
        self._orphans: collections.deque[Completion] = collections.deque()
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._pumping = False
        self._batch = ffi.new("lm_completion_t[]", 256)
        log.debug("context open: transports=%s", self.transports)

    @staticmethod
    def _requested_mask(transport: str) -> int:
        return sum(TRANSPORT_IDS.values()) if transport == "auto" else TRANSPORT_IDS[transport]

    def _handle(self):
        if self._ctx is None:
            raise ClosedError("context is closed")
        return self._ctx

    @property
    def progress(self) -> str:
        """"event" or "poll" (see the class docstring)."""
        mode = lib.lm_context_progress(self._handle())
        return next(name for name, value in PROGRESS_MODES.items() if value == mode)

    @property
    def transports_mask(self) -> int:
        return lib.lm_context_transports(self._handle())

    @property
    def transports(self) -> list[str]:
        mask = self.transports_mask
        return [name for name, bit in TRANSPORT_IDS.items() if mask & bit]

    def transport_status(self, name: str) -> str:
        """Why a transport is unavailable ("" when it is available); for shm, once it is open, why the
        last connection that could have used it did not ("" if none)."""
        why = ffi.string(lib.lm_context_transport_status(self._handle(), TRANSPORT_IDS[name])).decode()
        if not why and name == "shm":
            why = self._why_not_shm
        return why

    # -- regions -----------------------------------------------------------
    def register(self, obj: Any, access: Access = Access.ALL) -> "MemoryRegion | CudaRegion":
        """Register host memory (numpy, torch CPU tensors, buffers, SharedMemory) with every transport.

        CUDA memory (torch CUDA tensors, cupy arrays, ``__cuda_array_interface__``, DLPack on CUDA) goes to
        the GPU tier and comes back as a ``lamina_comm.gpu.CudaRegion``: ``.path`` says how the context
        reaches it (``dmabuf`` / ``peermem``: a native region the NIC moves, used like any other;
        ``staging``: through pinned host buffers, a StagedLink) and ``.path_reason`` why (docs/gpu.md).
        """
        from .gpu.memory import is_cuda_object
        if is_cuda_object(obj):
            from .gpu.memory import register_cuda
            mr = register_cuda(self, obj, int(Access(access)))
        else:
            mr = MemoryRegion(self, obj, Access(access))
        self._regions.add(mr)
        return mr

    def alloc(self, nbytes: int, access: Access = Access.ALL) -> MemoryRegion:
        """New memory (``SharedMemory``, whole pages), registered: the buffer to receive into when the
        peer may be on this host, since shm writes into it take one copy instead of two. ``view()`` it."""
        return self.register(SharedMemory(nbytes), access)

    # -- connections ---------------------------------------------------------
    def listen(self, address: str | tuple[str, int], backlog: int = 64, *,
               handshake_timeout: float = bootstrap.DEFAULT_HANDSHAKE_TIMEOUT,
               max_pending: int = bootstrap.DEFAULT_MAX_PENDING,
               max_pending_per_source: int = bootstrap.DEFAULT_MAX_PENDING_PER_SOURCE) -> Listener:
        """A Listener; the keywords bound its pre-authentication handshakes (see Listener)."""
        limits = bootstrap.AdmissionLimits(max_pending, max_pending_per_source, handshake_timeout)
        listener = Listener(self, _parse_address(address), backlog, self.transport, limits)
        self._listeners.add(listener)
        return listener

    def connect(self, address: str | tuple[str, int], *, private_data: bytes = b"",
                timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Endpoint:
        """Connect to a listener, retrying refused connections until timeout (peers start in any order)."""
        host, port = _parse_address(address)
        deadline = bootstrap._Deadline(timeout)
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=deadline.left())
                break
            except (ConnectionRefusedError, socket.timeout) as exc:
                if deadline.end is not None and deadline.end - time.monotonic() < 0.05:
                    raise TimeoutError_(f"could not connect to {host}:{port} within {timeout} s: {exc}") from exc
                time.sleep(0.05)
        try:
            neg = bootstrap.client_handshake(sock, self.transports_mask, self._requested_mask(self.transport),
                                             self._secret, private_data, deadline.left())
            return self._make_endpoint(sock, neg, client=True, peer=(host, port), timeout=deadline.left())
        except BaseException:
            sock.close()
            raise

    def _make_endpoint(self, sock: socket.socket, neg: bootstrap.Negotiated, client: bool,
                       peer: tuple | None, timeout: float | None) -> Endpoint:
        ep_id = next(self._ids)
        out = ffi.new("lm_ep_t **")
        if neg.transport == lib.LM_TRANSPORT_TCP:
            sock.setblocking(True)
            check(lib.lm_ep_create_tcp(self._handle(), sock.detach(), ep_id, out), "endpoint")
        elif neg.transport == lib.LM_TRANSPORT_SHM:
            # The endpoint keeps (a duplicate of) the bootstrap socket as doorbell and lifeline.
            check(lib.lm_ep_create_shm(self._handle(), os.dup(sock.fileno()), ep_id, out), "shm endpoint")
            try:
                theirs = bootstrap.exchange_address(sock, self._native_address(out[0]), timeout, client)
                check(lib.lm_ep_connect(out[0], theirs, len(theirs), -1), "shm connect")
            except BaseException:
                lib.lm_ep_destroy(out[0])
                raise
            sock.close()
        else:
            check(lib.lm_ep_create_verbs(self._handle(), ep_id, out), "verbs endpoint")
            try:
                theirs = bootstrap.exchange_address(sock, self._native_address(out[0]), timeout, client)
                check(lib.lm_ep_connect(out[0], theirs, len(theirs), sock.detach()), "verbs connect")
            except BaseException:
                lib.lm_ep_destroy(out[0])
                raise
        ep = Endpoint(self, out[0], ep_id, neg.transport, neg.peer_data, peer)
        self._endpoints[ep_id] = ep
        if neg.why_not_shm:
            self._why_not_shm = f"connection to {peer}: {neg.why_not_shm}"
            log.info("endpoint %d: no shm: %s", ep_id, neg.why_not_shm)
        log.info("endpoint %d to %s over %s", ep_id, peer, ep.transport)
        return ep

    @staticmethod
    def _native_address(handle: Any) -> bytes:
        buf = ffi.new("char[]", bootstrap.MAX_ADDRESS)
        size = ffi.new("size_t *", bootstrap.MAX_ADDRESS)
        check(lib.lm_ep_address(handle, buf, size), "endpoint address")
        return bytes(ffi.buffer(buf, size[0]))

    # -- completions ---------------------------------------------------------
    def fileno(self) -> int:
        """Readable while completions are waiting (for selectors / asyncio add_reader)."""
        return lib.lm_context_fd(self._handle())

    def _route(self, n: int) -> None:
        endpoints, orphans, batch = self._endpoints, self._orphans, self._batch
        for i in range(n):
            c = batch[i]
            ep = endpoints.get(c.ep_id)
            comp = Completion(_OPS[c.opcode], c.status, ep, c.wr_id, c.byte_len,
                              c.imm if c.flags & _CF_IMM else None)
            (ep._completions if ep is not None else orphans).append(comp)

    def _pump(self, timeout_ms: int) -> int:
        """Move native completions into per-endpoint queues; GIL released while waiting."""
        ctx = self._handle()
        if timeout_ms == 0:
            n = lib.lm_cq_poll(ctx, self._batch, 256)
        else:
            n = lib.lm_cq_wait(ctx, self._batch, 256, timeout_ms)
        check(n, "poll")
        self._route(n)
        return n

    def _pump_nowait(self) -> None:
        """Route what is waiting, unless another thread is pumping (it routes for us)."""
        with self._cv:
            if not self._pumping:
                self._pump(0)

    def _wait_for(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ready() holds. One thread pumps at a time; others sleep on the condition."""
        if ready():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while not ready():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if self._pumping:
                    self._cv.wait(left)
                    continue
                self._pumping = True
                self._cv.release()
                try:
                    # Bounded slices so a waiter on another endpoint can take over.
                    self._pump(200 if left is None else max(1, min(200, int(left * 1000))))
                finally:
                    self._cv.acquire()
                    self._pumping = False
                    self._cv.notify_all()
            return True

    def poll(self, max_entries: int = 256) -> list[Completion]:
        """Every completion waiting, whichever endpoint it belongs to."""
        with self._cv:  # an RLock: _pump_nowait takes it again
            self._pump_nowait()
            out = list(self._orphans)
            self._orphans.clear()
            for ep in list(self._endpoints.values()):
                out += ep._take(max_entries)
            return out

    def wait(self, timeout: float | None = None, max_entries: int = 256) -> list[Completion]:
        def any_ready() -> bool:
            return bool(self._orphans) or any(ep._completions for ep in self._endpoints.values())
        self._wait_for(any_ready, timeout)
        return self.poll(max_entries)

    async def await_fd(self, fd: Callable[[], int], ready: Callable[[], bool], deadline: float,
                       raise_if_failed: Callable[[], None], on_timeout: Callable[[], LaminaError]) -> None:
        """Sleep on an eventfd (asyncio add_reader) until ready() holds, without blocking the loop.

        Each round asks fd() anew (it may raise once its owner is closed) and
        drains the fd before ready() looks, so a change after the look still
        wakes the loop. When not ready, raise_if_failed() raises its owner's
        failure, on_timeout() is raised once time.monotonic() passes deadline,
        and the sleep is sliced so those checks run every _AWAIT_SLICE_S.
        """
        import asyncio  # here, not at the top: only asyncio callers pay for importing it
        loop = asyncio.get_running_loop()
        while True:
            fileno = fd()
            _drain_eventfd(fileno)  # before looking, so no change after the look is missed
            if ready():
                return
            raise_if_failed()
            left = deadline - time.monotonic()
            if left <= 0:
                raise on_timeout()
            readable = loop.create_future()
            loop.add_reader(fileno, lambda: readable.done() or readable.set_result(None))
            try:
                await asyncio.wait_for(readable, min(left, _AWAIT_SLICE_S))
            except asyncio.TimeoutError:
                pass
            finally:
                loop.remove_reader(fileno)

    # -- life cycle ------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._ctx is None

    def close(self) -> None:
        if self._ctx is None:
            return
        for listener in list(self._listeners):
            listener.close()
        for ep in list(self._endpoints.values()):
            ep.close()
        failure: LaminaError | None = None
        for mr in list(self._regions):
            try:
                mr.close()
            except LaminaError as exc:  # deregistered anyway (a grant not revoked): close the rest first
                failure = failure or exc
        ctx, self._ctx = self._ctx, None
        lib.lm_context_destroy(ctx)
        if failure is not None:
            raise failure

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: best effort
            pass


def _drain_eventfd(fd: int) -> None:
    try:
        os.read(fd, 8)
    except BlockingIOError:
        pass
