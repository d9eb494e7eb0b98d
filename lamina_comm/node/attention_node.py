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
from lamina_comm.node import protocol
from lamina_comm.node.kvcache import KVCacheFull, PagedKVCache
from lamina_comm.node.model import LlamaConfig
from lamina_comm.pipeline import serve_attention
from lamina_comm.transport import Context

log = logging.getLogger("lamina_comm.node.attention")

# Waits are sliced so stop requests and a lost peer are noticed promptly.
_POLL_S = 0.5


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
    # Bound on every wait for the model node inside a session (handshakes, setup).
    peer_timeout: float = 10.0
    # Fault injection for tests: die abruptly after serving this many data messages.
    exit_after_messages: Optional[int] = None


class AttentionServer:
    """Listens on one address and serves model-node sessions one after another."""

    def __init__(self, options: AttentionOptions):
        if options.num_blocks < 1 or options.block_size < 1:
            raise ValueError(f"--blocks and --block-size must be >= 1, got {options.num_blocks}, {options.block_size}")
        self.options = options
        self.context = Context(options.transport, secret=options.secret)
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
        while not stop.is_set():
            control = self._accept_control(stop)
            if control is None:
                continue
            session = AttentionSession(self, control)
            self._session = session
            try:
                session.run(stop)
            except PeerLostError:
                log.info("model node at %s disconnected; session ended", _peer_of(control))
            except LaminaError as exc:
                log.warning("session with %s ended: %s", _peer_of(control), exc)
            finally:
                session.close()
                self._session = None
                self.sessions_served += 1

    def _accept_control(self, stop: threading.Event) -> Optional[Channel]:
        # Wait for a connection first, so that no channel rings are allocated per poll.
        readable, _, _ = select.select([self._listener], [], [], _POLL_S)
        if not readable or stop.is_set():
            return None
        try:
            return Channel.accept(self._listener, protocol.CONTROL_SPEC, role="attention", name="control",
                                  accept_timeout=self.options.peer_timeout, timeout=self.options.peer_timeout)
        except TimeoutError_:
            return None
        except LaminaError as exc:
            log.warning("refused a control connection: %s", exc)
            return None

    def count_served(self) -> None:
        """Called per served data message; implements the fault-injection exit."""
        self._messages_served += 1
        limit = self.options.exit_after_messages
        if limit is not None and self._messages_served >= limit:
            log.error("fault injection: exiting after %d data messages", self._messages_served)
            os._exit(3)

    def accept_data(self, spec: Any) -> Channel:
        return Channel.accept(self._listener, spec, role="attention", name="data",
                              accept_timeout=self.options.peer_timeout, timeout=self.options.peer_timeout)

    def close(self) -> None:
        self._listener.close()
        self.context.close()


