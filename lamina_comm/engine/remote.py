"""``RemoteAttention``: the model tier's side: per layer and micro-batch, q/k/v out to every attention
rank's head share, the attention output gathered back into the caller's tensor."""
from __future__ import annotations

import ctypes
import time
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from lamina_comm import dtypes
from lamina_comm.channel import Channel, ChannelGroup, Message
from lamina_comm.errors import InvalidArgumentError, LaminaError, ProtocolError, TimeoutError_, UnsupportedError
from lamina_comm.model.kvcache import HeadRange
from lamina_comm.transport import Context, MemoryRegion

from .shape import AttentionShape
from .wire import ERROR_LAYER, METADATA_LAYER, AttentionRankError, decode_error


def torch_storage_dtype(dtype: Any) -> Any:
    """The torch dtype numpy can view ``dtype`` as (bfloat16 travels as its 16 bits)."""
    import torch
    return torch.int16 if dtype == torch.bfloat16 else dtype


class SendHandle:
    """One layer's sends: ``done`` once every write has completed, so the sources may be reused.

    Tensors that went from a send slot (``RemoteAttention.buffers``) or were
    copied into one are free at once; tensors sent straight from a
    registered region are read by the transport until the writes complete.
    Stream-ordered sends straight from GPU memory (registered with
    ``register_source`` for the NIC) are read by the NIC after the stream
    passed them: ``wait(stream=s)`` orders work queued on ``s`` afterwards
    (the next projection into the same buffer) after the reads, with no
    host wait.
    """

    def __init__(self, channels: Sequence[Channel], tokens: Sequence[int], microbatch: Optional[int] = None):
        self._pending = list(zip(channels, tokens))
        # Stream-ordered: each channel's send of the micro-batch that went straight from GPU memory (its
        # sequence number, taken now: a later send of the micro-batch is not this handle's).
        self._direct: list[tuple[Channel, int, int]] = []
        for channel in channels if microbatch is not None else []:
            seq = channel.last_device_send(microbatch)
            if seq is not None:
                self._direct.append((channel, microbatch, seq))

    @property
    def done(self) -> bool:
        self._pending = [(c, t) for c, t in self._pending if not c.sent(t)]
        self._direct = [(c, mb, seq) for c, mb, seq in self._direct if not c.device_sent(mb, seq)]
        return not self._pending and not self._direct

    def wait(self, timeout: Optional[float] = None, *, stream: Any = None) -> None:
        """Until every write of these sends completed (TimeoutError after ``timeout``, by default each
        channel's); with ``stream``, the sends straight from GPU memory are waited for on that stream
        instead of here (work queued on it afterwards may overwrite their sources)."""
        for channel, token in self._pending:
            channel.wait_sent(token, timeout)
        self._pending = []
        if stream is not None:
            for channel, microbatch, seq in self._direct:
                channel.wait_sent_on(stream, microbatch, seq)
        else:
            start = time.monotonic()
            for channel, microbatch, seq in self._direct:
                limit = channel.timeout if timeout is None else timeout
                while not channel.device_sent(microbatch, seq):  # a failed channel releases its sends
                    if time.monotonic() - start >= limit:
                        raise TimeoutError_(f"channel {channel.name}: send {seq} of micro-batch {microbatch} "
                                            f"from GPU memory was not sent within {limit} s")
                    time.sleep(50e-6)
        self._direct = []


# Outputs whose per-rank views are kept (one per micro-batch in flight is the common case).
_KEPT_DESTINATIONS = 8


class RankReply(NamedTuple):
    """One rank's reply to the last ``recv_into``."""

    arrived_ns: int  # when it landed (CLOCK_MONOTONIC, as time.perf_counter_ns), stamped by the channel
    compute_ns: Optional[int]  # the time the rank says it computed (None when it sent none)


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


