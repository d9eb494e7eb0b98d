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

Modules: spec (wire constants, ChannelSpec, RingLayout, immediates), views
(tensors in and out of slots), handshake (the hello and its checks), core
(Channel, Message, ChannelListener), group (ChannelGroup).
"""
from __future__ import annotations

from ..dtypes import canonical as dtype_name  # the channel's public name for it
from .core import DEFAULT_TIMEOUT_S, Channel, ChannelListener, ChannelMetrics, Message
from .group import ChannelGroup
from .handshake import SpecMismatchError
from .spec import (ALIGN, HEADER_BYTES, KIND_CREDIT, KIND_DATA, MAGIC, MAX_NDIM, MAX_PIGGYBACK_CREDITS,
                   MAX_TENSORS, ROLES, WIRE_VERSION, ChannelSpec, RingLayout, decode_imm, encode_imm,
                   packed_offsets)
from .views import TensorView, as_bfloat16, to_torch

__all__ = [
    "Channel", "ChannelGroup", "ChannelListener", "ChannelMetrics", "ChannelSpec", "Message", "RingLayout",
    "SpecMismatchError", "TensorView", "as_bfloat16", "to_torch", "dtype_name", "packed_offsets",
    "encode_imm", "decode_imm", "ALIGN", "DEFAULT_TIMEOUT_S", "HEADER_BYTES", "KIND_CREDIT", "KIND_DATA",
    "MAGIC", "MAX_NDIM", "MAX_PIGGYBACK_CREDITS", "MAX_TENSORS", "ROLES", "WIRE_VERSION",
]