class AttentionSession:
    """One model node's use of this worker: setup, then one thread serving the data channel.

    Control requests arrive on the data channel's control micro-batch, so they
    are served in the same arrival order as the attention work.
    """

    def __init__(self, server: AttentionServer, setup_channel: Channel):
        self.server = server
        self.options = server.options
        self.setup_channel = setup_channel
        self.cache: Optional[PagedKVCache] = None
        self.setup: Optional[protocol.Setup] = None
        self.data: Optional[Channel] = None
        self._control_mb = -1
        self._step_meta: dict[int, tuple[list[int], torch.Tensor]] = {}

    def run(self, stop: threading.Event) -> None:
        """Set up, then serve until the model node leaves (PeerLostError) or ``stop`` is set."""
        if not self._setup():
            return
        assert self.data is not None
        self._control_mb = protocol.control_microbatch(self.data.spec)
        serve_attention(self._next_message, self._serve, self._send_result, stop.is_set)

    # -- setup --------------------------------------------------------------
    def _setup(self) -> bool:
        link = protocol.ControlLink(self.setup_channel, self.options.peer_timeout)
        number, message = link.receive(self.options.peer_timeout)
        if message.get("type") != "setup":
            self._refuse(link, number, protocol.error(f"expected setup first, got {message.get('type')!r}", "state"))
            return False
        try:
            setup = protocol.Setup.parse(message)
            if self.options.config is not None:
                protocol.check_same_config(self.options.config, setup.config)
            cache = PagedKVCache(setup.config, setup.kv_heads[0], setup.kv_heads[1], self.options.num_blocks,
                                 self.options.block_size, self.options.device)
        except protocol.ControlError as exc:
            log.error("setup refused: %s", exc)
            self._refuse(link, number, protocol.error(str(exc), exc.code))
            return False
        except (RuntimeError, ValueError) as exc:  # e.g. the pools do not fit device memory
            log.error("setup failed: %s", exc)
            self._refuse(link, number, protocol.error(f"cannot create the KV cache: {exc}", "resources"))
            return False
        self.setup, self.cache = setup, cache
        log.info("worker %d/%d: KV heads [%d, %d), %d blocks of %d tokens on %s", setup.worker,
                 setup.num_workers, *setup.kv_heads, cache.blocks_total, cache.block_size, cache.device)
        link.reply(number, protocol.ok(**self._cache_figures(), pid=os.getpid(),
                                       device=str(cache.device), kv_heads=list(setup.kv_heads)))
        self.data = self.server.accept_data(setup.data_spec)
        return True

    def _refuse(self, link: protocol.ControlLink, number: int, answer: dict[str, Any]) -> None:
        """Answer with an error, then let the model node hang up first (bounded), so the answer is read."""
        link.reply(number, answer)
        try:
            self.setup_channel.flush(self.options.peer_timeout)
            self.setup_channel.recv(timeout=self.options.peer_timeout).release()
        except LaminaError:
            pass  # the expected end: the model node closed the connection

    # -- serving --------------------------------------------------------------
    def _next_message(self) -> Optional[tuple[int, int, Message]]:
        assert self.data is not None
        try:
            message = self.data.recv(timeout=_POLL_S)
        except TimeoutError_:
            return None
        return message.layer, message.microbatch, message

    def _serve(self, layer: int, microbatch: int, message: Message) -> Any:
        if microbatch == self._control_mb:
            with message:
                return _ControlReply(self._handle_control(message))
        return self._attend(layer, microbatch, message)

    def _send_result(self, layer: int, microbatch: int, result: Any) -> None:
        assert self.data is not None
        if isinstance(result, _ControlReply):
            self.data.send([protocol.encode_json(result.answer)], layer=layer, microbatch=microbatch)
        elif isinstance(result, str):
            self.data.send([protocol.encode_error(result)], layer=protocol.ERROR_LAYER, microbatch=microbatch)
        else:
            out, attention_ns = result
            self.data.send([out, np.array([attention_ns], dtype=np.int64)], layer=layer, microbatch=microbatch)

    # -- control ------------------------------------------------------------
    def _handle_control(self, message: Message) -> dict[str, Any]:
        try:
            request = protocol.decode_json(message)
        except LaminaError as exc:
            return protocol.error(str(exc), "bad_request")
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
        assert self.cache is not None
        started = time.perf_counter_ns()
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
                out = self.cache.attend(layer, request_ids, positions, q, k, v)
            except (ValueError, KeyError, LaminaError) as exc:
                log.error("cannot serve layer %d micro-batch %d: %s", layer, microbatch, exc)
                return str(exc)
        self.server.count_served()
        return out, time.perf_counter_ns() - started

    # -- life cycle ---------------------------------------------------------
    def close(self) -> None:
        for channel in (self.data, self.setup_channel):
            if channel is not None:
                channel.close()
        self.cache = None


@dataclass(frozen=True)
class _ControlReply:
    answer: dict[str, Any]


def _peer_of(channel: Channel) -> str:
    address = channel.endpoint.peer_address
    return f"{address[0]}:{address[1]}" if address else "model node"
