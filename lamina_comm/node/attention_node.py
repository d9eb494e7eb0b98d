"""Attention role: a weight-free worker holding the KV cache of a share of the KV heads.

Several model nodes (replicas) can share one attention node, up to
``--max-model-nodes``. Each is a *session*: it connects a setup channel,
sends ``setup`` (config, head share, data-channel spec), then connects its
data channel, which carries q/k/v per layer and micro-batch and, on its
control micro-batch, the step metadata and reserve/free requests. All
sessions share one KV cache (the first setup makes it; later ones must bring
the same model and head share) under the admission rule of ``kv_shares``.
The data channels are served through the public engine API: one
``AttentionService`` holds every session's channel, hands over the layers as
``LayerRequest``s and the control requests to ``AttentionSession``. One thread
serves every session's messages strictly in arrival order
(``AttentionService.recv`` feeding ``pipeline.serve_attention``), which is
what keeps each model tier's schedule deadlock-free.

When a model node goes away its session ends alone: its KV blocks are
freed and the other sessions carry on. When the last one ends the cache is
dropped, so the next model node may set it up afresh (another share).

A model node that connects while sessions run is set up beside them when
there is room. A session whose model node has been silent for
``peer_timeout`` (hung, e.g. SIGSTOPped: its TCP connection stays up) gives
way to any model node that connects; when the worker is full the newcomer
gets a ``busy`` refusal naming the model nodes it serves. A healthy model
node is never silent that long: it sends a heartbeat (``status``) at least
every ``peer_timeout / protocol.HEARTBEATS_PER_SILENCE``.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from lamina_comm.channel import Channel, Message, RingLayout
from lamina_comm.engine import AttentionService, AttentionShape, LayerRequest
from lamina_comm.errors import ClosedError, LaminaError, PeerLostError, ProtocolError, TimeoutError_
from lamina_comm.model import KVCacheFull, LlamaConfig, PagedKVCache
from lamina_comm.node import protocol
from lamina_comm.node.kv_shares import KVShares
from lamina_comm.pipeline import serve_attention
from lamina_comm.transport import Context, Listener

log = logging.getLogger("lamina_comm.node.attention")

# Waits are sliced so stop requests, a lost peer and a knocking model node are noticed promptly.
_POLL_S = 0.5

# Bound on each wait for a model node that connects while a session runs (its
# setup request, its hang-up after a "busy" answer). The session is not served
# meanwhile, so this stays well below a model node's peer_timeout.
NEWCOMER_TIMEOUT_S = 2.0

# Bound on waiting for the credit of a session's reply slot (its layer outputs, its control replies). A
# model node that follows the protocol always has one free (it takes a reply before it sends what the
# next reply answers, and the credit rides on that), so a wait this long means it stopped reading; the
# one serving thread must not stall every other session for a whole peer_timeout on it.
REPLY_CREDIT_S = 2.0


class SessionStalled(Exception):
    """A session's model node took none of its replies within REPLY_CREDIT_S: the session ends."""


@dataclass(frozen=True)
class AttentionOptions:
    listen: str
    num_blocks: int = 2048
    block_size: int = 16
    device: str = "cpu"
    # Attention kernel (PagedKVCache attention=): auto, exact or sdpa (--attention-kernel).
    attention: str = "auto"
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
    # Model nodes served at once (--max-model-nodes); one more is refused "busy".
    max_model_nodes: int = 4
    # Bound on the memory one session's data channel may take (its rings, both
    # directions); a setup asking for more is refused "resources".
    max_channel_bytes: int = 1 << 30
    # Fault injection for tests: die abruptly after serving this many data messages.
    exit_after_messages: Optional[int] = None


