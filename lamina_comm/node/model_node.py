"""Model role: all weights, the ping-pong pipeline, continuous batching and fault recovery.

The model node holds the model tier (``ModelTier``) and drives the attention
workers over activation channels (see ``protocol``). One scheduler thread
owns every channel; HTTP threads only enqueue requests and read events.

Per step the running requests are split into up to ``microbatches`` micro-
batches (a new request contributes its whole prompt as one multi-token entry,
a running one its last token) and ``pipeline.run_step`` interleaves them
layer by layer: while one micro-batch's q/k/v are at the attention workers,
the model tier computes the other. Every micro-batch runs exactly the
functions ``ModelTier.forward_step`` runs, on the same ``StepInputs``, so its
logits equal ``MonolithicModel.step`` on the same batch.

A step is atomic from the requests' point of view: tokens are sampled only
after every micro-batch finished. When an attention worker is lost mid-step,
no request has advanced; all running requests are held, a replacement is
connected (a spare, or the lost address coming back), and each held request
is re-prefilled from its prompt plus the tokens generated so far, then
continues as if nothing happened. Requests that cannot be continued get an
error event; none is dropped silently.
"""
from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from lamina_comm.channel import Channel, ChannelSpec, Message
from lamina_comm.errors import LaminaError, ProtocolError, TimeoutError_
from lamina_comm.node import protocol
from lamina_comm.node.kvcache import HeadRange, slice_heads, split_kv_heads
from lamina_comm.node.metrics import NodeMetrics
from lamina_comm.node.model import HeadOutputs, LlamaConfig, LlamaWeights, ModelTier, StepInputs
from lamina_comm.node.sampling import SamplingError, SamplingParams, make_generator, sample_each
from lamina_comm.pipeline import run_step
from lamina_comm.timeline import Timeline
from lamina_comm.transport import Context

log = logging.getLogger("lamina_comm.node.model")

# How long one attempt to reach a replacement worker may take; recovery keeps
# trying until ModelNodeOptions.rebuild_timeout.
_REPLACE_ATTEMPT_S = 0.5

# At start-up, a worker that answers "busy" (it serves another model node) is
# asked again this often until connect_timeout: a hung model node gives way
# after the worker's takeover bound.
BUSY_RETRY_S = 0.5

# How often a waiting caller re-checks whether its client is still there
# (RequestHandle.result(abandoned=...)): the most a gone client costs is
# this long of generation.
ABANDON_CHECK_S = 0.25

# Status of a request whose client went away before the answer (nginx's 499);
# only logs and metrics see it, the client is gone.
CLIENT_CLOSED = 499

# step_observer(step number, micro-batch, entries (request id, tokens, start), logits): for tests and tracing.
StepObserver = Callable[[int, int, list[tuple[int, list[int], int]], torch.Tensor], None]


# ============================================================== errors


