"""``RemoteAttention``: the model tier's side: per layer and micro-batch, q/k/v out to every attention
rank's head share, the attention output gathered back into the caller's tensor."""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import numpy as np

from lamina_comm.channel import Channel, ChannelGroup
from lamina_comm.errors import InvalidArgumentError, ProtocolError
from lamina_comm.transport import Context, MemoryRegion

from .shape import AttentionShape


def torch_storage_dtype(dtype: Any) -> Any:
    """The torch dtype numpy can view ``dtype`` as (bfloat16 travels as its 16 bits)."""
    import torch
    return torch.int16 if dtype == torch.bfloat16 else dtype


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

    __slots__ = ("views", "_q_heads", "_kv_heads")

    def __init__(self, views: list[list[Any]], q_heads: list[tuple[int, int]], kv_heads: list[tuple[int, int]]):
        self.views = views
        self._q_heads, self._kv_heads = q_heads, kv_heads

    @property
    def q(self) -> list[Any]:
        return [v[0] for v in self.views]

    @property
    def k(self) -> list[Any]:
        return [v[1] for v in self.views]

    @property
    def v(self) -> list[Any]:
        return [v[2] for v in self.views]

    def scatter(self, q: Any, k: Any, v: Any) -> None:
        """Copy full-head q [T, H, D], k and v [T, KV, D] into every rank's share."""
        for views, (qs, qe), (ks, ke) in zip(self.views, self._q_heads, self._kv_heads):
            views[0].copy_(q[:, qs:qe])
            views[1].copy_(k[:, ks:ke])
            views[2].copy_(v[:, ks:ke])


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
        self._context = context
        self._sources: list[MemoryRegion] = []
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
        self._last_out: Optional[tuple[tuple, list[np.ndarray]]] = None
        self._shapes: dict[int, list[list[tuple[int, int, int]]]] = {}

    # -- model tier -> attention tier ----------------------------------------------
    def buffers(self, microbatch: int, num_tokens: int, timeout: Optional[float] = None) -> LayerBuffers:
        """The next send slots of ``microbatch`` as q/k/v views per rank (waits for their credits)."""
        if not 0 < num_tokens <= self.shape.max_tokens:
            raise InvalidArgumentError(f"{num_tokens} tokens: a micro-batch holds 1..{self.shape.max_tokens}")
        self._check_microbatch(microbatch)
        shapes = self._shapes.get(num_tokens)
        if shapes is None:
            d = self.shape.head_dim
            shapes = self._shapes[num_tokens] = [[(num_tokens, qe - qs, d), (num_tokens, ke - ks, d),
                                                  (num_tokens, ke - ks, d)]
                                                 for (qs, qe), (ks, ke) in zip(self.q_heads, self.kv_heads)]
        dtype = self.shape.dtype
        return LayerBuffers([channel.send_buffers(microbatch, rank_shapes, dtype, as_torch=True, timeout=timeout)
                             for channel, rank_shapes in zip(self.channels, shapes)], self.q_heads, self.kv_heads)

    def send(self, q: Any, k: Any = None, v: Any = None, *, layer: int, microbatch: int,
             timeout: Optional[float] = None, stream: Any = None) -> SendHandle:
        """Post a layer's q/k/v to every rank: ``LayerBuffers`` (no copy), or full-head q, k, v.

        Full-head tensors are sliced per rank. Slices of memory registered
        with ``register_source`` (a fused qkv output, or q, k, v back to back)
        go without a copy, strided ones as gather lists of their rows; slices
        of unregistered memory are copied once into the slot (the channels
        count them as staged).

        CUDA q, k, v (or ``stream=``) go stream-ordered: each rank's heads are
        copied into its send slot by the copy engine on ``stream`` (default:
        torch's current stream), one 2D copy per tensor, and the writes are
        posted from native code when the copies are done; the call does not
        wait for the device, and the sources may be reused by work queued on
        that stream afterwards (the handle is done at once).
        """
        self._check_microbatch(microbatch)
        if stream is not None or _on_cuda(q):
            if k is None or v is None:
                raise InvalidArgumentError("a stream-ordered send(q, k, v) needs all three")
            if stream is None:
                import torch
                stream = torch.cuda.current_stream(q.device)
            for channel, (qs, qe), (ks, ke) in zip(self.channels, self.q_heads, self.kv_heads):
                channel.send([q[:, qs:qe], k[:, ks:ke], v[:, ks:ke]], layer=layer, microbatch=microbatch,
                             timeout=timeout, stream=stream)
            return SendHandle([], [])
        if type(q) is LayerBuffers:
            messages = q.views  # slot views go by the tables send_buffers() filled, without a description
        else:
            if k is None or v is None:
                raise InvalidArgumentError("send(q, k, v) needs all three, or one LayerBuffers")
            messages = [[q[:, qs:qe], k[:, ks:ke], v[:, ks:ke]]
                        for (qs, qe), (ks, ke) in zip(self.q_heads, self.kv_heads)]
        self._group.send(messages, layer=layer, microbatch=microbatch, timeout=timeout)
        return SendHandle(self.channels, [channel.send_token() for channel in self.channels])

    def send_metadata(self, microbatch: int, request_ids: Any, positions: Any,
                      timeout: Optional[float] = None) -> None:
        """The step's batch description for ``microbatch``: each token's request id and position.

        Goes to every rank on a micro-batch of its own (not in the layer
        field); send it before the step's first layer: the ranks keep it for
        every layer of that micro-batch until the next one replaces it
        (``LayerRequest.request_ids`` / ``.positions``).
        """
        ids = np.asarray(request_ids, dtype=np.int64).reshape(-1)
        where = np.asarray(positions, dtype=np.int64).reshape(-1)
        if ids.shape != where.shape or not 0 < ids.size <= self.shape.max_tokens:
            raise InvalidArgumentError(f"metadata for {ids.size} request ids and {where.size} positions; a "
                                       f"micro-batch holds 1..{self.shape.max_tokens} tokens")
        self._check_microbatch(microbatch)
        control = self.shape.metadata_microbatch
        for channel in self.channels:
            target, table = channel.send_buffers(control, [(1,), (2, ids.size)], "int64", timeout=timeout)
            target[0] = microbatch
            table[0], table[1] = ids, where
            channel.send([target, table], layer=0, microbatch=control, timeout=timeout)

    def register_source(self, memory: Any) -> MemoryRegion:
        """Register host memory the caller computes q/k/v into (a torch or numpy buffer).

        Every rank's share of q, k, v that lies in it is then written from
        there with no copy (packed shares in one write, strided column blocks
        of a fused tensor as a gather list of rows): keep it unchanged until
        the ``SendHandle`` is done.
        """
        region = self._context.register(memory)
        self._sources.append(region)
        for channel in self.channels:
            channel.add_source_region(region)
        return region

    # -- attention tier -> model tier --------------------------------------------------
    def recv_into(self, out: Any, *, layer: int, microbatch: int, timeout: Optional[float] = None,
                  stream: Any = None) -> Any:
        """Every rank's attention output of (layer, microbatch), each in its heads of ``out``; returns ``out``.

        ``out`` is [T, H, D] or [T, H * D] (torch). The replies are copied
        out of the slots (one copy, bit for bit) and the slots released. A
        CUDA ``out`` is filled by the copy engine on ``stream`` (default:
        torch's current stream; one 2D copy per rank into its heads) and the
        slots go back once the copies are done: work queued on that stream
        afterwards sees the output, and the call waits only for the replies
        to arrive, never for the device.
        """
        if _on_cuda(out):
            return self._recv_into_device(out, layer, microbatch, timeout, stream)
        destinations = self._destinations(out)
        messages = self._group.recv(microbatch, timeout)
        try:
            for rank, (message, destination) in enumerate(zip(messages, destinations)):
                if message.layer != layer:
                    raise ProtocolError(f"attention rank {rank} answered layer {message.layer}, expected {layer}")
                part = message.tensors[0]
                if len(message.tensors) != 1 or part.shape != destination.shape or \
                        part.dtype_name != self.shape.dtype:
                    raise InvalidArgumentError(f"attention rank {rank} answered {len(message.tensors)} tensor(s), "
                                               f"{part.dtype_name}{list(part.shape)}; expected one "
                                               f"{self.shape.dtype}{list(destination.shape)}")
                np.copyto(destination, part.view(destination.dtype), casting="no")
        finally:
            for message in messages:
                message.release()
        return out

    def _recv_into_device(self, out: Any, layer: int, microbatch: int, timeout: Optional[float],
                          stream: Any) -> Any:
        tokens = out.shape[0]
        if str(out.dtype) != f"torch.{self.shape.dtype}" or not out.is_contiguous() or \
                out.numel() != tokens * self.shape.num_heads * self.shape.head_dim:
            raise InvalidArgumentError(f"recv_into needs a contiguous {self.shape.dtype} tensor of [T, "
                                       f"{self.shape.num_heads}, {self.shape.head_dim}] or [T, "
                                       f"{self.shape.num_heads * self.shape.head_dim}] elements, got "
                                       f"{out.dtype}{list(out.shape)}")
        if stream is None:
            import torch
            stream = torch.cuda.current_stream(out.device)
        heads = out.view(tokens, self.shape.num_heads, self.shape.head_dim)
        messages = self._group.recv(microbatch, timeout)
        try:
            for rank, (message, channel, (qs, qe)) in enumerate(zip(messages, self.channels, self.q_heads)):
                if message.layer != layer:
                    raise ProtocolError(f"attention rank {rank} answered layer {message.layer}, expected {layer}")
                if len(message.tensors) != 1:
                    raise InvalidArgumentError(f"attention rank {rank} answered {len(message.tensors)} tensors")
                channel._device_staging().recv_into(message, [heads[:, qs:qe]], stream)
        finally:
            for message in messages:
                message.release()  # (a no-op for those the stream took over)
        return out

    def _destinations(self, out: Any) -> list[np.ndarray]:
        """Each rank's heads of ``out`` as numpy views (torch ops cost microseconds each; kept per tensor)."""
        key = (out.data_ptr(), tuple(out.shape), out.dtype, tuple(out.stride()))
        if self._last_out is not None and self._last_out[0] == key:
            return self._last_out[1]
        tokens = out.shape[0]
        if str(out.dtype) != f"torch.{self.shape.dtype}":
            raise InvalidArgumentError(f"recv_into needs a {self.shape.dtype} tensor (the shape's dtype), got "
                                       f"{out.dtype}")
        if not out.is_contiguous() or out.device.type != "cpu" or out.numel() != tokens * self.shape.num_heads * \
                self.shape.head_dim:
            raise InvalidArgumentError(f"recv_into needs a contiguous host tensor of [T, {self.shape.num_heads}, "
                                       f"{self.shape.head_dim}] or [T, {self.shape.num_heads * self.shape.head_dim}] "
                                       f"elements, got {list(out.shape)} on {out.device}")
        storage = out.view(torch_storage_dtype(out.dtype)).numpy().reshape(tokens, self.shape.num_heads,
                                                                           self.shape.head_dim)
        destinations = [storage[:, qs:qe] for qs, qe in self.q_heads]
        self._last_out = (key, destinations)
        return destinations

    def _check_microbatch(self, microbatch: int) -> None:
        if not 0 <= microbatch < self.shape.microbatches:
            raise InvalidArgumentError(f"micro-batch {microbatch} is not in [0, {self.shape.microbatches})")

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
        for region in self._sources:
            region.close()
        self._sources = []

    def __enter__(self) -> "RemoteAttention":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _on_cuda(tensor: Any) -> bool:
    device = getattr(tensor, "device", None)
    return getattr(device, "type", None) == "cuda"


__all__ = ["LayerBuffers", "RemoteAttention", "SendHandle"]
