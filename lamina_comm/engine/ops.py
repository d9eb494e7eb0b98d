"""``torch.library`` custom ops over ``RemoteAttention``, so that a compiled model can call the tier.

    handle = ops.register(remote)                       # a RemoteAttention
    sent = torch.ops.lamina.send_qkv(q, k, v, handle, layer, microbatch)
    out = torch.ops.lamina.recv_attention(sent, q, handle, layer, microbatch)

``send_qkv`` returns a send token (int64 scalar); passing it to
``recv_attention`` orders the two in the graph (and keeps the send, which
has no other output, from being dropped). ``recv_attention`` returns a new
tensor shaped like q ([T, H, D]) with every rank's heads. Both have fake (meta)
implementations, so ``torch.compile(fullgraph=True)`` traces through them
without a graph break; at run time they are opaque calls into the runtime.
The handle is a plain int: a compiled graph holds it as a constant.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any

import torch

from .remote import RemoteAttention

_registry: dict[int, RemoteAttention] = {}
_ids = itertools.count(1)
_lock = threading.Lock()


def register(remote: RemoteAttention) -> int:
    """A handle for ``remote`` that the ops take (``unregister`` it before closing ``remote``)."""
    with _lock:
        handle = next(_ids)
        _registry[handle] = remote
    return handle


def unregister(handle: int) -> None:
    with _lock:
        _registry.pop(handle, None)


def _remote(handle: int) -> RemoteAttention:
    try:
        return _registry[handle]
    except KeyError:
        raise ValueError(f"no RemoteAttention registered under handle {handle}") from None


@torch.library.custom_op("lamina::send_qkv", mutates_args=())
def send_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, layer: int,
             microbatch: int) -> torch.Tensor:
    remote = _remote(int(handle))
    remote.send(q, k, v, layer=layer, microbatch=microbatch)
    return torch.tensor(max(channel.send_token() for channel in remote.channels), dtype=torch.int64)


@send_qkv.register_fake
def _send_qkv_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, layer: int,
                   microbatch: int) -> torch.Tensor:
    # Nothing here may depend on the handle's value: a compiler may trace it as a symbol. The token is
    # a host scalar whatever q's device (as the real op returns it: no device copy for a token).
    return torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("lamina::recv_attention", mutates_args=())
def recv_attention(sent: torch.Tensor, q: torch.Tensor, handle: int, layer: int, microbatch: int) -> torch.Tensor:
    return _remote(int(handle)).recv_into(torch.empty_like(q), layer=layer, microbatch=microbatch)


@recv_attention.register_fake
def _recv_attention_fake(sent: torch.Tensor, q: torch.Tensor, handle: int, layer: int,
                         microbatch: int) -> torch.Tensor:
    return torch.empty_like(q)  # the output has q's shape [T, H, D] and dtype


def remote_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, layer: int,
                     microbatch: int = 0) -> Any:
    """One layer's attention on the remote tier, as two ops (what a compiled model calls)."""
    sent = torch.ops.lamina.send_qkv(q, k, v, handle, layer, microbatch)
    return torch.ops.lamina.recv_attention(sent, q, handle, layer, microbatch)