class RequestRejected(LaminaError):
    """A request that is refused or failed; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.http_status = status


class InvalidRequest(RequestRejected, ValueError):
    def __init__(self, message: str):
        super().__init__(400, message)


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


# ============================================================== options


@dataclass(frozen=True)
class ModelNodeOptions:
    attention: tuple[str, ...]
    spares: tuple[str, ...] = ()
    microbatches: int = 2
    # Token budget of one micro-batch (channel slots are sized for it); longer
    # prompts are prefilled in chunks.
    max_step_tokens: int = 2048
    max_queue: int = 256
    device: str = "cpu"
    secret: Optional[str] = None
    transport: str = "auto"
    # "event" or "poll" (Context(progress=...)); None: $LAMINA_PROGRESS, else event.
    progress: Optional[str] = None
    connect_timeout: float = 10.0
    # Bound on every wait for an attention worker (a reply, a slot credit).
    peer_timeout: float = 10.0
    # How long held requests wait for a replacement worker before they fail.
    rebuild_timeout: float = 30.0
    # An idle (or recovering) node sends its workers a status heartbeat this
    # often, or at a third of a worker's takeover bound if that is shorter, so a
    # worker that dies while nothing runs is noticed within this plus
    # peer_timeout, and no worker takes this node for a hung one.
    idle_probe_s: float = 2.0
    # /healthz turns 503 when the scheduler has work but has completed no step
    # and settled no request for this long (a hung or failing scheduler loop).
    stall_timeout: float = 60.0
    record_timeline: bool = True

    def validate(self, config: LlamaConfig) -> None:
        if not self.attention:
            raise ValueError("at least one attention worker address is needed (--attention HOST:PORT,...)")
        split_kv_heads(config.num_kv_heads, len(self.attention))  # raises a clear ValueError
        for name in ("microbatches", "max_step_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("connect_timeout", "peer_timeout", "rebuild_timeout", "idle_probe_s", "stall_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


# ============================================================== requests


class RequestHandle:
    """The caller's side of a request: a stream of events, then a result.

    Events are dicts: ``{"event": "admitted"}``, ``{"event": "token", "token": t}``,
    ``{"event": "finished", "finish_reason": "length"|"stop"|"cancelled"}``,
    ``{"event": "error", "status": http_status, "error": text}``.
    """

    def __init__(self, request_id: int, prompt_tokens: int):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self.submitted_at = time.monotonic()

    def next_event(self, timeout: Optional[float] = None) -> Optional[dict[str, Any]]:
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def result(self, timeout: float, abandoned: Optional[Callable[[], bool]] = None,
               check_every: float = ABANDON_CHECK_S) -> dict[str, Any]:
        """Wait for the end; returns {"tokens", "finish_reason"} or raises RequestRejected.

        ``abandoned`` (e.g. "the client closed its connection") is asked every
        ``check_every`` seconds while waiting; when it says yes the request is
        cancelled and RequestRejected(499) raised, so nobody computes tokens
        that no one will read.
        """
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + check_every
        while True:
            now = time.monotonic()
            if abandoned is not None and now >= next_check:  # by the clock: token events never pause
                next_check = now + check_every
                if abandoned():
                    self.cancel()
                    raise RequestRejected(CLIENT_CLOSED, f"request {self.id} cancelled: the client went away")
            wait = deadline - now if abandoned is None else min(deadline, next_check) - now
            event = self.next_event(max(0.0, wait))
            if event is None:
                if time.monotonic() < deadline:
                    continue
                raise RequestRejected(504, f"request {self.id} did not finish within {timeout} s")
            if event["event"] == "finished":
                return {"tokens": list(self.tokens), "finish_reason": event["finish_reason"]}
            if event["event"] == "error":
                raise RequestRejected(event["status"], event["error"])

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); takes effect between steps."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _emit(self, event: dict[str, Any]) -> None:
        if event["event"] == "token":
            self.tokens.append(event["token"])
        if event["event"] in ("finished", "error"):
            self._done.set()
        self._events.put(event)


@dataclass(eq=False)
class _Request:
    """Scheduler-side state of one request."""

    id: int
    prompt: list[int]
    params: SamplingParams
    generator: Optional[torch.Generator]
    handle: RequestHandle
    generated: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # tokens not yet in the KV cache
    cached: int = 0  # positions 0 .. cached-1 are in the KV cache

    @property
    def capacity(self) -> int:
        """KV positions reserved: the last generated token is never fed back."""
        return len(self.prompt) + self.params.max_tokens - 1

    def restart_from_history(self) -> None:
        """Re-prefill everything seen so far (after the KV cache was lost)."""
        self.pending = self.prompt + self.generated
        self.cached = 0


# ============================================================== attention peers


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
        self.blocks_used = int(setup_reply["blocks_used"])
        self.blocks_total = int(setup_reply["blocks_total"])
        self.block_size = int(setup_reply["block_size"])
        # The worker lets a new model node take over after this long without a message from us.
        takeover_after = setup_reply.get("takeover_after_s")
        self.takeover_after_s = float(takeover_after) if isinstance(takeover_after, (int, float)) else None
        self.outstanding = [0] * data.spec.microbatches  # sent, reply not yet taken

    def heartbeat_interval(self, idle_probe_s: float) -> float:
        """Longest pause between two messages to this worker: well inside its takeover bound."""
        if not self.takeover_after_s or self.takeover_after_s <= 0:
            return idle_probe_s
        return min(idle_probe_s, self.takeover_after_s / protocol.HEARTBEATS_PER_SILENCE)

    @classmethod
    def connect(cls, context: Context, index: int, address: str, config: LlamaConfig, num_workers: int,
                kv_heads: HeadRange, spec: ChannelSpec, connect_timeout: float,
                peer_timeout: float) -> "AttentionPeer":
        """Connect, set the worker up and connect its data channel; raises on any failure."""
        setup_channel = Channel.connect(context, address, protocol.CONTROL_SPEC, role="model",
                                        name=f"setup-{index}", connect_timeout=connect_timeout,
                                        timeout=peer_timeout)
        try:
            setup = protocol.ControlLink(setup_channel, peer_timeout)
            reply = setup.call(protocol.setup_message(config, index, num_workers, kv_heads, spec))
            # Credits ride on the next layer's q/k/v (and are written out whenever this side waits).
            data = Channel.connect(context, address, spec, role="model", name=f"data-{index}",
                                   connect_timeout=connect_timeout, timeout=peer_timeout, piggyback_credits=True)
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
        return reply

    # -- data -------------------------------------------------------------
    def send_buffers(self, microbatch: int, shapes: list[tuple[tuple[int, ...], Any]]) -> list[torch.Tensor]:
        """Views of the next send slot of ``microbatch`` (once its credit is back), for send()."""
        try:
            return self.data.send_buffers(microbatch, [shape for shape, _ in shapes],
                                          [dtype for _, dtype in shapes], as_torch=True)
        except LaminaError as exc:
            raise WorkerLost(self.index, self.address, exc) from exc

    def send(self, tensors: list[Any], layer: int, microbatch: int) -> None:
        try:
            self.data.send(tensors, layer=layer, microbatch=microbatch)
        except LaminaError as exc:
            raise WorkerLost(self.index, self.address, exc) from exc
        self.outstanding[microbatch] += 1

    def recv(self, layer: int, microbatch: int) -> Message:
        """The attention output of (layer, microbatch); the caller releases it."""
        message = self._take(microbatch)
        if message.layer == protocol.ERROR_LAYER:
            text = protocol.decode_error(message)
            message.release()
            raise AttentionStepError(f"attention worker {self.index} at {self.address}: {text}")
        if message.layer != layer:
            message.release()
            raise WorkerLost(self.index, self.address,
                             ProtocolError(f"reply for layer {message.layer}, expected {layer}"))
        return message

    def _take(self, microbatch: int) -> Message:
        try:
            message = self.data.recv(microbatch=microbatch)
        except LaminaError as exc:
            raise WorkerLost(self.index, self.address, exc) from exc
        self.outstanding[microbatch] -= 1
        return message

    def drain(self) -> None:
        """Take and drop every reply still in flight (after an aborted step)."""
        for microbatch, count in enumerate(self.outstanding):
            for _ in range(count):
                self._take(microbatch).release()

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
        self.spares = list(options.spares)
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
                                     self.options.peer_timeout)
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
        """Connect a replacement for a lost worker: a spare, else its own address again."""
        original = self.addresses[index]
        for candidate in [*self.spares, original]:
            try:
                peer = self._connect(index, candidate, _REPLACE_ATTEMPT_S)
            except (LaminaError, OSError) as exc:
                log.debug("replacement %s for worker %d not available: %s", candidate, index, exc)
                continue
            self.peers[index] = peer
            del self.lost[index]
            if candidate != original:
                self.spares.remove(candidate)
                self.addresses[index] = candidate
                self.spares.append(original)  # if it comes back, it can serve as a spare
            log.warning("attention worker %d replaced by %s", index, candidate)
            return True
        return False

    def drain_survivors(self) -> None:
        """Empty the survivors' channels after an aborted step; a failing one is lost too."""
        for peer in self.live:
            try:
                peer.drain()
            except (WorkerLost, AttentionStepError) as exc:
                lost = exc if isinstance(exc, WorkerLost) else WorkerLost(peer.index, peer.address, exc)
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


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    """Lists cut to what one control message holds."""
    size = protocol.CONTROL_BATCH
    return [items[start:start + size] for start in range(0, len(items), size)]