def _refuse_device_control(channel: Channel) -> None:
    """The engine reads the control micro-batch (the channel's last: step metadata, control messages) on
    the host: a channel whose payloads land in device memory must keep that one in the ring
    (``payload_microbatches=`` the data micro-batches only)."""
    from ..channel.core import _is_cuda_region
    if _is_cuda_region(channel.payloads) and channel.payload_microbatches >= channel.spec.microbatches:
        raise UnsupportedError(f"channel {channel.name} takes every micro-batch's payloads into device memory "
                               f"(payloads=): the engine reads its control micro-batch on the host; connect it "
                               f"with payload_microbatches={channel.spec.microbatches - 1} (the data micro-batches)")


class _ReplyTimes:
    """Compute times of replies that landed in device memory (GPUDirect receive): each ``recv_into`` has
    the copy engine copy them on its stream into a row of page-locked host memory; ``read`` waits for
    that row's copies, so only a caller of ``RemoteAttention.replies`` ever waits for the device."""

    DEPTH = 4  # rows in turn: a row is reused DEPTH calls later, its copies long done

    def __init__(self, device: Any, ranks: int):
        from lamina_comm.gpu import cuda
        self._device, self._ranks = device, ranks
        self._pinned = cuda.PinnedBuffer(device, self.DEPTH * ranks * 8)
        self._values = np.frombuffer((ctypes.c_int64 * (self.DEPTH * ranks)).from_address(self._pinned.address),
                                     np.int64).reshape(self.DEPTH, ranks)
        self._events = [cuda.Event(device) for _ in range(self.DEPTH)]
        self._queued = [False] * self.DEPTH
        self._next = 0

    def row(self) -> int:
        """The next row, its last copies done."""
        row, self._next = self._next, (self._next + 1) % self.DEPTH
        self._wait(row)
        self._values[row] = -1  # read as 0 where no copy lands (not a time DEPTH calls old)
        return row

    def landing(self, row: int, rank: int) -> Any:
        from lamina_comm.channel.device import HostLanding
        return HostLanding(self._pinned.address + (row * self._ranks + rank) * 8, 8)

    def queued(self, row: int, stream: Optional[int]) -> None:
        with self._device.activate():
            self._events[row].record(stream)
        self._queued[row] = True

    def read(self, row: int, rank: int) -> int:
        self._wait(row)
        return max(0, int(self._values[row, rank]))  # a time: a negative one from a buggy rank is not one

    def _wait(self, row: int) -> None:
        if self._queued[row]:
            with self._device.activate():
                self._events[row].synchronize()
            self._queued[row] = False

    def close(self) -> None:
        """Waits for the copies still queued (they write the page-locked rows), then frees. A CUDA error
        is logged: the rows are then leaked rather than freed under a copy."""
        import logging
        try:
            for row in range(self.DEPTH):
                self._wait(row)
        except Exception as exc:
            logging.getLogger("lamina_comm").warning("reply compute times: %s (their memory is kept)", exc)
            return
        for event in self._events:
            event.close()
        self._pinned.close()