class AttentionServer:
    """Listens on one address and serves every model node (replica) that shares this worker.

    One thread serves all sessions' data channels in arrival order
    (``AttentionService.recv``); a session that fails ends alone and frees
    its KV blocks, the others carry on.
    """

    def __init__(self, options: AttentionOptions):
        if options.num_blocks < 1 or options.block_size < 1:
            raise ValueError(f"--blocks and --block-size must be >= 1, got {options.num_blocks}, {options.block_size}")
        if options.max_model_nodes < 1:
            raise ValueError(f"--max-model-nodes must be >= 1, got {options.max_model_nodes}")
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
        self.sessions: list[AttentionSession] = []
        # The cache every session shares; made by the first setup, dropped with the last session
        # (so a later model node may bring another config or head share).
        self.shares: Optional[KVShares] = None
        self._shared_setup: Optional[protocol.Setup] = None
        # Serves the sessions' data channels (the engine API); made and dropped with the cache.
        self._service: Optional[AttentionService] = None
        self._by_peer: dict[int, AttentionSession] = {}  # the service's peer id -> its session
        self._next_session_id = 0
        self._next_knock_check = 0.0

    def serve_forever(self, stop: threading.Event) -> None:
        """Accept and serve sessions until ``stop`` is set."""
        try:
            while not stop.is_set():
                if not self.sessions:
                    newcomer = self._wait_for_newcomer(stop)
                    if newcomer is not None:
                        self._admit(newcomer)
                    continue
                serve_attention(self._next_message, self._serve, self._send_result,
                                lambda: stop.is_set() or not self.sessions)
        finally:
            for session in list(self.sessions):
                self._end(session, "the attention node stops")

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

    # -- admission ------------------------------------------------------------
    def _admit(self, newcomer: "Newcomer") -> None:
        """Set a model node up as one more session, or refuse it with a reason."""
        timeout = self.options.peer_timeout if not self.sessions else NEWCOMER_TIMEOUT_S
        if newcomer.request.get("type") != "setup":
            newcomer.refuse(protocol.error(f"expected setup first, got {newcomer.request.get('type')!r}", "state"),
                            timeout)
            return
        try:
            setup = protocol.Setup.parse(newcomer.request)
            if self.options.config is not None:
                protocol.check_same_config(self.options.config, setup.config)
            self._check_channel_size(setup)
            self._end_silent_sessions(newcomer)
            self._check_room(setup)
            if self.shares is None:
                service = _service_for(setup, self._on_control, self.options.peer_timeout)
                self.shares = KVShares(self._make_cache(setup))
                self._shared_setup, self._service = setup, service
        except protocol.ControlError as exc:
            log.error("setup of model node at %s refused: %s", _peer_of(newcomer.channel), exc)
            newcomer.refuse(protocol.error(str(exc), exc.code, **exc.details), timeout)
            return
        session = AttentionSession(self, self._next_session_id, newcomer, setup, self._unique_name(setup, newcomer))
        self._next_session_id += 1
        self.shares.add(session.id, session.name)
        cache = self.shares.cache
        log.info("worker %d/%d for %s: KV heads [%d, %d), %d blocks of %d tokens on %s, %d model node(s)",
                 setup.worker, setup.num_workers, session.name, *setup.kv_heads, cache.blocks_total,
                 cache.block_size, cache.device, self.shares.replicas)
        try:
            # The data channel comes to a listener of its own: on the shared one, another
            # model node's setup connection could be taken for it (and both would fail).
            with self.context.listen((self.address[0], 0)) as data_listener:
                newcomer.link.reply(newcomer.number, protocol.ok(
                    **session.cache_figures(), pid=os.getpid(), device=str(cache.device),
                    attention=cache.attention,
                    kv_heads=list(setup.kv_heads), takeover_after_s=self.options.peer_timeout,
                    replica=session.name, data_port=data_listener.address[1]))
                session.attach(self.accept_data(data_listener, setup.data_spec, timeout))
            assert self._service is not None
            session.peer = self._service.attach(session.data)
        except (LaminaError, MemoryError) as exc:
            log.warning("model node %s left during its setup: %r", session.name, exc)
            self._end(session, exc)  # frees what shares.add took; it was never in self.sessions
            return
        self._by_peer[session.peer] = session
        self.sessions.append(session)

    def _make_cache(self, setup: protocol.Setup) -> PagedKVCache:
        """The shared cache for the first session's head share; ControlError("resources") when it cannot be."""
        config, (start, end) = setup.config, setup.kv_heads
        pool_bytes = (2 * config.num_layers * self.options.num_blocks * self.options.block_size * (end - start)
                      * config.head_dim * config.torch_dtype.itemsize)
        if str(self.options.device) == "cpu" and pool_bytes > 0.9 * _physical_memory():
            raise protocol.ControlError(
                f"cannot create the KV cache: {pool_bytes} B of K/V pools for this model and head share "
                f"exceed this machine's memory", "resources")
        try:
            return PagedKVCache(config, start, end, self.options.num_blocks, self.options.block_size,
                                self.options.device, attention=self.options.attention)
        except (RuntimeError, ValueError, MemoryError) as exc:  # e.g. the pools do not fit device memory
            raise protocol.ControlError(f"cannot create the KV cache: {exc}", "resources") from exc

    def _check_channel_size(self, setup: protocol.Setup) -> None:
        needed = RingLayout.for_role(setup.data_spec, "attention").total_bytes
        if needed > self.options.max_channel_bytes:
            raise protocol.ControlError(
                f"a data channel for {setup.data_spec.max_tokens} tokens per micro-batch and "
                f"{setup.data_spec.microbatches} micro-batches needs {needed} B, over this worker's bound of "
                f"{self.options.max_channel_bytes} B (lower --max-step-tokens)", "resources")

    def _unique_name(self, setup: protocol.Setup, newcomer: "Newcomer") -> str:
        name = setup.replica or _peer_of(newcomer.channel)
        taken = {session.name for session in self.sessions}
        return name if name not in taken else f"{name}#{self._next_session_id}"

    def _end_silent_sessions(self, newcomer: "Newcomer") -> None:
        """Sessions silent past peer_timeout (a hung model node) give way to any model node that connects.

        A session with arrivals not yet served is not silent: the serving
        thread was busy (another session's work), not its model node.
        """
        now = time.monotonic()
        for session in list(self.sessions):
            silent = now - session.last_heard
            if silent >= self.options.peer_timeout and not session.has_arrivals():
                log.warning("model node %s was silent for %.1f s; model node at %s takes over", session.name,
                            silent, _peer_of(newcomer.channel))
                self._end(session, f"silent for {silent:.1f} s")

    def _check_room(self, setup: protocol.Setup) -> None:
        """ControlError when the newcomer cannot share this worker now."""
        shared = self._shared_setup
        if self.sessions and shared is not None and (
                shared.config.fingerprint() != setup.config.fingerprint() or shared.kv_heads != setup.kv_heads):
            raise protocol.ControlError(
                f"this worker holds KV heads [{shared.kv_heads[0]}, {shared.kv_heads[1]}) of model "
                f"{shared.config.fingerprint()[:12]} for {self._names()}; a model node asking for KV heads "
                f"[{setup.kv_heads[0]}, {setup.kv_heads[1]}) of model {setup.config.fingerprint()[:12]} cannot "
                f"share it (list the workers in the same order on every model node)", "conflict")
        if len(self.sessions) < self.options.max_model_nodes:
            return
        now = time.monotonic()
        heard = ", ".join(f"{s.name}, last heard from {now - s.last_heard:.1f} s ago" for s in self.sessions)
        who = "another model node" if len(self.sessions) == 1 else f"{len(self.sessions)} model nodes"
        retry = min(self.options.peer_timeout - (now - s.last_heard) for s in self.sessions)
        raise protocol.ControlError(
            f"busy with {who} (at {heard}; at most {self.options.max_model_nodes} share this worker, "
            f"--max-model-nodes); a model node silent for {self.options.peer_timeout} s gives way to the next "
            f"one that connects", "busy", retry_after_s=round(max(retry, 0.0), 3))

    def _names(self) -> str:
        return ", ".join(session.name for session in self.sessions)

    def _answer_knocks(self) -> None:
        """A model node connecting while sessions run is set up beside them, or refused."""
        now = time.monotonic()
        if now < self._next_knock_check:
            return
        self._next_knock_check = now + _POLL_S
        if not self.knocking():
            return
        newcomer = self.greet(NEWCOMER_TIMEOUT_S)
        if newcomer is not None:
            self._admit(newcomer)

    # -- serving ----------------------------------------------------------------
    def _next_message(self) -> Optional[tuple[int, int, Any]]:
        """The next layer request, as (layer, micro-batch, (session, request)); control requests are
        answered on the way (``_on_control``)."""
        self._answer_knocks()
        if self._service is None or not self.sessions:
            return None
        try:
            request = self._service.recv(timeout=_POLL_S)
        except LaminaError as exc:
            peer = getattr(exc, "peer", None)
            if peer is None:
                if isinstance(exc, (TimeoutError_, ClosedError)):
                    return None  # a quiet spell, or no session left to serve
                raise
            session = self._by_peer.get(peer)
            if session is not None:
                self._end(session, exc)  # its channel failed, or it sent what cannot be served
            return None
        session = self._by_peer[request.peer]
        session.last_heard = time.monotonic()
        return request.layer, request.microbatch, (session, request)

    def _on_control(self, peer: int, fragment: Message) -> None:
        """A control fragment of session ``peer``, in arrival order; the request it completes is answered."""
        session = self._by_peer[peer]
        session.last_heard = time.monotonic()
        try:
            session.handle_control(fragment)
        except LaminaError:
            raise  # e.g. fragments out of step: the service names the peer, _next_message ends the session
        except Exception as exc:  # noqa: BLE001 - one session's request must not end the others
            log.exception("serving a control request of model node %s failed", session.name)
            raise ProtocolError(f"control request failed: {exc!r}") from exc

    def _serve(self, layer: int, microbatch: int, payload: tuple["AttentionSession", LayerRequest]) -> Any:
        session, request = payload
        try:
            return session, request, session.attend(request)
        except SessionStalled as exc:
            log.warning("%s", exc)
            request.release()
            self._end(session, exc)
        except Exception as exc:  # noqa: BLE001 - one session's request must not end the others
            log.exception("serving model node %s failed", session.name)
            request.release()
            self._end(session, exc)
        return session, request, None

    def _send_result(self, layer: int, microbatch: int, result: tuple["AttentionSession", LayerRequest, Any]) -> None:
        session, request, answer = result
        if answer is None or session not in self.sessions:
            return  # a session that ended serving it
        try:
            session.send_result(request, answer)
        except Exception as exc:  # noqa: BLE001 - a failed answer ends its own session only
            self._end(session, exc)

    def _end(self, session: "AttentionSession", reason: Any) -> None:
        """End one session: free its KV blocks, close its channels; the others go on."""
        if session in self.sessions:
            self.sessions.remove(session)
        if session.peer is not None and self._by_peer.pop(session.peer, None) is session:
            assert self._service is not None
            self._service.detach(session.peer)
        freed = self.shares.remove(session.id) if self.shares is not None else 0
        session.close()
        self.sessions_served += 1
        if isinstance(reason, PeerLostError):
            log.info("model node %s disconnected; session ended, %d KV blocks freed", session.name, freed)
        else:
            log.warning("session with model node %s ended (%d KV blocks freed): %s", session.name, freed, reason)
        if not self.sessions:
            self.shares, self._shared_setup, self._service = None, None, None

    def count_served(self) -> None:
        """Called per served data message; implements the fault-injection exit."""
        self._messages_served += 1
        limit = self.options.exit_after_messages
        if limit is not None and self._messages_served >= limit:
            log.error("fault injection: exiting after %d data messages", self._messages_served)
            os._exit(3)

    def accept_data(self, listener: Listener, spec: Any, timeout: float) -> Channel:
        # Credits ride on the replies (and are written out whenever this side waits).
        return Channel.accept(listener, spec, role="attention", name="data", accept_timeout=timeout,
                              timeout=self.options.peer_timeout, piggyback_credits=True)

    def replicas(self) -> list[dict[str, Any]]:
        """Every model node sharing this worker, with the KV blocks it holds."""
        if self.shares is None:
            return []
        now = time.monotonic()
        return [{"name": session.name, "blocks_held": self.shares.held(session.id),
                 "requests": self.shares.requests(session.id), "last_heard_s": round(now - session.last_heard, 3)}
                for session in self.sessions]

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


