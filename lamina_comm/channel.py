"""Activation channels: fixed slot rings between one model worker and one attention worker.

A :class:`Channel` joins the two tiers over one :class:`~lamina_comm.transport.Endpoint`.
At setup each side allocates and registers ONE region holding a ring of
fixed-size slots per direction and per micro-batch (sized from a shared
:class:`ChannelSpec`) plus two small credit arrays; the region descriptors
travel in the handshake's private data, and nothing is registered or allocated
per layer afterwards.

A message is a 256-byte header plus payload, written into the peer's slot with
one-sided writes; the last write carries an immediate naming (data,
micro-batch, slot), so the payload is in place when the peer sees it. The
receiver returns the slot with a small write-with-immediate (credit) once the
message is released. Wire format and protocol: docs/channel.md.

    spec = ChannelSpec(max_tokens=16, hidden=1024, heads=8, kv_heads=2, head_dim=128)
    with Channel.connect(ctx, "10.0.0.2:7100", spec) as ch:          # model side
        q, k, v = ch.send_buffers(0, [(16, 8, 128), (16, 2, 128), (16, 2, 128)])
        ...fill q, k, v in place...
        ch.send([q, k, v], layer=0, microbatch=0)                    # one write, no copy
        with ch.recv(microbatch=0) as msg:                           # views over the slot
            out = msg.tensors[0]
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import struct
import time
from collections import deque
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .errors import (ClosedError, InvalidArgumentError, LaminaError, PeerLostError, ProtocolError, SequenceError,
                     TimeoutError_)
from .transport import Completion, Context, Endpoint, Listener, MemoryRegion, Op, RemoteRegion

MAGIC = 0x4843_4D4C  # b"LMCH" little-endian
WIRE_VERSION = 1
HEADER_BYTES = 256
ALIGN = 64  # payload tensors start on cache-line boundaries
MAX_TENSORS = 6
MAX_PIGGYBACK_CREDITS = 4
MAX_NDIM = 4
DEFAULT_TIMEOUT_S = 30.0
_HELLO_PREFIX = b"LMCH1"
_CREDIT_BYTES = 8
_PAGE = 4096
# Blocking waits are sliced so a dead peer is noticed and asyncio waiters re-check.
_WAIT_SLICE_S = 0.5

# magic, version, tensor count, piggybacked credit count, seq, layer, microbatch, slot, payload bytes
_HEADER = struct.Struct("<IHBBQIHHQ")
# dtype code, ndim, reserved, reserved, payload offset, shape[MAX_NDIM]
_ENTRY = struct.Struct(f"<BBHIQ{MAX_NDIM}I")
# A credit riding on a message: micro-batch, slot, low 32 bits of the released seq.
_PIGGYBACK = struct.Struct("<HHI")
_PIGGYBACK_BASE = _HEADER.size + MAX_TENSORS * _ENTRY.size
assert _PIGGYBACK_BASE + MAX_PIGGYBACK_CREDITS * _PIGGYBACK.size <= HEADER_BYTES

# Immediate: kind in bits 31..28, micro-batch in 27..16, slot in 15..0.
KIND_DATA = 1
KIND_CREDIT = 2
_MAX_MICROBATCHES = 1 << 12
_MAX_SLOTS = 1 << 16

# Wire dtype name -> (code, numpy storage dtype). numpy has no bfloat16: stored as uint16.
_DTYPES: dict[str, tuple[int, np.dtype]] = {
    "float16": (1, np.dtype(np.float16)),
    "bfloat16": (2, np.dtype(np.uint16)),
    "float32": (3, np.dtype(np.float32)),
    "int32": (4, np.dtype(np.int32)),
    "int64": (5, np.dtype(np.int64)),
    "uint8": (6, np.dtype(np.uint8)),
    "int8": (7, np.dtype(np.int8)),
    "float64": (8, np.dtype(np.float64)),
}
_DTYPE_BY_CODE = {code: name for name, (code, _) in _DTYPES.items()}
_NAME_BY_STORAGE = {storage: name for name, (_, storage) in _DTYPES.items() if name != "bfloat16"}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
                  "float": "float32", "fp64": "float64", "double": "float64"}


class SpecMismatchError(InvalidArgumentError):
    """The two ends of a channel declared different specs or incompatible roles."""


def dtype_name(dtype: Any) -> str:
    """Canonical wire name of a dtype given as a name, alias, numpy or torch dtype."""
    if isinstance(dtype, str):
        name = dtype
    elif str(dtype).startswith("torch."):
        name = str(dtype).removeprefix("torch.")
    else:
        name = np.dtype(dtype).name
    name = _DTYPE_ALIASES.get(name, name)
    if name not in _DTYPES:
        raise InvalidArgumentError(f"dtype {dtype!r} is not supported; choose from {sorted(_DTYPES)}")
    return name


def _align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def packed_offsets(nbytes: Sequence[int]) -> list[int]:
    """Payload offsets of tensors laid out back to back, each aligned to ALIGN."""
    offsets, cursor = [], 0
    for n in nbytes:
        offsets.append(cursor)
        cursor = _align(cursor + n)
    return offsets


# --------------------------------------------------------------------------
# Spec and ring layout


@dataclasses.dataclass(frozen=True)
class ChannelSpec:
    """What both ends declare; slots are sized from it and it must match exactly.

    Shapes describe the attention worker's share: ``heads`` query heads and
    ``kv_heads`` KV heads of ``head_dim`` each, ``hidden`` the width of the
    returned activation (at least heads * head_dim is reserved). ``max_tokens``
    is per micro-batch. ``extra_bytes`` adds room to every slot for callers
    that ship more than q/k/v and the attention output.
    """

    max_tokens: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "float16"
    microbatches: int = 2
    slots_per_microbatch: int = 2
    extra_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for field in ("max_tokens", "hidden", "heads", "kv_heads", "head_dim", "microbatches",
                      "slots_per_microbatch"):
            if int(getattr(self, field)) < 1:
                raise InvalidArgumentError(f"ChannelSpec.{field} must be >= 1, got {getattr(self, field)}")
        if self.extra_bytes < 0:
            raise InvalidArgumentError(f"ChannelSpec.extra_bytes must be >= 0, got {self.extra_bytes}")
        if self.microbatches > _MAX_MICROBATCHES or self.slots_per_microbatch > _MAX_SLOTS:
            raise InvalidArgumentError("too many micro-batches or slots for the immediate encoding")
        if max(self.request_bytes, self.response_bytes) >= 2**32:
            raise InvalidArgumentError("a slot payload must stay below 4 GiB")

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][1].itemsize

    @property
    def request_bytes(self) -> int:
        """Payload capacity model -> attention: q, k, v of max_tokens tokens."""
        elements = self.max_tokens * (self.heads + 2 * self.kv_heads) * self.head_dim
        return elements * self.itemsize + MAX_TENSORS * ALIGN + self.extra_bytes

    @property
    def response_bytes(self) -> int:
        """Payload capacity attention -> model: the attention output of max_tokens tokens."""
        width = max(self.hidden, self.heads * self.head_dim)
        return self.max_tokens * width * self.itemsize + MAX_TENSORS * ALIGN + self.extra_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


ROLES = ("model", "attention")


def _other_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidArgumentError(f"role must be one of {ROLES}, not {role!r}")
    return ROLES[1 - ROLES.index(role)]


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """Byte offsets inside one side's registered region.

    [recv slots | send slots | credit-in words | credit-out words], each ring
    indexed by (micro-batch, slot). A slot is the header then the payload.
    """

    microbatches: int
    slots: int
    recv_capacity: int
    send_capacity: int

    @classmethod
    def for_role(cls, spec: ChannelSpec, role: str) -> "RingLayout":
        _other_role(role)  # validates
        inbound, outbound = ((spec.response_bytes, spec.request_bytes) if role == "model"
                             else (spec.request_bytes, spec.response_bytes))
        return cls(spec.microbatches, spec.slots_per_microbatch, _align(inbound), _align(outbound))

    @property
    def _ring_slots(self) -> int:
        return self.microbatches * self.slots

    @property
    def recv_stride(self) -> int:
        return HEADER_BYTES + self.recv_capacity

    @property
    def send_stride(self) -> int:
        return HEADER_BYTES + self.send_capacity

    @property
    def send_base(self) -> int:
        return self._ring_slots * self.recv_stride

    @property
    def credit_in_base(self) -> int:
        return self.send_base + self._ring_slots * self.send_stride

    @property
    def credit_out_base(self) -> int:
        return self.credit_in_base + self._ring_slots * _CREDIT_BYTES

    @property
    def total_bytes(self) -> int:
        return self.credit_out_base + self._ring_slots * _CREDIT_BYTES

    def _index(self, mb: int, slot: int) -> int:
        return mb * self.slots + slot

    def recv_slot(self, mb: int, slot: int) -> int:
        return self._index(mb, slot) * self.recv_stride

    def send_slot(self, mb: int, slot: int) -> int:
        return self.send_base + self._index(mb, slot) * self.send_stride

    def credit_in(self, mb: int, slot: int) -> int:
        return self.credit_in_base + self._index(mb, slot) * _CREDIT_BYTES

    def credit_out(self, mb: int, slot: int) -> int:
        return self.credit_out_base + self._index(mb, slot) * _CREDIT_BYTES


def encode_imm(kind: int, mb: int, slot: int) -> int:
    return (kind << 28) | (mb << 16) | slot


def decode_imm(imm: int) -> tuple[int, int, int]:
    return imm >> 28, (imm >> 16) & 0xFFF, imm & 0xFFFF


# --------------------------------------------------------------------------
# Tensors in and out


class TensorView(np.ndarray):
    """A numpy view over slot memory that remembers the wire dtype.

    numpy has no bfloat16, so bfloat16 tensors arrive as uint16 arrays with
    ``dtype_name == "bfloat16"``; :func:`to_torch` turns them into real
    torch.bfloat16 tensors without copying.
    """

    _wire: str | None = None

    def __array_finalize__(self, parent: Any) -> None:
        # Views keep the wire name only while they keep the storage dtype.
        wire = getattr(parent, "_wire", None)
        self._wire = wire if wire is not None and parent.dtype == self.dtype else None

    @property
    def dtype_name(self) -> str:
        return self._wire or self.dtype.name


def as_bfloat16(bits: np.ndarray) -> TensorView:
    """Mark a uint16 array of raw bfloat16 bits so send() ships it as bfloat16."""
    if bits.dtype != np.uint16:
        raise InvalidArgumentError(f"bfloat16 bits must be a uint16 array, not {bits.dtype}")
    return _as_tensor_view(bits, "bfloat16")


def _as_tensor_view(arr: np.ndarray, wire_dtype: str) -> TensorView:
    view = arr.view(TensorView)
    view._wire = wire_dtype
    return view


def _torch():
    import torch  # imported on demand: the channel works without torch
    return torch


def to_torch(arr: np.ndarray) -> Any:
    """A torch tensor sharing memory with a (Tensor)View; bfloat16 metadata honoured."""
    torch = _torch()
    base = np.asarray(arr)
    tensor = torch.from_numpy(base)
    if getattr(arr, "dtype_name", None) == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor


def _is_torch(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "data_ptr")


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    """What the sender needs to know about one outgoing tensor."""

    obj: Any
    dtype_name: str
    shape: tuple[int, ...]
    nbytes: int
    address: int | None  # contiguous host memory, else None (must be staged)


def _describe(obj: Any) -> _TensorInfo:
    if _is_torch(obj):
        info = _describe_torch(obj)
    else:
        info = _describe_numpy(obj)
    if len(info.shape) > MAX_NDIM:
        raise InvalidArgumentError(f"tensors may have at most {MAX_NDIM} dimensions, got {info.shape}")
    return info


def _describe_torch(t: Any) -> _TensorInfo:
    name = dtype_name(t.dtype)
    nbytes = t.numel() * t.element_size()
    host_contiguous = t.device.type == "cpu" and t.is_contiguous()
    return _TensorInfo(t, name, tuple(t.shape), nbytes, t.data_ptr() if host_contiguous else None)


def _describe_numpy(obj: Any) -> _TensorInfo:
    arr = obj if isinstance(obj, np.ndarray) else np.asarray(obj)
    name = getattr(arr, "_wire", None) or _NAME_BY_STORAGE.get(arr.dtype) or dtype_name(arr.dtype)
    if _DTYPES[name][1] != arr.dtype:
        raise InvalidArgumentError(f"array stored as {arr.dtype} cannot carry {name}")
    address = arr.__array_interface__["data"][0] if arr.flags.c_contiguous else None
    return _TensorInfo(arr, name, tuple(arr.shape), arr.nbytes, address)


def _copy_into(dst: np.ndarray, info: _TensorInfo) -> None:
    """The one staging copy: source tensor into slot memory (dst has the storage dtype)."""
    if _is_torch(info.obj):
        target = to_torch(_as_tensor_view(dst, info.dtype_name))
        target.copy_(info.obj)  # also takes strided or device tensors
    else:
        np.copyto(dst, info.obj, casting="no")


@dataclasses.dataclass(frozen=True)
class _Placement:
    """Where an outgoing message's payload comes from."""

    mode: str                     # "slot" | "region" | "staged"
    offsets: list[int]            # per-tensor payload offsets as the receiver will see them
    payload_bytes: int
    source: MemoryRegion | None = None
    source_offset: int = 0        # region mode: where the payload span starts in source


