"""`lamina-bench pipeline`: the decode pipeline over real channels between processes.

R model replicas and W attention workers run as separate processes
(multiprocessing, spawn) on loopback, or in network namespaces joined by
rate-limited veth links (``--link-rate``; see lamina_comm.bench.netns). Each
replica drives :func:`lamina_comm.pipeline.run_replica` (rotational staggered
pipelining; one replica is the ping-pong schedule) over consecutive decode
steps; each attention worker runs :func:`lamina_comm.pipeline.serve_attention`
over one :class:`~lamina_comm.channel.Channel` per replica, taking requests in
arrival order over all of them (``ChannelGroup.recv_any``) and answering to
the replica that finishes the micro-batch. Per layer and micro-batch a replica
sends q, k, v of each worker's head share, hands the residual stream to the
next replica (when micro-batches rotate) and gets the attention output back,
at the sizes the model shape implies.

Device compute is emulated: the device is busy but the CPU is free, so each
compute span is a timed sleep while the native progress threads keep moving
data. Calibration steps with zero compute measure the transfer time alone;
``--auto-balance`` then sets the compute time per layer equal to it.
Calibration and measured steps alternate in ``--rounds`` rounds, so slow
changes in machine load affect both figures alike.

The orchestrator (this process) only starts workers, hands out phases and
collects timelines over pipes; it carries no benchmark traffic.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import multiprocessing
import multiprocessing.connection
import statistics
import sys
import threading
import time
import traceback
from typing import Any, Iterator, Sequence

import numpy as np

from .. import dtypes
from ..channel import Channel, ChannelGroup, ChannelListener, ChannelSpec, Message
from ..errors import TimeoutError_
from ..pipeline import Rotation, run_replica, serve_attention
from ..transport import Context
from ..timeline import ATTENTION, COMPUTE, Span, Timeline, merge, overlap_efficiency, plot, write_trace
from . import netns

EXIT_SKIPPED = 77  # automake's "skipped": the requested setup is unavailable here
TARGET_RATIO = 1.1  # step <= 1.1 x max(compute, transfer) with the pipeline on
_PR_SET_TIMERSLACK = 29
_POLL_S = 0.2      # attention workers re-check their stop condition this often
_QUIT_WAIT_S = 10.0  # a worker told to quit gets this long before it is terminated
_MARKER = np.dtype("<u2")
_OVERSHOOT_GAIN = 0.25   # how fast the sleep-lateness estimate follows what it sees
_OVERSHOOT_MAX_S = 0.002


# --------------------------------------------------------------------------
# Shape and phases


@dataclasses.dataclass(frozen=True)
class BenchShape:
    """Model shape, split over attention workers by heads and over micro-batches by tokens."""

    hidden: int
    heads: int
    kv_heads: int
    layers: int
    batch: int
    dtype: str
    microbatches: int
    workers: int
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"--heads {self.heads} must divide --hidden {self.hidden}")
        if self.heads % self.kv_heads:
            raise ValueError(f"--kv-heads {self.kv_heads} must divide --heads {self.heads}")
        if self.kv_heads % self.workers:
            raise ValueError(f"--attention-workers {self.workers} must divide --kv-heads {self.kv_heads}")
        if not 1 <= self.microbatches <= self.batch:
            raise ValueError(f"--microbatches must be in 1..batch ({self.batch})")
        if self.layers < 1 or self.workers < 1 or self.replicas < 1:
            raise ValueError("--layers, --attention-workers and --replicas must be >= 1")

    @property
    def rotation(self) -> Rotation:
        return Rotation(self.replicas, self.microbatches)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def worker_heads(self) -> int:
        return self.heads // self.workers

    @property
    def worker_kv_heads(self) -> int:
        return self.kv_heads // self.workers

    def tokens(self, mb: int) -> int:
        """Tokens of micro-batch mb: the batch split as evenly as possible."""
        return self.batch // self.microbatches + (mb < self.batch % self.microbatches)

    def request_shapes(self, mb: int) -> list[tuple[int, int, int]]:
        t, d = self.tokens(mb), self.head_dim
        return [(t, self.worker_heads, d), (t, self.worker_kv_heads, d), (t, self.worker_kv_heads, d)]

    def response_shape(self, mb: int) -> tuple[int, int, int]:
        return (self.tokens(mb), self.worker_heads, self.head_dim)

    def channel_spec(self) -> ChannelSpec:
        return ChannelSpec(max_tokens=self.tokens(0), hidden=self.worker_heads * self.head_dim,
                           heads=self.worker_heads, kv_heads=self.worker_kv_heads, head_dim=self.head_dim,
                           dtype=self.dtype, microbatches=self.microbatches)

    def residual_spec(self) -> ChannelSpec:
        """Replica to replica: one (tokens, hidden) residual per message (fits the full-width request slot)."""
        return ChannelSpec(max_tokens=self.tokens(0), hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads,
                           head_dim=self.head_dim, dtype=self.dtype, microbatches=self.microbatches)

    def layer_bytes(self) -> dict[str, int]:
        """Bytes per layer, whole batch, all workers (Lamina's (2 + 2/G)·e·d per token).

        With rotation the residual stream (d elements per token) also moves
        to the next replica every layer: model tier to model tier.
        """
        itemsize = self.channel_spec().itemsize
        out = self.batch * (self.heads + 2 * self.kv_heads) * self.head_dim * itemsize
        back = self.batch * self.heads * self.head_dim * itemsize
        residual = self.batch * self.hidden * itemsize if self.rotation.rotates else 0
        return {"send": out, "return": back, "residual": residual, "total": out + back + residual}


@dataclasses.dataclass(frozen=True)
class Phase:
    """One measured configuration; compute times are per layer for the whole batch."""

    name: str
    t_model_us: float
    t_attention_us: float
    steps: int
    warmup: int

    def requests(self, shape: BenchShape) -> int:
        """Messages each attention worker serves in this phase."""
        return (self.steps + self.warmup) * shape.layers * shape.microbatches


def _share_s(total_us: float, shape: BenchShape, mb: int) -> float:
    """Compute time of one micro-batch: the per-layer time scaled by its share of tokens."""
    return total_us * 1e-6 * shape.tokens(mb) / shape.batch


class EmulatedDevice:
    """Device time as a timed sleep: the CPU stays free (progress threads move data) until a deadline.

    A sleep overshoots by a wake-up latency (tens of us in an idle VM, even
    with 1 ns timer slack; more when the cores are busy); it is measured once,
    then followed as a running estimate, and subtracted, so emulated compute
    matches the time asked for on average.
    """

    def __init__(self, samples: int = 25, probe_s: float = 200e-6):
        _tighten_timer_slack()
        self.overshoot_s = statistics.median(self._overshoot(probe_s) for _ in range(samples))

    @staticmethod
    def _overshoot(probe_s: float) -> float:
        start = time.perf_counter()
        time.sleep(probe_s)
        return max(0.0, time.perf_counter() - start - probe_s)

    def busy_until(self, deadline: float) -> None:
        left = deadline - time.perf_counter() - self.overshoot_s
        if left > 0:
            time.sleep(left)
            # Under load wake-ups come later than at start-up: follow the lateness
            # (a running estimate), so emulated compute matches the time asked on average.
            late = time.perf_counter() - deadline
            self.overshoot_s = min(max(self.overshoot_s + _OVERSHOOT_GAIN * late, 0.0), _OVERSHOOT_MAX_S)


def _tighten_timer_slack() -> None:
    """Ask for 1 ns timer slack instead of 50 us (Linux prctl; best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)


def _write_marker(q: np.ndarray, layer: int, mb: int) -> None:
    """Stamp (layer, mb) into q's first bytes; the attention worker echoes them back."""
    _marker_bytes(q)[:] = np.array([layer, mb], _MARKER).view(np.uint8)


def _read_marker(t: np.ndarray) -> tuple[int, int]:
    layer, mb = _marker_bytes(t).view(_MARKER)
    return int(layer), int(mb)


def _marker_bytes(t: np.ndarray) -> np.ndarray:
    return np.asarray(t).reshape(-1).view(np.uint8)[:_MARKER.itemsize * 2]


# --------------------------------------------------------------------------
# Attention worker process


def _attention_worker(index: int, shape: BenchShape, host: str, namespace: str | None, transport: str,
                      conn: multiprocessing.connection.Connection, timeout: float) -> None:
    _report_failures(conn, _attention_main, index, shape, host, namespace, transport, conn, timeout)


def _attention_main(index: int, shape: BenchShape, host: str, namespace: str | None, transport: str,
                    conn: multiprocessing.connection.Connection, timeout: float) -> None:
    if namespace:
        netns.enter(namespace)
    device = EmulatedDevice()
    with Context(transport) as ctx, contextlib.ExitStack() as stack:
        # One listener per replica, so each channel's replica is known without a handshake of our own.
        listeners = [stack.enter_context(ChannelListener(ctx, (host, 0), shape.channel_spec(), timeout=timeout,
                                                         piggyback_credits=True))
                     for _ in range(shape.replicas)]
        conn.send(("ready", [listener.address for listener in listeners]))
        channels = [stack.enter_context(listener.accept(timeout=timeout, name=f"attention-{index}-replica-{r}"))
                    for r, listener in enumerate(listeners)]
        conn.send(("connected", None))
        for phase in _phases(conn):
            spans = _serve_phase(channels, device, shape, phase, f"attention {index}")
            conn.send(("done", {"spans": spans, "metrics": _channel_totals([c.metrics.as_dict() for c in channels])}))


def _serve_phase(channels: Sequence[Channel], device: EmulatedDevice, shape: BenchShape, phase: Phase,
                 name: str) -> tuple[Span, ...]:
    """Serve every replica in arrival order; answer to the replica that finishes the micro-batch."""
    timeline = Timeline(name)
    group = ChannelGroup(channels)
    rotation = shape.rotation
    served = 0
    wanted = phase.requests(shape)

    def recv_any() -> tuple[int, int, tuple[int, Message]] | None:
        try:
            index, message = group.recv_any(timeout=_POLL_S)
        except TimeoutError_:
            return None
        return message.layer, message.microbatch, (index, message)

    def compute(layer: int, mb: int, request: tuple[int, Message]) -> tuple[Channel, Any]:
        nonlocal served
        index, message = request
        deadline = time.perf_counter() + _share_s(phase.t_attention_us, shape, mb)
        reply_to = channels[rotation.successor(index)]
        (out,) = reply_to.send_buffers(mb, [shape.response_shape(mb)])  # the output lands in the slot
        _marker_bytes(out)[:] = _marker_bytes(message.tensors[0])  # stands in for attention(q, k, v)
        message.release()
        device.busy_until(deadline)
        served += 1
        return reply_to, out

    def send(layer: int, mb: int, reply: tuple[Channel, Any]) -> None:
        channel, out = reply
        channel.send(out, layer=layer, microbatch=mb)

    serve_attention(recv_any, compute, send, stop=lambda: served >= wanted, timeline=timeline)
    for channel in channels:
        channel.flush()
    return timeline.spans


# --------------------------------------------------------------------------
# Model worker process


class _ModelStage:
    """PipelineStage of one model replica: emulated compute around real q/k/v, residual and output transfers.

    With rotation, ``send`` also hands the micro-batch's residual stream to
    the successor replica, and ``recv`` takes the one the predecessor handed
    over; the attention workers answer to this replica for the micro-batches
    it finishes.
    """

    def __init__(self, channels: Sequence[Channel], residual_out: Channel | None, residual_in: Channel | None,
                 device: EmulatedDevice, shape: BenchShape, phase: Phase):
        self._channels = channels
        self._group = ChannelGroup(channels)  # one native call per layer for all workers, each way
        self._residual_out, self._residual_in = residual_out, residual_in
        self._device = device
        self._shape = shape
        self._phase = phase
        self.ends: list[tuple[int, int]] = []  # (mb, perf_counter_ns) at every end hook

    def _half_model_s(self, mb: int) -> float:
        # pre (norm, q/k/v projections) and post (o_proj, FFN) each take half.
        return _share_s(self._phase.t_model_us, self._shape, mb) / 2

    def pre(self, layer: int, mb: int) -> tuple[list[list[Any]], Any]:
        deadline = time.perf_counter() + self._half_model_s(mb)
        payload = [ch.send_buffers(mb, self._shape.request_shapes(mb)) for ch in self._channels]
        for q, _, _ in payload:
            _write_marker(q, layer, mb)
        residual = None
        if self._residual_out is not None:
            (residual,) = self._residual_out.send_buffers(mb, [(self._shape.tokens(mb), self._shape.hidden)])
            _write_marker(residual, layer, mb)  # stands in for the hidden state
        self._device.busy_until(deadline)
        return payload, residual

    def send(self, layer: int, mb: int, payload: tuple[list[list[Any]], Any]) -> None:
        requests, residual = payload
        self._group.send(requests, layer=layer, microbatch=mb)
        if residual is not None:
            self._residual_out.send(residual, layer=layer, microbatch=mb)

    def recv(self, layer: int, mb: int) -> list[Message]:
        replies = self._group.recv(microbatch=mb)
        if self._residual_in is not None:
            residual = self._residual_in.recv(microbatch=mb)
            got = (residual.layer, *_read_marker(residual.tensors[0]))
            residual.release()
            if got != (layer, layer, mb):
                raise RuntimeError(f"residual for layer {layer} mb {mb} carries (layer, marker) {got}")
        return replies

    def post(self, layer: int, mb: int, replies: list[Message]) -> None:
        deadline = time.perf_counter() + self._half_model_s(mb)
        for reply in replies:
            got = (reply.layer, *_read_marker(reply.tensors[0]))
            if got != (layer, layer, mb):
                raise RuntimeError(f"reply for layer {layer} mb {mb} carries (layer, marker) {got}")
            reply.release()
        self._device.busy_until(deadline)

    def end(self, mb: int) -> None:
        self.ends.append((mb, time.perf_counter_ns()))  # stands in for the LM head and sampling


def _model_worker(index: int, addresses: list[tuple[str, int]], shape: BenchShape, host: str,
                  namespace: str | None, transport: str, conn: multiprocessing.connection.Connection,
                  timeout: float) -> None:
    _report_failures(conn, _model_main, index, addresses, shape, host, namespace, transport, conn, timeout)


def _model_main(index: int, addresses: list[tuple[str, int]], shape: BenchShape, host: str,
                namespace: str | None, transport: str, conn: multiprocessing.connection.Connection,
                timeout: float) -> None:
    if namespace:
        netns.enter(namespace)
    device = EmulatedDevice()
    with Context(transport) as ctx, contextlib.ExitStack() as stack:
        # Credits ride on the next request: every channel is revisited each layer.
        channels = [stack.enter_context(Channel.connect(ctx, address, shape.channel_spec(),
                                                        name=f"replica-{index}-to-{i}", timeout=timeout,
                                                        piggyback_credits=True))
                    for i, address in enumerate(addresses)]
        residual_out = residual_in = None
        if shape.rotation.rotates:
            residual_out, residual_in = _residual_ring(ctx, stack, index, shape, host, conn, timeout)
        conn.send(("ready", sorted({channel.endpoint.transport for channel in channels})))
        for phase in _phases(conn):
            conn.send(("done", _run_replica_phase(index, channels, residual_out, residual_in, device, shape, phase)))


def _residual_ring(ctx: Context, stack: contextlib.ExitStack, index: int, shape: BenchShape, host: str,
                   conn: multiprocessing.connection.Connection, timeout: float) -> tuple[Channel, Channel]:
    """Residual channels: out to the successor replica, in from the predecessor (a ring).

    One-way traffic with nothing coming back to carry credits: credits are
    written on release (no piggybacking).
    """
    listener = stack.enter_context(ChannelListener(ctx, (host, 0), shape.residual_spec(), timeout=timeout))
    conn.send(("listening", listener.address))
    command, successor = conn.recv()
    if command != "successor":
        raise BenchError(f"replica {index}: expected the successor's address, got {command!r}")
    accepted: dict[str, Any] = {}

    def accept() -> None:
        try:
            accepted["channel"] = listener.accept(timeout=timeout, name=f"residual-into-{index}")
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            accepted["error"] = exc

    acceptor = threading.Thread(target=accept, daemon=True)  # the predecessor connects while we connect on
    acceptor.start()
    out = stack.enter_context(Channel.connect(ctx, tuple(successor), shape.residual_spec(),
                                              name=f"residual-from-{index}", timeout=timeout))
    acceptor.join(timeout)
    if "channel" not in accepted:
        raise accepted.get("error") or BenchError(f"replica {index}: the predecessor never connected")
    return out, stack.enter_context(accepted["channel"])


def _run_replica_phase(index: int, channels: Sequence[Channel], residual_out: Channel | None,
                       residual_in: Channel | None, device: EmulatedDevice, shape: BenchShape,
                       phase: Phase) -> dict[str, Any]:
    """warmup + steps consecutive decode steps (no drain in between); the end time of every step."""
    stage = _ModelStage(channels, residual_out, residual_in, device, shape, phase)
    timeline = Timeline(f"replica {index}")
    run_replica(shape.layers, shape.rotation, index, stage, steps=phase.warmup + phase.steps, timeline=timeline)
    for channel in (*channels, *(c for c in (residual_out, residual_in) if c is not None)):
        channel.flush()
    residual = [c.metrics.as_dict() for c in (residual_out,) if c is not None]
    return {"spans": timeline.spans, "ends": stage.ends, "metrics": [ch.metrics.as_dict() for ch in channels],
            "residual_metrics": residual, "sleep_overshoot_us": device.overshoot_s * 1e6}


# --------------------------------------------------------------------------
# Worker plumbing


def _phases(conn: multiprocessing.connection.Connection) -> Iterator[Phase]:
    """Phases sent by the orchestrator, until it says quit."""
    while True:
        command, phase = conn.recv()
        if command == "quit":
            return
        yield phase


def _report_failures(conn: multiprocessing.connection.Connection, main: Any, *args: Any) -> None:
    try:
        main(*args)
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise SystemExit(1)


class BenchError(RuntimeError):
    """A worker failed or went silent."""


@dataclasses.dataclass
class _Worker:
    name: str
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection

    def expect(self, event: str, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            state = "died" if not self.process.is_alive() else "is silent"
            raise BenchError(f"{self.name} {state} (waited {timeout} s for {event!r})")
        try:
            got, payload = self.conn.recv()
        except EOFError:
            raise BenchError(f"{self.name} exited (exit code {self.process.exitcode})") from None
        if got == "error":
            raise BenchError(f"{self.name} failed:\n{payload}")
        if got != event:
            raise BenchError(f"{self.name} said {got!r}, expected {event!r}")
        return payload


class _Workers:
    """Start the attention workers, then the model replicas; stop them all on exit."""

    def __init__(self, shape: BenchShape, hosts: Sequence[str], namespaces: Sequence[str | None],
                 model_namespace: str | None, model_host: str, transport: str, timeout: float):
        self._shape = shape
        self._timeout = timeout
        self._transport = transport
        self.transports: set[str] = set()  # what the replicas' channels negotiated
        self._mp = multiprocessing.get_context("spawn")
        self._attention: list[_Worker] = []
        self._models: list[_Worker] = []
        try:
            self._start(hosts, namespaces, model_namespace, model_host)
        except BaseException:
            self.close()
            raise

    def _spawn(self, name: str, target: Any, *args: Any) -> _Worker:
        parent, child = self._mp.Pipe()
        process = self._mp.Process(target=target, args=(*args, child, self._timeout), name=name, daemon=True)
        process.start()
        child.close()
        return _Worker(name, process, parent)

    def _start(self, hosts: Sequence[str], namespaces: Sequence[str | None], model_namespace: str | None,
               model_host: str) -> None:
        for i, (host, namespace) in enumerate(zip(hosts, namespaces)):
            self._attention.append(self._spawn(f"attention worker {i}", _attention_worker, i, self._shape,
                                               host, namespace, self._transport))
        addresses = [[tuple(a) for a in w.expect("ready", self._timeout)] for w in self._attention]
        for r in range(self._shape.replicas):
            name = "model worker" if self._shape.replicas == 1 else f"model replica {r}"
            self._models.append(self._spawn(name, _model_worker, r, [worker[r] for worker in addresses],
                                            self._shape, model_host, model_namespace, self._transport))
        if self._shape.rotation.rotates:  # wire the residual ring
            rings = [tuple(m.expect("listening", self._timeout)) for m in self._models]
            for r, model in enumerate(self._models):
                model.conn.send(("successor", rings[self._shape.rotation.successor(r)]))
        for worker in self._attention:
            worker.expect("connected", self._timeout)
        for model in self._models:
            self.transports.update(model.expect("ready", self._timeout))

    def run_phase(self, phase: Phase) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Run one phase; returns each replica's result and each attention worker's."""
        for worker in (*self._attention, *self._models):
            worker.conn.send(("phase", phase))
        budget = self._timeout + phase.requests(self._shape) * 0.05
        models = [m.expect("done", budget) for m in self._models]
        return models, [w.expect("done", budget) for w in self._attention]

    def close(self) -> None:
        workers = [*self._attention, *self._models]
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.conn.send(("quit", None))
        for worker in workers:
            worker.process.join(min(self._timeout, _QUIT_WAIT_S))
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(5)

    def __enter__(self) -> "_Workers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------
# Orchestration and report


@contextlib.contextmanager
def _placement(args: argparse.Namespace, workers: int) -> Iterator[dict[str, Any]]:
    """Where workers run: loopback, or a namespace star with rate-limited links."""
    if args.link_rate is None:
        yield {"network": "loopback", "hosts": [args.host] * workers, "namespaces": [None] * workers,
               "model_namespace": None, "model_host": args.host, "transport": args.transport}
        return
    if args.transport == "shm":
        raise ValueError("--link-rate emulates a network link; shm would go around it (use --transport tcp)")
    with netns.star(workers, args.link_rate) as topology:
        # Replicas share the hub namespace: their residual ring runs on its loopback. The workers
        # share one host, so auto would pick shm and skip the emulated link: tcp.
        yield {"network": f"netns veth, tbf {args.link_rate}", "hosts": list(topology.leaf_addresses),
               "namespaces": list(topology.leaves), "model_namespace": topology.hub, "model_host": "127.0.0.1",
               "transport": "tcp"}


def _steps_and_window(models: Sequence[dict[str, Any]], warmup: int) -> tuple[list[float], int, int]:
    """Step times after warm-up and the window they span (ns).

    Steps run back to back, so a step of micro-batch mb lasts from one of its
    ``end`` hooks to the next (on whichever replicas they ran). Step i's time
    is the mean over micro-batches of their i-th measured step; the window
    runs from the earliest end that opens a measured step to the last end.
    """
    ends: dict[int, list[int]] = {}
    for model in models:
        for mb, ns in model["ends"]:
            ends.setdefault(mb, []).append(ns)
    per_mb, opens, closes = [], [], []
    for times in ends.values():
        times.sort()
        measured = times[warmup - 1:]  # the last warm-up step's end opens the first measured step
        per_mb.append([(b - a) / 1e6 for a, b in zip(measured, measured[1:])])
        opens.append(measured[0])
        closes.append(measured[-1])
    steps = [statistics.fmean(column) for column in zip(*per_mb)]
    return steps, min(opens), max(closes)


@dataclasses.dataclass
class _Round:
    """One measured phase: every replica's and attention worker's result, its step times and window."""

    models: list[dict[str, Any]]
    attention: list[dict[str, Any]]
    steps_ms: list[float]
    window_ns: tuple[int, int]


@dataclasses.dataclass
class _Results:
    """What the rounds collected: calibration step times and each measured round."""

    calibration_ms: list[float] = dataclasses.field(default_factory=list)
    rounds: list[_Round] = dataclasses.field(default_factory=list)

    @property
    def step_ms(self) -> list[float]:
        return [ms for r in self.rounds for ms in r.steps_ms]

    @property
    def window_ns(self) -> int:
        return sum(end - start for r in self.rounds for start, end in (r.window_ns,))

    @property
    def last(self) -> _Round:
        return self.rounds[-1]

    def timelines(self) -> list[Timeline]:
        """One timeline per process (replicas, then attention workers) clipped to the measured windows."""
        replicas, workers = len(self.last.models), len(self.last.attention)
        names = ["model"] if replicas == 1 else [f"model replica {r}" for r in range(replicas)]
        timelines = [Timeline(n) for n in names] + [Timeline(f"attention {i}") for i in range(workers)]
        for r in self.rounds:
            for timeline, result in zip(timelines, [*r.models, *r.attention]):
                _copy_spans(timeline, result["spans"], *r.window_ns)
        return timelines


def _copy_spans(timeline: Timeline, spans: Sequence[Span], first_ns: int, last_ns: int) -> None:
    """The spans' parts inside [first_ns, last_ns]."""
    for s in spans:
        start, end = max(s.start_ns, first_ns), min(s.end_ns, last_ns)
        if start < end:
            timeline.record(s.name, start, end, category=s.category, track=s.track, args=s.args)


def _span_total_ms(timeline: Timeline, name: str) -> float:
    return sum(s.duration_ns for s in timeline.spans if s.name == name) / 1e6


def _measurement(shape: BenchShape, phase: Phase, transfer_ms: float, results: _Results) -> dict[str, Any]:
    """The figures of the measured steps (times per step, ms).

    compute = the emulated device time asked for (model + attention per layer,
    times layers): what real devices would take. The measured compute spans
    (model_busy_ms, attention_busy_ms) also hold timer overshoot and wake-up
    delays when transfers keep the CPUs busy, so they are reported but not
    used for the ratios. Busy fraction of a tier: the device time it was
    asked for per step (per replica for the model tier) over the step time,
    i.e. how busy real devices of that speed would be (1.0: never idle); the
    span fractions are the same from the measured spans over the measured
    window, overshoot included.
    """
    steps = results.step_ms
    timelines = results.timelines()
    replicas = shape.replicas
    step_ms = statistics.median(steps)
    compute_ms = shape.layers * (phase.t_model_us + phase.t_attention_us) / 1e3
    biggest, total = max(compute_ms, transfer_ms), compute_ms + transfer_ms
    model_busy = sum(_span_total_ms(t, COMPUTE) for t in timelines[:replicas])
    attention_busy = [_span_total_ms(t, ATTENTION) for t in timelines[replicas:]]
    window_ms = results.window_ns / 1e6
    # Compute-bound period: the attention tier serves every micro-batch of a layer,
    # the model tier's R replicas share them (docs/pipeline.md). The predicted
    # period adds one micro-batch's own round: its compute plus the zero-compute
    # cycle per layer (the calibration). That is right on a latency-bound link,
    # where a micro-batch's transfers take the whole cycle; on a bandwidth-bound
    # one they take about 1/n of it, so there it is an upper estimate.
    bound_ms = shape.layers * max(phase.t_attention_us, phase.t_model_us / replicas) / 1e3
    cycle_ms = transfer_ms / shape.layers
    own_round_ms = (phase.t_model_us + phase.t_attention_us) / 1e3 / shape.microbatches + cycle_ms
    predicted_ms = max(bound_ms, shape.layers * own_round_ms)
    return {
        "step_ms": step_ms, "step_ms_mean": statistics.fmean(steps), "step_ms_min": min(steps),
        "steps_ms": steps,
        "compute_ms": compute_ms, "transfer_ms": transfer_ms,
        "model_busy_ms": model_busy / replicas / len(steps),
        "attention_busy_ms": max(attention_busy) / len(steps),
        "model_busy_fraction": shape.layers * phase.t_model_us / 1e3 / replicas / step_ms,
        "attention_busy_fraction": shape.layers * phase.t_attention_us / 1e3 / step_ms,
        "model_span_fraction": model_busy / (replicas * window_ms),
        "attention_span_fraction": sum(attention_busy) / (len(attention_busy) * window_ms),
        "tokens_per_s": shape.batch / (step_ms / 1e3),
        "tokens_per_s_per_replica": shape.batch / (step_ms / 1e3) / replicas,
        "compute_bound_ms": bound_ms,
        "step_over_compute_bound": step_ms / bound_ms if bound_ms else math.nan,
        "predicted_step_ms": predicted_ms,
        "step_over_predicted": step_ms / predicted_ms if predicted_ms else math.nan,
        "sum_ms": total, "max_ms": biggest,
        "step_over_max": step_ms / biggest if biggest else math.nan,
        "step_over_sum": step_ms / total if total else math.nan,
        "overlap_efficiency": _overlap(timelines[0]) if replicas == 1 else None,
        "t_model_us": phase.t_model_us, "t_attention_us": phase.t_attention_us,
    }


def _overlap(timeline: Timeline) -> float | None:
    try:
        return overlap_efficiency(timeline.spans)
    except ValueError:
        return None


def _channel_totals(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: sum(m[key] for m in metrics) for key in metrics[0]}


def _split(total: int, parts: int) -> list[int]:
    """total steps over parts rounds, as evenly as possible (every round gets at least one)."""
    return [max(1, total // parts + (i < total % parts)) for i in range(parts)]


def _run_rounds(workers: _Workers, shape: BenchShape, args: argparse.Namespace) -> tuple[Phase, _Results]:
    """Calibration and measurement interleaved in rounds, so both see the same machine load.

    With --auto-balance the compute time comes from the first calibration
    round and stays fixed; the transfer figure is the median of all rounds.
    """
    results = _Results()
    phase: Phase | None = None
    for calibration_steps, measured_steps in zip(_split(args.calibration_steps, args.rounds),
                                                 _split(args.steps, args.rounds)):
        models, _ = workers.run_phase(Phase("calibration", 0.0, 0.0, calibration_steps, 1))
        results.calibration_ms += _steps_and_window(models, 1)[0]
        if phase is None:
            phase = _measured_phase(args, shape, statistics.median(results.calibration_ms))
        models, attention = workers.run_phase(dataclasses.replace(phase, steps=measured_steps))
        steps_ms, start_ns, end_ns = _steps_and_window(models, phase.warmup)
        results.rounds.append(_Round(models, attention, steps_ms, (start_ns, end_ns)))
    return phase, results


def _measured_phase(args: argparse.Namespace, shape: BenchShape, transfer_ms: float) -> Phase:
    t_model_us, t_attention_us = args.t_model_us, args.t_attention_us
    if args.auto_balance:
        # Compute per layer (model + attention) equal to the transfer per layer, split evenly.
        t_model_us = t_attention_us = transfer_ms * 1e3 / shape.layers / 2
    return Phase("measure", t_model_us, t_attention_us, args.steps, args.warmup)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate, (auto-)balance, measure; returns the report and the measured timelines."""
    shape = _shape_from_args(args)
    if args.rounds < 1 or args.steps < 1 or args.calibration_steps < 1 or args.warmup < 1:
        raise ValueError("--rounds, --steps, --calibration-steps and --warmup must be >= 1 (a measured step "
                         "starts where a warm-up step ends)")
    with _placement(args, shape.workers) as where, \
            _Workers(shape, where["hosts"], where["namespaces"], where["model_namespace"], where["model_host"],
                     where["transport"], args.timeout) as workers:
        phase, results = _run_rounds(workers, shape, args)
    timelines = results.timelines()
    last = results.last
    transfer_ms = statistics.median(results.calibration_ms)
    report = {
        "config": {**dataclasses.asdict(shape), "head_dim": shape.head_dim,
                   "network": f"{where['network']} ({', '.join(sorted(workers.transports))})",
                   "auto_balance": args.auto_balance, "steps": len(results.step_ms), "warmup": args.warmup,
                   "calibration_steps": len(results.calibration_ms), "rounds": args.rounds},
        "layer_bytes": shape.layer_bytes(),
        "calibration": {"transfer_ms": transfer_ms, "transfer_us_per_layer": transfer_ms * 1e3 / shape.layers,
                        "steps_ms": results.calibration_ms},
        **_measurement(shape, phase, transfer_ms, results),
        "model_sleep_overshoot_us": statistics.fmean(m["sleep_overshoot_us"] for m in last.models),
        "channels": {"model": _channel_totals([x for m in last.models for x in m["metrics"]]),
                     "attention": _channel_totals([a["metrics"] for a in last.attention]),
                     "residual": _channel_totals([x for m in last.models for x in m["residual_metrics"]])
                     if shape.rotation.rotates else None},
    }
    report["target_met"] = report["step_over_max"] <= TARGET_RATIO
    return {"report": report, "timelines": timelines}


def _shape_from_args(args: argparse.Namespace) -> BenchShape:
    return BenchShape(hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, layers=args.layers,
                      batch=args.batch, dtype=dtypes.canonical(args.dtype), microbatches=args.microbatches,
                      workers=args.attention_workers, replicas=args.replicas)


def format_report(r: dict[str, Any]) -> str:
    c, b = r["config"], r["layer_bytes"]
    eff = r["overlap_efficiency"]
    replicas = c["replicas"]
    schedule = "ping-pong" if replicas == 1 else f"rotation over {replicas} model replicas"
    residual = f", {b['residual'] / 1024:.1f} KiB residual replica to replica" if b["residual"] else ""
    return "\n".join([
        f"pipeline: {c['workers']} attention workers over {c['network']}; d={c['hidden']} "
        f"heads={c['heads']}/{c['kv_heads']} L={c['layers']} B={c['batch']} {c['dtype']}, "
        f"{c['microbatches']} micro-batch(es), {schedule}",
        f"per layer: {b['send'] / 1024:.1f} KiB q/k/v out, {b['return'] / 1024:.1f} KiB back{residual}",
        f"transfer alone (zero compute): {r['transfer_ms']:.3f} ms/step "
        f"({r['calibration']['transfer_us_per_layer']:.1f} us/layer)",
        f"emulated compute per layer: model {r['t_model_us']:.1f} us + attention {r['t_attention_us']:.1f} us"
        + (" (auto-balanced)" if c["auto_balance"] else ""),
        f"step time: {r['step_ms']:.3f} ms (median of {c['steps']}; mean {r['step_ms_mean']:.3f}, "
        f"min {r['step_ms_min']:.3f})",
        f"compute {r['compute_ms']:.3f} ms (emulated; measured busy: model {r['model_busy_ms']:.3f}, "
        f"attention {r['attention_busy_ms']:.3f}), transfer {r['transfer_ms']:.3f} ms: "
        f"sum {r['sum_ms']:.3f} ms, max {r['max_ms']:.3f} ms",
        f"step / max = {r['step_over_max']:.3f}, step / sum = {r['step_over_sum']:.3f} "
        f"(target with pipelining: step / max <= {TARGET_RATIO})",
        f"busy (device time asked / step): model tier {r['model_busy_fraction']:.3f}, attention tier "
        f"{r['attention_busy_fraction']:.3f} (measured spans: {r['model_span_fraction']:.3f}, "
        f"{r['attention_span_fraction']:.3f}); {r['tokens_per_s']:.0f} tokens/s, "
        f"{r['tokens_per_s_per_replica']:.0f} per replica",
        f"compute-bound step {r['compute_bound_ms']:.3f} ms, predicted {r['predicted_step_ms']:.3f} ms "
        f"(one micro-batch's round on a latency-bound link); step / predicted {r['step_over_predicted']:.3f}",
        f"overlap efficiency: {'n/a' if eff is None else f'{eff:.3f}'}",
        f"model channels: staged {r['channels']['model']['staged_bytes']} B, credit waits "
        f"{r['channels']['model']['credit_waits']}",
    ])


# --------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lamina-bench pipeline` (defaults: a scaled-down model that runs in seconds)."""
    shape = parser.add_argument_group("model shape")
    shape.add_argument("--hidden", type=int, default=4096, help="hidden size d")
    shape.add_argument("--heads", type=int, default=32, help="query heads")
    shape.add_argument("--kv-heads", type=int, default=8, help="KV heads")
    shape.add_argument("--layers", type=int, default=16)
    shape.add_argument("--batch", type=int, default=32, help="tokens per decode step")
    shape.add_argument("--dtype", choices=sorted(dtypes.CLI_CHOICES), default="fp16")
    run = parser.add_argument_group("pipeline")
    run.add_argument("--microbatches", type=int, default=2,
                     help="micro-batches in flight (1 = pipeline off; R + 1 for rotation over R replicas)")
    run.add_argument("--replicas", type=int, default=1,
                     help="model replicas; micro-batches rotate among them layer by layer (1 = ping-pong)")
    run.add_argument("--attention-workers", type=int, default=2)
    run.add_argument("--t-model-us", type=float, default=200.0,
                     help="emulated model-tier compute per layer, whole batch (us)")
    run.add_argument("--t-attention-us", type=float, default=200.0,
                     help="emulated attention-tier compute per layer, whole batch (us)")
    run.add_argument("--auto-balance", action="store_true",
                     help="set model + attention compute per layer equal to the measured transfer time")
    run.add_argument("--steps", type=int, default=20, help="measured decode steps")
    run.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    run.add_argument("--calibration-steps", type=int, default=10, help="zero-compute steps measuring transfer")
    run.add_argument("--rounds", type=int, default=3,
                     help="interleave calibration and measured steps in this many rounds (load drift)")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="loopback address the workers listen on")
    net.add_argument("--transport", choices=("auto", "tcp", "shm"), default="auto",
                     help="the channels' transport: auto picks shm between the processes of this host "
                          "(tcp with --link-rate, whose link shm would go around)")
    net.add_argument("--link-rate", metavar="RATE",
                     help="run in network namespaces joined by veth with a tc tbf limit, e.g. 10gbit (root)")
    net.add_argument("--timeout", type=float, default=60.0, help="seconds before a silent worker is an error")
    out = parser.add_argument_group("output")
    out.add_argument("--trace", metavar="FILE.json", help="Chrome trace of the measured steps, all processes")
    out.add_argument("--plot", metavar="FILE.png", help="Gantt chart of the measured steps (matplotlib)")
    out.add_argument("--json", metavar="FILE", help="write the report as JSON")
    out.add_argument("--repeat", type=int, default=1, metavar="N",
                     help="run the whole benchmark N times (fresh workers each) and report the spread of "
                          "step / max (min / median / max); trace and plot show the last run")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 on success, 2 on bad options, 77 when --link-rate is unavailable."""
    if args.link_rate is not None and (reason := netns.unavailable_reason()):
        print(f"pipeline: skipped: {reason}", file=sys.stderr)
        return EXIT_SKIPPED
    if args.repeat < 1:
        print("pipeline: --repeat must be >= 1", file=sys.stderr)
        return 2
    reports = []
    for run_index in range(args.repeat):
        try:
            result = run_benchmark(args)
        except ValueError as err:
            print(f"pipeline: {err}", file=sys.stderr)
            return 2
        except netns.NetnsUnavailable as err:
            print(f"pipeline: skipped: {err}", file=sys.stderr)
            return EXIT_SKIPPED
        if args.repeat > 1:
            print(f"--- run {run_index + 1} of {args.repeat}")
        print(format_report(result["report"]))
        reports.append(result["report"])
    report, timelines = reports[-1], result["timelines"]
    if args.repeat > 1:
        report = {**report, **spread_of(reports)}
        print(format_spread(report))
    _write_outputs(args, report, timelines)
    return 0


def spread_of(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """step / max of repeated runs: each, and min / median / max; how many met the target."""
    ratios = [r["step_over_max"] for r in reports]
    return {"repeats": [{"step_over_max": r["step_over_max"], "step_ms": r["step_ms"],
                         "transfer_ms": r["transfer_ms"], "overlap_efficiency": r["overlap_efficiency"]}
                        for r in reports],
            "step_over_max_spread": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)},
            "runs_meeting_target": sum(ratio <= TARGET_RATIO for ratio in ratios)}


def format_spread(report: dict[str, Any]) -> str:
    spread, runs = report["step_over_max_spread"], report["repeats"]
    each = ", ".join(f"{r['step_over_max']:.3f}" for r in runs)
    return (f"step / max over {len(runs)} runs: min {spread['min']:.3f}, median {spread['median']:.3f}, "
            f"max {spread['max']:.3f} ({each}); {report['runs_meeting_target']} of {len(runs)} at or below "
            f"{TARGET_RATIO}")


def _write_outputs(args: argparse.Namespace, report: dict[str, Any], timelines: list[Timeline]) -> None:
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
    if args.trace:
        write_trace(merge(*timelines), args.trace)
        print(f"trace: {args.trace}")
    if args.plot:
        plot(args.plot, *timelines)
        print(f"plot: {args.plot}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lamina-bench pipeline", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
