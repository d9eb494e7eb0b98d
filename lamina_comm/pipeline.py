"""Ping-pong micro-batch scheduler for model-attention disaggregated decoding.

The model tier runs everything but attention. Per layer and micro-batch it
computes q/k/v (``pre``), posts them to the attention tier (``send``), later
blocks for the attention output (``recv``) and runs o_proj + FFN (``post``).
With n >= 2 micro-batches, while one micro-batch is at the attention tier the
model tier computes another (Lamina, arXiv:2405.01814; MegaScale-Infer,
arXiv:2504.02263, calls it ping-pong pipeline parallelism).

The scheduler only calls the callables it is given, so it is independent of
the transport. The schedule itself is plain data (:func:`step_schedule`),
executed by :func:`run_step`; see docs/pipeline.md for why it cannot deadlock.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, NamedTuple, Protocol

from lamina_comm.timeline import ATTENTION, COMPUTE, SEND, WAIT, Timeline

OpKind = Literal["begin", "start", "finish", "end"]


class PipelineStage(Protocol):
    """The model tier's callables for one decode step.

    Optional hooks ``begin(mb)`` / ``end(mb)`` (e.g. embeddings / LM head) are
    called when the stage has them: before the first ``pre`` and after the last
    ``post`` of micro-batch ``mb``.
    """

    def pre(self, layer: int, mb: int) -> Any:
        """Pre-attention part of ``layer`` for ``mb``; returns the payload to send."""

    def send(self, layer: int, mb: int, payload: Any) -> None:
        """Post the payload to the attention tier without waiting for the reply."""

    def recv(self, layer: int, mb: int) -> Any:
        """Block until the attention output of (layer, mb) has arrived; return it."""

    def post(self, layer: int, mb: int, result: Any) -> None:
        """Post-attention part (o_proj, FFN) of ``layer`` for ``mb``."""


@dataclass(frozen=True)
class CallableStage:
    """A :class:`PipelineStage` assembled from plain functions."""

    pre: Callable[[int, int], Any]
    send: Callable[[int, int, Any], None]
    recv: Callable[[int, int], Any]
    post: Callable[[int, int, Any], None]
    begin: Callable[[int], None] | None = None
    end: Callable[[int], None] | None = None


class ScheduledOp(NamedTuple):
    """One scheduler action.

    ``start`` = pre + send of (layer, mb); ``finish`` = recv + post of
    (layer, mb); ``begin`` / ``end`` = the optional per-micro-batch hooks
    (layer is None for those).
    """

    kind: OpKind
    layer: int | None
    mb: int


# --------------------------------------------------------------------------
# Schedules as data


def step_schedule(num_layers: int, num_microbatches: int) -> Iterator[ScheduledOp]:
    """The ping-pong order: round-robin over micro-batches, one layer at a time.

    For each layer, for each micro-batch: finish the previous layer (recv +
    post; begin hook on layer 0), then start this layer (pre + send). Finally
    drain the last layer. Micro-batch ``mb``'s recv of layer l therefore comes
    one full round after its send, and the model tier computes the other
    n - 1 micro-batches in between. With n = 1 it is sequential.
    """
    _check_sizes(num_layers, num_microbatches)
    for layer in range(num_layers):
        for mb in range(num_microbatches):
            if layer == 0:
                yield ScheduledOp("begin", None, mb)
            else:
                yield ScheduledOp("finish", layer - 1, mb)
            yield ScheduledOp("start", layer, mb)
    for mb in range(num_microbatches):
        yield ScheduledOp("finish", num_layers - 1, mb)
        yield ScheduledOp("end", None, mb)


def sequential_schedule(num_layers: int, num_microbatches: int) -> Iterator[ScheduledOp]:
    """Reference order: all layers of micro-batch 0, then of micro-batch 1, ..."""
    _check_sizes(num_layers, num_microbatches)
    for mb in range(num_microbatches):
        yield ScheduledOp("begin", None, mb)
        for layer in range(num_layers):
            yield ScheduledOp("start", layer, mb)
            yield ScheduledOp("finish", layer, mb)
        yield ScheduledOp("end", None, mb)


@dataclass(frozen=True)
class Rotation:
    """Rotational staggered pipelining (Lamina, arXiv:2405.01814): n micro-batches over R model replicas.

    Number the units of work on the model tier k = mb + g·n, where g counts
    layers across steps (g = step·L + layer) and a unit is finish(g - 1) +
    start(g) of one micro-batch. Unit k runs on replica k mod R. Unit k
    depends only on unit k − n (the same micro-batch one layer earlier), and
    every replica runs its units in increasing k, so the order of k is a
    topological order of all the work: no deadlock (docs/pipeline.md). The
    micro-batch's next unit is on replica (r + n) mod R whatever the layer,
    so each replica hands residuals to one fixed successor and takes them from
    one fixed predecessor: a ring. R = 1 is the ping-pong schedule.
    """

    replicas: int
    microbatches: int

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {self.microbatches}")

    def replica_of(self, layer_index: int, mb: int) -> int:
        """The replica that finishes layer_index − 1 and starts layer_index of mb (layers counted across steps)."""
        return (mb + layer_index * self.microbatches) % self.replicas

    def successor(self, replica: int) -> int:
        """Where a micro-batch started on ``replica`` is finished: its residual and attention output go there."""
        return (replica + self.microbatches) % self.replicas

    def predecessor(self, replica: int) -> int:
        """Whose residuals ``replica`` receives."""
        return (replica - self.microbatches) % self.replicas

    @property
    def rotates(self) -> bool:
        """Whether a micro-batch changes replica between layers (else residuals stay put)."""
        return self.successor(0) != 0


def rotation_schedule(num_layers: int, rotation: Rotation, replica: int, steps: int = 1) -> Iterator[ScheduledOp]:
    """The ops of one replica for ``steps`` consecutive decode steps, in unit order.

    A step boundary is one unit: finish the last layer, ``end`` (LM head and
    sampling), ``begin`` (embedding) and start layer 0 of the next step, so
    consecutive steps do not drain the pipeline in between. With one replica
    and one step this is exactly :func:`step_schedule`.
    """
    _check_sizes(num_layers, rotation.microbatches)
    if not 0 <= replica < rotation.replicas:
        raise ValueError(f"replica must be in 0..{rotation.replicas - 1}, got {replica}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    total = steps * num_layers
    for g in range(total + 1):
        for mb in range(rotation.microbatches):
            if rotation.replica_of(g, mb) != replica:
                continue
            if g > 0:
                yield ScheduledOp("finish", (g - 1) % num_layers, mb)
                if g % num_layers == 0:
                    yield ScheduledOp("end", None, mb)
            if g < total:
                if g % num_layers == 0:
                    yield ScheduledOp("begin", None, mb)
                yield ScheduledOp("start", g % num_layers, mb)


def _check_sizes(num_layers: int, num_microbatches: int) -> None:
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")


# --------------------------------------------------------------------------
# Execution


def run_step(
    num_layers: int,
    num_microbatches: int,
    stage: PipelineStage,
    timeline: Timeline | None = None,
) -> None:
    """Run one decode step on the model tier with the ping-pong schedule."""
    execute(step_schedule(num_layers, num_microbatches), stage, timeline)


def run_sequential(
    num_layers: int,
    num_microbatches: int,
    stage: PipelineStage,
    timeline: Timeline | None = None,
) -> None:
    """Run the same callables one micro-batch at a time (the no-overlap reference)."""
    execute(sequential_schedule(num_layers, num_microbatches), stage, timeline)


def run_replica(
    num_layers: int,
    rotation: Rotation,
    replica: int,
    stage: PipelineStage,
    steps: int = 1,
    timeline: Timeline | None = None,
) -> None:
    """Run one replica's share of ``steps`` decode steps under rotational staggered pipelining.

    The stage's ``send`` must deliver the residual and have the attention
    output delivered to ``rotation.successor(replica)``; its ``recv`` takes
    both from ``rotation.predecessor(replica)``.
    """
    execute(rotation_schedule(num_layers, rotation, replica, steps), stage, timeline)


def execute(
    schedule: Iterable[ScheduledOp], stage: PipelineStage, timeline: Timeline | None = None
) -> None:
    """Carry out ``schedule`` by calling ``stage``, wrapping each call in a span."""
    executor = _StageExecutor(stage, timeline)
    for op in schedule:
        executor.run(op)


class _StageExecutor:
    def __init__(self, stage: PipelineStage, timeline: Timeline | None) -> None:
        self._stage = stage
        self._timeline = timeline

    def run(self, op: ScheduledOp) -> None:
        if op.kind == "start":
            self._start(op.layer, op.mb)
        elif op.kind == "finish":
            self._finish(op.layer, op.mb)
        else:
            self._hook(op.kind, op.mb)

    def _start(self, layer: int, mb: int) -> None:
        with self._span(COMPUTE, "pre", layer, mb):
            payload = self._stage.pre(layer, mb)
        with self._span(SEND, "send", layer, mb):
            self._stage.send(layer, mb, payload)

    def _finish(self, layer: int, mb: int) -> None:
        with self._span(WAIT, "recv", layer, mb):
            result = self._stage.recv(layer, mb)
        with self._span(COMPUTE, "post", layer, mb):
            self._stage.post(layer, mb, result)

    def _hook(self, kind: OpKind, mb: int) -> None:
        hook = getattr(self._stage, kind, None)
        if hook is not None:
            with self._span(COMPUTE, kind, None, mb):
                hook(mb)

    def _span(
        self, name: str, category: str, layer: int | None, mb: int
    ) -> AbstractContextManager[None]:
        return _span(self._timeline, name, category, layer, mb)


def _span(
    timeline: Timeline | None, name: str, category: str, layer: int | None, mb: int
) -> AbstractContextManager[None]:
    if timeline is None:
        return nullcontext()
    args = {"mb": mb} if layer is None else {"layer": layer, "mb": mb}
    return timeline.span(name, category=category, track=mb, args=args)


# --------------------------------------------------------------------------
# Attention tier


def serve_attention(
    recv_any: Callable[[], tuple[int, int, Any] | None],
    compute: Callable[[int, int, Any], Any],
    send: Callable[[int, int, Any], None],
    stop: Callable[[], bool],
    timeline: Timeline | None = None,
) -> int:
    """Attention-tier loop: serve requests in arrival order until ``stop()``.

    ``recv_any()`` returns the next ``(layer, mb, payload)`` that arrived, or
    None when nothing came within its own timeout (so ``stop`` is checked
    again; it should block for a while rather than return None at once).
    ``compute(layer, mb, payload)`` runs attention; ``send(layer, mb, result)``
    returns the output to the model tier. Serving strictly in arrival order is
    what makes the model tier's schedule deadlock-free. Returns the number of
    requests served.
    """
    served = 0
    while not stop():
        request = recv_any()
        if request is None:
            continue
        layer, mb, payload = request
        with _span(timeline, ATTENTION, "attention", layer, mb):
            result = compute(layer, mb, payload)
        with _span(timeline, SEND, "send", layer, mb):
            send(layer, mb, result)
        served += 1
    return served
