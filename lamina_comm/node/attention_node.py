"""Attention role: a weight-free worker holding the KV cache of a share of the KV heads.

One model node at a time drives an attention node (a *session*): it connects
a setup channel, sends ``setup`` (config, head share, data-channel spec), then
connects the data channel, which carries q/k/v per layer and micro-batch and,
on its control micro-batch, reserve/free requests. One thread serves every
message strictly in arrival order (``pipeline.serve_attention``), which is
what keeps the model tier's ping-pong schedule deadlock-free.

When the model node goes away the session's cache is dropped and the node
waits for the next model node, so a restarted model node (or one that lost a
worker and picks this one as a replacement) can set it up afresh.

A model node that connects while a session runs is answered at once: if the
session's model node has been silent for ``peer_timeout`` (hung, e.g.
SIGSTOPped: its TCP connection stays up) the newcomer takes the session's
place; otherwise it gets a ``busy`` refusal that names the current model
node. A healthy model node is never silent that long: it sends a heartbeat
(``status``) at least every ``peer_timeout / protocol.HEARTBEATS_PER_SILENCE``.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from lamina_comm.channel import Channel, Message
from lamina_comm.errors import LaminaError, PeerLostError, TimeoutError_
from lamina_comm.model import KVCacheFull, LlamaConfig, PagedKVCache
from lamina_comm.node import protocol
from lamina_comm.pipeline import serve_attention
from lamina_comm.transport import Context

log = logging.getLogger("lamina_comm.node.attention")

# Waits are sliced so stop requests, a lost peer and a knocking model node are noticed promptly.
_POLL_S = 0.5

# Bound on each wait for a model node that connects while a session runs (its
# setup request, its hang-up after a "busy" answer). The session is not served
# meanwhile, so this stays well below a model node's peer_timeout.
NEWCOMER_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class AttentionOptions:
    listen: str
    num_blocks: int = 2048
    block_size: int = 16
    device: str = "cpu"
    # The config this node was started with (--model/--config); when set, a
    # model node running another config is refused at setup.
    config: Optional[LlamaConfig] = None
    secret: Optional[str] = None
    transport: str = "auto"
    # "event" or "poll" (Context(progress=...)); None: $LAMINA_PROGRESS, else event.
    progress: Optional[str] = None
    # Bound on every wait for the model node inside a session (handshakes,
    # setup, the rest of a fragmented control message); also the silence after
    # which a model node that connects takes over the session (--peer-timeout).
    peer_timeout: float = 10.0
    # Fault injection for tests: die abruptly after serving this many data messages.
    exit_after_messages: Optional[int] = None


class AttentionServer:
    """Listens on one address and serves model-node sessions one after another."""

    def __init__(self, options: AttentionOptions):
        if options.num_blocks < 1 or options.block_size < 1:
            raise ValueError(f"--blocks and --block-size must be >= 1, got {options.num_blocks}, {options.block_size}")
        self.options = options
        self.context = Context(options.transport, secret=options.secret, progress=options.progress)
        try:
            self._listener = self.context.listen(options.listen)
        except BaseException:
            self.context.close()
            raise
        self.address: tuple[str, int] = tuple(self._listener.address)
        self.sessions_served = 0
        self._messages_served = 0
        self._session: Optional[AttentionSession] = None

    def serve_forever(self, stop: threading.Event) -> None:
        """Accept and run sessions until ``stop`` is set."""
        newcomer: Optional[Newcomer] = None
        while not stop.is_set():
            newcomer = newcomer or self._wait_for_newcomer(stop)
            if newcomer is not None:
                newcomer = self._run_session(newcomer, stop)

    def _run_session(self, newcomer: "Newcomer", stop: threading.Event) -> Optional["Newcomer"]:
        """Serve one model node; returns the model node that took the session over, if one did."""
        session = AttentionSession(self, newcomer)
        self._session = session
        peer = _peer_of(newcomer.channel)
        try:
            session.run(stop)
        except SessionTakenOver as taken:
            log.warning("model node at %s was silent for %.1f s; model node at %s takes over", peer,
                        taken.silent_s, _peer_of(taken.newcomer.channel))
            return taken.newcomer
        except PeerLostError:
            log.info("model node at %s disconnected; session ended", peer)
        except LaminaError as exc:
            log.warning("session with %s ended: %s", peer, exc)
        finally:
            session.close()
            self._session = None
            self.sessions_served += 1
        return None

    def _wait_for_newcomer(self, stop: threading.Event) -> Optional["Newcomer"]:
        # Wait for a connection first, so that no channel rings are allocated per poll.
        readable, _, _ = select.select([self._listener], [], [], _POLL_S)
        if not readable or stop.is_set():
            return None
        return self.greet(self.options.peer_timeout)

    def knocking(self) -> bool:
        """A model node has authenticated and waits to be accepted."""
        readable, _, _ = select.select([self._listener], [], [], 0)
        return bool(readable)

    def greet(self, timeout: float) -> Optional["Newcomer"]:
        """Accept a model node's setup channel and read its first request (each wait within ``timeout``).

        None when it fails; a malformed first request is answered with an error first.
        """
        try:
            channel = Channel.accept(self._listener, protocol.CONTROL_SPEC, role="attention", name="control",
                                     accept_timeout=timeout, timeout=timeout)
        except TimeoutError_:
            return None
        except LaminaError as exc:
            log.warning("refused a control connection: %s", exc)
            return None
        link = protocol.ControlLink(channel, timeout)
        number = 0
        try:
            first = channel.recv(timeout=timeout)
            number = first.layer
            _, request = link.read_request(first)
        except protocol.ControlError as exc:
            log.warning("refused model node at %s: %s", _peer_of(channel), exc)
            Newcomer(channel, link, number, {}).refuse(protocol.error(str(exc), exc.code), timeout)
            return None
        except LaminaError as exc:
            log.warning("model node at %s sent no request: %s", _peer_of(channel), exc)
            channel.close()
            return None
        return Newcomer(channel, link, number, request)

    def count_served(self) -> None:
        """Called per served data message; implements the fault-injection exit."""
        self._messages_served += 1
        limit = self.options.exit_after_messages
        if limit is not None and self._messages_served >= limit:
            log.error("fault injection: exiting after %d data messages", self._messages_served)
            os._exit(3)

    def accept_data(self, spec: Any) -> Channel:
        # Credits ride on the replies (and are written out whenever this side waits).
        return Channel.accept(self._listener, spec, role="attention", name="data",
                              accept_timeout=self.options.peer_timeout, timeout=self.options.peer_timeout,
                              piggyback_credits=True)

    def close(self) -> None:
        self._listener.close()
        self.context.close()


@dataclass
class Newcomer:
    """A model node's setup channel, accepted, with the first request it sent."""

    channel: Channel
    link: protocol.ControlLink
    number: int
    request: dict[str, Any]

    def refuse(self, answer: dict[str, Any], timeout: float) -> None:
        """Answer with an error, let the model node hang up first (bounded) so the answer is read, close."""
        try:
            self.link.reply(self.number, answer)
            self.channel.flush(timeout)
            self.channel.recv(timeout=timeout).release()
        except LaminaError:
            pass  # the expected end: the model node closed the connection
        finally:
            self.channel.close()