# ============================================================== step planning


@dataclass(frozen=True)
class StepEntry:
    """One request's share of a step: ``tokens`` at positions ``start`` ..."""

    request: _Request
    tokens: list[int]
    start: int
    completes: bool  # feeds the request's last pending token: its logits are sampled

    def as_batch_entry(self) -> tuple[int, list[int], int]:
        return self.request.id, self.tokens, self.start


def plan_microbatches(requests: Sequence[_Request], num_microbatches: int,
                      token_budget: int) -> list[list[StepEntry]]:
    """Split the running requests into at most ``num_microbatches`` balanced micro-batches.

    Requests are taken in admission order, each into the micro-batch with the
    fewest tokens; a request gets all its pending tokens (a whole prompt, or
    one decode token) as far as the budget allows, the rest in later steps.
    """
    count = min(num_microbatches, len(requests))
    bins: list[list[StepEntry]] = [[] for _ in range(count)]
    loads = [0] * count
    for request in requests:
        target = min(range(count), key=lambda i: loads[i])
        room = token_budget - loads[target]
        if room <= 0:
            break
        tokens = request.pending[:room]
        bins[target].append(StepEntry(request, tokens, request.cached, len(tokens) == len(request.pending)))
        loads[target] += len(tokens)
    return [entries for entries in bins if entries]


# ============================================================== one pipelined step


