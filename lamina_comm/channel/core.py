"""The channel itself: Channel, its received Message, ChannelListener, and the registered rings."""
from __future__ import annotations

import dataclasses
import math
import time
import weakref
from typing import Any, Callable, Sequence

import numpy as np

from .. import dtypes
from .._bindings import check, error_of, ffi, lib
from ..errors import ClosedError, InvalidArgumentError, LaminaError, ProtocolError, TimeoutError_, UnsupportedError
from ..transport import Access, Context, Endpoint, Listener, MemoryRegion, Op, RemoteRegion
from .handshake import _check_peer, _hello, _parse_hello, _peer_caps, _peer_payloads
from .spec import MAX_NDIM, MAX_TENSORS, ChannelSpec, RingLayout, _other_role, packed_offsets
from .views import TensorView, _as_tensor_view, _copy_into, _describe, _describe_numpy, _TensorInfo, to_torch

DEFAULT_TIMEOUT_S = 30.0
# Looked up per tensor on every send: a plain dict, built once from lamina_comm.dtypes.
_WIRE_CODE = {name: dtypes.wire_code(name) for name in dtypes.NAMES}
# Views kept per channel (send_buffers layouts, received tensor layouts); a
# peer that keeps changing shapes only empties the cache, never grows it.
_VIEW_CACHE_MAX = 256


@dataclasses.dataclass(frozen=True)
class ChannelMetrics:
    """Counters of one channel (a snapshot; see Channel.metrics)."""

    messages: int = 0
    bytes_sent: int = 0
    staged_bytes: int = 0
    slot_messages: int = 0
    region_messages: int = 0
    staged_messages: int = 0
    gather_messages: int = 0
    credit_waits: int = 0
    credit_wait_seconds: float = 0.0
    messages_received: int = 0
    bytes_received: int = 0
    credits_returned: int = 0
    credits_piggybacked: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TENSOR_ENTRY_BYTES = ffi.sizeof("lm_chan_tensor_t")


class _KeptLayout:
    """send_buffers() views at one slot offset, kept with their tensor table filled once."""

    __slots__ = ("views", "shapes", "vec", "count")

    def __init__(self, views: list[Any], infos: list[_TensorInfo]):
        self.views = tuple(views)
        self.shapes = tuple(info.shape for info in infos)
        self.count = len(infos)
        self.vec = ffi.new("lm_chan_tensor_t[]", max(1, self.count))
        _fill_tensors(self.vec, 0, infos)

    def matches(self, tensors: list[Any]) -> bool:
        """The same views, none reshaped in place since (numpy allows it)."""
        views = self.views
        if len(tensors) != len(views):
            return False
        for given, view, shape in zip(tensors, views, self.shapes):
            if given is not view or tuple(given.shape) != shape:
                return False
        return True


class _SlotTensors(list):
    """What send_buffers() returns: a list of views that send() knows without describing them."""

    __slots__ = ("_kept",)


def _kept_layout(tensors: Any) -> "_KeptLayout | None":
    """The filled tensor table of send_buffers() views handed over as they were, else None."""
    kept = tensors._kept if type(tensors) is _SlotTensors else None
    return kept if kept is not None and kept.matches(tensors) else None


class Message:
    """A received message: tensors are views over the slot, valid until release().

    Use as a context manager or call release(); until then the sender cannot
    reuse the slot (it blocks for the credit, then times out).
    """

    def __init__(self, channel: "Channel", layer: int, microbatch: int, seq: int, slot: int,
                 tensors: list[TensorView], arrived_ns: int = 0):
        self.layer = layer
        # When it was dispatched (CLOCK_MONOTONIC, as time.perf_counter_ns): arrival, not collection.
        self.arrived_ns = arrived_ns
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

    def release(self, stream: Any = None) -> None:
        """Return the slot to the sender; the views may be overwritten afterwards.

        stream: a CUDA stream whose queued work reads the views (DeviceSlotViews of a device payload
        region are read by kernels, after this call returns): the slot goes back once that work is done,
        from native code, without the caller waiting."""
        channel, self._channel = self._channel, None
        if channel is None:
            return
        if stream is None:
            channel._return_credit(self.microbatch, self.slot, self.seq)
            return
        try:
            channel._device_staging().release_after(self, stream)
        except BaseException:
            channel._return_credit(self.microbatch, self.slot, self.seq)  # nothing was queued: back at once
            raise

    def __enter__(self) -> "Message":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        shapes = ", ".join(f"{t.dtype_name}{list(t.shape)}" for t in self.tensors)
        return f"<Message layer={self.layer} mb={self.microbatch} seq={self.seq} [{shapes}]>"



def _is_cuda_region(region: Any) -> bool:
    from ..gpu.memory import CudaRegionBase
    return isinstance(region, CudaRegionBase)


