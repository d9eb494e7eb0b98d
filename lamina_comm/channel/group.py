"""ChannelGroup: one model worker's channels to its attention workers, driven together."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from .._bindings import error_of, ffi, lib
from ..errors import InvalidArgumentError, LaminaError, TimeoutError_
from .core import Channel, Message, _fill_tensors, _kept_layout
from .spec import MAX_TENSORS


_TENSOR_BYTES = ffi.sizeof("lm_chan_tensor_t")


class ChannelGroup:
    """One model worker's channels to its attention workers, driven together.

    ``send`` posts a layer's messages (one per channel) in one native call and
    ``recv`` collects one reply from every channel in one native call, waiting
    on the shared progress engine, with the GIL released throughout. The
    channels keep their own API; a group only batches.

    A failed call's error names the channel it came from (``channel_index``,
    or None) and says how far the call got: a send posted on channels
    ``[0, channels_posted)`` before it failed; a receive took (and released)
    the messages of channels ``[0, channels_taken)``. A caller counting the
    replies in flight stays exact.
    """

    def __init__(self, channels: Sequence[Channel]):
        if not channels:
            raise InvalidArgumentError("a channel group needs at least one channel")
        self.channels = list(channels)
        n = len(self.channels)
        self._chans = ffi.new("lm_chan_t *[]", n)
        self._counts = ffi.new("uint32_t[]", n)
        self._seqs = ffi.new("uint64_t[]", n)
        self._msgs = ffi.new("lm_chan_msg_t[]", n)
        self._tensors = ffi.new("lm_chan_tensor_t[]", n * MAX_TENSORS)
        self._taken = ffi.new("uint32_t *")
        self._failed = ffi.new("int32_t *")

    def _handles(self) -> Any:
        for i, channel in enumerate(self.channels):
            try:
                self._chans[i] = channel._handle()
            except LaminaError as exc:  # closed: the call did nothing
                exc.channel_index, exc.channels_posted, exc.channels_taken = i, 0, 0
                raise
        return self._chans

    @property
    def _timeout_ms(self) -> Callable[[float | None], int]:
        return self.channels[0]._timeout_ms

    def send(self, messages: Sequence[Any], *, layer: int, microbatch: int,
             timeout: float | None = None) -> list[int]:
        """Post messages[i] (a tensor or a sequence of them) on channel i; their sequence numbers."""
        if len(messages) != len(self.channels):
            raise InvalidArgumentError(f"{len(messages)} messages for {len(self.channels)} channels")
        if len(self.channels) == 1:
            return [self._only(lambda c: c.send(messages[0], layer=layer, microbatch=microbatch, timeout=timeout),
                               "channels_posted")]
        at, sources = 0, []
        for i, (channel, tensors) in enumerate(zip(self.channels, messages)):
            kept = _kept_layout(tensors)
            if kept is not None:
                # send_buffers() views as handed out: their table is filled already.
                ffi.memmove(self._tensors + at, kept.vec, kept.count * _TENSOR_BYTES)
                self._counts[i] = kept.count
                at += kept.count
                continue
            try:
                infos = channel._describe_message(tensors, microbatch, timeout)  # may stage (a credit wait)
            except LaminaError as exc:
                exc.channel_index, exc.channels_posted = i, 0  # nothing is posted before the native call
                raise
            if infos is None:  # CUDA tensors: each channel's own stream-ordered send (nothing posted yet)
                return self._send_each(messages, layer, microbatch, timeout)
            source = channel._source_for(infos)
            if channel._regions_apart(infos, source) is not None:
                # In several registered regions: each channel gathers from them itself (nothing posted yet).
                return self._send_each(messages, layer, microbatch, timeout)
            _fill_tensors(self._tensors, at, infos)
            self._counts[i] = len(infos)
            at += len(infos)
            sources.append(source)
        source = next((region for region in sources if region is not None), None)
        rc = lib.lm_chan_send_group(self._handles(), len(self.channels), layer, microbatch, self._tensors,
                                    self._counts, source._handle() if source is not None else ffi.NULL,
                                    self._timeout_ms(timeout), self._seqs, self._failed)
        if rc < 0:
            error = self._error(rc)
            error.channels_posted = max(self._failed[0], 0)  # posted in channel order up to the failing one
            raise error
        return [self._seqs[i] for i in range(len(self.channels))]

    def _send_each(self, messages: Sequence[Any], layer: int, microbatch: int, timeout: float | None) -> list[int]:
        seqs = []
        for i, (channel, tensors) in enumerate(zip(self.channels, messages)):
            try:
                seqs.append(channel.send(tensors, layer=layer, microbatch=microbatch, timeout=timeout))
            except LaminaError as exc:
                exc.channel_index, exc.channels_posted = i, i
                raise
        return seqs

    def _only(self, call: Callable[[Channel], Any], progress: str) -> Any:
        """A group of one channel makes that channel's own call (fewer steps than the group's native
        loop); its errors name the channel as the group's do (a failed call did nothing: ``progress`` 0)."""
        try:
            return call(self.channels[0])
        except LaminaError as exc:
            exc.channel_index = 0
            setattr(exc, progress, 0)
            raise

    def _error(self, rc: int) -> LaminaError:
        """The typed error of a group call; .channel_index names the channel it came from (or None)."""
        index = self._failed[0]
        where = f"channel {self.channels[index].name}" if index >= 0 else "channel group"
        error = error_of(rc, where)
        error.channel_index = index if index >= 0 else None
        return error

    def recv(self, microbatch: int | None = None, timeout: float | None = None) -> list[Message]:
        """One message from every channel (of one micro-batch, or the oldest of any)."""
        if microbatch is not None:
            self.channels[0]._check_microbatch(microbatch)
        n = len(self.channels)
        if n == 1:
            return [self._only(lambda c: c.recv(microbatch, timeout), "channels_taken")]
        rc = lib.lm_chan_recv_group(self._handles(), n, -1 if microbatch is None else microbatch, self._msgs,
                                    self._timeout_ms(timeout), self._taken, self._failed)
        if rc < 0:
            error = self._error(rc)
            error.channels_taken = self._taken[0]
            for i in range(self._taken[0]):  # taken before the failure: hand them back
                try:
                    self.channels[i]._message(self._msgs[i]).release()
                except LaminaError:
                    pass  # the first error is the one to report
            raise error
        if rc == 0:
            which = "any micro-batch" if microbatch is None else f"micro-batch {microbatch}"
            wanted = -1 if microbatch is None else microbatch
            silent = [i for i, channel in enumerate(self.channels) if lib.lm_chan_pending(channel._ch, wanted) <= 0]
            error = TimeoutError_(f"channel group: no message for {which} from "
                                  f"{', '.join(self.channels[i].name for i in silent)} within "
                                  f"{self.channels[0]._timeout(timeout)} s")
            error.channel_index = silent[0] if silent else None
            error.channels_taken = 0  # a timeout takes nothing
            raise error
        return [channel._message(self._msgs[i]) for i, channel in enumerate(self.channels)]

    def recv_any(self, microbatch: int | None = None, timeout: float | None = None) -> tuple[int, Message]:
        """The oldest message over all channels (of one micro-batch, or of any): (channel index, message).

        For one receiver serving several senders (an attention worker shared
        by several model nodes): requests are taken in the order they arrived,
        whichever channel carried them, in one native call.
        """
        if microbatch is not None:
            self.channels[0]._check_microbatch(microbatch)
        if len(self.channels) == 1:
            return 0, self._only(lambda c: c.recv(microbatch, timeout), "channels_taken")
        rc = lib.lm_chan_recv_any(self._handles(), len(self.channels), -1 if microbatch is None else microbatch,
                                  self._msgs, self._timeout_ms(timeout), self._failed)
        if rc < 0:
            raise self._error(rc)
        if rc == 0:
            which = "any micro-batch" if microbatch is None else f"micro-batch {microbatch}"
            raise TimeoutError_(f"channel group: no message for {which} on any of {len(self.channels)} channels "
                                f"within {self.channels[0]._timeout(timeout)} s")
        index = self._failed[0]
        return index, self.channels[index]._message(self._msgs[0])