# --------------------------------------------------------------------------
# Messages


@dataclasses.dataclass(frozen=True)
class ChannelMetrics:
    """Counters of one channel (a snapshot; see Channel.metrics)."""

    messages: int = 0
    bytes_sent: int = 0
    staged_bytes: int = 0
    slot_messages: int = 0
    region_messages: int = 0
    staged_messages: int = 0
    credit_waits: int = 0
    credit_wait_seconds: float = 0.0
    messages_received: int = 0
    bytes_received: int = 0
    credits_returned: int = 0
    credits_piggybacked: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Message:
    """A received message: tensors are views over the slot, valid until release().

    Use as a context manager or call release(); until then the sender cannot
    reuse the slot (it blocks for the credit, then times out).
    """

    def __init__(self, channel: "Channel", layer: int, microbatch: int, seq: int, slot: int,
                 tensors: list[TensorView]):
        self.layer = layer
        self.microbatch = microbatch
        self.seq = seq
        self.slot = slot
        self.tensors = tensors
        self._channel: Channel | None = channel

    @property
    def dtype_names(self) -> list[str]:
        return [t.dtype_name for t in self.tensors]

    def torch(self) -> list[Any]:
        """The tensors as torch tensors over the same memory (bfloat16 included)."""
        return [to_torch(t) for t in self.tensors]

    @property
    def released(self) -> bool:
        return self._channel is None

    def release(self) -> None:
        """Return the slot to the sender; the views may be overwritten afterwards."""
        channel, self._channel = self._channel, None
        if channel is not None:
            channel._return_credit(self.microbatch, self.slot, self.seq)

    def __enter__(self) -> "Message":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        shapes = ", ".join(f"{t.dtype_name}{list(t.shape)}" for t in self.tensors)
        return f"<Message layer={self.layer} mb={self.microbatch} seq={self.seq} [{shapes}]>"