def _check_payloads(ctx: Context, layout: RingLayout, payloads: Any,
                    payload_microbatches: int | None) -> tuple[RemoteRegion | None, int]:
    """The descriptor a hello gives for our payload region (None: payloads stay in the ring), and how many
    micro-batches (the first ones) it takes (0 without one)."""
    if payloads is None:
        if payload_microbatches is not None:
            raise InvalidArgumentError("payload_microbatches= needs a payload region (payloads=)")
        return None, 0
    count = layout.microbatches if payload_microbatches is None else payload_microbatches
    if type(count) is not int or not 1 <= count <= layout.microbatches:
        raise InvalidArgumentError(f"payload_microbatches={payload_microbatches!r}: the channel has "
                                   f"{layout.microbatches} micro-batches")
    if getattr(payloads, "closed", False):
        raise InvalidArgumentError("the payload region is closed")
    if payloads.context is not ctx:
        raise InvalidArgumentError("the payload region was registered with another Context than the channel's")
    if _is_cuda_region(payloads) and payloads.path not in ("dmabuf", "peermem"):
        raise UnsupportedError(f"a CUDA region takes payloads only when the NIC writes it (dmabuf or peermem); "
                               f"this one is {payloads.path}: {payloads.path_reason}")
    descriptor = payloads.descriptor()
    if not descriptor.access & Access.REMOTE_WRITE:
        raise InvalidArgumentError("the payload region must be registered with Access.REMOTE_WRITE")
    if payloads.nbytes < layout.payload_bytes_of(count):
        raise InvalidArgumentError(f"the payload region has {payloads.nbytes} B, the ring needs "
                                   f"{layout.payload_bytes_of(count)} (RingLayout.payload_bytes_of({count}))")
    return descriptor, count


class _Rings:
    """The one registered region of a channel side, and its layout."""

    def __init__(self, ctx: Context, spec: ChannelSpec, role: str):
        self.layout = RingLayout.for_role(spec, role)
        # Page-aligned shared memory: a peer on this host (shm) writes its messages straight into the slots.
        self.mr = ctx.alloc(self.layout.total_bytes)
        self.buffer = self.mr.view(nbytes=self.layout.total_bytes)

    def close(self) -> None:
        self.mr.close()


# --------------------------------------------------------------------------
# Channel