class PipelinedStep:
    """The ``pipeline.PipelineStage`` of one step: model tier here, attention on the peers."""

    def __init__(self, tier: ModelTier, peers: Sequence[AttentionPeer], plan: list[list[StepEntry]],
                 metrics: NodeMetrics):
        self.tier = tier
        self.peers = list(peers)
        self.metrics = metrics
        self.group_size = tier.config.group_size
        self.inputs = [StepInputs.from_batch([entry.as_batch_entry() for entry in entries],
                                             tier.config.vocab_size, tier.device) for entries in plan]
        self.hidden: list[Optional[torch.Tensor]] = [None] * len(plan)
        self.logits: list[Optional[torch.Tensor]] = [None] * len(plan)
        self._sent_ns: dict[tuple[int, int], int] = {}
        # Slots are host memory: a CPU tier computes into them.
        self._zero_copy = tier.device.type == "cpu"

    def begin(self, mb: int) -> None:
        self.hidden[mb] = self.tier.embed(self.inputs[mb].token_ids)

    def pre(self, layer: int, mb: int) -> list[list[torch.Tensor]]:
        """Each worker's message: q, k, v (and on layer 0 the step metadata).

        Computed straight into the workers' send slots where the slots live
        where the tier computes (host memory for a CPU tier): nothing is
        staged. Elsewhere (a CUDA tier with host slots) the channel stages.
        """
        inputs = self.inputs[mb]
        hidden = self.hidden[mb]
        num_tokens = hidden.shape[0]
        if not self._zero_copy:
            qkv = self.tier.pre_attention(layer, hidden, inputs.positions)
            meta = [protocol.encode_step_meta(inputs.request_ids, inputs.positions)] if layer == 0 else []
            return [[*slice_heads(*qkv, peer.kv_heads, self.group_size), *meta] for peer in self.peers]
        messages = [peer.send_buffers(mb, self._shapes(peer, num_tokens, with_meta=layer == 0))
                    for peer in self.peers]
        self.tier.pre_attention_into(layer, hidden, inputs.positions,
                                     [HeadOutputs(peer.kv_heads, *views[:3])
                                      for peer, views in zip(self.peers, messages)])
        if layer == 0:
            # The batch description rides with layer 0; workers keep it for the other layers.
            for views in messages:
                protocol.encode_step_meta(inputs.request_ids, inputs.positions, out=views[3])
        return messages

    def _shapes(self, peer: AttentionPeer, num_tokens: int, with_meta: bool) -> list[tuple[tuple[int, ...], Any]]:
        head_dim, dtype = self.tier.config.head_dim, self.tier.config.dtype
        local_kv = peer.kv_heads[1] - peer.kv_heads[0]
        shapes = [((num_tokens, local_kv * self.group_size, head_dim), dtype),
                  ((num_tokens, local_kv, head_dim), dtype), ((num_tokens, local_kv, head_dim), dtype)]
        if with_meta:
            shapes.append((protocol.step_meta_shape(num_tokens), "int64"))
        return shapes

    def send(self, layer: int, mb: int, messages: list[list[torch.Tensor]]) -> None:
        for peer, tensors in zip(self.peers, messages):
            self._sent_ns[(peer.index, mb)] = time.perf_counter_ns()
            peer.send(tensors, layer, mb)

    def recv(self, layer: int, mb: int) -> torch.Tensor:
        messages: list[Message] = []
        try:
            for peer in self.peers:
                message = peer.recv(layer, mb)
                messages.append(message)
                self._observe_transfer(peer, layer, mb, int(message.tensors[1][0]), message.arrived_ns)
            parts = [message.torch()[0] for message in messages]
            # Concatenating copies out of the slots, so they can be released.
            out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].clone()
        finally:
            for message in messages:
                message.release()
        return out.to(self.tier.device)

    def post(self, layer: int, mb: int, out: torch.Tensor) -> None:
        self.hidden[mb] = self.tier.post_attention(layer, self.hidden[mb], out)

    def end(self, mb: int) -> None:
        hidden = self.hidden[mb]
        self.logits[mb] = self.tier.logits(hidden.index_select(0, self.inputs[mb].last_token_index))
        self.hidden[mb] = None

    def _observe_transfer(self, peer: AttentionPeer, layer: int, mb: int, attention_ns: int,
                          arrived_ns: int) -> None:
        # The wire round trip ends when the reply arrived (the native channel stamps
        # it, CLOCK_MONOTONIC like perf_counter_ns), not when this thread got to it:
        # with two micro-batches the reply often waits for the other's compute.
        collected_ns = time.perf_counter_ns()
        arrived_ns = min(arrived_ns or collected_ns, collected_ns)
        round_trip = max(0, arrived_ns - self._sent_ns[(peer.index, mb)]) / 1e9
        self.metrics.layer_round_trip.observe(round_trip, peer=peer.address, layer=layer)
        self.metrics.layer_transfer.observe(max(0.0, round_trip - attention_ns / 1e9), peer=peer.address,
                                            layer=layer)
        self.metrics.layer_collect_wait.observe((collected_ns - arrived_ns) / 1e9, peer=peer.address,
                                                layer=layer)
        self.metrics.attention_compute.observe(attention_ns / 1e9, peer=peer.address)


