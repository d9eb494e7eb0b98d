"""``RemoteAttention``: the model tier's side: per layer and micro-batch, q/k/v out to every attention
rank's head share, the attention output gathered back into the caller's tensor."""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

from lamina_comm.channel import Channel, ChannelGroup
from lamina_comm.errors import InvalidArgumentError, ProtocolError, TimeoutError_
from lamina_comm.transport import Context

from .shape import AttentionShape


class SendHandle:
    """One layer's sends: ``done`` once every write has completed, so the sources may be reused.

    Tensors that went from a send slot (``RemoteAttention.buffers``) or were
    copied into one are free at once; tensors sent straight from a
    registered region are read by the transport until the writes complete.
    """

    def __init__(self, channels: Sequence[Channel], tokens: Sequence[int]):
        self._pending = list(zip(channels, tokens))

    @property
    def done(self) -> bool:
        self._pending = [(c, t) for c, t in self._pending if not c.sent(t)]
        return not self._pending

    def wait(self, timeout: Optional[float] = None) -> None:
        """Until every write of these sends completed (TimeoutError after ``timeout``)."""
        for channel, token in self._pending:
            channel.wait_sent(token, timeout)
        self._pending = []


class LayerBuffers:
    """Each attention rank's q, k, v send-slot views for one micro-batch: compute into them, no copy."""

    def __init__(self, views: list[list[Any]], q_heads: list[tuple[int, int]], kv_heads: list[tuple[int, int]]):
        self.views = views
        self.q = [v[0] for v in views]
        self.k = [v[1] for v in views]
        self.v = [v[2] for v in views]
        self._q_heads, self._kv_heads = q_heads, kv_heads

    def scatter(self, q: Any, k: Any, v: Any) -> None:
        """Copy full-head q [T, H, D], k and v [T, KV, D] into every rank's share."""
        for rank, ((qs, qe), (ks, ke)) in enumerate(zip(self._q_heads, self._kv_heads)):
            self.q[rank].copy_(q[:, qs:qe])
            self.k[rank].copy_(k[:, ks:ke])
            self.v[rank].copy_(v[:, ks:ke])


class RemoteAttention:
    """Channels from one model rank to every attention rank (``addresses``, in rank order).

    ``send`` fans a layer's q/k/v out, head share by head share, in one
    native call; ``recv_into`` gathers every rank's output into the caller's
    tensor [T, H, D] (or [T, H * D]) in one native wait, bit for bit.
    """

    def __init__(self, context: Context, addresses: Sequence[str], shape: AttentionShape, *,
                 connect_timeout: float = 30.0, timeout: float = 30.0):
        if not addresses:
            raise InvalidArgumentError("RemoteAttention needs at least one attention rank")
        self.shape = shape
        ranks = len(addresses)
        self.q_heads = [shape.q_heads(a, ranks) for a in range(ranks)]
        self.kv_heads = [shape.kv_heads(a, ranks) for a in range(ranks)]
        self.channels: list[Channel] = []
        try:
            for rank, address in enumerate(addresses):
                self.channels.append(Channel.connect(
                    context, address, shape.channel_spec(rank, ranks), role="model", name=f"attention-{rank}",
                    connect_timeout=connect_timeout, timeout=timeout, piggyback_credits=True))
        except BaseException:
            self.close()
            raise
        self._group = ChannelGroup(self.channels)

    # -- model tier -> attention tier ----------------------------------------------
    def buffers(self, microbatch: int, num_tokens: int, timeout: Optional[float] = None) -> LayerBuffers:
        """The next send slots of ``microbatch`` as q/k/v views per rank (waits for their credits)."""
        if not 0 < num_tokens <= self.shape.max_tokens:
            raise InvalidArgumentError(f"{num_tokens} tokens: a micro-batch holds 1..{self.shape.max_tokens}")
        d, dtype = self.shape.head_dim, self.shape.dtype
        views = []
        for channel, (qs, qe), (ks, ke) in zip(self.channels, self.q_heads, self.kv_heads):
            shapes = [(num_tokens, qe - qs, d), (num_tokens, ke - ks, d), (num_tokens, ke - ks, d)]
            views.append(channel.send_buffers(microbatch, shapes, dtype, as_torch=True, timeout=timeout))
        return LayerBuffers(views, self.q_heads, self.kv_heads)

    def send(self, q: Any, k: Any = None, v: Any = None, *, layer: int, microbatch: int,
             timeout: Optional[float] = None) -> SendHandle:
        """Post a layer's q/k/v to every rank: ``LayerBuffers`` (no copy), or full-head q, k, v.

        Full-head tensors are sliced per rank; a slice that is not contiguous
        is copied once into the slot (the channels count it as staged).
        """
        if isinstance(q, LayerBuffers):
            messages = q.views
        else:
            if k is None or v is None:
                raise InvalidArgumentError("send(q, k, v) needs all three, or one LayerBuffers")
            messages = [[q[:, qs:qe], k[:, ks:ke], v[:, ks:ke]]
                        for (qs, qe), (ks, ke) in zip(self.q_heads, self.kv_heads)]
        self._group.send(messages, layer=layer, microbatch=microbatch, timeout=timeout)
        return SendHandle(self.channels, [channel.send_token() for channel in self.channels])

    # -- attention tier -> model tier --------------------------------------------------
    def recv_into(self, out: Any, *, layer: int, microbatch: int, timeout: Optional[float] = None) -> Any:
        """Every rank's attention output of (layer, microbatch), each in its heads of ``out``; returns ``out``.

        ``out`` is [T, H, D] or [T, H * D] (torch). The replies are copied
        out of the slots (one copy, bit for bit) and the slots released.
        """
        tokens = out.shape[0]
        heads_view = out.view(tokens, self.shape.num_heads, self.shape.head_dim)
        messages = self._group.recv(microbatch, timeout)
        try:
            for rank, message in enumerate(messages):
                if message.layer != layer:
                    raise ProtocolError(f"attention rank {rank} answered layer {message.layer}, expected {layer}")
                part = message.torch()[0]
                qs, qe = self.q_heads[rank]
                if tuple(part.shape) != (tokens, qe - qs, self.shape.head_dim):
                    raise InvalidArgumentError(f"attention rank {rank} answered {list(part.shape)}, expected "
                                               f"[{tokens}, {qe - qs}, {self.shape.head_dim}]")
                heads_view[:, qs:qe].copy_(part)
        finally:
            for message in messages:
                message.release()
        return out

    # -- life cycle ----------------------------------------------------------------------
    def flush(self, timeout: Optional[float] = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for channel in self.channels:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            channel.flush(left)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.channels = []

    def __enter__(self) -> "RemoteAttention":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["LayerBuffers", "RemoteAttention", "SendHandle", "TimeoutError_"]