# --------------------------------------------------------------------------
# Handshake


def _hello(spec: ChannelSpec, role: str, region: RemoteRegion) -> bytes:
    body = {"version": WIRE_VERSION, "spec": spec.to_dict(), "digest": spec.digest(), "role": role,
            "region": region.to_dict()}
    return _HELLO_PREFIX + json.dumps(body, separators=(",", ":")).encode()


def _parse_hello(data: bytes) -> dict[str, Any]:
    """The peer's channel hello as a JSON object; anything else is a ProtocolError."""
    if not data.startswith(_HELLO_PREFIX):
        raise ProtocolError("the peer is not a lamina channel (no channel hello in its private data)")
    try:
        hello = json.loads(data[len(_HELLO_PREFIX):])
    except (ValueError, RecursionError) as exc:  # RecursionError: hostile nesting depth
        raise ProtocolError(f"malformed channel hello: {exc}") from exc
    if not isinstance(hello, dict):
        raise ProtocolError(f"malformed channel hello: a JSON {type(hello).__name__}, not an object")
    return hello


def _spec_differences(mine: dict[str, Any], theirs: Any) -> str:
    if not isinstance(theirs, dict):
        theirs = {}
    keys = sorted(set(mine) | set(theirs))
    return ", ".join(f"{k}: ours={mine.get(k)!r} peer's={theirs.get(k)!r}"
                     for k in keys if mine.get(k) != theirs.get(k))


# Region descriptor fields a hello carries: wire width in bits, and whether the peer must send it.
_REGION_FIELDS = {"key": (64, True), "addr": (64, True), "length": (64, True), "rkey": (32, False),
                  "access": (32, False)}


def _peer_region(fields: Any) -> RemoteRegion:
    """The peer's region descriptor; every field an integer that fits its wire width."""
    if not isinstance(fields, dict):
        raise ProtocolError("channel hello carries no region descriptor")
    values: dict[str, int] = {}
    for name, (bits, required) in _REGION_FIELDS.items():
        if name not in fields:
            if required:
                raise ProtocolError(f"channel hello's region has no {name!r}")
            continue
        value = fields[name]
        if type(value) is not int or not 0 <= value < 1 << bits:
            raise ProtocolError(f"channel hello's region {name!r} is {value!r}, not a {bits}-bit unsigned integer")
        values[name] = value
    return RemoteRegion(**values)


