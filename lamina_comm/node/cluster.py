"""The model node's attention workers: connections, head shares, reservations, losses and replacements.

``AttentionPeer`` is the connection to one worker (a setup channel and a data
channel whose last micro-batch carries control requests); ``AttentionCluster``
holds them all, connects them at start-up (waiting out a busy worker),
reserves and frees KV blocks on every worker, and replaces a lost worker
with a spare or its own address coming back. The layers go over the public
engine API: ``AttentionCluster.remote()`` is a ``RemoteAttention`` over the
live workers' data channels.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional, Sequence

from lamina_comm.channel import Channel, ChannelSpec
from lamina_comm.engine import AttentionShape, RemoteAttention
from lamina_comm.errors import LaminaError, PeerLostError, TimeoutError_
from lamina_comm.model import HeadRange, LlamaConfig, split_kv_heads
from lamina_comm.node import protocol
from lamina_comm.node.options import ModelNodeOptions
from lamina_comm.transport import Context

# The model role's logger (also ModelNode's).
log = logging.getLogger("lamina_comm.node.model")

# How long one attempt to reach a replacement worker may take; recovery keeps
# trying until ModelNodeOptions.rebuild_timeout.
_REPLACE_ATTEMPT_S = 0.5

# At start-up, a worker that answers "busy" (it serves another model node) is
# asked again this often until connect_timeout: a hung model node gives way
# after the worker's takeover bound.
BUSY_RETRY_S = 0.5

# Spares that may stand by at once (joins past it are refused).
MAX_SPARES = 64


class WorkerLost(LaminaError):
    """An attention worker stopped answering: its channel failed or timed out."""

    def __init__(self, index: int, address: str, cause: BaseException):
        super().__init__(f"attention worker {index} at {address} lost: {cause}")
        self.index = index
        self.address = address
        self.cause = cause


class AttentionStepError(LaminaError):
    """An attention worker could not serve a message (it answered with an error)."""


class StartupError(LaminaError):
    """The cluster could not be assembled, for a reason without a more specific error type."""


def _naming_worker(exc: BaseException, worker: str) -> BaseException:
    """The same kind of error (AuthenticationError, TimeoutError, ...) with the worker named."""
    message = f"{worker}: {exc}"
    if isinstance(exc, protocol.ControlError):
        return protocol.ControlError(message, exc.code)
    if isinstance(exc, LaminaError):
        try:
            return type(exc)(message)
        except TypeError:
            pass
    return StartupError(message)


class AttentionPeer:
    """The model node's connection to one attention worker.

    The data channel carries the pipeline's micro-batches and, on its last
    micro-batch, control requests; the setup channel stays open, idle, for
    the life of the connection.
    """

    def __init__(self, index: int, address: str, kv_heads: HeadRange, group_size: int,
                 setup_channel: Channel, data: Channel, setup_reply: dict[str, Any], peer_timeout: float):
        self.index = index
        self.address = address
        self.kv_heads = kv_heads
        self.q_heads = (kv_heads[0] * group_size, kv_heads[1] * group_size)
        self.setup_channel = setup_channel
        self.data = data
        self.control = protocol.ControlLink(data, peer_timeout, protocol.control_microbatch(data.spec))
        self.pid = setup_reply.get("pid")
        self.device = setup_reply.get("device")
        self.attention = setup_reply.get("attention")  # the worker's attention kernel (exact / sdpa)
        self.blocks_used = int(setup_reply["blocks_used"])
        self.blocks_held = 0  # of blocks_used, this model node's (the worker may serve other replicas)
        self.replicas: list[dict[str, Any]] = []  # the worker's model nodes, from its last status answer
        self.blocks_total = int(setup_reply["blocks_total"])
        self.block_size = int(setup_reply["block_size"])
        # The worker lets a new model node take over after this long without a message from us.
        takeover_after = setup_reply.get("takeover_after_s")
        self.takeover_after_s = float(takeover_after) if isinstance(takeover_after, (int, float)) else None

    def heartbeat_interval(self, idle_probe_s: float) -> float:
        """Longest pause between two messages to this worker: well inside its takeover bound."""
        if not self.takeover_after_s or self.takeover_after_s <= 0:
            return idle_probe_s
        return min(idle_probe_s, self.takeover_after_s / protocol.HEARTBEATS_PER_SILENCE)

    @classmethod
    def connect(cls, context: Context, index: int, address: str, config: LlamaConfig, num_workers: int,
                kv_heads: HeadRange, spec: ChannelSpec, connect_timeout: float,
                peer_timeout: float, replica: Optional[str] = None) -> "AttentionPeer":
        """Connect, set the worker up and connect its data channel; raises on any failure."""
        setup_channel = Channel.connect(context, address, protocol.CONTROL_SPEC, role="model",
                                        name=f"setup-{index}", connect_timeout=connect_timeout,
                                        timeout=peer_timeout)
        try:
            setup = protocol.ControlLink(setup_channel, peer_timeout)
            reply = setup.call(protocol.setup_message(config, index, num_workers, kv_heads, spec, replica))
            # Credits ride on the next layer's q/k/v (and are written out whenever this side waits).
            data = Channel.connect(context, protocol.data_address(address, reply), spec, role="model",
                                   name=f"data-{index}", connect_timeout=connect_timeout, timeout=peer_timeout,
                                   piggyback_credits=True)
        except BaseException:
            setup_channel.close()
            raise
        return cls(index, address, kv_heads, config.group_size, setup_channel, data, reply, peer_timeout)

    # -- control ----------------------------------------------------------
    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = self.control.call(message)
        except protocol.ControlError:
            raise
        except LaminaError as exc:
            raise WorkerLost(self.index, self.address, exc) from exc
        self.blocks_used = int(reply.get("blocks_used", self.blocks_used))
        self.blocks_held = int(reply.get("blocks_held", self.blocks_held))
        if isinstance(reply.get("replicas"), list):
            self.replicas = [entry for entry in reply["replicas"][:64] if isinstance(entry, dict)]
        return reply

    def close(self) -> None:
        for channel in (self.data, self.setup_channel):
            try:
                channel.close()
            except LaminaError:
                pass


class AttentionCluster:
    """The attention workers of one model node, their head shares, spares and losses."""

    def __init__(self, context: Context, config: LlamaConfig, options: ModelNodeOptions):
        self.context = context
        self.config = config
        self.options = options
        self.addresses = list(options.attention)
        self.head_ranges = split_kv_heads(config.num_kv_heads, len(self.addresses))
        self.shape = AttentionShape(config.num_heads, config.num_kv_heads, config.head_dim,
                                    options.max_step_tokens, config.dtype, options.microbatches)
        # The engine API over the live workers (remote()), and the peers it was made over.
        self._remote: Optional[RemoteAttention] = None
        self._remote_peers: list[AttentionPeer] = []
        self.spares = list(options.spares)
        # Membership changes come from other threads (the front door's /cluster calls);
        # the scheduler thread applies departures of active workers (take_departures).
        self._membership = threading.Lock()
        self._departing: set[str] = set()  # addresses of active workers that announced they leave
        # Active workers that left: not tried again as their own replacement (unless they join anew).
        self.departed: set[str] = set()
        self.peers: list[Optional[AttentionPeer]] = [None] * len(self.addresses)
        self.lost: dict[int, WorkerLost] = {}
        # Start of the current degraded period: set at the first loss, kept through
        # reconnects and cleared only by confirm_recovered() (a step, an admission
        # or a probe that worked), so a worker that flaps stays degraded.
        self.lost_since: Optional[float] = None
        self.losses_since = 0  # workers lost in the current degraded period
        self.last_loss: Optional[WorkerLost] = None

    def data_spec(self, index: int) -> ChannelSpec:
        return protocol.data_channel_spec(self.config, self.head_ranges[index], self.options.microbatches,
                                          self.options.max_step_tokens)

    # -- membership -------------------------------------------------------
    def connect_all(self) -> None:
        """Connect and set up every worker; the error of the first that fails names it."""
        for index, address in enumerate(self.addresses):
            try:
                self.peers[index] = self._connect_waiting_out_busy(index, address)
            except (LaminaError, OSError) as exc:
                self.close()
                raise _naming_worker(exc, f"attention worker {index} at {address}") from exc

    def _connect_waiting_out_busy(self, index: int, address: str) -> AttentionPeer:
        """Connect within connect_timeout, asking again while the worker is busy with another model node."""
        deadline = time.monotonic() + self.options.connect_timeout
        busy: Optional[protocol.ControlError] = None
        while True:
            try:
                return self._connect(index, address, max(deadline - time.monotonic(), _REPLACE_ATTEMPT_S))
            except TimeoutError_ as exc:
                # A busy worker answers a knock only between its own waits, so the
                # last try may run out of time: the cause is still that it is busy.
                if busy is not None:
                    raise busy from exc
                raise
            except protocol.ControlError as exc:
                if exc.code != "busy" or time.monotonic() + BUSY_RETRY_S > deadline:
                    raise
                busy = exc
                log.info("attention worker %d at %s: %s; asking again", index, address, exc)
                time.sleep(BUSY_RETRY_S)

    def _connect(self, index: int, address: str, timeout: float) -> AttentionPeer:
        peer = AttentionPeer.connect(self.context, index, address, self.config, len(self.addresses),
                                     self.head_ranges[index], self.data_spec(index), timeout,
                                     self.options.peer_timeout, self.options.name)
        log.info("attention worker %d at %s (pid %s): KV heads [%d, %d), %d KV blocks", index, address,
                 peer.pid, *peer.kv_heads, peer.blocks_total)
        return peer

    @property
    def healthy(self) -> bool:
        return not self.lost and all(peer is not None for peer in self.peers)

    @property
    def live(self) -> list[AttentionPeer]:
        return [peer for peer in self.peers if peer is not None]

    def mark_lost(self, lost: WorkerLost) -> None:
        peer = self.peers[lost.index]
        if peer is not None:
            peer.close()
        self.peers[lost.index] = None
        self.lost[lost.index] = lost
        self.last_loss = lost
        self.losses_since += 1
        if self.lost_since is None:
            self.lost_since = time.monotonic()

    def confirm_recovered(self) -> None:
        """The workers just served something: a degraded period (if any) is over."""
        if self.healthy:
            self.lost_since = None
            self.losses_since = 0

    def try_replace(self, index: int) -> bool:
        """Connect a replacement for a lost worker: a spare, else its own address again (unless it left)."""
        original = self.addresses[index]
        with self._membership:
            candidates = [*self.spares] + ([] if original in self.departed else [original])
        for candidate in candidates:
            try:
                peer = self._connect(index, candidate, _REPLACE_ATTEMPT_S)
            except Exception as exc:  # noqa: BLE001 - any candidate that fails is skipped, the next is tried
                log.debug("replacement %s for worker %d not available: %r", candidate, index, exc)
                continue
            self.peers[index] = peer
            del self.lost[index]
            if candidate != original:
                with self._membership:
                    if candidate in self.spares:
                        self.spares.remove(candidate)
                    self.addresses[index] = candidate
                    if original not in self.departed and original not in self.spares \
                            and len(self.spares) < MAX_SPARES:
                        self.spares.append(original)  # if it comes back, it can serve as a spare
                    self.departed.discard(original)  # out of every list now: nothing to remember
            log.warning("attention worker %d replaced by %s", index, candidate)
            return True
        return False

    # -- run-time membership (any thread) ---------------------------------------
    def join(self, address: str) -> str:
        """A worker announcing itself at ``address``: it stands by as a spare. Says what became of it."""
        with self._membership:
            self.departed.discard(address)
            if address in self.addresses:
                return "worker"  # e.g. a lost worker back on its own address: the next retry finds it
            if address in self.spares:
                return "spare"
            if len(self.spares) >= MAX_SPARES:
                raise ValueError(f"{MAX_SPARES} spares already stand by; {address} was not added")
            self.spares.append(address)
        log.info("attention worker at %s joined as a spare", address)
        return "spare"

    def leave(self, address: str) -> str:
        """A worker leaving: a spare is forgotten, an active worker is taken out and its requests rebuilt."""
        with self._membership:
            if address in self.spares:
                self.spares.remove(address)
                log.info("spare attention worker at %s left", address)
                return "spare"
            if address in self.addresses:
                self._departing.add(address)
                self.departed.add(address)
                return "worker"
        raise KeyError(f"{address} is neither a worker nor a spare of this model node")

    def take_departures(self) -> list[WorkerLost]:
        """Active workers that announced they leave (scheduler thread): each to be handled as a loss."""
        with self._membership:
            departing, self._departing = self._departing, set()
            # By address: a slot already given to a replacement is not the one that left.
            indices = [index for index, address in enumerate(self.addresses) if address in departing]
        return [WorkerLost(index, self.addresses[index], PeerLostError("the worker left the cluster"))
                for index in indices if self.peers[index] is not None]

    def remote(self) -> RemoteAttention:
        """``RemoteAttention`` over the live workers' data channels, rank i = ``live[i]`` (made anew when
        they change; the channels stay the peers')."""
        peers = self.live
        if self._remote is None or len(peers) != len(self._remote_peers) or \
                any(a is not b for a, b in zip(peers, self._remote_peers)):
            self._remote = RemoteAttention.over([peer.data for peer in peers], self.shape,
                                                [peer.kv_heads for peer in peers])
            self._remote_peers = peers
        return self._remote

    def drain_survivors(self) -> None:
        """Take the replies still in flight from the survivors after an aborted step; a failing one is lost too."""
        remote = self._remote
        if remote is None:
            return
        for rank, peer in enumerate(self._remote_peers):
            if self.peers[peer.index] is not peer or not remote.in_flight(rank):
                continue  # lost (its channel is closed) or nothing to take
            try:
                remote.drain(rank)
            except LaminaError as exc:
                lost = WorkerLost(peer.index, peer.address, exc)
                log.error("%s", lost)
                self.mark_lost(lost)

    # -- reservations -------------------------------------------------------
    def reserve(self, reservations: Sequence[tuple[int, int]], kind: str = "reserve") -> dict[int, str]:
        """Reserve on every worker; returns {request id: reason} of the refused ones.

        A request refused by any worker is released on the others. ``kind`` =
        "rebuild" keeps reservations a worker already holds (survivors).
        """
        refused: dict[int, str] = {}
        asked: list[AttentionPeer] = []
        try:
            for peer in self.live:
                asked.append(peer)
                for chunk in _chunks(reservations):
                    reply = peer.call({"type": kind, "requests": protocol.reservation_list(chunk)})
                    for request_id, reason in reply.get("refused", []):
                        refused.setdefault(int(request_id), str(reason))
        except WorkerLost:
            if kind == "reserve":  # the whole batch is retried after recovery
                self._free_quietly(asked, [request_id for request_id, _ in reservations])
            raise
        except protocol.ControlError as exc:
            # The worker is fine but refused the message: the batch fails, nobody reconnects.
            log.error("attention worker %d at %s refused %s: %s", peer.index, peer.address, kind, exc)
            self._free_quietly(asked, [request_id for request_id, _ in reservations])
            reason = f"attention worker {peer.index} at {peer.address} refused the {kind}: {exc}"
            return {int(request_id): reason for request_id, _ in reservations}
        if refused:
            self.free(list(refused))
        return refused

    def free(self, request_ids: Sequence[int]) -> None:
        """Release on every live worker (all are tried); raises the first loss afterwards."""
        first_loss: Optional[WorkerLost] = None
        for peer in self.live:
            try:
                self._free_on(peer, request_ids)
            except WorkerLost as exc:
                first_loss = first_loss or exc
        if first_loss is not None:
            raise first_loss

    def _free_quietly(self, peers: Sequence[AttentionPeer], request_ids: Sequence[int]) -> None:
        for peer in peers:
            try:
                self._free_on(peer, request_ids)
            except WorkerLost as exc:
                log.warning("while releasing reservations: %s", exc)

    @staticmethod
    def _free_on(peer: AttentionPeer, request_ids: Sequence[int]) -> None:
        """Release on one worker; a refusal is logged (the worker is fine), a loss raised."""
        for chunk in _chunks(request_ids):
            try:
                peer.call({"type": "free", "requests": [int(r) for r in chunk]})
            except protocol.ControlError as exc:
                log.error("attention worker %d at %s refused to free %d requests: %s", peer.index, peer.address,
                          len(chunk), exc)

    def close(self) -> None:
        for peer in self.live:
            peer.close()
        self.peers = [None] * len(self.peers)
        self._remote, self._remote_peers = None, []


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    """Lists cut to what one control message holds."""
    size = protocol.CONTROL_BATCH
    return [items[start:start + size] for start in range(0, len(items), size)]