class RemoteAttention:
    """Channels from one model rank to every attention rank (``addresses``, in rank order).

    ``send`` fans a layer's q/k/v out, head share by head share, in one
    native call; ``recv_into`` gathers every rank's output into the caller's
    tensor [T, H, D] (or [T, H * D]) in one native wait, bit for bit.

    A failed call's error names the rank it came from (``channel_index``,
    None when no one rank is to blame); ``drain()`` afterwards takes the
    replies still in flight, so the channels are in step again.
    """

    def __init__(self, context: Context, addresses: Sequence[str], shape: AttentionShape, *,
                 connect_timeout: float = 30.0, timeout: float = 30.0, payloads: Optional[Sequence[Any]] = None):
        """``payloads``: a registered region per rank (GPU memory registered for the NIC, on verbs) that
        takes its replies' payloads (``shape.payload_bytes(rank, ranks)`` each): the attention output
        lands there, not in the host ring, and ``recv_into`` a CUDA tensor copies it device to device."""
        if not addresses:
            raise InvalidArgumentError("RemoteAttention needs at least one attention rank")
        ranks = len(addresses)
        if payloads is not None and len(payloads) != ranks:
            raise InvalidArgumentError(f"{len(payloads)} payload regions for {ranks} attention ranks")
        channels: list[Channel] = []
        try:
            for rank, address in enumerate(addresses):
                landing = None if payloads is None else payloads[rank]
                channels.append(Channel.connect(
                    context, address, shape.channel_spec(rank, ranks), role="model", name=f"attention-{rank}",
                    connect_timeout=connect_timeout, timeout=timeout, piggyback_credits=True, payloads=landing,
                    payload_microbatches=None if landing is None else shape.microbatches))
        except BaseException:
            for channel in channels:
                channel.close()
            raise
        self._attach(context, channels, shape, [shape.kv_heads(a, ranks) for a in range(ranks)], owns=True)

    @classmethod
    def over(cls, channels: Sequence[Channel], shape: AttentionShape,
             kv_heads: Optional[Sequence[HeadRange]] = None) -> "RemoteAttention":
        """Over channels the caller connected (after a handshake of its own), in rank order.

        ``kv_heads`` are each rank's KV heads (default: the shape's even
        split). Each channel's spec must carry that share with the control
        micro-batch last (``AttentionShape.channel_spec``'s layout; more
        tokens per slot are fine). Closing it leaves the channels open.
        """
        if not channels:
            raise InvalidArgumentError("RemoteAttention needs at least one attention rank")
        ranks = len(channels)
        heads = [tuple(h) for h in kv_heads] if kv_heads is not None else \
            [shape.kv_heads(a, ranks) for a in range(ranks)]
        if len(heads) != ranks:
            raise InvalidArgumentError(f"{len(heads)} head shares for {ranks} channels")
        for rank, (channel, (start, end)) in enumerate(zip(channels, heads)):
            _refuse_device_control(channel)
            spec, local_kv = channel.spec, end - start
            if not 0 <= start < end <= shape.num_kv_heads or spec.kv_heads != local_kv or \
                    spec.heads != local_kv * shape.group_size or spec.head_dim != shape.head_dim or \
                    spec.dtype != shape.dtype or spec.microbatches != shape.microbatches + 1 or \
                    spec.max_tokens < shape.max_tokens:
                raise InvalidArgumentError(
                    f"channel {channel.name} (rank {rank}) does not carry KV heads [{start}, {end}) of {shape}: its "
                    f"spec has {spec.kv_heads} KV heads, {spec.heads} query heads of {spec.head_dim} {spec.dtype}, "
                    f"{spec.microbatches} micro-batches (control last), {spec.max_tokens} tokens")
        remote = cls.__new__(cls)
        remote._attach(channels[0].context, list(channels), shape, heads, owns=False)
        return remote

    def _attach(self, context: Context, channels: list[Channel], shape: AttentionShape, kv_heads: list[HeadRange],
                owns: bool) -> None:
        self.shape = shape
        self._context = context
        self._owns = owns
        self._sources: list[MemoryRegion] = []
        self.kv_heads = kv_heads
        self.q_heads = [(start * shape.group_size, end * shape.group_size) for start, end in kv_heads]
        self.channels = channels
        self._group = ChannelGroup(channels)
        # Replies still to come, per rank and micro-batch (drain() takes them after a failure).
        self._in_flight = [[0] * shape.microbatches for _ in channels]
        self._replies: list[tuple[int, Optional[int]]] = []  # (arrived_ns, compute_ns) per rank: replies
        # Replies in device memory: their compute times, copied on the stream (row, ranks that sent one).
        self._times: Optional[_ReplyTimes] = None
        from ..channel.core import _is_cuda_region
        self._device_replies = any(_is_cuda_region(channel.payloads) for channel in channels)
        self._times_pending: Optional[tuple[int, list[int]]] = None
        # Each rank's heads of recently used outputs, as numpy views (by pointer, shape, dtype, strides).
        self._destinations_of: dict[tuple, list[np.ndarray]] = {}
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
        views = []
        for rank, (channel, rank_shapes) in enumerate(zip(self.channels, shapes)):
            try:
                views.append(channel.send_buffers(microbatch, rank_shapes, dtype, as_torch=True, timeout=timeout))
            except LaminaError as exc:  # e.g. no credit from a hung rank, or its channel failed
                exc.channel_index = rank
                raise
        return LayerBuffers(views, self.q_heads, self.kv_heads)

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
        that stream afterwards. Heads in GPU memory registered for the NIC
        (``register_source``, verbs) are not copied: the NIC reads them after
        the stream passed the send, so before overwriting them call
        ``handle.wait(stream=s)`` (queued on ``s``, no host wait).
        """
        self._check_microbatch(microbatch)
        if stream is not None or _on_cuda(q):
            if k is None or v is None:
                raise InvalidArgumentError("a stream-ordered send(q, k, v) needs all three")
            if stream is None:
                import torch
                stream = torch.cuda.current_stream(q.device)
            for rank, (channel, (qs, qe), (ks, ke)) in enumerate(zip(self.channels, self.q_heads, self.kv_heads)):
                try:
                    channel.send([q[:, qs:qe], k[:, ks:ke], v[:, ks:ke]], layer=layer, microbatch=microbatch,
                                 timeout=timeout, stream=stream)
                except LaminaError as exc:
                    exc.channel_index, exc.channels_posted = rank, rank
                    raise
                self._in_flight[rank][microbatch] += 1
            return SendHandle(self.channels, [], microbatch)
        if type(q) is LayerBuffers:
            messages = q.views  # slot views go by the tables send_buffers() filled, without a description
        else:
            if k is None or v is None:
                raise InvalidArgumentError("send(q, k, v) needs all three, or one LayerBuffers")
            messages = [[q[:, qs:qe], k[:, ks:ke], v[:, ks:ke]]
                        for (qs, qe), (ks, ke) in zip(self.q_heads, self.kv_heads)]
        try:
            self._group.send(messages, layer=layer, microbatch=microbatch, timeout=timeout)
        except LaminaError as exc:
            for counts in self._in_flight[:getattr(exc, "channels_posted", 0)]:
                counts[microbatch] += 1
            raise
        for counts in self._in_flight:
            counts[microbatch] += 1
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
        for rank, channel in enumerate(self.channels):
            try:
                views = channel.send_buffers(control, [(1,), (2, ids.size)], "int64", timeout=timeout)
                views[0][0] = microbatch
                views[1][0], views[1][1] = ids, where
                # The list as handed out: sent by the table send_buffers filled, not described again.
                channel.send(views, layer=METADATA_LAYER, microbatch=control, timeout=timeout)
            except LaminaError as exc:
                exc.channel_index = rank
                raise

    def register_source(self, memory: Any) -> MemoryRegion:
        """Register memory the caller computes q/k/v into (a torch, numpy or CUDA buffer).

        Every rank's share of q, k, v that lies in it is then written from
        there with no copy (packed shares in one write, strided column blocks
        of a fused tensor as a gather list of rows): keep it unchanged until
        the ``SendHandle`` is done. GPU memory counts where the NIC reaches
        it (``region.path`` ``dmabuf`` or ``peermem``, on verbs; else its
        sends are staged): order its reuse with ``handle.wait(stream=s)``.
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
        self._check_microbatch(microbatch)
        if _on_cuda(out) or (not type(out).__module__.startswith("torch") and hasattr(out, "__cuda_array_interface__")):
            return self._recv_into_device(out, layer, microbatch, timeout, stream)
        if self._device_replies:
            raise InvalidArgumentError("the replies land in device memory (payloads=): recv_into a CUDA tensor")
        destinations = self._destinations(out)
        messages = self._take_replies(microbatch, timeout)
        try:
            for rank, (message, destination) in enumerate(zip(messages, destinations)):
                part = self._checked_reply(rank, message, layer, destination.shape)
                np.copyto(destination, part.view(destination.dtype), casting="no")
        finally:
            for message in messages:
                message.release()
        return out

    def _take_replies(self, microbatch: int, timeout: Optional[float]) -> list[Message]:
        """One reply of ``microbatch`` from every rank (counted out of the in-flight ones)."""
        try:
            messages = self._group.recv(microbatch, timeout)
        except LaminaError as exc:
            for rank in range(getattr(exc, "channels_taken", 0)):
                self._in_flight[rank][microbatch] -= 1
            raise
        for counts in self._in_flight:
            counts[microbatch] -= 1
        self._times_pending = None
        try:
            # Plain tuples here (a few hundred ns a layer less); ``replies`` names their fields.
            self._replies = [(message.arrived_ns, _compute_ns(message)) for message in messages]
        except BaseException:
            for message in messages:
                message.release()
            raise
        return messages

    @property
    def replies(self) -> list[RankReply]:
        """Every rank's reply to the last ``recv_into``: when it landed, the compute time it reported.
        (Replies that landed in device memory: waits for the copies of their compute times.)"""
        pending, self._times_pending = self._times_pending, None
        if pending is not None:
            row, ranks = pending
            for rank in ranks:
                self._replies[rank] = (self._replies[rank][0], self._times.read(row, rank))
        return [RankReply(*reply) for reply in self._replies]

    def _checked_reply(self, rank: int, message: Message, layer: int, shape: tuple[int, ...]) -> Any:
        """Rank ``rank``'s output tensor of ``message``, checked against the layer and shape asked for."""
        if message.layer == ERROR_LAYER:
            error: LaminaError = AttentionRankError(rank, decode_error(message))
        elif message.layer != layer:
            error = ProtocolError(f"attention rank {rank} answered layer {message.layer}, expected {layer}")
        else:
            tensors = message.tensors
            if tensors and len(tensors) == 1 + _has_compute_time(message) and \
                    tensors[0].shape == tuple(shape) and tensors[0].dtype_name == self.shape.dtype:
                return tensors[0]
            error = ProtocolError(f"attention rank {rank} answered {len(tensors)} tensor(s) "
                                  f"{[f'{t.dtype_name}{list(t.shape)}' for t in tensors]}; expected one "
                                  f"{self.shape.dtype}{list(shape)} (and its compute time)")
        error.channel_index = rank
        raise error

    def _recv_into_device(self, out: Any, layer: int, microbatch: int, timeout: Optional[float],
                          stream: Any) -> Any:
        from lamina_comm.channel.device import DeviceSlotView, DeviceTensor, describe_device_tensor
        target = describe_device_tensor(out)
        shape = self.shape
        tokens = target.shape[0] if target.shape else 0
        itemsize = np.dtype(dtypes.numpy_storage(shape.dtype)).itemsize
        if target.dtype_name != shape.dtype or target.rows or \
                target.nbytes != tokens * shape.num_heads * shape.head_dim * itemsize:
            raise InvalidArgumentError(f"recv_into needs a contiguous {shape.dtype} tensor of [T, {shape.num_heads}, "
                                       f"{shape.head_dim}] or [T, {shape.num_heads * shape.head_dim}] elements, "
                                       f"got {target.dtype_name}{list(target.shape)}")
        if stream is None and type(out).__module__.startswith("torch"):
            import torch
            stream = torch.cuda.current_stream(out.device)
        # Each rank's heads of out: T rows of its (qe - qs) heads, H heads apart (one 2D copy each).
        head_bytes, row_pitch = shape.head_dim * itemsize, shape.num_heads * shape.head_dim * itemsize
        messages = self._take_replies(microbatch, timeout)
        times: list[int] = []
        row = -1
        try:
            for rank, (message, channel, (qs, qe)) in enumerate(zip(messages, self.channels, self.q_heads)):
                heads = DeviceTensor(out, target.ptr + qs * head_bytes, tokens * (qe - qs) * head_bytes,
                                     shape.dtype, (tokens, qe - qs, shape.head_dim), target.device, target.stream,
                                     tokens if qe - qs < shape.num_heads else 0, row_pitch)
                part = self._checked_reply(rank, message, layer, heads.shape)
                outs: list[Any] = [heads]
                if len(message.tensors) == 2:
                    if isinstance(part, DeviceSlotView):  # the compute time is in device memory too
                        if self._times is None:
                            self._times = _ReplyTimes(channel._device_staging()._device(part.region.device),
                                                      len(self.channels))
                        if row < 0:
                            row = self._times.row()
                        outs.append(self._times.landing(row, rank))
                        times.append(rank)
                    else:  # in self._replies already: copied to a scratch, at once
                        outs.append(np.empty(1, np.int64))
                channel._device_staging().recv_into(message, outs, stream)
            if times:
                self._times_pending = (row, times)
        finally:
            if row >= 0:  # copies into the row may be queued (also when a later rank failed): tracked
                from lamina_comm.gpu.stream import stream_handle
                handle = stream_handle(stream)
                self._times.queued(row, handle if handle is not None else target.stream)
            for message in messages:
                message.release()  # (a no-op for those the stream took over)
        return out

    def _destinations(self, out: Any) -> list[np.ndarray]:
        """Each rank's heads of ``out`` as numpy views (torch ops cost microseconds each; kept per tensor)."""
        key = (out.data_ptr(), tuple(out.shape), out.dtype, tuple(out.stride()))
        known = self._destinations_of.get(key)
        if known is not None:
            return known
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
        if len(self._destinations_of) >= _KEPT_DESTINATIONS:
            self._destinations_of.clear()
        self._destinations_of[key] = destinations
        return destinations

    def _check_microbatch(self, microbatch: int) -> None:
        if not 0 <= microbatch < self.shape.microbatches:
            raise InvalidArgumentError(f"micro-batch {microbatch} is not in [0, {self.shape.microbatches})")

    # -- life cycle ----------------------------------------------------------------------
    def in_flight(self, rank: int) -> int:
        """Replies rank ``rank`` still owes (sent layers whose output was not taken)."""
        return sum(self._in_flight[rank])

    def drain(self, rank: Optional[int] = None, timeout: Optional[float] = None) -> None:
        """Take and drop the replies still in flight (of every rank, or of ``rank``): after a failed step.

        An error (a rank that is gone) names its rank (``channel_index``);
        the others' counts stay exact, so it may be called again without it.
        """
        for index in range(len(self.channels)) if rank is None else [rank]:
            counts = self._in_flight[index]
            for microbatch in range(len(counts)):
                while counts[microbatch] > 0:
                    try:
                        message = self.channels[index].recv(microbatch=microbatch, timeout=timeout)
                    except LaminaError as exc:
                        exc.channel_index = index
                        raise
                    counts[microbatch] -= 1
                    message.release()

    def flush(self, timeout: Optional[float] = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for rank, channel in enumerate(self.channels):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                channel.flush(left)
            except LaminaError as exc:
                exc.channel_index = rank
                raise

    def close(self) -> None:
        times, self._times, self._times_pending = self._times, None, None
        try:
            if times is not None:
                times.close()  # first: its copies are queued behind the channels' streams
        finally:
            if self._owns:
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


def _has_compute_time(message: Message) -> bool:
    """Whether a reply carries the rank's compute time as its second tensor (int64 [1])."""
    tensors = message.tensors
    return len(tensors) == 2 and tensors[1].dtype_name == "int64" and tensors[1].shape == (1,)


def _compute_ns(message: Message) -> Optional[int]:
    """The compute time a reply carries, or None (also while it is in device memory: see _ReplyTimes)."""
    if not _has_compute_time(message) or not isinstance(message.tensors[1], np.ndarray):
        return None
    return max(0, int(message.tensors[1][0]))  # a time: a negative one from a buggy rank is not one


def _on_cuda(tensor: Any) -> bool:
    device = getattr(tensor, "device", None)
    return getattr(device, "type", None) == "cuda"


__all__ = ["LayerBuffers", "RankReply", "RemoteAttention", "SendHandle"]