def _check_peer(spec: ChannelSpec, role: str, hello: dict[str, Any]) -> RemoteRegion:
    """The peer's region if it declared the same spec and the opposite role."""
    if hello.get("version") != WIRE_VERSION:
        raise ProtocolError(f"channel wire version {hello.get('version')!r} != {WIRE_VERSION}")
    if hello.get("digest") != spec.digest():
        diff = _spec_differences(spec.to_dict(), hello.get("spec")) or "digest only"
        raise SpecMismatchError(f"channel spec mismatch with the peer ({diff})")
    if hello.get("role") != _other_role(role):
        raise SpecMismatchError(f"both ends of the channel declared role {role!r}")
    region = _peer_region(hello.get("region"))
    needed = RingLayout.for_role(spec, hello["role"]).total_bytes
    if region.length < needed:
        raise ProtocolError(f"peer's channel region has {region.length} B, its layout needs {needed}")
    return region


class _Rings:
    """The one registered region of a channel side, and its layout."""

    def __init__(self, ctx: Context, spec: ChannelSpec, role: str):
        self.layout = RingLayout.for_role(spec, role)
        raw = np.zeros(self.layout.total_bytes + _PAGE, dtype=np.uint8)
        start = (-raw.__array_interface__["data"][0]) % _PAGE  # page-align the slots
        self.buffer = raw[start:start + self.layout.total_bytes]
        self.mr = ctx.register(self.buffer)

    def close(self) -> None:
        self.mr.close()


# --------------------------------------------------------------------------
# Channel