class AttentionSession:
    """One model node's use of this worker: its setup, data channel and requests in the shared cache.

    Control requests arrive on the data channel's control micro-batch, so they
    are served in the same arrival order as the attention work (the server's
    ``AttentionService`` hands their fragments to ``handle_control``).
    """

    def __init__(self, server: AttentionServer, session_id: int, newcomer: Newcomer, setup: protocol.Setup,
                 name: str):
        self.server = server
        self.id = session_id
        self.options = server.options
        self.setup = setup
        self.setup_channel = newcomer.channel
        self.name = name
        self.data: Optional[Channel] = None
        self.peer: Optional[int] = None  # its data channel's peer id in the server's AttentionService
        self._control: Optional[protocol.ControlLink] = None
        # Control fragments are taken as they come: a model node that sends half a
        # message and stops holds up nobody (the serving thread never waits for it).
        self._fragments = protocol.FragmentAssembler()
        # Per micro-batch: the step metadata's request ids (the service's array, so a new step is
        # told by identity), their cache keys and positions.
        self._step: dict[int, tuple[Any, list[Any], torch.Tensor]] = {}
        self.last_heard = time.monotonic()  # when the model node last sent anything

    @property
    def shares(self) -> KVShares:
        assert self.server.shares is not None
        return self.server.shares

    @property
    def _reply_credit_s(self) -> float:
        return min(self.options.peer_timeout, REPLY_CREDIT_S)

    def attach(self, data: Channel) -> None:
        """The session's data channel, accepted after its setup was answered."""
        self.data = data
        # Replies wait at most REPLY_CREDIT_S for their slot: a timeout ends this session (the service
        # names it), not everyone's progress.
        self._control = protocol.ControlLink(data, self._reply_credit_s, protocol.control_microbatch(data.spec))
        self.last_heard = time.monotonic()

    def has_arrivals(self) -> bool:
        """Messages of this session wait to be served (so its model node is not silent)."""
        try:
            return self.data is not None and self.data.pending() > 0
        except LaminaError:
            return False

    # -- control ------------------------------------------------------------
    def handle_control(self, fragment: Message) -> None:
        """Take one control fragment (released here); answer the request it completes."""
        number = fragment.layer
        answer = self._control_answer(fragment)
        if answer is not None:
            assert self._control is not None
            self._control.reply(number, answer)

    def _control_answer(self, fragment: Message) -> Optional[dict[str, Any]]:
        """The answer to the control request that ``fragment`` completes (None until one does).

        A malformed or oversized request gets an error answer; fragments that
        do not continue the request (ProtocolError) end the session.
        """
        try:
            whole = self._fragments.feed(fragment)
            if whole is None:
                return None
            request = protocol.decode_control_request(whole[1])
        except protocol.ControlError as exc:
            log.warning("refused a control request of %s: %s", self.name, exc)
            return protocol.error(str(exc), exc.code)
        kind = request.get("type")
        handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "reserve": self._reserve,
            "rebuild": self._rebuild,
            "free": self._free,
            "status": lambda _: protocol.ok(**self.cache_figures()),
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
        reserved: list[int] = []
        refused: list[list[Any]] = []
        for request_id, max_tokens in protocol.parse_reservations(message):
            if keep_existing and self.shares.has(self.id, request_id):
                reserved.append(request_id)
                continue
            try:
                self.shares.reserve(self.id, request_id, max_tokens)
                reserved.append(request_id)
            except (KVCacheFull, ValueError) as exc:
                refused.append([request_id, f"attention worker {self.setup.worker}: {exc}"])
        return protocol.ok(reserved=reserved, refused=refused, **self.cache_figures())

    def _rebuild(self, message: dict[str, Any]) -> dict[str, Any]:
        # Requests this worker still holds keep their blocks: the re-prefill
        # rewrites their positions from 0. A replacement worker reserves anew.
        return self._reserve(message, keep_existing=True)

    def _free(self, message: dict[str, Any]) -> dict[str, Any]:
        for request_id in protocol.parse_request_ids(message):
            self.shares.free(self.id, request_id)
        return protocol.ok(**self.cache_figures())

    def cache_figures(self) -> dict[str, Any]:
        """The shared cache's figures, this replica's part of it, and every replica (on every answer)."""
        cache = self.shares.cache
        return {"blocks_used": cache.blocks_used, "blocks_total": cache.blocks_total,
                "block_size": cache.block_size, "blocks_held": self.shares.held(self.id),
                "blocks_share": self.shares.share, "replicas": self.server.replicas()}

    # -- attention ------------------------------------------------------------
    def attend(self, request: LayerRequest) -> Any:
        """The attention output and its compute time, or the error text when the request cannot be served.

        On a CPU cache the output is computed straight into the reply slot
        (``request.output()``: no copy to send it); on a device the request's
        q/k/v are copied in on the compute stream (``request.to_device``).
        """
        cache = self.shares.cache
        try:
            if request.request_ids is None:
                raise ValueError(f"message for layer {request.layer} micro-batch {request.microbatch} has no "
                                 f"step metadata")
            keys, positions = self._step_inputs(request)
            if cache.device.type == "cpu":
                q, k, v = request.q, request.k, request.v
                try:
                    out = request.output(timeout=self._reply_credit_s)
                except TimeoutError_ as exc:
                    raise SessionStalled(f"model node {self.name} took no reply of micro-batch {request.microbatch} "
                                         f"within {self._reply_credit_s} s: session ended") from exc
            else:
                q, k, v = (torch.empty_like(t, device=cache.device) for t in (request.q, request.k, request.v))
                request.to_device(q, k, v)
                out = None
            started = time.perf_counter_ns()
            out = cache.attend(request.layer, keys, positions, q, k, v, out=out)
        except (ValueError, KeyError, LaminaError) as exc:
            log.error("cannot serve layer %d micro-batch %d of %s: %s", request.layer, request.microbatch, self.name,
                      exc)
            return str(exc)
        self.server.count_served()
        return out, time.perf_counter_ns() - started

    def _step_inputs(self, request: LayerRequest) -> tuple[list[Any], torch.Tensor]:
        """The cache keys and positions of the request's step (worked out once per step and micro-batch)."""
        known = self._step.get(request.microbatch)
        if known is None or known[0] is not request.request_ids:
            keys = [self.shares.key(self.id, r) for r in request.request_ids.tolist()]
            known = self._step[request.microbatch] = (request.request_ids, keys, torch.from_numpy(request.positions))
        return known[1], known[2]

    def send_result(self, request: LayerRequest, result: Any) -> None:
        if isinstance(result, str):
            request.fail(result, timeout=self._reply_credit_s)
            return
        out, attention_ns = result
        # A CPU cache computed into the reply slot; a device output goes stream-ordered.
        request.respond(None if self.shares.cache.device.type == "cpu" else out, timeout=self._reply_credit_s,
                        compute_ns=attention_ns)

    # -- life cycle ---------------------------------------------------------
    def close(self) -> None:
        for channel in (self.data, self.setup_channel):
            if channel is not None:
                channel.close()


def _service_for(setup: protocol.Setup, on_control: Any, timeout: float) -> AttentionService:
    """The engine API's attention tier for the sessions sharing ``setup``'s head share."""
    config, spec = setup.config, setup.data_spec
    try:
        shape = AttentionShape(config.num_heads, config.num_kv_heads, config.head_dim, spec.max_tokens,
                               config.dtype, protocol.pipeline_microbatches(spec))
        return AttentionService(None, shape, setup.worker, setup.num_workers, listen=None, timeout=timeout,
                                on_control=on_control, kv_heads=setup.kv_heads, report_compute_time=True)
    except ValueError as exc:
        raise protocol.ControlError(f"cannot serve this setup: {exc}", "bad_request") from exc


def _peer_of(channel: Channel) -> str:
    address = channel.endpoint.peer_address
    return f"{address[0]}:{address[1]}" if address else "model node"


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62  # unknown: let the allocation decide