# ============================================================== the node


class ModelNode:
    """Scheduler of the model role; see the module docstring.

    Drive it with ``run_once()`` (tests) or ``start()`` (a scheduler thread);
    ``submit()`` is safe from any thread.
    """

    def __init__(self, config: LlamaConfig, weights: LlamaWeights, options: ModelNodeOptions,
                 metrics: Optional[NodeMetrics] = None):
        options.validate(config)
        self.config = config
        self.options = options
        self.metrics = metrics or NodeMetrics()
        self.tier = ModelTier(config, weights, options.device)
        self.context = Context(options.transport, secret=options.secret, progress=options.progress)
        self.cluster = AttentionCluster(self.context, config, options)
        self.step_observer: Optional[StepObserver] = None
        self.steps_run = 0
        self._queue: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._held: list[_Request] = []
        self._wakeup = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_contact = time.monotonic()
        # When the scheduler last completed a step or settled a request (or
        # got work while idle): /healthz measures stalls from here.
        self._progress_at = time.monotonic()
        self.last_overlap_efficiency: Optional[float] = None

    # -- life cycle ---------------------------------------------------------
    def connect(self) -> None:
        """Connect and set up the attention workers (fails fast, naming the cause)."""
        try:
            self.cluster.connect_all()
        except BaseException:
            self.context.close()
            raise
        self._update_gauges()

    def start(self) -> None:
        """Run the scheduler in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="model-scheduler", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once(wait=0.1)
            except Exception:  # noqa: BLE001 - keep serving; the failure is logged
                log.exception("scheduler iteration failed")
                time.sleep(0.1)

    def close(self) -> None:
        """Stop the scheduler, answer every open request with 503 and disconnect."""
        with self._wakeup:
            self._closed = True
            self._stop.set()
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.options.peer_timeout + 5)
        for request in [*self._queue, *self._running, *self._held]:
            self._fail(request, 503, "the model node is shutting down")
        self._queue.clear()
        self._running.clear()
        self._held.clear()
        self.cluster.close()
        self.context.close()

    # -- submission (any thread) --------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams) -> RequestHandle:
        """Queue a request; raises InvalidRequest (400) or RequestRejected (429/503)."""
        self._validate(prompt, params)
        with self._wakeup:
            if self._closed:
                raise RequestRejected(503, "the model node is shutting down")
            if self._degraded_for() > self.options.rebuild_timeout:
                raise RequestRejected(503, f"attention tier unavailable: {self._degraded_causes()}")
            if len(self._queue) >= self.options.max_queue:
                raise RequestRejected(429, f"queue full ({self.options.max_queue} requests waiting)")
            request_id = next(self._ids)
            handle = RequestHandle(request_id, len(prompt))
            request = _Request(request_id, list(prompt), params, make_generator(params, self.tier.device),
                               handle, pending=list(prompt))
            if not self._has_work():
                self._note_progress()  # idle time before this request is not a stall
            self._queue.append(request)
            self._wakeup.notify_all()
        return handle

    def _validate(self, prompt: Sequence[int], params: SamplingParams) -> None:
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidRequest("prompt must be a non-empty list of token ids")
        vocab = self.config.vocab_size
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt has token ids outside [0, {vocab}): {bad[:5]}")
        limit = self.config.max_position_embeddings
        if len(prompt) + params.max_tokens - 1 > limit:
            raise InvalidRequest(
                f"prompt of {len(prompt)} tokens plus max_tokens {params.max_tokens} exceeds the model's "
                f"{limit} positions")

    # -- scheduling (scheduler thread) ----------------------------------------
    def run_once(self, wait: float = 0.0) -> bool:
        """One scheduler iteration: recover, admit, run one step. True if it did any work."""
        with torch.inference_mode():
            try:
                return self._iterate(wait)
            except WorkerLost as lost:
                self._on_worker_lost(lost)
                return True
            finally:
                self._update_gauges()

    def _iterate(self, wait: float) -> bool:
        self._drop_cancelled()
        if not self.cluster.healthy:
            return self._recover()
        admitted = self._admit()
        if self._running:
            self._step()
            self._last_contact = time.monotonic()
            return True
        if not admitted:
            self._keep_alive()
            if wait > 0:
                with self._wakeup:
                    if not self._queue and not self._stop.is_set():
                        self._wakeup.wait(wait)
        return admitted

    def _keep_alive(self) -> None:
        """Heartbeat: a ``status`` to every live worker when no step has reached them for a while.

        Notices a worker that died while nothing ran, refreshes the KV figures,
        and keeps every worker from taking this node for a hung one (a worker
        hands its session to a newly connecting model node after its takeover
        bound of silence). Runs while idle and while a lost worker is replaced.
        """
        interval = min((peer.heartbeat_interval(self.options.idle_probe_s) for peer in self.cluster.live),
                       default=self.options.idle_probe_s)
        if time.monotonic() - self._last_contact < interval:
            return
        self._last_contact = time.monotonic()
        answered = True
        for peer in self.cluster.live:
            try:
                peer.call({"type": "status"})
            except protocol.ControlError as exc:  # it answered, with an error: not lost
                log.warning("attention worker %d at %s refused status: %s", peer.index, peer.address, exc)
                answered = False
        if answered:
            self.cluster.confirm_recovered()

    def _drop_cancelled(self) -> None:
        with self._wakeup:
            for request in [r for r in self._queue if r.handle.cancelled]:
                self._queue.remove(request)
                self._finish(request, "cancelled")
        cancelled = [r for r in (*self._running, *self._held) if r.handle.cancelled]
        if cancelled:
            self._running = [r for r in self._running if not r.handle.cancelled]
            self._held = [r for r in self._held if not r.handle.cancelled]
            for request in cancelled:
                self._finish(request, "cancelled")
            self.cluster.free([r.id for r in cancelled])

    def _admit(self) -> bool:
        with self._wakeup:
            batch = list(self._queue)
            self._queue.clear()
        if not batch:
            return False
        try:
            refused = self.cluster.reserve([(r.id, r.capacity) for r in batch])
        except WorkerLost:
            with self._wakeup:
                self._queue.extendleft(reversed(batch))
            raise
        self.cluster.confirm_recovered()  # every worker answered
        for request in batch:
            if request.id in refused:
                self._fail(request, 503, refused[request.id], outcome="rejected")
            else:
                self._running.append(request)
                self.metrics.prompt_tokens.inc(len(request.prompt))
                request.handle._emit({"event": "admitted"})
        self._note_progress()
        return True

    def _step(self) -> None:
        plan = plan_microbatches(self._running, self.options.microbatches, self.options.max_step_tokens)
        timeline = Timeline("model") if self.options.record_timeline else None
        started = time.perf_counter()
        try:
            step = PipelinedStep(self.tier, self.cluster.live, plan, self.metrics)
            run_step(self.config.num_layers, len(plan), step, timeline)
        except WorkerLost:
            self.metrics.steps.inc(outcome="worker_lost")
            raise
        except Exception as exc:  # noqa: BLE001 - an attention error or a bug: fail this step's requests
            self.metrics.steps.inc(outcome="failed")
            self._abort_step(plan, exc)
            return
        self.cluster.confirm_recovered()
        self._record_step(plan, step, timeline, time.perf_counter() - started)
        ended = self._advance(plan, step.logits)
        self._note_progress()
        if ended:
            self.cluster.free([r.id for r in ended])

    def _record_step(self, plan: list[list[StepEntry]], step: PipelinedStep, timeline: Optional[Timeline],
                     seconds: float) -> None:
        self.steps_run += 1
        self.metrics.steps.inc(outcome="ok")
        self.metrics.step_seconds.observe(seconds)
        entries = [entry for mb_entries in plan for entry in mb_entries]
        self.metrics.step_tokens.observe(sum(len(entry.tokens) for entry in entries))
        if all(len(entry.tokens) == 1 and entry.request.generated for entry in entries):
            self.metrics.decode_step_seconds.inc(seconds)
            self.metrics.decode_tokens.inc(len(entries))
        self.metrics.microbatches.set(len(plan))
        if timeline is not None and len(plan) > 1:
            self.last_overlap_efficiency = timeline.overlap_efficiency()
            self.metrics.overlap_efficiency.set(self.last_overlap_efficiency)
            self.metrics.step_overlap_efficiency.observe(self.last_overlap_efficiency)
        if self.step_observer is not None:
            for mb, (entries, logits) in enumerate(zip(plan, step.logits)):
                self.step_observer(self.steps_run, mb, [entry.as_batch_entry() for entry in entries], logits)

    def _advance(self, plan: list[list[StepEntry]], logits: list[Optional[torch.Tensor]]) -> list[_Request]:
        """Account the fed tokens, sample where a request's input is complete.

        Returns the requests that ended (finished, or failed to sample). A
        request whose sampling fails gets a 500 naming the cause and leaves
        the batch; the others go on as if it had never been there.
        """
        ended: list[_Request] = []
        for entries, mb_logits in zip(plan, logits):
            rows: list[int] = []
            for row, entry in enumerate(entries):
                entry.request.cached += len(entry.tokens)
                del entry.request.pending[: len(entry.tokens)]
                if entry.completes:
                    rows.append(row)
            if not rows:
                continue
            requests = [entries[row].request for row in rows]
            outcomes = sample_each(mb_logits.index_select(0, torch.tensor(rows, device=mb_logits.device)),
                                   [r.params for r in requests], [r.generator for r in requests])
            for request, outcome in zip(requests, outcomes):
                if self._take_sample(request, outcome):
                    ended.append(request)
        if ended:
            self._running = [r for r in self._running if r not in ended]
        return ended

    def _take_sample(self, request: _Request, outcome: int | SamplingError) -> bool:
        """Apply one request's sampling outcome; True when the request has ended."""
        if isinstance(outcome, SamplingError):
            log.error("request %d: %s", request.id, outcome)
            self._fail(request, 500, f"sampling failed: {outcome}")
            return True
        return self._append_token(request, outcome)

    def _append_token(self, request: _Request, token: int) -> bool:
        """Record a sampled token; True when the request is finished."""
        request.generated.append(token)
        self.metrics.add_generated(1)
        request.handle._emit({"event": "token", "token": token})
        if token in request.params.stop_token_ids:
            self._finish(request, "stop")
            return True
        if len(request.generated) >= request.params.max_tokens:
            self._finish(request, "length")
            return True
        request.pending = [token]
        return False

    def _abort_step(self, plan: list[list[StepEntry]], exc: BaseException) -> None:
        """A step failed without losing a worker: fail its requests, clean up the channels."""
        log.error("step failed: %s", exc, exc_info=not isinstance(exc, AttentionStepError))
        failed = {entry.request for entries in plan for entry in entries}
        self._running = [r for r in self._running if r not in failed]
        for request in failed:
            self._fail(request, 500, f"generation step failed: {exc}")
        self._note_progress()
        self.cluster.drain_survivors()
        self.cluster.free([r.id for r in failed])

    # -- faults ---------------------------------------------------------------
    def _on_worker_lost(self, lost: WorkerLost) -> None:
        log.error("%s; holding %d running requests until it is replaced", lost, len(self._running))
        self.metrics.worker_failures.inc(peer=lost.address)
        self.cluster.mark_lost(lost)
        self.cluster.drain_survivors()
        self._held.extend(self._running)
        self._running = []

    def _degraded_for(self) -> float:
        since = self.cluster.lost_since
        return 0.0 if since is None else time.monotonic() - since

    def _recover(self) -> bool:
        """Try to replace lost workers; once whole again, rebuild the held requests.

        The degraded period runs from the first loss until the workers serve
        something again (confirm_recovered), not until a reconnect: once it is
        over rebuild_timeout, held and queued requests fail with 503, so a
        worker that is lost again on every retry cannot hold them forever.
        """
        self._keep_alive()  # the survivors must not take us for a hung model node meanwhile
        for index in sorted(self.cluster.lost):
            self.cluster.try_replace(index)
        if self._degraded_for() > self.options.rebuild_timeout:
            self._fail_unrecoverable()
        if not self.cluster.healthy:
            return False
        held, self._held = self._held, []
        if not held:
            return True
        try:
            refused = self.cluster.reserve([(r.id, r.capacity) for r in held], kind="rebuild")
        except WorkerLost:
            self._held = held + self._held
            raise
        for request in held:
            if request.id in refused:
                self._fail(request, 503, f"cannot rebuild after a worker loss: {refused[request.id]}")
            else:
                request.restart_from_history()
                self._running.append(request)
        self.metrics.rebuilds.inc()
        log.warning("rebuilding the KV cache of %d requests", len(self._running))
        return True

    def _degraded_causes(self) -> str:
        """What the current degraded period is about: the lost workers, else the last loss."""
        if self.cluster.lost:
            return "; ".join(str(lost) for lost in self.cluster.lost.values())
        return f"{self.cluster.losses_since} worker losses without a completed step, last: {self.cluster.last_loss}"

    def _fail_unrecoverable(self) -> None:
        if self.cluster.lost:
            message = (f"no replacement attention worker within {self.options.rebuild_timeout} s "
                       f"({self._degraded_causes()})")
        else:
            message = (f"the attention tier did not recover within {self.options.rebuild_timeout} s "
                       f"({self._degraded_causes()})")
        with self._wakeup:
            queued = list(self._queue)
            self._queue.clear()
        held, self._held = self._held, []
        for request in [*held, *queued]:
            self._fail(request, 503, message)
        if held:  # the survivors still hold their blocks
            self.cluster.free([r.id for r in held])

    # -- request outcomes ------------------------------------------------------
    def _finish(self, request: _Request, reason: str) -> None:
        self.metrics.requests.inc(outcome="completed" if reason != "cancelled" else "cancelled")
        request.handle._emit({"event": "finished", "finish_reason": reason})
        self._note_progress()

    def _fail(self, request: _Request, status: int, message: str, outcome: str = "failed") -> None:
        if request.handle.done:
            return
        self.metrics.requests.inc(outcome=outcome)
        request.handle._emit({"event": "error", "status": status, "error": message})
        self._note_progress()

    # -- observability (any thread) --------------------------------------------
    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._queue))
        self.metrics.running.set(len(self._running))
        self.metrics.held.set(len(self._held))
        for peer in self.cluster.live:
            self.metrics.kv_blocks_used.set(peer.blocks_used, peer=peer.address)
            self.metrics.kv_blocks_total.set(peer.blocks_total, peer=peer.address)
            channel = peer.data.metrics
            self.metrics.bytes_sent.set(channel.bytes_sent, peer=peer.address)
            self.metrics.bytes_received.set(channel.bytes_received, peer=peer.address)
            self.metrics.staged_bytes.set(channel.staged_bytes, peer=peer.address)

    # -- progress and health (any thread) -----------------------------------
    def _note_progress(self) -> None:
        self._progress_at = time.monotonic()

    def _has_work(self) -> bool:
        return bool(self._queue or self._running or self._held)

    def stalled_for(self) -> float:
        """Seconds the scheduler has had work without completing a step or settling a request."""
        return time.monotonic() - self._progress_at if self._has_work() else 0.0

    def unhealthy_reason(self) -> Optional[str]:
        """Why the node cannot serve now, or None when it can (what /healthz reports)."""
        if self._closed:
            return "shutting down"
        if not self.cluster.healthy:
            causes = "; ".join(str(lost) for lost in self.cluster.lost.values())
            return f"attention worker lost: {causes}"
        if self._degraded_for() > self.options.rebuild_timeout:
            return f"attention tier not recovered within {self.options.rebuild_timeout} s: {self._degraded_causes()}"
        if self._thread is not None and not self._thread.is_alive():
            return "the scheduler thread stopped"
        stalled = self.stalled_for()
        if stalled > self.options.stall_timeout:
            return (f"scheduler made no progress for {stalled:.1f} s with {len(self._queue)} queued and "
                    f"{len(self._running)} running requests (stall_timeout {self.options.stall_timeout} s)")
        return None

    @property
    def healthy(self) -> bool:
        return self.unhealthy_reason() is None

    def status(self) -> dict[str, Any]:
        """The cluster as JSON: roles, peers, head shares, KV blocks, queues."""
        config = self.config
        workers = []
        for index, address in enumerate(list(self.cluster.addresses)):
            peer = self.cluster.peers[index]
            kv_heads = self.cluster.head_ranges[index]
            worker: dict[str, Any] = {
                "index": index, "role": "attention", "address": address,
                "state": "up" if peer is not None else "lost",
                "kv_heads": list(kv_heads),
                "q_heads": [kv_heads[0] * config.group_size, kv_heads[1] * config.group_size],
            }
            if peer is not None:
                channel = peer.data.metrics
                worker.update(pid=peer.pid, device=peer.device, blocks_used=peer.blocks_used,
                              blocks_total=peer.blocks_total, block_size=peer.block_size,
                              channel={"messages": channel.messages, "bytes_sent": channel.bytes_sent,
                                       "staged_bytes": channel.staged_bytes,
                                       "staged_messages": channel.staged_messages,
                                       "credits_piggybacked": channel.credits_piggybacked})
            elif index in self.cluster.lost:
                worker["error"] = str(self.cluster.lost[index].cause)
            workers.append(worker)
        return {
            "role": "model",
            "healthy": self.healthy,
            "model": {"fingerprint": config.fingerprint(), "architecture": config.architecture,
                      "layers": config.num_layers, "heads": config.num_heads,
                      "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
                      "vocab_size": config.vocab_size, "dtype": config.dtype,
                      "max_positions": config.max_position_embeddings, "device": str(self.tier.device)},
            "microbatches": self.options.microbatches,
            "max_step_tokens": self.options.max_step_tokens,
            "queued": len(self._queue), "running": len(self._running), "held": len(self._held),
            "steps": self.steps_run,
            "overlap_efficiency": self.last_overlap_efficiency,
            "workers": workers,
            "spares": list(self.cluster.spares),
        }