class Channel:
    """One model worker <-> one attention worker; see the lamina_comm.channel docstring.

    The slot rings, headers, sequence numbers, credits and the demultiplexing
    of arrivals run in native code (native/src/channel, lamina.h "channels"):
    a send is one native call, a receive is one native call, and every wait
    runs the progress engine in the waiting thread with the GIL released. This
    class turns tensors into descriptors and slots into numpy views.

    A channel is driven by one thread at a time (or by one asyncio loop).
    Several channels may share a Context. Its endpoint's completions belong to
    it: do not wait on the endpoint itself.

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
        self._peer = peer_region
        self._sources: list[MemoryRegion] = []
        # Split payloads (connect/accept payloads=): the region ours land in (None: after their headers,
        # in the ring), and its numpy view when it is host memory.
        self.payloads: Any = None
        self.payload_microbatches = 0  # the first this many micro-batches' payloads land in self.payloads
        self._payload_buf: Any = None
        self._python_staged = [0, 0]  # messages and bytes staged here (strided or device tensors)
        params = ffi.new("lm_chan_params_t *", {
            "microbatches": spec.microbatches, "slots": spec.slots_per_microbatch,
            "recv_capacity": self._layout.recv_capacity, "send_capacity": self._layout.send_capacity,
            "piggyback": int(piggyback_credits)})
        out = ffi.new("lm_chan_t **")
        check(lib.lm_chan_create(endpoint._handle(), self._mr._handle(), peer_region._native, params, out),
              f"channel {self.name}")
        self._ch = out[0]
        endpoint._before_close.append(self._destroy_native)
        # Arrivals the context routed to the endpoint before the channel took it
        # over are older than anything the native side holds: they go first.
        for c in endpoint._take(1 << 30):
            if c.op == Op.RECV_IMM and c.imm is not None:
                lib.lm_chan_inject_imm(self._ch, c.imm)
        lib.lm_chan_progress(self._ch)
        self._tensors = ffi.new("lm_chan_tensor_t[]", MAX_TENSORS)
        self._msg = ffi.new("lm_chan_msg_t *")
        self._seq = ffi.new("uint64_t *")
        self._offset = ffi.new("uint64_t *")
        self._stats = ffi.new("lm_chan_stats_t *")
        self._fd: int | None = None
        self._send_views: dict[tuple, _KeptLayout] = {}
        self._recv_views: dict[bytes, tuple[TensorView, ...]] = {}
        self._staging: Any = None  # DeviceStaging, at the first CUDA tensor (device.py)

    def _destroy_native(self) -> None:
        staging, self._staging = self._staging, None
        try:
            if staging is not None:
                staging.close()  # its streams' host functions run first: they touch the channel
        finally:
            self._close_native()
            if staging is not None:
                staging.close_words()  # the native channel wrote its last sent word (released at close)

    def _close_native(self) -> None:
        ch, self._ch = self._ch, None
        self._fd = None  # closed with the channel
        if ch is not None:
            # A thread inside a call (GIL released) is woken and gets ClosedError;
            # one that read the handle just before is refused: the memory is
            # freed only with this object, which such a thread still holds.
            lib.lm_chan_close(ch)
            weakref.finalize(self, lib.lm_chan_destroy, ch)

    def _handle(self):
        if self._ch is None:
            raise ClosedError(f"channel {self.name} is closed")
        return self._ch

    # -- setup -------------------------------------------------------------
    @classmethod
    def connect(cls, ctx: Context, address: str | tuple[str, int], spec: ChannelSpec, *,
                role: str = "model", name: str | None = None, connect_timeout: float = 10.0,
                timeout: float = DEFAULT_TIMEOUT_S, piggyback_credits: bool = False,
                payloads: Any = None, payload_microbatches: int | None = None) -> "Channel":
        """Connect to a ChannelListener; raises SpecMismatchError if the specs differ.

        piggyback_credits: see Channel; a local choice, the peer need not agree.
        payloads: a registered region that takes the payloads of the messages this side receives, apart
        from their headers (see ``Channel.payloads``); the peer learns it in the handshake.
        payload_microbatches: only the first N micro-batches' payloads go there (default: all); the
        others stay in the ring, host-readable (an engine's control micro-batch).
        """
        rings = _Rings(ctx, spec, role)
        try:
            mine, split = _check_payloads(ctx, rings.layout, payloads, payload_microbatches)
            ep = ctx.connect(address, private_data=_hello(spec, role, rings.mr.descriptor(), mine, split),
                             timeout=connect_timeout)
            return cls._finish_setup(ctx, ep, spec, role, rings, name, timeout, piggyback_credits, payloads, split)
        except BaseException:
            rings.close()
            raise

    @classmethod
    def accept(cls, listener: Listener, spec: ChannelSpec, *, role: str = "attention",
               name: str | None = None, accept_timeout: float | None = None,
               timeout: float = DEFAULT_TIMEOUT_S, piggyback_credits: bool = False,
               payloads: Any = None, payload_microbatches: int | None = None) -> "Channel":
        """Accept one channel on a transport Listener (see also ChannelListener); payloads and
        payload_microbatches as for connect."""
        ctx = listener.context
        rings = _Rings(ctx, spec, role)
        try:
            mine, split = _check_payloads(ctx, rings.layout, payloads, payload_microbatches)
            ep = listener.accept(accept_timeout, private_data=_hello(spec, role, rings.mr.descriptor(), mine, split))
            return cls._finish_setup(ctx, ep, spec, role, rings, name, timeout, piggyback_credits, payloads, split)
        except BaseException:
            rings.close()
            raise

    @classmethod
    def _finish_setup(cls, ctx: Context, ep: Endpoint, spec: ChannelSpec, role: str, rings: _Rings,
                      name: str | None, timeout: float, piggyback_credits: bool, payloads: Any,
                      split: int) -> "Channel":
        try:
            hello = _parse_hello(ep.peer_data)
            peer_region = _check_peer(spec, role, hello)
            peer_payloads, peer_split = _peer_payloads(spec, hello)
            if payloads is not None and "payloads" not in _peer_caps(hello):
                raise ProtocolError("the peer does not write payloads apart from headers (an older lamina-comm "
                                    "without the 'payloads' capability): connect without payloads= or upgrade it")
            if split and split < spec.microbatches and "payload-microbatches" not in _peer_caps(hello):
                raise ProtocolError("the peer would write every micro-batch's payloads apart (an older "
                                    "lamina-comm without the 'payload-microbatches' capability): connect without "
                                    "payload_microbatches= or upgrade it")
            if _is_cuda_region(payloads) and ep.transport != "verbs":
                raise UnsupportedError(f"payloads in device memory need a NIC that writes it (verbs); this "
                                       f"channel runs over {ep.transport}")
            channel = cls(ctx, ep, spec, role, rings, peer_region, name=name, timeout=timeout,
                          piggyback_credits=piggyback_credits)
        except BaseException:
            ep.close()
            raise
        if payloads is not None or peer_payloads is not None:
            channel._split(payloads, split, peer_payloads, peer_split)
        return channel

    def _split(self, payloads: Any, split: int, peer_payloads: RemoteRegion | None, peer_split: int) -> None:
        """Payloads apart from headers (lm_chan_split_payloads), as the two hellos said."""
        try:
            check(lib.lm_chan_split_payloads(self._handle(), ffi.NULL if payloads is None else payloads._handle(),
                                             split, ffi.NULL if peer_payloads is None else peer_payloads._native,
                                             peer_split), f"channel {self.name}")
        except BaseException:
            self.close()
            raise
        self.payloads = payloads
        self.payload_microbatches = split
        if payloads is not None and not _is_cuda_region(payloads):  # host memory: numpy views
            self._payload_buf = payloads.view(nbytes=self._layout.payload_bytes_of(split))

    def add_source_region(self, region: Any) -> str:
        """Tensors lying inside this region are sent from it without a copy; keep them unchanged, and the
        region registered, until ``sent(send_token())`` or ``flush()``.

        A CUDA region (``ctx.register(cuda_tensor)``, of this channel's Context) counts on a verbs channel
        when it was registered for the NIC (``region.path`` ``dmabuf`` or ``peermem``): stream-ordered
        sends (``stream=``) of CUDA tensors inside it go from GPU memory straight to the peer (GPUDirect
        RDMA), with no copy into the slot (``device_direct_messages``). Such a send is posted after the
        stream's work, so ``send_token()`` taken at once does not cover it: ``flush()`` does. A region
        deregistered before its send was posted fails the channel (nothing stale is delivered). Returns
        why a CUDA region's tensors still go through the slot ("" when they do not; host regions always
        count).
        """
        if _is_cuda_region(region):
            return self._device_staging().add_source(region)
        self._sources.append(region)
        return ""

    def wait_sent_on(self, stream: Any, microbatch: int, seq: int | None = None) -> bool:
        """Queue on ``stream`` a wait until send ``seq`` of ``microbatch`` straight from device memory (send
        path 6; default: its last such send) was sent: work queued after it may then overwrite that
        source. The host never waits (``cuStreamWaitValue32`` on a word native code advances as the
        writes complete; a failed or closed channel releases it). False when there is nothing to wait for."""
        staging = self._staging
        return staging.wait_sent_on(stream, microbatch, seq) if staging is not None else False

    def device_sent(self, microbatch: int, seq: int | None = None) -> bool:
        """Whether send ``seq`` of ``microbatch`` straight from device memory (default: its last) was sent
        (True if none)."""
        staging = self._staging
        return staging.sent(microbatch, seq) if staging is not None else True

    def last_device_send(self, microbatch: int) -> int | None:
        """The sequence number of ``microbatch``'s last send straight from device memory (None: none)."""
        staging = self._staging
        return staging.last_direct_send(microbatch) if staging is not None else None

    @property
    def device_direct_messages(self) -> int:
        """Stream-ordered messages sent straight from GPU memory (no slot copy) so far."""
        return self._staging.direct_messages if self._staging is not None else 0

    @property
    def region(self) -> MemoryRegion:
        """The channel's own registered region (slots and credit words)."""
        return self._mr

    @property
    def metrics(self) -> ChannelMetrics:
        st = self._stats
        lib.lm_chan_stats(self._handle(), st)
        staged_messages, staged_bytes = self._python_staged
        return ChannelMetrics(
            messages=st.messages, bytes_sent=st.bytes_sent, staged_bytes=st.staged_bytes + staged_bytes,
            slot_messages=st.slot_messages - staged_messages, region_messages=st.region_messages,
            staged_messages=st.staged_messages + staged_messages, gather_messages=st.gather_messages,
            credit_waits=st.credit_waits,
            credit_wait_seconds=st.credit_wait_ns / 1e9, messages_received=st.messages_received,
            bytes_received=st.bytes_received, credits_returned=st.credits_returned,
            credits_piggybacked=st.credits_piggybacked)

    def send_token(self) -> int:
        """A token for every message sent so far: ``sent(token)`` says when their writes completed.

        A source sent straight from a registered region may be reused then
        (slot views and staged tensors may be reused as soon as send() returns).
        """
        return int(lib.lm_chan_send_token(self._handle()))

    def sent(self, token: int) -> bool:
        """Whether every write up to ``token`` completed (never waits)."""
        rc = lib.lm_chan_wait_sent(self._handle(), token, 0)
        if rc == lib.LM_ERR_TIMEOUT:
            return False
        check(rc, f"channel {self.name}")
        return True

    def wait_sent(self, token: int, timeout: float | None = None) -> None:
        """Wait until every write up to ``token`` completed (TimeoutError after ``timeout``)."""
        check(lib.lm_chan_wait_sent(self._handle(), token, self._timeout_ms(timeout)), f"channel {self.name}")

    def pending(self, microbatch: int | None = None) -> int:
        """Arrivals waiting to be received (of one micro-batch, or of any), without waiting."""
        handle = self._handle()
        lib.lm_chan_progress(handle)
        return max(0, lib.lm_chan_pending(handle, -1 if microbatch is None else microbatch))

    @property
    def outstanding(self) -> int:
        """Writes posted and not yet completed."""
        lib.lm_chan_stats(self._handle(), self._stats)
        return self._stats.outstanding

    # -- sending -------------------------------------------------------------
    def _timeout_ms(self, timeout: float | None) -> int:
        return max(0, int((self.timeout if timeout is None else timeout) * 1000))

    def send_slot(self, microbatch: int, timeout: float | None = None) -> np.ndarray:
        """The payload area (uint8) of the next send slot of a micro-batch, once it is free."""
        self._check_microbatch(microbatch)
        check(lib.lm_chan_send_slot(self._handle(), microbatch, self._timeout_ms(timeout), self._offset),
              f"channel {self.name}")
        offset = self._offset[0]
        return self._buf[offset:offset + self._layout.send_capacity]

    def send_buffers(self, microbatch: int, shapes: Sequence[Sequence[int]], dtype: Any = None, *,
                     as_torch: bool = False, timeout: float | None = None) -> list[Any]:
        """Typed views in the next send slot, laid out as send() stages them.

        Fill them in place and pass them to send(): header and payload then go
        in one write with no copy. Waits for the slot's credit first. dtype:
        one for all tensors (default: the spec's), or one per shape.
        """
        self._check_microbatch(microbatch)
        rc = lib.lm_chan_send_slot(self._handle(), microbatch, self._timeout_ms(timeout), self._offset)
        if rc < 0:
            raise error_of(rc, f"channel {self.name}")
        if isinstance(dtype, (list, tuple)):
            dtype = tuple(dtype)
        key = (self._offset[0], tuple(map(tuple, shapes)), dtype, as_torch)
        kept = self._send_views.get(key)
        if kept is None:
            kept = self._slot_views(key)
        out = _SlotTensors(kept.views)
        out._kept = kept
        return out

    def _slot_views(self, key: tuple) -> "_KeptLayout":
        """Typed views at a payload offset; kept with their descriptors, since a layer's
        messages keep their shapes (send() then needs no description of them)."""
        payload_offset, shapes, dtype, as_torch = key
        per_shape = dtype if isinstance(dtype, tuple) else (dtype,) * len(shapes)
        if len(per_shape) != len(shapes):
            raise InvalidArgumentError(f"{len(per_shape)} dtypes for {len(shapes)} shapes")
        wires = [dtypes.canonical(d if d is not None else self.spec.dtype) for d in per_shape]
        storages = [dtypes.numpy_storage(wire) for wire in wires]
        nbytes = [math.prod(shape) * storage.itemsize for shape, storage in zip(shapes, storages)]
        offsets = packed_offsets(nbytes)
        needed = offsets[-1] + nbytes[-1] if shapes else 0
        if len(shapes) > MAX_TENSORS or needed > self._layout.send_capacity:
            raise InvalidArgumentError(f"{len(shapes)} tensors of {list(shapes)} do not fit a send slot")
        if any(len(shape) > MAX_NDIM for shape in shapes):
            raise InvalidArgumentError(f"tensors may have at most {MAX_NDIM} dimensions, got {list(shapes)}")
        payload = self._buf[payload_offset:payload_offset + self._layout.send_capacity]
        views = [_as_tensor_view(payload[off:off + n].view(storage).reshape(shape), wire)
                 for off, n, shape, storage, wire in zip(offsets, nbytes, shapes, storages, wires)]
        infos = [_describe_numpy(v) for v in views]
        out = [to_torch(v) for v in views] if as_torch else views
        for obj, info in zip(out, infos):
            obj._lamina_info = info  # the descriptor send() takes as it is
        kept = _KeptLayout(out, infos)
        if len(self._send_views) >= _VIEW_CACHE_MAX:
            self._send_views.clear()
        self._send_views[key] = kept
        return kept

    def send(self, tensors: Any, *, layer: int, microbatch: int, timeout: float | None = None,
             stream: Any = None) -> int:
        """Post one message (a tensor or a sequence of them); returns its sequence number.

        Returns once the writes are posted; waits only for the slot's credit.
        Tensors from send_buffers()/send_slot() go without a copy, as do
        tensors in a registered region known to the channel (its own region
        or add_source_region()): packed ones in one write, strided views
        (q, k, v split out of a fused qkv) and scattered ones as a gather list
        of their rows (metrics.gather_messages); keep those unchanged until
        sent(send_token()) or flush(). Anything else is copied once into the
        send slot (metrics.staged_bytes).

        CUDA tensors (torch, or ``__cuda_array_interface__`` such as cupy) are
        copied into the slot by the copy engine on ``stream`` (default: torch's
        current stream of the tensor's device, or the stream a
        ``__cuda_array_interface__`` names) and the write is posted from native
        code once the copy is done: the call returns without waiting for the
        device (lamina_comm/channel/device.py). The sequence number returned
        then belongs to a message not posted yet: ``send_token()`` / ``sent()``
        cover it only once it is, ``flush()`` waits for the stream first.
        Refused on a stream being captured into a CUDA graph.
        """
        if stream is not None:
            self._check_microbatch(microbatch)
            return self._device_send(tensors, layer, microbatch, stream, timeout)
        return self._send(tensors, layer, microbatch, 0, 0, timeout)

    def _device_send(self, tensors: Any, layer: int, microbatch: int, stream: Any, timeout: float | None) -> int:
        tensor_list = _tensor_list(tensors)
        if len(tensor_list) > MAX_TENSORS:
            raise InvalidArgumentError(f"a message carries at most {MAX_TENSORS} tensors, got {len(tensor_list)}")
        return self._device_staging().send(tensor_list, layer, microbatch, stream, self._timeout_ms(timeout),
                                           _fill_tensors)

    def _device_staging(self) -> Any:
        if self._staging is None:
            from .device import DeviceStaging
            self._staging = DeviceStaging(self)
        return self._staging

    async def asend(self, tensors: Any, *, layer: int, microbatch: int,
                    timeout: float | None = None) -> int:
        """send() that waits for the slot's credit without blocking the event loop."""
        self._check_microbatch(microbatch)
        await self._await(lambda: lib.lm_chan_slot_free(self._handle(), microbatch) == 1, timeout,
                          lambda: TimeoutError_(f"channel {self.name}: no credit for micro-batch {microbatch} "
                                                f"within {self._timeout(timeout)} s; the receiver still holds "
                                                "the slot"))
        return self.send(tensors, layer=layer, microbatch=microbatch, timeout=timeout)

    def _send_raw(self, tensors: Any, *, layer: int, microbatch: int, seq: int,
                  timeout: float | None = None) -> None:
        """Test hook: send with an arbitrary sequence number (the counter is not advanced)."""
        self._send(tensors, layer, microbatch, lib.LM_CHAN_SEND_RAW_SEQ, seq, timeout)

    def _send(self, tensors: Any, layer: int, microbatch: int, flags: int, seq: int,
              timeout: float | None) -> int:
        kept = _kept_layout(tensors)
        if kept is not None:
            # send_buffers() views as they were handed out: their table is filled already.
            self._check_microbatch(microbatch)
            vec, count, source = kept.vec, kept.count, ffi.NULL
        else:
            infos = self._describe_message(tensors, microbatch, timeout)
            if infos is None:  # CUDA tensors in it
                return self._device_send(tensors, layer, microbatch, None, timeout)
            vec, count = self._tensors, len(infos)
            _fill_tensors(vec, 0, infos)
            region = self._source_for(infos)
            regions = self._regions_apart(infos, region) if flags == 0 else None
            if regions is not None:  # each tensor in one of several registered regions: gathered from each
                return self._send_from(regions, layer, microbatch, count, timeout)
            source = region._handle() if region is not None else ffi.NULL
        self._seq[0] = seq
        rc = lib.lm_chan_send(self._handle(), layer, microbatch, vec, count, source, flags,
                              self._timeout_ms(timeout), self._seq)
        if rc < 0:
            raise error_of(rc, f"channel {self.name}")
        return self._seq[0]

    def _describe_message(self, tensors: Any, microbatch: int, timeout: float | None) -> list[_TensorInfo] | None:
        """Descriptors of one message's tensors, staged first where they are not contiguous host memory;
        None when CUDA tensors are among them (they take the device path)."""
        self._check_microbatch(microbatch)
        infos = [_describe(t) for t in _tensor_list(tensors)]
        if len(infos) > MAX_TENSORS:
            raise InvalidArgumentError(f"a message carries at most {MAX_TENSORS} tensors, got {len(infos)}")
        if any(info.address is None for info in infos):
            from .device import takes_device_path
            if takes_device_path([info.obj for info in infos]):
                return None
            infos = self._stage(infos, microbatch, timeout)
        return infos

    def _stage(self, infos: list[_TensorInfo], microbatch: int, timeout: float | None) -> list[_TensorInfo]:
        """Strided or device tensors: copied into the next send slot here (the one staging copy)."""
        offsets = packed_offsets([i.nbytes for i in infos])
        size = offsets[-1] + infos[-1].nbytes
        if size > self._layout.send_capacity:
            raise InvalidArgumentError(f"channel {self.name}: message of {size} B exceeds the "
                                       f"{self._layout.send_capacity}-byte slot (see ChannelSpec)")
        payload = self.send_slot(microbatch, timeout)
        staged = []
        for off, info in zip(offsets, infos):
            storage = dtypes.numpy_storage(info.dtype_name)
            dst = payload[off:off + info.nbytes].view(storage).reshape(info.shape)
            _copy_into(dst, info)
            staged.append(_describe_numpy(_as_tensor_view(dst, info.dtype_name)))
        self._python_staged[0] += 1
        self._python_staged[1] += sum(i.nbytes for i in infos)
        return staged

    def _source_for(self, infos: list[_TensorInfo]) -> MemoryRegion | None:
        if not infos or not self._sources:
            return None
        start = min(i.address for i in infos)
        for region in self._sources:
            if not region.closed and region.contains(start, 1):
                return region
        return None

    def _regions_apart(self, infos: list[_TensorInfo], region: MemoryRegion | None) -> list[MemoryRegion | None] | None:
        """Each tensor's region when the message lies in several registered regions (not in one), else None."""
        if not self._sources or (region is not None and all(region.contains(i.address, 1) for i in infos)):
            return None
        regions = self._sources_of(infos)
        return regions if regions is not None and len({id(r) for r in regions}) > 1 else None

    def _sources_of(self, infos: list[_TensorInfo]) -> list[MemoryRegion | None] | None:
        """Each tensor's registered region (None: the channel's own), or None if one lies in none."""
        regions: list[MemoryRegion | None] = []
        for info in infos:
            extent = info.nbytes if info.rows <= 1 else (info.rows - 1) * info.row_stride + info.nbytes // info.rows
            if info.nbytes == 0 or self._mr.contains(info.address, extent):
                regions.append(None)  # (an empty tensor reads nothing: any region will do)
                continue
            found = next((r for r in self._sources if not r.closed and r.contains(info.address, extent)), None)
            if found is None:
                return None
            regions.append(found)
        return regions

    def _send_from(self, regions: list[MemoryRegion | None], layer: int, microbatch: int, count: int,
                   timeout: float | None) -> int:
        sources = ffi.new("lm_mr_t *[]", [ffi.NULL if r is None else r._handle() for r in regions])
        rc = lib.lm_chan_send_from(self._handle(), layer, microbatch, self._tensors, count, sources,
                                   self._timeout_ms(timeout), self._seq)
        if rc < 0:
            raise error_of(rc, f"channel {self.name}")
        return self._seq[0]

    def _check_microbatch(self, microbatch: int) -> None:
        if not 0 <= microbatch < self.spec.microbatches:
            raise InvalidArgumentError(f"channel {self.name}: micro-batch {microbatch} outside "
                                       f"0..{self.spec.microbatches - 1}")

    # -- receiving -----------------------------------------------------------
    def recv(self, microbatch: int | None = None, timeout: float | None = None) -> Message:
        """The next message (of one micro-batch, or any); others stay buffered in arrival order."""
        if microbatch is not None:
            self._check_microbatch(microbatch)
        got = lib.lm_chan_recv(self._handle(), -1 if microbatch is None else microbatch, self._msg,
                               self._timeout_ms(timeout))
        if got <= 0:
            if got < 0:
                raise error_of(got, f"channel {self.name}")
            raise self._recv_timeout(microbatch, timeout)
        return self._message(self._msg)

    def recv_into(self, out: Any, microbatch: int | None = None, *, stream: Any = None,
                  timeout: float | None = None) -> Message:
        """The next message, copied into ``out`` (a tensor or a sequence, matching its tensors in shape and
        dtype), its slot handed back; returns the (released) message for its layer and sequence number.

        Host destinations are filled before it returns. CUDA destinations are filled by the copy engine
        on ``stream`` (default: as for ``send``) and the slot goes back from native code once the copies
        are done: work queued on that stream later sees the data, and the call never waits for the
        device (the returned message's ``tensors`` are then empty: the slot is the stream's). A
        destination that does not match raises ``InvalidArgumentError`` and the message is dropped (its
        slot goes back).
        """
        message = self.recv(microbatch, timeout)
        try:
            self._device_staging().recv_into(message, _tensor_list(out), stream)
        finally:
            message.release()  # (a no-op once the stream took it over)
        return message

    async def arecv(self, microbatch: int | None = None, timeout: float | None = None) -> Message:
        """recv() for asyncio: waits on the channel's event fd instead of blocking the loop."""
        if microbatch is not None:
            self._check_microbatch(microbatch)
        which = -1 if microbatch is None else microbatch
        await self._await(lambda: lib.lm_chan_pending(self._handle(), which) > 0, timeout,
                          lambda: self._recv_timeout(microbatch, timeout))
        return self.recv(microbatch, timeout=0)

    def _recv_timeout(self, microbatch: int | None, timeout: float | None) -> TimeoutError_:
        which = "any micro-batch" if microbatch is None else f"micro-batch {microbatch}"
        return TimeoutError_(f"channel {self.name}: no message for {which} within "
                             f"{self._timeout(timeout)} s")

    def _message(self, msg: Any) -> Message:
        # The tensor table's bytes are the layout's key (channel.c zeroes the
        # unused shape entries): a layer's messages keep their layout, so one
        # lookup finds all its views. A split micro-batch's offsets are in the
        # payload region, not the ring: marked apart in the key.
        layout = bytes(ffi.buffer(msg.tensors, msg.ntensors * _TENSOR_ENTRY_BYTES))
        split = msg.microbatch < self.payload_microbatches
        if split:
            layout += b"p"
        views = self._recv_views.get(layout)
        if views is None:
            views = self._recv_layout(msg, layout, split)
        message = Message(self, msg.layer, msg.microbatch, msg.seq, msg.slot, list(views), msg.arrived_ns)
        if split and self._payload_buf is None:
            from .device import flush_nic_writes
            try:
                flush_nic_writes(self.payloads)  # before any kernel reads what the NIC wrote
            except BaseException:
                message.release()  # the slot goes back; the error is the caller's
                raise
        return message

    def _recv_layout(self, msg: Any, layout: bytes, split: bool) -> tuple[TensorView, ...]:
        """Views over a received layout; kept, bounded (a peer that varies shapes only empties the cache).
        With payloads in device memory, CUDA views (``__cuda_array_interface__``) over the region."""
        views = []
        buf = self._payload_buf if split else self._buf
        for i in range(msg.ntensors):
            t = msg.tensors[i]
            name = dtypes.name_of_wire_code(t.dtype)
            shape = tuple(t.shape)[:t.ndim]
            if buf is None:
                from .device import DeviceSlotView
                views.append(DeviceSlotView(self.payloads, t.addr, t.nbytes, name, shape))
                continue
            views.append(_as_tensor_view(
                buf[t.addr:t.addr + t.nbytes].view(dtypes.numpy_storage(name)).reshape(shape), name))
        if len(self._recv_views) >= _VIEW_CACHE_MAX:
            self._recv_views.clear()
        self._recv_views[layout] = views = tuple(views)
        return views

    def _return_credit(self, mb: int, slot: int, seq: int) -> None:
        if self._ch is not None:
            rc = lib.lm_chan_release(self._ch, mb, slot, seq)
            if rc < 0:
                raise error_of(rc, f"channel {self.name}")

    # -- waiting -------------------------------------------------------------
    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _raise_if_failed(self) -> None:
        check(lib.lm_chan_error(self._handle()), f"channel {self.name}")

    async def _await(self, ready: Callable[[], bool], timeout: float | None,
                     on_timeout: Callable[[], LaminaError]) -> None:
        """Sleep on the channel's event fd (Context.await_fd) until ready() holds."""
        def look() -> bool:
            # A non-blocking round first: it also writes out held credits, which
            # an asyncio receiver must not keep its sender waiting for.
            check(lib.lm_chan_progress(self._handle()), f"channel {self.name}")
            return ready()

        def raise_if_failed() -> None:
            self._raise_if_failed()
            if self.endpoint.error is not None:
                raise self.endpoint.error

        await self.context.await_fd(self._event_fd, look, time.monotonic() + self._timeout(timeout),
                                    raise_if_failed, on_timeout)

    def _event_fd(self) -> int:
        """The native channel's eventfd, made on first use; ClosedError once the channel is closed."""
        handle = self._handle()  # before touching the fd: closing the channel closes it
        if self._fd is None:
            self._fd = check(lib.lm_chan_fd(handle), f"channel {self.name}")
        return self._fd

    def flush(self, timeout: float | None = None) -> None:
        """Write out pending credits, then wait until every posted write has completed (stream-ordered
        sends first wait for their streams: they are posted when the streams get there)."""
        if self._staging is not None:
            self._staging.synchronize()
        check(lib.lm_chan_flush(self._handle(), self._timeout_ms(timeout)), f"channel {self.name}")

    # -- life cycle ------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.endpoint.closed

    def close(self) -> None:
        """Close the endpoint (outstanding writes are canceled) and deregister the region."""
        self.endpoint.close()  # destroys the native channel first (Endpoint._before_close)
        self._rings.close()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Channel {self.name} {self.spec.microbatches}x{self.spec.slots_per_microbatch} slots>"


def _fill_tensors(vec: Any, start: int, infos: list[_TensorInfo]) -> None:
    for i, info in enumerate(infos):
        t = vec[start + i]
        t.addr = info.address
        t.nbytes = info.nbytes
        t.rows = info.rows
        t.row_stride = info.row_stride
        t.dtype = _WIRE_CODE[info.dtype_name]
        t.ndim = len(info.shape)
        for d, size in enumerate(info.shape):
            t.shape[d] = size


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

    def accept(self, timeout: float | None = None, name: str | None = None, *, payloads: Any = None,
               payload_microbatches: int | None = None) -> Channel:
        """The next channel; payloads (of the first payload_microbatches): a region of its own for the
        payloads it receives (Channel.connect)."""
        return Channel.accept(self._listener, self.spec, role=self.role, name=name,
                              accept_timeout=timeout, timeout=self.timeout,
                              piggyback_credits=self.piggyback_credits, payloads=payloads,
                              payload_microbatches=payload_microbatches)

    def close(self) -> None:
        self._listener.close()

    def __enter__(self) -> "ChannelListener":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