class Channel:
    """One model worker <-> one attention worker; see the module docstring.

    A channel is driven by one thread at a time (or by one asyncio loop).
    Several channels may share a Context: completions are routed per endpoint.

    piggyback_credits=False (default): every release() writes its credit at
    once (one small write-with-immediate). True: credits ride in the header of
    the next message this side sends, and whatever is still pending is
    written out as soon as this channel waits (recv, credit wait, flush).
    That saves a write and a peer wake-up per message in request/reply
    loops, but a credit is held back while the thread blocks elsewhere, so
    use it only where this channel is revisited (see docs/channel.md).
    """

    def __init__(self, ctx: Context, endpoint: Endpoint, spec: ChannelSpec, role: str, rings: _Rings,
                 peer_region: RemoteRegion, *, name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, piggyback_credits: bool = False):
        self.context = ctx
        self.endpoint = endpoint
        self.spec = spec
        self.role = role
        self.name = name or f"{role}-ep{endpoint.id}"
        self.timeout = timeout
        self.piggyback_credits = piggyback_credits
        self._rings = rings
        self._mr = rings.mr
        self._buf = rings.buffer
        self._layout = rings.layout
        self._peer_layout = RingLayout.for_role(spec, _other_role(role))
        self._peer = peer_region
        self._sources: list[MemoryRegion] = []
        m, s = spec.microbatches, spec.slots_per_microbatch
        self._send_seq = [0] * m
        self._slot_free = [[True] * s for _ in range(m)]
        self._slot_seq = [[-1] * s for _ in range(m)]   # seq last sent from each slot
        self._recv_seq = [0] * m
        self._arrived: deque[tuple[int, int]] = deque()  # (mb, slot) in arrival order
        self._pending_credits: deque[tuple[int, int, int]] = deque()  # (mb, slot, seq) to piggyback
        self._outstanding = 0
        self._error: LaminaError | None = None
        self._counters: dict[str, Any] = ChannelMetrics().as_dict()

    # -- setup -------------------------------------------------------------
    @classmethod
    def connect(cls, ctx: Context, address: str | tuple[str, int], spec: ChannelSpec, *,
                role: str = "model", name: str | None = None, connect_timeout: float = 10.0,
                timeout: float = DEFAULT_TIMEOUT_S, piggyback_credits: bool = False) -> "Channel":
        """Connect to a ChannelListener; raises SpecMismatchError if the specs differ.

        piggyback_credits: see Channel; a local choice, the peer need not agree.
        """
        rings = _Rings(ctx, spec, role)
        try:
            ep = ctx.connect(address, private_data=_hello(spec, role, rings.mr.descriptor()),
                             timeout=connect_timeout)
            return cls._finish_setup(ctx, ep, spec, role, rings, name, timeout, piggyback_credits)
        except BaseException:
            rings.close()
            raise

    @classmethod
    def accept(cls, listener: Listener, spec: ChannelSpec, *, role: str = "attention",
               name: str | None = None, accept_timeout: float | None = None,
               timeout: float = DEFAULT_TIMEOUT_S, piggyback_credits: bool = False) -> "Channel":
        """Accept one channel on a transport Listener (see also ChannelListener)."""
        ctx = listener.context
        rings = _Rings(ctx, spec, role)
        try:
            ep = listener.accept(accept_timeout, private_data=_hello(spec, role, rings.mr.descriptor()))
            return cls._finish_setup(ctx, ep, spec, role, rings, name, timeout, piggyback_credits)
        except BaseException:
            rings.close()
            raise

    @classmethod
    def _finish_setup(cls, ctx: Context, ep: Endpoint, spec: ChannelSpec, role: str, rings: _Rings,
                      name: str | None, timeout: float, piggyback_credits: bool) -> "Channel":
        try:
            peer_region = _check_peer(spec, role, _parse_hello(ep.peer_data))
        except BaseException:
            ep.close()
            raise
        return cls(ctx, ep, spec, role, rings, peer_region, name=name, timeout=timeout,
                   piggyback_credits=piggyback_credits)

    def add_source_region(self, region: MemoryRegion) -> None:
        """Tensors lying packed inside this region are sent from it without a copy."""
        self._sources.append(region)

    @property
    def region(self) -> MemoryRegion:
        """The channel's own registered region (slots and credit words)."""
        return self._mr

    @property
    def metrics(self) -> ChannelMetrics:
        return ChannelMetrics(**self._counters)

    # -- sending -------------------------------------------------------------
    def send_slot(self, microbatch: int, timeout: float | None = None) -> np.ndarray:
        """The payload area (uint8) of the next send slot of a micro-batch, once it is free."""
        slot = self._next_slot(microbatch)
        self._wait_credit(microbatch, slot, timeout)
        offset = self._layout.send_slot(microbatch, slot) + HEADER_BYTES
        return self._buf[offset:offset + self._layout.send_capacity]

    def send_buffers(self, microbatch: int, shapes: Sequence[Sequence[int]], dtype: Any = None, *,
                     as_torch: bool = False, timeout: float | None = None) -> list[Any]:
        """Typed views in the next send slot, laid out as send() stages them.

        Fill them in place and pass them to send(): header and payload then go
        in one write with no copy. Waits for the slot's credit first.
        """
        wire = dtype_name(dtype if dtype is not None else self.spec.dtype)
        storage = _DTYPES[wire][1]
        counts = [math.prod(shape) for shape in shapes]
        offsets = packed_offsets([n * storage.itemsize for n in counts])
        needed = offsets[-1] + counts[-1] * storage.itemsize if shapes else 0
        if len(shapes) > MAX_TENSORS or needed > self._layout.send_capacity:
            raise InvalidArgumentError(f"{len(shapes)} tensors of {shapes} do not fit a send slot")
        payload = self.send_slot(microbatch, timeout)
        views = [_as_tensor_view(payload[off:off + n * storage.itemsize].view(storage).reshape(shape), wire)
                 for off, n, shape in zip(offsets, counts, shapes)]
        return [to_torch(v) for v in views] if as_torch else views

    def send(self, tensors: Any, *, layer: int, microbatch: int, timeout: float | None = None) -> int:
        """Post one message (a tensor or a sequence of them); returns its sequence number.

        Returns once the writes are posted; waits only for the slot's credit.
        Tensors from send_buffers()/send_slot() go without a copy, as do
        tensors packed in a registered region known to the channel (its own
        region or add_source_region()); keep those unchanged until flush().
        Anything else is copied once into the send slot (metrics.staged_bytes).
        """
        self._check_microbatch(microbatch)
        seq = self._send_seq[microbatch]
        self._send_with_seq(tensors, layer, microbatch, seq, timeout)
        self._send_seq[microbatch] += 1
        return seq

    async def asend(self, tensors: Any, *, layer: int, microbatch: int,
                    timeout: float | None = None) -> int:
        """send() that waits for the slot's credit without blocking the event loop."""
        self._check_microbatch(microbatch)
        slot = self._next_slot(microbatch)
        await self._await(lambda: self._slot_free[microbatch][slot], timeout,
                          lambda: self._credit_timeout(microbatch, slot, timeout))
        return self.send(tensors, layer=layer, microbatch=microbatch, timeout=timeout)

    def _send_raw(self, tensors: Any, *, layer: int, microbatch: int, seq: int,
                  timeout: float | None = None) -> None:
        """Test hook: send with an arbitrary sequence number (the counter is not advanced)."""
        self._send_with_seq(tensors, layer, microbatch, seq, timeout)

    def _send_with_seq(self, tensors: Any, layer: int, microbatch: int, seq: int,
                       timeout: float | None) -> None:
        self._check_microbatch(microbatch)
        infos = [_describe(t) for t in _tensor_list(tensors)]
        slot = seq % self.spec.slots_per_microbatch
        self._wait_credit(microbatch, slot, timeout)
        placement = self._place(infos, microbatch, slot)
        credits = self._take_pending_credits()
        self._write_header(infos, placement, layer, microbatch, slot, seq, credits)
        self._post(placement, microbatch, slot)
        self._slot_free[microbatch][slot] = False
        self._slot_seq[microbatch][slot] = seq
        self._count_sent(placement, infos)

    def _next_slot(self, microbatch: int) -> int:
        self._check_microbatch(microbatch)
        return self._send_seq[microbatch] % self.spec.slots_per_microbatch

    def _check_microbatch(self, microbatch: int) -> None:
        if not 0 <= microbatch < self.spec.microbatches:
            raise InvalidArgumentError(f"channel {self.name}: micro-batch {microbatch} outside "
                                       f"0..{self.spec.microbatches - 1}")

    def _place(self, infos: list[_TensorInfo], mb: int, slot: int) -> _Placement:
        if len(infos) > MAX_TENSORS:
            raise InvalidArgumentError(f"a message carries at most {MAX_TENSORS} tensors, got {len(infos)}")
        payload_address = self._mr.address + self._layout.send_slot(mb, slot) + HEADER_BYTES
        capacity = self._layout.send_capacity
        in_place = self._in_slot(infos, payload_address, capacity)
        if in_place is not None:
            return in_place
        from_region = self._in_region(infos, capacity)
        if from_region is not None:
            return from_region
        return self._stage(infos, payload_address - self._mr.address, capacity)

    @staticmethod
    def _in_slot(infos: list[_TensorInfo], payload_address: int, capacity: int) -> _Placement | None:
        """All tensors already inside this send slot: header + payload in one write."""
        if not infos or any(i.address is None for i in infos):
            return None
        offsets = [i.address - payload_address for i in infos]
        if any(off < 0 or off + i.nbytes > capacity for off, i in zip(offsets, infos)):
            return None
        return _Placement("slot", offsets, max(off + i.nbytes for off, i in zip(offsets, infos)))

    def _in_region(self, infos: list[_TensorInfo], capacity: int) -> _Placement | None:
        """All tensors packed in one registered region: write the span from there."""
        if not infos or any(i.address is None for i in infos):
            return None
        start = min(i.address for i in infos)
        span = max(i.address + i.nbytes for i in infos) - start
        # "Packed": gaps no larger than alignment padding, so we never ship much dead memory.
        if span > capacity or span > sum(_align(i.nbytes) for i in infos):
            return None
        for region in (self._mr, *self._sources):
            if not region.closed and region.contains(start, span):
                offsets = [i.address - start for i in infos]
                return _Placement("region", offsets, span, region, start - region.address)
        return None

    def _stage(self, infos: list[_TensorInfo], payload_offset: int, capacity: int) -> _Placement:
        offsets = packed_offsets([i.nbytes for i in infos])
        size = (offsets[-1] + infos[-1].nbytes) if infos else 0
        if size > capacity:
            raise InvalidArgumentError(f"channel {self.name}: message of {size} B exceeds the "
                                       f"{capacity}-byte slot (see ChannelSpec)")
        for off, info in zip(offsets, infos):
            storage = _DTYPES[info.dtype_name][1]
            start = payload_offset + off
            _copy_into(self._buf[start:start + info.nbytes].view(storage).reshape(info.shape), info)
        return _Placement("staged", offsets, size)

    def _write_header(self, infos: list[_TensorInfo], placement: _Placement, layer: int, mb: int,
                      slot: int, seq: int, credits: list[tuple[int, int, int]]) -> None:
        base = self._layout.send_slot(mb, slot)
        _HEADER.pack_into(self._buf, base, MAGIC, WIRE_VERSION, len(infos), len(credits), seq, layer, mb,
                          slot, placement.payload_bytes)
        for index, (info, off) in enumerate(zip(infos, placement.offsets)):
            shape = list(info.shape) + [0] * (MAX_NDIM - len(info.shape))
            _ENTRY.pack_into(self._buf, base + _HEADER.size + index * _ENTRY.size,
                             _DTYPES[info.dtype_name][0], len(info.shape), 0, 0, off, *shape)
        for index, (credit_mb, credit_slot, credit_seq) in enumerate(credits):
            _PIGGYBACK.pack_into(self._buf, base + _PIGGYBACK_BASE + index * _PIGGYBACK.size,
                                 credit_mb, credit_slot, credit_seq & 0xFFFF_FFFF)

    def _post(self, placement: _Placement, mb: int, slot: int) -> None:
        local = self._layout.send_slot(mb, slot)
        remote = self._peer_layout.recv_slot(mb, slot)
        imm = encode_imm(KIND_DATA, mb, slot)
        if placement.mode == "region":
            # Payload first, header last: the immediate fires after every earlier write landed.
            self.endpoint.write(placement.source, self._peer, local_offset=placement.source_offset,
                                remote_offset=remote + HEADER_BYTES, length=placement.payload_bytes)
            self.endpoint.write(self._mr, self._peer, local_offset=local, remote_offset=remote,
                                length=HEADER_BYTES, imm=imm)
            self._outstanding += 2
        else:
            self.endpoint.write(self._mr, self._peer, local_offset=local, remote_offset=remote,
                                length=HEADER_BYTES + placement.payload_bytes, imm=imm)
            self._outstanding += 1

    def _count_sent(self, placement: _Placement, infos: list[_TensorInfo]) -> None:
        c = self._counters
        c["messages"] += 1
        c["bytes_sent"] += HEADER_BYTES + placement.payload_bytes
        c[f"{placement.mode}_messages"] += 1
        if placement.mode == "staged":
            c["staged_bytes"] += sum(i.nbytes for i in infos)

    # -- credits -------------------------------------------------------------
    def _wait_credit(self, mb: int, slot: int, timeout: float | None) -> None:
        self._raise_if_failed()
        if not self._slot_free[mb][slot]:
            self._poll_nowait()
        if self._slot_free[mb][slot]:
            return
        started = time.perf_counter()
        self._counters["credit_waits"] += 1
        try:
            if not self._block_until(lambda: self._slot_free[mb][slot], timeout):
                raise self._credit_timeout(mb, slot, timeout)
        finally:
            self._counters["credit_wait_seconds"] += time.perf_counter() - started

    def _credit_timeout(self, mb: int, slot: int, timeout: float | None) -> TimeoutError_:
        return TimeoutError_(f"channel {self.name}: no credit for micro-batch {mb} (slot {slot}) within "
                             f"{self._timeout(timeout)} s; the receiver still holds the slot")

    def _on_credit_write(self, mb: int, slot: int) -> None:
        released = int(np.frombuffer(self._buf, np.uint64, 1, self._layout.credit_in(mb, slot))[0])
        self._credit_arrived(mb, slot, released, mask=2**64 - 1)

    def _credit_arrived(self, mb: int, slot: int, released: int, mask: int) -> None:
        """The receiver released (mb, slot); released is its seq (masked to the bits sent)."""
        if mb >= self.spec.microbatches or slot >= self.spec.slots_per_microbatch:
            self._fail(ProtocolError(f"channel {self.name}: credit names micro-batch {mb} slot {slot}"))
        if self._slot_free[mb][slot]:
            self._fail(ProtocolError(f"channel {self.name}: credit for micro-batch {mb} slot {slot}, "
                                     "which is not in use"))
        if released != self._slot_seq[mb][slot] & mask:
            self._fail(ProtocolError(f"channel {self.name}: credit names seq {released}, slot {slot} of "
                                     f"micro-batch {mb} holds seq {self._slot_seq[mb][slot]}"))
        self._slot_free[mb][slot] = True

    def _return_credit(self, mb: int, slot: int, seq: int) -> None:
        if self.piggyback_credits:
            self._pending_credits.append((mb, slot, seq))
        else:
            self._write_credit(mb, slot, seq)

    def _take_pending_credits(self) -> list[tuple[int, int, int]]:
        count = min(len(self._pending_credits), MAX_PIGGYBACK_CREDITS)
        credits = [self._pending_credits.popleft() for _ in range(count)]
        self._counters["credits_piggybacked"] += count
        self._counters["credits_returned"] += count
        return credits

    def _write_pending_credits(self) -> None:
        """Before the channel waits: the peer may be waiting for these credits."""
        while self._pending_credits:
            self._write_credit(*self._pending_credits.popleft())

    def _write_credit(self, mb: int, slot: int, seq: int) -> None:
        # A peer that is gone needs no credit; releasing a slot must not raise then.
        if self.endpoint.closed or self.endpoint.error is not None:
            return
        offset = self._layout.credit_out(mb, slot)
        struct.pack_into("<Q", self._buf, offset, seq & (2**64 - 1))
        try:
            self.endpoint.write(self._mr, self._peer, local_offset=offset,
                                remote_offset=self._peer_layout.credit_in(mb, slot), length=_CREDIT_BYTES,
                                imm=encode_imm(KIND_CREDIT, mb, slot))
        except (PeerLostError, ClosedError):
            return  # the peer died between the check and the write
        self._outstanding += 1
        self._counters["credits_returned"] += 1

    # -- receiving -----------------------------------------------------------
    def recv(self, microbatch: int | None = None, timeout: float | None = None) -> Message:
        """The next message (of one micro-batch, or any); others stay buffered in arrival order."""
        if microbatch is not None:
            self._check_microbatch(microbatch)
        message = self._take_arrival(microbatch)
        if message is None:
            self._poll_nowait()
            message = self._take_arrival(microbatch)
        if message is not None:
            return message
        box: list[Message] = []
        if not self._block_until(lambda: self._take_into(box, microbatch), timeout):
            raise self._recv_timeout(microbatch, timeout)
        return box[0]

    async def arecv(self, microbatch: int | None = None, timeout: float | None = None) -> Message:
        """recv() for asyncio: waits on the Context's fd instead of blocking the loop."""
        if microbatch is not None:
            self._check_microbatch(microbatch)
        box: list[Message] = []
        await self._await(lambda: self._take_into(box, microbatch), timeout,
                          lambda: self._recv_timeout(microbatch, timeout))
        return box[0]

    def _recv_timeout(self, microbatch: int | None, timeout: float | None) -> TimeoutError_:
        which = "any micro-batch" if microbatch is None else f"micro-batch {microbatch}"
        return TimeoutError_(f"channel {self.name}: no message for {which} within "
                             f"{self._timeout(timeout)} s")

    def _take_into(self, box: list[Message], microbatch: int | None) -> bool:
        message = self._take_arrival(microbatch)
        if message is not None:
            box.append(message)
        return message is not None

    def _take_arrival(self, microbatch: int | None) -> Message | None:
        for index, (mb, slot) in enumerate(self._arrived):
            if microbatch is None or mb == microbatch:
                del self._arrived[index]
                return self._open(mb, slot)
        return None

    def _open(self, mb: int, slot: int) -> Message:
        """Parse and check a landed slot; on any error the slot goes back to the sender."""
        base = self._layout.recv_slot(mb, slot)
        magic, version, count, _, seq, layer, h_mb, h_slot, size = _HEADER.unpack_from(self._buf, base)
        try:
            self._check_header(magic, version, count, size, h_mb, h_slot, mb, slot)
            self._check_sequence(mb, slot, seq)
            tensors = [self._tensor_view(base, index) for index in range(count)]
        except LaminaError:
            self._return_credit(mb, slot, seq)
            raise
        self._recv_seq[mb] += 1
        self._counters["messages_received"] += 1
        self._counters["bytes_received"] += HEADER_BYTES + size
        return Message(self, layer, mb, seq, slot, tensors)

    def _check_header(self, magic: int, version: int, count: int, size: int, h_mb: int, h_slot: int,
                      mb: int, slot: int) -> None:
        if magic != MAGIC or version != WIRE_VERSION:
            raise ProtocolError(f"channel {self.name}: bad header in micro-batch {mb} slot {slot} "
                                f"(magic 0x{magic:08x}, version {version})")
        if (h_mb, h_slot) != (mb, slot):
            raise ProtocolError(f"channel {self.name}: header names micro-batch {h_mb} slot {h_slot}, "
                                f"the immediate micro-batch {mb} slot {slot}")
        if count > MAX_TENSORS or size > self._layout.recv_capacity:
            raise ProtocolError(f"channel {self.name}: header claims {count} tensors, {size} B")

    def _check_sequence(self, mb: int, slot: int, seq: int) -> None:
        expected = self._recv_seq[mb]
        if seq != expected:
            what = "duplicate or reordered" if seq < expected else "gap (lost or reordered)"
            raise SequenceError(f"channel {self.name}: micro-batch {mb} got seq {seq}, expected "
                                f"{expected}: {what}")
        if slot != seq % self.spec.slots_per_microbatch:
            raise ProtocolError(f"channel {self.name}: seq {seq} arrived in slot {slot}")

    def _tensor_view(self, base: int, index: int) -> TensorView:
        code, ndim, _, _, offset, *dims = _ENTRY.unpack_from(self._buf, base + _HEADER.size + index * _ENTRY.size)
        name = _DTYPE_BY_CODE.get(code)
        if name is None or ndim > MAX_NDIM:
            raise ProtocolError(f"channel {self.name}: tensor {index} has dtype code {code}, ndim {ndim}")
        storage = _DTYPES[name][1]
        shape = tuple(dims[:ndim])
        nbytes = math.prod(shape) * storage.itemsize
        # An empty tensor must still have a shape that fits: (0, 2**31, 2**31) is no tensor numpy can make.
        extent = math.prod(max(d, 1) for d in shape) * storage.itemsize
        if offset + nbytes > self._layout.recv_capacity or extent > self._layout.recv_capacity:
            raise ProtocolError(f"channel {self.name}: tensor {index} (shape {list(shape)}, {nbytes} B at "
                                f"{offset}) overruns the slot")
        start = base + HEADER_BYTES + offset
        return _as_tensor_view(self._buf[start:start + nbytes].view(storage).reshape(shape), name)

    # -- completion machinery --------------------------------------------------
    def _dispatch(self, completions: Iterable[Completion]) -> None:
        for c in completions:
            if c.op == Op.WRITE:
                self._outstanding -= 1
                if not c.ok:
                    self._fail(c.error())
            elif c.op == Op.RECV_IMM and c.imm is not None:
                self._on_immediate(c.imm)
            elif c.op == Op.REFUSED:
                self._fail(ProtocolError(f"channel {self.name}: the peer's write here was refused "
                                         f"(status {c.status})"))

    def _on_immediate(self, imm: int) -> None:
        kind, mb, slot = decode_imm(imm)
        if mb >= self.spec.microbatches or slot >= self.spec.slots_per_microbatch:
            self._fail(ProtocolError(f"channel {self.name}: immediate 0x{imm:08x} names no slot"))
        if kind == KIND_DATA:
            self._apply_piggybacked_credits(mb, slot)
            self._arrived.append((mb, slot))
        elif kind == KIND_CREDIT:
            self._on_credit_write(mb, slot)
        else:
            self._fail(ProtocolError(f"channel {self.name}: immediate of unknown kind {kind}"))

    def _apply_piggybacked_credits(self, mb: int, slot: int) -> None:
        """Credits in a landed header count at once, even while the message waits in the buffer."""
        base = self._layout.recv_slot(mb, slot)
        magic, _, _, credits = struct.unpack_from("<IHBB", self._buf, base)
        if magic != MAGIC:
            return  # the bad header is reported when the message is opened
        for index in range(min(credits, MAX_PIGGYBACK_CREDITS)):
            credit = _PIGGYBACK.unpack_from(self._buf, base + _PIGGYBACK_BASE + index * _PIGGYBACK.size)
            self._credit_arrived(*credit, mask=0xFFFF_FFFF)

    def _fail(self, error: LaminaError | None) -> None:
        self._error = self._error or error
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _poll_nowait(self) -> None:
        self._dispatch(self.endpoint.poll())

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _block_until(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        """Dispatch completions until ready() holds; False on timeout."""
        deadline = time.monotonic() + self._timeout(timeout)
        if not ready():
            self._write_pending_credits()
        while not ready():
            self._raise_if_failed()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            got = self.endpoint.wait(min(left, _WAIT_SLICE_S))
            if not got:
                self._raise_if_endpoint_failed()
            self._dispatch(got)
        return True

    async def _await(self, ready: Callable[[], bool], timeout: float | None,
                     on_timeout: Callable[[], LaminaError]) -> None:
        """The asyncio twin of _block_until: sleeps on the Context's fd between polls."""
        deadline = time.monotonic() + self._timeout(timeout)
        loop = asyncio.get_running_loop()
        while True:
            self._poll_nowait()
            if ready():
                return
            self._write_pending_credits()
            self._raise_if_endpoint_failed()
            left = deadline - time.monotonic()
            if left <= 0:
                raise on_timeout()
            await _ReadableWaiters.shared(loop, self.context, self.endpoint).wait(min(left, _WAIT_SLICE_S))

    def _raise_if_endpoint_failed(self) -> None:
        error = self.endpoint.error
        if error is not None:
            self._fail(error)

    def flush(self, timeout: float | None = None) -> None:
        """Write out pending credits, then wait until every posted write has completed."""
        self._write_pending_credits()
        if not self._block_until(lambda: self._outstanding == 0, timeout):
            raise TimeoutError_(f"channel {self.name}: {self._outstanding} writes still outstanding "
                                f"after {self._timeout(timeout)} s")

    # -- life cycle ------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.endpoint.closed

    def close(self) -> None:
        """Close the endpoint (outstanding writes are canceled) and deregister the region."""
        self.endpoint.close()
        self._rings.close()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Channel {self.name} {self.spec.microbatches}x{self.spec.slots_per_microbatch} slots>"


def _tensor_list(tensors: Any) -> list[Any]:
    if isinstance(tensors, (list, tuple)):
        return list(tensors)
    return [tensors]


class ChannelListener:
    """A listening socket that hands out Channels (the attention side, by default)."""

    def __init__(self, ctx: Context, address: str | tuple[str, int], spec: ChannelSpec, *,
                 role: str = "attention", timeout: float = DEFAULT_TIMEOUT_S,
                 piggyback_credits: bool = False):
        _other_role(role)
        self.context = ctx
        self.spec = spec
        self.role = role
        self.timeout = timeout
        self.piggyback_credits = piggyback_credits
        self._listener = ctx.listen(address)
        self.address: tuple[str, int] = tuple(self._listener.address)

    def accept(self, timeout: float | None = None, name: str | None = None) -> Channel:
        return Channel.accept(self._listener, self.spec, role=self.role, name=name,
                              accept_timeout=timeout, timeout=self.timeout,
                              piggyback_credits=self.piggyback_credits)

    def close(self) -> None:
        self._listener.close()

    def __enter__(self) -> "ChannelListener":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------
# asyncio: one reader per (loop, context fd)


class _ReadableWaiters:
    """Shares one loop.add_reader per Context fd (asyncio allows one callback per fd).

    The callback moves native completions into the per-endpoint queues (which
    also drains the fd) and wakes every waiting channel; each then looks at its
    own endpoint's queue.
    """

    _registry: dict[tuple[int, int], "_ReadableWaiters"] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, pump: Callable[[], Any]):
        self._loop = loop
        self._fd = fd
        self._pump = pump
        self._futures: set[asyncio.Future] = set()

    @classmethod
    def shared(cls, loop: asyncio.AbstractEventLoop, ctx: Context, endpoint: Endpoint) -> "_ReadableWaiters":
        fd = ctx.fileno()
        key = (id(loop), fd)
        if key not in cls._registry:
            # poll(0) routes every waiting completion to its endpoint and takes none.
            cls._registry[key] = cls(loop, fd, lambda: endpoint.poll(0))
        return cls._registry[key]

    async def wait(self, timeout: float) -> None:
        future = self._loop.create_future()
        self._add(future)
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._discard(future)

    def _add(self, future: asyncio.Future) -> None:
        if not self._futures:
            self._loop.add_reader(self._fd, self._on_readable)
        self._futures.add(future)

    def _discard(self, future: asyncio.Future) -> None:
        self._futures.discard(future)
        if not self._futures:
            self._loop.remove_reader(self._fd)
            self._registry.pop((id(self._loop), self._fd), None)

    def _on_readable(self) -> None:
        self._pump()
        for future in list(self._futures):
            if not future.done():
                future.set_result(None)
