"""``AttentionService``: an attention rank's side: one channel per model rank, requests in arrival order,
the output written straight into the reply slot."""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from lamina_comm.channel import Channel, ChannelGroup, Message, to_torch
from lamina_comm.channel.device import DeviceSlotView, describe_device_tensor, is_device_tensor
from lamina_comm.errors import ClosedError, InvalidArgumentError, LaminaError, ProtocolError, TimeoutError_
from lamina_comm.model.kvcache import HeadRange
from lamina_comm.transport import Context

from .shape import AttentionShape
from .wire import ERROR_LAYER, METADATA_LAYER, compute_time, encode_error

# An application's handler of a control message (AttentionService(on_control=)): the peer and the message,
# which it owns (it releases it).
ControlHandler = Callable[[int, Message], None]


class LayerRequest:
    """One layer's q [T, h, D], k and v [T, kv, D] of this rank's heads, from model rank ``peer``.

    The tensors are views over the receive slot. ``output()`` is the reply
    slot's view [T, h, D]: compute into it, then ``respond()`` sends it (no
    copy) and gives the request's slot back. ``respond(tensor)`` with any
    other tensor copies it into the reply first. A service made with
    ``report_compute_time=True`` also sends the time this rank spent on the
    request (``respond(compute_ns=)``, by default the time since ``recv``
    handed it out; ``RemoteAttention.replies`` on the model rank).
    ``fail(reason)`` answers with an error instead, which the model rank
    raises as ``AttentionRankError``.

    A GPU attention tier moves them stream-ordered instead: ``to_device(q, k,
    v, stream=)`` copies the request into its CUDA tensors on the stream (the
    slot goes back once the copies are done) and ``respond(out, stream=)``
    with a CUDA ``out`` sends it after the work queued before on that stream;
    neither waits for the device (docs/channel.md, send path 5).
    """

    def __init__(self, service: "AttentionService", peer: int, message: Message,
                 metadata: Optional[tuple[np.ndarray, np.ndarray]] = None):
        self._service, self._message = service, message
        self._reporting = service.report_compute_time  # fixed per request: the reply's layout follows it
        self._received_ns = time.perf_counter_ns() if self._reporting else 0
        # The step metadata its model rank sent for this micro-batch (RemoteAttention.send_metadata), if any.
        self.request_ids, self.positions = metadata if metadata is not None else (None, None)
        self.peer = peer
        self.layer = message.layer
        self.microbatch = message.microbatch
        if len(message.tensors) != 3:
            message.release()
            raise InvalidArgumentError(f"a layer request holds q, k, v; model rank {peer} sent "
                                       f"{len(message.tensors)} tensors")
        self._views = message.tensors
        self._torch: Optional[list[Any]] = None  # made on first use: a request answered blind needs none
        self._output: Optional[Any] = None

    def _tensors(self) -> list[Any]:
        if self._torch is None:
            self._torch = [to_torch(view) for view in self._views]
        return self._torch

    @property
    def q(self) -> Any:
        return self._tensors()[0]

    @property
    def k(self) -> Any:
        return self._tensors()[1]

    @property
    def v(self) -> Any:
        return self._tensors()[2]

    @property
    def channel(self) -> Channel:
        return self._service.channel_of(self.peer)

    def output(self, timeout: Optional[float] = None) -> Any:
        """The reply slot as [T, h, D] (waits for its credit).

        The slot is the next one of this micro-batch's replies: one request of
        a model rank and micro-batch at a time may hold it, so answer a request
        before taking the output of the next of the same micro-batch.
        """
        if self._output is None:
            if self._message is None:
                raise ClosedError("this request was answered already")
            self._check_reply_slot()
            shape = tuple(self._views[0].shape)
            dtype = self._service.shape.dtype
            # Kept as send_buffers() handed it out, so respond() sends it by its filled table (the
            # second tensor, when there is one, takes the compute time).
            if self._reporting:
                self._output = self.channel.send_buffers(self.microbatch, [shape, (1,)], (dtype, "int64"),
                                                         as_torch=True, timeout=timeout)
            else:
                self._output = self.channel.send_buffers(self.microbatch, [shape], dtype, as_torch=True,
                                                         timeout=timeout)
            self._service._holding[(self.peer, self.microbatch)] = self
        return self._output[0]

    def _check_reply_slot(self) -> None:
        """Refuse to use the micro-batch's next reply slot while another request holds its views."""
        holder = self._service._holding.get((self.peer, self.microbatch))
        if holder is not None and holder is not self:
            raise InvalidArgumentError(f"the reply slot of model rank {self.peer}, micro-batch {self.microbatch} "
                                       f"is held by the request of layer {holder.layer}: answer it first")

    def to_device(self, q: Any, k: Any, v: Any, *, stream: Any = None) -> None:
        """Copy q, k, v into these CUDA tensors on ``stream`` (default: torch's current stream); the
        request's slot goes back once the copies are done. Then compute, and ``respond(out, stream=)``."""
        if self._message is None:
            raise ClosedError("this request was answered already")
        if self._message.released:  # its stream holds the slot
            raise InvalidArgumentError("to_device() was called for this request already")
        self.channel._device_staging().recv_into(self._message, [q, k, v], stream)

    def respond(self, out: Any = None, timeout: Optional[float] = None, *, stream: Any = None,
                compute_ns: Optional[int] = None) -> None:
        """Send the output (``output()``'s view, or ``out`` copied into it) and release the request.

        ``compute_ns`` is reported to the model rank (``RemoteAttention.replies``) by a service made
        with ``report_compute_time=True``; by default the time since this request was received. A
        CUDA ``out`` (or ``stream=``) goes stream-ordered: copied into the reply slot by the copy
        engine after the work queued before on ``stream``, posted when the copy is done."""
        if self._message is None:
            raise ClosedError("this request was answered already")
        reporting = self._reporting
        if compute_ns is not None and not reporting:
            raise InvalidArgumentError("respond(compute_ns=) needs AttentionService(report_compute_time=True)")
        if reporting and compute_ns is None:
            compute_ns = time.perf_counter_ns() - self._received_ns
        if stream is not None or (out is not None and is_device_tensor(out)):
            if out is None:
                raise InvalidArgumentError("a stream-ordered respond(out, stream=) needs the output tensor")
            self._check_reply_slot()
            channel = self.channel
            # q/k/v in device memory (payloads=) are read by the work queued on the stream: the slot goes
            # back behind it; ring views were copied out already (or read on the host).
            on_device = not self._message.released and any(isinstance(t, DeviceSlotView) for t in self._views)
            if not on_device:
                self.release()  # first: its credit rides in the reply's header
            try:
                tensors = [out, compute_time(compute_ns)] if reporting else [out]
                channel.send(tensors, layer=self.layer, microbatch=self.microbatch, timeout=timeout, stream=stream)
            except BaseException:
                if on_device:
                    try:
                        self.release(stream=_stream_of(out, stream))
                    except LaminaError:  # (the channel failed: the send's error is the one to see)
                        pass
                raise
            if on_device:
                self.release(stream=_stream_of(out, stream))
            return
        try:
            view = self.output(timeout)
            if out is not None and out is not view:
                view.copy_(out.reshape(view.shape))
            if reporting:
                _numpy_of(self._output[1])[0] = compute_ns
        finally:  # the request's slot goes back whatever happened (a failed respond must not leak it)
            self.release()
        self.channel.send(self._output, layer=self.layer, microbatch=self.microbatch, timeout=timeout)

    def fail(self, reason: str, timeout: Optional[float] = None, *, stream: Any = None) -> None:
        """Answer with an error instead of the output (the model rank raises ``AttentionRankError``).
        ``stream``: work queued on it still reads the request's device views (payloads=): its slot goes
        back once that work is done."""
        if self._message is None:
            raise ClosedError("this request was answered already")
        self._check_reply_slot()
        self.release(stream)
        self.channel.send([encode_error(reason)], layer=ERROR_LAYER, microbatch=self.microbatch, timeout=timeout)

    def release(self, stream: Any = None) -> None:
        """Give the request's slot back (``respond`` does it; after ``to_device`` the stream does).
        ``stream``: once the work queued on it so far is done (kernels reading device views of q/k/v)."""
        message, self._message = self._message, None
        if message is not None:
            message.release(stream)  # (a no-op once to_device handed it to the stream)
        if self._output is not None and self._service._holding.get((self.peer, self.microbatch)) is self:
            del self._service._holding[(self.peer, self.microbatch)]


