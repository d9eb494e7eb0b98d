"""Channel wire format: header constants, the ChannelSpec both ends declare, ring layout, immediates.

native/src/channel writes and parses the headers (docs/channel.md); the
structs here mirror that layout for the fuzzer, and the sizes lay out the
rings each side registers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from typing import Any, Sequence

from .. import dtypes
from ..errors import InvalidArgumentError

MAGIC = 0x4843_4D4C  # b"LMCH" little-endian
WIRE_VERSION = 1
HEADER_BYTES = 256
ALIGN = 64  # payload tensors start on cache-line boundaries
MAX_TENSORS = 6
MAX_PIGGYBACK_CREDITS = 4
MAX_NDIM = 4
_CREDIT_BYTES = 8

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
        object.__setattr__(self, "dtype", dtypes.canonical(self.dtype))
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
        return dtypes.itemsize(self.dtype)

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

    @property
    def payload_bytes(self) -> int:
        """Size of a region taking this side's payloads apart from the headers (Channel payloads=): one
        receive slot's capacity per (micro-batch, slot)."""
        return self._ring_slots * self.recv_capacity

    def payload_bytes_of(self, microbatches: int) -> int:
        """``payload_bytes`` of a region taking the payloads of the first ``microbatches`` only
        (Channel payload_microbatches=)."""
        return microbatches * self.slots * self.recv_capacity

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