class SessionTakenOver(Exception):
    """A model node connected while the session's model node was silent past peer_timeout."""

    def __init__(self, newcomer: Newcomer, silent_s: float):
        super().__init__(f"taken over after {silent_s:.1f} s of silence")
        self.newcomer = newcomer
        self.silent_s = silent_s


class AttentionSession:
    """One model node's use of this worker: setup, then one thread serving the data channel.

    Control requests arrive on the data channel's control micro-batch, so they
    are served in the same arrival order as the attention work.
    """

    def __init__(self, server: AttentionServer, newcomer: Newcomer):
        self.server = server
        self.options = server.options
        self.newcomer = newcomer
        self.setup_channel = newcomer.channel
        self.cache: Optional[PagedKVCache] = None
        self.setup: Optional[protocol.Setup] = None
        self.data: Optional[Channel] = None
        self._control: Optional[protocol.ControlLink] = None
        self._control_mb = -1
        self._step_meta: dict[int, tuple[list[int], torch.Tensor]] = {}
        self._last_heard = time.monotonic()  # when the model node last sent anything
        self._next_knock_check = 0.0

    def run(self, stop: threading.Event) -> None:
        """Set up, then serve until the model node leaves (PeerLostError) or ``stop`` is set.

        Raises SessionTakenOver when a model node connects while this one is silent.
        """
        if not self._setup():
            return
        assert self.data is not None
        self._control_mb = protocol.control_microbatch(self.data.spec)
        self._control = protocol.ControlLink(self.data, self.options.peer_timeout, self._control_mb)
        self._last_heard = time.monotonic()
        serve_attention(self._next_message, self._serve, self._send_result, stop.is_set)

    # -- setup --------------------------------------------------------------
    def _setup(self) -> bool:
        number, message = self.newcomer.number, self.newcomer.request
        if message.get("type") != "setup":
            self._refuse(protocol.error(f"expected setup first, got {message.get('type')!r}", "state"))
            return False
        try:
            setup = protocol.Setup.parse(message)
            if self.options.config is not None:
                protocol.check_same_config(self.options.config, setup.config)
            cache = PagedKVCache(setup.config, setup.kv_heads[0], setup.kv_heads[1], self.options.num_blocks,
                                 self.options.block_size, self.options.device)
        except protocol.ControlError as exc:
            log.error("setup refused: %s", exc)
            self._refuse(protocol.error(str(exc), exc.code))
            return False
        except (RuntimeError, ValueError) as exc:  # e.g. the pools do not fit device memory
            log.error("setup failed: %s", exc)
            self._refuse(protocol.error(f"cannot create the KV cache: {exc}", "resources"))
            return False
        self.setup, self.cache = setup, cache
        log.info("worker %d/%d: KV heads [%d, %d), %d blocks of %d tokens on %s", setup.worker,
                 setup.num_workers, *setup.kv_heads, cache.blocks_total, cache.block_size, cache.device)
        self.newcomer.link.reply(number, protocol.ok(
            **self._cache_figures(), pid=os.getpid(), device=str(cache.device), kv_heads=list(setup.kv_heads),
            takeover_after_s=self.options.peer_timeout))
        self.data = self.server.accept_data(setup.data_spec)
        return True

    def _refuse(self, answer: dict[str, Any]) -> None:
        self.newcomer.refuse(answer, self.options.peer_timeout)

    # -- serving --------------------------------------------------------------
    def _next_message(self) -> Optional[tuple[int, int, Message]]:
        assert self.data is not None
        self._answer_knocks()
        try:
            message = self.data.recv(timeout=_POLL_S)
        except TimeoutError_:
            return None
        self._last_heard = time.monotonic()
        return message.layer, message.microbatch, message

    def _answer_knocks(self) -> None:
        """A model node connecting meanwhile takes over a silent session, or hears that we are busy."""
        now = time.monotonic()
        if now < self._next_knock_check:
            return
        self._next_knock_check = now + _POLL_S
        if not self.server.knocking():
            return
        newcomer = self.server.greet(NEWCOMER_TIMEOUT_S)
        if newcomer is None:
            return
        silent = time.monotonic() - self._last_heard
        if silent >= self.options.peer_timeout:
            raise SessionTakenOver(newcomer, silent)
        log.warning("refused model node at %s: busy with the one at %s", _peer_of(newcomer.channel),
                    _peer_of(self.setup_channel))
        newcomer.refuse(protocol.error(
            f"busy with another model node (at {_peer_of(self.setup_channel)}, last heard from {silent:.1f} s "
            f"ago); a model node silent for {self.options.peer_timeout} s gives way to the next one that connects",
            "busy", retry_after_s=round(self.options.peer_timeout - silent, 3)), NEWCOMER_TIMEOUT_S)

    def _serve(self, layer: int, microbatch: int, message: Message) -> Any:
        if microbatch == self._control_mb:
            return _ControlReply(self._handle_control(message))
        return self._attend(layer, microbatch, message)

    def _send_result(self, layer: int, microbatch: int, result: Any) -> None:
        assert self.data is not None
        if isinstance(result, _ControlReply):
            assert self._control is not None
            self._control.reply(layer, result.answer)
        elif isinstance(result, str):
            self.data.send([protocol.encode_error(result)], layer=protocol.ERROR_LAYER, microbatch=microbatch)
        elif isinstance(result, _SlotReply):
            self.data.send(result.tensors, layer=layer, microbatch=microbatch)
        else:
            out, attention_ns = result
            self.data.send([out, np.array([attention_ns], dtype=np.int64)], layer=layer, microbatch=microbatch)

    # -- control ------------------------------------------------------------
    def _handle_control(self, first: Message) -> dict[str, Any]:
        """The answer to the control request starting with fragment ``first``.

        A malformed or oversized request gets an error answer; fragments that
        do not continue the request (ProtocolError) end the session.
        """
        assert self._control is not None
        try:
            _, request = self._control.read_request(first)
        except protocol.ControlError as exc:
            log.warning("refused a control request: %s", exc)
            return protocol.error(str(exc), exc.code)
        kind = request.get("type")
        handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "reserve": self._reserve,
            "rebuild": self._rebuild,
            "free": self._free,
            "status": lambda _: protocol.ok(**self._cache_figures()),
        }
        handler = handlers.get(kind)
        if handler is None:
            return protocol.error(f"unknown control message type {kind!r}", "bad_request")
        try:
            return handler(request)
        except protocol.ControlError as exc:
            return protocol.error(str(exc), exc.code)

    def _reserve(self, message: dict[str, Any], keep_existing: bool = False) -> dict[str, Any]:
        """Reserve each request independently; the reply lists the refused ones with the reason."""
        assert self.cache is not None and self.setup is not None
        reserved: list[int] = []
        refused: list[list[Any]] = []
        for request_id, max_tokens in protocol.parse_reservations(message):
            if keep_existing and self.cache.has_request(request_id):
                reserved.append(request_id)
                continue
            try:
                self.cache.reserve(request_id, max_tokens)
                reserved.append(request_id)
            except (KVCacheFull, ValueError) as exc:
                refused.append([request_id, f"attention worker {self.setup.worker}: {exc}"])
        return protocol.ok(reserved=reserved, refused=refused, **self._cache_figures())

    def _rebuild(self, message: dict[str, Any]) -> dict[str, Any]:
        # Requests this worker still holds keep their blocks: the re-prefill
        # rewrites their positions from 0. A replacement worker reserves anew.
        return self._reserve(message, keep_existing=True)

    def _free(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.cache is not None
        for request_id in protocol.parse_request_ids(message):
            if self.cache.has_request(request_id):
                self.cache.free(request_id)
        return protocol.ok(**self._cache_figures())

    def _cache_figures(self) -> dict[str, int]:
        assert self.cache is not None
        return {"blocks_used": self.cache.blocks_used, "blocks_total": self.cache.blocks_total,
                "block_size": self.cache.block_size}

    # -- attention ------------------------------------------------------------
    def _attend(self, layer: int, microbatch: int, message: Message) -> Any:
        """Attention output and its compute time, or the error text when the message cannot be served."""
        assert self.cache is not None and self.data is not None
        with message:
            try:
                tensors = message.torch()
                if len(tensors) == 4:  # layer 0 of a step: new batch metadata
                    self._step_meta[microbatch] = protocol.decode_step_meta(tensors[3])
                if microbatch not in self._step_meta or len(tensors) not in (3, 4):
                    raise ValueError(f"message for layer {layer} micro-batch {microbatch} has no step metadata")
                request_ids, positions = self._step_meta[microbatch]
                device = self.cache.device
                q, k, v = (t.to(device) for t in tensors[:3])
                reply = None
                if device.type == "cpu":
                    # The output is written straight into the reply slot (no copy to send it).
                    reply = self.data.send_buffers(microbatch, [tuple(q.shape), (1,)], [q.dtype, "int64"],
                                                   as_torch=True)
                started = time.perf_counter_ns()
                out = self.cache.attend(layer, request_ids, positions, q, k, v,
                                        out=reply[0] if reply is not None else None)
            except (ValueError, KeyError, LaminaError) as exc:
                log.error("cannot serve layer %d micro-batch %d: %s", layer, microbatch, exc)
                return str(exc)
        self.server.count_served()
        attention_ns = time.perf_counter_ns() - started
        if reply is None:
            return out, attention_ns
        reply[1][0] = attention_ns
        return _SlotReply(reply)

    # -- life cycle ---------------------------------------------------------
    def close(self) -> None:
        for channel in (self.data, self.setup_channel):
            if channel is not None:
                channel.close()
        self.cache = None


@dataclass(frozen=True)
class _ControlReply:
    answer: dict[str, Any]


@dataclass(frozen=True)
class _SlotReply:
    """The attention output and its compute time, already in the reply slot."""

    tensors: list[Any]


def _peer_of(channel: Channel) -> str:
    address = channel.endpoint.peer_address
    return f"{address[0]}:{address[1]}" if address else "model node"