def _stream_of(out: Any, stream: Any) -> Any:
    """The stream a stream-ordered reply goes on: ``stream``, else the output's own (torch: current)."""
    if stream is not None:
        return stream
    if type(out).__module__.startswith("torch"):
        import torch
        return torch.cuda.current_stream(out.device)
    return describe_device_tensor(out).stream or 0


def _numpy_of(tensor: Any) -> np.ndarray:
    """A numpy view of a kept reply-slot tensor, kept on it (it lives as long as the channel's slot views):
    a write through torch costs microseconds, through numpy a tenth of one."""
    view = getattr(tensor, "_lamina_numpy", None)
    if view is None:
        view = tensor._lamina_numpy = tensor.numpy()
    return view


class AttentionService:
    """Attention rank ``rank`` of ``ranks``: listens, accepts one channel per model rank, serves them.

    ``address`` is where the model ranks connect (pass it to the rendezvous
    as this rank's address). ``accept(model_ranks)`` waits for them;
    ``recv()`` then returns the oldest request over all of them.

    A server with a handshake of its own passes ``listen=None`` and hands
    over channels it connected with ``attach`` (and takes them back with
    ``detach``): model ranks may come and go. Messages on a channel's control
    micro-batch that are not step metadata go to ``on_control(peer,
    message)``, in arrival order with the layers (the handler releases the
    message); without a handler they are refused.
    """

    def __init__(self, context: Optional[Context], shape: AttentionShape, rank: int, ranks: int,
                 listen: Optional[str | tuple[str, int]] = "127.0.0.1:0", *, timeout: float = 30.0,
                 on_control: Optional[ControlHandler] = None, kv_heads: Optional[HeadRange] = None,
                 report_compute_time: bool = False):
        self.shape, self.rank, self.ranks = shape, rank, ranks
        # Replies carry the rank's compute time (int64 [1] after the output): for metrics, a few us each.
        self.report_compute_time = report_compute_time
        # (peer, micro-batch) -> the request whose output() holds that reply slot, until it is answered.
        self._holding: dict[tuple[int, int], LayerRequest] = {}
        # kv_heads: a share other than the shape's even split (a server that agreed on it itself).
        self.kv_heads = tuple(kv_heads) if kv_heads is not None else shape.kv_heads(rank, ranks)
        self.spec = shape.share_spec(self.kv_heads)
        self.q_heads = (self.kv_heads[0] * shape.group_size, self.kv_heads[1] * shape.group_size)
        self.timeout = timeout
        self.on_control = on_control
        self._listener = context.listen(listen) if listen is not None and context is not None else None
        self.address: Optional[str] = None
        if self._listener is not None:
            host, port = self._listener.address
            self.address = f"{host}:{port}"
        self._peers: dict[int, Channel] = {}  # peer id -> channel (ids are never reused)
        self._control: dict[int, int] = {}  # peer id -> its channel's control micro-batch (the last)
        self._next_peer = 0
        self._order: list[int] = []  # the peer ids behind the group's channel indices
        self._group: Optional[ChannelGroup] = None
        # (peer, micro-batch) -> the request ids and positions of its current step.
        self._metadata: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def payload_bytes(self) -> int:
        """Bytes of a region taking one model rank's requests (``accept(payloads=)``): its data
        micro-batches' slots of this rank's head share."""
        return self.shape.share_payload_bytes(self.kv_heads, "attention")

    @property
    def channels(self) -> list[Channel]:
        """The model ranks' channels, by peer id."""
        return [self._peers[peer] for peer in sorted(self._peers)]

    def channel_of(self, peer: int) -> Channel:
        try:
            return self._peers[peer]
        except KeyError:
            raise ClosedError(f"model rank {peer} is no longer served") from None

    def accept(self, model_ranks: int, timeout: Optional[float] = None, *,
               payloads: Optional[Sequence[Any]] = None) -> None:
        """Accept a channel from each of ``model_ranks`` model ranks (in the order they connect).

        ``payloads``: a registered region per model rank (GPU memory registered for the NIC, on verbs;
        ``payload_bytes`` each) that takes its requests' q/k/v: the
        request's tensors are then CUDA views there (no copy; the slot goes back with
        ``respond(out, stream=)`` once that stream's work is done). Step metadata stays in the host ring.
        """
        if self._listener is None:
            raise ClosedError("this service has no listener (listen=None): attach() channels instead")
        if payloads is not None and len(payloads) != model_ranks:
            raise InvalidArgumentError(f"{len(payloads)} payload regions for {model_ranks} model ranks")
        for index in range(model_ranks):
            landing = None if payloads is None else payloads[index]
            self.attach(Channel.accept(
                self._listener, self.spec, role="attention", name=f"model-{index}",
                accept_timeout=self.timeout if timeout is None else timeout, timeout=self.timeout,
                piggyback_credits=True, payloads=landing,
                payload_microbatches=None if landing is None else self.shape.microbatches))

    def attach(self, channel: Channel) -> int:
        """Serve one more model rank over ``channel``; its peer id (``LayerRequest.peer``).

        The channel must carry this rank's head share (``AttentionShape.channel_spec``'s layout: the
        control micro-batch last; other token and micro-batch counts are fine). ``close`` closes it.
        """
        from .remote import _refuse_device_control
        _refuse_device_control(channel)
        spec, ours = channel.spec, self.spec
        if (spec.heads, spec.kv_heads, spec.head_dim, spec.dtype) != (ours.heads, ours.kv_heads, ours.head_dim,
                                                                      ours.dtype) or spec.microbatches < 2:
            raise InvalidArgumentError(
                f"channel {channel.name} carries {spec.heads} query / {spec.kv_heads} KV heads of {spec.head_dim} "
                f"{spec.dtype} in {spec.microbatches} micro-batches; attention rank {self.rank} serves "
                f"{ours.heads} / {ours.kv_heads} of {ours.head_dim} {ours.dtype}, with a control micro-batch")
        peer = self._next_peer
        self._next_peer += 1
        self._peers[peer] = channel
        self._control[peer] = spec.microbatches - 1
        self._regroup()
        return peer

    def detach(self, peer: int) -> Channel:
        """Stop serving model rank ``peer``; its channel is the caller's again (not closed)."""
        channel = self._peers.pop(peer)
        del self._control[peer]
        for key in [key for key in self._holding if key[0] == peer]:
            del self._holding[key]
        for key in [key for key in self._metadata if key[0] == peer]:
            del self._metadata[key]
        self._regroup()
        return channel

    def _regroup(self) -> None:
        self._order = sorted(self._peers)
        self._group = ChannelGroup([self._peers[peer] for peer in self._order]) if self._order else None

    def recv(self, timeout: Optional[float] = None) -> LayerRequest:
        """The oldest layer request of any model rank (TimeoutError when none comes within ``timeout``).

        An error names the model rank it came from (``peer``, None when
        none): its channel failed, or it sent malformed metadata or a
        control message with no handler to take it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._group is None:
                raise ClosedError("no model rank to serve: accept() or attach() them first")
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                index, message = self._group.recv_any(timeout=left)
            except LaminaError as exc:
                index = None if isinstance(exc, TimeoutError_) else getattr(exc, "channel_index", None)
                exc.peer = None if index is None else self._order[index]  # a quiet spell is nobody's fault
                raise
            peer = self._order[index]
            try:
                if message.microbatch != self._control[peer]:
                    return LayerRequest(self, peer, message, self._metadata.get((peer, message.microbatch)))
                if message.layer == METADATA_LAYER:
                    self._keep_metadata(peer, message)
                elif self.on_control is not None:
                    self.on_control(peer, message)
                else:
                    message.release()
                    raise InvalidArgumentError(f"model rank {peer} sent a control message (layer "
                                               f"{message.layer}) and this service takes none")
            except LaminaError as exc:
                exc.peer = peer
                raise
            except (ValueError, TypeError, IndexError, OverflowError) as exc:  # past the checks: still its fault
                error = ProtocolError(f"model rank {peer} sent a message that cannot be read: {exc!r}")
                error.peer = peer
                raise error from exc
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError_(f"no layer request within {timeout} s (only control messages came)")

    def _keep_metadata(self, peer: int, message: Message) -> None:
        with message:
            tensors = message.tensors
            if len(tensors) != 2 or tensors[0].shape != (1,) or tensors[1].ndim != 2 or tensors[1].shape[0] != 2 or \
                    tensors[0].dtype_name != "int64" or tensors[1].dtype_name != "int64":
                raise InvalidArgumentError(f"model rank {peer} sent malformed step metadata: "
                                           f"{[f'{t.dtype_name}{list(t.shape)}' for t in tensors]}, expected "
                                           f"int64[1] (its micro-batch) and int64[2, T]")
            target = int(message.tensors[0][0])
            if not 0 <= target < self._control[peer]:
                raise InvalidArgumentError(f"model rank {peer} sent metadata for micro-batch {target}")
            table = np.array(message.tensors[1], dtype=np.int64)  # copied: the slot goes back
        self._metadata[(peer, target)] = (table[0], table[1])

    def close(self) -> None:
        for channel in self._peers.values():
            channel.close()
        self._peers, self._control, self._order, self._group = {}, {}, [], None
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> "AttentionService":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["AttentionService", "LayerRequest"]
