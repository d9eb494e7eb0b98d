"""``AttentionService``: an attention rank's side: one channel per model rank, requests in arrival order,
the output written straight into the reply slot."""
from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from lamina_comm.channel import Channel, ChannelGroup, Message, to_torch
from lamina_comm.channel.device import is_device_tensor
from lamina_comm.errors import ClosedError, InvalidArgumentError
from lamina_comm.transport import Context

from .shape import AttentionShape


class LayerRequest:
    """One layer's q [T, h, D], k and v [T, kv, D] of this rank's heads, from model rank ``peer``.

    The tensors are views over the receive slot. ``output()`` is the reply
    slot's view [T, h, D]: compute into it, then ``respond()`` sends it (no
    copy) and gives the request's slot back. ``respond(tensor)`` with any
    other tensor copies it into the reply first.

    A GPU attention tier moves them stream-ordered instead: ``to_device(q, k,
    v, stream=)`` copies the request into its CUDA tensors on the stream (the
    slot goes back once the copies are done) and ``respond(out, stream=)``
    with a CUDA ``out`` sends it after the work queued before on that stream;
    neither waits for the device (docs/channel.md, send path 5).
    """

    def __init__(self, service: "AttentionService", peer: int, message: Message,
                 metadata: Optional[tuple[np.ndarray, np.ndarray]] = None):
        self._service, self._message = service, message
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
        return self._service.channels[self.peer]

    def output(self, timeout: Optional[float] = None) -> Any:
        """The reply slot as [T, h, D] (waits for its credit)."""
        if self._output is None:
            shape = tuple(self._views[0].shape)
            # Kept as send_buffers() handed it out, so respond() sends it by its filled table.
            self._output = self.channel.send_buffers(self.microbatch, [shape], self._service.shape.dtype,
                                                     as_torch=True, timeout=timeout)
        return self._output[0]

    def to_device(self, q: Any, k: Any, v: Any, *, stream: Any = None) -> None:
        """Copy q, k, v into these CUDA tensors on ``stream`` (default: torch's current stream); the
        request's slot goes back once the copies are done. Then compute, and ``respond(out, stream=)``."""
        if self._message is None:
            raise ClosedError("this request was answered already")
        if self._message.released:  # its stream holds the slot
            raise InvalidArgumentError("to_device() was called for this request already")
        self.channel._device_staging().recv_into(self._message, [q, k, v], stream)

    def respond(self, out: Any = None, timeout: Optional[float] = None, *, stream: Any = None) -> None:
        """Send the output (``output()``'s view, or ``out`` copied into it) and release the request.

        A CUDA ``out`` (or ``stream=``) goes stream-ordered: copied into the reply slot by the copy
        engine after the work queued before on ``stream``, posted when the copy is done."""
        if self._message is None:
            raise ClosedError("this request was answered already")
        if stream is not None or (out is not None and is_device_tensor(out)):
            self.release()
            self.channel.send([out], layer=self.layer, microbatch=self.microbatch, timeout=timeout, stream=stream)
            return
        view = self.output(timeout)
        if out is not None and out is not view:
            view.copy_(out.reshape(view.shape))
        self.release()
        self.channel.send(self._output, layer=self.layer, microbatch=self.microbatch, timeout=timeout)

    def release(self) -> None:
        """Give the request's slot back (``respond`` does it; after ``to_device`` the stream does)."""
        message, self._message = self._message, None
        if message is not None:
            message.release()  # (a no-op once to_device handed it to the stream)


class AttentionService:
    """Attention rank ``rank`` of ``ranks``: listens, accepts one channel per model rank, serves them.

    ``address`` is where the model ranks connect (pass it to the rendezvous
    as this rank's address). ``accept(model_ranks)`` waits for them;
    ``recv()`` then returns the oldest request over all of them.
    """

    def __init__(self, context: Context, shape: AttentionShape, rank: int, ranks: int,
                 listen: str | tuple[str, int] = "127.0.0.1:0", *, timeout: float = 30.0):
        self.shape, self.rank, self.ranks = shape, rank, ranks
        self.spec = shape.channel_spec(rank, ranks)
        self.kv_heads = shape.kv_heads(rank, ranks)
        self.q_heads = shape.q_heads(rank, ranks)
        self.timeout = timeout
        self._listener = context.listen(listen)
        host, port = self._listener.address
        self.address = f"{host}:{port}"
        self.channels: list[Channel] = []
        self._group: Optional[ChannelGroup] = None
        # (model rank, micro-batch) -> the request ids and positions of its current step.
        self._metadata: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def accept(self, model_ranks: int, timeout: Optional[float] = None) -> None:
        """Accept a channel from each of ``model_ranks`` model ranks (in the order they connect)."""
        for index in range(model_ranks):
            self.channels.append(Channel.accept(
                self._listener, self.spec, role="attention", name=f"model-{index}",
                accept_timeout=self.timeout if timeout is None else timeout, timeout=self.timeout,
                piggyback_credits=True))
        self._group = ChannelGroup(self.channels)

    def recv(self, timeout: Optional[float] = None) -> LayerRequest:
        """The oldest layer request of any model rank (TimeoutError when none comes within ``timeout``)."""
        if self._group is None:
            raise ClosedError("accept() the model ranks first")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            index, message = self._group.recv_any(timeout=left)
            if message.microbatch != self.shape.metadata_microbatch:
                return LayerRequest(self, index, message, self._metadata.get((index, message.microbatch)))
            self._keep_metadata(index, message)

    def _keep_metadata(self, peer: int, message: Message) -> None:
        with message:
            tensors = message.tensors
            if len(tensors) != 2 or tensors[0].size != 1 or tensors[1].ndim != 2 or tensors[1].shape[0] != 2 or \
                    tensors[0].dtype_name != "int64" or tensors[1].dtype_name != "int64":
                raise InvalidArgumentError(f"model rank {peer} sent malformed step metadata")
            target = int(message.tensors[0][0])
            if not 0 <= target < self.shape.microbatches:
                raise InvalidArgumentError(f"model rank {peer} sent metadata for micro-batch {target}")
            table = np.array(message.tensors[1], dtype=np.int64)  # copied: the slot goes back
        self._metadata[(peer, target)] = (table[0], table[1])

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.channels, self._group = [], None
        self._listener.close()

    def __enter__(self) -> "AttentionService":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["AttentionService", "LayerRequest"]
